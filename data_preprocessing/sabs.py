"""Synapse / SABS abdominal CT pipeline: raw NIfTI -> processed training folder (docs/method.md#sabs-ct).

Usage::

    python -m data_preprocessing.sabs --raw <folder with img/ and label/> --out data/SABS/sabs_CT_normalized
        [--steps normalize,resample,classmap,superpixels,verify] [--verify-only] [--parity]

Expected raw layout (the Synapse multi-organ "RawData/Training" folder)::

    img/img0001.nii.gz ...      CT volumes in HU, 512x512 in-plane
    label/label0001.nii.gz ...  labels 0..13 on the same grid (paired by the number in the name)

Steps (each can be run alone with ``--steps``; intermediate files live in ``--work``, default
``OUT/intermediate``):

1. ``normalize`` (the original's *intensity_normalization*): window to [-125, 275] HU and rescale to [0, 255]
   with the fixed formula ``(HU + 125) / 400 * 255`` (``--parity``: the volume's min/max after clipping,
   docs/method.md#q19-ct-rescaling);
   renumber the scans 0..N-1 in sorted order of the image file names (whatever scans are present) and write the
   mapping to ``OUT/scan_id_map.json``; labels are copied unchanged (values checked against 0..13).
2. ``resample`` (*resampling_and_roi*): cut 32 px from every in-plane border (512 -> 448), then resample in-plane
   so that the 448 px become exactly 256: new spacing = old spacing x 448 / 256 (= x 1.75), size 256, z
   unchanged. With ``--parity`` the size follows the original's rule ``int(448 * s / (1.75 s) + 1)`` = 257
   (docs/method.md#q1-sabs-257-grid).
3. ``classmap``, ``superpixels``, ``verify``.

Raw inputs are only read; a re-run writes the same files.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import SimpleITK as sitk
from tqdm import tqdm

from data_preprocessing.intensity import ct_to_uint8_range, map_label_values
from data_preprocessing.pipeline import FINAL_STEPS, parse_steps, pipeline_parser, remove_intermediate, run_final_steps
from data_preprocessing.resample import crop_border_xy, legacy_output_size, resample_image, resample_label
from data_preprocessing.scan_reader import check_same_grid
from dataloaders.dataset_info import DatasetInfo, get_dataset_info
from dataloaders.niftiio import (
    DataFormatError,
    Geometry,
    image_path,
    label_path,
    list_scan_ids,
    read_sitk,
    write_json,
    write_volume,
)
from util.errors import RawDataError
from util.options import OptionParser

DATASET = "SABS"
ROI_BORDER = 32  # px cut from every in-plane border (docs/method.md#sabs-ct, step 4)
OUT_SIZE = 256  # in-plane output size of the default grid
LEGACY_FACTOR = 1.75  # the original's spacing factor, (512 - 2 * 32) / 256
ID_MAP_NAME = "scan_id_map.json"
STEPS = ("normalize", "resample", *FINAL_STEPS)
_TRAILING_NUMBER = re.compile(r"(\d+)$")

Grid = Literal["exact", "legacy257"]


# -------------------------------------------------------------------- raw layout
def _number(path: Path) -> int | None:
    m = _TRAILING_NUMBER.search(path.name.split(".")[0])
    return int(m.group(1)) if m else None


def find_pairs(raw: str | Path) -> list[tuple[Path, Path]]:
    """Image/label pairs of the Synapse folder, in sorted order of the image file names.

    Images are ``raw/img/*.nii[.gz]``; each pairs with the ``raw/label`` file carrying the same trailing number
    (``img0001.nii.gz`` <-> ``label0001.nii.gz``).

    Raises:
        RawDataError: missing folders, no images, an image without its label or a label without its image.
    """
    raw = Path(raw)
    img_dir, lbl_dir = raw / "img", raw / "label"
    for d in (img_dir, lbl_dir):
        if not d.is_dir():
            raise RawDataError(f"{d}: folder not found (--raw must hold img/ and label/)")
    images = sorted(p for p in img_dir.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    labels = sorted(p for p in lbl_dir.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not images:
        raise RawDataError(f"{img_dir}: no .nii.gz images")
    by_number: dict[int, Path] = {}
    for p in labels:
        n = _number(p)
        if n is None:
            raise RawDataError(f"{p}: no scan number at the end of the file name")
        if n in by_number:
            raise RawDataError(f"{p} and {by_number[n]} carry the same scan number {n}")
        by_number[n] = p
    pairs, used = [], set()
    for img in images:
        n = _number(img)
        if n is None:
            raise RawDataError(f"{img}: no scan number at the end of the file name")
        if n not in by_number:
            raise RawDataError(f"{img}: no label file with number {n} in {lbl_dir}")
        if n in used:
            raise RawDataError(f"{img}: two images carry the scan number {n}")
        used.add(n)
        pairs.append((img, by_number[n]))
    extra = sorted(set(by_number) - used)
    if extra:
        raise RawDataError(f"{by_number[extra[0]]}: label without an image in {img_dir}")
    return pairs


# -------------------------------------------------------------------- per scan
def normalize_scan(img: sitk.Image, lbl: sitk.Image, info: DatasetInfo, rescale: Literal["fixed", "per_volume"],
                   where: str) -> tuple[sitk.Image, sitk.Image]:
    """Window and rescale the CT image to [0, 255]; check and copy the labels (docs/method.md#sabs-ct, steps 1-3).

    Args:
        img: CT image in HU; lbl: labels on the same grid (geometry already checked).
        rescale: ``"fixed"`` (default) or ``"per_volume"`` (docs/method.md#q19-ct-rescaling).
        where: file name for error messages.

    Returns:
        (float32 image in [0, 255], uint8 labels), same geometry as ``img``.
    """
    arr = ct_to_uint8_range(sitk.GetArrayFromImage(img), mode=rescale)
    try:
        lab = map_label_values(sitk.GetArrayFromImage(lbl), {i: i for i in info.labels}, what=where)
    except ValueError as err:
        raise RawDataError(str(err)) from None
    out_img, out_lbl = sitk.GetImageFromArray(arr), sitk.GetImageFromArray(lab)
    out_img.CopyInformation(img)
    out_lbl.CopyInformation(img)
    return out_img, out_lbl


def roi_grid(size: Sequence[int], spacing: Sequence[float], grid: Grid = "exact") -> tuple[tuple[float, ...],
                                                                                          tuple[int, ...]]:
    """Output spacing and size of the in-plane resampling of a cropped volume (z unchanged).

    ``"exact"``: spacing x (n / 256) per in-plane axis, size 256, so the n cropped pixels (448 for 512-wide
    scans, factor 1.75) map exactly onto 256. ``"legacy257"``: spacing x 1.75 and the original's size rule
    ``int(n * s / (1.75 s) + 1)``, 257 for n = 448 (docs/method.md#q1-sabs-257-grid).

    Args:
        size: cropped size (x, y, z); spacing: its spacing (x, y, z) in mm.
    """
    if grid == "exact":
        new_spacing = (spacing[0] * size[0] / OUT_SIZE, spacing[1] * size[1] / OUT_SIZE, spacing[2])
        return new_spacing, (OUT_SIZE, OUT_SIZE, int(size[2]))
    if grid == "legacy257":
        new_spacing = (spacing[0] * LEGACY_FACTOR, spacing[1] * LEGACY_FACTOR, spacing[2])
        legacy = legacy_output_size(size, spacing, new_spacing)
        return new_spacing, (legacy[0], legacy[1], int(size[2]))
    raise ValueError(f"unknown SABS grid {grid!r}; use 'exact' or 'legacy257'")


def roi_resample_scan(img: sitk.Image, lbl: sitk.Image, grid: Grid = "exact") -> tuple[sitk.Image, sitk.Image]:
    """Cut 32 px from every in-plane border and resample in-plane (docs/method.md#sabs-ct, steps 4-6).

    Returns:
        (float32 image, uint8 labels), arrays (Z, 256, 256) (``legacy257``: (Z, 257, 257)), same geometry.
    """
    img_c, lbl_c = crop_border_xy(img, ROI_BORDER), crop_border_xy(lbl, ROI_BORDER)
    new_spacing, size = roi_grid(img_c.GetSize(), img_c.GetSpacing(), grid)
    return resample_image(img_c, new_spacing, size), resample_label(lbl_c, new_spacing, size)


# -------------------------------------------------------------------- folder steps
def normalize_all(raw: str | Path, work: str | Path, out: str | Path, rescale: Literal["fixed", "per_volume"] = "fixed",
                  info: DatasetInfo | None = None, progress: bool = True) -> dict[int, dict[str, str]]:
    """Step ``normalize``: every raw pair -> ``work/image_<i>``/``label_<i>.nii.gz``, i = 0..N-1.

    Also writes ``out/scan_id_map.json``: ``{"<i>": {"image": "img0001.nii.gz", "label": "label0001.nii.gz"}}``.

    Returns:
        The mapping.
    """
    info = info or get_dataset_info(DATASET)
    pairs = find_pairs(raw)
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    mapping: dict[int, dict[str, str]] = {}
    for new_id, (ipath, lpath) in enumerate(tqdm(pairs, disable=not progress, unit="scan", desc="normalize SABS")):
        try:
            img, lbl = read_sitk(ipath), read_sitk(lpath)
        except DataFormatError as err:
            raise RawDataError(str(err)) from None
        if img.GetDimension() != 3:
            raise RawDataError(f"{ipath}: expected a 3D volume, got {img.GetDimension()}D")
        lbl = check_same_grid(img, lbl, ipath, lpath)
        if img.GetSize()[:2] != (512, 512):
            tqdm.write(f"note: {ipath.name} is {img.GetSize()[0]}x{img.GetSize()[1]} in-plane, not 512x512")
        out_img, out_lbl = normalize_scan(img, lbl, info, rescale, str(lpath))
        write_volume(sitk.GetArrayFromImage(out_img), image_path(work, new_id), reference=out_img)
        write_volume(sitk.GetArrayFromImage(out_lbl), label_path(work, new_id), reference=out_lbl)
        mapping[new_id] = {"image": ipath.name, "label": lpath.name}
        tqdm.write(f"{ipath.name} -> scan {new_id}: {image_path(work, new_id).name}, {label_path(work, new_id).name}")
    path = write_json({str(k): v for k, v in mapping.items()}, out / ID_MAP_NAME)
    print(f"wrote {path}")
    return mapping


def resample_all(work: str | Path, out: str | Path, grid: Grid = "exact", scan_ids: Sequence[int] | None = None,
                 progress: bool = True) -> list[int]:
    """Step ``resample``: ROI crop and in-plane resampling of ``work/*`` into ``out``.

    Returns:
        The processed scan ids.
    """
    work, out = Path(work), Path(out)
    ids = list_scan_ids(work) if scan_ids is None else sorted(scan_ids)
    out.mkdir(parents=True, exist_ok=True)
    for sid in tqdm(ids, disable=not progress, unit="scan", desc="resample SABS"):
        ipath, lpath = image_path(work, sid), label_path(work, sid)
        img, lbl = read_sitk(ipath), read_sitk(lpath)
        if img.GetSize() != lbl.GetSize() or Geometry.of(img).mismatch(Geometry.of(lbl)):
            raise DataFormatError(f"{lpath}: not on the grid of {ipath.name}")
        out_img, out_lbl = roi_resample_scan(sitk.Cast(img, sitk.sitkFloat32), sitk.Cast(lbl, sitk.sitkUInt8), grid)
        write_volume(sitk.GetArrayFromImage(out_img), image_path(out, sid), reference=out_img)
        write_volume(sitk.GetArrayFromImage(out_lbl), label_path(out, sid), reference=out_lbl)
        tqdm.write(f"scan {sid}: {sitk.GetArrayViewFromImage(out_img).shape}, spacing "
                   f"{tuple(round(s, 4) for s in out_img.GetSpacing())} -> {image_path(out, sid)}")
    return ids


# -------------------------------------------------------------------- CLI
def run(raw: str | Path | None, out: str | Path, steps: Sequence[str] = STEPS, work: str | Path | None = None,
        workers: int = 1, parity: bool = False, keep_intermediate: bool = False,
        report_path: str | Path | None = None, progress: bool = True, info: DatasetInfo | None = None) -> bool:
    """Run the chosen steps; returns whether the verification passed (True when ``verify`` is not run).

    Args:
        raw: folder holding ``img/`` and ``label/`` (needed by ``normalize``).
        out: processed folder.
        steps: subset of :data:`STEPS`.
        work: intermediate folder (default ``out/intermediate``).
        workers: processes for the superpixels.
        parity: per-volume rescaling, the 257x257 grid and the original's superpixel numbering
            (docs/method.md#quirks).
        keep_intermediate: keep ``work`` after a run doing both ``normalize`` and ``resample``.
    """
    info = info or get_dataset_info(DATASET)
    out = Path(out)
    work = Path(work) if work is not None else out / "intermediate"
    ids = None
    if "normalize" in steps:
        if raw is None:
            raise RawDataError("the normalize step needs the raw Synapse folder")
        ids = sorted(normalize_all(raw, work, out, "per_volume" if parity else "fixed", info, progress))
    if "resample" in steps:
        ids = resample_all(work, out, "legacy257" if parity else "exact", ids, progress)
        if "normalize" in steps and not keep_intermediate:
            remove_intermediate(work, [p(work, i).name for i in ids for p in (image_path, label_path)])
    hw = (OUT_SIZE + 1, OUT_SIZE + 1) if parity else (OUT_SIZE, OUT_SIZE)
    report = run_final_steps(out, info, steps, workers=workers, legacy_superpixels=parity, expect_hw=hw,
                             report_path=report_path, progress=progress)
    return report is None or report.ok


def build_parser() -> OptionParser:
    """The options of ``python -m data_preprocessing.sabs`` (docs/cli.md)."""
    return pipeline_parser("python -m data_preprocessing.sabs", __doc__.split("\n")[0], STEPS,
                           "the Synapse folder holding img/ and label/",
                           "the original's outputs: per-volume rescaling, the 257x257 grid and superpixel "
                           "numbering (docs/method.md#quirks)",
                           scans=False)  # no --scans: the scans are renumbered over the whole folder


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 1 when the verification fails, 2 on an input error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    steps = parse_steps(args, STEPS, parser)
    try:
        ok = run(args.raw, args.out, steps, work=args.work, workers=args.workers, parity=args.parity,
                 keep_intermediate=args.keep_intermediate, report_path=args.report, progress=not args.no_progress)
    except (RawDataError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
