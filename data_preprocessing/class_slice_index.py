"""Class-slice index ``classmap_<min_fg>.json`` (docs/method.md#class-slice-index).

Layout: ``{"<CLASS_NAME>": {"<scan_id>": [z0, z1, ...], ...}, ...}`` for every class name of the dataset,
background included; each list holds the sorted slice indices along SimpleITK axis 0 where the class has at
least ``min_fg`` pixels. It drives setting-2 exclusion, support-slice choice and the evaluation z-range.

Usage::

    python -m data_preprocessing.class_slice_index --dataset CHAOST2 [--data-dir DIR] [--min-fg 1]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataloaders.dataset_info import DatasetDescriptionError, DatasetInfo, get_dataset_info
from dataloaders.niftiio import (
    DataFormatError,
    classmap_path,
    label_path,
    list_scan_ids,
    read_label_volume,
    write_json,
)
from dataloaders.slice_counts import slice_counts
from util.options import OptionParser, positive_int


def build_classmap(labels: dict[int, np.ndarray], label_names: dict[int, str],
                   min_fg: int = 1) -> dict[str, dict[str, list[int]]]:
    """Class-slice index of labelled volumes.

    Args:
        labels: scan id -> (Z, H, W) integer label volume.
        label_names: label id -> class name, background included.
        min_fg: minimum pixel count for a slice to hold a class (>= 1).

    Returns:
        ``{CLASS_NAME: {"<scan_id>": sorted slice indices}}``, classes in id order, scans in numeric order.

    Raises:
        ValueError: ``min_fg < 1``, or a volume holds a label id missing from ``label_names`` (names the scan).
    """
    if min_fg < 1:
        raise ValueError(f"min_fg must be >= 1, got {min_fg}")
    class_ids = sorted(label_names)
    n_classes = max(class_ids) + 1
    cmap: dict[str, dict[str, list[int]]] = {label_names[c]: {} for c in class_ids}
    for sid in sorted(labels):
        lab = np.asarray(labels[sid])
        if lab.dtype.kind not in "iu":
            raise ValueError(f"scan {sid}: labels must be integers, got dtype {lab.dtype}")
        present = np.unique(lab)
        unknown = [int(v) for v in present if int(v) not in label_names]
        if unknown:
            raise ValueError(f"scan {sid}: label ids {unknown} are not in the label map {class_ids}")
        counts = slice_counts(lab, n_classes)
        for c in class_ids:
            cmap[label_names[c]][str(sid)] = np.flatnonzero(counts[:, c] >= min_fg).tolist()
    return cmap


def write_classmap(data_dir: str | Path, info: DatasetInfo, min_fg: int = 1, scan_ids: list[int] | None = None,
                   progress: bool = True) -> Path:
    """Build ``classmap_<min_fg>.json`` from the label files of ``data_dir`` and write it atomically.

    Args:
        data_dir: processed-data folder.
        info: dataset description (label ids and names).
        min_fg: minimum pixel count per slice.
        scan_ids: scans to index (default: every ``image_<id>.nii.gz`` in the folder).
        progress: show a tqdm bar over scans.

    Returns:
        The written path.

    Raises:
        DataFormatError: missing folder or label file, unreadable file, or label ids outside ``info.labels``
            (the message names the file).
    """
    data_dir = Path(data_dir)
    ids = list_scan_ids(data_dir) if scan_ids is None else sorted(set(scan_ids))
    labels: dict[int, np.ndarray] = {}
    for sid in tqdm(ids, disable=not progress, unit="scan", desc=f"class map {info.name}"):
        path = label_path(data_dir, sid)
        lab, _ = read_label_volume(path)
        unknown = sorted(set(np.unique(lab).tolist()) - set(info.labels))
        if unknown:
            raise DataFormatError(
                f"{path}: label ids {unknown} are not in the {info.name} label map {sorted(info.labels)}")
        labels[sid] = lab
    cmap = build_classmap(labels, info.labels, min_fg=min_fg)
    return write_json(cmap, classmap_path(data_dir, min_fg))


def summarize(cmap: dict[str, dict[str, list[int]]]) -> list[str]:
    """One line per class: slices holding it and scans where it appears."""
    lines = []
    for name, per_scan in cmap.items():
        n_with = sum(1 for zs in per_scan.values() if zs)
        n_slices = sum(len(zs) for zs in per_scan.values())
        lines.append(f"{name}: {n_slices} slices in {n_with}/{len(per_scan)} scans")
    return lines


def build_parser() -> OptionParser:
    """The options of ``python -m data_preprocessing.class_slice_index`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m data_preprocessing.class_slice_index", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="registry name (e.g. SABS) or description file path")
    parser.add_argument("--data-dir", type=Path, default=None, help="processed folder (default: the dataset's)")
    parser.add_argument("--min-fg", type=positive_int, default=1, help="minimum class pixels per slice")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a data or dataset error)."""
    args = build_parser().parse_args(argv)
    try:
        info = get_dataset_info(args.dataset)
        data_dir = args.data_dir if args.data_dir is not None else info.data_dir
        path = write_classmap(data_dir, info, min_fg=args.min_fg)
    except (DatasetDescriptionError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cmap = json.loads(path.read_text())
    print(f"wrote {path} (min_fg={args.min_fg})")
    for line in summarize(cmap):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
