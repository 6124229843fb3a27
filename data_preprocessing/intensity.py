"""Intensity and value transforms of the preprocessing pipelines (docs/method.md#preprocessing).

Pure functions on NumPy arrays, no file I/O:

- :func:`clip_upper_percentile`: MR bright-end cut (CHAOS, CMR: values above the 99.5th percentile);
- :func:`window_ct`, :func:`rescale_window`, :func:`rescale_min_max`, :func:`ct_to_uint8_range`: CT windowing
  to [-125, 275] HU and rescaling to [0, 255], either with the fixed formula ``(HU + 125) / 400 * 255``
  (default) or with the volume's own min and max after clipping (the original's behaviour,
  docs/method.md#q19-ct-rescaling);
- :func:`map_label_values`: an exact raw-value -> label-id map (CHAOS grey values, MS-CMRSeg 200/500/600) that
  refuses any value it does not know (docs/method.md#q24-chaos-grey-values).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

CT_WINDOW: tuple[float, float] = (-125.0, 275.0)  # HU window of the abdominal CT pipeline (docs/method.md#sabs-ct)
CT_OUT_MAX = 255.0  # CT intensities are stored in [0, CT_OUT_MAX]
MR_CLIP_PERCENTILE = 99.5  # MR: values above this percentile are cut (docs/method.md#chaos-t2-mri)


def clip_upper_percentile(img: np.ndarray, percentile: float = MR_CLIP_PERCENTILE) -> np.ndarray:
    """Cut the bright end of the histogram: values above the ``percentile``-th percentile are set to it.

    There is no lower clip and no normalisation (docs/method.md#chaos-t2-mri, step 3).

    Args:
        img: (Z, H, W) (or any shape) image; the percentile is taken over the whole array.
        percentile: in (0, 100].

    Returns:
        float32 array of the same shape.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    arr = np.asarray(img, dtype=np.float32)
    if arr.size == 0:
        raise ValueError("cannot clip an empty image")
    top = np.float32(np.percentile(arr, percentile))
    return np.minimum(arr, top)


def window_ct(hu: np.ndarray, low: float = CT_WINDOW[0], high: float = CT_WINDOW[1]) -> np.ndarray:
    """Clip Hounsfield units to the window ``[low, high]``.

    Args:
        hu: (Z, H, W) CT volume in HU.

    Returns:
        float32 array of the same shape.
    """
    if not low < high:
        raise ValueError(f"window must have low < high, got [{low}, {high}]")
    return np.clip(np.asarray(hu, dtype=np.float32), np.float32(low), np.float32(high))


def rescale_window(windowed: np.ndarray, low: float = CT_WINDOW[0], high: float = CT_WINDOW[1],
                   out_max: float = CT_OUT_MAX) -> np.ndarray:
    """Fixed linear map of the window to ``[0, out_max]``: ``(x - low) / (high - low) * out_max`` (default,
    docs/method.md#q19-ct-rescaling).

    Args:
        windowed: (Z, H, W) values already clipped to ``[low, high]``.

    Returns:
        float32 array of the same shape.
    """
    arr = np.asarray(windowed, dtype=np.float64)
    return ((arr - low) / (high - low) * out_max).astype(np.float32)


def rescale_min_max(windowed: np.ndarray, out_max: float = CT_OUT_MAX) -> np.ndarray:
    """The original's per-volume map ``(x - min) / (max - min) * out_max`` (parity,
    docs/method.md#q19-ct-rescaling).

    It equals :func:`rescale_window` only when both window bounds occur in the volume.

    Args:
        windowed: (Z, H, W) windowed volume.

    Raises:
        ValueError: a constant volume (max == min) cannot be rescaled this way.
    """
    arr = np.asarray(windowed, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise ValueError(f"per-volume rescaling of a constant volume (all values {lo})")
    return ((arr - lo) / (hi - lo) * out_max).astype(np.float32)


def ct_to_uint8_range(hu: np.ndarray, mode: Literal["fixed", "per_volume"] = "fixed",
                      low: float = CT_WINDOW[0], high: float = CT_WINDOW[1]) -> np.ndarray:
    """Window a CT volume and rescale it to [0, 255] (docs/method.md#sabs-ct, steps 1-2).

    Args:
        hu: (Z, H, W) CT volume in HU.
        mode: ``"fixed"``: ``(HU - low) / (high - low) * 255``; ``"per_volume"``: the original's min/max of the
            windowed volume (docs/method.md#q19-ct-rescaling).
        low, high: HU window.

    Returns:
        float32 (Z, H, W) in [0, 255].
    """
    windowed = window_ct(hu, low, high)
    if mode == "fixed":
        return rescale_window(windowed, low, high)
    if mode == "per_volume":
        return rescale_min_max(windowed)
    raise ValueError(f"unknown CT rescale mode {mode!r}; use 'fixed' or 'per_volume'")


def map_label_values(raw: np.ndarray, mapping: Mapping[int, int], what: str = "label") -> np.ndarray:
    """Map raw label values to label ids through an exact table; any other value is an error.

    Args:
        raw: integer-valued array of any shape (float storage accepted if every value is an integer).
        mapping: raw value -> label id; include the background (e.g. ``{0: 0}``).
        what: names the source (file, patient) in the error message.

    Returns:
        uint8 array of label ids, same shape.

    Raises:
        ValueError: non-integer values, or values outside ``mapping`` (listed, with ``what``).
    """
    arr = np.asarray(raw)
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.rint(arr)):
            raise ValueError(f"{what}: holds non-integer label values")
        arr = np.rint(arr).astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{what}: label values must be integers, got dtype {arr.dtype}")
    if any(not 0 <= v <= 255 for v in mapping.values()):
        raise ValueError(f"label ids must be in 0..255, got {sorted(mapping.values())}")
    values = np.unique(arr)
    unknown = [int(v) for v in values if int(v) not in mapping]
    if unknown:
        raise ValueError(f"{what}: unexpected values {unknown}; expected only {sorted(mapping)}")
    out = np.zeros(arr.shape, dtype=np.uint8)
    for raw_value, label_id in mapping.items():
        if label_id:
            out[arr == raw_value] = label_id
    return out
