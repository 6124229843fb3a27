"""Whole-volume few-shot segmentation of a query scan from k annotated support scans, without any query label.

One function, :func:`segment_volume`, serves ``predict.py`` and ``validation.py with protocol=ep2``. Three methods
(docs/protocols.md "Whole-volume methods" holds their measured Dice):

* ``registered`` (the default): each support scan is registered onto the query from the images alone
  (:mod:`prediction.correspondence`: a z search that places a slab inside a whole scan and a whole scan around a
  slab, then rigid and affine). The correspondence gives, per class,

  - for every query slice, the support slices it is compared with: by default every EP1-ALP chunk centre of the
    support's organ (``support_choice="best_chunk"``), each voxel keeping its largest margin, which does not depend
    on registration's z match being exact; or the chunk holding the slice registration matched to it
    (``"chunks"``), or that matched slice itself (``"matched"``);
  - the organ's z-range in the query: the support organ carried onto the query and widened by ``margin_mm``
    (10 mm); an end where the support's organ touches the end of the support's field of view stays open (the
    network decides there: the support says nothing about where the organ ends);
  - an in-plane prior: the carried organ dilated by ``inplane_margin_mm`` (5 mm) in-plane and ``margin_mm`` along
    z; nothing is predicted outside it.

* ``atlas``: the support labels carried onto the query by the same registration, no network (single-atlas label
  propagation, the classic baseline; with k supports a majority vote).
* ``body``: the rule of the previous release: the organ's range in the query estimated from the body z-extents of
  support and query (:func:`evaluation.ep2.ep2_segment_class`), every slice segmented, the largest component kept,
  classes combined by margin. It fails on partial fields of view, and is kept as a baseline.

**One decision for all classes** (``registered``): every class's margin S_fg - S_bg (the ALP scores, paper Sec. 3.2)
is computed where its range and prior allow; a voxel takes the class with the largest margin when that margin is
positive (each class's foreground against the background they share), else background; then the largest 3D
connected component of each class is kept.

**k-shot**: each support scan gets its own correspondence. A query slice's support set holds one slice of every shot
(its own match in each), given to the model together so it pools the prototypes of all shots
(docs/method.md#several-shots); the z-range is the union of the shots' ranges (an end open in any shot stays open);
the prior is the union of the shots' priors (a voxel any support places the organ near may hold it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from evaluation.ep1_alp import chunk_index, class_slices, class_z_range, support_slices
from evaluation.ep2 import ClassSegmentation, MarginFn, ep2_segment_class, largest_component
from evaluation.ep2 import SupportScan as BodySupport
from prediction.correspondence import Correspondence, SupportAtlas, prepare_support, register

Method = Literal["registered", "atlas", "body"]
METHODS: tuple[str, ...] = ("registered", "atlas", "body")
DEFAULT_METHOD: Method = "registered"
SupportChoice = Literal["best_chunk", "chunks", "matched"]
#: Defaults of the ``registered`` method, chosen on the phantom's 5 folds (docs/protocols.md "Whole-volume methods"):
#: widening of the carried organ along z (the range's closed ends) and in-plane (the prior), mm.
MARGIN_MM = 10.0
INPLANE_MARGIN_MM = 5.0
DEFAULT_SUPPORT_CHOICE: SupportChoice = "best_chunk"


@dataclass
class SupportScan:
    """One annotated support scan on the model's grid (the same in-plane spacing as the query).

    Attributes:
        image: (Z, H, W) float32 image, normalised as the model sees it.
        label: (Z, H, W) integer labels (the class ids asked for).
        raw: (Z, H, W) float32 processed intensities before normalisation (CT 0..255, MR positive): what the
            registration compares.
        spacing_zyx: (dz, dy, dx) in mm.
        body: (Z, H, W) bool body mask (the ``body`` method only; its z-extent).
    """

    image: np.ndarray
    label: np.ndarray
    raw: np.ndarray
    spacing_zyx: tuple[float, float, float]
    body: np.ndarray | None = None


@dataclass
class QueryScan:
    """The query on the model's grid: ``image`` normalised, ``raw`` processed intensities, ``spacing_zyx`` in mm,
    ``body`` (the ``body`` method only)."""

    image: np.ndarray
    raw: np.ndarray
    spacing_zyx: tuple[float, float, float]
    body: np.ndarray | None = None


@dataclass
class Placement:
    """Where one class may lie in the query, and which support slices each query slice is compared with.

    Attributes:
        support_slices: one (Zq,) int array per support scan: the support slice for each query slice (-1 where
            the slice is not segmented).
        z_range: (lo, hi) query slices (inclusive) where the class may be predicted; lo > hi: nowhere.
        open_ends: (inferior, superior): the range is not limited on that side.
        prior: (Zq, H, W) bool where the class may lie, or ``None`` (anywhere).
    """

    support_slices: list[np.ndarray]
    z_range: tuple[int, int]
    open_ends: tuple[bool, bool]
    prior: np.ndarray | None = None


@dataclass
class ClassResult:
    """One class of a :class:`VolumeSegmentation`.

    Attributes:
        mask: (Zq, H, W) bool final prediction.
        margin: (Zq, H, W) float32 S_fg - S_bg where the class was scored, -inf elsewhere (``atlas``: +1 / -1).
        placement: where the class could lie (None for ``body``, whose rule is :func:`ep2_segment_class`'s).
        estimated_range: (lo, hi) query slices the method allowed (``body``: its estimated organ range).
        support_slices: the support slices used, per support scan (sorted distinct slice indices).
    """

    mask: np.ndarray
    margin: np.ndarray
    placement: Placement | None
    estimated_range: tuple[float, float]
    support_slices: list[list[int]]


@dataclass
class VolumeSegmentation:
    """Output of :func:`segment_volume`.

    Attributes:
        labels: (Zq, H, W) int32 label volume on the model's grid; 0 = background, else the class ids asked for.
        classes: {class id: :class:`ClassResult`}.
        method: the method used.
        correspondences: the registration of each support scan (``registered`` and ``atlas``), else empty.
    """

    labels: np.ndarray
    classes: dict[int, ClassResult]
    method: str
    correspondences: list[Correspondence] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- correspondence
def prepare_atlases(supports: Sequence[SupportScan], modality: str) -> list[SupportAtlas]:
    """The registration's support-only work, done once per support scan (reused for every query).

    Raises:
        ValueError: a support scan without body, or with mismatched shapes.
    """
    return [prepare_support(s.raw, s.spacing_zyx, s.label, modality) for s in supports]


def correspond(atlases: Sequence[SupportAtlas], query: QueryScan, modality: str,
               **options: Any) -> list[Correspondence]:
    """Register every support scan onto the query (query fixed): one :class:`Correspondence` per support.

    (A search over the query's z scale, the patients' heights, picked by the z search's similarity, was measured
    worse on the phantom's 5 folds, 0.49 against 0.51: the similarity does not rank the scales on MR.)
    """
    return [register(a, query.raw, query.spacing_zyx, modality, **options) for a in atlases]


def place_registered(corrs: Sequence[Correspondence], supports: Sequence[SupportScan], class_id: int,
                     margin_mm: float = MARGIN_MM, support_choice: SupportChoice = DEFAULT_SUPPORT_CHOICE,
                     n_part: int = 3, use_prior: bool = True,
                     inplane_margin_mm: float = INPLANE_MARGIN_MM) -> Placement:
    """The :class:`Placement` of one class from the supports' correspondences (module docstring).

    The support slice of query slice z in shot i: the support slice registration matched to z, clamped into the
    support's organ slices (a query slice matched beyond the support organ's end is compared with its end slice);
    ``"chunks"`` and ``"best_chunk"`` replace it by EP1-ALP's chunk centre of the chunk that holds it
    (:func:`support_slices`; ``best_chunk`` then scores every chunk, :func:`score_best_chunk`).

    Raises:
        ValueError: a support lacks the class.
    """
    zq = corrs[0].query_shape[0]
    lo, hi, open_lo, open_hi = zq, -1, False, False
    prior = None
    chosen = []
    for corr, sup in zip(corrs, supports):
        zs = class_slices(sup.label, class_id)
        if not zs:
            raise ValueError(f"a support scan holds no slice of class {class_id}")
        a, b, o_lo, o_hi = corr.class_z_range(sup.label, class_id, margin_mm)
        if a <= b:
            lo, hi = min(lo, a), max(hi, b)
        open_lo, open_hi = open_lo or o_lo, open_hi or o_hi
        matched = np.clip(np.rint(corr.support_z_raw), zs[0], zs[-1]).astype(np.int64)
        if support_choice in ("chunks", "best_chunk"):
            centres = support_slices(zs, n_part)
            matched = np.array([centres[chunk_index(int(z), zs[0], zs[-1], n_part)] for z in matched], np.int64)
        elif support_choice != "matched":
            raise ValueError(f"support_choice must be 'best_chunk', 'chunks' or 'matched', got {support_choice!r}")
        # a matched slice that holds no organ (a gap in the organ's slices) takes the nearest organ slice
        organ = np.asarray(zs)
        matched = organ[np.abs(organ[None, :] - matched[:, None]).argmin(axis=1)]
        chosen.append(matched)
        if use_prior:
            p = corr.prior(sup.label, class_id, margin_mm, inplane_margin_mm)
            prior = p if prior is None else prior | p
    if open_lo:
        lo = 0
    if open_hi:
        hi = zq - 1
    if lo > hi:
        lo, hi = 0, -1
    for arr in chosen:
        arr[: max(lo, 0)] = -1
        arr[hi + 1:] = -1
    return Placement(chosen, (int(lo), int(hi)), (open_lo, open_hi), prior)


# ----------------------------------------------------------------------------------------------- scoring
def score_class(margin: MarginFn, supports: Sequence[SupportScan], query_image: np.ndarray, class_id: int,
                placement: Placement) -> np.ndarray:
    """S_fg - S_bg of every query voxel the placement allows; -inf elsewhere.

    Query slices that share their support slices (one per shot) are scored in one call, so the model pools the
    prototypes of a support set once and may batch the query slices.

    Returns:
        (Zq, H, W) float32.

    Raises:
        ValueError: ``margin`` returns a wrong shape.
    """
    out = np.full(query_image.shape, -np.inf, np.float32)
    keys = np.stack(placement.support_slices, axis=1)  # (Zq, k)
    valid = (keys >= 0).all(axis=1)
    for key in np.unique(keys[valid], axis=0):
        z_sel = np.flatnonzero(valid & (keys == key).all(axis=1))
        sup_img = np.stack([s.image[int(z)] for s, z in zip(supports, key)]).astype(np.float32)
        sup_msk = np.stack([s.label[int(z)] == class_id for s, z in zip(supports, key)])
        qimg = query_image[z_sel].astype(np.float32)
        res = np.asarray(margin(sup_img, sup_msk, qimg), dtype=np.float32)
        if res.shape != qimg.shape:
            raise ValueError(f"margin returned shape {res.shape} for query slices of shape {qimg.shape}")
        out[z_sel] = res
    if placement.prior is not None:
        out[~placement.prior] = -np.inf
    return out


def score_best_chunk(margin: MarginFn, supports: Sequence[SupportScan], query_image: np.ndarray, class_id: int,
                     placement: Placement, n_part: int) -> np.ndarray:
    """Every allowed query slice scored against each of the ``n_part`` chunk-centre support slices (one slice per
    shot in each set), keeping each voxel's largest margin: a misplaced match along z costs nothing when another
    chunk's support slice looks more like the query slice.

    Returns:
        (Zq, H, W) float32, -inf outside the placement.
    """
    outs = []
    centres = [support_slices(class_slices(s.label, class_id), n_part) for s in supports]
    for j in range(n_part):
        slices = [np.where(arr >= 0, c[j], -1) for arr, c in zip(placement.support_slices, centres)]
        outs.append(score_class(margin, supports, query_image, class_id,
                                Placement(slices, placement.z_range, placement.open_ends, placement.prior)))
    return np.max(np.stack(outs), axis=0).astype(np.float32)


def decide(margins: dict[int, np.ndarray], keep_largest: bool = True,
           components_first: bool = True) -> np.ndarray:
    """One decision for all classes: each voxel takes the class of largest positive margin, else background (0).

    With ``keep_largest``, each class keeps the largest 3D connected component of its own positive margins first
    (``components_first``, the default: a class's shape does not depend on which other classes were asked for, only
    the voxels two classes claim are shared out), or of what it won after the decision.

    Args:
        margins: {class id: (Z, H, W) float margin, -inf where the class is not allowed}.
        keep_largest: keep each class's largest 26-connected component only.
        components_first: take the components before the decision (see above).

    Returns:
        (Z, H, W) int32 labels; a tie goes to the class listed first.
    """
    ids = list(margins)
    if not ids:
        raise ValueError("decide needs at least one class")
    stack = np.stack([margins[c] for c in ids])
    if keep_largest and components_first:
        for i in range(len(ids)):
            positive = stack[i] > 0
            if positive.any():
                stack[i][positive & ~largest_component(positive)] = -np.inf
    positive = stack.max(axis=0) > 0
    best = stack.argmax(axis=0)
    labels = np.where(positive, np.asarray(ids, np.int32)[best], 0).astype(np.int32)
    if keep_largest and not components_first:
        for c in ids:
            m = labels == c
            if m.any():
                labels[m & ~largest_component(m)] = 0
    return labels


def combine_by_margin(masks: dict[int, np.ndarray], margins: dict[int, np.ndarray]) -> np.ndarray:
    """The previous release's combination (``body`` method): per-class masks first, a voxel in several masks goes
    to the class with the larger margin; ties go to the class listed first.

    Returns:
        (Z, H, W) int32.
    """
    ids = list(masks)
    if not ids:
        raise ValueError("combine_by_margin needs at least one class")
    shape = masks[ids[0]].shape
    best = np.full(shape, -np.inf, np.float32)
    out = np.zeros(shape, np.int32)
    for c in ids:
        take = masks[c] & (margins[c] > best)
        out[take] = c
        best[take] = margins[c][take]
    return out


def atlas_labels(corrs: Sequence[Correspondence], supports: Sequence[SupportScan],
                 classes: Sequence[int]) -> np.ndarray:
    """The supports' labels carried onto the query (nearest neighbour), no network.

    With k supports a voxel takes the class that at least half of the shots carry there (the most votes; ties go
    to the class listed first), else background.

    Returns:
        (Zq, H, W) int32 labels restricted to ``classes``.
    """
    warped = [corr.warp_label(sup.label) for corr, sup in zip(corrs, supports)]
    votes = np.stack([sum((w == c).astype(np.int16) for w in warped) for c in classes])
    best = votes.argmax(axis=0)
    need = (len(warped) + 1) // 2
    return np.where(votes.max(axis=0) >= need, np.asarray(classes, np.int32)[best], 0).astype(np.int32)


# ----------------------------------------------------------------------------------------------- the methods
def segment_volume(margin: MarginFn, supports: Sequence[SupportScan], query: QueryScan, classes: Sequence[int],
                   method: Method = DEFAULT_METHOD, modality: str = "CT", n_part: int = 3,
                   margin_mm: float = MARGIN_MM, inplane_margin_mm: float = INPLANE_MARGIN_MM,
                   support_choice: SupportChoice = DEFAULT_SUPPORT_CHOICE, use_prior: bool = True,
                   keep_largest: bool = True, atlases: Sequence[SupportAtlas] | None = None,
                   correspondences: Sequence[Correspondence] | None = None,
                   progress: bool = False) -> VolumeSegmentation:
    """Segment the requested classes in a whole query volume (module docstring).

    Args:
        margin: S_fg - S_bg of query slices against a support set (:func:`evaluation.ep2.margin_fn`).
        supports: k >= 1 annotated support scans on the model's grid (same H, W as the query).
        query: the query scan.
        classes: label ids to segment, as they appear in the support labels.
        method: ``registered``, ``atlas`` or ``body``.
        modality: ``CT`` or ``MR`` (the registration's intensity handling).
        n_part: ``body``, ``chunks`` and ``best_chunk``: support slices (chunks) per support scan.
        margin_mm: ``registered``: widening of the carried organ along z (z-range ends and prior), mm.
        inplane_margin_mm: ``registered``: in-plane widening of the carried organ (the prior), mm.
        support_choice: ``registered``: ``best_chunk``, ``chunks`` or ``matched`` (:func:`place_registered`).
        use_prior: ``registered``: restrict each class to its prior.
        keep_largest: keep each class's largest 3D component.
        atlases: the supports' prepared atlases (:func:`prepare_atlases`), to reuse across queries.
        correspondences: precomputed correspondences (one per support), to reuse across runs on one query.
        progress: a tqdm bar over the classes.

    Raises:
        ValueError: unknown method, a support lacking a class, mismatched in-plane sizes, or an empty body mask.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not supports:
        raise ValueError("whole-volume segmentation needs at least one support scan")
    for i, sup in enumerate(supports):
        if sup.image.shape[1:] != query.image.shape[1:]:
            raise ValueError(f"support {i} slices are {sup.image.shape[1:]}, query slices {query.image.shape[1:]}")
        for c in classes:
            if not class_slices(sup.label, c):
                raise ValueError(f"support {i} holds no slice of class {c}: no support can be chosen "
                                 "(docs/method.md#q27-one-slice-organs)")
    classes = [int(c) for c in classes]
    if method == "body":
        return _segment_by_body(margin, supports, query, classes, n_part, keep_largest, progress)
    if correspondences is None:
        atlases = prepare_atlases(supports, modality) if atlases is None else atlases
        correspondences = correspond(atlases, query, modality)
    corrs = list(correspondences)
    if method == "atlas":
        labels = atlas_labels(corrs, supports, classes)
        results = {c: ClassResult(labels == c, np.where(labels == c, 1.0, -1.0).astype(np.float32), None,
                                  _extent(labels == c), []) for c in classes}
        return VolumeSegmentation(labels, results, method, corrs)
    margins, placements = {}, {}
    for c in tqdm(classes, desc="classes", unit="class", disable=not progress, leave=False):
        placements[c] = place_registered(corrs, supports, c, margin_mm, support_choice, n_part, use_prior,
                                         inplane_margin_mm)
        if support_choice == "best_chunk":
            margins[c] = score_best_chunk(margin, supports, query.image, c, placements[c], n_part)
        else:
            margins[c] = score_class(margin, supports, query.image, c, placements[c])
    labels = decide(margins, keep_largest)
    results = {c: ClassResult(labels == c, margins[c], placements[c], placements[c].z_range,
                              [sorted(set(int(z) for z in s if z >= 0)) for s in placements[c].support_slices])
               for c in classes}
    return VolumeSegmentation(labels, results, method, corrs)


def _extent(mask: np.ndarray) -> tuple[float, float]:
    """First and last slice holding ``mask`` (Z, H, W), as the estimated range; (0, -1) when empty."""
    ends = class_z_range(mask, True)
    return (float(ends[0]), float(ends[1])) if ends else (0.0, -1.0)


def _segment_by_body(margin: MarginFn, supports: Sequence[SupportScan], query: QueryScan, classes: list[int],
                     n_part: int, keep_largest: bool, progress: bool) -> VolumeSegmentation:
    """The previous release's rule (:func:`evaluation.ep2.ep2_segment_class`) with its combination by margin."""
    if query.body is None or any(s.body is None for s in supports):
        raise ValueError("the body method needs body masks of the supports and the query")
    body_supports = [BodySupport(s.image, s.label, s.body) for s in supports]
    per_class: dict[int, ClassSegmentation] = {}
    for c in tqdm(classes, desc="classes", unit="class", disable=not progress, leave=False):
        per_class[c] = ep2_segment_class(margin, body_supports, query.image, query.body, c, n_part, keep_largest)
    labels = combine_by_margin({c: s.mask for c, s in per_class.items()}, {c: s.margin for c, s in per_class.items()})
    results = {c: ClassResult(labels == c, s.margin, None, s.estimated_range, s.support_slices)
               for c, s in per_class.items()}
    return VolumeSegmentation(labels, results, "body")


SegmentFn = Callable[[QueryScan], VolumeSegmentation]


def describe(method: str, **options: Any) -> str:
    """One line naming the method and its options, for ``predictions.json``, ``results.json`` and the report."""
    text = {"registered": "registration (z search, in-plane rigid and affine, Demons) places each support along the "
                          "query: organ z-range (open where the support organ touches its field of view) and "
                          "in-plane prior; every chunk-centre support slice scored, each voxel's largest margin; "
                          "one decision for all classes; largest 3D component per class",
            "atlas": "the supports' labels carried onto the query by the same registration, no network",
            "body": "the previous release's rule: organ range estimated from the body z-extents, every slice "
                    "segmented, largest 3D component per class, classes combined by margin"}[method]
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{method}: {text}" + (f" ({opts})" if opts else "")
