"""Tests for models/intensity_baseline.py and the evaluation/baseline.py CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_preprocessing.phantom import generate_phantom, synthesize_scan
from evaluation import baseline as baseline_cli
from evaluation.ep1_alp import evaluate_fold
from models.intensity_baseline import IntensityBaseline


def _toy_scan(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(8, 24, 24): round organ (value 5, label 1) on slices 2..5, a brighter organ (10), a small decoy of value 5."""
    img = np.zeros((8, 24, 24), np.float32)
    lab = np.zeros((8, 24, 24), np.int32)
    yy, xx = np.mgrid[:24, :24]
    disc = (yy - 8 - shift) ** 2 + (xx - 8) ** 2 <= 16  # radius 4: unchanged by the 1-pixel opening
    img[2:6][:, disc] = 5.0
    lab[2:6][:, disc] = 1
    img[:, 16:22, 16:22] = 10.0
    img[3, 18:20, 2:4] = 5.0  # same intensity, smaller and disconnected: removed by the largest-component rule
    return img, lab


def test_perfect_when_intensity_separates() -> None:
    scans = {i: _toy_scan(i) for i in range(3)}
    images = {i: s[0] for i, s in scans.items()}
    labels = {i: s[1] for i, s in scans.items()}
    res = evaluate_fold(IntensityBaseline(), images, labels, [0], [1, 2], [1])
    assert res.metrics["class_dice"][1] == 1.0 and res.metrics["mean_dice"] == 1.0


def test_fit_range_and_largest_component() -> None:
    bl = IntensityBaseline(low_pct=0, high_pct=100, opening_radius=0, fill_holes=False)
    sup = np.array([[[1.0, 2.0], [3.0, 9.0]]], np.float32)
    msk = np.array([[[True, True], [True, False]]])
    assert bl.fit_range(sup, msk) == (1.0, 3.0)
    q = np.zeros((2, 5, 5), np.float32)
    q[:, 0:2, 0:2] = 2.0  # 8 voxels, connected across the two slices
    q[0, 4, 4] = 2.0  # 1 voxel
    out = bl(sup, msk, q)
    assert out.dtype == bool and out.sum() == 8 and not out[0, 4, 4]
    assert not bl(sup, msk, np.full((2, 5, 5), 7.0, np.float32)).any()  # nothing in range: empty


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        IntensityBaseline(low_pct=90, high_pct=10)
    with pytest.raises(ValueError, match="empty"):
        IntensityBaseline().fit_range(np.ones((1, 2, 2)), np.zeros((1, 2, 2), bool))


def test_small_phantom_defeats_intensity() -> None:
    images, labels = {}, {}
    for i in range(3):
        img, lab, _ = synthesize_scan(11, i, 64, (12, 14))
        images[i] = (img - img.mean()) / img.std()
        labels[i] = lab
    res = evaluate_fold(IntensityBaseline(), images, labels, [2], [0, 1], [1, 2, 3, 4])
    assert res.metrics["mean_dice"] < 0.6


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_phantom(tmp_path, n_scans=3, seed=4, size=48, n_slices_min=12, n_slices_max=12)
    out = tmp_path / "res" / "baseline.json"
    baseline_cli.main(["--dataset", str(tmp_path / "dataset.json5"), "--fold", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "LIVER" in printed and "mean" in printed
    d = json.loads(out.read_text())
    assert d["classes"] == [1, 2, 3, 4] and d["norm"] == "auto" and d["protocol"] == "ep1_alp"
    assert d["support_ids"] == [2] and d["query_ids"] == [0, 1]
    assert set(d) >= {"class_dice", "class_precision", "class_recall", "mean_dice", "per_scan"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in d["class_dice"].values())


def test_zscore_normalisation(tmp_path: Path) -> None:
    generate_phantom(tmp_path, n_scans=3, seed=4, size=48, n_slices_min=12, n_slices_max=12)
    info = baseline_cli.get_dataset_info(tmp_path / "dataset.json5")
    images, labels, support, queries = baseline_cli.load_fold_volumes(info, tmp_path, 0)
    assert support == [2] and queries == [0, 1]
    for v in images.values():
        assert v.dtype == np.float32 and abs(float(v.mean())) < 1e-3 and abs(float(v.std()) - 1) < 1e-3
    raw, _, _, _ = baseline_cli.load_fold_volumes(info, tmp_path, 0, norm="raw")
    assert raw[0].max() > 100
