"""Segment new scans from one (or a few) annotated scans with a trained checkpoint, in the scans' own geometry.

    python predict.py --checkpoint runs/own/snapshots/100000.pth \\
        --support-image atlas.nii.gz --support-label atlas_seg.nii.gz --classes LIVER=5,SPLEEN=1 \\
        --query scans/ --out predictions/ [--query-label ...] [--device auto|cpu|cuda] [--batch-size N]

Several ``--support-image``/``--support-label`` pairs = k-shot: the model pools the prototypes of all support scans
(docs/method.md#several-shots). Support and query scans go through the transform of ``data_preprocessing.prepare``
(:mod:`data_preprocessing.geometry`: reorientation, intensity, in-plane resampling, centre crop/pad) with the
settings recorded in the checkpoint, or with ``--modality/--spacing/--size/--window`` (an original SSL-ALPNet
state dict also needs ``--modelname``). No label is ever used on a query: the whole query volume is segmented with
the EP2 rule shared with ``validation.py with protocol=ep2`` (:func:`evaluation.ep2.ep2_segment_class`).

Writes into ``--out`` (all files or none: a temporary sibling folder renamed at the end):

- ``<query name>_seg.nii.gz``: labels with the user's ids on the query's own source grid (size, spacing, origin,
  direction identical to the input; a DICOM folder's name is its query name);
- ``overlays/<query name>_<CLASS>.png``: a few slices, prediction outline red, reference (``--query-label``) green;
- ``predictions.json``: per query and class: label id, volume in ml, slices holding it, Dice and HD95 in mm when a
  reference is given;
- ``report.html``: one self-contained page with the table and the overlays.

Bad input (a missing file, a support label without a requested id, a label on another grid than its image, a
checkpoint that does not fit) prints one ``error: ...`` line naming the file and exits with 2, before any work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.backbone import BACKBONES
from prediction.run import run
from prediction.volume import DEFAULT_METHOD, INPLANE_MARGIN_MM, MARGIN_MM, METHODS
from util.errors import EXIT_OK, EXIT_USER_ERROR, ProjectError, error_line
from util.options import OptionParser, parse_classes, positive_float, positive_int


def build_parser() -> OptionParser:
    p = OptionParser(prog="python predict.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a project checkpoint or an original state dict")
    p.add_argument("--support-image", type=Path, action="append", required=True, help="annotated scan (repeat: k-shot)")
    p.add_argument("--support-label", type=Path, action="append", required=True, help="its label file (same order)")
    p.add_argument("--classes", type=parse_classes, required=True, help="NAME=ID[,NAME=ID]: the support labels' ids")
    p.add_argument("--query", type=Path, nargs="+", required=True, help="scan files or folders (DICOM series)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or a previous output)")
    p.add_argument("--query-label", type=Path, nargs="+", default=None, help="reference labels, one per query")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=positive_int, default=16, help="query slices per forward pass")
    p.add_argument("--n-part", type=positive_int, default=None,
                   help="support slices per support scan (default: checkpoint's n_sup_part, else 3)")
    p.add_argument("--modality", choices=("CT", "MR"), default=None, help="preprocessing when the checkpoint has none")
    p.add_argument("--spacing", type=positive_float, default=None, help="in-plane spacing in mm")
    p.add_argument("--size", type=positive_int, default=None, help="in-plane size of the processed grid (voxels)")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="CT window in HU")
    p.add_argument("--modelname", choices=BACKBONES, default=None, help="backbone of a plain state dict")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help="how the whole query is segmented: registered (default: registration places each support "
                        "along the query, then the network), atlas (the supports' labels carried by registration, "
                        "no network), body (the previous release's body-extent rule); docs/protocols.md")
    p.add_argument("--margin-mm", type=positive_float, default=MARGIN_MM,
                   help=f"registered: widening of the carried organ along z (its z-range), mm (default {MARGIN_MM:g})")
    p.add_argument("--inplane-margin-mm", type=positive_float, default=INPLANE_MARGIN_MM,
                   help=f"registered: in-plane widening of the carried organ (its prior), mm "
                        f"(default {INPLANE_MARGIN_MM:g})")
    p.add_argument("--body-threshold", type=float, default=None, help="body mask threshold on the processed image "
                   "(default: CT 1e-4, MR 50.0001, the registry's; only the body's z-extent is used)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: exit 0 on success, 2 with one ``error:`` line on bad input (util.cli conventions)."""
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except ProjectError as err:
        print(error_line(err), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    for qname, q in summary["queries"].items():
        cells = [f"{c} {v['volume_ml']:.1f} ml" + (f", Dice {v['dice']:.3f}" if v.get("dice") is not None else "")
                 for c, v in q["classes"].items()]
        print(f"{qname}: " + "; ".join(cells))
    print(f"wrote {args.out}/ (report.html, predictions.json) in {summary['elapsed_s']:.1f} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
