"""CHAOS T2-SPIR pipeline: raw DICOM + PNG ground truth -> processed training folder
(docs/method.md#chaos-t2-mri).

Usage::

    python -m data_preprocessing.chaos --raw <CHAOS .../MR> --out data/CHAOST2/chaos_MR_T2_normalized
        [--steps convert,normalize,classmap,superpixels,verify] [--verify-only] [--parity] [--scans 1,2]

Expected raw layout (the CHAOS "MR" folder of the training set; ``--raw`` may also be its parent)::

    MR/<patient id>/T2SPIR/DICOM_anon/*.dcm     one DICOM file per slice, e.g. IMG-0004-00001.dcm
    MR/<patient id>/T2SPIR/Ground/*.png         one PNG per slice, grey 0/63/126/189/252

Steps (each can be run alone with ``--steps``; intermediate files live in ``--work``, default
``OUT/intermediate``, and are deleted after a full run unless ``--keep-intermediate``):

1. ``convert``: read the DICOM series with pydicom (no external converter), check that it is one acquisition
   (one SeriesInstanceUID, one orientation, pixel spacing and size) without missing slices, order the slices by
   ImagePositionPatient projected on the slice normal (never by file order or InstanceNumber), pair every PNG
   with its DICOM slice by the slice number in the file names, map grey values 63/126/189/252 to 1 liver,
   2 right kidney, 3 left kidney, 4 spleen (anything else is an error,
   docs/method.md#q24-chaos-grey-values), and write
   ``image_<pid>``/``label_<pid>.nii.gz`` on the DICOM grid. PNG row r / column c is DICOM pixel row r /
   column c of the same slice (the challenge exported the PNGs that way), so no flip is applied: image and
   label arrays are stacked identically and carry the geometry computed from the DICOM tags.
2. ``normalize``: clip above the 99.5th percentile, resample to (1.25, 1.25, 7.70) mm (linear; labels one value
   at a time), centre crop or pad to 256x256 (image padded with its minimum, labels with 0).
3. ``classmap``, ``superpixels``, ``verify``: ``classmap_1.json``, ``superpix-MIDDLE_<pid>``/``fgmask_<pid>``, and
   the verification table (see :mod:`data_preprocessing.verify`).

Output scan ids are the patient ids. Raw inputs are only read; a re-run writes the same files.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from tqdm import tqdm

from data_preprocessing.intensity import MR_CLIP_PERCENTILE, clip_upper_percentile, map_label_values
from data_preprocessing.pipeline import (
    FINAL_STEPS,
    parse_scan_list,
    parse_steps,
    pipeline_parser,
    remove_intermediate,
    run_final_steps,
)
from data_preprocessing.resample import crop_or_pad_xy, resample_image, resample_label
from data_preprocessing.scan_reader import DicomSeries, first_duplicate, read_dicom_series, slice_number
from dataloaders.dataset_info import DatasetInfo, get_dataset_info
from dataloaders.niftiio import (
    DataFormatError,
    Geometry,
    image_path,
    label_path,
    list_scan_ids,
    read_sitk,
    write_volume,
)
from util.errors import RawDataError
from util.options import OptionParser

DATASET = "CHAOST2"
# fixed map (docs/method.md#q24-chaos-grey-values): liver, RK, LK, spleen
GREY_TO_LABEL: dict[int, int] = {0: 0, 63: 1, 126: 2, 189: 3, 252: 4}
TARGET_SPACING: tuple[float, float, float] = (1.25, 1.25, 7.70)  # (x, y, z) mm, docs/method.md#chaos-t2-mri
OUT_HW: tuple[int, int] = (256, 256)  # in-plane output size (H, W)
SEQUENCE_DIR = "T2SPIR"
STEPS = ("convert", "normalize", *FINAL_STEPS)


# -------------------------------------------------------------------- raw layout
def find_patients(raw: str | Path) -> dict[int, Path]:
    """Patient folders ``<pid>/T2SPIR`` under the CHAOS ``MR`` folder (or under ``raw/MR``).

    Returns:
        patient id -> patient folder, in id order.

    Raises:
        RawDataError: the folder does not exist or holds no ``<integer>/T2SPIR`` folder.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise RawDataError(f"{raw}: raw CHAOS folder not found")
    root = raw / "MR" if (raw / "MR").is_dir() else raw
    found = {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / SEQUENCE_DIR).is_dir()}
    if not found:
        raise RawDataError(f"{root}: no patient folders <id>/{SEQUENCE_DIR} (pass the CHAOS 'MR' folder as --raw)")
    return dict(sorted(found.items()))


# -------------------------------------------------------------------- PNG ground truth
def read_png(path: Path, where: str) -> np.ndarray:
    """One grey-level PNG as a 2D integer array (RGB with equal channels is accepted)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("L")
            arr = np.asarray(img)
    except OSError as err:
        raise RawDataError(f"{where}: {path}: not a readable PNG ({err})") from None
    if arr.ndim == 3:
        channels = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if not all(np.array_equal(channels[..., 0], channels[..., k]) for k in range(channels.shape[-1])):
            raise RawDataError(f"{where}: {path.name}: a colour PNG ({mode}); expected grey-level ground truth")
        arr = channels[..., 0]
    return arr.astype(np.int64)


def pair_ground_truth(series: DicomSeries, png_files: Sequence[Path], where: str) -> list[Path]:
    """The PNG of every slice of ``series``, in the series' spatial order.

    Pairing rule: a PNG belongs to the DICOM slice whose file-name slice number equals its own (CHAOS names
    both ``IMG-<series>-<number>``). If instead the PNG numbers are exactly the DICOM numbers minus one (a
    zero-based naming such as ``liver_GT_000.png`` for ``IMG-...-00001.dcm``), that offset is used and reported.

    Raises:
        RawDataError: duplicate numbers, a PNG without its DICOM slice, or a DICOM slice without its PNG.
    """
    png_files = sorted(png_files)
    if not png_files:
        raise RawDataError(f"{where}: no ground-truth PNG files")
    png_numbers = [slice_number(p, where) for p in png_files]
    dup = first_duplicate(png_numbers, png_files)
    if dup:
        raise RawDataError(f"{where}: PNG files {dup[0].name} and {dup[1].name} carry the same slice number")
    by_number = dict(zip(png_numbers, png_files))
    dicom_numbers = set(series.numbers)
    offset = 0
    if set(by_number) != dicom_numbers and set(by_number) == {n - 1 for n in dicom_numbers}:
        offset = -1
        print(f"{where}: ground-truth PNGs are numbered from 0, DICOM files from 1: pairing PNG n with DICOM n+1")
    for n, path in by_number.items():
        if n - offset not in dicom_numbers:
            raise RawDataError(f"{where}: {path.name} has no DICOM slice with number {n - offset} "
                               f"({len(png_files)} PNGs, {len(series.files)} DICOM files)")
    for n, path in zip(series.numbers, series.files):
        if n + offset not in by_number:
            raise RawDataError(f"{where}: DICOM slice {path.name} has no ground-truth PNG with number {n + offset} "
                               f"({len(png_files)} PNGs, {len(series.files)} DICOM files)")
    return [by_number[n + offset] for n in series.numbers]


def read_ground_truth(series: DicomSeries, ground_dir: str | Path, where: str) -> np.ndarray:
    """Label volume (Z, H, W) uint8 on the series' slices: PNGs paired, stacked in spatial order, values mapped.

    Raises:
        RawDataError: pairing problems, a PNG whose size differs from its DICOM slice, or grey values other than
            0/63/126/189/252 (the message names the patient and the PNG).
    """
    ground_dir = Path(ground_dir)
    pngs = sorted(ground_dir.glob("*.png")) if ground_dir.is_dir() else []
    paired = pair_ground_truth(series, pngs, where)
    h, w = series.image.shape[1:]
    out = np.zeros(series.image.shape, dtype=np.uint8)
    for z, path in enumerate(paired):
        grey = read_png(path, where)
        if grey.shape != (h, w):
            raise RawDataError(f"{where}: {path.name} is {grey.shape[0]}x{grey.shape[1]} pixels, its DICOM slice "
                               f"{series.files[z].name} is {h}x{w}")
        try:
            out[z] = map_label_values(grey, GREY_TO_LABEL, what=f"{where}: {path.name}")
        except ValueError as err:
            raise RawDataError(str(err)) from None
    return out


# -------------------------------------------------------------------- per patient
def convert_patient(patient_dir: str | Path, pid: int) -> tuple[sitk.Image, sitk.Image]:
    """DICOM + PNG of one patient -> (image, label) SimpleITK images on the DICOM grid.

    Args:
        patient_dir: ``MR/<pid>`` folder holding ``T2SPIR/DICOM_anon`` and ``T2SPIR/Ground``.
        pid: patient id (for messages).

    Returns:
        float32 image and uint8 label with identical geometry; arrays are (Z, H, W) with Z in spatial order.
    """
    seq = Path(patient_dir) / SEQUENCE_DIR
    where = f"patient {pid}"
    series = read_dicom_series(seq / "DICOM_anon", where)
    label = read_ground_truth(series, seq / "Ground", where)
    img = series.geometry.apply(sitk.GetImageFromArray(series.image))
    lbl = series.geometry.apply(sitk.GetImageFromArray(label))
    return img, lbl


def normalize_scan(image: sitk.Image, label: sitk.Image, spacing: Sequence[float] = TARGET_SPACING,
                   out_hw: Sequence[int] = OUT_HW,
                   percentile: float = MR_CLIP_PERCENTILE) -> tuple[sitk.Image, sitk.Image]:
    """MR normalisation of one scan (docs/method.md#chaos-t2-mri steps 3-5; reused for CMR).

    Clip above the ``percentile``-th percentile, resample to ``spacing`` with the original's size rule (labels one
    value at a time), centre crop or pad in-plane to ``out_hw`` (image padded with its minimum, labels with 0).

    Args:
        image: float image; label: integer label image on the same grid.
        spacing: output spacing (x, y, z) in mm.
        out_hw: output in-plane size (H, W).

    Returns:
        (float32 image, uint8 label), arrays (Z', H_out, W_out), same geometry.
    """
    if image.GetSize() != label.GetSize():
        raise ValueError(f"image size {image.GetSize()} differs from label size {label.GetSize()}")
    clipped = sitk.GetImageFromArray(clip_upper_percentile(sitk.GetArrayFromImage(image), percentile))
    clipped.CopyInformation(image)
    res_img = resample_image(clipped, spacing)
    res_lbl = resample_label(label, spacing, size=res_img.GetSize())
    size_xy = (int(out_hw[1]), int(out_hw[0]))
    return crop_or_pad_xy(res_img, size_xy), crop_or_pad_xy(res_lbl, size_xy, pad_value=0)


def _geometry_checked(img_path: Path, lbl_path: Path) -> tuple[sitk.Image, sitk.Image]:
    img, lbl = read_sitk(img_path), read_sitk(lbl_path)
    if img.GetSize() != lbl.GetSize():
        raise DataFormatError(f"{lbl_path}: size {lbl.GetSize()} differs from {img_path.name} {img.GetSize()}")
    why = Geometry.of(img).mismatch(Geometry.of(lbl))
    if why:
        raise DataFormatError(f"{lbl_path}: geometry differs from {img_path.name}: {why}")
    return sitk.Cast(img, sitk.sitkFloat32), sitk.Cast(lbl, sitk.sitkUInt8)


# -------------------------------------------------------------------- folder steps
def convert_all(raw: str | Path, work: str | Path, scan_ids: Sequence[int] | None = None,
                progress: bool = True) -> list[int]:
    """Step ``convert``: every patient's DICOM + PNG -> ``work/image_<pid>``, ``work/label_<pid>.nii.gz``.

    Returns:
        The converted patient ids.
    """
    patients = find_patients(raw)
    if scan_ids is not None:
        missing = sorted(set(scan_ids) - set(patients))
        if missing:
            raise RawDataError(f"{raw}: patients {missing} not found (found {list(patients)})")
        patients = {p: d for p, d in patients.items() if p in set(scan_ids)}
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    for pid, folder in tqdm(patients.items(), disable=not progress, unit="patient", desc="convert CHAOS"):
        img, lbl = convert_patient(folder, pid)
        write_volume(sitk.GetArrayFromImage(img), image_path(work, pid), reference=img)
        write_volume(sitk.GetArrayFromImage(lbl), label_path(work, pid), reference=lbl)
        z, h, w = sitk.GetArrayViewFromImage(img).shape
        tqdm.write(f"patient {pid}: {z} slices {h}x{w}, spacing {tuple(round(s, 3) for s in img.GetSpacing())} "
                   f"-> {image_path(work, pid).name}, {label_path(work, pid).name}")
    return list(patients)


def normalize_all(work: str | Path, out: str | Path, scan_ids: Sequence[int] | None = None,
                  spacing: Sequence[float] = TARGET_SPACING, out_hw: Sequence[int] = OUT_HW,
                  progress: bool = True, desc: str = "normalize") -> list[int]:
    """Step ``normalize``: clip, resample and crop every ``work/image_<id>``/``label_<id>`` into ``out``.

    Returns:
        The processed scan ids.
    """
    work, out = Path(work), Path(out)
    ids = list_scan_ids(work) if scan_ids is None else sorted(scan_ids)
    out.mkdir(parents=True, exist_ok=True)
    for sid in tqdm(ids, disable=not progress, unit="scan", desc=desc):
        img, lbl = _geometry_checked(image_path(work, sid), label_path(work, sid))
        out_img, out_lbl = normalize_scan(img, lbl, spacing, out_hw)
        write_volume(sitk.GetArrayFromImage(out_img), image_path(out, sid), reference=out_img)
        write_volume(sitk.GetArrayFromImage(out_lbl), label_path(out, sid), reference=out_lbl)
        tqdm.write(f"scan {sid}: {sitk.GetArrayViewFromImage(out_img).shape} -> {image_path(out, sid)}")
    return ids


# -------------------------------------------------------------------- CLI
def run(raw: str | Path | None, out: str | Path, steps: Sequence[str] = STEPS, work: str | Path | None = None,
        scan_ids: Sequence[int] | None = None, workers: int = 1, parity: bool = False,
        keep_intermediate: bool = False, report_path: str | Path | None = None, progress: bool = True,
        info: DatasetInfo | None = None) -> bool:
    """Run the chosen steps; returns whether the verification passed (True when ``verify`` is not run).

    Args:
        raw: CHAOS ``MR`` folder (needed by ``convert``).
        out: processed folder.
        steps: subset of :data:`STEPS`.
        work: intermediate folder (default ``out/intermediate``).
        scan_ids: patients to convert (default: all found).
        workers: processes for the superpixels.
        parity: the original's superpixel numbering (docs/method.md#q2-superpixel-numbering).
        keep_intermediate: keep ``work`` after a full run.
    """
    info = info or get_dataset_info(DATASET)
    out = Path(out)
    work = Path(work) if work is not None else out / "intermediate"
    ids = None
    if "convert" in steps:
        if raw is None:
            raise RawDataError("the convert step needs the raw CHAOS folder")
        ids = convert_all(raw, work, scan_ids, progress)
    if "normalize" in steps:
        ids = normalize_all(work, out, ids if ids is not None else scan_ids, progress=progress,
                            desc="normalize CHAOS")
        if "convert" in steps and not keep_intermediate:
            remove_intermediate(work, [p(work, i).name for i in ids for p in (image_path, label_path)])
    report = run_final_steps(out, info, steps, workers=workers, legacy_superpixels=parity, expect_hw=OUT_HW,
                             expect_spacing=TARGET_SPACING, report_path=report_path, progress=progress)
    return report is None or report.ok


def build_parser() -> OptionParser:
    """The options of ``python -m data_preprocessing.chaos`` (docs/cli.md)."""
    return pipeline_parser("python -m data_preprocessing.chaos", __doc__.split("\n")[0], STEPS,
                           "the CHAOS 'MR' folder (holding <patient id>/T2SPIR/{DICOM_anon,Ground})",
                           "the original's superpixel numbering (docs/method.md#q2-superpixel-numbering)")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 1 when the verification fails, 2 on an input error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    steps = parse_steps(args, STEPS, parser)
    try:
        ok = run(args.raw, args.out, steps, work=args.work, scan_ids=parse_scan_list(args.scans, parser),
                 workers=args.workers, parity=args.parity, keep_intermediate=args.keep_intermediate,
                 report_path=args.report, progress=not args.no_progress)
    except (RawDataError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
