"""Self-supervised training episodes from superpixel pseudolabels (docs/method.md#episodes).

One episode takes one axial slice of a training scan and one of its superpixels as the "class". Support and
query are independent augmentations of the same (slice, superpixel mask) pair.

Determinism: episode ``idx`` is a pure function of ``(seed, idx)``. The slice comes from a seeded permutation of
the candidate slices per pass ("epoch") over them; everything else (superpixel id, redirects in legacy mode, all
augmentations) is drawn from ``np.random.default_rng([seed, idx])``. Results therefore do not depend on DataLoader
workers or their state, and a run resumed at step k gets exactly the episodes it would have got. Index the dataset
with the global step (DDP ranks: disjoint index streams, e.g. ``step * world_size + rank``).

Sampling (``episode_sampling``):

- ``"compact"`` (default): the eligible slices (non-empty pseudolabel and not excluded) are precomputed; the
  superpixel id is drawn uniformly among the ids present in the slice, so the foreground is never empty before
  augmentation (augmentation can still push a superpixel at the image edge out of view).
- ``"legacy"`` (parity, docs/method.md#q3-slice-redirects): as the original. The starting slice is drawn over all
  slices; a slice without superpixels moves on to slice i+1; an excluded slice is replaced by a uniform redraw over
  slices 0..n-2 (``torch.randint(0, len - 1)``), repeatedly; the id is drawn from 1..max_id-1
  (``torch.randint(1, max_id)``), so with legacy id maps it can be empty (empty-FG episode) and the top id is never
  drawn. A slice whose max id is 1 (where the original's ``randint(1, 1)`` raises) yields id 1.

Setting-2 exclusion (``exclusion_rule``, from ``classmap_<min_fg>.json``): ``"any"`` (default, leak-free) drops every
slice holding >= 1 pixel of ANY excluded class; ``"all"`` (leaky, later lineages only,
docs/method.md#q8-leaky-exclusion) drops only slices holding all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from dataloaders import niftiio
from dataloaders.augmentations import AugParams, augment, get_preset
from dataloaders.dataset_info import DatasetInfo
from dataloaders.derived import check_superpixels_made_from, classmap_command
from dataloaders.normalization import Normalizer, fit_normalizer, resize_slices, to_three_channels

logger = logging.getLogger(__name__)

ExclusionRule = Literal["any", "all"]
EpisodeSampling = Literal["compact", "legacy"]

_PERM_TAG = 0x5EED  # separates the slice-permutation streams from the per-episode streams
_MAX_AUG_RETRIES = 10  # support augmentations redrawn when the foreground leaves the view
_MAX_REDIRECTS = 100_000


@dataclass(frozen=True)
class EpisodeMeta:
    """Where an episode comes from.

    Attributes:
        index: the episode index.
        scan_id: scan id.
        z: slice index (SimpleITK axis 0).
        superpix_id: the superpixel id used as foreground.
        slice_index: position of the slice in the dataset's slice table.
        n_redirects: legacy mode: empty-slice moves plus exclusion redraws before the slice was accepted.
        fg_pixels: foreground pixels of the (unaugmented) mask; 0 is possible in legacy mode only.
    """

    index: int
    scan_id: int
    z: int
    superpix_id: int
    slice_index: int
    n_redirects: int
    fg_pixels: int


def episode_tensors(views: Sequence[tuple[np.ndarray, np.ndarray]], n_shots: int) -> dict[str, torch.Tensor]:
    """The network's tensors of one episode from its augmented views (the first ``n_shots`` are the support).

    Args:
        views: (image (H, W) float32, mask (H, W) int64) per view, support views first, then the queries.

    Returns:
        ``support_images`` (S, 3, H, W), ``support_fg``/``support_bg`` (S, H, W) float32, ``query_images``
        (Q, 3, H, W), ``query_labels`` (Q, H, W) int64.
    """
    imgs = np.stack([v[0] for v in views])
    labs = np.stack([v[1] for v in views])
    support_fg = torch.from_numpy(labs[:n_shots].astype(np.float32))
    return {
        "support_images": torch.from_numpy(to_three_channels(imgs[:n_shots])),
        "support_fg": support_fg,
        "support_bg": 1.0 - support_fg,
        "query_images": torch.from_numpy(to_three_channels(imgs[n_shots:])),
        "query_labels": torch.from_numpy(labs[n_shots:]),
    }


class SuperpixelEpisodeDataset(Dataset):
    """Episodes of (support, query) built from superpixels of the fold's training scans, held in RAM.

    Args:
        data_dir: processed-data folder (``image_<id>``, ``superpix-<scale>_<id>``, ``classmap_<min_fg>.json``).
        info: the dataset description (modality, label names).
        scan_ids: the fold's training scans.
        exclude_classes: class ids whose slices are dropped (setting 2); ``[]`` for setting 1.
        exclusion_rule: ``"any"`` (leak-free default) or ``"all"`` (leaky, docs/method.md#q8-leaky-exclusion).
        superpix_scale: superpixel file tag (``"MIDDLE"``).
        min_fg: which class map to read, ``classmap_<min_fg>.json`` (only needed with exclusions).
        normalizer: intensity normalisation; default from the modality, CT statistics over ``scan_ids``.
        n_episodes: dataset length; default the number of candidate slices (one pass).
        seed: run seed (>= 0).
        aug: augmentation parameters or a preset name (``"sabs_aug"``, ``"aug_v3"``, ``"identity"``).
        episode_sampling: ``"compact"`` (default) or ``"legacy"`` (parity, docs/method.md#q3-slice-redirects).
        n_shots: number of support copies.
        n_queries: number of query copies.
        input_size: slices of another in-plane size are resized to this square size (images bilinearly,
            superpixel ids by nearest pixel: :func:`dataloaders.normalization.resize_slices`), never cropped or
            padded; the resized scans are logged.
        progress: show a tqdm bar while loading.

    Raises:
        niftiio.DataFormatError: missing/corrupt files, a class map that does not fit the scans, or superpixels
            made from another version of their image (``dataloaders.derived``).
        ValueError: bad arguments, or no slice left to sample from.
    """

    def __init__(self, data_dir: str | Path, info: DatasetInfo, scan_ids: Sequence[int],
                 exclude_classes: Sequence[int] = (), exclusion_rule: ExclusionRule = "any",
                 superpix_scale: str = "MIDDLE", min_fg: int = 1, normalizer: Normalizer | None = None,
                 n_episodes: int | None = None, seed: int = 0, aug: AugParams | str = "sabs_aug",
                 episode_sampling: EpisodeSampling = "compact", n_shots: int = 1, n_queries: int = 1,
                 input_size: int = 256, progress: bool = True) -> None:
        if exclusion_rule not in ("any", "all"):
            raise ValueError(f"exclusion_rule must be 'any' or 'all', got {exclusion_rule!r}")
        if episode_sampling not in ("compact", "legacy"):
            raise ValueError(f"episode_sampling must be 'compact' or 'legacy', got {episode_sampling!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if n_shots < 1 or n_queries < 1 or input_size < 1:
            raise ValueError(f"n_shots, n_queries and input_size must be >= 1, got {n_shots}, {n_queries}, "
                             f"{input_size}")
        if not scan_ids:
            raise ValueError("SuperpixelEpisodeDataset needs at least one training scan")
        bad = [c for c in exclude_classes if c not in info.labels or c == 0]
        if bad:
            raise ValueError(f"exclude_classes {bad} are not foreground classes of {info.name} "
                             f"({info.class_names})")
        self.data_dir = Path(data_dir)
        self.scan_ids = [int(i) for i in scan_ids]
        self.exclude_classes = [int(c) for c in exclude_classes]
        self.exclusion_rule = exclusion_rule
        self.episode_sampling = episode_sampling
        self.seed = int(seed)
        self.aug = get_preset(aug) if isinstance(aug, str) else aug
        self.n_shots, self.n_queries, self.input_size = n_shots, n_queries, input_size

        self.info = info
        raw_images, superpix = self._load(superpix_scale, progress)
        self.normalizer = normalizer if normalizer is not None else fit_normalizer(
            info.modality, raw_images, self.scan_ids)
        self.images: list[np.ndarray] = []  # per scan, (Z, S, S) float32, normalised
        self.superpix: list[np.ndarray] = []  # per scan, (Z, S, S) smallest int dtype
        resized = {}
        for k, sid in enumerate(self.scan_ids):
            img = self.normalizer(raw_images[k])
            raw_images[k] = None  # free the raw copy early
            if img.shape[1:] != (input_size, input_size):
                resized[sid] = "x".join(str(v) for v in img.shape[1:])
            self.images.append(np.ascontiguousarray(resize_slices(img, input_size, "image")))
            sp = resize_slices(superpix[k], input_size, "ids")
            self.superpix.append(np.ascontiguousarray(sp.astype(np.min_scalar_type(max(int(sp.max()), 1)))))
        if resized:
            logger.warning("training scans %s have in-plane sizes %s, not input_size %d: resized to %dx%d (images "
                           "bilinear, superpixels nearest)", list(resized), sorted(set(resized.values())),
                           input_size, input_size, input_size)

        # slice table: (scan position, z) for every slice of every scan
        self.slice_scan = np.concatenate([np.full(v.shape[0], k, np.int64) for k, v in enumerate(self.images)])
        self.slice_z = np.concatenate([np.arange(v.shape[0], dtype=np.int64) for v in self.images])
        self.present_ids: list[np.ndarray] = []  # superpixel ids present in each slice
        max_ids = []
        for k, z in zip(self.slice_scan, self.slice_z, strict=True):
            counts = np.bincount(self.superpix[k][z].ravel())
            self.present_ids.append(np.flatnonzero(counts[1:]) + 1)
            max_ids.append(counts.size - 1)
        self.slice_max_id = np.array(max_ids, dtype=np.int64)  # legacy sampling draws below this

        self.excluded, per_class = self._exclusion_mask(info, min_fg)
        nonempty = np.array([ids.size > 0 for ids in self.present_ids])
        self.eligible = np.flatnonzero(nonempty & ~self.excluded)
        if self.eligible.size == 0:
            raise niftiio.DataFormatError(
                f"no eligible training slice in scans {self.scan_ids} (every slice is empty or excluded by "
                f"{self.exclude_classes}, rule '{exclusion_rule}')")
        n_slices = self.slice_z.size
        self._candidates = self.eligible if episode_sampling == "compact" else np.arange(n_slices)
        self.n_episodes = int(n_episodes) if n_episodes is not None else int(self._candidates.size)
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {self.n_episodes}")
        self._stats = {
            "n_scans": len(self.scan_ids),
            "n_slices": int(n_slices),
            "n_empty_slices": int((~nonempty).sum()),
            "n_excluded_slices": int(self.excluded.sum()),
            "excluded_slices_per_class": per_class,
            "n_eligible_slices": int(self.eligible.size),
            "exclusion_rule": exclusion_rule,
            "exclude_classes": list(self.exclude_classes),
            "episode_sampling": episode_sampling,
        }
        logger.info("superpixel episodes: %d scans, %d slices, %d without superpixels, %d excluded (%s rule, "
                    "classes %s: %s), %d eligible", len(self.scan_ids), n_slices, self._stats["n_empty_slices"],
                    self._stats["n_excluded_slices"], exclusion_rule, self.exclude_classes, per_class,
                    self.eligible.size)
        if exclusion_rule == "all" and len(self.exclude_classes) > 1:
            logger.warning("exclusion_rule 'all' is the leaky rule of later lineages "
                           "(docs/method.md#q8-leaky-exclusion): slices holding only some of %s stay in training",
                           self.exclude_classes)
        self._perm_cache: dict[int, np.ndarray] = {}

    # ---------------------------------------------------------------- construction helpers
    def _load(self, scale: str, progress: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        images, superpix = [], []
        for sid in tqdm(self.scan_ids, desc="loading superpixel scans", disable=not progress):
            scan = niftiio.load_scan(self.data_dir, sid, with_label=False, with_superpix=True, superpix_scale=scale)
            check_superpixels_made_from(self.data_dir, self.info, sid, scan.image, scan.geometry, scale)
            if scan.superpix.min() < 0:
                raise niftiio.DataFormatError(
                    f"{niftiio.superpix_path(self.data_dir, sid, scale)}: negative superpixel ids")
            images.append(scan.image)
            superpix.append(scan.superpix)
        return images, superpix

    def _exclusion_mask(self, info: DatasetInfo, min_fg: int) -> tuple[np.ndarray, dict[str, int]]:
        """Slices to drop under the exclusion rule, and per excluded class how many slices hold it."""
        n = self.slice_z.size
        if not self.exclude_classes:
            return np.zeros(n, dtype=bool), {}
        names = [info.labels[c] for c in self.exclude_classes]
        cmap = niftiio.load_classmap(self.data_dir, names, self.scan_ids, min_fg,
                                     rebuild=classmap_command(self.data_dir, info, min_fg))
        path = niftiio.classmap_path(self.data_dir, min_fg)
        offsets = np.concatenate([[0], np.cumsum([v.shape[0] for v in self.images])])
        holds = np.zeros((len(names), n), dtype=bool)
        for j, name in enumerate(names):
            for k, sid in enumerate(self.scan_ids):
                zs = np.asarray(cmap[name][str(sid)], dtype=np.int64)
                n_z = self.images[k].shape[0]
                if zs.size and (zs.min() < 0 or zs.max() >= n_z):
                    raise niftiio.DataFormatError(
                        f"{path}: class '{name}', scan {sid} lists slices outside 0..{n_z - 1}; rebuild the index")
                holds[j, offsets[k] + zs] = True
        excluded = holds.any(axis=0) if self.exclusion_rule == "any" else holds.all(axis=0)
        return excluded, {name: int(holds[j].sum()) for j, name in enumerate(names)}

    # ---------------------------------------------------------------- public API
    def training_statistics(self) -> dict[str, Any]:
        """Slice counts: total, without superpixels, excluded (and per excluded class), eligible."""
        return dict(self._stats)

    def __len__(self) -> int:
        return self.n_episodes

    def _slice_for(self, idx: int) -> int:
        """Candidate slice of episode ``idx``: position ``idx % n`` of the seeded permutation of pass ``idx // n``."""
        n = self._candidates.size
        epoch, pos = divmod(idx, n)
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch, _PERM_TAG]).permutation(n)
            self._perm_cache = {epoch: perm}  # keep only the current pass
        return int(self._candidates[perm[pos]])

    def _draw(self, idx: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """Slice, superpixel id and redirect count of episode ``idx`` (draws from ``rng`` before augmentation)."""
        s = self._slice_for(idx)
        if self.episode_sampling == "compact":
            ids = self.present_ids[s]
            return s, int(ids[rng.integers(ids.size)]), 0
        n = self.slice_z.size
        redirects = 0
        while True:
            if redirects > _MAX_REDIRECTS:
                raise RuntimeError(f"legacy episode sampling found no usable slice after {_MAX_REDIRECTS} tries")
            if self.slice_max_id[s] < 1:  # empty slice -> next slice (docs/method.md#q3-slice-redirects)
                s = (s + 1) % n
                redirects += 1
                continue
            if self.excluded[s]:  # setting-2 hit -> uniform redraw over 0..n-2 (torch.randint(0, len - 1))
                s = int(rng.integers(0, max(n - 1, 1)))
                redirects += 1
                continue
            break
        max_id = int(self.slice_max_id[s])
        return s, int(rng.integers(1, max(max_id, 2))), redirects  # 1..max_id-1, docs/method.md#q2-superpixel-numbering

    def _episode_rng(self, idx: int) -> np.random.Generator:
        if not 0 <= idx < self.n_episodes:
            raise IndexError(f"episode index {idx} out of range 0..{self.n_episodes - 1}")
        return np.random.default_rng([self.seed, int(idx)])

    def get_meta(self, idx: int) -> EpisodeMeta:
        """Where episode ``idx`` comes from (cheap: no augmentation)."""
        s, sp_id, redirects = self._draw(idx, self._episode_rng(idx))
        k, z = int(self.slice_scan[s]), int(self.slice_z[s])
        fg = int(np.count_nonzero(self.superpix[k][z] == sp_id))
        return EpisodeMeta(int(idx), self.scan_ids[k], z, sp_id, s, redirects, fg)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """Episode ``idx``.

        Returns:
            dict with ``support_images`` (S, 3, H, W) float32, ``support_fg`` and ``support_bg`` (S, H, W) float32
            in {0, 1} (bg = 1 - fg), ``query_images`` (Q, 3, H, W) float32, ``query_labels`` (Q, H, W) int64 in
            {0, 1}, and the ints ``index``, ``scan_id``, ``z_id``, ``superpix_id``.
        """
        idx = int(idx)
        rng = self._episode_rng(idx)
        s, sp_id, _ = self._draw(idx, rng)
        k, z = int(self.slice_scan[s]), int(self.slice_z[s])
        image = self.images[k][z]
        mask = (self.superpix[k][z] == sp_id).astype(np.int64)
        views = [augment(image, mask, self.aug, rng) for _ in range(self.n_shots + self.n_queries)]
        if self.episode_sampling == "compact":
            # An augmentation can push a border superpixel out of view; a support needs foreground, so redraw
            # that support's augmentation (from the same episode generator: still a pure function of (seed, idx))
            # and, if it keeps vanishing, use the un-augmented view.
            for v in range(self.n_shots):
                for _ in range(_MAX_AUG_RETRIES):
                    if views[v][1].any():
                        break
                    views[v] = augment(image, mask, self.aug, rng)
                if not views[v][1].any():
                    views[v] = (image.astype(np.float32), mask)
        return {**episode_tensors(views, self.n_shots), "index": idx, "scan_id": self.scan_ids[k], "z_id": z,
                "superpix_id": sp_id}
