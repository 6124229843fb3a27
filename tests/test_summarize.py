"""Tests for evaluation/summarize.py and evaluation/summary_figure.py: the fold table by hand, the figure file, and the
published SSL-ALPNet values against docs/method.md#published-numbers."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from evaluation import summarize
from evaluation.published import PUBLISHED_SSL_ALPNET, published
from evaluation.summary_figure import panel_data


def _write(root: Path, name: str, dataset: str, setting: int, fold: int, dice: dict[str, float]) -> None:
    names = {"SABS": {"1": "SPLEEN", "2": "KID_R", "3": "KID_l", "6": "LIVER"},
             "PHANTOM": {"1": "LIVER", "4": "SPLEEN"}}[dataset]
    ids = {v: k for k, v in names.items()}
    res = {"dataset": dataset, "setting": setting, "fold": fold, "class_names": {ids[o]: o for o in dice},
           "class_dice": {ids[o]: v for o, v in dice.items()}}
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(res))


def test_published_values_equal_spec_10_1():
    # docs/method.md#published-numbers, typed from the table: CT LK RK Spl Liver mean | MR LK RK Spl Liver mean;
    # cardiac LV-BP LV-MYO RV
    spec = {1: ([72.36, 71.81, 70.96, 78.29, 73.35], [81.92, 85.18, 72.18, 76.10, 78.84]),
            2: ([63.34, 54.82, 60.25, 73.67, 63.02], [73.63, 78.39, 67.02, 73.05, 73.02])}
    for setting, (ct, mr) in spec.items():
        assert [published("SABS", setting)[k] for k in ("KID_l", "KID_R", "SPLEEN", "LIVER", "mean")] == ct
        assert [published("CHAOST2", setting)[k] for k in ("LK", "RK", "SPLEEN", "LIVER", "mean")] == mr
    assert published("CMR", 1) == {"LV_BP": 83.99, "LV_MYO": 66.74, "RV": 79.96, "mean": 76.90}
    assert set(PUBLISHED_SSL_ALPNET) == {("SABS", 1), ("SABS", 2), ("CHAOST2", 1), ("CHAOST2", 2), ("CMR", 1)}
    # each published mean is the organ mean to 0.01 (73.67 is the FoB value, docs/method.md#published-numbers)
    for values in PUBLISHED_SSL_ALPNET.values():
        organs = [v for k, v in values.items() if k != "mean"]
        assert sum(organs) / len(organs) == pytest.approx(values["mean"], abs=0.01)
    assert published("PHANTOM", 1) == {}


def test_summarize_writes_table_and_figure(tmp_path):
    runs = tmp_path / "runs"
    for fold, (liver, spleen) in enumerate([(0.8, 0.6), (0.7, 0.5), (0.9, 0.7)]):
        _write(runs, f"s1_f{fold}", "SABS", 1, fold, {"LIVER": liver, "SPLEEN": spleen})
    _write(runs, "ph", "PHANTOM", 2, 0, {"LIVER": 0.5, "SPLEEN": 0.25})
    assert summarize.main([str(runs), "--out", str(tmp_path / "out" / "summary")]) == 0
    table = json.loads((tmp_path / "out" / "summary.json").read_text())
    sabs = table["SABS setting 1"]
    assert sabs["organs"]["LIVER"]["mean"] == pytest.approx(0.8)
    assert sabs["organs"]["LIVER"]["std"] == pytest.approx(0.1)  # sample std of 0.8, 0.7, 0.9
    assert sabs["mean"] == pytest.approx(0.7) and sabs["n_folds"] == 3
    for dataset in ("SABS", "PHANTOM"):
        png = tmp_path / "out" / f"summary_{dataset}.png"
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list((tmp_path / "out").glob(".tmp-*"))
    organs, values, marks = panel_data("SABS", sabs)
    assert organs == ["LIVER", "SPLEEN"]
    assert values == [pytest.approx([80, 70, 90]), pytest.approx([60, 50, 70])]
    assert marks == {"LIVER": 78.29, "SPLEEN": 70.96}
    assert panel_data("PHANTOM", table["PHANTOM setting 2"])[2] == {}


def test_table_per_fold_next_to_published_with_rerun_column(tmp_path, capsys):
    runs = tmp_path / "runs"
    for fold, (liver, spleen) in enumerate([(0.8, 0.6), (0.7, 0.5), (0.9, 0.7)]):
        _write(runs, f"s1_f{fold}", "SABS", 1, fold, {"LIVER": liver, "SPLEEN": spleen})
    _write(runs, "s1_f4", "SABS", 1, 4, {"LIVER": 0.6})  # a fold with one organ only: not a complete fold
    _write(runs, "ph", "PHANTOM", 2, 0, {"LIVER": 0.5, "SPLEEN": 0.25})
    assert summarize.main([str(runs), "--out", str(tmp_path / "out" / "summary")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "summary.md").read_text() in printed
    lines = printed.splitlines()
    head = lines.index("### SABS setting 1 (3 complete folds), Dice (%)")
    table = lines[head + 2:head + 9]
    assert table[0] == ("| organ | fold 0 | fold 1 | fold 2 | fold 4 | mean ± std (here) | published SSL-ALPNet "
                        "| re-run here |")
    # the paper's organ order; per fold, mean ± sample std over the folds run, the published value, re-run or not
    assert table[2:] == [
        "| KID_l | - | - | - | - | - | 72.36 | no |",
        "| KID_R | - | - | - | - | - | 71.81 | no |",
        "| SPLEEN | 60.00 | 50.00 | 70.00 | - | 60.00 ± 10.00 | 70.96 | yes: folds 0, 1, 2 |",
        "| LIVER | 80.00 | 70.00 | 90.00 | 60.00 | 75.00 ± 12.91 | 78.29 | yes: folds 0, 1, 2, 4 |",
        # fold means over the complete folds: (80+60)/2, (70+50)/2, (90+70)/2; the mean is over the organ means
        "| **mean** | 70.00 | 60.00 | 80.00 | - | 67.50 ± 10.00 | 73.35 | partial: 2 of 4 organs (means not "
        "comparable) |"]
    ph = lines.index("### PHANTOM setting 2 (1 complete folds), Dice (%)")
    assert lines[ph + 4:ph + 7] == [
        "| LIVER | 50.00 | 50.00 ± 0.00 | - | yes: fold 0 |", "| SPLEEN | 25.00 | 25.00 ± 0.00 | - | yes: fold 0 |",
        "| **mean** | 37.50 | 37.50 ± 0.00 | - | yes: 1 complete folds (nothing published) |"]
    overview = lines[lines.index("### Published SSL-ALPNet settings (ECCV'20 Table 1), mean Dice (%)") + 2:]
    assert overview[2:8] == ["| SABS | 1 | 73.35 | 67.50 (3 complete folds) | partial: 2 of 4 organs |",
                             "| SABS | 2 | 63.02 | - | no |",
                             "| CHAOST2 | 1 | 78.84 | - | no |",
                             "| CHAOST2 | 2 | 73.02 | - | no |",
                             "| CMR | 1 | 76.90 | - | no |",
                             "| PHANTOM | 2 | - | 37.50 (1 complete folds) | yes (not published) |"]
    table_json = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert table_json["SABS setting 1"]["published"]["LIVER"] == 78.29
    assert table_json["SABS setting 1"]["fold_means"] == {"0": pytest.approx(0.7), "1": pytest.approx(0.6),
                                                          "2": pytest.approx(0.8)}
