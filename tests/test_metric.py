"""Tests for evaluation/metric.py: hand-computed Dice/precision/recall, the NaN convention, 3D accumulation,
aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metric import Metric, dice, precision, recall


def test_formulas_hand_values() -> None:
    # TP 6, FP 2, FN 4: Dice 12/18, precision 6/8, recall 6/10
    assert float(dice(6, 2, 4)) == pytest.approx(12 / 18)
    assert float(precision(6, 2)) == pytest.approx(0.75)
    assert float(recall(6, 4)) == pytest.approx(0.6)
    np.testing.assert_allclose(dice([1, 0, 3], [1, 5, 0], [0, 0, 1]), [2 / 3, 0.0, 6 / 7])


def test_nan_convention() -> None:
    assert math.isnan(float(dice(0, 0, 0)))  # empty prediction and empty GT
    assert float(dice(0, 0, 5)) == 0.0  # empty prediction, non-empty GT: a real 0
    assert math.isnan(float(precision(0, 0)))  # empty prediction
    assert float(recall(0, 3)) == 0.0
    assert math.isnan(float(recall(0, 0)))


def test_record_sums_counts_over_slices_and_calls() -> None:
    pred = np.zeros((3, 4, 4), bool)
    gt = np.zeros((3, 4, 4), bool)
    pred[0, :2, :2] = True  # 4 px
    gt[0, :2, :1] = True  # 2 px, both hit
    gt[2, 3, 3] = True  # 1 px missed
    pred[1, 3, :] = True  # 4 px false positives
    m = Metric()
    m.record(pred[:2], gt[:2], scan_id=7, class_id=1)  # two chunks of the same scan add up
    m.record(pred[2:], gt[2:], scan_id=7, class_id=1)
    np.testing.assert_array_equal(m.counts[(7, 1)], [2, 6, 1])  # TP, FP, FN
    agg = m.aggregate()
    assert agg["class_dice"][1] == pytest.approx(4 / 11)
    assert agg["class_precision"][1] == pytest.approx(2 / 8)
    assert agg["class_recall"][1] == pytest.approx(2 / 3)


def test_aggregation_means_and_nan_exclusion() -> None:
    m = Metric()
    one = np.ones((1, 2, 2), bool)
    zero = np.zeros((1, 2, 2), bool)
    half = np.array([[[1, 1], [0, 0]]], bool)
    m.record(one, one, 1, 1)  # Dice 1
    m.record(half, one, 1, 2)  # Dice 2*2/(4+2) = 2/3
    m.record(zero, one, 2, 1)  # Dice 0, precision NaN
    m.record(zero, zero, 2, 2)  # Dice NaN (both empty)
    agg = m.aggregate()
    assert agg["class_dice"][1] == pytest.approx(0.5)
    assert agg["class_dice"][2] == pytest.approx(2 / 3)  # the NaN of scan 2 is left out
    assert agg["class_dice_std"][1] == pytest.approx(0.5)
    # scan means: scan 1 (1 + 2/3)/2 = 5/6, scan 2 = 0 (its NaN class left out); mean over scans 5/12
    assert agg["mean_dice"] == pytest.approx(5 / 12)
    assert agg["mean_dice_std"] == pytest.approx(5 / 12)
    assert agg["class_precision"][1] == pytest.approx(1.0)  # scan 2's NaN precision excluded
    assert (2, 2, "dice") in agg["nan_entries"] and (2, 1, "precision") in agg["nan_entries"]
    assert (1, 1, "dice") not in agg["nan_entries"]
    ps = agg["per_scan"]
    assert ps["scan_ids"] == [1, 2] and ps["class_ids"] == [1, 2]
    assert ps["dice"][0] == pytest.approx([1.0, 2 / 3]) and ps["dice"][1][0] == 0.0 and math.isnan(ps["dice"][1][1])
    assert ps["tp"][0] == [4.0, 2.0]


def test_unrecorded_pairs_are_nan_not_zero() -> None:
    m = Metric()
    one = np.ones((1, 1, 2), bool)
    m.record(one, one, 1, 1)
    m.record(one, one, 2, 3)
    agg = m.aggregate()
    assert agg["class_dice"] == {1: 1.0, 3: 1.0}
    assert agg["mean_dice"] == 1.0
    assert agg["nan_entries"] == []  # scan 1 x class 3 was never recorded: not flagged


def test_reset_and_shape_check() -> None:
    m = Metric()
    m.record(np.ones((1, 2, 2)), np.ones((1, 2, 2)), 0, 1)
    m.reset()
    agg = m.aggregate()
    assert agg["class_dice"] == {} and math.isnan(agg["mean_dice"])
    with pytest.raises(ValueError, match="scan 3, class 1"):
        m.record(np.ones((1, 2, 2)), np.ones((2, 2, 2)), 3, 1)
