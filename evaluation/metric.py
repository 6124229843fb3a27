"""The one metric API (record, aggregate, reset; MONAI's life cycle): per-scan 3D Dice, precision and recall, and
the mean per-slice Dice, aggregated per fold (docs/method.md#metrics).

Life cycle: :meth:`Metric.record` once or several times per (scan, class) (e.g. once per chunk of slices; the
counts add up), then :meth:`Metric.aggregate`, then :meth:`Metric.reset`.

Conventions:

- Counts TP, FP, FN are summed over every recorded slice of a (scan, class): a 3D metric. This is the paper's
  Dice (``dice``, ``class_dice``, ``mean_dice``).
- The mean per-slice Dice (``dice_per_slice``, ``class_dice_per_slice``, ``mean_dice_per_slice``) is the 2D Dice
  of each recorded slice (axis 0 of ``pred``), averaged over the slices where the prediction or the ground truth
  is non-empty (a slice with both empty has no Dice), then aggregated over scans like the 3D Dice. It weighs a
  small organ section as much as a large one, so it is lower than the 3D Dice when the organ's ends are missed;
  papers that report "Dice" per 2D slice mean this one.
- Dice = 2TP / (2TP + FP + FN); precision = TP / (TP + FP); recall = TP / (TP + FN).
- A ratio whose denominator is 0 is NaN: Dice with an empty prediction *and* an empty ground truth, precision
  with an empty prediction, recall with an empty ground truth. NaN entries are left out of every mean and
  standard deviation and listed in ``nan_entries`` of :meth:`Metric.aggregate` (flagged, never hidden).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def dice(tp: Any, fp: Any, fn: Any) -> np.ndarray:
    """Dice = 2TP / (2TP + FP + FN), elementwise; NaN where prediction and ground truth are both empty."""
    tp = np.asarray(tp, np.float64)
    return _ratio(2 * tp, 2 * tp + np.asarray(fp) + np.asarray(fn))


def mask_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """3D Dice of two bool masks of one shape (any number of axes); NaN when both are empty."""
    tp = int((pred & gt).sum())
    return float(dice(tp, int(pred.sum()) - tp, int(gt.sum()) - tp))


def precision(tp: Any, fp: Any) -> np.ndarray:
    """Precision = TP / (TP + FP), elementwise; NaN where the prediction is empty."""
    return _ratio(tp, np.asarray(tp, np.float64) + np.asarray(fp))


def recall(tp: Any, fn: Any) -> np.ndarray:
    """Recall = TP / (TP + FN), elementwise; NaN where the ground truth is empty."""
    return _ratio(tp, np.asarray(tp, np.float64) + np.asarray(fn))


def slice_counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """TP, FP, FN of each slice: an (n_slices, 3) int64 array.

    Args:
        pred, gt: binary masks of one shape; axis 0 is the slice axis for 3D input (``(Z, H, W)``), a 2D input
            ``(H, W)`` is one slice.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.ndim < 3:
        p, g = p[None], g[None]
    p, g = p.reshape(p.shape[0], -1), g.reshape(g.shape[0], -1)
    tp = np.count_nonzero(p & g, axis=1)
    return np.stack([tp, np.count_nonzero(p, axis=1) - tp, np.count_nonzero(g, axis=1) - tp], axis=1).astype(np.int64)


def mean_slice_dice(counts: np.ndarray) -> float:
    """Mean of the per-slice Dice over the slices of ``counts`` ((n, 3) TP, FP, FN) where it is defined; NaN when
    no slice has a non-empty prediction or ground truth."""
    per_slice = dice(counts[:, 0], counts[:, 1], counts[:, 2]) if len(counts) else np.zeros(0)
    defined = per_slice[~np.isnan(per_slice)]
    return float(defined.mean()) if defined.size else float("nan")


def _nan_stats(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over ``axis`` ignoring NaN; all-NaN slices give NaN without a warning."""
    n = np.sum(~np.isnan(a), axis=axis)
    total = np.nansum(a, axis=axis)
    mean = _ratio(total, n)
    dev = np.where(np.isnan(a), 0.0, a - np.expand_dims(np.nan_to_num(mean), axis))
    std = np.sqrt(_ratio(np.sum(dev * dev, axis=axis), n))
    return mean, std


class Metric:
    """Accumulates TP/FP/FN per (scan, class) and aggregates per-class and mean scores over scans."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], np.ndarray] = {}
        self.slices: dict[tuple[int, int], list[np.ndarray]] = {}  # per-slice (n, 3) counts, in recording order

    def reset(self) -> None:
        """Forget every recorded count."""
        self.counts.clear()
        self.slices.clear()

    def record(self, pred: np.ndarray, gt: np.ndarray, scan_id: int, class_id: int) -> None:
        """Add the counts of one binary prediction against its ground truth.

        Args:
            pred: binary prediction, (Z, H, W) (any shape, restricted to the scored slices); nonzero = foreground.
            gt: binary ground truth of the same shape.
            scan_id: query scan id.
            class_id: class id.
        """
        if pred.shape != gt.shape:
            raise ValueError(f"scan {scan_id}, class {class_id}: prediction shape {pred.shape} != gt {gt.shape}")
        per_slice = slice_counts(pred, gt)
        key = (int(scan_id), int(class_id))
        self.counts[key] = self.counts.get(key, np.zeros(3, np.int64)) + per_slice.sum(axis=0)
        self.slices.setdefault(key, []).append(per_slice)

    def aggregate(self) -> dict[str, Any]:
        """Scores over the recorded scans.

        Returns:
            ``class_dice``, ``class_precision``, ``class_recall`` ({class_id: mean over scans}),
            ``class_dice_std`` (population std over scans), ``mean_dice`` (mean over scans of each scan's class
            mean), ``mean_dice_std``, ``mean_precision``, ``mean_recall`` (same rule), ``per_scan`` (the raw
            matrices: ``scan_ids``, ``class_ids``, and scan x class lists ``dice``, ``dice_per_slice``,
            ``precision``, ``recall``, ``tp``, ``fp``, ``fn``; NaN where not recorded), and ``nan_entries``
            ([(scan, class, metric)]). ``class_dice_per_slice``, ``class_dice_per_slice_std``,
            ``mean_dice_per_slice`` and ``mean_dice_per_slice_std`` are the mean per-slice Dice, aggregated by the
            same rules.
        """
        scans = sorted({s for s, _ in self.counts})
        classes = sorted({c for _, c in self.counts})
        cnt = np.full((len(scans), len(classes), 3), np.nan)
        for (s, c), v in self.counts.items():
            cnt[scans.index(s), classes.index(c)] = v
        tp, fp, fn = cnt[..., 0], cnt[..., 1], cnt[..., 2]
        per_slice = np.full((len(scans), len(classes)), np.nan)
        for (s, c), parts in self.slices.items():
            per_slice[scans.index(s), classes.index(c)] = mean_slice_dice(np.concatenate(parts))
        scores = {"dice": dice(tp, fp, fn), "dice_per_slice": per_slice, "precision": precision(tp, fp),
                  "recall": recall(tp, fn)}
        out: dict[str, Any] = {}
        for name, mat in scores.items():
            per_class, per_class_std = _nan_stats(mat, axis=0)
            scan_mean, _ = _nan_stats(mat, axis=1)
            mean, std = _nan_stats(scan_mean[None], axis=1)
            out[f"class_{name}"] = {c: float(v) for c, v in zip(classes, per_class)}
            out[f"class_{name}_std"] = {c: float(v) for c, v in zip(classes, per_class_std)}
            out[f"mean_{name}"] = float(mean[0])
            out[f"mean_{name}_std"] = float(std[0])
        recorded = ~np.isnan(tp)
        out["nan_entries"] = [(scans[i], classes[j], name) for name, mat in scores.items()
                              for i, j in zip(*np.nonzero(np.isnan(mat) & recorded))]
        out["per_scan"] = {"scan_ids": scans, "class_ids": classes,
                           **{k: v.tolist() for k, v in scores.items()},
                           **{k: v.tolist() for k, v in (("tp", tp), ("fp", fp), ("fn", fn))}}
        return out


# -------------------------------------------------------------------- surface distance (predict.py's report)
def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a 3D bool mask: the mask minus its 6-connected erosion (a voxel on the array border
    counts as boundary)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                          border_value=0)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """95th percentile of the symmetric surface distance in mm (the pooled both-direction distances, as
    ``medpy.metric.hd95``).

    Distances from each boundary voxel of one mask to the nearest boundary voxel of the other, by the exact
    Euclidean distance transform (``scipy.ndimage.distance_transform_edt`` with the voxel spacing), computed on the
    bounding box of both masks (plus one voxel) to keep large grids cheap.

    Args:
        pred, ref: (Z, H, W) bool masks on the same grid.
        spacing_zyx: voxel size in mm along (Z, H, W).

    Returns:
        HD95 in mm; NaN when either mask is empty (undefined).
    """
    from scipy import ndimage

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"hd95: prediction {pred.shape} and reference {ref.shape} differ in shape")
    if not pred.any() or not ref.any():
        return float("nan")
    both = np.argwhere(pred | ref)
    lo = np.maximum(both.min(axis=0) - 1, 0)
    hi = np.minimum(both.max(axis=0) + 2, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sp, sr = _surface(pred[box]), _surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing_zyx)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)
    return float(np.percentile(np.concatenate([to_ref[sp], to_pred[sr]]), 95))
