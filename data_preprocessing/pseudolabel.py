"""Write superpixel pseudolabels for a processed dataset folder (docs/method.md#pseudolabels); replaces the
original's notebook.

For every ``image_<id>.nii.gz`` (un-normalised, as stored) it writes ``superpix-<SCALE>_<id>.nii.gz`` (int32 ids,
0 outside the body) and ``fgmask_<id>.nii.gz`` (uint8 body mask), both with the image geometry, atomically.
Slices are processed independently, in a process pool when ``workers > 1``; the output does not depend on the
worker count. Parallel runs give each worker whole scans when there are enough of them (at least two per worker,
largest first); the worker reads the image, computes it and writes both files itself, so no array crosses a
process boundary. With fewer scans, scans are split into blocks of consecutive slices; a block's ids and masks
go back to the main process, which writes the scan once all its blocks are in.

With ``--dim 3`` it writes ``supervox-<SCALE>_<id>.nii.gz`` instead: 3D supervoxels over the whole volume inside
the body mask (:mod:`data_preprocessing.supervoxels`; mean size ``--n-sv`` voxels, default the dataset's ``n_sv``),
one scan per task, so the files are again identical for any worker count (docs/supervoxels.md).

Usage::

    python -m data_preprocessing.pseudolabel --dataset CHAOST2 [--data-dir DIR] [--workers N] [--parity]
        [--scale MIDDLE] [--scans 1,2,3]
    python -m data_preprocessing.pseudolabel --dataset CHAOST2 --dim 3 [--n-sv 5000] [--compactness 0.1] ...
    python -m data_preprocessing.pseudolabel --dataset CHAOST2 --preview DIR [--dim 3] [--scans 1,2]

``--preview DIR`` generates nothing: it draws the existing pseudolabels over a few slices of a few scans, with
their size statistics (:mod:`data_preprocessing.pseudolabel_preview`).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_preprocessing.pseudolabel_preview import summary_lines, write_preview
from data_preprocessing.superpixels import SCALE_MODES, scale_params, superpixel_slice
from data_preprocessing.supervoxels import DEFAULT_COMPACTNESS, supervoxel_volume
from dataloaders.dataset_info import DatasetDescriptionError, DatasetInfo, get_dataset_info
from dataloaders.derived import image_fingerprint, source_note
from dataloaders.niftiio import (
    DataFormatError,
    Geometry,
    fgmask_path,
    image_path,
    list_scan_ids,
    read_header,
    read_volume,
    superpix_path,
    supervox_path,
    write_volume,
)
from util.options import OptionParser, positive_float, positive_int

_BLOCKS_PER_WORKER = 2  # parallel runs: at least this many tasks per worker, so the last ones finish together
_WORKER_IMAGE: dict[str, tuple[np.ndarray, Geometry, str]] = {}  # per worker process: the last image read


def _superpixel_block(image: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Superpixel ids (int32) and body masks (uint8) of the (n, H, W) slices, and the number of superpixels."""
    ids = np.zeros(image.shape, dtype=np.int32)
    mask = np.zeros(image.shape, dtype=np.uint8)
    count = 0
    for k, slice2d in enumerate(image):
        ids[k], mask[k] = superpixel_slice(slice2d, **params)
        count += len(np.unique(ids[k])) - int(ids[k].min() == 0)
    return ids, mask, count


def _block_job(path: str, z0: int, z1: int, params: dict[str, Any], outputs: tuple[str, str] | None = None
               ) -> tuple[np.ndarray | None, np.ndarray | None, int, Geometry, str]:
    """Pool task: read the image at ``path`` (kept for the next block of the same scan) and do slices z0..z1-1.

    With ``outputs`` (superpix path, fgmask path; whole scans only) the task writes the files itself and returns
    no arrays. The last item is the source header note (the image's fingerprint, ``dataloaders.derived``).
    """
    if outputs is not None:
        image, geom = read_volume(path)
        note = source_note(image_fingerprint(image, geom))
        ids, mask, count = _superpixel_block(image, params)
        write_volume(ids, outputs[0], geometry=geom, notes=note)
        write_volume(mask, outputs[1], geometry=geom, notes=note)
        return None, None, count, geom, note
    if path not in _WORKER_IMAGE:
        _WORKER_IMAGE.clear()
        image, geom = read_volume(path)
        _WORKER_IMAGE[path] = (image, geom, source_note(image_fingerprint(image, geom)))
    image, geom, note = _WORKER_IMAGE[path]
    return (*_superpixel_block(image[z0:z1], params), geom, note)


def plan_blocks(n_slices: dict[int, int], workers: int) -> list[tuple[int, int, int]]:
    """Split scans into blocks of consecutive slices for ``workers`` processes, largest blocks first.

    Each scan is cut into ``ceil(2 * workers / n_scans)`` near-equal blocks (at most one per slice), so that there
    are at least two tasks per worker (whole scans when there are enough scans); submitting the largest first
    keeps the workers' finishing times close.

    Args:
        n_slices: scan id -> number of slices.
        workers: number of processes.

    Returns:
        ``(scan_id, z_start, z_stop)`` blocks covering every slice once.
    """
    per_scan = max(1, math.ceil(_BLOCKS_PER_WORKER * workers / max(len(n_slices), 1)))
    blocks = []
    for sid, n in n_slices.items():
        k = min(per_scan, n)
        bounds = [round(i * n / k) for i in range(k + 1)]
        blocks += [(sid, bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]
    return sorted(blocks, key=lambda b: (b[1] - b[2], b[0], b[1]))


def _pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` where available (workers start in milliseconds, modules already imported), else the default."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _n_slices(path: Path) -> int:
    """Number of slices (SimpleITK axis 0, i.e. the image's z size) from the header only."""
    reader = read_header(path)
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
        legacy: the original's superpixel numbering (docs/method.md#q2-superpixel-numbering) instead of compact ids.
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
    sizes = {sid: _n_slices(image_path(data_dir, sid)) for sid in ids}
    total = sum(sizes.values())

    start = time.perf_counter()
    outputs: dict[int, tuple[Path, Path]] = {}
    n_slices = n_superpixels = 0

    def write(sid: int, superpix: np.ndarray, mask: np.ndarray, geom: Geometry, note: str) -> None:
        # the header records the source image's fingerprint: readers refuse the files once the image changes
        outputs[sid] = (write_volume(superpix, superpix_path(data_dir, sid, scale), geometry=geom, notes=note),
                        write_volume(mask, fgmask_path(data_dir, sid), geometry=geom, notes=note))

    if workers == 1:
        with tqdm(total=total, disable=not progress, unit="slice", desc=f"superpixels {info.name}") as bar:
            for sid in ids:
                image, geom = read_volume(image_path(data_dir, sid))
                sp, mask, count = _superpixel_block(image, params)
                write(sid, sp, mask, geom, source_note(image_fingerprint(image, geom)))
                n_slices, n_superpixels = n_slices + image.shape[0], n_superpixels + count
                bar.update(image.shape[0])
    else:
        blocks = plan_blocks(sizes, workers)
        left = {sid: sum(1 for b in blocks if b[0] == sid) for sid in ids}
        partial: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())  # before tqdm's thread
        try:
            jobs: dict[Future, tuple[int, int, int]] = {}
            for sid, z0, z1 in blocks:
                whole = (str(superpix_path(data_dir, sid, scale)), str(fgmask_path(data_dir, sid))) \
                    if left[sid] == 1 else None
                jobs[pool.submit(_block_job, str(image_path(data_dir, sid)), z0, z1, params, whole)] = (sid, z0, z1)
            with tqdm(total=total, disable=not progress, unit="slice", desc=f"superpixels {info.name}") as bar:
                for job in as_completed(jobs):
                    sid, z0, z1 = jobs[job]
                    sp_block, mask_block, count, geom, note = job.result()
                    if sp_block is None:  # a whole scan, written by the worker
                        outputs[sid] = (superpix_path(data_dir, sid, scale), fgmask_path(data_dir, sid))
                        n_slices, n_superpixels = n_slices + (z1 - z0), n_superpixels + count
                        bar.update(z1 - z0)
                        continue
                    if sid not in partial:
                        shape = (sizes[sid], *sp_block.shape[1:])
                        partial[sid] = (np.zeros(shape, np.int32), np.zeros(shape, np.uint8))
                    partial[sid][0][z0:z1], partial[sid][1][z0:z1] = sp_block, mask_block
                    n_slices, n_superpixels = n_slices + (z1 - z0), n_superpixels + count
                    bar.update(z1 - z0)
                    left[sid] -= 1
                    if left[sid] == 0:
                        write(sid, *partial.pop(sid), geom, note)
        finally:
            pool.shutdown(cancel_futures=True)
    written = [p for sid in ids for p in outputs[sid]]
    seconds = time.perf_counter() - start
    mean = n_superpixels / max(n_slices, 1)
    print(f"pseudolabels {info.name} ({scale}, {'legacy' if legacy else 'compact'} ids, {workers} workers): "
          f"{len(ids)} scans, {n_slices} slices, {mean:.1f} superpixels per slice, {seconds:.1f} s -> {data_dir}")
    return written


def _supervoxel_job(image_file: str, out_file: str, threshold: float, n_sv: int,
                    compactness: float) -> tuple[int, int, int]:
    """Pool task: read one image, compute its 3D supervoxels, write them with the image geometry and fingerprint.

    Returns:
        ``(number of supervoxels, number of slices, body voxels)``.
    """
    image, geom = read_volume(image_file)
    note = source_note(image_fingerprint(image, geom))
    spacing_zyx = tuple(geom.spacing)[::-1]  # SimpleITK (x, y, z) -> array axes (z, y, x)
    ids, _ = supervoxel_volume(image, spacing_zyx, threshold, n_sv=n_sv, compactness=compactness)
    write_volume(ids, out_file, geometry=geom, notes=note)
    return int(ids.max()), int(image.shape[0]), int(np.count_nonzero(ids))


def generate_supervoxels(data_dir: str | Path, info: DatasetInfo, workers: int = 1, n_sv: int | None = None,
                         compactness: float = DEFAULT_COMPACTNESS, scale: str = "MIDDLE",
                         scan_ids: list[int] | None = None, progress: bool = True) -> list[Path]:
    """Compute and write the 3D supervoxels ``supervox-<scale>_<id>.nii.gz`` of the scans in ``data_dir``.

    Each scan is one task (the over-segmentation is of the whole volume); tasks run largest first in a process
    pool when ``workers > 1``. Every scan's result depends only on its image, so the files are identical for any
    ``workers``.

    Args:
        data_dir: processed-data folder holding ``image_<id>.nii.gz``.
        info: dataset description; ``body_threshold`` sets the body mask and ``n_sv`` the default size.
        workers: processes (1: in this process).
        n_sv: mean supervoxel size in voxels (default ``info.n_sv``: 5000 abdomen, 1000 cardiac).
        compactness: SLIC compactness (:data:`data_preprocessing.supervoxels.DEFAULT_COMPACTNESS`).
        scale: file tag (only ``"MIDDLE"``, as for the 2D files).
        scan_ids: scans to process (default: every image in the folder).
        progress: show a tqdm bar over scans.

    Returns:
        The written supervoxel paths, in scan-id order.

    Raises:
        DataFormatError: missing folder, no images, a requested scan or a file that cannot be read.
        ValueError: ``workers < 1``, ``n_sv < 1``, ``compactness <= 0`` or an unknown ``scale``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n_sv = info.n_sv if n_sv is None else int(n_sv)
    if n_sv < 1 or compactness <= 0:
        raise ValueError(f"n_sv must be >= 1 and compactness > 0, got {n_sv} and {compactness}")
    scale_params(scale)  # the same tags as the 2D files
    data_dir = Path(data_dir)
    ids = _select_scans(data_dir, scan_ids)
    order = sorted(ids, key=lambda sid: (-_n_slices(image_path(data_dir, sid)), sid))  # largest first
    jobs = {sid: (str(image_path(data_dir, sid)), str(supervox_path(data_dir, sid, scale)), info.body_threshold,
                  n_sv, float(compactness)) for sid in order}
    start = time.perf_counter()
    stats: dict[int, tuple[int, int, int]] = {}
    with tqdm(total=len(ids), disable=not progress, unit="scan", desc=f"supervoxels {info.name}") as bar:
        if workers == 1:
            for sid in order:
                stats[sid] = _supervoxel_job(*jobs[sid])
                bar.update(1)
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(ids)), mp_context=_pool_context())
            try:
                futures = {pool.submit(_supervoxel_job, *jobs[sid]): sid for sid in order}
                for job in as_completed(futures):
                    stats[futures[job]] = job.result()
                    bar.update(1)
            finally:
                pool.shutdown(cancel_futures=True)
    n_total = sum(v[0] for v in stats.values())
    body = sum(v[2] for v in stats.values())
    print(f"supervoxels {info.name} ({scale}, n_sv {n_sv}, compactness {compactness:g}, {workers} workers): "
          f"{len(ids)} scans, {n_total / max(len(ids), 1):.1f} supervoxels per scan, "
          f"{body / max(n_total, 1):.0f} voxels each on average, {time.perf_counter() - start:.1f} s -> {data_dir}")
    return [supervox_path(data_dir, sid, scale) for sid in ids]


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scan ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--scans needs at least one id")
    return ids


def build_parser() -> OptionParser:
    """The options of ``python -m data_preprocessing.pseudolabel`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m data_preprocessing.pseudolabel", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="registry name (e.g. CHAOST2) or description file path")
    parser.add_argument("--data-dir", type=Path, default=None, help="processed folder (default: the dataset's)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes (default: all cores)")
    parser.add_argument("--parity", action="store_true",
                        help="the original's superpixel numbering (docs/method.md#q2-superpixel-numbering)")
    parser.add_argument("--scale", default="MIDDLE", choices=sorted(SCALE_MODES), help="Felzenszwalb mode")
    parser.add_argument("--scans", type=_id_list, default=None, help="comma-separated scan ids (default: all)")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2,
                        help="2: per-slice superpixels (the original); 3: supervoxels of the whole volume")
    parser.add_argument("--n-sv", type=positive_int, default=None,
                        help="--dim 3: mean supervoxel size in voxels (default: the dataset's n_sv)")
    parser.add_argument("--compactness", type=positive_float, default=None,
                        help=f"--dim 3: SLIC compactness (default {DEFAULT_COMPACTNESS})")
    parser.add_argument("--preview", type=Path, default=None, metavar="DIR",
                        help="generate nothing: write PNGs of the existing pseudolabels (--dim 2 or 3) over 3 slices "
                             "of each of --scans (default: the first 3 scans) and their size statistics to DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a data or dataset error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dim == 2 and (args.n_sv is not None or args.compactness is not None):
        parser.error("--n-sv and --compactness apply to --dim 3 only")
    if args.dim == 3 and args.parity:
        parser.error("--parity (the original's 2D superpixel numbering) does not apply to --dim 3")
    if args.preview is not None and (args.parity or args.n_sv is not None or args.compactness is not None):
        parser.error("--preview reads the existing pseudolabels: --parity, --n-sv and --compactness do not apply")
    try:
        info = get_dataset_info(args.dataset)
        data_dir = args.data_dir if args.data_dir is not None else info.data_dir
        if args.preview is not None:
            report = write_preview(data_dir, args.preview, args.dataset, dim=args.dim, scale=args.scale,
                                   scan_ids=args.scans)
            print("\n".join(summary_lines(report)) + f"\nwritten: {args.preview}/ (PNGs, preview.json)")
        elif args.dim == 3:
            generate_supervoxels(data_dir, info, workers=args.workers, n_sv=args.n_sv,
                                 compactness=DEFAULT_COMPACTNESS if args.compactness is None else args.compactness,
                                 scale=args.scale, scan_ids=args.scans)
        else:
            generate_pseudolabels(data_dir, info, workers=args.workers, legacy=args.parity, scale=args.scale,
                                  scan_ids=args.scans)
    except (DatasetDescriptionError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
