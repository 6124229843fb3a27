"""The own-scan path's checks on the phantom's 5 folds, with one demo checkpoint per fold (the checkpoints of
examples/whole_volume_phantom.sh), through prediction.volume.segment_volume (what predict.py and EP2 run):

1. partial fields of view: a query that is a 20-slice slab cut from a longer query (its own origin; 20 slices
   centred on the organs) against the whole query on the same slices; and the whole query segmented from a 20-slice
   slab of the support (organs cut at both ends) against the whole support;
2. one decision for all classes: each class asked for alone against the four at once (fold 0's two queries).

    python -m launch.own_scan_checks --data-dir data/PHANTOM/phantom_normalized \\
        --checkpoints runs/whole_volume/train --out docs/results/own_scan_checks_phantom.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from dataloaders.manual_anno_dataset import load_annotated_scans
from dataloaders.normalization import Normalizer
from evaluation.ep2 import margin_fn
from evaluation.metric import mask_dice
from evaluation.predictors import FastPredictor
from models.grid_proto_fewshot import FewShotSeg
from models.weights import load_model_weights
from prediction.volume import QueryScan, SupportScan, segment_volume
from util.atomic import write_text
from util.checkpoint import load_checkpoint
from util.options import OptionParser, existing_dir

CLASSES = [1, 2, 3, 4]
SLAB = 20


def dices(labels: np.ndarray, gt: np.ndarray, classes: list[int]) -> dict[int, float]:
    """3D Dice per class of a label volume against the ground truth."""
    return {c: mask_dice(labels == c, gt == c) for c in classes}


def fold_data(data_dir: Path, ckpt_path: Path, fold_index: int) -> tuple:
    """(margin function, support scan, {query id: (QueryScan, label)}) of one fold."""
    info = get_dataset_info("PHANTOM")
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    fold = info.fold(fold_index, available=niftiio.list_scan_ids(data_dir), n_shots=1)
    sid, queries = fold.support[0], list(fold.queries)
    scans = load_annotated_scans(data_dir, info, queries + [sid], Normalizer.from_dict(ckpt["normalizer"]))
    model = FewShotSeg.from_config(cfg)
    load_model_weights(model, ckpt["model"], ckpt_path)
    fast = FastPredictor(model.eval(), torch.device("cpu"), window=cfg["val_wsize"], batch_size=16,
                         input_size=cfg["input_size"][0])
    raw = {x: niftiio.read_volume(niftiio.image_path(data_dir, x))[0].astype(np.float32) for x in queries + [sid]}
    sp = {x: tuple(float(v) for v in reversed(scans.geometry[x].spacing)) for x in queries + [sid]}
    support = SupportScan(scans.images[sid], scans.labels[sid], raw[sid], sp[sid])
    qs = {q: (QueryScan(scans.images[q], raw[q], sp[q]), scans.labels[q]) for q in queries}
    return margin_fn(fast), support, qs


def partial_fov(data_dir: Path, checkpoints: Path) -> dict:
    """Check 1 over the 5 folds: per query, the Dice of the 20-slice query slab against the whole query on the same
    slices, and of the whole query segmented from a 20-slice support slab against the whole support (3D Dice per
    class, in [0, 1]); the means and their ratio are added under ``*_mean`` and ``slab_support_ratio``."""
    rows = []
    for f in range(5):
        margin, sup, queries = fold_data(data_dir, checkpoints / f"fold{f}" / "snapshots" / "2000.pth", f)
        organ = np.flatnonzero((sup.label > 0).any(axis=(1, 2)))
        a = int(max(0, min(organ[0] + 3, sup.label.shape[0] - SLAB)))
        cut_s = slice(a, a + SLAB)
        slab_sup = SupportScan(sup.image[cut_s], sup.label[cut_s], sup.raw[cut_s], sup.spacing_zyx)
        present = [c for c in CLASSES if (slab_sup.label == c).any()]
        for q, (query, gt) in queries.items():
            full = segment_volume(margin, [sup], query, CLASSES, modality="MR")
            organ_q = np.flatnonzero((gt > 0).any(axis=(1, 2)))
            b = int(np.clip((organ_q[0] + organ_q[-1]) // 2 - SLAB // 2, 0, gt.shape[0] - SLAB))
            cut_q = slice(b, b + SLAB)
            slab_q = QueryScan(query.image[cut_q], query.raw[cut_q], query.spacing_zyx)
            slab = segment_volume(margin, [sup], slab_q, CLASSES, modality="MR")
            from_slab = segment_volume(margin, [slab_sup], query, present, modality="MR")
            rows.append({"fold": f, "query": q, "query_slab_slices": [b, b + SLAB - 1],
                         "support_slab_slices": [a, a + SLAB - 1],
                         "slab_query_dice": dices(slab.labels, gt[cut_q], CLASSES),
                         "whole_query_dice_on_slab": dices(full.labels[cut_q], gt[cut_q], CLASSES),
                         "whole_support_dice": dices(full.labels, gt, present),
                         "slab_support_dice": dices(from_slab.labels, gt, present)})
            print(json.dumps(rows[-1]), flush=True)

    def mean(key: str) -> float:
        return float(np.mean([np.mean(list(r[key].values())) for r in rows]))

    return {"rows": rows, "slab_query_mean": mean("slab_query_dice"),
            "whole_query_on_slab_mean": mean("whole_query_dice_on_slab"),
            "slab_support_mean": mean("slab_support_dice"), "whole_support_mean": mean("whole_support_dice"),
            "slab_support_ratio": mean("slab_support_dice") / mean("whole_support_dice")}


def one_decision(data_dir: Path, checkpoints: Path) -> dict:
    """Check 2 on fold 0: per query, the 3D Dice of each class segmented with all four classes at once
    (``together``) and alone, and their difference (together - alone)."""
    margin, sup, queries = fold_data(data_dir, checkpoints / "fold0" / "snapshots" / "2000.pth", 0)
    out = {}
    for q, (query, gt) in queries.items():
        together = dices(segment_volume(margin, [sup], query, CLASSES, modality="MR").labels, gt, CLASSES)
        alone = {c: dices(segment_volume(margin, [sup], query, [c], modality="MR").labels, gt, [c])[c]
                 for c in CLASSES}
        out[str(q)] = {"together": together, "alone": alone, "difference": {c: together[c] - alone[c]
                                                                         for c in CLASSES}}
        print(q, out[str(q)], flush=True)
    return out


def build_parser() -> OptionParser:
    """The options of ``python -m launch.own_scan_checks`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m launch.own_scan_checks", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=existing_dir, default=Path("data/PHANTOM/phantom_normalized"),
                        help="the demo's phantom (processed)")
    parser.add_argument("--checkpoints", type=existing_dir, default=Path("runs/whole_volume/train"),
                        help="folder of fold<k>/snapshots/2000.pth (examples/whole_volume_phantom.sh)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/own_scan_checks_phantom.json"),
                        help="the result JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run both checks and write the JSON; 2 with one ``error:`` line on a bad option."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(2)
    result = {"partial_fov": partial_fov(args.data_dir, args.checkpoints),
              "one_decision_fold0": one_decision(args.data_dir, args.checkpoints)}
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    p = result["partial_fov"]
    print(f"query slab {p['slab_query_mean']:.3f} vs whole query on the slab's slices "
          f"{p['whole_query_on_slab_mean']:.3f}; support slab {p['slab_support_mean']:.3f} vs whole support "
          f"{p['whole_support_mean']:.3f} (ratio {p['slab_support_ratio']:.3f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
