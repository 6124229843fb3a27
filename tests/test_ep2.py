"""Tests for evaluation/ep2.py: body extent, estimated range, connected components, whole-volume scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.ep2 import (
    SupportScan,
    body_z_range,
    ep2_chunks,
    ep2_query_range,
    ep2_segment_class,
    evaluate_fold_ep2,
    largest_component,
    relative_extent,
)
from tests.test_ep1_alp import _fold_volumes


def test_body_range_relative_extent_and_query_range() -> None:
    body = np.zeros((10, 10, 10), bool)
    body[2:8, 2:8, 2:8] = True  # 36 voxels on each of slices 2..7
    body[9, 0, 0] = True  # a 1-voxel speck: 1/36 = 2.8 % of the largest slice's body
    assert body_z_range(body) == (2, 7)  # min_fraction 5 %
    assert body_z_range(body, min_fraction=0.02) == (2, 9)
    with pytest.raises(ValueError, match="body mask is empty"):
        body_z_range(np.zeros((3, 4, 4), bool))
    assert relative_extent((3, 5), (1, 9)) == (0.25, 0.5)
    assert relative_extent((4, 4), (4, 4)) == (0.0, 0.0)  # one-slice body: divides by 1
    # mean extent (0.375, 0.625) on a query body 0..8 -> slices 3..5
    assert ep2_query_range([(0.25, 0.5), (0.5, 0.75)], (0, 8)) == (3.0, 5.0)


def test_ep2_chunks_clamp_outside_the_estimated_range() -> None:
    # lo 2, hi 5, 3 chunks of width 1: below the range -> chunk 0, above -> chunk 2
    assert ep2_chunks(8, 2.0, 5.0, 3).tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    # empty range: chunk 0 (docs/method.md#q27-one-slice-organs)
    assert ep2_chunks(4, 1.5, 1.5, 3).tolist() == [0, 0, 0, 0]


def test_largest_component_is_26_connected() -> None:
    m = np.zeros((4, 5, 5), bool)
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = True  # a diagonal chain: one 26-connected component of 3
    m[0, 4, 3:5] = True  # 2 voxels, apart
    out = largest_component(m)
    assert out.sum() == 3 and out[0, 0, 0] and out[2, 2, 2] and not out[0, 4, 4]
    assert not largest_component(np.zeros((2, 2, 2), bool)).any()


def _ep2_scans() -> tuple[SupportScan, np.ndarray, np.ndarray]:
    """Support: 10 slices, body 1..9, class 3 on slices 2..5 (image value = slice index); query: 9 slices, body
    0..8, organ-like bright voxels on slices 1..3 (12 voxels) and an apart false positive on slice 7 (1 voxel)."""
    sup_lab = np.zeros((10, 4, 4), np.int32)
    sup_lab[2:6, 1:3, 1:3] = 3
    sup_body = np.zeros((10, 4, 4), bool)
    sup_body[1:10] = True
    sup_img = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 4, 4)).copy()
    query = np.zeros((9, 4, 4), np.float32)
    query[1:4, 1:3, 1:3] = 1
    query[7, 3, 3] = 1
    return SupportScan(sup_img, sup_lab, sup_body), query, np.ones((9, 4, 4), bool)


def test_ep2_segment_class_hand_example() -> None:
    sup, query, body = _ep2_scans()
    calls = []

    def margin(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        calls.append((s.shape, float(s[0, 0, 0]), int(m.sum()), len(q)))
        return np.where(q > 0.5, 2.0, -1.0)

    seg = ep2_segment_class(margin, [sup], query, body, class_id=3, n_part=3)
    # L = [2, 3, 4, 5] -> supports L[0], L[2], L[3]; extent (2-1)/8, (5-1)/8 -> query range 1.0 .. 4.0
    assert seg.support_slices == [[2, 4, 5]] and seg.estimated_range == (1.0, 4.0)
    # chunks: z 0,1 -> 0; z 2 -> 1; z 3..8 -> 2 (clamped): every query slice is segmented
    assert calls == [((1, 4, 4), 2.0, 4, 2), ((1, 4, 4), 4.0, 4, 1), ((1, 4, 4), 5.0, 4, 6)]
    assert seg.margin.shape == (9, 4, 4) and (seg.margin > 0).sum() == 13
    assert seg.mask.sum() == 12 and not seg.mask[7].any()  # the apart false positive is removed
    keep_all = ep2_segment_class(margin, [sup], query, body, 3, 3, keep_largest=False)
    assert keep_all.mask.sum() == 13
    with pytest.raises(ValueError, match="support 0 holds no slice of class 2"):
        ep2_segment_class(margin, [sup], query, body, class_id=2)


def test_ep2_segment_class_k_shot_pools_supports() -> None:
    sup, query, body = _ep2_scans()
    sup2 = SupportScan(sup.image + 100, sup.label, sup.body)
    shapes = []

    def margin(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        shapes.append((s.shape, m.shape, float(s[1, 0, 0] - s[0, 0, 0])))
        return np.where(q > 0.5, 1.0, -1.0)

    seg = ep2_segment_class(margin, [sup, sup2], query, body, class_id=3, n_part=1)
    assert shapes == [((2, 4, 4), (2, 4, 4), 100.0)]  # one call with both scans' slices, in order
    assert seg.support_slices == [[4], [4]]


def test_evaluate_fold_ep2_scores_the_whole_volume() -> None:
    """A segmenter returning known label volumes: counts over every slice, z-ranges and skipped pairs by hand."""
    from types import SimpleNamespace

    _, labels = _fold_volumes()
    seg_labels = {1: np.zeros_like(labels[1], np.int32), 2: np.zeros_like(labels[2], np.int32)}
    seg_labels[1][2, 1:3, 1:3] = 1  # 4 voxels; the label holds class 1 on slices 2..4
    seg_labels[1][5] = 1  # 16 voxels on slice 5, outside the true range: scored (no ground truth used)
    calls = []

    def segment(q: int):
        calls.append(q)
        info = SimpleNamespace(estimated_range=(1.0, 5.0), support_slices=[[1, 3]])
        return SimpleNamespace(labels=seg_labels[q], classes={1: info})

    with pytest.warns(UserWarning, match="query scan 2 holds no slice of class 1"):
        res = evaluate_fold_ep2(segment, labels, [0], [1, 2], [1], class_names={1: "LIVER"}, method="test: by hand")
    assert calls == [1, 2]  # one segmentation per query, all classes at once
    gt = labels[1] == 1
    tp = int((gt & (seg_labels[1] == 1)).sum())
    fp, fn = 20 - tp, int(gt.sum()) - tp
    assert res.metrics["class_dice"][1] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert res.scored == {(1, 1): (0, 5)} and res.skipped == [(2, 1)] and res.protocol == "ep2"
    true_range = tuple(int(z) for z in np.flatnonzero(gt.any(axis=(1, 2)))[[0, -1]])
    assert res.z_ranges == {(1, 1): ((2, 5), true_range)}
    share = float(abs(2 - true_range[0]) <= 3 and abs(5 - true_range[1]) <= 3)
    d = json.loads(json.dumps(res.to_json_dict()))
    assert d["protocol"] == "ep2" and d["method"] == "test: by hand" and d["z_range_within_3_slices"] == share
    assert d["estimated_ranges"] == {"1,1": [1.0, 5.0]} and d["support_slices"] == {"1": {"0": [1, 3]}}
    with pytest.raises(ValueError, match="scan 7 is missing"):
        evaluate_fold_ep2(segment, labels, [0], [7], [1])
