"""MS-CMRSeg 2019 bSSFP (C0) cardiac MRI pipeline: raw NIfTI -> processed training folder
(docs/method.md#ms-cmrseg-cardiac-mri).

The original has no cardiac pipeline. This one follows the CMR preprocessing published by the follow-up works
(Q-Net, ``shenqq377/Q-Net`` ``data/CMR/image_normalize.ipynb`` and ``class_slice_index_gen.ipynb``; ADNet states
it follows the original's procedure), which is the CHAOS recipe with another slice spacing:

- labels: raw 200 -> 1 LV_MYO, 500 -> 2 LV_BP, 600 -> 3 RV (Q-Net maps these at class-map time; here the
  processed label files hold 0..3 directly; any other value is an error);
- intensity: clip above the 99.5th percentile (no lower clip, no z-score);
- resampling: to (1.25, 1.25, 7.99) mm with the original's size rule, labels one value at a time;
- centre crop or pad in-plane to 256x256 (image padded with its minimum, labels with 0).

Project choices (not documented by the follow-ups): scan ids are the patient numbers of the file names; scans
are used in their stored NIfTI orientation (no reorientation); image and label must share a grid; images
without a manual label are skipped (listed); an anatomy check warns when the ring around the LV blood pool is
not mostly myocardium (a different label convention); see docs/datasets.md.

Usage::

    python -m data_preprocessing.cmr --raw <MS-CMRSeg folder> --out data/CMR/cmr_MR_normalized
        [--steps convert,normalize,classmap,superpixels,verify] [--verify-only] [--scans 1,2]

Expected raw files (anywhere below ``--raw``; names are matched case-insensitively)::

    patient<N>_C0.nii.gz           bSSFP volume
    patient<N>_C0_manual.nii.gz    its manual labels (0, 200, 500, 600)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from data_preprocessing import chaos
from data_preprocessing.intensity import map_label_values
from data_preprocessing.pipeline import (
    FINAL_STEPS,
    parse_scan_list,
    parse_steps,
    pipeline_parser,
    remove_intermediate,
    run_final_steps,
)
from data_preprocessing.scan_reader import check_same_grid
from dataloaders.dataset_info import DatasetInfo, get_dataset_info
from dataloaders.niftiio import DataFormatError, image_path, label_path, read_sitk, write_volume
from util.errors import RawDataError
from util.options import OptionParser

DATASET = "CMR"
RAW_TO_LABEL: dict[int, int] = {0: 0, 200: 1, 500: 2, 600: 3}  # LV_MYO, LV_BP, RV (dataset registry ids)
TARGET_SPACING: tuple[float, float, float] = (1.25, 1.25, 7.99)  # (x, y, z) mm, Q-Net's CMR notebook
OUT_HW: tuple[int, int] = (256, 256)
STEPS = ("convert", "normalize", *FINAL_STEPS)
_IMAGE = re.compile(r"^patient_?(\d+)_c0\.nii(\.gz)?$", re.IGNORECASE)
_LABEL = re.compile(r"^patient_?(\d+)_c0_manual\.nii(\.gz)?$", re.IGNORECASE)
MIN_RING_MYO = 0.5  # anatomy check: share of the ring around the LV blood pool that must be myocardium


def find_cases(raw: str | Path) -> tuple[dict[int, tuple[Path, Path]], list[int]]:
    """bSSFP image/label pairs below ``raw``.

    Returns:
        (patient number -> (image, label), in number order; patient numbers of images without a label).

    Raises:
        RawDataError: missing folder, no labelled case, a label without its image, or a file found twice.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise RawDataError(f"{raw}: raw MS-CMRSeg folder not found")
    images: dict[int, Path] = {}
    labels: dict[int, Path] = {}
    for path in sorted(raw.rglob("*")):
        for pattern, table in ((_IMAGE, images), (_LABEL, labels)):
            m = pattern.match(path.name)
            if m and path.is_file():
                n = int(m.group(1))
                if n in table:
                    raise RawDataError(f"{path}: patient {n} is also found at {table[n]}; keep one copy")
                table[n] = path
    orphan = sorted(set(labels) - set(images))
    if orphan:
        raise RawDataError(f"{labels[orphan[0]]}: label without its image patient{orphan[0]}_C0.nii.gz")
    if not labels:
        raise RawDataError(f"{raw}: no patient<N>_C0_manual.nii.gz label files below this folder")
    unlabelled = sorted(set(images) - set(labels))
    return {n: (images[n], labels[n]) for n in sorted(labels)}, unlabelled


def lv_ring_fraction(label: np.ndarray, width: int = 2) -> float | None:
    """Share of the ``width``-pixel ring around the LV blood pool (id 2) that is LV myocardium (id 1).

    An anatomy check of the label map: the myocardium encloses the blood pool, so the share is high (> 0.5)
    when 200 -> LV_MYO and 500 -> LV_BP are right, and low when the raw values mean something else.

    Args:
        label: (Z, H, W) mapped labels (0..3).

    Returns:
        The share over all slices, or ``None`` when there is no blood pool.
    """
    bp = label == 2
    if not bp.any():
        return None
    grown = ndimage.binary_dilation(bp, structure=ndimage.generate_binary_structure(2, 1)[None], iterations=width)
    ring = grown & ~bp
    return float(np.mean(label[ring] == 1)) if ring.any() else None


def convert_case(img_path: Path, lbl_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """Read one case, check the grids, map the label values (200/500/600 -> 1/2/3).

    Returns:
        (float32 image, uint8 labels) with the image's geometry.
    """
    try:
        img, lbl = read_sitk(img_path), read_sitk(lbl_path)
    except DataFormatError as err:
        raise RawDataError(str(err)) from None
    if img.GetDimension() != 3:
        raise RawDataError(f"{img_path}: expected a 3D volume, got {img.GetDimension()}D")
    lbl = check_same_grid(img, lbl, img_path, lbl_path)
    try:
        lab = map_label_values(sitk.GetArrayFromImage(lbl), RAW_TO_LABEL, what=str(lbl_path))
    except ValueError as err:
        raise RawDataError(str(err)) from None
    share = lv_ring_fraction(lab)
    if share is not None and share < MIN_RING_MYO:
        print(f"warning: {lbl_path.name}: only {100 * share:.0f}% of the ring around the LV blood pool (raw 500) is "
              f"myocardium (raw 200); check the label convention of this download")
    out_img = sitk.Cast(img, sitk.sitkFloat32)
    out_lbl = sitk.GetImageFromArray(lab)
    out_lbl.CopyInformation(img)
    return out_img, out_lbl


def convert_all(raw: str | Path, work: str | Path, scan_ids: Sequence[int] | None = None,
                progress: bool = True) -> list[int]:
    """Step ``convert``: every labelled case -> ``work/image_<N>``, ``work/label_<N>.nii.gz`` (original grid).

    Returns:
        The converted patient numbers.
    """
    cases, unlabelled = find_cases(raw)
    if unlabelled:
        print(f"skipping {len(unlabelled)} bSSFP images without a manual label: patients {unlabelled}")
    if scan_ids is not None:
        missing = sorted(set(scan_ids) - set(cases))
        if missing:
            raise RawDataError(f"{raw}: labelled patients {missing} not found (found {list(cases)})")
        cases = {n: c for n, c in cases.items() if n in set(scan_ids)}
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    for n, (ipath, lpath) in tqdm(cases.items(), disable=not progress, unit="scan", desc="convert CMR"):
        img, lbl = convert_case(ipath, lpath)
        write_volume(sitk.GetArrayFromImage(img), image_path(work, n), reference=img)
        write_volume(sitk.GetArrayFromImage(lbl), label_path(work, n), reference=lbl)
        tqdm.write(f"{ipath.name} -> scan {n}: size {img.GetSize()}, spacing "
                   f"{tuple(round(s, 3) for s in img.GetSpacing())}")
    return list(cases)


def normalize_all(work: str | Path, out: str | Path, scan_ids: Sequence[int] | None = None,
                  progress: bool = True) -> list[int]:
    """Step ``normalize``: clip above the 99.5th percentile, resample to (1.25, 1.25, 7.99) mm, centre crop or pad
    to 256x256 (:func:`data_preprocessing.chaos.normalize_scan`), from ``work`` into ``out``.

    Returns:
        The processed scan ids.
    """
    return chaos.normalize_all(work, out, scan_ids, spacing=TARGET_SPACING, out_hw=OUT_HW, progress=progress,
                               desc="normalize CMR")


def run(raw: str | Path | None, out: str | Path, steps: Sequence[str] = STEPS, work: str | Path | None = None,
        scan_ids: Sequence[int] | None = None, workers: int = 1, legacy_superpixels: bool = False,
        keep_intermediate: bool = False, report_path: str | Path | None = None, progress: bool = True,
        info: DatasetInfo | None = None) -> bool:
    """Run the chosen steps; returns whether the verification passed (True when ``verify`` is not run).

    Args:
        raw: MS-CMRSeg folder (needed by ``convert``).
        out: processed folder.
        steps: subset of :data:`STEPS`.
        work: intermediate folder (default ``out/intermediate``).
        scan_ids: patients to convert (default: every labelled one).
        workers: processes for the superpixels.
        legacy_superpixels: the original's superpixel numbering (docs/method.md#q2-superpixel-numbering).
        keep_intermediate: keep ``work`` after a run doing both ``convert`` and ``normalize``.
    """
    info = info or get_dataset_info(DATASET)
    out = Path(out)
    work = Path(work) if work is not None else out / "intermediate"
    ids = None
    if "convert" in steps:
        if raw is None:
            raise RawDataError("the convert step needs the raw MS-CMRSeg folder")
        ids = convert_all(raw, work, scan_ids, progress)
    if "normalize" in steps:
        ids = normalize_all(work, out, ids if ids is not None else scan_ids, progress=progress)
        if "convert" in steps and not keep_intermediate:
            remove_intermediate(work, [p(work, i).name for i in ids for p in (image_path, label_path)])
    report = run_final_steps(out, info, steps, workers=workers, legacy_superpixels=legacy_superpixels,
                             expect_hw=OUT_HW, expect_spacing=TARGET_SPACING, report_path=report_path,
                             progress=progress)
    return report is None or report.ok


def build_parser() -> OptionParser:
    """The options of ``python -m data_preprocessing.cmr`` (docs/cli.md)."""
    return pipeline_parser("python -m data_preprocessing.cmr", __doc__.split("\n")[0], STEPS,
                           "the MS-CMRSeg folder (searched recursively for patient<N>_C0[_manual].nii.gz)",
                           "the original's superpixel numbering (docs/method.md#q2-superpixel-numbering); "
                           "there is no original CMR pipeline")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 1 when the verification fails, 2 on an input error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    steps = parse_steps(args, STEPS, parser)
    try:
        ok = run(args.raw, args.out, steps, work=args.work, scan_ids=parse_scan_list(args.scans, parser),
                 workers=args.workers, legacy_superpixels=args.parity, keep_intermediate=args.keep_intermediate,
                 report_path=args.report, progress=not args.no_progress)
    except (RawDataError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
