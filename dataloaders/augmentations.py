"""Episode augmentation: the original's ``sabs_aug`` preset (docs/method.md#augmentation), with an explicit RNG.

One call augments one slice and its label map together:

1. flips (implemented, all off in both presets), each with probability ``flip_p``;
2. one affine matrix composed rotate -> translate -> shear -> zoom (rotation and zoom about the image centre),
   bilinear, constant border (0 in normalised units, i.e. the mean intensity, as in the original;
   ``border_fill="min"`` fills the image with its minimum instead; docs/method.md#q17-border-fill);
3. an elastic field: ``dx, dy ~ U(-1, 1)`` per pixel, ``cv2.GaussianBlur`` (sigma 5, 21x21), times ``alpha`` pixels,
   bilinear, sample positions reflected at the border (mode ``'reflect'``); same field for image and labels.
   Steps 2 and 3 are one resampling by default (:func:`warp_composed`); ``parity=True`` resamples twice as the
   original does (``cv2.warpAffine``, then ``scipy.ndimage.map_coordinates``);
4. labels travel as one-hot channels, are rounded (``rint``) and turned back into ids by ``argmax``;
5. gamma on the image only: ``gamma ~ U(g0, g1)`` applied to min-max-scaled intensities, range restored.

Every random number comes from the ``np.random.Generator`` passed in (docs/method.md#q5-unseeded-numpy), drawn in a
fixed order: flips, affine (rotation, tx, ty, shear, zoom), elastic (first noise field, second noise field), gamma. A
step whose parameters make it the identity draws nothing.

``AugParams.parity=True`` reproduces the original's arithmetic, so that the same draws give a bit-identical result
(docs/method.md#augmentation); the default differs from it in five places, each for a reason:

======================  ==========================================  ===============================================
step                    default                                     ``parity=True`` (the original)
======================  ==========================================  ===============================================
rotation / zoom centre  ((W-1)/2, (H-1)/2), the centre of the       cv2 centre (H/2, W//2): half a pixel off the
                        pixel grid: a rotation or zoom has no        grid centre, so a rotation or zoom also shifts
                        translation part                             the image (<= 0.2 px for ``sabs_aug``)
affine matrix           float64                                     composed in float64, rounded to float32
elastic fields          float64; 1st draw displaces rows, 2nd       float32; 1st draw displaces columns, 2nd rows
                        columns                                     (same distribution either way)
resampling              affine and elastic composed into one          affine (cv2.warpAffine), then elastic
                        cv2.remap (:func:`warp_composed`): one        (map_coordinates): two interpolations
                        interpolation, ~2x faster per call
gamma                   lo + r ((x - lo) / r) ** g, r = hi - lo:     lo + r' ((x - lo + 1e-5) / r') ** g,
                        min and max stay where they were            r' = hi - lo + 1e-5, in float32: the minimum
                                                                    moves up by r' (1e-5 / r') ** g
======================  ==========================================  ===============================================
 The parameters follow the original's ``dataloaders/augutils.py`` (augmentation credited there to
J. Schlemper); the code is written from their description (docs/method.md#augmentation).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import cv2
import numpy as np
from scipy.ndimage import map_coordinates

BorderFill = Literal["zero_normalised", "min"]


@dataclass(frozen=True)
class AugParams:
    """Parameters of one augmentation preset (defaults: the original's ``sabs_aug``).

    Attributes:
        flip_ud: flip rows (axis 0) with probability ``flip_p``; off in both presets.
        flip_lr: flip columns (axis 1) with probability ``flip_p``; off in both presets.
        transpose: swap the two axes with probability ``flip_p`` (square images only); off in both presets.
        flip_p: probability of each enabled flip.
        rotate_deg: rotation drawn from U(-rotate_deg, rotate_deg) degrees, about the image centre.
        shift_px: translation per axis drawn from U(-shift_px, shift_px) pixels.
        shear_deg: shear angle t drawn from U(-shear_deg, shear_deg); matrix [[1, -sin t, 0], [0, cos t, 0]].
        scale: isotropic zoom drawn from U(scale[0], scale[1]), about the image centre.
        elastic_alpha: displacement magnitude in pixels (0 turns the elastic step off).
        elastic_sigma: standard deviation of the Gaussian blur of the noise fields, in pixels.
        elastic_kernel: blur kernel size (odd); the original uses ``int(4 * sigma) | 1`` = 21.
        gamma: (low, high) range of the gamma exponent, or ``None`` for no gamma step.
        border_fill: affine border value of the image: ``"zero_normalised"`` (0, the original) or ``"min"``
            (docs/method.md#q17-border-fill).
        parity: use the original's arithmetic (centre, float32 matrix and fields, field order, gamma's 1e-5), bit
            identical for the same draws; see the module docstring.
    """

    flip_ud: bool = False
    flip_lr: bool = False
    transpose: bool = False
    flip_p: float = 0.25
    rotate_deg: float = 5.0
    shift_px: float = 5.0
    shear_deg: float = 5.0
    scale: tuple[float, float] = (0.9, 1.2)
    elastic_alpha: float = 10.0
    elastic_sigma: float = 5.0
    elastic_kernel: int = 21
    gamma: tuple[float, float] | None = (0.5, 1.5)
    border_fill: BorderFill = "zero_normalised"
    parity: bool = False

    def __post_init__(self) -> None:
        if self.border_fill not in ("zero_normalised", "min"):
            raise ValueError(f"border_fill must be 'zero_normalised' or 'min', got {self.border_fill!r}")
        if self.elastic_kernel < 1 or self.elastic_kernel % 2 == 0:
            raise ValueError(f"elastic_kernel must be a positive odd size, got {self.elastic_kernel}")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if self.gamma is not None and (self.gamma[0] <= 0 or self.gamma[0] > self.gamma[1]):
            raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {self.gamma}")

    @property
    def has_affine(self) -> bool:
        return bool(self.rotate_deg or self.shift_px or self.shear_deg or self.scale != (1.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for configs and checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugParams:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown augmentation parameters {unknown}")
        d = dict(d)
        for key in ("scale", "gamma"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


#: The original's ``sabs_aug`` (used for CT and MR).
SABS_AUG = AugParams()
#: The original's unused, more aggressive ``aug_v3`` (``sabs_augv3``).
AUG_V3 = AugParams(rotate_deg=30.0, shift_px=30.0, shear_deg=30.0, scale=(0.8, 1.3), elastic_alpha=20.0,
                   elastic_sigma=5.0, gamma=(0.2, 1.8))
#: No augmentation at all: every step is the identity and no random number is drawn.
IDENTITY = AugParams(flip_p=0.0, rotate_deg=0.0, shift_px=0.0, shear_deg=0.0, scale=(1.0, 1.0), elastic_alpha=0.0,
                     gamma=None)

PRESETS: dict[str, AugParams] = {"sabs_aug": SABS_AUG, "aug_v3": AUG_V3, "identity": IDENTITY}


def get_preset(name: str) -> AugParams:
    """Look a preset up by name (``sabs_aug``, ``aug_v3``, ``identity``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown augmentation preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


# -------------------------------------------------------------------- affine
def affine_matrix(shape: tuple[int, int], rotate_deg: float, tx: float, ty: float, shear_deg: float,
                  zoom: float, parity: bool = False) -> np.ndarray:
    """The forward 2x3 matrix (output = M @ [x, y, 1]) of rotate -> translate -> shear -> zoom.

    Args:
        shape: image shape ``(H, W)``; rotation and zoom are about its centre ``(x, y) = ((W-1)/2, (H-1)/2)``
            (``parity``: the original's ``(H/2, W//2)``, docs/method.md#augmentation).
        rotate_deg: rotation in degrees (OpenCV sign convention: positive is counter-clockwise on screen).
        tx, ty: translation in pixels along x (columns) and y (rows).
        shear_deg: shear angle t; the shear matrix is [[1, -sin t, 0], [0, cos t, 0]] (about the origin).
        zoom: isotropic scale factor.
        parity: the original's centre, and the product (computed in float64) rounded to float32.

    Returns:
        (2, 3) matrix for ``cv2.warpAffine`` (without ``WARP_INVERSE_MAP``): float64, float32 with ``parity``.
    """
    h, w = shape
    centre = (h / 2.0, float(w // 2)) if parity else ((w - 1) / 2.0, (h - 1) / 2.0)
    rot = np.vstack([cv2.getRotationMatrix2D(centre, float(rotate_deg), 1.0), [0.0, 0.0, 1.0]])
    shift = np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
    t = math.radians(shear_deg)
    shear = np.array([[1.0, -math.sin(t), 0.0], [0.0, math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    scale = np.vstack([cv2.getRotationMatrix2D(centre, 0.0, float(zoom)), [0.0, 0.0, 1.0]])
    matrix = (scale @ shear @ shift @ rot)[:2]
    return matrix.astype(np.float32) if parity else matrix


def warp_affine(channels: np.ndarray, matrix: np.ndarray, border_values: list[float]) -> np.ndarray:
    """Warp each channel of ``(C, H, W)`` float32 with one 2x3 matrix (bilinear, constant border per channel).

    Up to 4 channels are warped as one interleaved ``(H, W, C)`` image, the layout the original passed to
    ``cv2.warpAffine``: OpenCV's fixed-point bilinear kernel takes a different SIMD path for a 3-channel image than
    for three 1-channel images, and the two can differ by 1 ULP on some pixels, depending on the CPU. The same layout
    as the original keeps ``parity=True`` bit-identical on every host. More channels are warped one at a time.
    """
    c, h, w = channels.shape
    if c <= 4:  # cv2's border Scalar holds at most 4 values
        interleaved = np.ascontiguousarray(channels.transpose(1, 2, 0))
        warped = cv2.warpAffine(interleaved, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=tuple(float(v) for v in border_values))
        return np.ascontiguousarray(warped.reshape(h, w, c).transpose(2, 0, 1))
    out = np.empty_like(channels)
    for i in range(c):
        out[i] = cv2.warpAffine(channels[i], matrix, (w, h), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=float(border_values[i]))
    return out


# -------------------------------------------------------------------- elastic
def elastic_field(shape: tuple[int, int], alpha: float, sigma: float, kernel: int,
                  rng: np.random.Generator, parity: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement fields ``(drow, dcol)``, each ``(H, W)``, in pixels.

    Draws two noise fields, each ``U(-1, 1)`` per pixel, blurs each (``cv2.GaussianBlur``) and scales it by
    ``alpha``. Default: float64, the first field displaces rows. ``parity`` (the original's ``elastic_transform_nd``,
    docs/method.md#augmentation): the fields are rounded to float32 and the first one displaces columns.
    """
    first = cv2.GaussianBlur(rng.uniform(-1.0, 1.0, size=shape), (kernel, kernel), sigma) * alpha
    second = cv2.GaussianBlur(rng.uniform(-1.0, 1.0, size=shape), (kernel, kernel), sigma) * alpha
    if parity:
        return second.astype(np.float32), first.astype(np.float32)
    return first, second


def warp_elastic(channels: np.ndarray, drow: np.ndarray, dcol: np.ndarray) -> np.ndarray:
    """Resample each channel of ``(C, H, W)`` at ``(row + drow, col + dcol)`` (linear, mode ``'reflect'``)."""
    _, h, w = channels.shape
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    coords = np.stack([rows + drow, cols + dcol])  # float64 (float32 fields are widened exactly)
    out = np.empty_like(channels)
    for i in range(channels.shape[0]):
        out[i] = map_coordinates(channels[i], coords, order=1, mode="reflect")
    return out


# -------------------------------------------------------------------- affine + elastic in one resampling
def reflect_coords(x: np.ndarray, size: int) -> np.ndarray:
    """Fold coordinates into ``[-0.5, size - 0.5]`` by half-sample symmetric reflection (scipy ``mode='reflect'``,
    ``cv2.BORDER_REFLECT``: ``... b a | a b ... y z | z y ...``), for any distance outside."""
    period = 2.0 * size
    y = np.mod(x + 0.5, period)
    return np.where(y > size, period - y, y) - 0.5


def _elastic_positions(x: np.ndarray, size: int) -> np.ndarray:
    """Where bilinear sampling of a reflect-extended row of ``size`` pixels at ``x`` reads: within the half-pixel
    band outside the first and last pixel centres the extension repeats the edge pixel, so the reflected position is
    clamped to ``[0, size - 1]`` (exactly equal for linear interpolation)."""
    outside = (x < -0.5) | (x > size - 0.5)
    if outside.any():  # rare for sabs_aug's fields (a few pixels), so reflect only those
        x = x.copy()
        x[outside] = reflect_coords(x[outside], size)
    return np.clip(x, 0.0, size - 1.0)


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices ``(H, W)`` float64, read-only (cached per shape)."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    rows.flags.writeable = False
    cols.flags.writeable = False
    return rows, cols


def warp_composed(channels: np.ndarray, matrix: np.ndarray | None, drow: np.ndarray | None,
                  dcol: np.ndarray | None, border_values: list[float]) -> np.ndarray:
    """:func:`warp_affine` followed by :func:`warp_elastic` as one bilinear resampling of ``(C, H, W)`` float32.

    Output pixel (r, c) takes the input at ``M^-1 (reflect(c + dcol), reflect(r + drow))``: the elastic stage
    reflects its sample positions at the border as :func:`warp_elastic` does (``mode='reflect'``; a position in the
    half-pixel band beyond the first or last pixel centre reads the edge pixel, so it is clamped), and the affine
    stage fills positions outside the input with ``border_values`` (one per channel) as :func:`warp_affine` does.
    The geometry is that of the two stages; the image is interpolated once instead of twice (less blur), with
    ``cv2.remap`` (bilinear weights quantised to 1/32 pixel, as in ``cv2.warpAffine``). On 256x256 it took 6.7 ms
    against 12.7 ms for the two stages (map_coordinates is the slow part), and a whole :func:`augment` call 2.0-2.4x
    less time (docs/performance.md).

    Args:
        channels: ``(C, H, W)`` float32.
        matrix: forward 2x3 affine matrix of :func:`affine_matrix`, or ``None`` for no affine step.
        drow, dcol: ``(H, W)`` displacement fields in pixels (:func:`elastic_field`), or ``None`` for none.
        border_values: fill value per channel outside the input.

    Returns:
        ``(C, H, W)`` float32.
    """
    c, h, w = channels.shape
    rows, cols = _pixel_grid(h, w)
    if drow is not None:
        rows = _elastic_positions(rows + drow, h)
        cols = _elastic_positions(cols + dcol, w)
    if matrix is not None:
        inv = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
        cols, rows = (inv[0, 0] * cols + inv[0, 1] * rows + inv[0, 2],
                      inv[1, 0] * cols + inv[1, 1] * rows + inv[1, 2])
    map_x, map_y = cols.astype(np.float32), rows.astype(np.float32)
    out = np.empty_like(channels)
    hwc = np.ascontiguousarray(channels.transpose(1, 2, 0))
    for start in range(0, c, 4):  # cv2 border values hold up to 4 channels
        part = hwc[:, :, start:start + 4]
        fill = [float(v) for v in border_values[start:start + 4]] + [0.0] * 4
        warped = cv2.remap(np.ascontiguousarray(part), map_x, map_y, interpolation=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(fill[:4]))
        out[start:start + part.shape[2]] = warped.reshape(h, w, -1).transpose(2, 0, 1)
    return out


# -------------------------------------------------------------------- gamma
def gamma_transform(image: np.ndarray, gamma: float) -> np.ndarray:
    """``min + range * ((x - min) / range) ** gamma``: min and max stay where they were (constant image unchanged).

    Args:
        image: ``(H, W)`` float array.
    """
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return image.copy()
    scaled = (image - lo) / (hi - lo)
    return (np.power(scaled, gamma) * (hi - lo) + lo).astype(image.dtype, copy=False)


def gamma_transform_parity(image: np.ndarray, gamma: float) -> np.ndarray:
    """The original's gamma: ``lo + r * ((x - lo + 1e-5) / r) ** gamma`` with ``r = hi - lo + 1e-5``.

    Float32 throughout, as the original computed it on a float32 slice under NumPy 1.x promotion: ``hi - lo`` in
    float32, ``+ 1e-5`` in float64 and the sum rounded to float32; ``gamma`` rounded to float32 in the power.

    Args:
        image: ``(H, W)`` float image (cast to float32).
        gamma: exponent.

    Returns:
        ``(H, W)`` float32.
    """
    x = np.asarray(image, dtype=np.float32)
    lo, hi = x.min(), x.max()
    r = np.float32(np.float64(hi - lo) + 1e-5)
    shifted = (x - lo) + np.float32(1e-5)
    return r * np.power(shifted / r, np.float32(gamma)) + lo


# -------------------------------------------------------------------- the preset
def augment(image: np.ndarray, label: np.ndarray, params: AugParams, rng: np.random.Generator,
            n_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Augment one slice and its label map together (docs/method.md#augmentation).

    Args:
        image: ``(H, W)`` float image (normalised units).
        label: ``(H, W)`` integer (or bool) label map with values in ``0 .. n_classes-1``; binary for episodes.
        params: the preset.
        rng: the only source of randomness.
        n_classes: number of one-hot label channels.

    Returns:
        ``(image, label)``: ``(H, W)`` float32 and ``(H, W)`` int64 with values in ``0 .. n_classes-1``.
    """
    if image.ndim != 2 or label.shape != image.shape:
        raise ValueError(f"augment expects image (H, W) and label of the same shape, got {image.shape}, {label.shape}")
    lab = label.astype(np.int64, copy=False)
    if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
        raise ValueError(f"label values must lie in 0..{n_classes - 1}, got {lab.min()}..{lab.max()}")
    # channel 0 = image, channels 1.. = one-hot labels
    stack = np.empty((1 + n_classes,) + image.shape, dtype=np.float32)
    stack[0] = image
    stack[1:] = lab[None] == np.arange(n_classes)[:, None, None]

    if params.flip_ud and rng.random() < params.flip_p:
        stack = stack[:, ::-1, :]
    if params.flip_lr and rng.random() < params.flip_p:
        stack = stack[:, :, ::-1]
    if params.transpose and rng.random() < params.flip_p:
        if image.shape[0] != image.shape[1]:
            raise ValueError(f"transpose augmentation needs a square image, got {image.shape}")
        stack = stack.transpose(0, 2, 1)
    stack = np.ascontiguousarray(stack)

    matrix, drow, dcol = None, None, None
    fill = float(stack[0].min()) if params.border_fill == "min" else 0.0
    if params.has_affine:
        rot = rng.uniform(-params.rotate_deg, params.rotate_deg)
        tx = rng.uniform(-params.shift_px, params.shift_px)
        ty = rng.uniform(-params.shift_px, params.shift_px)
        shear = rng.uniform(-params.shear_deg, params.shear_deg)
        zoom = rng.uniform(params.scale[0], params.scale[1])
        matrix = affine_matrix(stack.shape[1:], rot, tx, ty, shear, zoom, parity=params.parity)
        if params.parity:  # the original resamples twice: affine now, elastic below
            stack = warp_affine(stack, matrix, [fill] + [0.0] * n_classes)

    if params.elastic_alpha:
        drow, dcol = elastic_field(stack.shape[1:], params.elastic_alpha, params.elastic_sigma,
                                   params.elastic_kernel, rng, parity=params.parity)
        if params.parity:
            stack = warp_elastic(stack, drow, dcol)
    if not params.parity and (matrix is not None or drow is not None):
        stack = warp_composed(stack, matrix, drow, dcol, [fill] + [0.0] * n_classes)

    out_label = np.argmax(np.rint(stack[1:]), axis=0).astype(np.int64)
    out_image = stack[0]
    if params.gamma is not None:
        transform = gamma_transform_parity if params.parity else gamma_transform
        out_image = transform(out_image, rng.uniform(params.gamma[0], params.gamma[1]))
    return out_image.astype(np.float32, copy=False), out_label
