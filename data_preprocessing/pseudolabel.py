"""Write superpixel pseudolabels for a processed dataset folder (SPEC 4); replaces the original's notebook.

For every ``image_<id>.nii.gz`` (un-normalised, as stored) it writes ``superpix-<SCALE>_<id>.nii.gz`` (int32 ids,
0 outside the body) and ``fgmask_<id>.nii.gz`` (uint8 body mask), both with the image geometry, atomically.
Slices are processed independently, in a process pool when ``workers > 1``; the output does not depend on the
worker count.

Usage::

    python -m data_preprocessing.pseudolabel --dataset CHAOST2 [--data-dir DIR] [--workers N] [--parity]
        [--scale MIDDLE] [--scans 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from data_preprocessing.superpixels import SCALE_MODES, scale_params, superpixel_slice
from dataloaders.dataset_info import DatasetDescriptionError, DatasetInfo, get_dataset_info
from dataloaders.niftiio import (
    DataFormatError,
    fgmask_path,
    image_path,
    list_scan_ids,
    read_volume,
    superpix_path,
    write_volume,
)


def _slice_job(slice2d: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Pool task: :func:`superpixel_slice` of one (H, W) slice with keyword ``params``."""
    return superpixel_slice(slice2d, **params)


def _n_slices(path: Path) -> int:
    """Number of slices (SimpleITK axis 0, i.e. the image's z size) from the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataFormatError(f"{path}: cannot be read as an image ({str(err).strip().splitlines()[-1]})") from None
    size = reader.GetSize()
    if len(size) != 3:
        raise DataFormatError(f"{path}: expected a 3D volume, got size {size}")
    return int(size[2])


def _select_scans(data_dir: Path, scan_ids: list[int] | None) -> list[int]:
    available = list_scan_ids(data_dir)
    if scan_ids is None:
        return available
    missing = [i for i in scan_ids if i not in available]
    if missing:
        raise DataFormatError(f"{image_path(data_dir, missing[0])}: file not found (requested scans {missing})")
    return sorted(set(scan_ids))


def generate_pseudolabels(data_dir: str | Path, info: DatasetInfo, workers: int = 1, legacy: bool = False,
                          scale: str = "MIDDLE", scan_ids: list[int] | None = None,
                          progress: bool = True) -> list[Path]:
    """Compute and write the superpixel pseudolabels and body masks of the scans in ``data_dir``.

    Args:
        data_dir: processed-data folder holding ``image_<id>.nii.gz``.
        info: dataset description; its ``body_threshold`` sets the body mask.
        workers: processes (1: in this process). The files are identical for any value.
        legacy: the original's superpixel numbering (Q2) instead of compact ids.
        scale: Felzenszwalb mode (only ``"MIDDLE"``).
        scan_ids: scans to process (default: every image in the folder).
        progress: show a tqdm bar over slices.

    Returns:
        The written paths: ``superpix`` then ``fgmask`` for each scan, in scan-id order.

    Raises:
        DataFormatError: missing folder, no images, a requested scan or a file that cannot be read.
        ValueError: unknown ``scale`` or ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    params = dict(scale_params(scale), threshold=info.body_threshold, legacy=legacy)
    data_dir = Path(data_dir)
    ids = _select_scans(data_dir, scan_ids)
    total = sum(_n_slices(image_path(data_dir, sid)) for sid in ids)

    start = time.perf_counter()
    written: list[Path] = []
    n_slices = n_superpixels = 0
    pool: Executor | None = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        with tqdm(total=total, disable=not progress, unit="slice", desc=f"superpixels {info.name}") as bar:
            for sid in ids:
                image, geom = read_volume(image_path(data_dir, sid))
                slices = list(image)
                if pool is None:
                    results = map(_slice_job, slices, repeat(params))
                else:
                    chunk = max(1, len(slices) // (4 * workers))
                    results = pool.map(_slice_job, slices, repeat(params), chunksize=chunk)
                superpix = np.zeros(image.shape, dtype=np.int32)
                fgmask = np.zeros(image.shape, dtype=np.uint8)
                for z, (ids2d, mask2d) in enumerate(results):
                    superpix[z], fgmask[z] = ids2d, mask2d
                    n_superpixels += np.count_nonzero(np.unique(ids2d))
                    bar.update(1)
                n_slices += image.shape[0]
                written.append(write_volume(superpix, superpix_path(data_dir, sid, scale), geometry=geom))
                written.append(write_volume(fgmask, fgmask_path(data_dir, sid), geometry=geom))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - start
    mean = n_superpixels / max(n_slices, 1)
    print(f"pseudolabels {info.name} ({scale}, {'legacy' if legacy else 'compact'} ids, {workers} workers): "
          f"{len(ids)} scans, {n_slices} slices, {mean:.1f} superpixels per slice, {seconds:.1f} s -> {data_dir}")
    return written


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scan ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--scans needs at least one id")
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a data or dataset error)."""
    parser = argparse.ArgumentParser(prog="python -m data_preprocessing.pseudolabel",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="registry name (e.g. CHAOST2) or description file path")
    parser.add_argument("--data-dir", type=Path, default=None, help="processed folder (default: the dataset's)")
    parser.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                        help="processes (default: all cores)")
    parser.add_argument("--parity", action="store_true", help="the original's superpixel numbering (Q2)")
    parser.add_argument("--scale", default="MIDDLE", choices=sorted(SCALE_MODES), help="Felzenszwalb mode")
    parser.add_argument("--scans", type=_id_list, default=None, help="comma-separated scan ids (default: all)")
    args = parser.parse_args(argv)
    try:
        info = get_dataset_info(args.dataset)
        data_dir = args.data_dir if args.data_dir is not None else info.data_dir
        generate_pseudolabels(data_dir, info, workers=args.workers, legacy=args.parity, scale=args.scale,
                              scan_ids=args.scans)
    except (DatasetDescriptionError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
