"""What validation.py reports besides the Dice: the environment (versions, device, commit; null without git), the
mean per-slice Dice next to the 3D Dice, each labelled, and a warning per empty or low-scoring (scan, class)."""

from __future__ import annotations

import json
import logging
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data_preprocessing.class_slice_index import write_classmap
from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from evaluation.tables import percent
from tests.reliability_fixtures import TINY, cli, copy_data
from util.provenance import cpu_name, git_commit

SHORT = [*TINY, "n_steps=2", "lr_milestones=[1]", "save_snapshot_every=2"]
NAMES = get_dataset_info("PHANTOM").labels


@pytest.fixture(scope="module")
def checkpoint(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("report_run")
    assert cli("training.py", [f"data_dir={tiny_phantom}", f"run_dir={run}", *SHORT]) == 0
    return run / "snapshots" / "2.pth"


@pytest.fixture(scope="module")
def flipped(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom with query scan 3's labels mirrored left-right: an orientation error on one query."""
    data = copy_data(tiny_phantom, tmp_path_factory.mktemp("flipped") / "data")
    label, geom = niftiio.read_label_volume(niftiio.label_path(data, 3))
    niftiio.write_volume(np.ascontiguousarray(label[:, :, ::-1]).astype(np.uint8), niftiio.label_path(data, 3), geom)
    write_classmap(data, get_dataset_info("PHANTOM"), progress=False)
    return data


def _per_slice_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean 2D Dice over the slices of the GT's z-range where prediction or GT is non-empty (computed here)."""
    zs = np.flatnonzero(gt.any(axis=(1, 2)))
    values = []
    for z in range(zs[0], zs[-1] + 1):
        p, g = pred[z], gt[z]
        if p.any() or g.any():
            values.append(2 * np.count_nonzero(p & g) / (np.count_nonzero(p) + np.count_nonzero(g)))
    return float(np.mean(values))


def test_results_hold_environment_per_slice_dice_and_warnings(checkpoint: Path, flipped: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        assert cli("validation.py", [*TINY, f"data_dir={flipped}", f"run_dir={out}",
                                     f"reload_model_path={checkpoint}"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    # environment: versions, device and commit of this run
    env = res["environment"]
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert env["device"] == "cpu" and env["cuda"] is None and env["cudnn"] is None
    assert env["device_name"] == cpu_name() and env["git_commit"] == git_commit()
    # the mean per-slice Dice, recomputed here from the written predictions and the label files
    for sid, by_class in res["per_scan"].items():
        gt_all, _ = niftiio.read_label_volume(niftiio.label_path(flipped, int(sid)))
        for cid, scores in by_class.items():
            pred, _ = niftiio.read_label_volume(out / "interm_preds" / f"scan_{sid}_label_{cid}.nii.gz")
            assert scores["dice_per_slice"] == pytest.approx(_per_slice_dice(pred > 0, gt_all == int(cid)), abs=1e-12)
    for cid in res["classes"]:
        values = [res["per_scan"][s][str(cid)]["dice_per_slice"] for s in res["per_scan"]]
        assert res["class_dice_per_slice"][str(cid)] == pytest.approx(np.mean(values))
    assert res["class_dice_per_slice"] != res["class_dice"]  # two different measures, both in the file
    assert set(res["dice_definitions"]) == {"dice", "dice_per_slice"}
    # the printed table: both measures, each labelled
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ALPNet")}
    assert set(rows) == {"ALPNet, 3D Dice (paper)", "ALPNet, mean per-slice Dice"}
    assert rows["ALPNet, 3D Dice (paper)"].rstrip(" |").endswith(percent(res["mean_dice"]))
    assert rows["ALPNet, mean per-slice Dice"].rstrip(" |").endswith(percent(res["mean_dice_per_slice"]))
    # a warning for each empty or low-scoring pair, naming scan and class, and none for the others
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    flagged = set()
    for sid, by_class in res["per_scan"].items():
        for cid, s in by_class.items():
            empty = s["tp"] + s["fp"] == 0 and s["tp"] + s["fn"] > 0
            low = s["dice"] is not None and s["dice"] < 0.3
            named = [w for w in warnings if w.startswith(f"query scan {sid}, {NAMES[int(cid)]}: ")]
            assert len(named) == int(empty or low), (sid, cid, s, named)
            if empty or low:
                flagged.add((sid, cid))
                assert re.search(r"(empty prediction|Dice \d\.\d{3} < 0\.3) \(\d+ voxels predicted, \d+ labelled\)",
                                 named[0])
    assert any(sid == "3" for sid, _ in flagged)  # the mirrored query scores low on a lateral organ
    advice = [w for w in warnings if "low score(s) above: check, most likely first" in w]
    assert len(advice) == 1 and all(k in advice[0] for k in ("orientation", "intensity", "class ids"))
    assert f"--data-dir {flipped} --dataset PHANTOM" in advice[0]


def test_without_git_the_commit_is_null_and_the_run_succeeds(checkpoint: Path, tiny_phantom: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no_git_here"))
    out = tmp_path / "eval"
    assert cli("validation.py", [*TINY, f"data_dir={tiny_phantom}", f"run_dir={out}",
                                 f"reload_model_path={checkpoint}", "save_predictions=False"]) == 0
    env = json.loads((out / "results.json").read_text())["environment"]
    assert env["git_commit"] is None and env["git_dirty"] is None and env["torch"] == torch.__version__
