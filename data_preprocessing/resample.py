"""Resampling, cropping and padding on SimpleITK images, keeping the physical geometry right
(docs/method.md#resampling-rule).

Resampling rule of the original (all datasets):

- SimpleITK, linear interpolation; the output keeps the input's origin and direction;
- the output size per axis is ``int(old_size * old_spacing / new_spacing + 1)`` (:func:`legacy_output_size`);
  the ``+ 1`` adds a last row/column/slice that lies past the input and is filled with 0 (the source of
  docs/method.md#q1-sabs-257-grid);
- labels are resampled one value at a time: the binary float mask is resampled linearly and rounded (rint);
  values are written in ascending order, so higher ids overwrite lower ones (:func:`resample_label`).

Cropping and padding (:func:`extract_xy`, :func:`crop_or_pad_xy`, :func:`crop_border_xy`) work in-plane
(x = columns, y = rows), keep every slice, and move the origin to the physical position of the first kept
pixel, so that image, label and predictions stay on the same physical grid.

Arrays are SimpleITK order ``(Z, H, W)``; sizes, spacings and indices given to SimpleITK are ``(x, y, z)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk


def legacy_output_size(size: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """The original's output size: ``int(size * spacing / new_spacing + 1)`` per axis (docs/method.md#resampling-rule).

    Args:
        size: input size, (x, y, z).
        spacing: input spacing in mm, (x, y, z).
        new_spacing: output spacing in mm, (x, y, z).
    """
    if not len(size) == len(spacing) == len(new_spacing):
        raise ValueError(f"size {size}, spacing {spacing} and new_spacing {new_spacing} differ in length")
    return tuple(int(n * s / t + 1) for n, s, t in zip(size, spacing, new_spacing))


def resample_image(img: sitk.Image, new_spacing: Sequence[float], size: Sequence[int] | None = None,
                   interpolator: int = sitk.sitkLinear, default_value: float = 0.0) -> sitk.Image:
    """Resample ``img`` to ``new_spacing`` on a grid with the same origin and direction.

    Args:
        img: 3D image.
        new_spacing: output spacing in mm, (x, y, z).
        size: output size (x, y, z); default :func:`legacy_output_size`.
        interpolator: a SimpleITK interpolator (default linear).
        default_value: value of output points outside the input.

    Returns:
        The resampled image (float32 for the linear interpolator on float input).
    """
    if img.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {img.GetDimension()}D")
    new_spacing = tuple(float(s) for s in new_spacing)
    if len(new_spacing) != 3 or min(new_spacing) <= 0:
        raise ValueError(f"new_spacing must be 3 positive values, got {new_spacing}")
    if size is None:
        size = legacy_output_size(img.GetSize(), img.GetSpacing(), new_spacing)
    size = [int(n) for n in size]
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"output size must be 3 positive integers, got {size}")
    return sitk.Resample(img, size, sitk.Transform(), interpolator, img.GetOrigin(), new_spacing,
                         img.GetDirection(), float(default_value), img.GetPixelID())


def resample_label(lbl: sitk.Image, new_spacing: Sequence[float], size: Sequence[int] | None = None,
                   values: Sequence[int] | None = None) -> sitk.Image:
    """Resample an integer label image one value at a time (docs/method.md#resampling-rule).

    For each non-zero value in ascending order, the binary mask (float32) is resampled linearly, rounded with
    ``rint`` and written into the output, so a higher id overwrites a lower one where both round to 1.

    Args:
        lbl: 3D integer label image.
        new_spacing: output spacing in mm, (x, y, z).
        size: output size (x, y, z); default :func:`legacy_output_size`.
        values: label values to resample (default: the non-zero values present).

    Returns:
        uint8 label image on the new grid (same origin and direction).
    """
    arr = sitk.GetArrayFromImage(lbl)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must have an integer pixel type, got {arr.dtype}")
    if values is None:
        values = [int(v) for v in np.unique(arr) if v != 0]
    out: np.ndarray | None = None
    ref: sitk.Image | None = None
    for value in sorted(int(v) for v in values):
        if not 0 < value <= 255:
            raise ValueError(f"label value {value} is outside 1..255")
        mask = sitk.GetImageFromArray((arr == value).astype(np.float32))
        mask.CopyInformation(lbl)
        res = resample_image(mask, new_spacing, size)
        hit = np.rint(sitk.GetArrayFromImage(res)) >= 1
        if out is None:
            out, ref = np.zeros(hit.shape, dtype=np.uint8), res
        out[hit] = value
    if out is None:  # no foreground: resample an empty volume to get the grid
        ref = resample_image(sitk.Cast(lbl, sitk.sitkFloat32) * 0.0, new_spacing, size)
        out = np.zeros(sitk.GetArrayFromImage(ref).shape, dtype=np.uint8)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(ref)
    return result


def extract_xy(img: sitk.Image, start: Sequence[int], size: Sequence[int], pad_value: float = 0.0) -> sitk.Image:
    """In-plane window ``[start, start + size)`` of every slice; positions outside the image get ``pad_value``.

    ``start`` may be negative (padding before) and the window may extend past the image (padding after).
    The output origin is the physical point of input index ``(start_x, start_y, 0)``; spacing and direction
    are unchanged, so every kept voxel keeps its physical position.

    Args:
        img: 3D image with array shape (Z, H, W).
        start: first index, (x, y).
        size: window size, (x, y) = (W_out, H_out).
        pad_value: fill value for positions outside the image.

    Returns:
        Image with array shape (Z, size[1], size[0]), same pixel type as ``img``.
    """
    x0, y0 = (int(v) for v in start)
    w_out, h_out = (int(v) for v in size)
    if w_out < 1 or h_out < 1:
        raise ValueError(f"window size must be positive, got {tuple(size)}")
    arr = sitk.GetArrayFromImage(img)
    z, h, w = arr.shape
    out = np.full((z, h_out, w_out), pad_value, dtype=arr.dtype)
    # overlap of the window with the image, in input and output coordinates
    ix0, ix1 = max(x0, 0), min(x0 + w_out, w)
    iy0, iy1 = max(y0, 0), min(y0 + h_out, h)
    if ix0 < ix1 and iy0 < iy1:
        out[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = arr[:, iy0:iy1, ix0:ix1]
    res = sitk.GetImageFromArray(out)
    res.SetSpacing(img.GetSpacing())
    res.SetDirection(img.GetDirection())
    res.SetOrigin(img.TransformContinuousIndexToPhysicalPoint((float(x0), float(y0), 0.0)))
    return res


def center_start(n: int, n_out: int) -> int:
    """First index of a centred window of ``n_out`` around ``n // 2`` (negative when padding is needed)."""
    return n // 2 - n_out // 2


def crop_or_pad_xy(img: sitk.Image, size: Sequence[int] = (256, 256), pad_value: float | None = None) -> sitk.Image:
    """Centre crop or pad every slice to ``size`` around (rows // 2, cols // 2) (docs/method.md#chaos-t2-mri, step 5).

    Args:
        img: 3D image, array (Z, H, W).
        size: output in-plane size (x, y) = (W_out, H_out).
        pad_value: fill value; default the image's minimum (use 0 for labels).

    Returns:
        Image with array shape (Z, size[1], size[0]).
    """
    w, h = img.GetSize()[:2]
    if pad_value is None:
        pad_value = float(sitk.GetArrayViewFromImage(img).min())
    start = (center_start(w, int(size[0])), center_start(h, int(size[1])))
    return extract_xy(img, start, size, pad_value)


def crop_border_xy(img: sitk.Image, border: int) -> sitk.Image:
    """Remove ``border`` pixels from every in-plane edge (docs/method.md#sabs-ct, step 4: 32 px, 512 -> 448).

    Raises:
        ValueError: the image is not larger than ``2 * border`` in-plane.
    """
    w, h = img.GetSize()[:2]
    if border < 0 or w <= 2 * border or h <= 2 * border:
        raise ValueError(f"cannot cut {border} px from each border of a {w}x{h} image")
    return extract_xy(img, (border, border), (w - 2 * border, h - 2 * border))
