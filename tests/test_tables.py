"""Tests for evaluation/tables.py: the Dice table, by hand."""

from __future__ import annotations

import math

from evaluation.tables import dice_table, labelled_rows, percent


def test_percent() -> None:
    assert percent(0.7518) == "75.18" and percent(None) == "n/a" and percent(math.nan) == "n/a"


def test_dice_table_rows_columns_and_missing_values() -> None:
    alp = {"class_dice": {"1": 0.5, "4": 0.25}, "mean_dice": 0.375}
    base = {"class_dice": {"1": None, "4": 1.0}, "mean_dice": 1.0}
    table = dice_table({"ALPNet": alp, "baseline": base, "absent": None}, [1, 4], {1: "LIVER", 4: "SPLEEN"})
    assert table.splitlines() == ["| method | LIVER | SPLEEN | mean |", "|---|---|---|---|",
                                  "| ALPNet | 50.00 | 25.00 | 37.50 |", "| baseline | n/a | 100.00 | 100.00 |"]


def test_labelled_rows_give_3d_and_per_slice_dice() -> None:
    alp = {"class_dice": {"1": 0.5, "4": 0.25}, "mean_dice": 0.375,
           "class_dice_per_slice": {"1": 0.4, "4": None}, "mean_dice_per_slice": 0.4}
    old = {"class_dice": {"1": 0.1, "4": 0.3}, "mean_dice": 0.2}  # a results.json from before the per-slice Dice
    table = dice_table(labelled_rows({"ALPNet": alp, "baseline": old, "absent": None}), [1, 4],
                       {1: "LIVER", 4: "SPLEEN"})
    assert table.splitlines()[2:] == ["| ALPNet, 3D Dice (paper) | 50.00 | 25.00 | 37.50 |",
                                      "| ALPNet, mean per-slice Dice | 40.00 | n/a | 40.00 |",
                                      "| baseline, 3D Dice (paper) | 10.00 | 30.00 | 20.00 |"]
