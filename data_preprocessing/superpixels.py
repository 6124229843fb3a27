"""Superpixel pseudolabels of one slice or one volume (docs/method.md#pseudolabels): body mask, Felzenszwalb,
relabelling.

Pure functions on arrays, no file I/O (``data_preprocessing.pseudolabel`` reads and writes the files).

Per axial slice of the **un-normalised** image:

1. :func:`body_mask`: image > threshold, then the largest connected component with its holes filled;
2. :func:`felzenszwalb_slice`: ``skimage.segmentation.felzenszwalb`` (mode ``MIDDLE``: scale 1, sigma 1,
   min_size 400);
3. relabelling inside the body: :func:`relabel_compact` (default, ids 1..K with no gaps) or
   :func:`relabel_legacy` (the original's numbering, docs/method.md#q2-superpixel-numbering).

The relabelling behaviour follows that description; the code is written from scratch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import felzenszwalb

# Felzenszwalb parameters per named mode; "MIDDLE" is the only one the original implements.
SCALE_MODES: dict[str, dict[str, Any]] = {
    "MIDDLE": {"scale": 1.0, "sigma": 1.0, "min_size": 400},
}


def scale_params(mode: str) -> dict[str, Any]:
    """Felzenszwalb ``scale``/``sigma``/``min_size`` of a named mode.

    Raises:
        ValueError: ``mode`` is not implemented (only ``"MIDDLE"`` is).
    """
    if mode not in SCALE_MODES:
        raise ValueError(f"superpixel mode {mode!r} is not implemented; available: {sorted(SCALE_MODES)}")
    return dict(SCALE_MODES[mode])


def _check_2d(name: str, arr: np.ndarray) -> None:
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) array, got shape {arr.shape}")


def body_mask(slice2d: np.ndarray, threshold: float) -> np.ndarray:
    """Body mask of one slice: ``slice2d > threshold``, largest 8-connected component, holes filled.

    An empty thresholded mask is returned as is (all False).

    Args:
        slice2d: (H, W) raw-intensity slice.
        threshold: strict lower bound on the intensity (1e-4 for CT, 50.0001 for MR).

    Returns:
        (H, W) bool mask.
    """
    _check_2d("slice2d", slice2d)
    mask = np.asarray(slice2d) > threshold
    if not mask.any():
        return mask
    components = connected_components(mask, connectivity=2)  # 8-connectivity in 2D
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == int(np.argmax(sizes))  # ties: the component met first in raster order
    return ndimage.binary_fill_holes(largest)


def felzenszwalb_slice(slice2d: np.ndarray, scale: float = 1.0, sigma: float = 1.0, min_size: int = 400) -> np.ndarray:
    """Felzenszwalb over-segmentation of one un-normalised slice.

    Float input is passed unchanged (as the original does). Integer input is cast to float64 first, so edge
    weights stay raw intensity differences (skimage would otherwise rescale integer images to [-1, 1]).

    Args:
        slice2d: (H, W) raw-intensity slice.
        scale, sigma, min_size: Felzenszwalb parameters (defaults: mode ``MIDDLE``).

    Returns:
        (H, W) integer segment ids, 0..n-1.
    """
    _check_2d("slice2d", slice2d)
    img = slice2d if slice2d.dtype.kind == "f" else slice2d.astype(np.float64)
    return felzenszwalb(img, scale=scale, sigma=sigma, min_size=min_size, channel_axis=None)


def _check_pair(segments: np.ndarray, mask: np.ndarray) -> None:
    _check_2d("segments", segments)
    if mask.shape != segments.shape:
        raise ValueError(f"mask shape {mask.shape} differs from segments shape {segments.shape}")
    if segments.dtype.kind not in "iu":
        raise ValueError(f"segments must be integer ids, got dtype {segments.dtype}")
    if segments.size and segments.min() < 0:
        raise ValueError("segments must be non-negative ids")


def relabel_compact(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Default numbering: every segment that meets the body, restricted to it, numbered 1..K without gaps.

    Ids follow the order of the original segment ids; pixels outside the body are 0.

    Args:
        segments: (H, W) non-negative integer segment ids.
        mask: (H, W) body mask (bool or 0/1).

    Returns:
        (H, W) int32 ids in 0..K, each of 1..K present.
    """
    _check_pair(segments, mask)
    inside = np.asarray(mask).astype(bool)
    out = np.zeros(segments.shape, dtype=np.int32)
    values = segments[inside]
    kept = np.unique(values)  # sorted original ids present in the body
    out[inside] = np.searchsorted(kept, values) + 1
    return out


def relabel_legacy(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The original's numbering (docs/method.md#q2-superpixel-numbering), reproduced exactly.

    Walk: with ``m`` the largest id, segment 0 is moved to ``m + 1``; the map is multiplied by the mask; the
    sorted unique original ids followed by one more ``m`` are visited with a counter starting at 1, skipping
    the value 0; pixels equal to the visited id get the counter, which increments after every non-zero entry.
    Hence: the former segment 0 ends up 0, the ``k``-th non-zero id gets ``k`` (an out-of-body segment leaves
    its number unused), and segment ``m`` ends up ``n + 1`` (``n`` = number of non-zero ids), so number ``n``
    stays empty. The walk is evaluated here as one lookup table, which gives the same result.

    Args:
        segments: (H, W) non-negative integer segment ids.
        mask: (H, W) body mask (bool or 0/1).

    Returns:
        (H, W) int32 ids, 0 outside the body and for the former segment 0.
    """
    _check_pair(segments, mask)
    seg = segments.astype(np.int64)
    ids = np.unique(seg)
    top = int(ids.max())
    moved = np.where(seg == 0, top + 1, seg) * np.asarray(mask).astype(np.int64)
    nonzero = ids[ids > 0]
    lut = np.zeros(top + 2, dtype=np.int32)  # entries 0 and top + 1 (the former segment 0) stay 0
    lut[nonzero] = np.arange(1, nonzero.size + 1, dtype=np.int32)
    if top > 0:  # the appended second visit of m overwrites its first number
        lut[top] = nonzero.size + 1
    return lut[moved]


def superpixel_slice(slice2d: np.ndarray, threshold: float, legacy: bool = False, scale: float = 1.0,
                     sigma: float = 1.0, min_size: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Pseudolabel of one slice.

    Args:
        slice2d: (H, W) raw-intensity slice.
        threshold: body-mask threshold.
        legacy: use :func:`relabel_legacy` instead of :func:`relabel_compact`.
        scale, sigma, min_size: Felzenszwalb parameters.

    Returns:
        ``(superpix, mask)``: (H, W) int32 ids (0 outside the body) and (H, W) uint8 body mask.
    """
    mask = body_mask(slice2d, threshold)
    segments = felzenszwalb_slice(slice2d, scale=scale, sigma=sigma, min_size=min_size)
    ids = relabel_legacy(segments, mask) if legacy else relabel_compact(segments, mask)
    return ids, mask.astype(np.uint8)


def superpixel_volume(image: np.ndarray, threshold: float, legacy: bool = False, scale: float = 1.0,
                      sigma: float = 1.0, min_size: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Pseudolabels of a volume, slice by slice along axis 0.

    Args:
        image: (Z, H, W) raw-intensity volume.
        threshold: body-mask threshold.
        legacy: original numbering (docs/method.md#q2-superpixel-numbering) instead of compact ids.
        scale, sigma, min_size: Felzenszwalb parameters.

    Returns:
        ``(superpix, fgmask)``: (Z, H, W) int32 ids and (Z, H, W) uint8 body masks.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be a (Z, H, W) volume, got shape {image.shape}")
    superpix = np.zeros(image.shape, dtype=np.int32)
    fgmask = np.zeros(image.shape, dtype=np.uint8)
    for z in range(image.shape[0]):
        superpix[z], fgmask[z] = superpixel_slice(image[z], threshold, legacy, scale, sigma, min_size)
    return superpix, fgmask
