"""Evaluate the learning-free intensity baseline with EP1-ALP on one fold of a dataset.

Usage::

    python -m evaluation.baseline --data-dir data/PHANTOM/phantom_normalized --dataset PHANTOM --fold 0 \
        [--n-part 3] [--norm auto|zscore|raw] [--json runs/baseline_fold0.json]

Images are normalised as the model sees them (docs/method.md#load-time-normalisation): ``auto`` = per-volume z-score for
MR, one z-score with the mean and std of the fold's training scans for CT (equivalent to raw for a threshold fitted on
the support).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from dataloaders.dataset_info import DatasetDescriptionError, DatasetInfo, get_dataset_info
from dataloaders.niftiio import image_path, list_scan_ids, load_scan, read_volume, write_json
from evaluation.ep1_alp import FoldResult, evaluate_fold
from evaluation.tables import dice_table, labelled_rows
from models.intensity_baseline import IntensityBaseline
from util.options import OptionParser, existing_dir, float_between, int_at_least

Norm = Literal["auto", "zscore", "raw"]


def load_fold_volumes(info: DatasetInfo, data_dir: str | Path, fold: int, norm: Norm = "auto",
                      n_shots: int = 1) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], list[int], list[int]]:
    """Load the fold's support and query scans, normalised.

    Returns:
        ``(images, labels, support_ids, query_ids)``; images (Z, H, W) float32, labels (Z, H, W) int32.
    """
    f = info.fold(fold, available=list_scan_ids(data_dir), n_shots=n_shots)
    ids = list(f.support) + list(f.queries)
    scans = {i: load_scan(data_dir, i, known_labels=set(info.labels)) for i in ids}
    images = {i: s.image.astype(np.float32) for i, s in scans.items()}
    labels = {i: s.label for i, s in scans.items()}
    mode = ("zscore" if info.modality == "MR" else "global") if norm == "auto" else norm
    if mode == "zscore":
        images = {i: (v - v.mean()) / (v.std() + 1e-8) for i, v in images.items()}
    elif mode == "global":  # CT: mean and std over all voxels of the fold's training scans
        total = count = sq = 0.0
        for i in f.train:
            v, _ = read_volume(image_path(data_dir, i), np.float64)
            total, sq, count = total + v.sum(), sq + np.square(v).sum(), count + v.size
        mean = total / count
        std = float(np.sqrt(max(sq / count - mean * mean, 0.0))) + 1e-8
        images = {i: ((v - mean) / std).astype(np.float32) for i, v in images.items()}
    return images, labels, list(f.support), list(f.queries)


def run_baseline(info: DatasetInfo, data_dir: str | Path, fold: int, n_part: int = 3, norm: Norm = "auto",
                 baseline: IntensityBaseline | None = None) -> FoldResult:
    """EP1-ALP of :class:`IntensityBaseline` on all evaluated classes of one fold."""
    images, labels, support, queries = load_fold_volumes(info, data_dir, fold, norm)
    return evaluate_fold(baseline or IntensityBaseline(), images, labels, support, queries, list(info.eval_classes),
                         n_part=n_part, class_names=info.class_names)


def build_parser() -> OptionParser:
    """The options of ``python -m evaluation.baseline`` (docs/cli.md)."""
    ap = OptionParser(prog="python -m evaluation.baseline",
                      description="EP1-ALP evaluation of the learning-free intensity baseline")
    ap.add_argument("--dataset", required=True, help="registry name (e.g. PHANTOM) or a description file")
    ap.add_argument("--data-dir", type=existing_dir, default=None,
                    help="processed data folder (default: the dataset's data_dir)")
    ap.add_argument("--fold", type=int_at_least(0), default=0)
    ap.add_argument("--n-part", type=int_at_least(1), default=3)
    ap.add_argument("--norm", choices=("auto", "zscore", "raw"), default="auto")
    ap.add_argument("--low-pct", type=float_between(0, 100), default=5.0)
    ap.add_argument("--high-pct", type=float_between(0, 100), default=95.0)
    ap.add_argument("--json", default=None, help="write the result JSON here")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: the Dice table of the baseline on one fold; a bad option exits with one ``error:``
    line and code 2 before any work."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        info = get_dataset_info(args.dataset)
    except DatasetDescriptionError as err:
        ap.error(str(err))
    if args.fold >= info.n_folds:
        ap.error(f"--fold {args.fold} is out of range: {info.name} has {info.n_folds} folds (0..{info.n_folds - 1})")
    if args.low_pct >= args.high_pct:
        ap.error(f"--low-pct {args.low_pct:g} must be below --high-pct {args.high_pct:g}")
    data_dir = Path(args.data_dir) if args.data_dir else info.data_dir
    result = run_baseline(info, data_dir, args.fold, args.n_part, args.norm,
                          IntensityBaseline(args.low_pct, args.high_pct))
    print(f"intensity baseline, EP1-ALP, {info.name} fold {args.fold}, support {result.support_ids}, "
          f"queries {result.query_ids}, n_part {args.n_part}, norm {args.norm}")
    print(dice_table(labelled_rows({"intensity baseline": result.to_json_dict()}), result.classes, info.class_names))
    if args.json:
        out = {"dataset": info.name, "fold": args.fold, "norm": args.norm, "model": "intensity_baseline",
               "low_pct": args.low_pct, "high_pct": args.high_pct, **result.to_json_dict()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
