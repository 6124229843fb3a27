"""Intensity and value transforms: percentile clip, CT window formula (fixed and per-volume), exact label maps."""

import numpy as np
import pytest

from data_preprocessing.chaos import GREY_TO_LABEL
from data_preprocessing.intensity import (
    clip_upper_percentile,
    ct_to_uint8_range,
    map_label_values,
    rescale_min_max,
    rescale_window,
    window_ct,
)


def test_clip_upper_percentile_cuts_only_the_top() -> None:
    img = np.arange(-100, 900, dtype=np.float64).reshape(10, 10, 10)  # 1000 values -100..899
    out = clip_upper_percentile(img, 99.5)
    top = -100 + 0.995 * 999  # numpy's linear percentile of an arithmetic sequence
    assert out.dtype == np.float32
    assert out.max() == pytest.approx(top, abs=1e-3)
    assert out.min() == -100  # no lower clip
    assert np.array_equal(out[img <= top], img[img <= top].astype(np.float32))
    assert np.count_nonzero(img > top) == 5 and np.all(out[img > top] == out.max())


def test_window_formula_by_hand() -> None:
    hu = np.array([-1000, -125, -25, 75, 275, 3000], dtype=np.int16)
    expected = np.array([0.0, 0.0, 100 / 400 * 255, 200 / 400 * 255, 255.0, 255.0], dtype=np.float32)
    np.testing.assert_allclose(ct_to_uint8_range(hu), expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(window_ct(hu), np.array([-125, -125, -25, 75, 275, 275], dtype=np.float32))
    assert rescale_window(np.array([-125.0, 275.0])).tolist() == [0.0, 255.0]


def test_per_volume_rescale_differs_when_the_window_bounds_are_not_reached() -> None:
    hu = np.array([-25.0, 75.0, 175.0])  # inside the window: min -25, max 175
    np.testing.assert_allclose(ct_to_uint8_range(hu, mode="per_volume"), [0.0, 127.5, 255.0], atol=1e-4)
    np.testing.assert_allclose(ct_to_uint8_range(hu, mode="fixed"), [63.75, 127.5, 191.25], atol=1e-4)
    both_bounds = np.array([-500.0, 75.0, 900.0])
    np.testing.assert_allclose(ct_to_uint8_range(both_bounds, mode="per_volume"),
                               ct_to_uint8_range(both_bounds, mode="fixed"), atol=1e-4)


def test_rescale_errors() -> None:
    with pytest.raises(ValueError, match="constant volume"):
        rescale_min_max(np.full((2, 2), 5.0))
    with pytest.raises(ValueError, match="unknown CT rescale mode"):
        ct_to_uint8_range(np.zeros(3), mode="minmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="low < high"):
        window_ct(np.zeros(3), 10, 10)
    with pytest.raises(ValueError, match="percentile"):
        clip_upper_percentile(np.zeros(3), 0)


def test_chaos_grey_map_is_fixed_not_by_rank() -> None:
    # Only liver and spleen present: ranks would give 1 and 2; the fixed map gives 1 and 4
    # (docs/method.md#q24-chaos-grey-values).
    grey = np.array([[0, 63], [252, 63]], dtype=np.uint8)
    out = map_label_values(grey, GREY_TO_LABEL)
    assert out.dtype == np.uint8 and out.tolist() == [[0, 1], [4, 1]]
    full = np.array([0, 63, 126, 189, 252])
    assert map_label_values(full, GREY_TO_LABEL).tolist() == [0, 1, 2, 3, 4]


def test_map_label_values_refuses_unknown_and_fractional_values() -> None:
    with pytest.raises(ValueError, match=r"patient 5: IMG-1\.png: unexpected values \[100, 255\]"):
        map_label_values(np.array([0, 63, 100, 255]), GREY_TO_LABEL, what="patient 5: IMG-1.png")
    assert map_label_values(np.array([0.0, 200.0, 600.0]), {0: 0, 200: 1, 500: 2, 600: 3}).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="non-integer"):
        map_label_values(np.array([0.0, 0.5]), {0: 0})
