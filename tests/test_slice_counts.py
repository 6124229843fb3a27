"""Tests for dataloaders/slice_counts.py: per-slice voxel counts of integer ids, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dataloaders.slice_counts import slice_counts


def test_counts_by_hand() -> None:
    vol = np.array([[[0, 1], [1, 2]], [[2, 2], [0, 0]]])  # (2, 2, 2)
    assert slice_counts(vol).tolist() == [[1, 2, 1], [2, 0, 2]]
    # more columns than ids: the extra ones count 0
    assert slice_counts(vol, 5).tolist() == [[1, 2, 1, 0, 0], [2, 0, 2, 0, 0]]


def test_class_counts_of_a_label_volume() -> None:
    lab = np.zeros((3, 4, 4), np.uint8)
    lab[1, 0, 0] = 1
    lab[2, :2, :2] = 3
    np.testing.assert_array_equal(slice_counts(lab, 4), [[16, 0, 0, 0], [15, 1, 0, 0], [12, 0, 0, 4]])


def test_refuses_ids_beyond_the_columns_and_non_volumes() -> None:
    with pytest.raises(ValueError, match="does not fit 2"):
        slice_counts(np.full((1, 2, 2), 2), 2)
    with pytest.raises(ValueError, match="volume"):
        slice_counts(np.zeros((2, 2), int))
