"""Tests for evaluation/advice.py: which (scan, class) pairs are flagged, and the checks the warning points to."""

from __future__ import annotations

import math

from evaluation.advice import LOW_DICE, check_list, low_dice_warnings

NAMES = {1: "LIVER", 2: "RK", 4: "SPLEEN"}


def _scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    den = 2 * tp + fp + fn
    return {"dice": 2 * tp / den if den else math.nan, "tp": tp, "fp": fp, "fn": fn}


def test_empty_and_low_pairs_are_named_with_their_sizes() -> None:
    per_scan = {
        3: {1: _scores(0, 0, 50),  # empty prediction, organ present
            2: _scores(10, 40, 40),  # Dice 20/100 = 0.2
            4: _scores(30, 10, 10)},  # Dice 0.75: fine
        2: {1: _scores(15, 35, 35),  # Dice 30/100 = 0.3: not below the threshold
            2: _scores(0, 0, 0)},  # both empty: Dice undefined, no prediction expected: not flagged
    }
    lines = low_dice_warnings(per_scan, NAMES, "data/PH", "PHANTOM")
    assert lines[:2] == ["query scan 3, LIVER: empty prediction (0 voxels predicted, 50 labelled)",
                         "query scan 3, RK: Dice 0.200 < 0.3 (50 voxels predicted, 50 labelled)"]
    assert len(lines) == 3 and lines[2].startswith("2 low score(s) above: check, most likely first: (1) orientation")
    assert LOW_DICE == 0.3


def test_the_check_list_names_orientation_intensity_class_ids_and_the_command() -> None:
    text = check_list("data/my folder", "CHAOST2")
    assert text.index("orientation") < text.index("intensity") < text.index("class ids")
    assert "python -m data_preprocessing.verify --data-dir data/my folder --dataset CHAOST2" in text


def test_no_warning_when_every_pair_is_fine_and_null_counts_are_tolerated() -> None:
    assert low_dice_warnings({1: {1: _scores(9, 1, 1)}}, NAMES, "d", "PHANTOM") == []
    # a JSON round trip writes NaN as null: such a pair is not flagged, an unknown class id is named by its id
    assert low_dice_warnings({1: {7: {"dice": None, "tp": None, "fp": 0, "fn": 0}}}, NAMES, "d", "P") == []
    assert low_dice_warnings({1: {7: _scores(1, 9, 9)}}, NAMES, "d", "P", threshold=0.5)[0] == \
        "query scan 1, 7: Dice 0.100 < 0.5 (10 voxels predicted, 10 labelled)"
