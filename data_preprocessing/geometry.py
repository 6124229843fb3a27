"""Scans in any geometry -> the processed grid and back: reorientation, intensity, resampling, crop/pad.

Used by ``python -m data_preprocessing.prepare`` (a user's own scans -> a training folder) and by ``predict.py``
(support and query scans -> the network's grid, and the prediction back onto the query's own grid). Reading the
scans is :mod:`data_preprocessing.scan_reader`.

Public interface::

    PrepareSettings                                modality, spacing (one in-plane mm for every scan, or the SABS
                                                   rule), z_spacing, size, window, mr_clip_percentile;
                                                   to_dict()/from_dict(); PrepareSettings.registry(name, modality)
    GridTransform                                  source / reoriented / resampled / processed grids, crop offsets,
                                                   pad value, intensity bounds; to_dict()/from_dict()
    preprocess_image(img, settings) -> (array (Z, H, W) float32, GridTransform, processed sitk.Image)
    preprocess_label(lbl, transform) -> array (Z, H, W) int32 of the raw label values
    to_source_grid(array_zyx, transform) -> sitk.Image on the source grid (identical size/spacing/origin/direction)
    preprocessing_record(data_dir, name, modality, scan_ids) -> dict   the checkpoint's "preprocessing" entry, with
                                                   the one in-plane spacing of the training scans (measured)
    preprocessing_from_checkpoint(ckpt) -> PrepareSettings | None

The transform, in order (every step keeps each voxel's physical position in mm; the registry's rules:
docs/method.md#preprocessing):

1. **Reorientation** to one common orientation, ``LPS`` (SimpleITK ``DICOMOrient``): the array axes are permuted
   and flipped (no interpolation) so that array index x grows towards the patient's left, y towards posterior and
   z towards superior; an axis-aligned scan ends with the identity direction, the orientation of the registry's
   processed scans and of the phantom. A slice (Z axis 0) then shows the anatomy the same way up whatever the
   scanner wrote (NIfTI RAS, DICOM LPS, flipped or permuted axes). Oblique scans keep the nearest such
   orientation and their residual direction matrix.
2. **Intensity** on the reoriented volume. CT: clip to ``window`` (default -125..275 HU) and map it linearly to 0..255,
   ``(HU - lo) / (hi - lo) * 255`` (docs/method.md#q19-ct-rescaling, the fixed formula). MR: clip above the
   ``mr_clip_percentile``-th percentile of the volume (default 99.5), no lower clip (docs/method.md#chaos-t2-mri).
3. **Resampling** in-plane to ``spacing`` (mm); z kept unless ``z_spacing`` is set. Output size per axis
   ``max(1, round(n * s / t))`` (the physical extent of the scan; not the original's ``+ 1`` rule,
   docs/method.md#resampling-rule), origin and direction of the reoriented image. One physical scale: every scan
   of a dataset, and support and query alike, gets the same spacing in mm, so an organ has the same size in pixels
   whatever the scanner's resolution (docs/method.md#physical-scale). Defaults: MR 1.25 mm (CHAOS); CT 1.6 mm
   (256 px cover 410 mm, the field of view of an abdominal CT, docs/own-scans.md). The SABS registry pipeline
   keeps its published rule, 1.75 x each scan's own spacing (``spacing_rule="sabs"``: right only because every
   Synapse scan is 0.6-0.98 mm; docs/method.md#sabs-ct).
4. **Centre crop or pad** in-plane to ``size x size`` around (rows // 2, cols // 2) of the resampled grid
   (:func:`data_preprocessing.resample.center_start`); padding holds the volume's minimum after step 2.

Steps 3 and 4 are one linear resampling from the reoriented grid onto the final grid (no intermediate image, so no
second interpolation); the CT clip runs before it, on the scan's grid, and the linear map to 0..255 after it, on the
smaller processed grid (an affine map commutes with linear interpolation: the same values, less work). Labels take the
same path one value at a time: each value's binary mask is resampled linearly and kept where it rounds to 1, values in
ascending order, higher ids overwrite lower ones (docs/method.md#resampling-rule); only the block around each value's
bounding box is resampled, which gives exactly the whole-volume result (tested) in a fraction of the time.
:func:`to_source_grid` resamples a label map on the processed grid onto the source grid the same way (or by
nearest neighbour), so a predicted label lands on the same physical points in mm as in the source scan.

Errors: a problem with a user's file raises :class:`data_preprocessing.verify.RawDataError` (or
:class:`dataloaders.niftiio.DataFormatError` for a truncated or unreadable file), the message naming the file or
folder; both are project errors that the command-line tools turn into one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from data_preprocessing.intensity import CT_WINDOW, MR_CLIP_PERCENTILE, rescale_window
from data_preprocessing.resample import center_start
from dataloaders.niftiio import DataFormatError, image_path, read_header

ORIENTATION = "LPS"  # common orientation of every processed scan (identity direction for axis-aligned scans)
MR_SPACING = 1.25  # in-plane mm of the MR registry datasets (CHAOS, CMR, the phantom)
# Own CT scans: 256 px x 1.6 mm = 410 mm, the field of view of clinical abdominal CT (300-500 mm, most abdomens
# fit; docs/own-scans.md "One physical scale").
CT_SPACING = 1.6
CT_SPACING_FACTOR = 1.75  # SABS rule: in-plane spacing x 1.75 (448 px -> 256, docs/method.md#sabs-ct)
SpacingRule = Literal["fixed", "sabs"]
DEFAULT_SIZE = 256
# Registry datasets: (in-plane spacing in mm or None for the SABS rule, z spacing in mm or None = kept),
# docs/method.md#preprocessing.
REGISTRY_GRIDS: dict[str, tuple[float | None, float | None]] = {
    "CHAOST2": (1.25, 7.70), "CMR": (1.25, 7.99), "PHANTOM": (1.25, 7.70), "SABS": (None, None),
}

Modality = Literal["CT", "MR"]


# -------------------------------------------------------------------- settings
@dataclass(frozen=True)
class PrepareSettings:
    """How scans are brought onto the processed grid (see the module docstring for the steps).

    Attributes:
        modality: ``"CT"`` (windowed and scaled to 0..255) or ``"MR"`` (percentile clip).
        spacing: in-plane spacing in mm, the same for every scan; ``None``: the modality's default (MR 1.25 mm,
            CT 1.6 mm), or no fixed value under ``spacing_rule="sabs"``.
        z_spacing: slice spacing in mm; ``None`` keeps the scan's slices.
        size: in-plane size in voxels of the processed grid (``size x size``).
        window: CT window (low, high) in HU, mapped to 0..255; ``None`` for MR.
        mr_clip_percentile: MR upper clip, percent in (0, 100]; ``None`` for CT.
        spacing_rule: ``"fixed"`` (``spacing`` for every scan) or ``"sabs"``, the SABS pipeline's published rule,
            1.75 x each scan's own in-plane spacing (CT only; ``spacing`` must be ``None``). Scans of different
            resolutions then end at different scales: only the registry's SABS pipeline uses it.
    """

    modality: Modality
    spacing: float | None = None
    z_spacing: float | None = None
    size: int = DEFAULT_SIZE
    window: tuple[float, float] | None = None
    mr_clip_percentile: float | None = None
    spacing_rule: SpacingRule = "fixed"

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', got {self.modality!r}")
        if self.modality == "CT":
            window = CT_WINDOW if self.window is None else tuple(float(v) for v in self.window)
            if len(window) != 2 or not window[0] < window[1]:
                raise ValueError(f"window must be (low, high) with low < high, got {self.window}")
            object.__setattr__(self, "window", window)
            if self.mr_clip_percentile is not None:
                raise ValueError("mr_clip_percentile applies to MR only")
        else:
            if self.window is not None:
                raise ValueError("window applies to CT only (MR is clipped at a percentile)")
            pct = MR_CLIP_PERCENTILE if self.mr_clip_percentile is None else float(self.mr_clip_percentile)
            if not 0 < pct <= 100:
                raise ValueError(f"mr_clip_percentile must be in (0, 100], got {pct}")
            object.__setattr__(self, "mr_clip_percentile", pct)
        if self.spacing_rule not in ("fixed", "sabs"):
            raise ValueError(f"spacing_rule must be 'fixed' or 'sabs', got {self.spacing_rule!r}")
        if self.spacing_rule == "sabs":
            if self.modality != "CT" or self.spacing is not None:
                raise ValueError("spacing_rule='sabs' (1.75 x each scan's own spacing) is a CT rule without a fixed "
                                 f"spacing; got modality {self.modality}, spacing {self.spacing}")
        elif self.spacing is None:
            object.__setattr__(self, "spacing", MR_SPACING if self.modality == "MR" else CT_SPACING)
        for key in ("spacing", "z_spacing"):
            value = getattr(self, key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"{key} must be a positive number of mm, got {value!r}")
                object.__setattr__(self, key, float(value))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")

    def inplane_spacing(self, source_spacing: Sequence[float]) -> tuple[float, float]:
        """Output in-plane spacing (x, y) in mm for a reoriented scan of spacing ``source_spacing`` (x, y, z)."""
        if self.spacing_rule == "fixed":
            return self.spacing, self.spacing
        return CT_SPACING_FACTOR * float(source_spacing[0]), CT_SPACING_FACTOR * float(source_spacing[1])

    def with_spacing(self, spacing: float) -> PrepareSettings:
        """The same settings with one fixed in-plane spacing (mm) for every scan."""
        return PrepareSettings(modality=self.modality, spacing=float(spacing), z_spacing=self.z_spacing,
                               size=self.size, window=self.window, mr_clip_percentile=self.mr_clip_percentile)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists for tuples)."""
        return {"modality": self.modality, "spacing": self.spacing, "z_spacing": self.z_spacing, "size": self.size,
                "window": list(self.window) if self.window is not None else None,
                "mr_clip_percentile": self.mr_clip_percentile, "spacing_rule": self.spacing_rule}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepareSettings:
        """Inverse of :meth:`to_dict`. A record written before ``spacing_rule`` existed with a CT ``spacing`` of
        ``None`` meant the SABS rule, and still does.

        Raises:
            ValueError: unknown or missing keys, or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"preprocessing settings must be an object, got {type(data).__name__}")
        keys = {"modality", "spacing", "z_spacing", "size", "window", "mr_clip_percentile", "spacing_rule"}
        unknown = sorted(set(data) - keys)
        if unknown or "modality" not in data:
            raise ValueError(f"preprocessing settings: unknown keys {unknown} or no 'modality' in {sorted(data)}")
        window = data.get("window")
        rule = data.get("spacing_rule")
        if rule is None:
            rule = "sabs" if data["modality"] == "CT" and data.get("spacing") is None else "fixed"
        return cls(modality=data["modality"], spacing=data.get("spacing"), z_spacing=data.get("z_spacing"),
                   size=data.get("size", DEFAULT_SIZE), window=tuple(window) if window is not None else None,
                   mr_clip_percentile=data.get("mr_clip_percentile"), spacing_rule=rule)

    @classmethod
    def registry(cls, name: str, modality: Modality) -> PrepareSettings:
        """The settings equivalent to a registry dataset's own pipeline (docs/method.md#preprocessing): CHAOST2 and
        PHANTOM 1.25 mm with 7.70 mm slices, CMR 1.25 / 7.99 mm, SABS the published 1.75 x rule with slices kept;
        another name: the modality's defaults."""
        if name == "SABS":
            return cls(modality=modality, spacing_rule="sabs")
        spacing, z_spacing = REGISTRY_GRIDS.get(name, (None, None))
        return cls(modality=modality, spacing=spacing, z_spacing=z_spacing)


# -------------------------------------------------------------------- grids and the transform
@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space, SimpleITK (x, y, z) order.

    Attributes:
        size: voxels per axis (x, y, z); the array shape is (z, y, x).
        spacing: mm per axis.
        origin: physical position in mm of voxel (0, 0, 0).
        direction: 3x3 direction matrix, row-major (its columns are the axis directions).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, img: sitk.Image) -> Grid:
        return cls(tuple(int(v) for v in img.GetSize()), tuple(float(v) for v in img.GetSpacing()),
                   tuple(float(v) for v in img.GetOrigin()), tuple(float(v) for v in img.GetDirection()))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The array shape (Z, H, W)."""
        return self.size[2], self.size[1], self.size[0]

    def apply(self, img: sitk.Image) -> sitk.Image:
        """Give ``img`` (of this size) this grid's spacing, origin and direction; returns ``img``."""
        if tuple(img.GetSize()) != self.size:
            raise ValueError(f"image size {img.GetSize()} differs from the grid's {self.size}")
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def physical_point(self, index_xyz: Sequence[float]) -> np.ndarray:
        """Physical position in mm of a (possibly fractional) index (x, y, z): origin + D diag(spacing) index."""
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        return np.asarray(self.origin) + d @ (np.asarray(self.spacing) * np.asarray(index_xyz, dtype=np.float64))

    def continuous_index(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) physical points in mm -> (N, 3) continuous indices (x, y, z) of this grid."""
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing)[None, :]
        return np.linalg.solve(d, (np.asarray(points, dtype=np.float64) - np.asarray(self.origin)).T).T

    def sub_grid(self, start_xyz: Sequence[int], size_xyz: Sequence[int]) -> Grid:
        """The block ``[start, start + size)`` of this grid as a grid of its own (same spacing and direction)."""
        origin = tuple(float(v) for v in self.physical_point(start_xyz))
        return Grid(tuple(int(v) for v in size_xyz), self.spacing, origin, self.direction)

    def to_dict(self) -> dict[str, list]:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grid:
        return cls(tuple(int(v) for v in data["size"]), tuple(float(v) for v in data["spacing"]),
                   tuple(float(v) for v in data["origin"]), tuple(float(v) for v in data["direction"]))


@dataclass(frozen=True)
class GridTransform:
    """Everything needed to map between a scan's source grid and its processed (Z, H, W) grid.

    Attributes:
        source: the grid of the scan as read.
        orientation: the common orientation code (``"LPS"``).
        reoriented: the source grid after ``DICOMOrient`` (same voxels, axes permuted/flipped).
        resampled: the grid after in-plane (and optional z) resampling, before the crop: origin and direction of
            ``reoriented``.
        crop_start: (x, y) index in ``resampled`` of the processed grid's first voxel; negative = padding.
        processed: the final grid (``size x size`` in-plane).
        pad_value: image value written outside the scan (the volume's minimum after the intensity step).
        intensity: what the intensity step did: ``{"window": [lo, hi]}`` (CT) or
            ``{"clip_percentile": p, "clip_value": v}`` (MR, v in the scan's units).
    """

    source: Grid
    orientation: str
    reoriented: Grid
    resampled: Grid
    crop_start: tuple[int, int]
    processed: Grid
    pad_value: float
    intensity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {"source": self.source.to_dict(), "orientation": self.orientation,
                "reoriented": self.reoriented.to_dict(), "resampled": self.resampled.to_dict(),
                "crop_start": list(self.crop_start), "processed": self.processed.to_dict(),
                "pad_value": float(self.pad_value), "intensity": dict(self.intensity)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridTransform:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a missing key.
        """
        missing = sorted({"source", "orientation", "reoriented", "resampled", "crop_start", "processed",
                          "pad_value"} - set(data))
        if missing:
            raise ValueError(f"grid transform: missing keys {missing}")
        return cls(source=Grid.from_dict(data["source"]), orientation=str(data["orientation"]),
                   reoriented=Grid.from_dict(data["reoriented"]), resampled=Grid.from_dict(data["resampled"]),
                   crop_start=tuple(int(v) for v in data["crop_start"]), processed=Grid.from_dict(data["processed"]),
                   pad_value=float(data["pad_value"]), intensity=dict(data.get("intensity", {})))


def plan_grids(reoriented: Grid, settings: PrepareSettings) -> tuple[Grid, tuple[int, int], Grid]:
    """The resampled grid, the crop start and the processed grid of a reoriented scan (steps 3-4).

    Args:
        reoriented: the scan's grid after reorientation.
        settings: target spacing and size.

    Returns:
        (resampled, (x0, y0), processed). Resampled size per axis ``max(1, round(n * s / t))``; the processed grid
        starts at resampled index (x0, y0, 0) with ``x0 = m_x // 2 - size // 2`` (negative: padding).
    """
    tx, ty = settings.inplane_spacing(reoriented.spacing)
    tz = settings.z_spacing if settings.z_spacing is not None else reoriented.spacing[2]
    new_spacing = (tx, ty, float(tz))
    size = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(reoriented.size, reoriented.spacing, new_spacing))
    if settings.z_spacing is None:
        size = (size[0], size[1], reoriented.size[2])
    resampled = Grid(size, new_spacing, reoriented.origin, reoriented.direction)
    x0, y0 = center_start(size[0], settings.size), center_start(size[1], settings.size)
    origin = resampled.physical_point((x0, y0, 0))
    processed = Grid((settings.size, settings.size, size[2]), new_spacing, tuple(float(v) for v in origin),
                     reoriented.direction)
    return resampled, (x0, y0), processed


def _resample_onto(img: sitk.Image, grid: Grid, interpolator: int, default: float, pixel: int) -> sitk.Image:
    return sitk.Resample(img, list(grid.size), sitk.Transform(), interpolator, grid.origin, grid.spacing,
                         grid.direction, float(default), pixel)


def preprocess_image(img: sitk.Image, settings: PrepareSettings) -> tuple[np.ndarray, GridTransform, sitk.Image]:
    """Bring a scan onto the processed grid: reorient, intensity, resample, centre crop/pad (module docstring).

    Args:
        img: 3D scan (any pixel type, any direction matrix), e.g. from :func:`read_scan`; CT in HU.
        settings: the preprocessing settings.

    Returns:
        (array, transform, image): float32 array (Z, H, W) with H = W = ``settings.size`` (CT in 0..255, MR in the
        scan's units clipped at the percentile); the transform; the array as a SimpleITK image carrying the
        processed grid, so that each voxel maps to the same physical point in mm as in ``img``.

    Raises:
        ValueError: not a 3D single-channel image.
    """
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a 3D single-channel image, got {img.GetDimension()}D with "
                         f"{img.GetNumberOfComponentsPerPixel()} components")
    source = Grid.of(img)
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    reoriented_img = sitk.DICOMOrient(img, ORIENTATION)
    reoriented = Grid.of(reoriented_img)
    resampled, start, processed = plan_grids(reoriented, settings)
    # The clip runs on the scan's own grid (before resampling, as in docs/method.md#preprocessing); the linear CT map
    # commutes with linear interpolation, so it runs on the (smaller) processed grid: the same values, a fraction of
    # the work.
    view = sitk.GetArrayViewFromImage(reoriented_img)
    low = float(view.min())
    if settings.modality == "CT":
        lo, hi = settings.window
        clipped = sitk.Clamp(reoriented_img, sitk.sitkFloat32, lo, hi)
        pad_hu = min(max(low, lo), hi)  # the clipped volume's minimum
        out_img = _resample_onto(clipped, processed, sitk.sitkLinear, pad_hu, sitk.sitkFloat32)
        arr = rescale_window(sitk.GetArrayViewFromImage(out_img), lo, hi)  # (HU - lo) / (hi - lo) * 255
        pad_value = float(rescale_window(np.array([pad_hu], np.float32), lo, hi)[0])
        intensity: dict[str, Any] = {"window": [lo, hi]}
    else:
        top = float(np.float32(np.percentile(view, settings.mr_clip_percentile)))  # as clip_upper_percentile
        clipped = sitk.Minimum(reoriented_img, top)
        pad_value = min(low, top)
        out_img = _resample_onto(clipped, processed, sitk.sitkLinear, pad_value, sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(out_img)
        intensity = {"clip_percentile": settings.mr_clip_percentile, "clip_value": top}
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    processed.apply(out)
    transform = GridTransform(source, ORIENTATION, reoriented, resampled, start, processed, pad_value, intensity)
    return sitk.GetArrayViewFromImage(out).copy(), transform, out


def label_values(arr: np.ndarray) -> list[int]:
    """The non-zero values of a non-negative integer array, ascending."""
    top = int(arr.max()) if arr.size else 0
    # bincount: one pass, far faster than np.unique's sort on a 512x512x200 volume (uint64 cannot be cast safely)
    if top < 1 << 20 and arr.dtype != np.uint64:
        return [int(v) for v in np.flatnonzero(np.bincount(arr.ravel(), minlength=1)) if v]
    return [int(v) for v in np.unique(arr) if v != 0]


_Block = tuple[tuple[slice, ...], "Grid", tuple[slice, ...]]


def _block(mask: np.ndarray, src: Grid, dst: Grid, margin: int = 1) -> _Block | None:
    """Where ``mask`` (Z, H, W on ``src``) can change a resampling onto ``dst``: the mask's bounding box grown by
    ``margin`` voxels (its slices and sub-grid in ``src``) and the ``dst`` voxels inside that box's physical extent
    (their slices). ``None`` for an empty mask or a box outside ``dst``.

    A linear interpolation of the mask is 0 farther than one ``src`` voxel from its non-zero voxels, so resampling
    the box onto the ``dst`` block gives exactly the values of the whole-volume resampling there (0 elsewhere).
    """
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    if not len(nz[0]):
        return None
    lo_zyx = [max(int(n[0]) - margin, 0) for n in nz]
    hi_zyx = [min(int(n[-1]) + margin + 1, m) for n, m in zip(nz, mask.shape)]
    src_slices = tuple(slice(a, b) for a, b in zip(lo_zyx, hi_zyx))
    start, stop = lo_zyx[::-1], hi_zyx[::-1]  # (x, y, z)
    sub = src.sub_grid(start, [b - a for a, b in zip(start, stop)])
    corners = np.array([[x, y, z] for x in (start[0] - 0.5, stop[0] - 0.5) for y in (start[1] - 0.5, stop[1] - 0.5)
                        for z in (start[2] - 0.5, stop[2] - 0.5)], dtype=np.float64)
    idx = dst.continuous_index(np.array([src.physical_point(c) for c in corners]))
    first = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
    last = np.minimum(np.ceil(idx.max(axis=0)).astype(int), np.asarray(dst.size) - 1)
    if np.any(last < first):
        return None
    dst_slices = tuple(slice(int(first[k]), int(last[k]) + 1) for k in (2, 1, 0))
    return src_slices, sub, dst_slices


def _resample_values(arr: np.ndarray, src: Grid, grid: Grid, values: Sequence[int]) -> np.ndarray:
    """One value at a time: binary mask resampled linearly from ``src`` onto ``grid``, kept where it rounds to 1,
    ascending values (higher ids overwrite lower ones). Only each value's bounding box is resampled
    (:func:`_block`). Returns int32 (Z, H, W) of ``grid``."""
    out = np.zeros(grid.shape_zyx, dtype=np.int32)
    for value in sorted(values):
        mask = arr == value
        block = _block(mask, src, grid)
        if block is None:
            continue
        src_slices, sub, dst_slices = block
        sub_img = sub.apply(sitk.GetImageFromArray(mask[src_slices].astype(np.float32)))
        dst_grid = grid.sub_grid([s.start for s in dst_slices[::-1]], [s.stop - s.start for s in dst_slices[::-1]])
        res = _resample_onto(sub_img, dst_grid, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        view = out[dst_slices]
        view[sitk.GetArrayViewFromImage(res) >= 0.5] = value  # rint(x) >= 1 (res alive: the view is its buffer)
    return out


def preprocess_label(lbl: sitk.Image, transform: GridTransform) -> np.ndarray:
    """Bring a label map of the source grid onto the processed grid (same reorientation and grid as the image).

    Each value's binary mask is resampled linearly and kept where it rounds to 1, in ascending order
    (docs/method.md#resampling-rule).

    Args:
        lbl: integer labels on ``transform.source`` (check with :func:`check_same_grid` first).
        transform: the image's transform from :func:`preprocess_image`.

    Returns:
        int32 array (Z, H, W) of the processed grid holding the label's own values.

    Raises:
        ValueError: ``lbl`` is not on the source grid, or holds non-integer or negative values.
    """
    grid = Grid.of(lbl)
    src = transform.source
    if grid.size != src.size or not (np.allclose(grid.spacing, src.spacing, rtol=1e-4)
                                     and np.allclose(grid.origin, src.origin, atol=1e-3)
                                     and np.allclose(grid.direction, src.direction, atol=1e-4)):
        raise ValueError(f"label grid {grid} is not the transform's source grid {src}")
    reoriented = sitk.DICOMOrient(lbl, transform.orientation)
    arr = sitk.GetArrayViewFromImage(reoriented)
    if arr.dtype.kind not in "iub":
        if not np.array_equal(arr, np.rint(arr)):
            raise ValueError("label map holds non-integer values")
        arr = np.rint(arr).astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"label map holds negative values (min {arr.min()})")
    return _resample_values(arr, Grid.of(reoriented), transform.processed, label_values(arr))


def to_source_grid(array_zyx: np.ndarray, transform: GridTransform,
                   interpolation: Literal["linear", "nearest"] = "linear") -> sitk.Image:
    """Map a label map on the processed grid back onto the scan's source grid.

    Args:
        array_zyx: integer labels (Z, H, W) of ``transform.processed`` (e.g. a prediction), values >= 0.
        transform: the scan's transform.
        interpolation: ``"linear"``: one value at a time (binary mask resampled linearly, kept where it rounds to
            1, ascending values), smooth outlines when the source grid is finer; ``"nearest"``: nearest neighbour.

    Returns:
        Label image (uint8 when every value fits, else int32) whose size, spacing, origin and direction are
        exactly those of the source; points outside the processed grid get 0.

    Raises:
        ValueError: wrong shape, non-integer or negative values, unknown interpolation.
    """
    arr = np.asarray(array_zyx)
    proc, src = transform.processed, transform.source
    if arr.shape != proc.shape_zyx:
        raise ValueError(f"label array shape {arr.shape} is not the processed grid's {proc.shape_zyx}")
    if arr.dtype.kind not in "iub":
        if not np.array_equal(arr, np.rint(arr)):
            raise ValueError("label array holds non-integer values")
        arr = np.rint(arr).astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"label array holds negative values (min {arr.min()})")
    values = label_values(arr)
    dtype = np.uint8 if not values or max(values) <= 255 else np.int32
    if interpolation == "nearest":  # only the labelled block (_block) is resampled, the rest is 0
        full = np.zeros(src.shape_zyx, dtype=dtype)
        block = _block(arr > 0, proc, src)
        if block is not None:
            src_slices, sub, dst_slices = block
            img = sub.apply(sitk.GetImageFromArray(np.ascontiguousarray(arr[src_slices], dtype=np.int32)))
            dst = src.sub_grid([s.start for s in dst_slices[::-1]], [s.stop - s.start for s in dst_slices[::-1]])
            out = _resample_onto(img, dst, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
            full[dst_slices] = sitk.GetArrayViewFromImage(out)
        result = sitk.GetImageFromArray(full)
    elif interpolation == "linear":
        result = sitk.GetImageFromArray(_resample_values(arr, proc, src, values).astype(dtype))
    else:
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    return src.apply(result)


# -------------------------------------------------------------------- checkpoints
SCANS_FILE = "scans.json"  # written by data_preprocessing.prepare next to the processed files
NORMALIZATION = {  # normalisation of the network input (docs/method.md#load-time-normalisation)
    "MR": "per-volume z-score (mean and std of the whole processed volume)",
    "CT": "global z-score with the training scans' mean and std (the checkpoint's 'normalizer')",
}


def training_spacings(data_dir: str | Path, scan_ids: Sequence[int]) -> dict[int, float]:
    """In-plane spacing (mm) of each processed training image, read from its header (no voxels read).

    Raises:
        DataFormatError: an image that cannot be read, or with different x and y spacings (names the file).
    """
    out: dict[int, float] = {}
    for sid in scan_ids:
        path = image_path(data_dir, sid)
        sx, sy = read_header(path).GetSpacing()[:2]
        if not np.isclose(sx, sy, rtol=1e-3):
            raise DataFormatError(f"{path}: in-plane spacing {sx:g} x {sy:g} mm is not square; re-run the "
                                  "preprocessing")
        out[int(sid)] = round(float(sx), 6)  # NIfTI stores float32: 1.6 reads as 1.60000002
    return out


def preprocessing_record(data_dir: str | Path, dataset_name: str, modality: Modality,
                         scan_ids: Sequence[int] = (), declared_spacing: float | None = None) -> dict[str, Any]:
    """The ``"preprocessing"`` entry of a training checkpoint: what :func:`prediction_settings` reads.

    The in-plane spacing is measured on the training scans' headers, the source of truth, and checked against what
    the folder says about itself: one physical scale for the whole dataset (docs/method.md#physical-scale).

    Args:
        data_dir: the processed folder; its ``scans.json`` (from ``data_preprocessing.prepare``) gives the settings.
        dataset_name, modality: the dataset; without ``scans.json`` the registry's equivalent settings
            (:meth:`PrepareSettings.registry`; the modality's defaults for a dataset the registry does not know),
            with the spacing measured on the scans (e.g. a phantom of another size).
        scan_ids: the training scans whose spacing is measured (none: the settings' own spacing is recorded).
        declared_spacing: the ``spacing_mm`` of the dataset's description file, when the folder states one.

    Returns:
        ``{"settings": PrepareSettings.to_dict(), "source": where they come from, "spacing_mm": the one in-plane
        spacing of the training data (the median under the SABS rule, whose scans each keep their own),
        "spacing_source": how it was found, "orientation": "LPS", "normalization": the load-time normalisation}``.

    Raises:
        DataFormatError: a ``scans.json`` that cannot be read or holds no valid ``settings``; a training scan whose
            spacing differs from the folder's recorded one, or scans of different spacings in a fixed-spacing folder
            (names the file and says what to re-run).
    """
    path = Path(data_dir) / SCANS_FILE
    if path.is_file():
        try:
            settings = PrepareSettings.from_dict(json.loads(path.read_text())["settings"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataFormatError(f"{path}: no valid 'settings' entry ({err})") from None
        source = str(path)
    else:
        settings = PrepareSettings.registry(dataset_name, modality)
        source = f"registry convention of {dataset_name}" if dataset_name in REGISTRY_GRIDS \
            else f"{modality} defaults (no {SCANS_FILE} in {data_dir})"
    measured = training_spacings(data_dir, scan_ids)
    values = sorted(set(measured.values()))
    if settings.spacing_rule == "sabs":
        spacing = float(np.median(list(measured.values()))) if measured else declared_spacing
        how = (f"median of the {len(measured)} training scans' in-plane spacings ({values[0]:g}-{values[-1]:g} mm: "
               "each keeps 1.75 x its own, the SABS rule)" if measured else "the dataset's typical spacing")
    else:
        if values and not np.allclose(values, values[0], rtol=1e-3):
            common = max(values, key=lambda v: sum(np.isclose(m, v, rtol=1e-3) for m in measured.values()))
            odd = next(sid for sid, v in measured.items() if not np.isclose(v, common, rtol=1e-3))
            raise DataFormatError(f"{image_path(data_dir, odd)}: in-plane spacing {measured[odd]:g} mm, other training "
                                  f"scans {common:g} mm: one dataset needs one physical scale; re-run the "
                                  "preprocessing with one --spacing")
        if values and path.is_file() and not np.isclose(values[0], settings.spacing, rtol=1e-3):
            raise DataFormatError(f"{path}: records spacing {settings.spacing:g} mm but the images are at "
                                  f"{values[0]:g} mm; re-run data_preprocessing.prepare")
        if values:
            settings = settings.with_spacing(values[0])
        spacing = settings.spacing
        how = f"every training scan is at {spacing:g} mm" if values else "the preprocessing settings"
    if declared_spacing is not None and settings.spacing_rule == "fixed" and values \
            and not np.isclose(declared_spacing, spacing, rtol=1e-3) and path.is_file():
        raise DataFormatError(f"{Path(data_dir)}: dataset.json5 says spacing_mm {declared_spacing:g} but the training "
                              f"scans are at {spacing:g} mm; re-run data_preprocessing.prepare")
    return {"settings": settings.to_dict(), "source": source, "spacing_mm": spacing, "spacing_source": how,
            "orientation": ORIENTATION, "normalization": NORMALIZATION[settings.modality]}


def prediction_settings(ckpt: dict[str, Any], fallback_spacing: float | None = None
                        ) -> tuple[PrepareSettings, str] | None:
    """The preprocessing ``predict.py`` applies to support and query alike: the checkpoint's settings with its one
    in-plane spacing (docs/method.md#physical-scale).

    Args:
        ckpt: a loaded checkpoint.
        fallback_spacing: the dataset's typical spacing (its description's ``spacing_mm``) for a checkpoint trained
            under the SABS rule that records no measured spacing.

    Returns:
        ``(settings with a fixed spacing, a sentence saying where the spacing comes from)``, or ``None`` when the
        checkpoint records no preprocessing (an original state dict: the command line must give it).

    Raises:
        ValueError: a malformed record, or a SABS-rule checkpoint without any spacing to use.
    """
    settings = preprocessing_from_checkpoint(ckpt)
    if settings is None:
        return None
    entry = ckpt.get("preprocessing") or {}
    recorded = entry.get("spacing_mm") if isinstance(entry, dict) else None
    if settings.spacing_rule == "fixed":
        return settings, f"{settings.spacing:g} mm, the checkpoint's training data"
    spacing = recorded if recorded is not None else fallback_spacing
    if spacing is None:
        raise ValueError("the checkpoint was trained under the SABS rule (each scan at 1.75 x its own spacing) and "
                         "records no typical spacing: pass --spacing")
    why = entry.get("spacing_source") if recorded is not None else "the dataset's typical spacing"
    return settings.with_spacing(spacing), f"{spacing:g} mm ({why})"


def preprocessing_from_checkpoint(ckpt: dict[str, Any]) -> PrepareSettings | None:
    """The preprocessing a checkpoint's training data went through.

    Args:
        ckpt: a loaded checkpoint dict. Project checkpoints carry ``"preprocessing"`` (``{"settings": ...}``, see
            training.py); older project checkpoints of a registry dataset (``config["dataset"]``, e.g. SABS) get the
            equivalent settings (:meth:`PrepareSettings.registry`); anything else (an own dataset without the entry,
            an original SSL-ALPNet state dict) gives None.

    Returns:
        The settings, or ``None`` when the checkpoint does not say (pass the preprocessing flags then).

    Raises:
        ValueError: a malformed ``"preprocessing"`` entry.
    """
    entry = ckpt.get("preprocessing") if isinstance(ckpt, dict) else None
    if entry is not None:
        if not isinstance(entry, dict) or "settings" not in entry:
            raise ValueError("checkpoint 'preprocessing' entry must be an object with 'settings'")
        return PrepareSettings.from_dict(entry["settings"])
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(config, dict) and isinstance(config.get("dataset"), str):
        from dataloaders.dataset_info import builtin_names, get_dataset_info

        known = {n: get_dataset_info(n) for n in builtin_names()}
        info = next((i for i in known.values() if config["dataset"] in (i.name, *i.aliases)), None)
        if info is not None:  # a registry dataset: its own pipeline's settings
            return PrepareSettings.registry(info.name, info.modality)
    return None
