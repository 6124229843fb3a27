"""Test-time predictors for :func:`evaluation.ep1_alp.evaluate_fold`: the fast path and the original's naive path.

Both have the protocol's ``predict`` signature::

    predict(support_images (S, H, W) float32, support_masks (S, H, W) bool, query_images (N, H, W) float32)
        -> (N, H, W) bool

and are called once per (class, query scan, chunk). :class:`FastPredictor` encodes every distinct slice once per
fold (a feature cache keyed by the slice's bytes), pools the prototypes of each support set once and segments the
query slices in batches under ``torch.inference_mode``.
:class:`NaivePredictor` does what the original does: for every query slice, encode support and query together
and pool the prototypes again. With the model in eval mode both give the same logits (up to float rounding).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.normalization import to_three_channels
from models.grid_proto_fewshot import EpisodePrototypes

_MAX_CACHED_PROTOTYPES = 256  # support sets whose prototypes are kept (a fold has classes x chunks of them)


def _digest(x: np.ndarray) -> bytes:
    """Content key of an array: dtype, shape and a 16-byte BLAKE2b digest of its bytes."""
    x = np.ascontiguousarray(x)
    head = f"{x.dtype.str}{x.shape}".encode()
    return head + hashlib.blake2b(x.view(np.uint8).data, digest_size=16).digest()


def _images(x: np.ndarray, device: torch.device, input_size: int | None = None) -> torch.Tensor:
    """(N, H, W) float array -> (N, 3, S, S) float32 tensor on ``device``.

    S = ``input_size`` when given (slices of another size are resized bilinearly, ``align_corners=False``: the
    rule of :func:`dataloaders.normalization.resize_slices`), else S = H = W.
    """
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32).to(device)
    if input_size is not None and tuple(t.shape[-2:]) != (input_size, input_size):
        t = F.interpolate(t[:, None], size=(input_size, input_size), mode="bilinear", align_corners=False)[:, 0]
    return to_three_channels(t)


def _masks(masks: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, H, W) bool -> fg and bg float masks (S, H, W) on ``device``."""
    fg = torch.as_tensor(np.ascontiguousarray(masks), dtype=torch.float32, device=device)
    return fg, 1.0 - fg


class FastPredictor:
    """Encode each distinct slice once, cache support prototypes, segment query slices in batches.

    Across the calls of one fold (every class, query scan and chunk) a slice is encoded only once: features are
    cached by a digest of the slice's bytes (a query scan's slices are shared by every class whose range covers
    them; a support slice by every query scan), and the prototypes of a (support slices, masks) pair are cached
    too. Features are computed in eval mode, where they do not depend on the rest of the batch, so the logits
    equal the naive path's up to float rounding (tests/test_inference.py checks 1e-5).

    The caches assume the model's weights stay fixed: call :meth:`clear_cache` after changing them.

    Args:
        model: a :class:`models.grid_proto_fewshot.FewShotSeg`, put in eval mode here.
        device: where to run.
        window: ALP window at test time (``val_wsize``).
        batch_size: query slices per encoder pass (and per scoring pass).
        cache_mb: size limit of the feature cache in MiB (least recently used entries are dropped first);
            0 disables feature caching (every call encodes its query slices; prototypes stay cached).
        input_size: the network's input side (the config's ``input_size``). Slices of another in-plane size are
            resized bilinearly to it for the encoder only: support masks are pooled from their own grid onto the
            feature map, and the logits are upsampled from the feature map straight to the slice's own (H, W),
            so every prediction and metric is on the image's grid (never cropped or padded). ``None``: encode
            slices at their own size.

    Attributes:
        stats: counters ``encoded`` (slices through the encoder), ``feature_hits`` and ``prototype_hits``.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, window: int = 2, batch_size: int = 16,
                 cache_mb: float = 1024.0, input_size: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"eval batch size must be >= 1, got {batch_size}")
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.model, self.device, self.window, self.batch_size = model.eval(), device, window, batch_size
        self.cache_bytes = int(cache_mb * 2**20)
        self.input_size = input_size
        self._feats: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # digest -> (C, h, w) features
        self._feat_bytes = 0
        self._protos: OrderedDict[bytes, EpisodePrototypes] = OrderedDict()  # supports + masks
        self.stats = {"encoded": 0, "feature_hits": 0, "prototype_hits": 0}

    def clear_cache(self) -> None:
        """Forget cached features and prototypes (needed after the model's weights change)."""
        self._feats.clear()
        self._protos.clear()
        self._feat_bytes = 0

    def _features(self, slices: np.ndarray) -> torch.Tensor:
        """(N, H, W) slices -> (N, C, h, w) features, encoding only the slices not in the cache (in batches)."""
        keys = [_digest(s) for s in slices]
        todo = list(dict.fromkeys(k for k in keys if k not in self._feats))
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first position of each key
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start:start + self.batch_size]
                feats = self.model.encode(_images(slices[[first[k] for k in batch]], self.device, self.input_size))
                fresh.update(zip(batch, feats, strict=True))
            self.stats["encoded"] += len(todo)
        self.stats["feature_hits"] += len(keys) - len(todo)
        out = torch.stack([fresh[k] if k in fresh else self._feats[k] for k in keys])
        for k in keys:
            if k in self._feats:
                self._feats.move_to_end(k)
        if self.cache_bytes > 0:
            for k, f in fresh.items():
                self._feats[k] = f.clone()  # own storage: an eviction frees it
                self._feat_bytes += f.numel() * f.element_size()
            while self._feat_bytes > self.cache_bytes and self._feats:
                _, old = self._feats.popitem(last=False)
                self._feat_bytes -= old.numel() * old.element_size()
        return out

    def _prototypes(self, support_images: np.ndarray, support_masks: np.ndarray) -> EpisodePrototypes:
        """Prototypes of (S, H, W) support slices and masks, from the cache when this support set was seen."""
        key = _digest(support_images) + _digest(support_masks) + str(self.window).encode()  # native-grid bytes
        protos = self._protos.get(key)
        if protos is not None:
            self.stats["prototype_hits"] += 1
            self._protos.move_to_end(key)
            return protos
        fg, bg = _masks(support_masks, self.device)
        protos = self.model.prototypes_from_support(self._features(support_images), fg, bg, window=self.window)
        self._protos[key] = protos
        while len(self._protos) > _MAX_CACHED_PROTOTYPES:
            self._protos.popitem(last=False)
        return protos

    def _logit_batches(self, support_images: np.ndarray, support_masks: np.ndarray,
                       query_images: np.ndarray) -> Iterator[torch.Tensor]:
        """(n, 2, H, W) logits on ``device`` for consecutive batches of at most ``batch_size`` query slices."""
        protos = self._prototypes(support_images, support_masks)
        size = tuple(query_images.shape[-2:])
        for start in range(0, len(query_images), self.batch_size):
            feats = self._features(query_images[start:start + self.batch_size])
            yield self.model.segment_with_prototypes(feats, protos, size)

    @torch.inference_mode()
    def logits(self, support_images: np.ndarray, support_masks: np.ndarray, query_images: np.ndarray) -> torch.Tensor:
        """(N, 2, H, W) float32 CPU logits of the query slices against the support (shapes: module docstring)."""
        return torch.cat([x.float().cpu() for x in self._logit_batches(support_images, support_masks, query_images)])

    @torch.inference_mode()
    def __call__(self, support_images: np.ndarray, support_masks: np.ndarray, query_images: np.ndarray) -> np.ndarray:
        """(N, H, W) bool foreground masks: argmax of the logits, taken on the device.

        ``S_fg > S_bg`` is exactly ``argmax == 1`` (argmax picks the first index on ties) and, on CPU, some 300x
        faster than ``argmax`` over a dimension of size 2.
        """
        masks = [(x[:, 1] > x[:, 0]).cpu() for x in self._logit_batches(support_images, support_masks, query_images)]
        return torch.cat(masks).numpy()


class NaivePredictor:
    """The original's evaluation loop: one query slice at a time, support encoded again with every slice."""

    def __init__(self, model: torch.nn.Module, device: torch.device, window: int = 2) -> None:
        self.model, self.device, self.window = model.eval(), device, window

    @torch.inference_mode()
    def logits(self, support_images: np.ndarray, support_masks: np.ndarray, query_images: np.ndarray) -> torch.Tensor:
        """(N, 2, H, W) logits, one forward pass of the whole model per query slice."""
        supp = _images(support_images, self.device)[None]  # (1, S, 3, H, W)
        fg, bg = _masks(support_masks, self.device)
        out = []
        for z in range(len(query_images)):
            qry = _images(query_images[z:z + 1], self.device)[None]  # (1, 1, 3, H, W)
            res = self.model(supp, fg[None], bg[None], qry, window=self.window, compute_align=False)
            out.append(res.logits.float().cpu())
        return torch.cat(out)

    def __call__(self, support_images: np.ndarray, support_masks: np.ndarray, query_images: np.ndarray) -> np.ndarray:
        return (self.logits(support_images, support_masks, query_images).argmax(1) == 1).numpy()
