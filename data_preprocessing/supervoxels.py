"""3D supervoxel pseudolabels of one volume (docs/method.md#3d-supervoxels): the ADNet lineage's pseudolabels.

Pure functions on arrays, no file I/O (``data_preprocessing.pseudolabel --dim 3`` reads and writes the files).

The ADNet lineage (``sha168/ADNet``, ``shenqq377/Q-Net``, ``hust-linyi/CAT-Net``, ``YazhouZhu19/RPT``,
``zmcheng9/GMRD``) over-segments the whole volume at once with a Cython 3D Felzenszwalb whose ``min_size`` is its
``n_sv`` (5000 voxels for abdominal MRI/CT, 1000 for cardiac MRI), with voxel spacing, then zeroes what lies
outside a per-slice body mask. scikit-image has no 3D Felzenszwalb (``felzenszwalb`` is 2D only), so this module
uses the maintained 3D method of the same library, ``skimage.segmentation.slic`` on the grey-level volume
(``channel_axis=None``) with the voxel spacing in mm and the body mask as its ``mask`` (maskSLIC: seeds are spread
over the body only and nothing outside it gets an id). ``n_sv`` keeps its meaning of a supervoxel *size in voxels*:
SLIC is asked for ``round(body voxels / n_sv)`` segments, so the mean supervoxel holds about ``n_sv`` voxels
(Felzenszwalb's ``min_size`` is a lower bound instead; its segments are at least that big).

Steps, per volume of the **un-normalised** image:

1. :func:`body_mask_volume`: the 2D body mask of :func:`data_preprocessing.superpixels.body_mask` (threshold,
   largest component, holes filled) on every axial slice, as the 2D pseudolabels and the lineage do;
2. SLIC inside the mask (``compactness`` on the [0, 1] scale SLIC rescales the in-mask intensities to; spacing
   (z, y, x) in mm; connectivity enforced);
3. ids renumbered compactly 1..K in the order of SLIC's labels; 0 outside the body.

SLIC is deterministic (its mask seeding uses a fixed internal seed), so a volume's supervoxels do not depend on
the process or the worker count that computes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.segmentation import relabel_sequential, slic

from data_preprocessing.superpixels import body_mask

# Supervoxel size (voxels) of the ADNet lineage (docs/method.md#3d-supervoxels): abdominal MRI and CT, cardiac MRI.
N_SV_ABDOMEN = 5000
N_SV_CARDIAC = 1000
# SLIC compactness on SLIC's [0, 1] intensity scale. On the 256x256 phantom (scan 0, n_sv 5000) 0.01 / 0.1 / 1
# gave 231 / 269 / 277 supervoxels for 277 requested, smallest 29 / 2765 / 3562 voxels, and a label purity
# (achievable segmentation accuracy over the body) of 0.969 / 0.959 / 0.935: 0.1 keeps every supervoxel at least
# half the requested size (close to the lineage's minimum size) while following organ boundaries nearly as well as
# the irregular 0.01 (docs/supervoxels.md).
DEFAULT_COMPACTNESS = 0.1


def body_mask_volume(image: np.ndarray, threshold: float) -> np.ndarray:
    """Per-slice body mask of a volume.

    Args:
        image: (Z, H, W) raw-intensity volume.
        threshold: strict lower bound on the intensity (1e-4 for CT, 50.0001 for MR; ``DatasetInfo.body_threshold``).

    Returns:
        (Z, H, W) bool mask, slice z = :func:`data_preprocessing.superpixels.body_mask` of ``image[z]``.

    Raises:
        ValueError: ``image`` is not 3D.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be a (Z, H, W) volume, got shape {image.shape}")
    return np.stack([body_mask(s, threshold) for s in image]) if image.shape[0] else np.zeros(image.shape, bool)


def n_segments_for(n_body_voxels: int, n_sv: int) -> int:
    """Number of SLIC segments that gives a mean supervoxel size of ``n_sv`` voxels: ``max(1, round(n / n_sv))``.

    Raises:
        ValueError: ``n_sv < 1`` or a negative voxel count.
    """
    if n_sv < 1 or n_body_voxels < 0:
        raise ValueError(f"n_sv must be >= 1 and the voxel count >= 0, got {n_sv} and {n_body_voxels}")
    return max(1, int(round(n_body_voxels / n_sv)))


def supervoxel_volume(image: np.ndarray, spacing: Sequence[float], threshold: float, n_sv: int = N_SV_ABDOMEN,
                      compactness: float = DEFAULT_COMPACTNESS) -> tuple[np.ndarray, np.ndarray]:
    """3D supervoxels of a volume inside its body mask.

    Args:
        image: (Z, H, W) raw-intensity volume (as stored: CT in [0, 255], MR after clip and resampling).
        spacing: voxel spacing (z, y, x) in mm, i.e. SimpleITK's (x, y, z) spacing reversed.
        threshold: body-mask threshold (raw intensity).
        n_sv: target mean supervoxel size in voxels (the lineage's 5000 abdomen / 1000 cardiac).
        compactness: SLIC compactness (weight of the spatial distance against the intensity distance, intensities
            rescaled to [0, 1] inside the mask).

    Returns:
        ``(supervox, fgmask)``: (Z, H, W) int32 ids, 0 outside the body and 1..K inside with every id present, and
        the (Z, H, W) uint8 body mask. A volume without body voxels gives all zeros.

    Raises:
        ValueError: not a 3D volume, a spacing that is not three positive numbers, ``n_sv < 1``, a non-positive
            compactness, or non-finite intensities inside the body.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be a (Z, H, W) volume, got shape {image.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive (z, y, x) values in mm, got {spacing}")
    if compactness <= 0:
        raise ValueError(f"compactness must be > 0, got {compactness}")
    mask = body_mask_volume(image, threshold)
    n_body = int(mask.sum())
    n_segments = n_segments_for(n_body, n_sv)
    if n_body == 0:
        return np.zeros(image.shape, np.int32), mask.astype(np.uint8)
    img = np.asarray(image, dtype=np.float64)
    if not np.isfinite(img[mask]).all():
        raise ValueError("image has non-finite values inside the body mask")
    seg = slic(img, n_segments=n_segments, compactness=compactness, spacing=spacing, mask=mask, channel_axis=None,
               start_label=1, enforce_connectivity=True, sigma=0)
    seg[~mask] = 0
    ids = relabel_sequential(seg)[0].astype(np.int32)
    return ids, mask.astype(np.uint8)


