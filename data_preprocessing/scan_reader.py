"""Reading a scan in any format: NIfTI, NRRD, MetaImage files and DICOM series folders, with their physical
geometry, checked before use (a user's scan, a benchmark's raw scan).

Public interface::

    read_scan(path) -> (sitk.Image, name)          NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MHA/MHD, or a folder
                                                   holding one DICOM series; float32, finite values checked
    read_label(path) -> sitk.Image                 an integer label file (float storage with integer values accepted)
    read_dicom_series(folder) -> DicomSeries       one DICOM series in spatial order (pydicom; no converter)
    list_scans(paths) -> [Path]                    folders expanded, numeric-aware order
    scan_name(path) -> str                         file stem without .nii.gz/.nii/.nrrd/.nhdr/.mha/.mhd, or folder name
    read_grid(path) -> Grid | None                 a file's grid from its header; grid_problem(img, lbl) compares two
    check_same_grid(img, lbl, img_path, lbl_path) -> lbl carrying img's geometry (or RawDataError naming both)

Errors: a problem with a file raises :class:`util.errors.RawDataError` (or :class:`dataloaders.niftiio.DataFormatError`
for a truncated or unreadable file), the message naming the file or folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from data_preprocessing.geometry import Grid
from dataloaders.niftiio import DataFormatError, Geometry, grid_difference, read_header, read_sitk
from util.errors import RawDataError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
COMPANION_SUFFIXES = (".raw", ".zraw", ".raw.gz", ".img", ".img.gz")  # data files of .mhd/.nhdr headers
_DIGITS = re.compile(r"(\d+)")
_POSITION_RTOL = 0.01  # allowed relative deviation of a DICOM slice gap from the median gap
_NUMBER = re.compile(r"(\d+)$")


# -------------------------------------------------------------------- names and discovery
def scan_name(path: str | Path) -> str:
    """Name of a scan: the file name without its image suffix (``.nii.gz`` etc.), or the folder name."""
    path = Path(path)
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def natural_key(text: str) -> list[Any]:
    """Sort key with numbers compared as numbers: ``scan2`` < ``scan10``."""
    return [int(t) if t.isdigit() else t.lower() for t in _DIGITS.split(text)]


def is_image_file(path: Path) -> bool:
    """A file with one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def list_scans(paths: Sequence[str | Path]) -> list[Path]:
    """Expand the scan arguments of a command line into one path per scan.

    - an image file is a scan;
    - a folder holding image files: each image file is a scan (``.raw``/``.zraw`` companions of ``.mhd`` headers
      are skipped; any other file there is an error);
    - a folder holding other files only: one DICOM series, one scan;
    - a folder holding only sub-folders: each sub-folder is a DICOM series, one scan each.

    Each argument's scans are sorted numeric-aware (``scan2`` before ``scan10``); arguments keep their order.

    Raises:
        RawDataError: a path that does not exist, an empty folder, a folder mixing image files with other files,
            or a scan listed twice.
    """
    out: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if path.is_file():
            if path.name.lower().endswith(COMPANION_SUFFIXES):
                raise RawDataError(f"{path}: a raw data file; pass its header (.mhd/.nhdr) instead")
            out.append(path)
            continue
        if not path.is_dir():
            raise RawDataError(f"{path}: no such file or folder")
        entries = _visible(path)
        files = [p for p in entries if p.is_file()]
        images = [p for p in files if is_image_file(p)]
        if images:
            others = [p for p in files if p not in images and not p.name.lower().endswith(COMPANION_SUFFIXES)]
            if others:
                raise RawDataError(f"{path}: holds image files and other files (such as {others[0].name}); keep "
                                   f"a DICOM series in a folder of its own")
            out += sorted(images, key=lambda p: natural_key(p.name))
        elif files:
            out.append(path)  # one DICOM series
        else:
            subdirs = sorted((p for p in entries if p.is_dir()), key=lambda p: natural_key(p.name))
            if not subdirs:
                raise RawDataError(f"{path}: empty folder, no scan in it")
            for sub in subdirs:
                if not any(p.is_file() for p in _visible(sub)):
                    raise RawDataError(f"{sub}: holds no file; expected a DICOM series (one file per slice)")
            out += subdirs
    seen: set[Path] = set()
    for p in out:
        key = p.resolve()
        if key in seen:
            raise RawDataError(f"{p}: listed twice")
        seen.add(key)
    return out


# -------------------------------------------------------------------- reading
def _check_volume(img: sitk.Image, path: Path) -> None:
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise RawDataError(f"{path}: expected a 3D single-channel volume, got a {img.GetDimension()}D image with "
                           f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    if min(img.GetSize()) < 1:
        raise RawDataError(f"{path}: empty volume of size {img.GetSize()}")


def read_scan(path: str | Path) -> tuple[sitk.Image, str]:
    """Read one scan as a float32 SimpleITK image with its physical geometry.

    Args:
        path: a NIfTI (.nii, .nii.gz; the gzip stream is checked end to end), NRRD (.nrrd, .nhdr) or MetaImage
            (.mha, .mhd) file, or a folder holding one DICOM series (one file per slice). The DICOM slices are
            ordered by ImagePositionPatient projected on the slice normal, never by file order
            (:func:`read_dicom_series`, which also refuses mixed series and gaps);
            RescaleSlope/Intercept are applied (CT in HU).

    Returns:
        (image, name): float32 3D image; ``name`` is the file stem (without ``.nii.gz`` etc.) or the folder name.

    Raises:
        RawDataError: not a 3D single-channel volume, non-finite voxels, or a bad DICOM series (names the file or
            folder). DataFormatError: a missing, truncated or unreadable file, or a float NIfTI file storing NaN or
            infinite voxels (:func:`dataloaders.niftiio.read_sitk`).
    """
    path = Path(path)
    if path.is_dir():
        series = read_dicom_series(path, where=str(path), numbered_files=False)
        img = series.geometry.apply(sitk.GetImageFromArray(series.image.astype(np.float32, copy=False)))
    else:
        img = read_sitk(path)
        _check_volume(img, path)
        img = sitk.Cast(img, sitk.sitkFloat32)
    _check_volume(img, path)
    # (float NIfTI files are checked on their stored bytes by read_sitk: ITK's reader turns NaN into 0)
    if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
        raise RawDataError(f"{path}: the image holds NaN or infinite values")
    return img, scan_name(path)


def read_label(path: str | Path) -> sitk.Image:
    """Read a label file (NIfTI, NRRD, MetaImage) as an Int32 image; values must be integers >= 0.

    Raises:
        RawDataError: a folder (labels must be files), not a 3D single-channel volume, non-integer or negative
            values (names the file). DataFormatError: missing, truncated or unreadable file.
    """
    path = Path(path)
    if path.is_dir():
        raise RawDataError(f"{path}: a label must be an image file (.nii.gz, .nrrd, .mha ...), not a folder")
    img = read_sitk(path)
    _check_volume(img, path)
    arr = sitk.GetArrayViewFromImage(img)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.rint(arr)):
            raise RawDataError(f"{path}: label file holds non-integer values")
    elif arr.dtype.kind not in "iub":
        raise RawDataError(f"{path}: label values must be integers, got pixel type {img.GetPixelIDTypeAsString()}")
    if arr.size and arr.min() < 0:
        raise RawDataError(f"{path}: label file holds negative values (min {arr.min()})")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise RawDataError(f"{path}: label values above {np.iinfo(np.int32).max}")
    out = sitk.GetImageFromArray(np.rint(arr).astype(np.int32) if arr.dtype.kind == "f" else arr.astype(np.int32))
    out.CopyInformation(img)
    return out


def read_grid(path: str | Path) -> Grid | None:
    """The voxel grid of an image file from its header only (no voxel data read); ``None`` for a DICOM folder.

    Raises:
        DataFormatError: the header cannot be read (names the file).
    """
    path = Path(path)
    if path.is_dir():
        return None
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    reader = read_header(path)
    if reader.GetDimension() != 3:
        raise RawDataError(f"{path}: expected a 3D volume, got a {reader.GetDimension()}D image")
    return Grid(tuple(int(v) for v in reader.GetSize()), tuple(float(v) for v in reader.GetSpacing()),
                tuple(float(v) for v in reader.GetOrigin()), tuple(float(v) for v in reader.GetDirection()))


def grid_problem(img_grid: Grid, lbl_grid: Grid) -> tuple[str | None, bool]:
    """How a label's grid differs from its image's: ``(why, fatal)``; ``(None, False)`` when they agree.

    Sizes must be equal. Header differences within rounding (spacing 1e-4 relative, origin 1e-3 mm, direction
    1e-4) are no difference; small ones (spacing 1 %, origin 0.5 mm, direction 1e-2) are not fatal (the image's
    geometry is then used); larger ones are fatal. The same tolerances as
    :func:`data_preprocessing.verify.check_pair_grid` (the benchmark pipelines).
    """
    if img_grid.size != lbl_grid.size:
        return f"size {lbl_grid.size} differs from the image's {img_grid.size}", True
    return grid_difference(Geometry(img_grid.spacing, img_grid.origin, img_grid.direction),
                           Geometry(lbl_grid.spacing, lbl_grid.origin, lbl_grid.direction))


def check_same_grid(img: sitk.Image, lbl: sitk.Image, img_path: str | Path, lbl_path: str | Path) -> sitk.Image:
    """Check that a label lies on its image's voxel grid; return it carrying the image's exact geometry.

    Tolerances of :func:`grid_problem`; a small header difference is reported (one line) and the image's geometry
    is used.

    Raises:
        RawDataError: another size or a clearly different geometry; the message names both files.
    """
    why, fatal = grid_problem(Grid.of(img), Grid.of(lbl))
    if fatal:
        raise RawDataError(f"{lbl_path}: not on the grid of its image {img_path}: {why}")
    if why is not None:
        print(f"note: {lbl_path}: header differs slightly from {img_path} ({why}); using the image's geometry")
    out = sitk.Image(lbl)
    out.CopyInformation(img)
    return out


# -------------------------------------------------------------------- DICOM series
def slice_number(path: Path, where: str = "", separators: str = "-_") -> int:
    """The slice number in a file name: the integer after the last separator of the stem.

    ``IMG-0004-00017.dcm`` -> 17, ``IMG-0004-00017.png`` -> 17, ``liver_GT_016.png`` -> 16.

    Raises:
        RawDataError: the stem does not end in ``<separator><digits>``.
    """
    stem = path.name.split(".")[0]
    last = max(stem.rfind(s) for s in separators)
    tail = stem[last + 1:]
    if last < 0 or not _NUMBER.fullmatch(tail):
        raise RawDataError(f"{where + ': ' if where else ''}{path}: no slice number after the last '-' or '_' "
                           f"in the file name")
    return int(tail)


# -------------------------------------------------------------------- DICOM
@dataclass
class DicomSeries:
    """One DICOM series, slices in spatial order.

    Attributes:
        image: (Z, H, W) float32 pixel values (RescaleSlope/Intercept applied).
        geometry: SimpleITK geometry (LPS): origin = first slice's ImagePositionPatient, direction columns =
            row direction, column direction, slice normal; spacing = (column spacing, row spacing, slice gap).
        files: DICOM files in spatial order.
        numbers: slice numbers of the file names, in spatial order (empty when read with ``numbered_files=False``).
    """

    image: np.ndarray
    geometry: Geometry
    files: list[Path]
    numbers: list[int]


def _float_list(ds: pydicom.Dataset, keyword: str, n: int, path: Path, where: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise RawDataError(f"{where}: {path.name}: missing or malformed DICOM tag {keyword}")
    return np.array([float(v) for v in value], dtype=np.float64)


def read_dicom_series(dicom_dir: str | Path, where: str = "", numbered_files: bool = True) -> DicomSeries:
    """Read a folder of single-slice DICOM files as one volume in spatial order.

    Args:
        dicom_dir: folder with one file per slice (hidden files are skipped).
        where: prefix of error messages (e.g. ``"patient 5"``).
        numbered_files: the file names end in a slice number (CHAOS ``IMG-0004-00017.dcm``), read into
            ``numbers`` for pairing with the ground truth; ``False`` (any file names, e.g. a user's series named
            by SOP UID) leaves ``numbers`` empty.

    Raises:
        RawDataError: empty folder, unreadable file, missing geometry tags, slices from more than one
            acquisition (SeriesInstanceUID, orientation, pixel spacing or size differ), two slices at one
            position, or a gap in the slice positions (missing slice); the message names the file.
    """
    dicom_dir = Path(dicom_dir)
    where = where or str(dicom_dir)
    files = sorted(p for p in dicom_dir.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if dicom_dir.is_dir() else []
    if not files:
        raise RawDataError(f"{where}: no DICOM files in {dicom_dir}")
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as err:
            raise RawDataError(f"{where}: {path}: not a readable DICOM file ({err})") from None
        headers.append((path, ds, _float_list(ds, "ImageOrientationPatient", 6, path, where),
                        _float_list(ds, "ImagePositionPatient", 3, path, where),
                        _float_list(ds, "PixelSpacing", 2, path, where)))
    # one acquisition: the same series, size, orientation and pixel spacing in every file
    _check_one_value(where, "SeriesInstanceUID", [(h[0], str(h[1].get("SeriesInstanceUID", ""))) for h in headers],
                     "belongs to another acquisition; keep one series per folder")
    _check_one_value(where, "Rows x Columns", [(h[0], (int(h[1].Rows), int(h[1].Columns))) for h in headers],
                     "has another image size: the folder mixes two acquisitions")
    _check_one_value(where, "ImageOrientationPatient", [(h[0], _rounded(h[2])) for h in headers],
                     "has another orientation: inconsistent orientation")
    _check_one_value(where, "PixelSpacing", [(h[0], _rounded(h[4])) for h in headers],
                     "has another pixel spacing: inconsistent spacing")
    slices = []
    for path, ds, _, ipp, _ in headers:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except (AttributeError, ValueError, RuntimeError, NotImplementedError) as err:
            raise RawDataError(f"{where}: {path}: cannot decode the pixel data ({err})") from None
        if pixels.ndim != 2:
            raise RawDataError(f"{where}: {path.name}: expected one 2D slice per file, got shape {pixels.shape}")
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        slices.append((ipp, path, pixels * np.float32(slope) + np.float32(intercept)))

    iop, spacing = headers[0][2], headers[0][4]
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 \
            or abs(float(row_dir @ col_dir)) > 1e-3:
        raise RawDataError(f"{where}: ImageOrientationPatient {iop.tolist()} is not two orthonormal vectors")
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(s[0] @ normal))
    positions = np.array([float(s[0] @ normal) for s in slices])
    gaps = np.diff(positions)
    if len(gaps):
        for i, gap in enumerate(gaps):
            if gap < 1e-3:
                raise RawDataError(f"{where}: {slices[i][1].name} and {slices[i + 1][1].name} lie at the same "
                                   f"position {positions[i]:.3f} mm: the folder mixes two acquisitions")
        median = float(np.median(gaps))
        for i, gap in enumerate(gaps):
            if abs(gap - median) > _POSITION_RTOL * median:
                raise RawDataError(
                    f"{where}: gap of {gap:.3f} mm between {slices[i][1].name} and {slices[i + 1][1].name}, the "
                    f"other slices are {median:.3f} mm apart: missing slice(s) or mixed acquisitions")
        slice_gap = float(gaps.mean())
    else:  # a single slice: fall back on the tags
        ds = pydicom.dcmread(slices[0][1], stop_before_pixels=True)
        slice_gap = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)))
    direction = np.column_stack([row_dir, col_dir, normal])
    geometry = Geometry(spacing=(float(spacing[1]), float(spacing[0]), slice_gap),
                        origin=tuple(float(v) for v in slices[0][0]),
                        direction=tuple(float(v) for v in direction.ravel()))
    files_sorted = [s[1] for s in slices]
    numbers = [slice_number(p, where) for p in files_sorted] if numbered_files else []
    dup = first_duplicate(numbers, files_sorted)
    if dup:
        raise RawDataError(f"{where}: DICOM files {dup[0].name} and {dup[1].name} carry the same slice number")
    return DicomSeries(np.stack([s[2] for s in slices]), geometry, files_sorted, numbers)


def _rounded(values: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def _check_one_value(where: str, tag: str, values: list[tuple[Path, object]], problem: str) -> None:
    """Raise naming a file whose ``tag`` differs from the most common value (ties: the first file's value)."""
    counts: dict[object, int] = {}
    for _, v in values:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) < 2:
        return
    common = max(counts, key=lambda v: (counts[v], -next(i for i, (_, w) in enumerate(values) if w == v)))
    odd_path, odd = next((p, v) for p, v in values if v != common)
    ref_path = next(p for p, v in values if v == common)
    raise RawDataError(f"{where}: {odd_path.name} {problem} ({tag} {odd} vs {common} in {counts[common]} files "
                       f"such as {ref_path.name})")


def first_duplicate(numbers: Sequence[int], files: Sequence[Path]) -> tuple[Path, Path] | None:
    seen: dict[int, Path] = {}
    for n, f in zip(numbers, files):
        if n in seen:
            return seen[n], f
        seen[n] = f
    return None
