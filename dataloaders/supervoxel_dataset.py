"""Self-supervised training episodes from 3D supervoxels (``superpix_dim=3``): the ADNet lineage's episodes.

One episode takes one supervoxel of a training scan as the "class"; support and query are two **different**
neighbouring slices of it (the supervoxel's cross-sections on slices z and z + 1), instead of two augmentations of
one slice (:mod:`dataloaders.superpixel_dataset`, the original). The lineage (``sha168/ADNet``, ``shenqq377/Q-Net``)
draws a scan, a supervoxel spanning enough slices, a run of successive slices of it, and a random direction (support
above or below the query), and redraws while the support cross-section is under 200 pixels at 256 x 256. Here:

- **units**: every (scan, supervoxel) with at least one usable window, where a window is ``n_shots + n_queries``
  successive slices z, z + 1, ... that all hold the supervoxel and are all trainable (not excluded by setting 2:
  the exclusion applies to every slice of the episode), used in either direction (support first or query first),
  provided each support slice holds at least ``min_support_pixels`` pixels of it (default 200 at 256 x 256, scaled
  by the pixel count, as the lineage) and each query slice at least one;
- **episode i** (a pure function of ``(seed, i)``, as the 2D dataset): the unit at position ``i % U`` of the seeded
  permutation of pass ``i // U`` (every supervoxel once per pass), then one of its windows and a direction drawn
  uniformly from ``np.random.default_rng([seed, i])``, then an independent augmentation of each slice from that
  generator (the same ``which_aug`` as the 2D episodes, so a 2D/3D comparison differs only in the pseudolabels).

A supervoxel is connected in 3D (SLIC enforces connectivity), so the slices that hold it are consecutive and any
two neighbours of them qualify. ``episode_sampling="legacy"`` (the original's 2D quirks) does not apply here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dataloaders import niftiio
from dataloaders.augmentations import AugParams, augment
from dataloaders.dataset_info import DatasetInfo
from dataloaders.derived import check_made_from, dataset_arg, image_fingerprint
from dataloaders.normalization import Normalizer
from dataloaders.slice_counts import slice_counts
from dataloaders.superpixel_dataset import _MAX_AUG_RETRIES, ExclusionRule, SuperpixelEpisodeDataset, episode_tensors

LINEAGE_MIN_SUPPORT_PIXELS = 200  # ADNet's smallest support cross-section, in pixels of a 256 x 256 slice


def supervoxel_command(data_dir: str | Path, info: DatasetInfo, scale: str = "MIDDLE") -> str:
    """The complete command that (re)builds the 3D supervoxel files of ``data_dir``."""
    tail = f" --scale {scale}" if scale != "MIDDLE" else ""
    return (f"python -m data_preprocessing.pseudolabel --data-dir {data_dir} --dataset {dataset_arg(info)} "
            f"--dim 3{tail}")


def default_min_support_pixels(input_size: int) -> int:
    """The lineage's 200 pixels at 256 x 256, scaled to ``input_size`` x ``input_size`` (at least 1)."""
    return max(1, int(round(LINEAGE_MIN_SUPPORT_PIXELS * (input_size / 256) ** 2)))


@dataclass(frozen=True)
class SupervoxelEpisodeMeta:
    """Where a 3D episode comes from.

    Attributes:
        index: the episode index.
        scan_id: scan id.
        supervoxel_id: the supervoxel used as foreground.
        support_z: support slice indices (SimpleITK axis 0), ``n_shots`` of them.
        query_z: query slice indices, ``n_queries`` of them.
        support_pixels: foreground pixels of each (unaugmented) support slice.
        query_pixels: foreground pixels of each (unaugmented) query slice.
    """

    index: int
    scan_id: int
    supervoxel_id: int
    support_z: tuple[int, ...]
    query_z: tuple[int, ...]
    support_pixels: tuple[int, ...]
    query_pixels: tuple[int, ...]


class SupervoxelEpisodeDataset(SuperpixelEpisodeDataset):
    """Episodes whose support and query are different slices of one 3D supervoxel, held in RAM.

    Args:
        data_dir: processed-data folder (``image_<id>``, ``supervox-<scale>_<id>``, ``classmap_<min_fg>.json``).
        info: the dataset description.
        scan_ids: the fold's training scans.
        exclude_classes: class ids whose slices may not appear in an episode (setting 2); ``[]`` for setting 1.
        exclusion_rule: ``"any"`` (leak-free default) or ``"all"`` (leaky, docs/method.md#q8-leaky-exclusion).
        superpix_scale: supervoxel file tag (``"MIDDLE"``).
        min_fg: which class map to read (only needed with exclusions).
        normalizer: intensity normalisation; default from the modality, CT statistics over ``scan_ids``.
        n_episodes: dataset length; default the number of usable supervoxels (one pass).
        seed: run seed (>= 0).
        aug: augmentation parameters or a preset name, applied to each slice independently.
        n_shots: support slices per episode.
        n_queries: query slices per episode.
        input_size: slices of another in-plane size are resized to this square size.
        min_support_pixels: smallest support cross-section in pixels at ``input_size`` (default: the lineage's 200
            at 256 x 256, scaled).
        progress: show a tqdm bar while loading.

    Raises:
        niftiio.DataFormatError: a missing supervoxel file (the message gives the command that builds it),
            supervoxels made from another version of their image, or no usable supervoxel at all.
        ValueError: bad arguments.
    """

    def __init__(self, data_dir: str | Path, info: DatasetInfo, scan_ids: Sequence[int],
                 exclude_classes: Sequence[int] = (), exclusion_rule: ExclusionRule = "any",
                 superpix_scale: str = "MIDDLE", min_fg: int = 1, normalizer: Normalizer | None = None,
                 n_episodes: int | None = None, seed: int = 0, aug: AugParams | str = "sabs_aug",
                 n_shots: int = 1, n_queries: int = 1, input_size: int = 256,
                 min_support_pixels: int | None = None, progress: bool = True) -> None:
        self.min_support_pixels = default_min_support_pixels(input_size) if min_support_pixels is None \
            else int(min_support_pixels)
        if self.min_support_pixels < 1:
            raise ValueError(f"min_support_pixels must be >= 1, got {min_support_pixels}")
        super().__init__(data_dir, info, scan_ids, exclude_classes=exclude_classes, exclusion_rule=exclusion_rule,
                         superpix_scale=superpix_scale, min_fg=min_fg, normalizer=normalizer,
                         n_episodes=n_episodes, seed=seed, aug=aug, episode_sampling="compact", n_shots=n_shots,
                         n_queries=n_queries, input_size=input_size, progress=progress)
        self._build_units(superpix_scale)
        self.n_episodes = int(n_episodes) if n_episodes is not None else int(self.unit_scan.size)

    # ---------------------------------------------------------------- construction helpers
    def _load(self, scale: str, progress: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Raw images and supervoxel volumes of the training scans, checked against each other."""
        images, supervox = [], []
        for sid in tqdm(self.scan_ids, desc="loading supervoxel scans", disable=not progress):
            path = niftiio.supervox_path(self.data_dir, sid, scale)
            rebuild = supervoxel_command(self.data_dir, self.info, scale)
            if not path.is_file():
                raise niftiio.DataFormatError(f"{path}: supervoxel file missing for scan {sid} (superpix_dim=3); "
                                              f"build it with {rebuild}")
            image, geom = niftiio.read_volume(niftiio.image_path(self.data_dir, sid))
            ids, sgeom = niftiio.read_label_volume(path)
            if ids.shape != image.shape or (why := geom.mismatch(sgeom)) is not None:
                detail = f"shape {ids.shape} vs {image.shape}" if ids.shape != image.shape else why
                raise niftiio.DataFormatError(f"{path}: not on the grid of image_{sid}.nii.gz ({detail}); "
                                              f"rebuild it with {rebuild}")
            check_made_from(path, niftiio.image_path(self.data_dir, sid), image_fingerprint(image, geom), rebuild)
            if ids.min() < 0:
                raise niftiio.DataFormatError(f"{path}: negative supervoxel ids")
            images.append(image.astype(np.float32, copy=False))
            supervox.append(ids)
        return images, supervox

    def _build_units(self, scale: str) -> None:
        """Usable (scan, supervoxel) units and their windows (start slice, direction), as flat arrays."""
        k_len = self.n_shots + self.n_queries
        offsets = np.concatenate([[0], np.cumsum([v.shape[0] for v in self.images])])
        unit_scan, unit_id, ptr, codes = [], [], [0], []
        trainable = np.zeros(self.slice_z.size, dtype=bool)  # slices some episode can use
        n_supervoxels = 0
        for k in range(len(self.scan_ids)):
            counts = slice_counts(self.superpix[k])[:, 1:]  # (Z, K): pixels of id j+1 on slice z
            n_z, n_ids = counts.shape
            n_supervoxels += int((counts.sum(0) > 0).sum())
            if n_z < k_len:
                continue
            ok = (counts > 0) & ~self.excluded[offsets[k]:offsets[k + 1], None]  # (Z, K)
            big = counts >= self.min_support_pixels
            starts = n_z - k_len + 1
            win_ok = np.ones((starts, n_ids), dtype=bool)
            fwd_big = np.ones((starts, n_ids), dtype=bool)  # support = the first n_shots slices of the window
            bwd_big = np.ones((starts, n_ids), dtype=bool)  # support = the last n_shots slices (reversed order)
            for j in range(k_len):
                win_ok &= ok[j:j + starts]
                if j < self.n_shots:
                    fwd_big &= big[j:j + starts]
                if j >= k_len - self.n_shots:
                    bwd_big &= big[j:j + starts]
            valid = np.stack([win_ok & fwd_big, win_ok & bwd_big], axis=-1)  # (starts, K, 2)
            for sv in np.flatnonzero(valid.any(axis=(0, 2))):
                z0, direction = np.nonzero(valid[:, sv, :])
                unit_scan.append(k)
                unit_id.append(sv + 1)
                codes.append(2 * z0 + direction)  # sorted by start slice, then direction
                ptr.append(ptr[-1] + z0.size)
                for z in np.unique(z0):
                    trainable[offsets[k] + z:offsets[k] + z + k_len] = True
        if not unit_scan:
            raise niftiio.DataFormatError(
                f"no usable supervoxel in scans {self.scan_ids}: none spans {k_len} successive trainable slices "
                f"with >= {self.min_support_pixels} support pixels (exclusion {self.exclude_classes}, rule "
                f"'{self.exclusion_rule}'); check the supervox-{scale} files or lower n_sv")
        self.unit_scan = np.asarray(unit_scan, dtype=np.int64)
        self.unit_id = np.asarray(unit_id, dtype=np.int64)
        self.unit_ptr = np.asarray(ptr, dtype=np.int64)
        self.unit_codes = np.concatenate(codes).astype(np.int64)
        self._candidates = np.arange(self.unit_scan.size)  # the base class permutes these per pass
        self._perm_cache = {}
        self.eligible = np.flatnonzero(trainable)  # what an episode can show (dataloaders.leakage checks these)
        self._stats.update({
            "superpix_dim": 3,
            "n_supervoxels": n_supervoxels,
            "n_usable_supervoxels": int(self.unit_scan.size),
            "n_windows": int(self.unit_codes.size),
            "n_eligible_slices": int(self.eligible.size),
            "min_support_pixels": self.min_support_pixels,
        })

    # ---------------------------------------------------------------- sampling
    def _draw3d(self, idx: int, rng: np.random.Generator) -> tuple[int, int, list[int], list[int]]:
        """Scan position, supervoxel id, support slices and query slices of episode ``idx``."""
        u = self._slice_for(idx)  # the unit of this episode (seeded permutation per pass)
        lo, hi = int(self.unit_ptr[u]), int(self.unit_ptr[u + 1])
        z0, direction = divmod(int(self.unit_codes[lo + int(rng.integers(hi - lo))]), 2)
        zs = list(range(z0, z0 + self.n_shots + self.n_queries))
        if direction:
            zs.reverse()
        return int(self.unit_scan[u]), int(self.unit_id[u]), zs[:self.n_shots], zs[self.n_shots:]

    def get_meta(self, idx: int) -> SupervoxelEpisodeMeta:  # type: ignore[override]
        """Where episode ``idx`` comes from (cheap: no augmentation)."""
        k, sv, sup, qry = self._draw3d(int(idx), self._episode_rng(int(idx)))
        vol = self.superpix[k]
        return SupervoxelEpisodeMeta(
            int(idx), self.scan_ids[k], sv, tuple(sup), tuple(qry),
            tuple(int(np.count_nonzero(vol[z] == sv)) for z in sup),
            tuple(int(np.count_nonzero(vol[z] == sv)) for z in qry))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """Episode ``idx``.

        Returns:
            The keys of :meth:`SuperpixelEpisodeDataset.__getitem__` (``z_id`` is the first support slice and
            ``superpix_id`` the supervoxel id), plus ``query_z_id`` (the first query slice).
        """
        idx = int(idx)
        rng = self._episode_rng(idx)
        k, sv, sup, qry = self._draw3d(idx, rng)
        vol, img = self.superpix[k], self.images[k]
        views = [augment(img[z], (vol[z] == sv).astype(np.int64), self.aug, rng) for z in sup + qry]
        # as in the 2D episodes: a support whose foreground an augmentation pushed out of view is redrawn, and
        # falls back to the un-augmented slice
        for v, z in enumerate(sup):
            for _ in range(_MAX_AUG_RETRIES):
                if views[v][1].any():
                    break
                views[v] = augment(img[z], (vol[z] == sv).astype(np.int64), self.aug, rng)
            if not views[v][1].any():
                views[v] = (img[z].astype(np.float32), (vol[z] == sv).astype(np.int64))
        return {
            **episode_tensors(views, self.n_shots),
            "index": idx,
            "scan_id": self.scan_ids[k],
            "z_id": sup[0],
            "query_z_id": qry[0],
            "superpix_id": sv,
        }

