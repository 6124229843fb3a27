"""bench.prediction: the synthetic CT and one tiny end-to-end ``predict.py`` measurement (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bench.prediction import ORGAN_ID, measure_predict, synthetic_ct
from bench.report import format_table


def test_synthetic_ct_values() -> None:
    img, lab = synthetic_ct(10, 64)
    assert img.dtype == np.int16 and img.shape == (10, 64, 64) and lab.shape == img.shape
    assert img[:, 0, 0].max() < -900  # air in the corners
    organ_slices = np.flatnonzero((lab == ORGAN_ID).any(axis=(1, 2)))
    assert 0 < organ_slices[0] and organ_slices[-1] < 9  # the middle ~60 % of the slices
    assert abs(float(img[lab == ORGAN_ID].mean()) - 60) < 5


def test_measure_predict_tiny(tmp_path: Path) -> None:
    m = measure_predict("lite_gn", n_slices=8, size=64, support_slices=8, work_dir=str(tmp_path))
    assert m["query_shape"] == [8, 64, 64] and m["seconds"] > 0 and m["predict_peak_rss_mb"] > 50
    seg = sitk.ReadImage(str(tmp_path / "out" / "query_seg.nii.gz"))
    assert seg.GetSize() == (64, 64, 8) and np.allclose(seg.GetSpacing(), (0.78, 0.78, 2.5))
    res = {"predict_s": {"demo": m["seconds"]}, "predict_peak_rss_mb": {"demo": m["predict_peak_rss_mb"]},
           "measurements": {"predict.demo": m}}
    assert "64x64x8 CT query, demo (lite_gn)" in format_table(res)
