"""launch/z_localisation.py: the z-end errors of the carried support label, checked on cases with known answers."""

from __future__ import annotations

import numpy as np

from data_preprocessing.phantom import synthesize_scan
from launch.z_localisation import measure


def test_a_slab_of_the_support_itself_is_placed_exactly() -> None:
    """The query is the support's own scan with its 8 lowest slices cut off (own origin): every organ end the query
    holds must come back within one slice, and the errors are signed predicted - true in query slices."""
    image, label, geom = synthesize_scan(5, 0, size=96, n_slices_range=(40, 44), appearance="ct")
    image, label = image.astype(np.float32), label.astype(np.int64)
    spacing = tuple(float(v) for v in reversed(geom.spacing))
    scans = {0: (image, label, spacing), 1: (image[8:], label[8:], spacing)}
    row = measure({0: ((0,), (1,))}, scans, "CT", {}, {"stages": ("z",)}, tolerance=1)
    classes = sorted(int(c) for c in np.unique(label[8:]) if c > 0)
    assert sorted(row["errors"]) == sorted(f"1,{c}" for c in classes)
    assert row["share_within_tolerance"] == 1.0, row["errors"]
    assert row["mean_abs_end_error_slices"] <= 1.0
    assert row["register"] == {"stages": ["z"]} and row["n_pairs"] == len(classes)


def test_errors_are_signed_predicted_minus_true_slices() -> None:
    """The same slab with its reference label moved 2 slices up: the carried ends are 2 slices low (-2, -2)."""
    image, label, geom = synthesize_scan(5, 0, size=96, n_slices_range=(40, 44), appearance="ct")
    image, label = image.astype(np.float32), label.astype(np.int64)
    spacing = tuple(float(v) for v in reversed(geom.spacing))
    moved = np.zeros_like(label[8:])
    moved[2:] = label[8:-2]
    scans = {0: (image, label, spacing), 1: (image[8:], moved, spacing)}
    row = measure({0: ((0,), (1,))}, scans, "CT", {}, {"stages": ("z",)}, tolerance=1)
    inside = [c for c in (1, 2, 3, 4) if (label[8:-2] == c).any() and not (label[8:10] == c).any()
              and not (label[-4:] == c).any()]
    assert inside, "the phantom should hold an organ away from both slab ends"
    for c in inside:
        assert row["errors"][f"1,{c}"] == [-2, -2], (c, row["errors"])
    assert row["share_within_tolerance"] < 1.0
