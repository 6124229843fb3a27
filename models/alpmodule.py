"""Adaptive local prototype pooling (ALP) classifier of ALPNet, with no learnable parameters
(docs/method.md#adaptive-local-prototype-pooling).

Re-implementation of the original's ``models/alpmodule.py`` (``MultiProtoAsConv``), split in two steps so that the
prototypes of one support can be computed once and reused for many query slices:

* :func:`compute_prototypes` - support features F (S, C, h, w) and a soft mask M (S, 1, h, w) at feature size ->
  :class:`Prototypes` (K, C) plus the mode actually used;
* :func:`score` - query features (N, C, h, w) and prototypes -> class score map (N, h, w).

Prototype modes:

* ``gridconv`` (background): local prototypes only = avg-pooled F over non-overlapping w x w windows whose avg-pooled
  mask is > ``thresh`` (0.95). When no window qualifies, the global prototype is used instead (mode ``mask``,
  ``fallback=True``; the original raised and skipped the step, docs/method.md#q14-no-background-window).
* ``gridconv+`` (foreground): local prototypes + global prototype(s); only when max avgpool_{4x4}(M) >= ``thresh``
  (the 4 is the original's hard-coded rule window, docs/method.md#q13-rule-window-4x4), otherwise mode ``mask``.
* ``mask``: the global prototype alone.

Global prototypes with S > 1 shots (docs/method.md#several-shots), ``multishot``:

* ``per_shot`` (default, the original's rule): ``gridconv+`` keeps one global row per shot,
  p_s = sum(F_s M_s) / (sum(M_s) + 1e-5), after the local prototypes of all shots; ``mask`` uses the mean of the
  per-shot p_s;
* ``pooled``: one area-weighted global prototype over all shots, p_g = sum_s sum(F_s M_s) / (sum_s sum(M_s) + 1e-5),
  in both modes.

With one shot both rules give the same prototype. Background ``gridconv`` local prototypes are collected over all
shots under either rule.

Scoring: prototypes and query features are L2-normalised (norms clamped at >= 1e-4), d_k(x) = 20 cos(q(x), p_k)
is computed as one matmul (the original's 1x1 conv), and the score is S(x) = sum_k softmax_k(d(x)) d_k(x) (grid
modes) or S(x) = d_1(x) (``mask``; the same formula with K = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PrototypeMode = Literal["gridconv", "gridconv+", "mask"]
MultiShotRule = Literal["per_shot", "pooled"]
MULTISHOT_RULES = ("per_shot", "pooled")
SCALE = 20.0  # cosine similarity multiplier
NORM_EPS = 1e-4  # lower clamp of the L2 norms
MASK_EPS = 1e-5  # added to the mask area in the global prototype
THRESH = 0.95  # FG_THRESH = BG_THRESH of the original
FG_GLOBAL_RULE_WINDOW = 4  # hard-coded window of the gridconv+ test (docs/method.md#q13-rule-window-4x4)


class EmptyMaskError(ValueError):
    """A foreground prototype was requested from an all-zero mask (empty support foreground)."""


@dataclass
class Prototypes:
    """Prototypes of one class for one episode.

    Attributes:
        vectors: (K, C) prototypes, not normalised. In ``gridconv+`` mode the global prototype(s) are the last rows
            (one per shot with ``multishot="per_shot"``, in shot order; one with ``"pooled"``).
        mode: Mode actually used (``gridconv+`` may fall back to ``mask``; ``gridconv`` to ``mask`` when empty).
        n_local: Number of local (window) prototypes among the K.
        fallback: True when local prototypes were requested (``gridconv``) but no window passed the threshold, so
            the global prototype was used (docs/method.md#q14-no-background-window).
    """

    vectors: torch.Tensor
    mode: PrototypeMode
    n_local: int
    fallback: bool = False


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize image-size masks to the feature size (align_corners=False), as the original does.

    Args:
        mask: (S, H, W) or (S, 1, H, W) binary or soft mask.
        size: Feature size (h, w).

    Returns:
        Soft mask (S, 1, h, w), float.
    """
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (S, H, W) or (S, 1, H, W), got {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False)


def _check_pair(feats: torch.Tensor, mask: torch.Tensor) -> None:
    """Validate F (S, C, h, w) and M (S, 1, h, w)."""
    if feats.dim() != 4:
        raise ValueError(f"features must be (S, C, h, w), got {tuple(feats.shape)}")
    expected = (feats.shape[0], 1, feats.shape[2], feats.shape[3])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must be {expected} (S, 1, h, w) to match features {tuple(feats.shape)}, "
                         f"got {tuple(mask.shape)}")


def _check_window(size: tuple[int, int], window: int, what: str) -> None:
    """Window must be positive and fit in the feature map."""
    if window < 1 or window > min(size):
        raise ValueError(f"{what} {window} does not fit the {size[0]}x{size[1]} feature map")


def global_prototype(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average of the features over all shots: p_g = sum(F M) / (sum(M) + 1e-5).

    Args:
        feats: (S, C, h, w) features.
        mask: (S, 1, h, w) soft mask at feature size.

    Returns:
        (1, C) prototype (the zero vector when the mask is empty).
    """
    _check_pair(feats, mask)
    num = (feats * mask).sum(dim=(0, 2, 3))
    return (num / (mask.sum() + MASK_EPS))[None]


def per_shot_global_prototypes(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One masked average per shot: p_s = sum(F_s M_s) / (sum(M_s) + 1e-5) (the original's rule,
    docs/method.md#several-shots).

    Args:
        feats: (S, C, h, w) features.
        mask: (S, 1, h, w) soft mask at feature size.

    Returns:
        (S, C) prototypes in shot order (the zero vector for a shot whose mask is empty).
    """
    _check_pair(feats, mask)
    return (feats * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + MASK_EPS)


def local_prototypes(feats: torch.Tensor, mask: torch.Tensor, window: int, thresh: float = THRESH) -> torch.Tensor:
    """Window prototypes: avg-pool F and M over non-overlapping ``window`` x ``window`` cells, keep pooled M > thresh.

    Args:
        feats: (S, C, h, w) features.
        mask: (S, 1, h, w) soft mask at feature size.
        window: Pooling window (kernel = stride) in feature pixels; a remainder at the border is dropped.
        thresh: Keep a window whose mean mask is strictly greater than this.

    Returns:
        (K, C) prototypes in (shot, row, column) order; K may be 0.
    """
    _check_pair(feats, mask)
    _check_window(tuple(feats.shape[-2:]), window, "ALP window")
    pooled_f = F.avg_pool2d(feats, window, stride=window)  # (S, C, h', w')
    pooled_m = F.avg_pool2d(mask, window, stride=window)  # (S, 1, h', w')
    vectors = pooled_f.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (S*h'*w', C)
    keep = pooled_m.reshape(-1) > thresh
    return vectors[keep]


def fg_global_rule(mask: torch.Tensor, rule_window: int = FG_GLOBAL_RULE_WINDOW, thresh: float = THRESH) -> bool:
    """The original's ``gridconv+`` eligibility test: max avgpool_{rule_window}(M) >= thresh
    (docs/method.md#q13-rule-window-4x4).

    Args:
        mask: (S, 1, h, w) soft FG mask at feature size.
        rule_window: Pooling window of the test (4 in the original, whatever the ALP window).
        thresh: Threshold (>=).

    Returns:
        True when some rule_window x rule_window window is at least ``thresh`` foreground.
    """
    _check_window(tuple(mask.shape[-2:]), rule_window, "fg_global_rule_window")
    return bool(F.avg_pool2d(mask, rule_window, stride=rule_window).max() >= thresh)


def compute_prototypes(
    feats: torch.Tensor,
    mask: torch.Tensor,
    window: int,
    mode: PrototypeMode,
    thresh: float = THRESH,
    fg_global_rule_window: int = FG_GLOBAL_RULE_WINDOW,
    allow_empty: bool = False,
    multishot: MultiShotRule = "per_shot",
) -> Prototypes:
    """Prototypes of one class from support features and its soft mask (all shots of one episode together).

    Args:
        feats: (S, C, h, w) support features.
        mask: (S, 1, h, w) soft mask at feature size (see :func:`resize_mask`).
        window: ALP window (4 in training, ``val_wsize`` = 2 at test).
        mode: Requested mode: ``gridconv`` (BG), ``gridconv+`` (FG) or ``mask``.
        thresh: Local keep threshold (> thresh) and ``gridconv+`` rule threshold (>= thresh).
        fg_global_rule_window: Window of the ``gridconv+`` eligibility test (docs/method.md#q13-rule-window-4x4).
        allow_empty: For ``gridconv+``/``mask``, accept an all-zero mask (giving the zero prototype, as the
            original does) instead of raising.
        multishot: Foreground global prototypes with S > 1 shots: ``per_shot`` (the original's rule: one global
            row per shot in ``gridconv+``, their mean in ``mask``) or ``pooled`` (one area-weighted prototype over
            all shots); see the module docstring and docs/method.md#several-shots. Irrelevant for one shot and
            for ``gridconv``.

    Returns:
        :class:`Prototypes` with the mode actually used.

    Raises:
        ValueError: bad shapes, window or ``multishot`` rule.
        EmptyMaskError: an all-zero mask in ``gridconv+``/``mask`` mode without ``allow_empty``.
    """
    _check_pair(feats, mask)
    if multishot not in MULTISHOT_RULES:
        raise ValueError(f"multishot must be one of {MULTISHOT_RULES}, got {multishot!r}")
    if mode == "gridconv":
        local = local_prototypes(feats, mask, window, thresh)
        if local.shape[0] > 0:
            return Prototypes(local, "gridconv", local.shape[0])
        # no window is > thresh background: fall back to the global prototype (may be 0 if mask is empty;
        # docs/method.md#q14-no-background-window)
        return Prototypes(global_prototype(feats, mask), "mask", 0, fallback=True)
    if mode not in ("gridconv+", "mask"):
        raise ValueError(f"unknown prototype mode {mode!r}")
    if not allow_empty and not bool(mask.sum() > 0):
        raise EmptyMaskError(
            f"empty foreground mask at feature size {tuple(mask.shape[-2:])}: no foreground prototype can be built "
            "(the support label has no foreground, or it vanished in the bilinear downsampling)"
        )
    per_shot = multishot == "per_shot" and feats.shape[0] > 1
    glob = per_shot_global_prototypes(feats, mask) if per_shot else global_prototype(feats, mask)  # (S or 1, C)
    if mode == "gridconv+" and fg_global_rule(mask, fg_global_rule_window, thresh):
        local = local_prototypes(feats, mask, window, thresh)
        return Prototypes(torch.cat([local, glob], dim=0), "gridconv+", local.shape[0])
    return Prototypes(glob.mean(dim=0, keepdim=True), "mask", 0)


def safe_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x / max(||x||_2, 1e-4) along ``dim``."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp(min=NORM_EPS)


def similarity(query: torch.Tensor, prototypes: Prototypes | torch.Tensor) -> torch.Tensor:
    """Scaled cosine similarity d_k(x) = 20 cos(q(x), p_k) (the original's 1x1 conv, computed as one matmul).

    Args:
        query: (N, C, h, w) query features.
        prototypes: :class:`Prototypes` or a (K, C) tensor.

    Returns:
        (N, K, h, w) similarities.
    """
    vectors = prototypes.vectors if isinstance(prototypes, Prototypes) else prototypes
    _check_scoring(query, vectors)
    return _cosine(safe_normalize(query, dim=1), vectors)


def _check_scoring(query: torch.Tensor, vectors: torch.Tensor) -> None:
    if query.dim() != 4 or vectors.dim() != 2 or vectors.shape[1] != query.shape[1]:
        raise ValueError(f"query (N, C, h, w) {tuple(query.shape)} and prototypes (K, C) {tuple(vectors.shape)}")
    if vectors.shape[0] == 0:
        raise ValueError("no prototypes to score against")


def _cosine(query_unit: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """20 cos between L2-normalised query features (N, C, h, w) and prototypes (K, C) -> (N, K, h, w)."""
    weight = safe_normalize(vectors, dim=1)  # (K, C)
    return (weight @ query_unit.flatten(2)).unflatten(2, query_unit.shape[2:]) * SCALE


def _reduce(dists: torch.Tensor, mode: PrototypeMode) -> torch.Tensor:
    """(N, K, h, w) similarities of one class -> (N, h, w): sum_k softmax_k(d) d_k in grid modes, d_1 in ``mask``."""
    if mode == "mask":
        return dists[:, 0]
    return (F.softmax(dists, dim=1) * dists).sum(dim=1)


def score(query: torch.Tensor, prototypes: Prototypes) -> torch.Tensor:
    """Class score map of the query features against one class's prototypes.

    Args:
        query: (N, C, h, w) query features.
        prototypes: Output of :func:`compute_prototypes`.

    Returns:
        (N, h, w) scores: sum_k softmax_k(d) d_k in grid modes, d_1 in ``mask`` mode.
    """
    return _reduce(similarity(query, prototypes), prototypes.mode)


def score_classes(query: torch.Tensor, classes: list[Prototypes]) -> torch.Tensor:
    """Score maps of several classes at once: ``torch.stack([score(query, p) for p in classes], dim=1)``.

    The query is normalised once and all prototypes are compared in one matmul (the same values as the loop, in
    fewer operations: the training step's background/foreground pair and its alignment-loss pair use it).

    Args:
        query: (N, C, h, w) query features.
        classes: one :class:`Prototypes` per class.

    Returns:
        (N, len(classes), h, w) scores.
    """
    for protos in classes:
        _check_scoring(query, protos.vectors)
    dists = _cosine(safe_normalize(query, dim=1), torch.cat([p.vectors for p in classes], dim=0))
    parts = dists.split([p.vectors.shape[0] for p in classes], dim=1)
    return torch.stack([_reduce(d, p.mode) for d, p in zip(parts, classes)], dim=1)
