"""How well the registration alone places each organ along z: the support label carried onto every query of the
phantom's 5 folds (no network, no checkpoint), for the default registration and for variants of its z search.

For every fold, the fold's support is prepared once (``prediction.correspondence.prepare_support``) and registered
onto each query (``register``); the warped support label's first and last slice of each class are compared with the
query's ground truth. A (query, class) pair is *within tolerance* when both ends are at most ``--tolerance`` slices
off: the criterion of docs/protocols.md "Whole-volume methods" (there measured on the final segmentation; here on the
atlas alone, which shows how much of the miss is the registration's).

    python -m launch.z_localisation --data-dir data/PHANTOM/phantom_normalized \\
        --out docs/results/z_localisation_phantom.json

A few seconds per variant without the in-plane stages (``z``-only variants), about 30 s with them (2 CPU cores).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from evaluation.ep1_alp import class_z_range
from prediction.correspondence import DEFAULT_STAGES, prepare_support, register
from util.atomic import write_text
from util.errors import EXIT_USER_ERROR, ProjectError, error_line
from util.options import OptionParser, existing_dir, int_at_least

#: name -> (prepare_support options, register options). ``default`` is what predict.py and EP2 run.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "z search only": ({}, {"stages": ("z",)}),
    "no Demons": ({}, {"stages": tuple(s for s in DEFAULT_STAGES if s != "demons")}),
    "correlation in both": ({}, {"metric": "correlation", "search_metric": "correlation"}),
    "Mattes MI in the linear stages too (the MR default until 5 Dec)": ({}, {"metric": "mattes"}),
    "mean squares in the z search too": ({}, {"search_metric": "meansquares"}),
    "in-plane scale: none": ({}, {"scale_mode": "none"}),
    "in-plane scale: searched": ({}, {"scale_mode": "search"}),
    "3 z-search starts": ({}, {"n_starts": 3}),
    "linear stages move z": ({}, {"z_from_search": False}),
    "search feature: gradient": ({"search_feature": "gradient"}, {"search_metric": "correlation"}),
    "search feature: rank": ({"search_feature": "rank"}, {}),
    "search feature: local": ({"search_feature": "local"}, {"search_metric": "correlation"}),
    "search 3 mm px, 2 mm steps": ({"search_mm": 3.0, "search_step_mm": 2.0}, {}),
}


def load_folds(data_dir: Path, dataset: str = "PHANTOM") -> tuple[dict[int, tuple[tuple[int, ...], tuple[int, ...]]],
                                                                   dict[int, tuple[np.ndarray, np.ndarray, tuple]]]:
    """The dataset's 1-shot folds ({fold: (support ids, query ids)}) and every scan they name
    ({id: (image (Z, H, W) float32, label (Z, H, W) int, spacing (dz, dy, dx) mm)})."""
    info = get_dataset_info(dataset)
    available = niftiio.list_scan_ids(data_dir)
    folds = {}
    for f in range(info.n_folds):
        fold = info.fold(f, available=available, n_shots=1)
        folds[f] = (fold.support, fold.queries)
    scans = {}
    for sid in sorted({s for sup, qs in folds.values() for s in sup + qs}):
        image, geometry = niftiio.read_volume(niftiio.image_path(data_dir, sid), np.float32)
        label, _ = niftiio.read_volume(niftiio.label_path(data_dir, sid), np.int64)
        scans[sid] = (image, label, tuple(float(v) for v in reversed(geometry.spacing)))
    return folds, scans


def measure(folds: dict, scans: dict, modality: str, prep: dict[str, Any], options: dict[str, Any],
            tolerance: int = 3) -> dict[str, Any]:
    """One variant over all folds: per (query, class) the (first, last) slice errors of the warped support label
    (predicted - true, slices; None when the label is carried outside the query), the share within ``tolerance``
    at both ends, the mean absolute end error (slices) and the seconds taken."""
    start = time.perf_counter()
    pairs: dict[str, list[int] | None] = {}
    for sup_ids, queries in folds.values():
        image, label, spacing = scans[sup_ids[0]]
        atlas = prepare_support(image, spacing, label, modality, **prep)
        for q in queries:
            q_image, q_label, q_spacing = scans[q]
            warped = register(atlas, q_image, q_spacing, modality, **options).warp_label()
            for c in sorted(int(x) for x in np.unique(q_label) if x > 0):
                true, got = class_z_range(q_label, c), class_z_range(warped, c)
                pairs[f"{q},{c}"] = None if got is None else [got[0] - true[0], got[1] - true[1]]
    errors = [abs(e) for v in pairs.values() if v is not None for e in v]
    ok = [v is not None and max(abs(v[0]), abs(v[1])) <= tolerance for v in pairs.values()]
    return {"share_within_tolerance": float(np.mean(ok)), "mean_abs_end_error_slices": float(np.mean(errors)),
            "n_pairs": len(pairs), "seconds": round(time.perf_counter() - start, 1), "errors": pairs,
            "prepare_support": {k: list(v) if isinstance(v, tuple) else v for k, v in prep.items()},
            "register": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}


def build_parser() -> OptionParser:
    """The options of ``python -m launch.z_localisation`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m launch.z_localisation", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=existing_dir, default=Path("data/PHANTOM/phantom_normalized"),
                        help="the demo's phantom (processed, with labels)")
    parser.add_argument("--dataset", default="PHANTOM", help="registry name or description file of the folds")
    parser.add_argument("--modality", choices=("CT", "MR"), default="MR", help="modality of the scans")
    parser.add_argument("--variants", default="all",
                        help=f"comma-separated names of {list(VARIANTS)}, or 'all'")
    parser.add_argument("--tolerance", type=int_at_least(0), default=3, help="slices allowed at each end")
    parser.add_argument("--out", type=Path, default=Path("docs/results/z_localisation_phantom.json"),
                        help="the result JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure the variants and write the JSON; 2 with one ``error:`` line on a bad option or variant name."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {unknown or names}; choose from {list(VARIANTS)} or 'all'")
    try:
        folds, scans = load_folds(args.data_dir, args.dataset)
    except ProjectError as err:  # a bad dataset name or description, or an unreadable scan
        print(error_line(err), file=sys.stderr)
        return EXIT_USER_ERROR
    rows = {}
    for name in tqdm(names, desc="variants", unit="variant"):
        prep, options = VARIANTS[name]
        rows[name] = measure(folds, scans, args.modality, dict(prep), dict(options), args.tolerance)
        tqdm.write(f"{name}: {rows[name]['share_within_tolerance']:.3f} within {args.tolerance} slices, mean end "
                   f"error {rows[name]['mean_abs_end_error_slices']:.2f} slices ({rows[name]['seconds']} s)")
    result = {"data_dir": str(args.data_dir), "dataset": args.dataset, "tolerance_slices": args.tolerance,
              "folds": {str(f): {"support": list(s), "queries": list(q)} for f, (s, q) in folds.items()},
              "variants": rows}
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
