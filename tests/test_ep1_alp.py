"""Tests for evaluation/ep1_alp.py: chunk centres, support slices, chunks, scored range, the fold driver."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.ep1_alp import (
    chunk_index,
    class_slices,
    class_z_range,
    evaluate_fold,
    part_positions,
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
    assert chunk_index(5, 5, 5, 3) == 0  # single-slice organ (docs/method.md#q27-one-slice-organs)
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
    # per slice: slice 2 Dice 1, slice 3 (4 TP, 2 FP) 8/10, slice 4 (4 FN) 0: mean 0.6, labelled apart from the 3D
    assert d["class_dice_per_slice"] == {"1": pytest.approx(0.6)} and d["mean_dice_per_slice"] == pytest.approx(0.6)
    assert d["per_scan"]["1"]["1"]["dice_per_slice"] == pytest.approx(0.6)
    assert set(d["dice_definitions"]) == {"dice", "dice_per_slice"} and "3D" in d["dice_definitions"]["dice"]


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
