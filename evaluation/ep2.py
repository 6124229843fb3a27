"""EP2: the query's whole volume is segmented, with no ground truth used to find where the organ is.

EP1-ALP (:mod:`evaluation.ep1_alp`) takes the organ's slices from the query's labels; a user segmenting a new scan
cannot. EP2 scores every slice of the query. The rule that places the support slices along the query is below
(the project's definition: ADNet's pairing is not documented); ``predict.py`` and ``validation.py with
protocol=ep2`` share it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from evaluation.ep1_alp import FoldResult, chunk_index, class_slices, class_z_range, support_slices
from evaluation.metric import Metric

#: ``margin(support_images (S, H, W), support_masks (S, H, W), query_images (N, H, W)) -> (N, H, W)`` float
#: S_fg - S_bg; foreground where > 0.
MarginFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# -------------------------------------------------------------------- EP2: whole volume, no ground-truth localisation
# Project definition of EP2 (docs/method.md#ep2; ADNet's pairing is unknown; this rule is ours and labelled as such):
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


def evaluate_fold_ep2(predict: Any, images: dict[int, np.ndarray], labels: dict[int, np.ndarray],
                      bodies: dict[int, np.ndarray], support_ids: list[int], query_ids: list[int],
                      classes: list[int], n_part: int = 3, keep_largest: bool = True,
                      class_names: dict[int, str] | None = None, progress: bool = False) -> FoldResult:
    """Run EP2 on one fold: :func:`ep2_segment_class` on each whole query, scored over all its slices.

    Args:
        predict: a predictor with the ``PredictFn`` signature (``logits`` used when present, :func:`margin_fn`).
        images, labels: as in :func:`evaluate_fold`; query labels are used for scoring only.
        bodies: scan id -> (Z, H, W) bool body mask (the processed ``fgmask``), for supports and queries.
        support_ids, query_ids, classes, n_part, class_names, progress: as in :func:`evaluate_fold`.
        keep_largest: the connected-component step.

    Raises:
        ValueError: a scan or body mask is missing, a support lacks a class, or a body mask is empty.
    """
    for sid in list(support_ids) + list(query_ids):
        if sid not in images or sid not in labels or sid not in bodies:
            raise ValueError(f"scan {sid} is missing from the images, labels or body masks given to EP2")
        if not images[sid].shape == labels[sid].shape == bodies[sid].shape:
            raise ValueError(f"scan {sid}: image {images[sid].shape}, label {labels[sid].shape} and body mask "
                             f"{bodies[sid].shape} differ in shape")
    fn = margin_fn(predict)
    supports = [SupportScan(images[s], labels[s], bodies[s]) for s in support_ids]
    metric = Metric()
    predictions: dict[tuple[int, int], np.ndarray] = {}
    chosen: dict[int, dict[int, list[int]]] = {}
    scored: dict[tuple[int, int], tuple[int, int]] = {}
    ranges: dict[tuple[int, int], tuple[float, float]] = {}
    skipped: list[tuple[int, int]] = []
    bar = tqdm(total=len(classes) * len(query_ids), desc="EP2", unit="scan", disable=not progress)
    for c in classes:
        for q in query_ids:
            bar.update()
            if class_z_range(labels[q], c) is None:
                warnings.warn(f"query scan {q} holds no slice of class {c}: skipped (not scored)", stacklevel=2)
                skipped.append((q, c))
                continue
            try:
                seg = ep2_segment_class(fn, supports, images[q], bodies[q], c, n_part, keep_largest)
            except ValueError as err:
                raise ValueError(f"EP2, query scan {q}, class {c}: {err}") from None
            chosen[c] = dict(zip(support_ids, seg.support_slices))
            metric.record(seg.mask, labels[q] == c, q, c)
            predictions[(q, c)] = seg.mask.astype(np.uint8)
            scored[(q, c)] = (0, labels[q].shape[0] - 1)
            ranges[(q, c)] = seg.estimated_range
    bar.close()
    return FoldResult(classes=list(classes), metrics=metric.aggregate(), predictions=predictions,
                      support_slices=chosen, scored=scored, skipped=skipped, support_ids=list(support_ids),
                      query_ids=list(query_ids), n_part=n_part, z_margin=0, class_names=dict(class_names or {}),
                      protocol="ep2", estimated_ranges=ranges)
