"""EP2: the query's whole volume is segmented and scored, with no ground truth used to find where the organ is.

EP1-ALP (:mod:`evaluation.ep1_alp`) takes the organ's slices from the query's labels; a user segmenting a new scan
cannot. EP2 scores every slice of the query: :func:`evaluate_fold_ep2` receives the segmenter from its caller
(``validation.py`` builds it from ``prediction.volume.segment_volume``, the function ``predict.py`` uses), so the
protocol and the own-scan path score exactly the same segmentation. The whole-volume methods are described in
docs/protocols.md; this module also holds the previous release's rule, :func:`ep2_segment_class` (placement by the
body's z-extent), which ``prediction.volume`` keeps as the ``body`` method.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from evaluation.ep1_alp import FoldResult, chunk_index, class_slices, class_z_range, support_slices
from evaluation.metric import Metric

#: ``margin(support_images (S, H, W), support_masks (S, H, W), query_images (N, H, W)) -> (N, H, W)`` float
#: S_fg - S_bg; foreground where > 0.
MarginFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# -------------------------------------------------------------------- the previous release's body-extent rule
# (the ``body`` method of prediction.volume); the project's own rule (docs/method.md#ep2; ADNet's pairing is not
# documented):
#
# 1. support slices as in EP1-ALP: the n_part chunk centres of each support scan's organ slices;
# 2. the organ's z-extent in each support scan is expressed relative to that scan's BODY z-extent,
#    f = (z - b0) / (b1 - b0); the query's organ range is estimated as the mean relative extent over the support
#    scans mapped onto the query's body z-extent (body from the fgmask / an intensity threshold, never a label);
# 3. EVERY query slice is segmented, with the support chunk of its position in the estimated range (EP1's chunk
#    formula, clamped, so slices outside the range use the first or last chunk);
# 4. false positives on organ-free slices are removed by keeping the largest 3D connected component (26-connected)
#    of the class's prediction;
# 5. counts are summed over the whole volume (docs/method.md#metrics).


@dataclass
class SupportScan:
    """One annotated support scan on the model's grid.

    Attributes:
        image: (Z, H, W) float32 image, normalised as the model sees it.
        label: (Z, H, W) integer labels (class ids of the model's label space).
        body: (Z, H, W) bool body mask (fgmask), used only for the body z-extent.
    """

    image: np.ndarray
    label: np.ndarray
    body: np.ndarray


@dataclass
class ClassSegmentation:
    """Output of :func:`ep2_segment_class`.

    Attributes:
        mask: (Z, H, W) bool prediction after the connected-component step.
        margin: (Z, H, W) float32 S_fg - S_bg of every query voxel (before the connected-component step).
        support_slices: [slices per chunk] for each support scan, in the order given.
        estimated_range: (lo, hi) organ range estimated in the query (slice units, may be fractional).
    """

    mask: np.ndarray
    margin: np.ndarray
    support_slices: list[list[int]]
    estimated_range: tuple[float, float]


def body_z_range(body: np.ndarray, min_fraction: float = 0.05) -> tuple[int, int]:
    """First and last slice whose body area is at least ``min_fraction`` of the largest slice's body area.

    Relative to the scan's own largest body slice, so the rule does not depend on the field of view or on padding.

    Args:
        body: (Z, H, W) bool body mask.
        min_fraction: smallest body area of a body slice, as a fraction of the largest (ignores specks of noise).

    Raises:
        ValueError: the body mask is empty.
    """
    if body.ndim != 3:
        raise ValueError(f"body mask must be (Z, H, W), got shape {body.shape}")
    area = body.reshape(body.shape[0], -1).astype(bool).sum(axis=1)
    if area.max() == 0:
        raise ValueError("the body mask is empty (no voxel above the body threshold)")
    zs = np.flatnonzero(area >= min_fraction * area.max())
    return int(zs[0]), int(zs[-1])


def relative_extent(organ: tuple[int, int], body: tuple[int, int]) -> tuple[float, float]:
    """Organ range (z0, z1) relative to the body range (b0, b1): ((z0 - b0) / (b1 - b0), (z1 - b0) / (b1 - b0)).

    A one-slice body (b1 == b0) divides by 1 instead of 0.
    """
    span = max(body[1] - body[0], 1)
    return (organ[0] - body[0]) / span, (organ[1] - body[0]) / span


def ep2_query_range(support_extents: Sequence[tuple[float, float]], query_body: tuple[int, int]) -> tuple[float, float]:
    """Estimated organ range in the query: the mean relative extent of the supports mapped onto the query body.

    Args:
        support_extents: :func:`relative_extent` of the organ in each support scan.
        query_body: the query's :func:`body_z_range`.

    Returns:
        (lo, hi) in query slice units: b0 + f * (b1 - b0).
    """
    if not support_extents:
        raise ValueError("ep2_query_range needs at least one support extent")
    f0 = float(np.mean([e[0] for e in support_extents]))
    f1 = float(np.mean([e[1] for e in support_extents]))
    span = query_body[1] - query_body[0]
    return query_body[0] + f0 * span, query_body[0] + f1 * span


def ep2_chunks(n_slices: int, lo: float, hi: float, n_part: int) -> np.ndarray:
    """Support chunk of every query slice 0..n_slices-1: :func:`chunk_index` over the estimated range (lo, hi)."""
    return np.array([chunk_index(z, lo, hi, n_part) for z in range(n_slices)], dtype=np.int64)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a (Z, H, W) bool mask (ties: the lowest label); empty stays empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def margin_fn(predict: Any) -> MarginFn:
    """A :data:`MarginFn` from a predictor: ``predict.logits`` (S_fg - S_bg) when it has one, else its bool output
    mapped to +1 / -1 (e.g. the intensity baseline)."""
    logits = getattr(predict, "logits", None)
    if logits is not None:
        def from_logits(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
            out = logits(s, m, q)
            return (out[:, 1] - out[:, 0]).float().numpy()
        return from_logits

    def from_masks(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(predict(s, m, q), dtype=bool), 1.0, -1.0).astype(np.float32)
    return from_masks


def ep2_segment_class(margin: MarginFn, supports: Sequence[SupportScan], query_image: np.ndarray,
                      query_body: np.ndarray, class_id: int, n_part: int = 3, keep_largest: bool = True,
                      min_body_fraction: float = 0.05) -> ClassSegmentation:
    """Segment one class in a whole query volume with the EP2 rule (module comment above); no query label is used.

    k-shot: a chunk's support is its k slices, one per support scan (docs/method.md#k-shot-support), given to
    ``margin`` together, so
    the model pools the prototypes of all support scans.

    Args:
        margin: :data:`MarginFn` (e.g. :func:`margin_fn` of a :class:`evaluation.predictors.FastPredictor`).
        supports: the annotated support scans (k >= 1), on the model's grid (same H, W as the query).
        query_image: (Z, H, W) float32 normalised query.
        query_body: (Z, H, W) bool body mask of the query.
        class_id: the class to segment (label value in the supports).
        n_part: chunks / support slices per support scan.
        keep_largest: keep the largest 3D connected component only (step 4).
        min_body_fraction: see :func:`body_z_range`.

    Raises:
        ValueError: a support scan lacks the class, a body mask is empty, shapes disagree, or ``margin`` returns a
            wrong shape.
    """
    if not supports:
        raise ValueError("EP2 needs at least one support scan")
    if query_image.shape != query_body.shape:
        raise ValueError(f"query image {query_image.shape} and body mask {query_body.shape} differ in shape")
    extents, chosen = [], []
    for i, sup in enumerate(supports):
        if sup.image.shape[1:] != query_image.shape[1:]:
            raise ValueError(f"support {i} slices are {sup.image.shape[1:]}, query slices {query_image.shape[1:]}")
        zs = class_slices(sup.label, class_id)
        if not zs:
            raise ValueError(f"support {i} holds no slice of class {class_id}: no support can be chosen "
                             "(docs/method.md#q27-one-slice-organs)")
        chosen.append(support_slices(zs, n_part))
        extents.append(relative_extent((zs[0], zs[-1]), body_z_range(sup.body, min_body_fraction)))
    lo, hi = ep2_query_range(extents, body_z_range(query_body, min_body_fraction))
    chunks = ep2_chunks(query_image.shape[0], lo, hi, n_part)
    out = np.zeros(query_image.shape, np.float32)
    for j in np.unique(chunks):
        sup_img = np.stack([sup.image[chosen[i][j]] for i, sup in enumerate(supports)]).astype(np.float32)
        sup_msk = np.stack([sup.label[chosen[i][j]] == class_id for i, sup in enumerate(supports)])
        z_sel = np.flatnonzero(chunks == j)
        qimg = query_image[z_sel].astype(np.float32)
        res = np.asarray(margin(sup_img, sup_msk, qimg))
        if res.shape != qimg.shape:
            raise ValueError(f"margin returned shape {res.shape} for query slices of shape {qimg.shape}")
        out[z_sel] = res
    mask = out > 0
    if keep_largest:
        mask = largest_component(mask)
    return ClassSegmentation(mask=mask, margin=out, support_slices=chosen, estimated_range=(lo, hi))


class WholeVolumeClass(Protocol):
    """What EP2 reads of one class of a whole-volume segmentation (``prediction.volume.ClassResult``)."""

    estimated_range: tuple[float, float]
    support_slices: list[list[int]]


class WholeVolumeSegmentation(Protocol):
    """What EP2 reads of a whole-volume segmentation (``prediction.volume.VolumeSegmentation``): ``labels``
    (Z, H, W) int with the class ids, and per class its estimated range and support slices."""

    labels: np.ndarray
    classes: dict[int, WholeVolumeClass]


def evaluate_fold_ep2(segment: Callable[[int], WholeVolumeSegmentation], labels: dict[int, np.ndarray],
                      support_ids: list[int], query_ids: list[int], classes: list[int], n_part: int = 3,
                      class_names: dict[int, str] | None = None, method: str | None = None,
                      progress: bool = False) -> FoldResult:
    """Run EP2 on one fold: every query segmented as a whole (all classes in one decision), scored over all its
    slices; no query label is used to segment it.

    Args:
        segment: query scan id -> its whole-volume segmentation of ``classes`` (the segmenter is built by the
            caller, ``validation.py``, from ``prediction.volume.segment_volume``; a layer above this one).
        labels: scan id -> (Z, H, W) integer labels of the queries (for scoring only).
        support_ids, query_ids, classes, n_part, class_names, progress: as in :func:`evaluate_fold`.
        method: the whole-volume method's description, recorded in the result.

    Returns:
        A :class:`FoldResult` with ``protocol="ep2"``, the estimated ranges and, per scored (query, class), the
        predicted and true z-ranges (:meth:`FoldResult.z_range_share`).

    Raises:
        ValueError: a query is missing from ``labels``, or the segmentation has another shape than its label.
    """
    for q in query_ids:
        if q not in labels:
            raise ValueError(f"scan {q} is missing from the labels given to EP2")
    metric = Metric()
    predictions: dict[tuple[int, int], np.ndarray] = {}
    chosen: dict[int, dict[int, list[int]]] = {}
    scored: dict[tuple[int, int], tuple[int, int]] = {}
    ranges: dict[tuple[int, int], tuple[float, float]] = {}
    z_ranges: dict[tuple[int, int], tuple[tuple[int, int] | None, tuple[int, int]]] = {}
    skipped: list[tuple[int, int]] = []
    for q in tqdm(query_ids, desc="EP2", unit="scan", disable=not progress):
        seg = segment(q)
        if seg.labels.shape != labels[q].shape:
            raise ValueError(f"EP2, query scan {q}: segmentation shape {seg.labels.shape} != label shape "
                             f"{labels[q].shape}")
        for c in classes:
            true_range = class_z_range(labels[q], c)
            if true_range is None:
                warnings.warn(f"query scan {q} holds no slice of class {c}: skipped (not scored)", stacklevel=2)
                skipped.append((q, c))
                continue
            mask = seg.labels == c
            metric.record(mask, labels[q] == c, q, c)
            predictions[(q, c)] = mask.astype(np.uint8)
            scored[(q, c)] = (0, labels[q].shape[0] - 1)
            ranges[(q, c)] = tuple(float(v) for v in seg.classes[c].estimated_range)
            chosen.setdefault(c, {}).update(zip(support_ids, seg.classes[c].support_slices))
            z_ranges[(q, c)] = (class_z_range(mask, 1), true_range)
    return FoldResult(classes=list(classes), metrics=metric.aggregate(), predictions=predictions,
                      support_slices=chosen, scored=scored, skipped=skipped, support_ids=list(support_ids),
                      query_ids=list(query_ids), n_part=n_part, z_margin=0, class_names=dict(class_names or {}),
                      protocol="ep2", estimated_ranges=ranges, z_ranges=z_ranges, method=method)
