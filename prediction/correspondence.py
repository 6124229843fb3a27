"""Image-only correspondence between an annotated SUPPORT scan and an unlabelled QUERY scan (own-scan path).

A few-shot segmenter needs, for every query slice, the support slice(s) to compare it with, the organ's z-range in the
query and an in-plane prior. With partial fields of view (a 40 mm slab, a chest-abdomen scan) the body's z-extent says
nothing about where an organ lies (docs/method.md#partial-fields-of-view), so the correspondence comes from the images.

Stages (default ``("z", "rigid", "affine", "demons")``; the choices were measured, see the report of this module):

1. ``"z"``: exhaustive search of the z offset. Both scans are resampled once into stacks of slices every 4 mm, 6 mm
   pixels, each slice centred on its own body centroid (the in-plane start from body centroids of
   docs/method.md#registration). For every offset the normalised correlation over the query body is pooled over all
   overlapping slice pairs and a few in-plane shifts; the correlations of all slice pairs are three matrix products,
   so an offset costs one diagonal sum (``MetricEvaluate`` per offset, as docs/method.md#registration suggests, took
   ~0.3 s per offset). Offsets whose overlap is below ``min(shorter field, max(30 mm, 0.9 * shorter field))`` are
   skipped: the shorter scan is assumed to lie (90 %) inside the longer one, which handles a query slab inside a whole
   support and a support slab inside a whole query, and keeps a slab from "hanging past" an edge. Patients of
   different size: the in-plane scale is taken from the body areas at the first offset found and the search is
   repeated at that scale (``scale_mode="body"``; it fixed a 3-slice error at the lung apex on real chest CT).
2. ``"rigid"``: ``sitk.Euler3DTransform`` from the search (``ImageRegistrationMethod``, regular step gradient descent,
   scales from physical shift, two-level pyramid on a ~3 mm block-averaged grid, random sampling with a fixed seed,
   fixed mask = query body where the support is defined).
3. ``"affine"``: ``sitk.AffineTransform`` from the rigid result and the search's in-plane scale.
   With ``z_from_search=True`` (default) both linear stages move in-plane only: the x/y rotations, the z translation
   and the affine's z row and column get optimiser weight 0 (``SetOptimizerWeights``). Letting them move z was
   measured worse (on real chest CT the rigid stage drifted 25-50 mm between patients; on the phantom the organ
   z-ranges got worse after every stage that could move z); a free affine on a slab also collapses the z scale
   (docs/method.md#registration).
4. ``"demons"``: ``FastSymmetricForcesDemonsRegistrationFilter`` on the coarse grid after the affine, on the overlap's
   bounding box (identity outside it); MR is histogram-matched first. Its 3D field may move each region in z by a
   few mm: the one stage allowed to change the slice matches locally (measured better than an in-plane-only field).
   Optional instead: ``"bspline"`` (``BSplineTransformInitializer`` + LBFGSB, as in the SimpleITK examples; slower
   and worse on the phantom).

The query is the FIXED image and the support the MOVING one: the transform maps query physical points to support
physical points, so a support label is carried onto the query by resampling it with that transform onto the query grid,
nearest neighbour (SimpleITK registration overview; docs/method.md#registration). Physical frames: origin 0, identity
direction, voxel ``(z, y, x)`` at ``(z * dz, y * dy, x * dx)`` mm; the origins of the two scans are never compared.

Where the ideas come from: metrics, optimisers, pyramids, optimiser weights, Demons and B-splines are SimpleITK's (the
``ImageRegistrationMethod`` documentation and the SimpleITK registration notebooks); the z-offset search, the locked z
scale, the body mask and the body-centroid start are the lessons measured on real CT in docs/method.md#registration;
the slice-pair matrix form of the search, the body-area scale and the in-plane-only linear stages were measured here.
SSL-ALPNet itself (Ouyang et al., ECCV 2020) uses no registration.

Work that depends on the support only (coarse grid, body mask, search stack, class ranges) is done once by
:func:`prepare_support` and kept, read-only, in a :class:`SupportAtlas` that :func:`register` only reads, so k queries
reuse it. Failed registrations: :meth:`Correspondence.likely_failed` (reliable for CT, weak for MR).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from evaluation.ep1_alp import class_z_range

MODALITIES = ("CT", "MR")
STAGES = ("z", "rigid", "affine", "demons", "bspline")
DEFAULT_STAGES = ("z", "rigid", "affine", "demons")
METRICS = ("correlation", "mattes", "meansquares")
SEARCH_FEATURES = ("intensity", "gradient", "both", "rank", "local")
# In-plane scales (query size / support size) tried by the z search: patients differ in body size.
DEFAULT_SEARCH_SCALES = (0.8, 0.87, 0.93, 1.0, 1.07, 1.15, 1.25)
# Default similarity of the z search per (support modality, query modality). CT-CT: normalised correlation (z-range
# accuracy on the CT phantom and two real chest CTs). MR-MR and across modalities: Mattes mutual information, which
# tolerates the changing content of partial overlaps: with mean squares in the z search, 20-slice MR phantom slabs
# lost 0.07 Dice against the whole scan and a 20-slice support kept 0.81 of the whole support's Dice (Mattes: +0.02,
# 0.93; docs/protocols.md "Whole-volume methods", python -m launch.own_scan_checks).
DEFAULT_SEARCH_METRIC = {("CT", "CT"): "correlation", ("MR", "MR"): "mattes", ("CT", "MR"): "mattes",
                         ("MR", "CT"): "mattes"}
# Default similarity of the rigid and affine stages (in-plane, once z is placed). MR-MR: mean squares of the coarse
# images, each scaled by its own 99th body percentile (_prepare): on the MR phantom's 5 folds the whole-volume
# segmentation gave mean Dice 64.0 % with it and 59.3 % with Mattes mutual information (docs/protocols.md).
DEFAULT_METRIC = {("CT", "CT"): "correlation", ("MR", "MR"): "meansquares", ("CT", "MR"): "mattes",
                  ("MR", "CT"): "mattes"}
# Linear-stage correlation below which a registration is likely wrong (Correspondence.likely_failed), measured.
FAILURE_SCORE = {"CT": 0.45, "MR": 0.2}
CT_BODY_THRESHOLD = 5.0  # processed CT intensity (0..255 from -125..275 HU): about -117 HU
MR_BODY_FRACTION = 0.05  # MR body threshold as a fraction of the 99th percentile of the positive voxels

ZYX = tuple[float, float, float]


# ----------------------------------------------------------------------------------------------- input checks
def _check_modality(modality: str) -> str:
    """Upper-case ``modality`` and check it is CT or MR (ValueError otherwise)."""
    if not isinstance(modality, str) or modality.upper() not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return modality.upper()


def _check_volume(image: np.ndarray, spacing_zyx: Sequence[float], what: str) -> tuple[np.ndarray, ZYX]:
    """Validate a (Z, H, W) image and its (dz, dy, dx) spacing in mm; return float32 image and float spacing."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"{what} image must be a 3D (Z, H, W) array, got shape {image.shape}")
    if min(image.shape) < 3:
        raise ValueError(f"{what} image needs at least 3 voxels along every axis, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise ValueError(f"{what} image must hold real numbers, got dtype {image.dtype}")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{what} spacing_zyx must be three positive finite mm values (dz, dy, dx), got {spacing_zyx}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError(f"{what} image holds NaN or infinite values")
    return image, spacing  # type: ignore[return-value]


def _check_label(label: np.ndarray, shape: tuple[int, ...], what: str = "support label") -> np.ndarray:
    """Validate an integer label volume of ``shape``; float labels must hold integral values."""
    label = np.asarray(label)
    if label.shape != tuple(shape):
        raise ValueError(f"{what} has shape {label.shape}, expected the support image's shape {tuple(shape)}")
    if label.dtype == bool:
        return label.astype(np.uint8)
    if np.issubdtype(label.dtype, np.integer):
        return label
    if np.issubdtype(label.dtype, np.floating) and np.array_equal(label, np.round(label)):
        return label.astype(np.int32)
    raise ValueError(f"{what} must hold integer class ids, got dtype {label.dtype}")


# ----------------------------------------------------------------------------------------------- coarse volumes
def _block_mean(image: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``factors`` blocks; z is padded by edge replication, y and x by zeros (background)."""
    fz, fy, fx = factors
    z, h, w = image.shape
    pad = ((0, -z % fz), (0, -h % fy), (0, -w % fx))
    if any(p[1] for p in pad):
        image = np.pad(image, ((0, pad[0][1]), (0, 0), (0, 0)), mode="edge")
        image = np.pad(image, ((0, 0), pad[1], pad[2]), mode="constant")
    zc, hc, wc = image.shape[0] // fz, image.shape[1] // fy, image.shape[2] // fx
    out = image.reshape(zc, fz, hc, fy, wc, fx).mean(axis=(1, 3, 5), dtype=np.float32)
    return out.astype(np.float32, copy=False)


_FILL_2D = np.zeros((3, 3, 3), bool)
_FILL_2D[1] = ndimage.generate_binary_structure(2, 1)


def body_mask(image: np.ndarray, modality: str, threshold: float | None = None) -> np.ndarray:
    """Body mask: largest connected region above a threshold, opened in-plane, holes filled slice by slice.

    A body mask removes the table and the air around the patient before registration (docs/method.md#registration).
    Lungs and bowel gas inside the body are kept by the slice-wise hole filling.

    Args:
        image: (Z, H, W) processed image (CT: 0..255 windowed HU; MR: positive, background near 0).
        modality: ``"CT"`` or ``"MR"``.
        threshold: intensity threshold; default CT 5 (about -117 HU), MR 5 % of the 99th percentile of the
            positive voxels.

    Returns:
        (Z, H, W) bool mask.

    Raises:
        ValueError: bad modality, or nothing above the threshold.
    """
    modality = _check_modality(modality)
    image = np.asarray(image, np.float32)
    if threshold is None:
        if modality == "CT":
            threshold = CT_BODY_THRESHOLD
        else:
            pos = image[image > 0]
            threshold = MR_BODY_FRACTION * float(np.percentile(pos, 99)) if pos.size else 0.0
    mask = image > threshold
    if not mask.any():
        raise ValueError(f"no voxel above the body threshold {threshold:g}: is this a processed {modality} image?")
    opened = ndimage.binary_opening(mask, structure=_FILL_2D)
    if opened.any():
        mask = opened
    lab, n = ndimage.label(mask)
    if n > 1:
        mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(mask, structure=_FILL_2D)


@dataclass
class _Volume:
    """One scan on the coarse registration grid plus its z-search stack (internal; built by :func:`_prepare`).

    Physical positions are in mm in the scan's own frame (origin 0 at voxel (0, 0, 0) of the input grid).

    Attributes:
        shape: input (Z, H, W).
        spacing_zyx: input spacing (dz, dy, dx), mm.
        modality: ``"CT"`` or ``"MR"``.
        coarse: (Zc, Hc, Wc) float32 block-mean image scaled to ~[0, 1] and zero outside the body.
        coarse_spacing_zyx: coarse spacing, mm.
        coarse_origin_zyx: physical position of coarse voxel (0, 0, 0), mm.
        body: (Zc, Hc, Wc) bool body mask on the coarse grid.
        centroids_yx: (Zc, 2) body centroid of every coarse slice (y, x) in mm; slices without body take the
            nearest slice's value.
        search: (n_scales, Ns, B * B) float32 search slices (z step ``search_step_mm``, ``B`` px of
            ``search_mm * scale``), each centred on its body centroid; the support has one scale (1).
        search_body: (n_scales, Ns, B * B) bool body mask of the search slices.
        search_scales: the in-plane scales of ``search``.
        search_z0: physical z of search slice 0, mm.
        search_centroids_yx: (Ns, 2) centroids of the search slices, mm.
        search_zi: (Ns,) fractional coarse slice index of every search slice.
        channels: the smoothed coarse feature images the search stacks are sampled from (one per feature).
    """

    shape: tuple[int, int, int]
    spacing_zyx: ZYX
    modality: str
    coarse: np.ndarray
    coarse_spacing_zyx: ZYX
    coarse_origin_zyx: ZYX
    body: np.ndarray
    centroids_yx: np.ndarray
    search: np.ndarray
    search_body: np.ndarray
    search_z0: float
    search_centroids_yx: np.ndarray
    search_scales: tuple[float, ...]
    search_zi: np.ndarray = field(repr=False)
    channels: tuple[np.ndarray, ...] = field(repr=False)

    def with_scales(self, settings: dict[str, object], scales: Sequence[float]) -> _Volume:
        """A copy whose search stacks are sampled at the in-plane ``scales`` (see :func:`_prepare`)."""
        search_mm = float(settings["search_mm"])  # type: ignore[arg-type]
        box = _search_box(settings)
        n_s = len(self.search_zi)
        body_f = self.body.astype(np.float32)
        stacks, bodies = [], []
        for scale in scales:
            u = (np.arange(box) - (box - 1) / 2) * search_mm * scale
            coords = np.empty((3, n_s, box, box), np.float32)
            coords[0] = self.search_zi[:, None, None]
            coords[1] = (((self.search_centroids_yx[:, 0:1] + u[None]) - self.coarse_origin_zyx[1])
                         / self.coarse_spacing_zyx[1])[:, :, None]
            coords[2] = (((self.search_centroids_yx[:, 1:2] + u[None]) - self.coarse_origin_zyx[2])
                         / self.coarse_spacing_zyx[2])[:, None, :]
            stacks.append(np.concatenate([ndimage.map_coordinates(ch, coords, order=1, cval=0.0).reshape(n_s, -1)
                                          for ch in self.channels], axis=1))
            sb = ndimage.map_coordinates(body_f, coords, order=1, cval=0.0).reshape(n_s, -1) > 0.5
            bodies.append(np.concatenate([sb] * len(self.channels), axis=1))
        return replace(self, search=np.stack(stacks).astype(np.float32), search_body=np.stack(bodies),
                       search_scales=tuple(float(x) for x in scales))

    def sitk_image(self) -> sitk.Image:
        """The coarse image as a float32 SimpleITK image (spacing, origin set; identity direction)."""
        return _to_sitk(self.coarse, self.coarse_spacing_zyx, self.coarse_origin_zyx)

    def coarse_z(self) -> np.ndarray:
        """(Zc,) physical z of the coarse slices, mm."""
        return self.coarse_origin_zyx[0] + self.coarse_spacing_zyx[0] * np.arange(self.coarse.shape[0])

    def z_extent(self) -> tuple[float, float]:
        """Physical z of the first and last input slice centres, mm."""
        return 0.0, (self.shape[0] - 1) * self.spacing_zyx[0]


def _to_sitk(array: np.ndarray, spacing_zyx: Sequence[float], origin_zyx: Sequence[float]) -> sitk.Image:
    """A (Z, H, W) numpy array as a SimpleITK image with (x, y, z) spacing and origin, identity direction."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    img.SetOrigin(tuple(float(o) for o in reversed(origin_zyx)))
    return img


def _fill_nearest(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace rows of ``values`` where ``valid`` is False by the nearest valid row (along axis 0)."""
    idx = np.flatnonzero(valid)
    nearest = idx[np.clip(np.searchsorted(idx, np.arange(len(valid))), 0, len(idx) - 1)]
    lower = idx[np.clip(np.searchsorted(idx, np.arange(len(valid))) - 1, 0, len(idx) - 1)]
    pos = np.arange(len(valid))
    nearest = np.where(np.abs(lower - pos) <= np.abs(nearest - pos), lower, nearest)
    return values[nearest]


def _search_box(settings: dict[str, object]) -> int:
    """Side of the z-search slices in search pixels."""
    return max(8, int(round(float(settings["search_box_mm"]) / float(settings["search_mm"]))))  # type: ignore


def _prepare(image: np.ndarray, spacing_zyx: ZYX, modality: str, settings: dict[str, object],
             scales: Sequence[float] = (1.0,)) -> _Volume:
    """Coarse grid, body mask, intensity scaling and z-search stacks of one scan (see :class:`_Volume`).

    ``settings`` holds ``coarse_mm``, ``search_mm``, ``search_step_mm``, ``search_box_mm``, ``search_feature``
    and ``body_threshold`` (see :func:`prepare_support`); ``scales``: in-plane scales of the search stacks (a
    stack at scale ``s`` samples ``search_mm * s`` pixels, i.e. shows the body ``1 / s`` times as large).
    """
    coarse_mm, search_mm = float(settings["coarse_mm"]), float(settings["search_mm"])  # type: ignore[arg-type]
    step = float(settings["search_step_mm"])  # type: ignore[arg-type]
    dz, dy, dx = spacing_zyx
    factors = (max(1, round(coarse_mm / dz)), max(1, round(coarse_mm / dy)), max(1, round(coarse_mm / dx)))
    coarse = _block_mean(image, factors)
    c_spacing = (dz * factors[0], dy * factors[1], dx * factors[2])
    c_origin = tuple((f - 1) / 2 * s for f, s in zip(factors, spacing_zyx))
    body = body_mask(coarse, modality, settings["body_threshold"])  # type: ignore[arg-type]
    if modality == "CT":
        scale = 255.0
    else:
        scale = float(np.percentile(coarse[body], 99)) or 1.0
    coarse = np.where(body, np.clip(coarse / scale, 0.0, 1.5), 0.0).astype(np.float32)

    # body centroid per coarse slice (mm), nearest-filled where a slice holds no body
    area = body.sum(axis=(1, 2)).astype(np.float64)
    yy = np.arange(body.shape[1]) * c_spacing[1] + c_origin[1]
    xx = np.arange(body.shape[2]) * c_spacing[2] + c_origin[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (body.sum(axis=2) * yy[None]).sum(axis=1) / area
        cx = (body.sum(axis=1) * xx[None]).sum(axis=1) / area
    centroids = _fill_nearest(np.stack([cy, cx], axis=1), area > 0)

    # z-search stack: slices every search_step_mm, centred on their body centroid, search_mm pixels
    zc = c_origin[0] + c_spacing[0] * np.arange(coarse.shape[0])
    n_s = int(math.floor((zc[-1] - zc[0]) / step + 1e-6)) + 1
    zs = zc[0] + step * np.arange(n_s)
    zi = (zs - zc[0]) / c_spacing[0]
    cen = np.stack([np.interp(zi, np.arange(len(zc)), centroids[:, k]) for k in (0, 1)], axis=1)
    sig = (0.0, max(0.5 * search_mm / c_spacing[1], 0.5), max(0.5 * search_mm / c_spacing[2], 0.5))
    channels = []
    feature = settings["search_feature"]
    if feature in ("intensity", "both"):
        channels.append(ndimage.gaussian_filter(coarse, sig))
    if feature in ("gradient", "both"):
        grad = np.hypot(ndimage.gaussian_filter(coarse, sig, order=(0, 1, 0)),
                        ndimage.gaussian_filter(coarse, sig, order=(0, 0, 1)))
        ref = float(np.percentile(grad[body], 99)) if body.any() else 1.0
        channels.append(grad / (ref if ref > 0 else 1.0))
    if feature == "rank":  # within-body quantile: invariant to any monotonic intensity mapping (gain, window)
        sm = ndimage.gaussian_filter(coarse, sig)
        vals = np.sort(sm[body])
        rank = np.zeros_like(sm)
        rank[body] = np.searchsorted(vals, sm[body]) / max(len(vals), 1)
        channels.append(rank)
    if feature == "local":  # divided by the 30 mm local mean inside the body: removes gain and smooth bias fields
        sm = ndimage.gaussian_filter(coarse, sig)
        wide = [0.0] + [30.0 / c for c in c_spacing[1:]]
        num = ndimage.gaussian_filter(sm * body, wide)
        den = ndimage.gaussian_filter(body.astype(np.float32), wide)
        with np.errstate(invalid="ignore", divide="ignore"):
            loc = np.where(body & (den > 0.05), sm / np.maximum(num / np.maximum(den, 1e-6), 1e-6), 0.0)
        channels.append(np.clip(loc, 0.0, 3.0).astype(np.float32))
    vol = _Volume(tuple(image.shape), spacing_zyx, modality, coarse, c_spacing, c_origin, body,  # type: ignore
                  centroids, np.zeros((0, n_s, 0), np.float32), np.zeros((0, n_s, 0), bool), float(zs[0]), cen, (),
                  zi, tuple(channels))
    return vol.with_scales(settings, scales)


# ----------------------------------------------------------------------------------------------- support atlas
@dataclass
class SupportAtlas:
    """Everything that depends on the support scan only, built once by :func:`prepare_support`.

    :func:`register` reads it and never modifies it, so one atlas serves any number of queries.

    Attributes:
        modality: ``"CT"`` or ``"MR"``.
        shape: support (Z, H, W).
        spacing_zyx: support spacing (dz, dy, dx), mm.
        volume: the coarse grid, body mask and z-search stack (internal).
        label: (Z, H, W) integer support label, or None.
        settings: the grid settings used (``coarse_mm``, ``search_mm``, ``search_step_mm``, ``search_box_mm``,
            ``search_feature``, ``search_scales``, ``body_threshold``); queries are prepared with the same ones.
        moving: the coarse support as a SimpleITK image, the moving image of every registration.
    """

    modality: str
    shape: tuple[int, int, int]
    spacing_zyx: ZYX
    volume: _Volume
    label: np.ndarray | None
    settings: dict[str, object]
    moving: sitk.Image = field(repr=False)


def prepare_support(image: np.ndarray, spacing_zyx: Sequence[float], label: np.ndarray | None = None,
                    modality: str = "CT", coarse_mm: float = 3.0, search_mm: float = 6.0,
                    search_step_mm: float = 4.0, search_box_mm: float = 480.0, search_feature: str = "intensity",
                    search_scales: Sequence[float] = DEFAULT_SEARCH_SCALES,
                    body_threshold: float | None = None) -> SupportAtlas:
    """Prepare a support scan once for any number of :func:`register` calls.

    Args:
        image: (Z, H, W) processed support image (axis 0 towards superior, rows posterior, columns to the left).
        spacing_zyx: (dz, dy, dx) in mm.
        label: optional (Z, H, W) integer label (0 = background), kept for :class:`Correspondence` methods.
        modality: ``"CT"`` (0..255 windowed HU) or ``"MR"``.
        coarse_mm: target spacing of the registration grid; the input is block-averaged by integer factors
            ``round(coarse_mm / spacing)`` per axis (3-4 mm keeps each stage at seconds: docs/method.md#registration).
        search_mm: in-plane pixel of the z-search stack.
        search_step_mm: z step of the z search (the offsets are multiples of it, refined to sub-step).
        search_box_mm: in-plane side of the z-search slices, centred on each slice's body centroid.
        search_feature: what the z search correlates: ``"intensity"`` (default, measured best), or the measured-worse
            alternatives ``"gradient"`` (in-plane gradient magnitude), ``"both"``, ``"rank"`` (within-body
            quantile) and ``"local"`` (divided by the 30 mm local mean), kept to reproduce the report.
        search_scales: in-plane scales tried by ``register(..., scale_mode="search")``.
        body_threshold: intensity threshold of the body mask (default per modality, see :func:`body_mask`).

    Returns:
        The :class:`SupportAtlas`.

    Raises:
        ValueError: bad shapes, spacing, modality, label or grid settings, or an image without body.
    """
    modality = _check_modality(modality)
    image, spacing = _check_volume(image, spacing_zyx, "support")
    for name, v in (("coarse_mm", coarse_mm), ("search_mm", search_mm), ("search_step_mm", search_step_mm),
                    ("search_box_mm", search_box_mm)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number of mm, got {v}")
    if search_feature not in SEARCH_FEATURES:
        raise ValueError(f"search_feature must be one of {SEARCH_FEATURES}, got {search_feature!r}")
    scales = tuple(float(x) for x in search_scales)
    if not scales or not all(math.isfinite(x) and 0.5 <= x <= 2.0 for x in scales):
        raise ValueError(f"search_scales must be a non-empty list of in-plane scales in [0.5, 2], got {search_scales}")
    settings: dict[str, object] = {"coarse_mm": coarse_mm, "search_mm": search_mm, "search_step_mm": search_step_mm,
                                   "search_box_mm": search_box_mm, "search_feature": search_feature,
                                   "search_scales": scales, "body_threshold": body_threshold}
    volume = _prepare(image, spacing, modality, settings)
    for arr in (volume.coarse, volume.body, volume.centroids_yx, volume.search, volume.search_body,
                volume.search_centroids_yx, volume.search_zi, *volume.channels):
        arr.setflags(write=False)  # the atlas is shared by every query: nothing may write into it
    if label is not None:
        label = _check_label(label, image.shape).copy()
        label.setflags(write=False)
    return SupportAtlas(modality, tuple(image.shape), spacing, volume, label, settings,  # type: ignore[arg-type]
                        volume.sitk_image())


# ----------------------------------------------------------------------------------------------- z search
@dataclass
class ZCandidate:
    """One start found by the z search (a local maximum of its profile).

    Attributes:
        offset_mm: z offset, support z = query z + offset, refined to sub-step by a parabola, mm.
        translation_xyz: query-to-support translation (x, y, z) at that offset (body centroids + in-plane shift), mm.
        score: similarity at that offset (higher is better).
        overlap_mm: overlap of the two fields of view there, mm.
        scale: in-plane size of the query relative to the support at that offset (query mm per support mm).
    """

    offset_mm: float
    translation_xyz: tuple[float, float, float]
    score: float
    overlap_mm: float
    scale: float = 1.0


@dataclass
class ZSearch:
    """Result of the z-offset search.

    Attributes:
        offsets_mm: (N,) z offsets evaluated (support z = query z + offset), mm.
        scores: (N,) best similarity over the in-plane shifts at each offset (higher is better; -inf where the
            overlap was below the minimum).
        candidates: local maxima of ``scores``, best first, at least ``separation_mm`` apart.
        runner_up: score of the best other local maximum at least ``separation_mm`` away (-inf if none): a
            runner-up close to the best score flags an ambiguous match (see the module report for how well it
            predicts a miss).
    """

    offsets_mm: np.ndarray
    scores: np.ndarray
    candidates: list[ZCandidate]
    runner_up: float

    @property
    def best(self) -> ZCandidate:
        """The best candidate."""
        return self.candidates[0]


def _shifted(stack: np.ndarray, box: int, sy: int, sx: int) -> np.ndarray:
    """Search slices (N, box * box) with their content moved by (sy, sx) pixels, zero-filled."""
    img = stack.reshape(-1, box, box)
    out = np.zeros_like(img)
    ys, yd = (slice(0, box - sy), slice(sy, box)) if sy >= 0 else (slice(-sy, box), slice(0, box + sy))
    xs, xd = (slice(0, box - sx), slice(sx, box)) if sx >= 0 else (slice(-sx, box), slice(0, box + sx))
    out[:, yd, xd] = img[:, ys, xs]
    return out.reshape(stack.shape)


def _diag_sums(m: np.ndarray, d_index: np.ndarray, n_d: int) -> np.ndarray:
    """Sums of ``m`` (Nq, Ns) along every diagonal j - i = d, indexed by ``d + Nq - 1``."""
    return np.bincount(d_index, weights=m.ravel(), minlength=n_d)


def _mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Mutual information of two samples already quantised to ``0..bins-1``."""
    joint = np.bincount(a * bins + b, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa[:, None] * pb[None, :])[nz])).sum())


def z_search(atlas: SupportAtlas, query: _Volume, metric: str = "correlation", min_overlap_mm: float = 30.0,
             min_overlap_frac: float = 0.9, shift_px: int = 1, max_candidates: int = 3,
             separation_mm: float = 20.0) -> ZSearch:
    """Exhaustive search of the query-to-support z offset on the search stacks.

    For every offset ``d`` (support search slice ``j = i + d`` for query search slice ``i``), every in-plane scale of
    the query's stacks and every in-plane shift of up to ``shift_px`` search pixels, the similarity of all overlapping
    slice pairs is pooled over the query's body: normalised correlation and mean squares from diagonal sums of three
    matrix products, Mattes-like mutual information (32 bins, no shift search) from a joint histogram per offset. The
    best (scale, shift) is kept per offset. Offsets whose overlap is below
    ``min(shorter field of view, max(min_overlap_mm, min_overlap_frac * shorter field of view))`` are skipped: this
    keeps a slab from "hanging past" the other scan's edge (docs/method.md#registration), and allows both a query
    shorter than the support and a support shorter than the query.

    Args:
        atlas: the prepared support.
        query: the prepared query (same grid settings).
        metric: ``"correlation"``, ``"meansquares"`` or ``"mattes"``.
        min_overlap_mm: absolute part of the minimum overlap, mm.
        min_overlap_frac: relative part (of the shorter field of view).
        shift_px: in-plane shifts searched, in search pixels (``search_mm``) either way.
        max_candidates: local maxima of the profile kept as starts.
        separation_mm: minimum distance between two kept maxima, mm.

    Returns:
        The :class:`ZSearch`.

    Raises:
        ValueError: unknown metric or bad overlap settings.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not (min_overlap_mm >= 0 and 0 <= min_overlap_frac <= 1):
        raise ValueError(f"need min_overlap_mm >= 0 and 0 <= min_overlap_frac <= 1, got {min_overlap_mm}, "
                         f"{min_overlap_frac}")
    sup = atlas.volume
    step = float(atlas.settings["search_step_mm"])  # type: ignore[arg-type]
    search_mm = float(atlas.settings["search_mm"])  # type: ignore[arg-type]
    box = _search_box(atlas.settings)
    s = sup.search[0]
    n_q, n_s = query.search.shape[1], s.shape[0]
    shorter = min(n_q, n_s)
    need_mm = min((shorter - 1) * step, max(min_overlap_mm, min_overlap_frac * (shorter - 1) * step))
    min_pairs = max(1, int(math.ceil(need_mm / step - 1e-6)) + 1)
    d_index = (np.arange(n_s)[None, :] - np.arange(n_q)[:, None] + n_q - 1).ravel()
    n_d = n_q + n_s - 1
    ones = np.ones((n_q, n_s))
    pairs = _diag_sums(ones, d_index, n_d)
    best = np.full(n_d, -np.inf)
    best_arg = np.zeros((n_d, 3), int)  # (scale index, shift y, shift x) of the best score per offset
    valid = pairs >= min_pairs
    for si in range(len(query.search_scales)):
        qm = query.search_body[si].astype(np.float32)
        # one constant off both stacks: correlation and mean squares are unchanged, float32 cancellation is reduced
        centre = float((query.search[si] * qm).sum() / max(qm.sum(), 1.0))
        q = query.search[si] - np.float32(centre)
        n_i = _diag_sums(qm.sum(1, dtype=np.float64)[:, None] * ones, d_index, n_d)
        ok = valid & (n_i > 0)
        if metric == "mattes":
            bins = 32
            qb = np.clip((query.search[si] / max(float(query.search[si].max()), 1e-6) * bins).astype(np.int64), 0,
                         bins - 1)
            sb = np.clip((s / max(float(s.max()), 1e-6) * bins).astype(np.int64), 0, bins - 1)
            score = np.full(n_d, -np.inf)
            for k in np.flatnonzero(ok):
                d = k - (n_q - 1)
                i0, i1 = max(0, -d), min(n_q, n_s - d)
                m = qm[i0:i1] > 0
                score[k] = _mutual_information(qb[i0:i1][m], sb[i0 + d:i1 + d][m], bins)
            better = score > best
            best = np.where(better, score, best)
            best_arg[better] = (si, 0, 0)
            continue
        qq = q * qm
        sq_i = _diag_sums(qq.sum(1, dtype=np.float64)[:, None] * ones, d_index, n_d)
        sqq_i = _diag_sums((qq * q).sum(1, dtype=np.float64)[:, None] * ones, d_index, n_d)
        for sy in range(-shift_px, shift_px + 1):
            for sx in range(-shift_px, shift_px + 1):
                ss = _shifted(s, box, sy, sx) - np.float32(centre)
                # einsum, not BLAS: OpenBLAS threads stall for seconds when another process holds a core
                s_sum = _diag_sums(np.einsum("ip,jp->ij", qm, ss), d_index, n_d)
                ss_sum = _diag_sums(np.einsum("ip,jp->ij", qm, ss * ss), d_index, n_d)
                qs_sum = _diag_sums(np.einsum("ip,jp->ij", qq, ss), d_index, n_d)
                with np.errstate(invalid="ignore", divide="ignore"):
                    if metric == "correlation":
                        cov = qs_sum - sq_i * s_sum / n_i
                        var = (sqq_i - sq_i ** 2 / n_i) * (ss_sum - s_sum ** 2 / n_i)
                        score = np.where(var > 0, cov / np.sqrt(np.maximum(var, 1e-30)), -np.inf)
                    else:
                        score = -(sqq_i - 2 * qs_sum + ss_sum) / n_i
                score = np.where(ok, score, -np.inf)
                better = score > best
                best = np.where(better, score, best)
                best_arg[better] = (si, sy, sx)
    if not np.isfinite(best).any():
        raise ValueError("z search: no offset gives a usable overlap (are both scans mostly empty?)")
    offsets = sup.search_z0 - query.search_z0 + (np.arange(n_d) - (n_q - 1)) * step

    def candidate(k: int) -> ZCandidate:
        frac = 0.0
        if 0 < k < n_d - 1 and np.isfinite(best[k - 1]) and np.isfinite(best[k + 1]):
            den = best[k - 1] - 2 * best[k] + best[k + 1]
            if den < 0:
                frac = float(np.clip(0.5 * (best[k - 1] - best[k + 1]) / den, -0.5, 0.5))
        d = k - (n_q - 1)
        offset = float(offsets[k] + frac * step)
        i0, i1 = max(0, -d), min(n_q, n_s - d)
        dyx = (sup.search_centroids_yx[i0 + d:i1 + d] - query.search_centroids_yx[i0:i1]).mean(axis=0)
        si, sy, sx = best_arg[k]
        t_y, t_x = dyx[0] - sy * search_mm, dyx[1] - sx * search_mm
        return ZCandidate(offset, (float(t_x), float(t_y), offset), float(best[k]), float((i1 - i0 - 1) * step),
                          query.search_scales[si])

    fin = np.isfinite(best)
    left = np.concatenate([[-np.inf], best[:-1]])
    right = np.concatenate([best[1:], [-np.inf]])
    peaks = np.flatnonzero(fin & (best >= left) & (best >= right))
    peaks = peaks[np.argsort(-best[peaks], kind="stable")]
    chosen: list[int] = []
    for k in peaks:
        if all(abs(offsets[k] - offsets[j]) >= separation_mm for j in chosen):
            chosen.append(int(k))
        if len(chosen) == max_candidates:
            break
    k0 = chosen[0]
    rivals = [k for k in peaks if abs(offsets[k] - offsets[k0]) >= separation_mm]
    runner = float(best[rivals[0]]) if rivals else -np.inf
    return ZSearch(offsets, best, [candidate(k) for k in chosen], runner)


SCALE_MODES = ("none", "body", "search")


def _body_scale(atlas: SupportAtlas, query: _Volume, offset_mm: float) -> float:
    """In-plane size of the query relative to the support from the body areas of the overlapping search slices.

    Uses the scale-1 stacks: ``sqrt(median(area_query / area_support))`` over the slice pairs at ``offset_mm``,
    clipped to [0.75, 1.33].
    """
    sup = atlas.volume
    step = float(atlas.settings["search_step_mm"])  # type: ignore[arg-type]
    p = query.search_body.shape[2] // len(query.channels)
    aq = query.search_body[query.search_scales.index(1.0), :, :p].sum(axis=1).astype(np.float64)
    as_ = sup.search_body[0, :, :p].sum(axis=1).astype(np.float64)
    d = int(round((offset_mm - (sup.search_z0 - query.search_z0)) / step))
    i0, i1 = max(0, -d), min(len(aq), len(as_) - d)
    q, s = aq[i0:i1], as_[i0 + d:i1 + d]
    ok = (q > 0) & (s > 0)
    if not ok.any():
        return 1.0
    return float(np.clip(math.sqrt(float(np.median(q[ok] / s[ok]))), 0.75, 1.33))


def search_z(atlas: SupportAtlas, query: _Volume, metric: str = "correlation", min_overlap_mm: float = 30.0,
             min_overlap_frac: float = 0.9, shift_px: int = 1, max_candidates: int = 1,
             scale_mode: str = "body") -> ZSearch:
    """The z search with the query's in-plane size handled by ``scale_mode``.

    ``"none"``: scale 1 only. ``"body"``: a first search at scale 1, then the query/support size ratio from the
    body areas of the overlapping slices (:func:`_body_scale`) and, if it differs from 1 by more than 3 %, a second
    search with the query stack at that scale. ``"search"``: every scale of ``atlas.settings["search_scales"]`` is
    searched and the best (scale, shift, offset) kept.

    Args:
        atlas: the prepared support.
        query: the prepared query; must hold a scale-1 stack (``"none"``/``"body"``) or the settings' scales.
        metric, min_overlap_mm, min_overlap_frac, shift_px, max_candidates: see :func:`z_search`.
        scale_mode: ``"none"``, ``"body"`` or ``"search"``.

    Returns:
        The :class:`ZSearch` (its candidates carry the scale used).

    Raises:
        ValueError: unknown ``scale_mode`` (and see :func:`z_search`).
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if scale_mode == "search":
        return z_search(atlas, query, metric, min_overlap_mm, min_overlap_frac, shift_px, max_candidates)
    unit = query if query.search_scales == (1.0,) else query.with_scales(atlas.settings, (1.0,))
    first = z_search(atlas, unit, metric, min_overlap_mm, min_overlap_frac, shift_px, max_candidates)
    if scale_mode == "none":
        return first
    scale = _body_scale(atlas, unit, first.best.offset_mm)
    if abs(math.log(scale)) < math.log(1.03):
        return first
    return z_search(atlas, unit.with_scales(atlas.settings, (scale,)), metric, min_overlap_mm, min_overlap_frac,
                    shift_px, max_candidates)


# ----------------------------------------------------------------------------------------------- sitk stages
def _set_metric(reg: sitk.ImageRegistrationMethod, metric: str) -> None:
    """Set the SimpleITK metric named ``metric`` on ``reg``."""
    if metric == "correlation":
        reg.SetMetricAsCorrelation()
    elif metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    elif metric == "meansquares":
        reg.SetMetricAsMeanSquares()
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _map_z(transform: sitk.Transform, centroids_yx: np.ndarray, n_slices: int, dz_query: float,
           dz_support: float) -> np.ndarray:
    """(n_slices,) fractional support slice of each query slice's body centroid mapped through ``transform``."""
    return np.array([transform.TransformPoint((float(c[1]), float(c[0]), k * dz_query))[2]
                     for k, c in enumerate(centroids_yx)]) / dz_support


def _support_z_of(transform: sitk.Transform, query: _Volume, z_positions: np.ndarray) -> np.ndarray:
    """Support physical z of the query body centroid at each physical query z in ``z_positions`` (mm)."""
    zc = query.coarse_z()
    cy = np.interp(z_positions, zc, query.centroids_yx[:, 0])
    cx = np.interp(z_positions, zc, query.centroids_yx[:, 1])
    return np.array([transform.TransformPoint((float(x), float(y), float(z)))[2]
                     for x, y, z in zip(cx, cy, z_positions)])


def _overlap_mask(transform: sitk.Transform, atlas: SupportAtlas, query: _Volume, margin_px: int = 1) -> np.ndarray:
    """Query coarse body (dilated ``margin_px`` in-plane) on the coarse slices that map inside the support."""
    zs = _support_z_of(transform, query, query.coarse_z())
    lo, hi = atlas.volume.z_extent()
    inside = (zs >= lo - 1e-3) & (zs <= hi + 1e-3)
    body = query.body
    if margin_px > 0:
        body = ndimage.binary_dilation(body, structure=_FILL_2D, iterations=margin_px)
    return body & inside[:, None, None]


def _rotation_centre(transform: sitk.Transform, atlas: SupportAtlas, query: _Volume) -> tuple[float, float, float]:
    """Physical (x, y, z) centroid of the query body inside the overlap under ``transform`` (whole body if none)."""
    overlap = _overlap_mask(transform, atlas, query, 0)
    pts = np.argwhere(overlap if overlap.any() else query.body).mean(axis=0)
    zyx = [query.coarse_origin_zyx[a] + pts[a] * query.coarse_spacing_zyx[a] for a in range(3)]
    return float(zyx[2]), float(zyx[1]), float(zyx[0])


REVERT_TOLERANCE = 0.01  # a stage whose correlation falls more than this below the previous stage's is undone


def _accept(previous: float, value: float, stage: str, reverted: list[str]) -> bool:
    """Whether a stage's result (correlation ``value``) is kept; appends ``stage`` to ``reverted`` if not.

    An optimiser that diverged (seen once in ~10 runs with unseeded sampling: correlation 0.55 -> -0.08) must not
    replace a better earlier result.
    """
    if value >= previous - REVERT_TOLERANCE:
        return True
    reverted.append(stage)
    return False


def _rate(sampling: float, mask: np.ndarray, max_samples: int) -> float:
    """Sampling fraction: ``sampling``, lowered so that at most ``max_samples`` mask voxels are drawn."""
    return float(min(sampling, max_samples / max(1, int(mask.sum()))))


def _sampled_mask(mask: sitk.Image, fraction: float, seed: int) -> sitk.Image:
    """A seeded random ``fraction`` of the voxels of ``mask`` (uint8 image, same grid): the metric's sample, drawn
    with numpy's generator so that it depends on ``seed`` alone."""
    arr = sitk.GetArrayFromImage(mask).astype(bool)
    if fraction < 1.0:
        keep = np.random.default_rng(seed).random(arr.shape) < fraction
        arr &= keep
    out = sitk.GetImageFromArray(arr.astype(np.uint8))
    out.CopyInformation(mask)
    return out


def _mask_image(mask: np.ndarray, query: _Volume) -> sitk.Image:
    """A (Zc, Hc, Wc) bool mask on the query's coarse grid as a uint8 SimpleITK image (the fixed mask)."""
    return _to_sitk(mask.astype(np.uint8), query.coarse_spacing_zyx, query.coarse_origin_zyx)


def _run_linear(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, transform: sitk.Transform, metric: str,
                iterations: int, sampling: float, seed: int, threads: int | None,
                weights: Sequence[float] | None = None) -> float:
    """Optimise ``transform`` in place (two-level pyramid); return the final metric value."""
    reg = sitk.ImageRegistrationMethod()
    if threads is not None:
        reg.SetNumberOfThreads(threads)
    _set_metric(reg, metric)
    # The sampled voxels are drawn here, seeded, and the metric evaluates every voxel of that mask: ITK's RANDOM
    # strategy draws from a generator shared by the whole process, so repeated runs of one registration differed
    # (Mattes MI on the MR phantom: a query's mean Dice moved by 3 points between two identical runs).
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(_sampled_mask(mask, sampling, seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=0.01, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    if weights is not None:
        reg.SetOptimizerWeights(list(weights))
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return float(reg.GetMetricValue())


def _demons(fixed: sitk.Image, moving: sitk.Image, overlap: np.ndarray, transform: sitk.Transform,
            modality_pair: tuple[str, str], iterations: int, sigma_px: float, in_plane_only: bool,
            threads: int | None) -> sitk.Transform:
    """Fast symmetric-forces Demons on the coarse grid after ``transform``; returns the composite transform.

    Runs on the bounding box of the overlap (query body where the warped support is defined) plus 2 voxels; the
    displacement field is the identity outside that box (``DisplacementFieldTransform`` outside its buffer). MR (or
    mixed) pairs are histogram-matched first (``sitk.HistogramMatching``), as Demons assumes equal intensities.
    """
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, float("nan"),
                                                  sitk.sitkFloat32))
    inside = np.isfinite(warped) & overlap
    if not inside.any():
        return transform
    box = []
    for a in range(3):
        idx = np.flatnonzero(inside.any(axis=tuple(b for b in range(3) if b != a)))
        box.append(slice(max(0, int(idx[0]) - 2), min(inside.shape[a], int(idx[-1]) + 3)))
    sl = tuple(box)
    f = np.where(inside, sitk.GetArrayFromImage(fixed), 0.0)[sl].astype(np.float32)
    w = np.where(inside, np.nan_to_num(warped), 0.0)[sl].astype(np.float32)
    origin = fixed.TransformIndexToPhysicalPoint([box[2].start, box[1].start, box[0].start])
    images = []
    for arr in (f, w):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(fixed.GetSpacing())
        img.SetOrigin(origin)
        images.append(img)
    fi, wi = images
    if modality_pair != ("CT", "CT"):
        wi = sitk.HistogramMatching(wi, fi, numberOfHistogramLevels=64, numberOfMatchPoints=7,
                                    thresholdAtMeanIntensity=True)
    dem = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    if threads is not None:
        dem.SetNumberOfThreads(threads)
    dem.SetNumberOfIterations(iterations)
    dem.SetStandardDeviations(sigma_px)
    disp = sitk.GetArrayFromImage(dem.Execute(fi, wi))
    if in_plane_only:
        disp[..., 2] = 0.0
    field_img = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field_img.CopyInformation(fi)
    out = sitk.CompositeTransform(3)
    out.AddTransform(transform)
    out.AddTransform(sitk.DisplacementFieldTransform(field_img))
    return out


def _bspline(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, transform: sitk.Transform, metric: str,
             mesh_mm: float, iterations: int, sampling: float, seed: int, threads: int | None) -> sitk.Transform:
    """B-spline (LBFGSB) on top of ``transform``; returns the composite transform."""
    size_mm = [sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, int(round(s / mesh_mm))) for s in size_mm]
    bsp = sitk.BSplineTransformInitializer(fixed, mesh)
    reg = sitk.ImageRegistrationMethod()
    if threads is not None:
        reg.SetNumberOfThreads(threads)
    _set_metric(reg, metric)
    reg.SetMetricSamplingStrategy(reg.NONE)  # a seeded subset of the mask, as in _run_linear
    reg.SetMetricFixedMask(_sampled_mask(mask, sampling, seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * iterations)
    reg.SetMovingInitialTransform(transform)
    reg.SetInitialTransform(bsp, inPlace=True)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.Execute(fixed, moving)
    out = sitk.CompositeTransform(3)
    out.AddTransform(transform)
    out.AddTransform(bsp)
    return out


def _final_score(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                 query: _Volume) -> tuple[float, int]:
    """Normalised correlation of query and warped support over the query body where the support is defined.

    Returns:
        (correlation in [-1, 1], number of coarse voxels it was computed on).
    """
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, float("nan"),
                                                  sitk.sitkFloat32))
    body = ndimage.binary_dilation(query.body, structure=_FILL_2D)
    m = body & np.isfinite(warped)
    if m.sum() < 10:
        return -1.0, int(m.sum())
    a, b = query.coarse[m].astype(np.float64), warped[m].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return (float((a * b).sum() / den) if den > 0 else -1.0), int(m.sum())


# ----------------------------------------------------------------------------------------------- correspondence
@dataclass
class Correspondence:
    """Query-to-support correspondence found by :func:`register`.

    Coordinates: query slice ``k`` (0 = most inferior) at physical z ``k * dz_q``; support slice ``j`` at
    ``j * dz_s``; the transform maps query physical points (x, y, z) in mm to support physical points.

    Attributes:
        transform: SimpleITK transform, query physical (x, y, z) mm -> support physical mm.
        query_shape: (Zq, H, W).
        query_spacing_zyx: (dz, dy, dx) of the query, mm.
        support_shape: (Zs, H, W).
        support_spacing_zyx: (dz, dy, dx) of the support, mm.
        support_z: (Zq,) fractional support slice matched to each query slice (the query slice's body centroid
            mapped through ``transform``); NaN where it falls outside the support's field of view
            ([-0.5, Zs - 0.5] slices).
        support_z_raw: (Zq,) the same without the NaNs (extrapolated outside the support).
        score: normalised correlation of the query and the warped support after the last LINEAR stage (z search,
            rigid or affine), on the coarse grid over the query body where the support is defined, in [-1, 1]. The
            deformable stages are left out: Demons raises the correlation of wrong matches too (measured: 0.41-0.52
            for a chest CT against an abdomen), so only the linear score tells a failed registration (see
            :data:`FAILURE_SCORE`).
        overlap_mm: z extent of the query slices matched inside the support, mm.
        z_offset_mm: the z-search offset (support z = query z + offset at the start of the linear stages), mm.
        z_search_score: best z-search similarity (its own scale: 6 mm slices, centroid-aligned).
        z_search_runner_up: the best other local maximum of the z profile >= 20 mm away (-inf if none); a small
            ``z_search_score - z_search_runner_up`` (< 0.02) doubled the miss rate on the phantom CT.
        metric: similarity of the rigid and affine stages.
        search_metric: similarity of the z search.
        stages: stages run.
        modalities: (support, query) modality.
        z_scale_locked: whether the affine z row/column was frozen.
        stage_scores: final correlation after each stage.
        stage_seconds: wall time of each stage (``"prepare"`` = query preparation), s.
        query_body: (Zq, H, W) bool query body mask (coarse mask upsampled, nearest).
        query_centroids_yx: (Zq, 2) query body centroid (y, x) of every query slice, mm: the points whose mapping
            defines :attr:`support_z`.
        stage_transforms: the transform after each stage (for diagnostics, see :meth:`at_stage`); ``"z"`` holds
            the best z-search start (``"init"`` when the search was skipped).
        start_scores: (z offset of the start in mm, final correlation after the rigid stage) of every start.
        reverted: stages whose result was undone because they lowered the correlation by more than
            :data:`REVERT_TOLERANCE` (their :attr:`stage_transforms` entry then repeats the stage before).
        support_label: the atlas's label (or None), the default of the label methods.
    """

    transform: sitk.Transform
    query_shape: tuple[int, int, int]
    query_spacing_zyx: ZYX
    support_shape: tuple[int, int, int]
    support_spacing_zyx: ZYX
    support_z: np.ndarray
    support_z_raw: np.ndarray
    score: float
    overlap_mm: float
    z_offset_mm: float
    z_search_score: float
    z_search_runner_up: float
    metric: str
    search_metric: str
    stages: tuple[str, ...]
    modalities: tuple[str, str]
    z_scale_locked: bool
    stage_scores: dict[str, float]
    stage_seconds: dict[str, float]
    query_body: np.ndarray = field(repr=False)
    query_centroids_yx: np.ndarray = field(repr=False)
    stage_transforms: dict[str, sitk.Transform] = field(default_factory=dict, repr=False)
    start_scores: list[tuple[float, float]] = field(default_factory=list)
    reverted: tuple[str, ...] = ()
    support_label: np.ndarray | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def at_stage(self, stage: str) -> Correspondence:
        """The correspondence as it stood after ``stage`` (its transform, slice matches and score).

        Raises:
            ValueError: ``stage`` was not run.
        """
        if stage not in self.stage_transforms:
            raise ValueError(f"stage {stage!r} was not run (ran: {list(self.stage_transforms)})")
        tf = self.stage_transforms[stage]
        raw = _map_z(tf, self.query_centroids_yx, self.query_shape[0], self.query_spacing_zyx[0],
                     self.support_spacing_zyx[0])
        inside = (raw >= -0.5) & (raw <= self.support_shape[0] - 0.5)
        keep = self.stages[:self.stages.index(stage) + 1] if stage in self.stages else ()
        names = list(self.stage_scores)
        upto = {k: self.stage_scores[k] for k in names[:names.index(stage) + 1]}
        return replace(self, transform=tf, support_z=np.where(inside, raw, np.nan), support_z_raw=raw,
                       score=_linear_score(upto), overlap_mm=float(inside.sum() * self.query_spacing_zyx[0]),
                       stages=keep, _cache={})

    # -------------------------------------------------------------- slices
    def likely_failed(self) -> bool:
        """True when :attr:`score` is below :data:`FAILURE_SCORE` for the modality pair (query's modality if mixed).

        Measured separation (module report): CT is usable (correct cross-patient 0.50-0.64 on real chest CT,
        ~0.6 on the phantom; wrong anatomy, reversed z or noise 0.32-0.42, but a z-reversed or left-right flipped
        phantom 0.53-0.56, and near misses of a few slices score like correct ones). MR is
        weak: correct phantom MR pairs score 0.3-0.36, like some wrong ones; only gross failures (noise, a head
        against an abdomen) fall below the MR threshold.
        """
        key = self.modalities[0] if self.modalities[0] == self.modalities[1] else "MR"
        return self.score < FAILURE_SCORE[key]

    def support_slice(self, query_slice: int) -> float:
        """Fractional support slice matched to query slice ``query_slice`` (NaN outside the support's field).

        Raises:
            ValueError: ``query_slice`` outside ``0..Zq-1``.
        """
        if not 0 <= int(query_slice) < self.query_shape[0]:
            raise ValueError(f"query slice {query_slice} outside 0..{self.query_shape[0] - 1}")
        return float(self.support_z[int(query_slice)])

    def nearest_support_slice(self, query_slice: int) -> int | None:
        """Nearest whole support slice to query slice ``query_slice``, or None outside the support's field."""
        z = self.support_slice(query_slice)
        return None if math.isnan(z) else int(np.clip(round(z), 0, self.support_shape[0] - 1))

    # -------------------------------------------------------------- labels
    def _label(self, support_label: np.ndarray | None) -> np.ndarray:
        if support_label is None:
            if self.support_label is None:
                raise ValueError("no support label: pass one, or give prepare_support(label=...)")
            support_label = self.support_label
        return _check_label(support_label, self.support_shape)

    def warp_label(self, support_label: np.ndarray | None = None) -> np.ndarray:
        """Carry a support label onto the query grid (nearest neighbour through :attr:`transform`).

        The last result is cached (keyed by the label's content), so per-class calls warp once.

        Args:
            support_label: (Zs, H, W) integer label; default the atlas's.

        Returns:
            (Zq, H, W) label of the same integer dtype; 0 where the query maps outside the support.

        Raises:
            ValueError: no label, wrong shape or non-integer values.
        """
        label = self._label(support_label)
        key = (label.shape, str(label.dtype), zlib.crc32(np.ascontiguousarray(label).view(np.uint8)))
        if self._cache.get("key") == key:
            return self._cache["warped"].copy()
        src = label.astype(np.int32, copy=False)
        img = _to_sitk(src, self.support_spacing_zyx, (0.0, 0.0, 0.0))
        zq, h, w = self.query_shape
        out = sitk.Resample(img, [w, h, zq], self.transform, sitk.sitkNearestNeighbor, (0.0, 0.0, 0.0),
                            tuple(reversed(self.query_spacing_zyx)), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), 0,
                            sitk.sitkInt32)
        warped = sitk.GetArrayFromImage(out).astype(label.dtype)
        self._cache.update(key=key, warped=warped)
        return warped.copy()

    def _class_label(self, support_label: np.ndarray | None, class_id: int,
                     *margins_mm: float) -> tuple[np.ndarray, bool, bool]:
        """The support label, and whether class ``class_id`` touches the support's first / last slice (its *open*
        ends), after checking the margins (ValueError: no label, class absent, negative margin)."""
        for value in margins_mm:
            if value < 0:
                raise ValueError(f"margins must be >= 0 mm, got {value}")
        label = self._label(support_label)
        ends = class_z_range(label, class_id)
        if ends is None:
            raise ValueError(f"class {class_id} is absent from the support label")
        return label, ends[0] == 0, ends[1] == self.support_shape[0] - 1

    def class_z_range(self, support_label: np.ndarray | None, class_id: int,
                      margin_mm: float) -> tuple[int, int, bool, bool]:
        """Query slice range of class ``class_id`` carried from the support, widened by ``margin_mm``.

        An end is *open* when the support's organ touches that end of the support's field of view (the organ may
        continue beyond it): that side is then not limited and the query's end is returned (0 or Zq - 1).

        Args:
            support_label: (Zs, H, W) integer label, or None for the atlas's.
            class_id: label id > 0 present in the support label.
            margin_mm: widening of each closed end, mm (converted with the query's dz, rounded up).

        Returns:
            ``(lo, hi, open_lo, open_hi)`` query slices, inclusive; ``lo > hi`` when the class maps entirely
            outside the query (neither end open).

        Raises:
            ValueError: no label, class absent from it, negative margin.
        """
        label, open_lo, open_hi = self._class_label(support_label, class_id, margin_mm)
        warped = self.warp_label(label)
        zs = np.flatnonzero((warped == class_id).any(axis=(1, 2)))
        zq = self.query_shape[0]
        m = int(math.ceil(margin_mm / self.query_spacing_zyx[0] - 1e-9))
        if zs.size == 0:
            lo, hi = (0 if open_lo else zq), (zq - 1 if open_hi else -1)
            if open_lo and not open_hi:
                hi = self._last_below_support()
            if open_hi and not open_lo:
                lo = self._first_above_support()
            return (lo, hi, open_lo, open_hi) if lo <= hi else (0, -1, open_lo, open_hi)
        lo = 0 if open_lo else max(0, int(zs[0]) - m)
        hi = zq - 1 if open_hi else min(zq - 1, int(zs[-1]) + m)
        return lo, hi, open_lo, open_hi

    def _last_below_support(self) -> int:
        below = np.flatnonzero(self.support_z_raw < -0.5)
        return int(below.max()) if below.size else -1

    def _first_above_support(self) -> int:
        above = np.flatnonzero(self.support_z_raw > self.support_shape[0] - 0.5)
        return int(above.min()) if above.size else self.query_shape[0]

    def prior(self, support_label: np.ndarray | None, class_id: int, margin_mm: float,
              inplane_margin_mm: float) -> np.ndarray:
        """Where the class may lie: the warped class mask dilated by ``inplane_margin_mm`` in-plane and
        ``margin_mm`` along z (:func:`_dilate_mm`; registration errs differently in-plane and along z, and the tighter
        in-plane margin measured better: docs/protocols.md "Whole-volume methods").

        Query slices beyond an *open* end of the support's field of view (see :meth:`class_z_range`) take the
        warped mask of the nearest slice inside the support before dilation, so the prior continues the organ.

        Args:
            support_label: (Zs, H, W) integer label, or None for the atlas's.
            class_id: label id > 0 present in the support label.
            margin_mm: dilation along z, mm (whole query slices within it).
            inplane_margin_mm: dilation radius in-plane, mm (a disc in mm with the query's pixel spacing).

        Returns:
            (Zq, H, W) bool.

        Raises:
            ValueError: no label, class absent from it, negative margin.
        """
        label, open_lo, open_hi = self._class_label(support_label, class_id, margin_mm, inplane_margin_mm)
        mask = self.warp_label(label) == class_id
        inside = np.flatnonzero(np.isfinite(self.support_z))
        if inside.size and mask.any():
            if open_lo and inside[0] > 0:
                mask[:inside[0]] = mask[inside[0]]
            if open_hi and inside[-1] < self.query_shape[0] - 1:
                mask[inside[-1] + 1:] = mask[inside[-1]]
        return _dilate_mm(mask, self.query_spacing_zyx, margin_mm, inplane_margin_mm)


def _linear_score(scores: dict[str, float]) -> float:
    """The score of the last linear stage among ``scores`` (affine, else rigid, else the z search / start)."""
    for name in ("affine", "rigid", "z", "init"):
        if name in scores:
            return scores[name]
    raise ValueError(f"no linear stage among {list(scores)}")


def _dilate_mm(mask: np.ndarray, spacing_zyx: Sequence[float], z_margin_mm: float,
               inplane_margin_mm: float) -> np.ndarray:
    """Dilate a (Z, H, W) bool ``mask``: every slice by a disc of ``inplane_margin_mm`` (pixels whose centre lies
    within that distance, with the (dy, dx) spacing), then along z by ``floor(z_margin_mm / dz)`` slices either way.

    Returns:
        (Z, H, W) bool; the mask itself when it is empty or both margins are 0.
    """
    if not mask.any() or (z_margin_mm == 0 and inplane_margin_mm == 0):
        return mask
    dz, dy, dx = spacing_zyx
    ry, rx = int(inplane_margin_mm // dy), int(inplane_margin_mm // dx)
    yy, xx = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disc = (yy * dy) ** 2 + (xx * dx) ** 2 <= inplane_margin_mm ** 2
    out = np.zeros_like(mask)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        out[z] = ndimage.binary_dilation(mask[z], structure=disc)
    nz = int(z_margin_mm // dz)
    if nz:
        out = ndimage.maximum_filter1d(out.astype(np.uint8), size=2 * nz + 1, axis=0).astype(bool)
    return out


# ----------------------------------------------------------------------------------------------- register
def register(atlas: SupportAtlas, query_image: np.ndarray, query_spacing_zyx: Sequence[float],
             modality: str | None = None, stages: Sequence[str] = DEFAULT_STAGES, metric: str | None = None,
             search_metric: str | None = None,
             z_from_search: bool = True, lock_z_scale: bool = True, min_overlap_mm: float = 30.0,
             min_overlap_frac: float = 0.9, shift_px: int = 1, iterations: int = 60, sampling: float = 0.1,
             demons_iterations: int = 40, demons_sigma_px: float = 1.5, demons_in_plane_only: bool = False,
             bspline_mesh_mm: float = 60.0, n_starts: int = 1, scale_mode: str = "body", max_samples: int = 40000,
             seed: int = 0, threads: int | None = None) -> Correspondence:
    """Register a query scan to a prepared support (query fixed, support moving).

    Args:
        atlas: from :func:`prepare_support` (read only).
        query_image: (Zq, H, W) processed query image (same axis convention as the support; H, W may differ).
        query_spacing_zyx: (dz, dy, dx) of the query, mm.
        modality: ``"CT"`` or ``"MR"`` for the query; default the atlas's.
        stages: ordered subset of ``("z", "rigid", "affine")`` plus at most one of ``"demons"`` / ``"bspline"``
            last; default :data:`DEFAULT_STAGES`. Without ``"z"`` the start is the body-centroid translation with the
            two fields' z centres aligned (``CenteredTransformInitializer``-like; wrong for partial fields of view).
        metric: ``"correlation"``, ``"mattes"`` or ``"meansquares"`` for the rigid and affine stages; default
            :data:`DEFAULT_METRIC` of the modality pair.
        search_metric: the same choice for the z search; default :data:`DEFAULT_SEARCH_METRIC` of the modality pair.
        z_from_search: the rigid and affine stages move in-plane only: rotations about x and y, the z translation
            and the affine's z row and column get optimiser weight 0, so every query slice keeps the support z the
            search gave it (measured better than letting the linear stages move z, see the module's report).
        lock_z_scale: (with ``z_from_search=False``) freeze the affine's z row and column, so z keeps the rigid
            stage's scale (docs/method.md#registration: a free affine on a slab collapses the z scale).
        min_overlap_mm: z search: absolute minimum overlap, mm (see :func:`z_search`).
        min_overlap_frac: z search: minimum overlap as a fraction of the shorter field of view.
        shift_px: z search: in-plane shifts, in search pixels either way.
        iterations: optimiser iterations per pyramid level of the rigid and affine stages.
        sampling: fraction of the fixed-mask voxels sampled per iteration (random, seeded).
        max_samples: cap on the samples per iteration (the fraction is lowered for large overlaps), so the cost
            of the linear stages does not grow with the query's size.
        demons_iterations: iterations of the Demons stage.
        demons_sigma_px: Gaussian smoothing of the Demons field, coarse voxels.
        demons_in_plane_only: zero the z component of the Demons field (measured worse: the 3D field corrected
            the organ ends and the matched slices of slabs by 0.1-1.4 slices on the phantom and real chest CT).
        bspline_mesh_mm: B-spline control-point spacing, mm.
        n_starts: z-search candidates (local maxima of its profile, >= 20 mm apart) each refined by the rigid
            stage; the one with the best final correlation is kept (1: the best z-search offset only). Measured:
            no gain on the phantom, and on real chest CT the correlation picked wrong starts (7-11 slices off).
        scale_mode: how the z search handles patients of different in-plane size (see :func:`search_z`); the
            scale found also starts the affine stage.
        seed: seed (>= 0) of the metric sampling; results are reproducible for a given seed. SimpleITK reads a seed
            of 0 as "use the wall clock", so ``seed + 1`` is passed to it.
        threads: SimpleITK threads of the registration filters; None: SimpleITK's global default.

    Returns:
        The :class:`Correspondence`.

    Raises:
        ValueError: bad image, spacing, modality, stages, metric or numeric setting.
    """
    t_start = time.perf_counter()
    for name, value in (("iterations", iterations), ("demons_iterations", demons_iterations), ("n_starts", n_starts),
                        ("max_samples", max_samples)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if int(shift_px) != shift_px or shift_px < 0:
        raise ValueError(f"shift_px must be a non-negative integer, got {shift_px}")
    if threads is not None and (int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be None or a positive integer, got {threads}")
    q_mod = _check_modality(modality if modality is not None else atlas.modality)
    image, spacing = _check_volume(query_image, query_spacing_zyx, "query")
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty ordered subset of {STAGES}, got {stages}")
    order = [STAGES.index(s) for s in stages]
    if order != sorted(order) or ("demons" in stages and "bspline" in stages):
        raise ValueError(f"stages must follow the order {STAGES[:3]} and end with at most one of demons/bspline, "
                         f"got {stages}")
    metric = metric if metric is not None else DEFAULT_METRIC[(atlas.modality, q_mod)]
    search_metric = search_metric if search_metric is not None else DEFAULT_SEARCH_METRIC[(atlas.modality, q_mod)]
    for name, value in (("metric", metric), ("search_metric", search_metric)):
        if value not in METRICS:
            raise ValueError(f"{name} must be one of {METRICS}, got {value!r}")
    if not 0 < sampling <= 1:
        raise ValueError(f"sampling must be in (0, 1], got {sampling}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    scales = atlas.settings["search_scales"] if scale_mode == "search" else (1.0,)
    query = _prepare(image, spacing, q_mod, atlas.settings, scales)  # type: ignore[arg-type]
    times: dict[str, float] = {"prepare": time.perf_counter() - t_start}
    scores: dict[str, float] = {}
    fixed, moving = query.sitk_image(), atlas.moving

    t0 = time.perf_counter()
    if "z" in stages:
        zs = search_z(atlas, query, search_metric, min_overlap_mm, min_overlap_frac, shift_px, max(1, n_starts),
                      scale_mode)
        starts = [(c.translation_xyz, c.scale) for c in zs.candidates]
        z_offset, zs_score, zs_runner = zs.best.offset_mm, zs.best.score, zs.runner_up
    else:
        sup_mid = 0.5 * sum(atlas.volume.z_extent())
        q_mid = 0.5 * sum(query.z_extent())
        cq = query.centroids_yx.mean(axis=0)
        cs = atlas.volume.centroids_yx.mean(axis=0)
        z_offset = sup_mid - q_mid
        starts = [((float(cs[1] - cq[1]), float(cs[0] - cq[0]), z_offset), 1.0)]
        zs_score, zs_runner = float("nan"), float("nan")
    current: sitk.Transform = sitk.TranslationTransform(3, starts[0][0])
    scale = starts[0][1]
    first = "z" if "z" in stages else "init"
    times[first] = time.perf_counter() - t0
    scores[first] = _final_score(fixed, moving, current, query)[0]
    transforms: dict[str, sitk.Transform] = {first: current}
    start_scores: list[tuple[float, float]] = []
    reverted: list[str] = []
    centre = _rotation_centre(current, atlas, query)

    def _advance(stage: str, candidate: sitk.Transform, value: float) -> None:
        """Keep ``candidate`` unless it lowered the correlation of the stage before (then keep that one)."""
        nonlocal current
        previous = scores[list(scores)[-1]]
        if _accept(previous, value, stage, reverted):
            current = candidate
        scores[stage] = value if stage not in reverted else previous
        transforms[stage] = current

    if "rigid" in stages:
        t0 = time.perf_counter()
        tried: list[tuple[float, sitk.Euler3DTransform, tuple[float, float, float], float, float]] = []
        for translation, t_scale in starts:  # multi-start: every z-search candidate, the best final correlation wins
            init = sitk.TranslationTransform(3, translation)
            c_centre = _rotation_centre(init, atlas, query)
            rigid = sitk.Euler3DTransform()
            rigid.SetCenter(c_centre)
            rigid.SetTranslation(translation)
            ov = _overlap_mask(init, atlas, query)
            _run_linear(fixed, moving, _mask_image(ov, query), rigid, metric, iterations,
                        _rate(sampling, ov, max_samples), seed, threads,
                        [0, 0, 1, 1, 1, 0] if z_from_search else None)
            tried.append((_final_score(fixed, moving, rigid, query)[0], rigid, c_centre, translation[2], t_scale))
        start_scores = [(t[3], t[0]) for t in tried]
        value, rigid, c_centre, c_offset, c_scale = max(tried, key=lambda t: t[0])
        if _accept(scores[first], value, "rigid", reverted):
            current, centre, z_offset, scale = rigid, c_centre, c_offset, c_scale
        scores["rigid"] = max(value, scores[first]) if "rigid" in reverted else value
        times["rigid"] = time.perf_counter() - t0
        transforms["rigid"] = current
    locked = False
    if "affine" in stages:
        t0 = time.perf_counter()
        aff = sitk.AffineTransform(3)
        aff.SetCenter(centre)
        # start from the rigid result and the z search's in-plane scale (query mm -> support mm: 1 / scale)
        rot = np.array(current.GetMatrix()).reshape(3, 3) if isinstance(current, sitk.Euler3DTransform) else np.eye(3)
        aff.SetMatrix(tuple((np.diag([1.0 / scale, 1.0 / scale, 1.0]) @ rot).ravel()))
        aff.SetTranslation(current.GetTranslation() if isinstance(current, sitk.Euler3DTransform) else starts[0][0])
        ov = _overlap_mask(current, atlas, query)
        locked = bool(lock_z_scale) or z_from_search
        weights = [1.0] * 12
        if locked:
            for i in (2, 5, 6, 7, 8):
                weights[i] = 0.0
        if z_from_search:
            weights[11] = 0.0
        _run_linear(fixed, moving, _mask_image(ov, query), aff, metric, iterations, _rate(sampling, ov, max_samples),
                    seed, threads, weights)
        _advance("affine", aff, _final_score(fixed, moving, aff, query)[0])
        times["affine"] = time.perf_counter() - t0
    if "demons" in stages:
        t0 = time.perf_counter()
        ov = _overlap_mask(current, atlas, query, 0)
        warped_tf = _demons(fixed, moving, ov, current, (atlas.modality, q_mod), demons_iterations, demons_sigma_px,
                            demons_in_plane_only, threads)
        _advance("demons", warped_tf, _final_score(fixed, moving, warped_tf, query)[0])
        times["demons"] = time.perf_counter() - t0
    if "bspline" in stages:
        t0 = time.perf_counter()
        ov = _overlap_mask(current, atlas, query)
        warped_tf = _bspline(fixed, moving, _mask_image(ov, query), current, metric, bspline_mesh_mm, iterations,
                             _rate(sampling, ov, max_samples), seed, threads)
        _advance("bspline", warped_tf, _final_score(fixed, moving, warped_tf, query)[0])
        times["bspline"] = time.perf_counter() - t0

    zq = image.shape[0]
    zpos = np.arange(zq) * spacing[0]
    zc = query.coarse_z()
    cent = np.stack([np.interp(zpos, zc, query.centroids_yx[:, k]) for k in (0, 1)], axis=1)
    raw = _map_z(current, cent, zq, spacing[0], atlas.spacing_zyx[0])
    inside = (raw >= -0.5) & (raw <= atlas.shape[0] - 0.5)
    support_z = np.where(inside, raw, np.nan)
    score = _linear_score(scores)
    body_full = _upsample_mask(query, image.shape)
    times["total"] = time.perf_counter() - t_start
    return Correspondence(
        transform=current, query_shape=tuple(image.shape), query_spacing_zyx=spacing,  # type: ignore[arg-type]
        support_shape=atlas.shape, support_spacing_zyx=atlas.spacing_zyx, support_z=support_z, support_z_raw=raw,
        score=score, overlap_mm=float(inside.sum() * spacing[0]), z_offset_mm=float(z_offset),
        z_search_score=zs_score, z_search_runner_up=zs_runner, metric=metric, search_metric=search_metric,
        stages=stages,
        modalities=(atlas.modality, q_mod), z_scale_locked=locked, stage_scores=scores, stage_seconds=times,
        query_body=body_full, query_centroids_yx=cent, stage_transforms=transforms, start_scores=start_scores,
        reverted=tuple(reverted), support_label=atlas.label)


def _upsample_mask(vol: _Volume, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of the coarse body mask to the input grid ``shape`` (Z, H, W)."""
    idx = []
    for a in range(3):
        pos = np.arange(shape[a]) * vol.spacing_zyx[a]
        i = np.round((pos - vol.coarse_origin_zyx[a]) / vol.coarse_spacing_zyx[a]).astype(int)
        idx.append(np.clip(i, 0, vol.body.shape[a] - 1))
    return vol.body[np.ix_(*idx)]
