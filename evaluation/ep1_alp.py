"""EP1-ALP, the original evaluation protocol (docs/method.md#ep1-alp), as small pure functions and one driver.

For each test class c and query scan:

1. support slices: for each support scan, L = its sorted slices holding c (what ``classmap_1.json`` lists);
   the supports are ``L[int(p * len(L))]`` for the chunk centres p (1/6, 1/2, 5/6 with ``n_part`` = 3);
2. the query's scored range is [z_min - z_margin, z_max + z_margin] from the query's ground truth
   (docs/method.md#q9-query-range-from-ground-truth);
3. scored slice z uses support chunk ``floor((z - z_min) / ((z_max - z_min) / n_part))``, clamped (chunk 0 when
   z_max == z_min, docs/method.md#q27-one-slice-organs);
4. counts are summed over the scored slices (3D metric, :mod:`evaluation.metric`); scores are means over the queries.

The model plugs in through ``predict(support_images, support_masks, query_images) -> query_masks``, called once per
(class, query scan, chunk) with every scored query slice of that chunk, so a model may batch them and cache the
prototypes of a support set.

EP2 (the whole query volume, no ground truth used to place it) is :mod:`evaluation.ep2`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.metric import Metric

PredictFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# What each Dice of results.json is (written into the file with them).
DICE_DEFINITIONS = {
    "dice": "3D Dice, the paper's: 2TP / (2TP + FP + FN) with the counts summed over the scored slices of a query "
            "scan; class_dice averages it over the query scans, mean_dice averages each scan's class mean",
    "dice_per_slice": "mean per-slice Dice: the 2D Dice of each scored slice where the prediction or the ground "
                      "truth is non-empty, averaged over those slices, then over scans as the 3D Dice",
}


def part_positions(n_part: int) -> list[float]:
    """Relative positions of the chunk centres: p_j = 1/(2n) + j (1 - 1/n) / (n - 1); [0.5] for n = 1."""
    if n_part < 1:
        raise ValueError(f"n_part must be >= 1, got {n_part}")
    if n_part == 1:
        return [0.5]
    step = (1.0 - 1.0 / n_part) / (n_part - 1)
    return [0.5 / n_part + j * step for j in range(n_part)]


def support_slices(class_slices: list[int], n_part: int) -> list[int]:
    """Support slice of each chunk: ``L[int(p * len(L))]`` for the chunk centres p of :func:`part_positions`.

    Args:
        class_slices: sorted slice indices of the support scan that hold the class.
        n_part: number of chunks.

    Raises:
        ValueError: the list is empty (the class is absent from the support scan, docs/method.md#q27-one-slice-organs).
    """
    if len(class_slices) == 0:
        raise ValueError("the support scan holds no slice of this class: no support slice can be chosen "
                         "(docs/method.md#q27-one-slice-organs)")
    return [int(class_slices[int(p * len(class_slices))]) for p in part_positions(n_part)]


def class_slices(label: np.ndarray, class_id: int) -> list[int]:
    """Sorted indices of the slices of ``label`` (Z, H, W) that hold at least one pixel of ``class_id``."""
    return np.flatnonzero((label == class_id).any(axis=(1, 2))).tolist()


def class_z_range(label: np.ndarray, class_id: int) -> tuple[int, int] | None:
    """First and last slice of ``label`` (Z, H, W) holding ``class_id``, or ``None`` if it is absent."""
    zs = class_slices(label, class_id)
    return (zs[0], zs[-1]) if zs else None


def chunk_index(z: int, z_min: int, z_max: int, n_part: int) -> int:
    """Support chunk of query slice ``z``: floor((z - z_min) / ((z_max - z_min) / n_part)) clamped to [0, n_part-1].

    The parity form of the original; chunk 0 when ``z_max == z_min`` (docs/method.md#q27-one-slice-organs).
    """
    if z_max == z_min:
        return 0
    return min(max(math.floor((z - z_min) / ((z_max - z_min) / n_part)), 0), n_part - 1)


def scored_range(z_min: int, z_max: int, z_margin: int, n_slices: int) -> range:
    """Scored slices: z_min - z_margin .. z_max + z_margin, clipped to the volume's ``n_slices``."""
    return range(max(z_min - z_margin, 0), min(z_max + z_margin, n_slices - 1) + 1)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@dataclass
class FoldResult:
    """Outcome of :func:`evaluate_fold`.

    Attributes:
        classes: evaluated class ids.
        metrics: :meth:`evaluation.metric.Metric.aggregate` output.
        predictions: {(scan_id, class_id): (Z, H, W) uint8 binary mask, zero outside the scored range}.
        support_slices: {class_id: {support scan id: [slice per chunk]}}.
        scored: {(scan_id, class_id): (first, last) scored slice}.
        skipped: [(scan_id, class_id)] query scans without the class (not scored).
        support_ids, query_ids, n_part, z_margin, class_names: the protocol's inputs.
        protocol: ``"ep1_alp"`` or ``"ep2"``.
        estimated_ranges: EP2 only: {(scan_id, class_id): (lo, hi)} query organ range estimated without GT.
        z_ranges: EP2 only: {(scan_id, class_id): (predicted (lo, hi) or None, true (lo, hi))}: the slices the
            final prediction and the ground truth span.
        method: EP2 only: the whole-volume method (``registered``, ``atlas``, ``body``) and its options.
    """

    classes: list[int]
    metrics: dict[str, Any]
    predictions: dict[tuple[int, int], np.ndarray]
    support_slices: dict[int, dict[int, list[int]]]
    scored: dict[tuple[int, int], tuple[int, int]]
    skipped: list[tuple[int, int]]
    support_ids: list[int]
    query_ids: list[int]
    n_part: int
    z_margin: int
    class_names: dict[int, str] = field(default_factory=dict)
    protocol: str = "ep1_alp"
    estimated_ranges: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    z_ranges: dict[tuple[int, int], tuple[tuple[int, int] | None, tuple[int, int]]] = field(default_factory=dict)
    method: str | None = None

    def z_range_share(self, tolerance: int = 3) -> float | None:
        """Share of the scored (query, class) pairs whose predicted z-range lies within ``tolerance`` slices of the
        true range at both ends (an empty prediction counts as a miss); ``None`` without EP2 ranges."""
        if not self.z_ranges:
            return None
        ok = [p is not None and abs(p[0] - t[0]) <= tolerance and abs(p[1] - t[1]) <= tolerance
              for p, t in self.z_ranges.values()]
        return float(np.mean(ok))

    @property
    def per_scan(self) -> dict[int, dict[int, dict[str, float]]]:
        """{scan_id: {class_id: {dice, dice_per_slice, precision, recall, tp, fp, fn}}} for the scored pairs."""
        ps = self.metrics["per_scan"]
        out: dict[int, dict[int, dict[str, float]]] = {}
        for i, s in enumerate(ps["scan_ids"]):
            for j, c in enumerate(ps["class_ids"]):
                if (s, c) in self.scored:
                    out.setdefault(s, {})[c] = {k: ps[k][i][j] for k in ("dice", "dice_per_slice", "precision",
                                                                         "recall", "tp", "fp", "fn")}
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready summary, mean first; class keys are id strings; fractions in [0, 1]; NaN written as null.

        ``mean_dice``/``class_dice`` are the 3D Dice (the paper's), ``mean_dice_per_slice``/``class_dice_per_slice``
        the mean per-slice Dice; ``dice_definitions`` says so in the file (:data:`DICE_DEFINITIONS`).
        """
        m = self.metrics

        def by_class(d: dict[int, float]) -> dict[str, float | None]:
            return {str(c): _nan_to_none(d.get(c, math.nan)) for c in self.classes}

        return {
            "mean_dice": _nan_to_none(m["mean_dice"]),
            "mean_dice_std": _nan_to_none(m["mean_dice_std"]),
            "class_dice": by_class(m["class_dice"]),
            "class_dice_std": by_class(m["class_dice_std"]),
            "class_precision": by_class(m["class_precision"]),
            "class_recall": by_class(m["class_recall"]),
            "mean_dice_per_slice": _nan_to_none(m["mean_dice_per_slice"]),
            "class_dice_per_slice": by_class(m["class_dice_per_slice"]),
            "dice_definitions": dict(DICE_DEFINITIONS),
            "classes": list(self.classes),
            "class_names": {str(c): self.class_names.get(c, str(c)) for c in self.classes},
            "protocol": self.protocol, "n_part": self.n_part, "z_margin": self.z_margin,
            "support_ids": list(self.support_ids), "query_ids": list(self.query_ids),
            "support_slices": {str(c): {str(s): z for s, z in d.items()} for c, d in self.support_slices.items()},
            "per_scan": {str(s): {str(c): {k: _nan_to_none(v) for k, v in d.items()} for c, d in cl.items()}
                         for s, cl in self.per_scan.items()},
            "skipped": [list(x) for x in self.skipped],
            "nan_entries": [list(x) for x in m["nan_entries"]],
            **({"estimated_ranges": {f"{q},{c}": [round(lo, 3), round(hi, 3)]
                                     for (q, c), (lo, hi) in self.estimated_ranges.items()},
                "z_ranges": {f"{q},{c}": {"predicted": None if p is None else list(p), "true": list(t)}
                             for (q, c), (p, t) in self.z_ranges.items()},
                "z_range_within_3_slices": self.z_range_share(3), "method": self.method}
               if self.protocol == "ep2" else {}),
        }


def evaluate_fold(predict: PredictFn, images: dict[int, np.ndarray], labels: dict[int, np.ndarray],
                  support_ids: list[int], query_ids: list[int], classes: list[int], n_part: int = 3,
                  z_margin: int = 0, class_names: dict[int, str] | None = None, progress: bool = False) -> FoldResult:
    """Run EP1-ALP on one fold.

    Args:
        predict: ``predict(support_images (S, H, W) float32, support_masks (S, H, W) bool, query_images
            (N, H, W) float32) -> (N, H, W) bool``; S = ``len(support_ids)`` (one slice per support scan, the
            chunk's), N = the chunk's scored query slices in increasing z.
        images: scan id -> (Z, H, W) float image, as the model sees it (normalised).
        labels: scan id -> (Z, H, W) integer labels (supports and queries).
        support_ids: the support scans (``n_shots`` of them).
        query_ids: the query scans.
        classes: class ids to evaluate.
        n_part: number of chunks / support slices per support scan.
        z_margin: extra slices scored on each side of the query's ground-truth range.
        class_names: optional id -> name, carried into the result.
        progress: show a progress bar.

    Raises:
        ValueError: a support scan lacks a class (docs/method.md#q27-one-slice-organs), a scan is missing, or
            ``predict`` returns a wrong shape.
    """
    for sid in list(support_ids) + list(query_ids):
        if sid not in images or sid not in labels:
            raise ValueError(f"scan {sid} is missing from the images or labels given to evaluate_fold")
        if images[sid].shape != labels[sid].shape:
            raise ValueError(f"scan {sid}: image shape {images[sid].shape} != label shape {labels[sid].shape}")
    metric = Metric()
    predictions: dict[tuple[int, int], np.ndarray] = {}
    supports: dict[int, dict[int, list[int]]] = {}
    scored: dict[tuple[int, int], tuple[int, int]] = {}
    skipped: list[tuple[int, int]] = []
    bar = tqdm(total=len(classes) * len(query_ids), desc="EP1-ALP", unit="scan", disable=not progress)
    for c in classes:
        supports[c] = {}
        for sid in support_ids:
            try:
                supports[c][sid] = support_slices(class_slices(labels[sid], c), n_part)
            except ValueError:
                raise ValueError(f"support scan {sid} holds no slice of class {c}: no support can be chosen "
                                 "(docs/method.md#q27-one-slice-organs)") from None
        sup_img = [np.stack([images[s][supports[c][s][j]] for s in support_ids]).astype(np.float32)
                   for j in range(n_part)]
        sup_msk = [np.stack([labels[s][supports[c][s][j]] == c for s in support_ids]) for j in range(n_part)]
        for q in query_ids:
            bar.update()
            zr = class_z_range(labels[q], c)
            if zr is None:
                warnings.warn(f"query scan {q} holds no slice of class {c}: skipped (not scored)", stacklevel=2)
                skipped.append((q, c))
                continue
            zs = scored_range(zr[0], zr[1], z_margin, labels[q].shape[0])
            chunks = np.array([chunk_index(z, zr[0], zr[1], n_part) for z in zs])
            pred = np.zeros(labels[q].shape, np.uint8)
            for j in np.unique(chunks):
                z_sel = np.asarray(zs)[chunks == j]
                qimg = images[q][z_sel].astype(np.float32)
                out = np.asarray(predict(sup_img[j], sup_msk[j], qimg))
                if out.shape != qimg.shape:
                    raise ValueError(f"predict returned shape {out.shape} for query slices of shape {qimg.shape} "
                                     f"(scan {q}, class {c}, chunk {j})")
                pred[z_sel] = out.astype(bool)
            lo, hi = zs[0], zs[-1]
            metric.record(pred[lo:hi + 1], labels[q][lo:hi + 1] == c, q, c)
            predictions[(q, c)] = pred
            scored[(q, c)] = (lo, hi)
    bar.close()
    return FoldResult(classes=list(classes), metrics=metric.aggregate(), predictions=predictions,
                      support_slices=supports, scored=scored, skipped=skipped, support_ids=list(support_ids),
                      query_ids=list(query_ids), n_part=n_part, z_margin=z_margin,
                      class_names=dict(class_names or {}))
