"""Tests for util/protocol.py: EP1-ALP (chunk centres, support slices, chunks, scored range, the fold driver) and EP2
(body extent, estimated range, connected components, whole-volume scoring)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from util.protocol import (
    SupportScan,
    body_z_range,
    chunk_index,
    class_slices,
    class_z_range,
    ep2_chunks,
    ep2_query_range,
    ep2_segment_class,
    evaluate_fold,
    evaluate_fold_ep2,
    largest_component,
    part_positions,
    relative_extent,
    scored_range,
    support_slices,
)


def test_part_positions() -> None:
    assert part_positions(1) == [0.5]
    assert part_positions(3) == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert part_positions(5) == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    with pytest.raises(ValueError):
        part_positions(0)


def test_support_slices_hand_list() -> None:
    lst = [3, 4, 5, 7, 8, 9, 12]  # len 7: positions 7/6, 7/2, 35/6 -> indices 1, 3, 5
    assert support_slices(lst, 3) == [4, 7, 9]
    assert support_slices(lst, 1) == [7]
    assert support_slices(list(range(10, 22)), 3) == [12, 16, 20]  # len 12: indices 2, 6, 10
    with pytest.raises(ValueError, match="no slice"):
        support_slices([], 3)


def test_class_range_and_slices() -> None:
    lab = np.zeros((6, 3, 3), np.int32)
    lab[2, 0, 0] = 1
    lab[4, 1, 1] = 1
    lab[3, 2, 2] = 2
    assert class_slices(lab, 1) == [2, 4]
    assert class_z_range(lab, 1) == (2, 4)
    assert class_z_range(lab, 2) == (3, 3)
    assert class_z_range(lab, 3) is None


def test_chunk_index_hand_example() -> None:
    # z_min 10, z_max 19, n 3: chunk width 3.0
    got = [chunk_index(z, 10, 19, 3) for z in (10, 12, 13, 15, 16, 19)]
    assert got == [0, 0, 1, 1, 2, 2]
    assert chunk_index(8, 10, 19, 3) == 0 and chunk_index(21, 10, 19, 3) == 2  # z_margin slices clamp
    assert chunk_index(5, 5, 5, 3) == 0  # single-slice organ (Q27)
    # z_min 2, z_max 4: width 2/3, so z = 3 -> floor(1.5) = 1, z = 4 -> floor(3) = 3 -> clamped to 2
    assert [chunk_index(z, 2, 4, 3) for z in (2, 3, 4)] == [0, 1, 2]


def test_scored_range() -> None:
    assert scored_range(5, 8, 0, 20) == range(5, 9)
    assert scored_range(1, 8, 2, 9) == range(0, 9)


def _fold_volumes() -> tuple[dict, dict]:
    """Support scan 0 (class 1 on slices 1..4, image value = slice index), query 1 (class 1 on slices 2..4), and
    query 2 without class 1."""
    z, h, w = 6, 4, 4
    labels = {i: np.zeros((z, h, w), np.int32) for i in (0, 1, 2)}
    images = {i: np.zeros((z, h, w), np.float32) for i in (0, 1, 2)}
    labels[0][1:5, 1:3, 1:3] = 1
    images[0][:] = np.arange(z, dtype=np.float32)[:, None, None]
    labels[1][2:5, 1:3, 1:3] = 1  # 12 GT voxels
    images[1][2, 1:3, 1:3] = 1  # predicted: 4 TP
    images[1][3, 1:3, 1:4] = 1  # 4 TP + 2 FP; slice 4 predicted empty: 4 FN
    images[1][5] = 1  # outside the scored range: never scored
    labels[2][:, 0, 0] = 2
    return images, labels


def test_evaluate_fold_hand_dice() -> None:
    images, labels = _fold_volumes()
    calls = []

    def predict(sup_img: np.ndarray, sup_msk: np.ndarray, qry: np.ndarray) -> np.ndarray:
        calls.append((sup_img.shape, float(sup_img[0, 0, 0]), int(sup_msk.sum()), qry.shape, sup_img.dtype))
        return qry > 0.5

    with pytest.warns(UserWarning, match="query scan 2 holds no slice of class 1"):
        res = evaluate_fold(predict, images, labels, [0], [1, 2], [1], n_part=3, class_names={1: "LIVER"})
    # L = [1, 2, 3, 4]: supports L[0], L[2], L[3]; query range 2..4 -> chunks 0, 1, 2, one call each
    assert res.support_slices == {1: {0: [1, 3, 4]}}
    assert [c[1] for c in calls] == [1.0, 3.0, 4.0]
    assert all(c[0] == (1, 4, 4) and c[2] == 4 and c[3] == (1, 4, 4) and c[4] == np.float32 for c in calls)
    assert res.skipped == [(2, 1)]
    assert res.scored == {(1, 1): (2, 4)}
    # TP 8, FP 2, FN 4
    assert res.metrics["class_dice"][1] == pytest.approx(16 / 22)
    assert res.metrics["class_precision"][1] == pytest.approx(0.8)
    assert res.metrics["class_recall"][1] == pytest.approx(8 / 12)
    assert res.metrics["mean_dice"] == pytest.approx(16 / 22)
    assert res.per_scan[1][1]["tp"] == 8 and res.per_scan[1][1]["fp"] == 2 and res.per_scan[1][1]["fn"] == 4
    pred = res.predictions[(1, 1)]
    assert pred.dtype == np.uint8 and pred.shape == (6, 4, 4)
    assert pred[5].sum() == 0 and pred[:2].sum() == 0 and pred.sum() == 10  # zero outside the scored range
    d = json.loads(json.dumps(res.to_json_dict()))  # strictly JSON-serialisable
    assert d["class_dice"] == {"1": pytest.approx(16 / 22)} and d["classes"] == [1]
    assert d["class_names"] == {"1": "LIVER"} and d["skipped"] == [[2, 1]]
    assert d["per_scan"]["1"]["1"]["dice"] == pytest.approx(16 / 22)
    assert d["support_slices"] == {"1": {"0": [1, 3, 4]}} and list(d)[0] == "mean_dice"


def test_evaluate_fold_multishot_and_nan() -> None:
    images, labels = _fold_volumes()
    labels[3] = labels[0].copy()
    images[3] = images[0] + 10
    shapes = []

    def predict(sup_img: np.ndarray, sup_msk: np.ndarray, qry: np.ndarray) -> np.ndarray:
        shapes.append(sup_img.shape)
        return np.zeros(qry.shape, bool)  # empty prediction: precision NaN, Dice 0

    res = evaluate_fold(predict, images, labels, [0, 3], [1], [1], n_part=1, z_margin=1)
    assert shapes == [(2, 4, 4)]  # n_part 1: one call, one slice per support scan
    assert res.support_slices == {1: {0: [3], 3: [3]}}
    assert res.scored == {(1, 1): (1, 5)}
    assert res.metrics["class_dice"][1] == 0.0
    d = res.to_json_dict()
    assert d["class_precision"] == {"1": None} and d["class_recall"] == {"1": 0.0}


def test_evaluate_fold_errors() -> None:
    images, labels = _fold_volumes()
    with pytest.raises(ValueError, match="support scan 2 holds no slice of class 1"):
        evaluate_fold(lambda s, m, q: q > 0, images, labels, [2], [1], [1])
    with pytest.raises(ValueError, match="predict returned shape"):
        evaluate_fold(lambda s, m, q: q[:, :2] > 0, images, labels, [0], [1], [1])
    with pytest.raises(ValueError, match="scan 9 is missing"):
        evaluate_fold(lambda s, m, q: q > 0, images, labels, [0], [9], [1])


# -------------------------------------------------------------------- EP2 (whole volume, no GT localisation)
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
    assert ep2_chunks(4, 1.5, 1.5, 3).tolist() == [0, 0, 0, 0]  # empty range: chunk 0 (Q27)


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
    images, labels = _fold_volumes()
    bodies = {i: np.ones(v.shape, bool) for i, v in images.items()}

    def predict(sup_img: np.ndarray, sup_msk: np.ndarray, qry: np.ndarray) -> np.ndarray:
        return qry > 0.5

    with pytest.warns(UserWarning, match="query scan 2 holds no slice of class 1"):
        res = evaluate_fold_ep2(predict, images, labels, bodies, [0], [1, 2], [1], n_part=3, keep_largest=False)
    # predicted: slices 2 (4 TP), 3 (4 TP + 2 FP) and all of slice 5 (16 FP, outside the GT range, now scored)
    assert res.metrics["class_dice"][1] == pytest.approx(16 / (16 + 18 + 4))
    assert res.scored == {(1, 1): (0, 5)} and res.protocol == "ep2"
    # with the connected-component step the 16-voxel slice 5 is the largest component: TP 0, Dice 0
    with pytest.warns(UserWarning):
        res_cc = evaluate_fold_ep2(predict, images, labels, bodies, [0], [1, 2], [1], n_part=3)
    assert res_cc.metrics["class_dice"][1] == 0.0 and res_cc.predictions[(1, 1)].sum() == 16
    d = json.loads(json.dumps(res.to_json_dict()))
    assert d["protocol"] == "ep2" and d["support_slices"] == {"1": {"0": [1, 3, 4]}}
    assert d["estimated_ranges"] == {"1,1": [1.0, 4.0]}  # support extent 1..4 of body 0..5, query body 0..5
    with pytest.raises(ValueError, match="scan 1 is missing"):
        evaluate_fold_ep2(predict, images, labels, {0: bodies[0]}, [0], [1], [1])
