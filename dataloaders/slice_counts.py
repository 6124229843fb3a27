"""Voxel counts of every integer id on every slice of a volume: the one computation behind the class-slice index
(which slices hold an organ) and the supervoxel episodes (which slices a supervoxel crosses).
"""

from __future__ import annotations

import numpy as np


def slice_counts(volume: np.ndarray, n_values: int | None = None) -> np.ndarray:
    """How many voxels of each id every slice holds.

    Args:
        volume: (Z, H, W) non-negative integer ids (labels or supervoxel ids).
        n_values: number of count columns (ids ``0..n_values-1``); default ``max id + 1``.

    Returns:
        (Z, n_values) int64: ``counts[z, k]`` = voxels of id k on slice z.

    Raises:
        ValueError: not a 3D volume, or an id >= ``n_values``.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) volume, got shape {volume.shape}")
    n_z = volume.shape[0]
    top = int(volume.max()) + 1 if volume.size else 1
    k = top if n_values is None else int(n_values)
    if top > k:
        raise ValueError(f"id {top - 1} does not fit {k} count columns")
    flat = (np.arange(n_z, dtype=np.int64)[:, None] * k + volume.reshape(n_z, -1).astype(np.int64)).ravel()
    return np.bincount(flat, minlength=n_z * k).reshape(n_z, k)
