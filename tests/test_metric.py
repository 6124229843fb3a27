"""Tests for evaluation/metric.py: hand-computed Dice/precision/recall, the NaN convention, 3D accumulation,
aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metric import Metric, dice, mean_slice_dice, precision, recall, slice_counts


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


def test_per_slice_dice_by_hand() -> None:
    pred = np.zeros((4, 4, 4), bool)
    gt = np.zeros((4, 4, 4), bool)
    pred[0, :2, :2], gt[0, :2, :1] = True, True  # slice 0: 4 px predicted, 2 px GT, both hit: Dice 4/6
    pred[1, 3, :] = True  # slice 1: 4 false-positive px, no GT: Dice 0
    gt[2, 3, 3] = True  # slice 2: 1 GT px missed: Dice 0
    # slice 3: empty prediction and GT: no Dice, left out of the mean
    np.testing.assert_array_equal(slice_counts(pred, gt), [[2, 2, 0], [0, 4, 0], [0, 0, 1], [0, 0, 0]])
    assert mean_slice_dice(slice_counts(pred, gt)) == pytest.approx((4 / 6 + 0 + 0) / 3)
    other_p = np.zeros((2, 3, 3), bool)
    other_g = np.zeros((2, 3, 3), bool)
    other_p[0, 0, :], other_g[0, 0, :] = True, True  # slice 0: identical 3 px: Dice 1
    other_p[1, 1, 0] = True
    other_g[1, 1, :] = True  # slice 1: 1 px predicted inside 3 GT px: Dice 2/4
    m = Metric()
    m.record(pred[:2], gt[:2], scan_id=7, class_id=1)  # chunks of one scan: the slices of both count
    m.record(pred[2:], gt[2:], scan_id=7, class_id=1)
    m.record(other_p, other_g, scan_id=8, class_id=1)
    agg = m.aggregate()
    scan7, scan8 = (4 / 6) / 3, (1 + 0.5) / 2
    assert agg["per_scan"]["dice_per_slice"] == [pytest.approx([scan7]), pytest.approx([scan8])]
    assert agg["class_dice_per_slice"][1] == pytest.approx((scan7 + scan8) / 2)
    assert agg["mean_dice_per_slice"] == pytest.approx((scan7 + scan8) / 2)
    assert agg["class_dice_per_slice_std"][1] == pytest.approx(abs(scan7 - scan8) / 2)
    # the 3D Dice of the same records differs: scan 7 TP 2, FP 6, FN 1 -> 4/11; scan 8 TP 4, FP 0, FN 2 -> 8/10
    assert agg["per_scan"]["dice"] == [pytest.approx([4 / 11]), pytest.approx([0.8])]
    assert agg["class_dice"][1] == pytest.approx((4 / 11 + 0.8) / 2)
    m.reset()
    assert m.aggregate()["per_scan"]["scan_ids"] == [] and not m.slices


def test_per_slice_dice_nan_and_2d_input() -> None:
    assert math.isnan(mean_slice_dice(np.zeros((3, 3), np.int64)))  # every slice empty in both
    assert math.isnan(mean_slice_dice(np.zeros((0, 3), np.int64)))
    one = np.array([[1, 0], [0, 0]], bool)
    np.testing.assert_array_equal(slice_counts(one, one), [[1, 0, 0]])  # a 2D input is one slice
    m = Metric()
    m.record(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), bool), 1, 1)
    agg = m.aggregate()
    assert math.isnan(agg["class_dice_per_slice"][1]) and (1, 1, "dice_per_slice") in agg["nan_entries"]
    with pytest.raises(ValueError, match="shape"):
        slice_counts(np.zeros((2, 2)), np.zeros((2, 3)))


def test_mask_dice_by_hand() -> None:
    from evaluation.metric import mask_dice

    pred = np.zeros((2, 3, 3), bool)
    gt = np.zeros((2, 3, 3), bool)
    assert np.isnan(mask_dice(pred, gt))
    pred[0, :2, :2] = True  # 4 voxels
    gt[0, 1:, 1:] = True  # 4 voxels, 1 shared: Dice = 2 / (4 + 4)
    gt[1, 0, 0] = True  # and one more in the other slice: 2 / (4 + 5)
    assert mask_dice(pred, gt) == 2 / 9
    assert mask_dice(gt, gt) == 1.0 and mask_dice(pred, ~pred) == 0.0

