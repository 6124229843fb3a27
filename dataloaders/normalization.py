"""Load-time intensity normalisation and network input format (docs/method.md#load-time-normalisation).

- MR: z-score of each volume with its own mean and std (over the whole 3D volume).
- CT: one global z-score whose mean and std are taken over every voxel of the current fold's *training* scans.
  The statistics are part of the :class:`Normalizer`, which serialises to a plain dict so a checkpoint stores them
  and validation reuses them instead of rebuilding the training set (docs/method.md#q16-ct-statistics).
- The result is float32. The network input is the slice replicated to 3 channels (no ImageNet mean/std).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from dataloaders import niftiio

logger = logging.getLogger(__name__)

#: Smallest std used as a divisor (a constant volume would otherwise divide by zero).
STD_FLOOR = 1e-6

NormKind = Literal["per_volume", "global"]


def ct_stats(volumes: Iterable[np.ndarray]) -> tuple[float, float]:
    """Mean and (population) std over every voxel of all volumes, accumulated in float64.

    Per-volume means and sums of squared deviations are merged exactly (Chan et al.), so each volume is read once.

    Args:
        volumes: arrays of any shape, typically ``(Z, H, W)`` raw CT volumes.

    Raises:
        ValueError: no voxels at all.
    """
    n_total, mean, m2 = 0, 0.0, 0.0
    for vol in volumes:
        v = np.asarray(vol, dtype=np.float64)
        n = v.size
        if n == 0:
            continue
        v_mean = float(v.mean())
        v_m2 = float(np.square(v - v_mean).sum())
        delta = v_mean - mean
        n_new = n_total + n
        mean += delta * n / n_new
        m2 += v_m2 + delta * delta * n_total * n / n_new
        n_total = n_new
    if n_total == 0:
        raise ValueError("ct_stats: no voxels given")
    return mean, math.sqrt(m2 / n_total)


@dataclass(frozen=True)
class Normalizer:
    """Intensity normalisation of one dataset/fold.

    Attributes:
        kind: ``"per_volume"`` (MR: each volume's own mean/std) or ``"global"`` (CT: fixed ``mean``/``std``).
        mean: global mean (``None`` for per-volume).
        std: global std (``None`` for per-volume); divisions use ``max(std, STD_FLOOR)``.
        scan_ids: the scans the global statistics were computed on (for the record, docs/method.md#q16-ct-statistics).
    """

    kind: NormKind
    mean: float | None = None
    std: float | None = None
    scan_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("per_volume", "global"):
            raise ValueError(f"Normalizer kind must be 'per_volume' or 'global', got {self.kind!r}")
        if self.kind == "global" and (self.mean is None or self.std is None):
            raise ValueError("a global Normalizer needs mean and std")
        if self.std is not None and not self.std >= 0:
            raise ValueError(f"Normalizer std must be >= 0, got {self.std}")

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """Normalise a volume (any shape, typically ``(Z, H, W)``) and return float32."""
        v = np.asarray(volume, dtype=np.float64)
        if self.kind == "per_volume":
            mean, std = float(v.mean()), float(v.std())
        else:
            mean, std = float(self.mean), float(self.std)
        return ((v - mean) / max(std, STD_FLOOR)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints and JSON."""
        return {"kind": self.kind, "mean": self.mean, "std": self.std, "scan_ids": list(self.scan_ids)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        """Inverse of :meth:`to_dict`; a missing or unknown key raises ``KeyError`` naming it."""
        unknown = sorted(set(d) - {"kind", "mean", "std", "scan_ids"})
        if unknown:
            raise KeyError(f"normalizer dict has unknown keys {unknown}")
        if "kind" not in d:
            raise KeyError("normalizer dict has no 'kind'")
        mean, std = d.get("mean"), d.get("std")
        return cls(kind=d["kind"], mean=None if mean is None else float(mean), std=None if std is None else float(std),
                   scan_ids=tuple(int(i) for i in d.get("scan_ids", ())))


def fit_normalizer(modality: Literal["CT", "MR"], train_volumes: Iterable[np.ndarray] | None = None,
                   scan_ids: Sequence[int] = ()) -> Normalizer:
    """The normaliser of a modality: MR per volume; CT global with :func:`ct_stats` of the training volumes.

    Args:
        modality: ``"CT"`` or ``"MR"`` (``DatasetInfo.modality``).
        train_volumes: raw training volumes (required for CT, ignored for MR).
        scan_ids: ids of those volumes, recorded in the result.
    """
    if modality == "MR":
        return Normalizer("per_volume")
    if modality != "CT":
        raise ValueError(f"unknown modality {modality!r} (expected 'CT' or 'MR')")
    if train_volumes is None:
        raise ValueError("CT normalisation needs the fold's training volumes (or a stored Normalizer, "
                         "docs/method.md#q16-ct-statistics)")
    mean, std = ct_stats(train_volumes)
    return Normalizer("global", mean, std, tuple(int(i) for i in scan_ids))


def normalizer_from_scans(data_dir: str | Path, modality: Literal["CT", "MR"], scan_ids: Sequence[int],
                          progress: bool = True) -> Normalizer:
    """:func:`fit_normalizer` reading the training images from ``data_dir`` (only CT reads anything)."""
    if modality == "MR":
        return Normalizer("per_volume")
    ids = [int(i) for i in scan_ids]
    if not ids:
        raise ValueError("CT normalisation needs at least one training scan id")
    vols = (niftiio.read_volume(niftiio.image_path(data_dir, sid))[0]
            for sid in tqdm(ids, desc="CT statistics", disable=not progress))
    return fit_normalizer(modality, vols, ids)


# -------------------------------------------------------------------- network input format
def resize_slices(volume: np.ndarray, size: int, kind: Literal["image", "ids"]) -> np.ndarray:
    """Resize every slice of a ``(Z, H, W)`` volume to ``(size, size)``: the network input grid.

    The project's one rule for slices whose in-plane size is not ``input_size`` (never a silent crop or pad):
    images are resampled bilinearly (``torch.nn.functional.interpolate``, ``align_corners=False``, no
    antialiasing, the same call :class:`evaluation.predictors.FastPredictor` makes at test time); integer maps
    (superpixel ids, masks) take the nearest source pixel (``"nearest-exact"``), so no new id appears.

    Args:
        volume: ``(Z, H, W)`` array.
        size: output side length in pixels.
        kind: ``"image"`` (bilinear, float32 result) or ``"ids"`` (nearest, dtype kept).

    Returns:
        ``(Z, size, size)``; the input itself when it already has that size.
    """
    z, h, w = volume.shape
    if (h, w) == (size, size):
        return volume
    if kind == "image":
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
        out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return out[:, 0].numpy()
    if kind != "ids":
        raise ValueError(f"kind must be 'image' or 'ids', got {kind!r}")
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float64))[:, None]
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="nearest-exact")
    return out[:, 0].numpy().astype(volume.dtype)


def to_three_channels(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Replicate a slice (or a stack of slices) to 3 identical channels.

    Args:
        x: ``(H, W)`` or ``(N, H, W)``, numpy or torch.

    Returns:
        ``(3, H, W)`` or ``(N, 3, H, W)``, same library and dtype, contiguous.
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"to_three_channels expects (H, W) or (N, H, W), got shape {tuple(x.shape)}")
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(-3).expand(*x.shape[:-2], 3, *x.shape[-2:]).contiguous()
    return np.ascontiguousarray(np.broadcast_to(np.expand_dims(x, -3), x.shape[:-2] + (3,) + x.shape[-2:]))
