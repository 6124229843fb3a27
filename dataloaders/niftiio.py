"""Reading and writing the processed on-disk format (docs/method.md#datasets).

One flat folder per dataset:

- ``image_<id>.nii.gz``          float image (CT in [0, 255], MR raw intensities after clip and resampling)
- ``label_<id>.nii.gz``          integer labels on the same grid
- ``superpix-<SCALE>_<id>.nii.gz`` superpixel pseudolabels, 0 outside the body (integer; float64 is accepted)
- ``supervox-<SCALE>_<id>.nii.gz`` 3D supervoxel pseudolabels (optional), 0 outside the body
- ``fgmask_<id>.nii.gz``         body mask (0/1)
- ``classmap_<min_fg>.json``     class -> scan -> sorted slice indices holding the class

Arrays are SimpleITK order, ``(Z, H, W)``: axis 0 is the slice axis. Every read checks the gzip stream end to end
(SimpleITK silently zero-fills a truncated ``.nii.gz``), and every write goes to a temporary name in the same
folder and is renamed when complete, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from util.atomic import atomic_file, write_text
from util.errors import ProjectError

IMAGE_PATTERN = re.compile(r"^image_(\d+)\.nii\.gz$")


class DataFormatError(ProjectError, ValueError):
    """A processed data file is missing, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Geometry:
    """Physical grid of a volume, in SimpleITK (x, y, z) order."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, img: sitk.Image) -> Geometry:
        return cls(tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))

    def apply(self, img: sitk.Image) -> sitk.Image:
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def mismatch(self, other: Geometry, tol: float = 1e-4) -> str | None:
        """Which field differs from ``other`` (relative tolerance on spacing, absolute in mm on origin)."""
        if not np.allclose(self.spacing, other.spacing, rtol=tol, atol=0):
            return f"spacing {other.spacing} != {self.spacing}"
        if not np.allclose(self.origin, other.origin, rtol=0, atol=max(tol, 1e-3)):
            return f"origin {other.origin} != {self.origin}"
        if not np.allclose(self.direction, other.direction, rtol=0, atol=tol):
            return f"direction {other.direction} != {self.direction}"
        return None


def grid_difference(image: Geometry, other: Geometry) -> tuple[str | None, bool]:
    """How ``other``'s grid (a label's) differs from ``image``'s: ``(why, fatal)``; ``(None, False)`` when they agree.

    The one tolerance rule for a label against its image, everywhere (own scans and the benchmark pipelines): header
    differences within rounding (spacing 1e-4 relative, origin 1e-3 mm, direction 1e-4) are no difference; small
    ones (spacing 1 %, origin 0.5 mm, direction 1e-2) are not fatal (the image's geometry is then used, as a
    writer's rounding would explain them); larger ones are fatal. Sizes are compared by the caller.
    """
    why = image.mismatch(other)
    if why is None:
        return None, False
    close = (np.allclose(image.spacing, other.spacing, rtol=1e-2, atol=0)
             and np.allclose(image.origin, other.origin, rtol=0, atol=0.5)
             and np.allclose(image.direction, other.direction, rtol=0, atol=1e-2))
    return why, not close


def check_gzip_complete(path: Path) -> bytes:
    """Decompress the whole gzip stream, raising :class:`DataFormatError` if it is truncated or corrupt.

    Returns:
        The decompressed bytes.
    """
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (EOFError, OSError, zlib.error) as err:
        raise DataFormatError(f"{path}: truncated or corrupt gzip stream ({err})") from None


def nifti_header(raw: bytes) -> Any:
    """The NIfTI-2 or NIfTI-1 header at the start of ``raw`` (either byte order) as a nibabel header, or ``None``
    when ``raw`` does not start with one (another format, or a file too short for a header)."""
    import nibabel  # imported on first use: it is needed only when a NIfTI file is read

    for klass in (nibabel.Nifti2Header, nibabel.Nifti1Header):  # NIfTI-2 by its size field, NIfTI-1 by its magic
        if klass.may_contain_header(raw[:klass.sizeof_hdr]):
            try:
                return klass.from_fileobj(io.BytesIO(raw), check=False)
            except (nibabel.spatialimages.HeaderDataError, ValueError):
                return None
    return None


def check_nifti_finite(path: Path, raw: bytes) -> None:
    """Refuse a float NIfTI file holding NaN or infinite voxels.

    SimpleITK's NIfTI reader returns such voxels as 0 without a word, so the check reads the voxel bytes
    themselves, where nibabel's header of the file (NIfTI-1 or NIfTI-2, either byte order) says they are. Other
    files are left alone.

    Args:
        path: the file, named in the message.
        raw: its (decompressed) bytes.

    Raises:
        DataFormatError: the count and the (z, y, x) index of the first non-finite voxel, or voxel data shorter
            than the header says.
    """
    import nibabel

    header = nifti_header(raw)
    if header is None or header.get_data_dtype().kind != "f":
        return
    try:
        shape = tuple(int(d) for d in header.get_data_shape())
    except nibabel.spatialimages.HeaderDataError:  # an invalid dim field: SimpleITK's reader will say so
        return
    if not shape:
        return
    dtype, offset, count = header.get_data_dtype(), int(header.get_data_offset()), int(np.prod(shape))
    if offset + count * dtype.itemsize > len(raw):
        raise DataFormatError(f"{path}: truncated, the header announces {count} voxels of {dtype.itemsize} bytes "
                              f"from byte {offset} but the file holds {len(raw)} bytes")
    values = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    bad = ~np.isfinite(values)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), shape[::-1])  # file order: x fastest -> (.., z, y, x)
        raise DataFormatError(
            f"{path}: {int(bad.sum())} voxels are NaN or infinite (first at z, y, x = "
            f"{tuple(int(i) for i in first[-3:])}); fix the preprocessing that wrote it (they are never replaced "
            f"silently, as SimpleITK's reader would, with 0)")


def read_header(path: str | Path) -> sitk.ImageFileReader:
    """A reader holding the image information of ``path`` (size, spacing, metadata), without reading the voxels.

    Raises:
        DataFormatError: the file cannot be read as an image (SimpleITK's last message line is quoted).
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataFormatError(f"{path}: cannot be read as an image ({str(err).strip().splitlines()[-1]})") from None
    return reader


def read_sitk(path: str | Path) -> sitk.Image:
    """Read one volume with SimpleITK after checking it is complete and, for float NIfTI, finite."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    if path.name.endswith(".nii.gz"):
        check_nifti_finite(path, check_gzip_complete(path))
    elif path.name.endswith(".gz"):
        check_gzip_complete(path)
    elif path.name.endswith(".nii"):
        check_nifti_finite(path, path.read_bytes())
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise DataFormatError(f"{path}: cannot be read as an image ({str(err).strip().splitlines()[-1]})") from None


def read_volume(path: str | Path, dtype: Any = None) -> tuple[np.ndarray, Geometry]:
    """Read a volume as a ``(Z, H, W)`` array and its geometry.

    Args:
        path: a ``.nii.gz`` (or any SimpleITK-readable) file.
        dtype: optional dtype to cast to.
    """
    img = read_sitk(path)
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim != 3:
        raise DataFormatError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataFormatError(f"{path}: {int(bad.sum())} voxels are NaN or infinite (first at z, y, x = {first}); "
                              f"fix the preprocessing that wrote it (they are never replaced silently with 0)")
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr, Geometry.of(img)


def read_label_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read an integer-valued volume (labels, superpixels; float storage accepted) as int32 ``(Z, H, W)``.

    Float storage is how the original wrote its superpixels (docs/method.md#q20-float-pseudolabels).
    """
    arr, geom = read_volume(path)
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise DataFormatError(f"{path}: label volume holds non-integer values")
        arr = rounded
    return arr.astype(np.int32), geom


def write_volume(arr: np.ndarray, path: str | Path, geometry: Geometry | None = None,
                 reference: sitk.Image | None = None, notes: str | None = None) -> Path:
    """Write a ``(Z, H, W)`` array atomically, carrying the geometry of ``geometry`` or ``reference``.

    Args:
        notes: optional text (<= 80 characters) for the NIfTI header's ``descrip`` field, e.g. the source-image
            fingerprint of a derived file (``dataloaders.derived``).
    """
    path = Path(path)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    if reference is not None:
        img.CopyInformation(reference)
    elif geometry is not None:
        geometry.apply(img)
    if notes is not None:
        if len(notes) > 80:
            raise ValueError(f"header notes are limited to 80 characters, got {len(notes)}")
        img.SetMetaData("ITK_FileNotes", notes)
    with atomic_file(path) as tmp:  # same suffix: SimpleITK picks the writer from it
        sitk.WriteImage(img, str(tmp), True)
    return path


def write_json(obj: Any, path: str | Path, indent: int | None = 1) -> Path:
    """Write JSON atomically (temporary name, then rename)."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


# -------------------------------------------------------------------- file names and discovery
def image_path(data_dir: str | Path, scan_id: int) -> Path:
    return Path(data_dir) / f"image_{scan_id}.nii.gz"


def label_path(data_dir: str | Path, scan_id: int) -> Path:
    return Path(data_dir) / f"label_{scan_id}.nii.gz"


def superpix_path(data_dir: str | Path, scan_id: int, scale: str = "MIDDLE") -> Path:
    return Path(data_dir) / f"superpix-{scale}_{scan_id}.nii.gz"


def supervox_path(data_dir: str | Path, scan_id: int, scale: str = "MIDDLE") -> Path:
    """3D supervoxel pseudolabels (``python -m data_preprocessing.pseudolabel --dim 3``), 0 outside the body."""
    return Path(data_dir) / f"supervox-{scale}_{scan_id}.nii.gz"


def fgmask_path(data_dir: str | Path, scan_id: int) -> Path:
    return Path(data_dir) / f"fgmask_{scan_id}.nii.gz"


def classmap_path(data_dir: str | Path, min_fg: int = 1) -> Path:
    return Path(data_dir) / f"classmap_{min_fg}.json"


def list_scan_ids(data_dir: str | Path) -> list[int]:
    """Scan ids of ``image_<id>.nii.gz`` in ``data_dir``, sorted numerically.

    Raises:
        DataFormatError: the folder does not exist or holds no image file.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataFormatError(f"{data_dir}: data directory not found")
    ids = sorted(int(m.group(1)) for p in data_dir.iterdir() if (m := IMAGE_PATTERN.match(p.name)))
    if not ids:
        raise DataFormatError(f"{data_dir}: no image_<id>.nii.gz files in this folder")
    return ids


# -------------------------------------------------------------------- one scan, checked
@dataclass
class ScanVolumes:
    """The volumes of one scan, all ``(Z, H, W)`` on one grid.

    Attributes:
        scan_id: scan id.
        image: float32 image.
        label: int32 labels, or ``None`` if not requested.
        superpix: int32 superpixel ids, or ``None`` if not requested.
        geometry: the image's geometry.
    """

    scan_id: int
    image: np.ndarray
    label: np.ndarray | None
    superpix: np.ndarray | None
    geometry: Geometry


def _check_same_grid(ref_path: Path, ref: np.ndarray, ref_geom: Geometry, path: Path, arr: np.ndarray,
                     geom: Geometry) -> None:
    if arr.shape != ref.shape:
        raise DataFormatError(f"{path}: shape {arr.shape} differs from {ref_path.name} {ref.shape}")
    why = ref_geom.mismatch(geom)
    if why is not None:
        raise DataFormatError(f"{path}: geometry differs from {ref_path.name}: {why}")


def load_scan(data_dir: str | Path, scan_id: int, with_label: bool = True, with_superpix: bool = False,
              superpix_scale: str = "MIDDLE", known_labels: set[int] | None = None) -> ScanVolumes:
    """Load a scan's image and, optionally, its labels and superpixels, checking shape and geometry.

    Args:
        known_labels: if given, label values outside this set raise an error naming the file.

    Raises:
        DataFormatError: a file is missing, truncated, or not on the image's grid.
    """
    ipath = image_path(data_dir, scan_id)
    image, geom = read_volume(ipath, np.float32)
    label = superpix = None
    if with_label:
        lpath = label_path(data_dir, scan_id)
        label, lgeom = read_label_volume(lpath)
        _check_same_grid(ipath, image, geom, lpath, label, lgeom)
        if known_labels is not None:
            unknown = sorted(set(np.unique(label).tolist()) - set(known_labels))
            if unknown:
                raise DataFormatError(
                    f"{lpath}: label ids {unknown} are not in the dataset's label map {sorted(known_labels)}")
    if with_superpix:
        spath = superpix_path(data_dir, scan_id, superpix_scale)
        superpix, sgeom = read_label_volume(spath)
        _check_same_grid(ipath, image, geom, spath, superpix, sgeom)
    return ScanVolumes(scan_id, image, label, superpix, geom)


def iter_scans(data_dir: str | Path, scan_ids: list[int] | None = None, **kwargs: Any) -> Iterator[ScanVolumes]:
    """Yield :func:`load_scan` for each id (default: every scan in the folder)."""
    for sid in scan_ids if scan_ids is not None else list_scan_ids(data_dir):
        yield load_scan(data_dir, sid, **kwargs)


# -------------------------------------------------------------------- class map
def load_classmap(data_dir: str | Path, class_names: list[str], scan_ids: list[int] | None = None,
                  min_fg: int = 1, rebuild: str | None = None) -> dict[str, dict[str, list[int]]]:
    """Read ``classmap_<min_fg>.json`` and check it against the dataset and the scans present.

    Args:
        class_names: every class name the map must hold (background included).
        scan_ids: ids whose entries must exist (default: the scans in the folder).
        rebuild: the complete command that builds this file (``dataloaders.derived.classmap_command``), named in
            the messages; default: the command with a ``<dataset>`` placeholder.

    Raises:
        DataFormatError: missing, malformed, or stale (scan ids that do not match the image files).
    """
    path = classmap_path(data_dir, min_fg)
    if rebuild is None:
        rebuild = (f"python -m data_preprocessing.class_slice_index --data-dir {data_dir} --dataset <dataset> "
                   f"--min-fg {min_fg}")
    if not path.is_file():
        raise DataFormatError(f"{path}: class-slice index not found; build it with {rebuild}")
    try:
        cmap = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(cmap, dict):
        raise DataFormatError(f"{path}: expected an object {{class: {{scan: [slices]}}}}")
    ids = scan_ids if scan_ids is not None else list_scan_ids(data_dir)
    want = {str(i) for i in ids}
    for name in class_names:
        if name not in cmap or not isinstance(cmap[name], dict):
            raise DataFormatError(f"{path}: class '{name}' is missing; rebuild it with {rebuild}")
        have = set(cmap[name])
        if not want <= have:
            raise DataFormatError(
                f"{path}: stale index, scans {sorted(want - have, key=int)} are not listed for '{name}'; "
                f"rebuild it with {rebuild}")
    on_disk = {str(i) for i in list_scan_ids(data_dir)}
    extra = sorted({s for name in class_names for s in cmap[name]} - on_disk, key=int)
    if extra:
        raise DataFormatError(f"{path}: stale index, it lists scans {extra} that have no image file; rebuild it "
                              f"with {rebuild}")
    return cmap
