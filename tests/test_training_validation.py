"""Sacred smoke tests: training.py and validation.py in-process on a tiny phantom, twice in one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sacred.utils import ConfigAddedError

import training  # noqa: F401  (registers the 'train' command)
import validation  # noqa: F401  (registers the 'validate' command)
from config_ssl_upload import ex
from dataloaders import niftiio
from dataloaders.dataset_info import DatasetDescriptionError
from util.checkpoint import load_checkpoint

TINY = {
    "modelname": "lite_gn", "lr_schedule": "step",
    "input_size": (64, 64), "feature_hw": [8, 8], "proto_grid_size": 2, "val_wsize": 2, "num_workers": 0,
    "eval_fold": 2, "n_steps": 4, "lr_milestones": [2], "save_snapshot_every": 2, "print_interval": 2,
    "eval_batch_size": 4,
}



def _run(command: str, updates: dict, observed: bool = False):
    options = {} if observed else {"--unobserved": True}
    return ex.run(command, named_configs=["demo"], config_updates=updates, options=options)


def test_train_then_validate_twice_in_one_process(tiny_phantom: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "sacred"
    for attempt in (1, 2):
        run_dir = tmp_path / f"run{attempt}"
        common = {**TINY, "data_dir": str(tiny_phantom), "run_dir": str(run_dir), "path": {"log_dir": str(log_dir)}}
        train_run = _run("train", common, observed=True)
        assert len(ex.observers) == 1  # replaced, not appended (docs/method.md#q11-duplicate-observers)
        assert train_run.result["steps"] == 4
        snaps = sorted(p.name for p in (run_dir / "snapshots").glob("*.pth"))
        assert snaps == ["2.pth", "4.pth"]
        ckpt = load_checkpoint(run_dir / "snapshots" / "4.pth")
        assert {"model", "optimizer", "scheduler", "step", "config", "rng", "normalizer", "fold"} <= set(ckpt)
        assert ckpt["step"] == 4 and ckpt["config"]["modelname"] == "lite_gn"
        assert ckpt["fold"]["queries"] == [2, 3] and ckpt["fold"]["support"] == [4]  # 6 scans: sep 0,1,2,4,5,6
        assert any(k.startswith("encoder.localconv") for k in ckpt["model"])
        log = json.loads((run_dir / "train_log.json").read_text())
        assert len(log["loss"]) == 4 and all(np.isfinite(log["loss"]))

        val_run = _run("validate", {**common, "reload_model_path": str(run_dir / "snapshots" / "4.pth"),
                                    "baseline": True}, observed=True)
        assert len(ex.observers) == 1
        res = json.loads((run_dir / "results.json").read_text())
        for key in ("dataset", "fold", "setting", "label_set", "classes", "class_dice", "class_precision",
                    "class_recall", "mean_dice", "per_scan", "checkpoint", "elapsed_s", "baseline"):
            assert key in res, key
        assert res["dataset"] == "PHANTOM" and res["classes"] == [1, 2, 3, 4]
        assert res["query_scans"] == [2, 3] and res["support_scans"] == [4]
        assert 0.0 <= res["mean_dice"] <= 1.0 and val_run.result["mean_dice"] == res["mean_dice"]
        per_scan = [res["per_scan"][s][c]["dice"] for s in ("2", "3") for c in ("1", "2", "3", "4")]
        # meanDice = mean over scans of each scan's class mean (docs/method.md#metrics)
        assert res["mean_dice"] == pytest.approx(np.mean(per_scan))
        pred, geom = niftiio.read_volume(run_dir / "interm_preds" / "scan_3_label_4.nii.gz")
        img, img_geom = niftiio.read_volume(niftiio.image_path(tiny_phantom, 3))
        assert pred.shape == img.shape and img_geom.mismatch(geom) is None
        assert set(np.unique(pred)) <= {0, 4}
    # two observed runs of each command, in their own numbered folders
    exp_dirs = list(log_dir.iterdir())
    assert len(exp_dirs) == 1 and sorted(p.name for p in exp_dirs[0].iterdir() if p.name.isdigit()) == \
        ["1", "2", "3", "4"]
    # same seed, same data: identical losses in both runs (CPU)
    logs = [json.loads((tmp_path / f"run{a}" / "train_log.json").read_text()) for a in (1, 2)]
    assert logs[0]["loss"] == logs[1]["loss"]


def test_misspelt_key_and_unknown_dataset_fail_at_config_time(tiny_phantom: Path) -> None:
    with pytest.raises(ConfigAddedError):
        _run("train", {**TINY, "data_dir": str(tiny_phantom), "n_step": 3})
    with pytest.raises(DatasetDescriptionError, match="unknown dataset 'CHAOS'"):
        ex.run("train", config_updates={"dataset": "CHAOS"}, options={"--unobserved": True})


def test_validation_refuses_other_architecture(tiny_phantom: Path, tmp_path: Path) -> None:
    from util.errors import ConfigError

    run_dir = tmp_path / "run"
    common = {**TINY, "data_dir": str(tiny_phantom), "run_dir": str(run_dir), "n_steps": 2}
    _run("train", common)
    with pytest.raises(ConfigError, match="trained with modelname='lite_gn'"):
        _run("validate", {**common, "modelname": "dlfcn_res50",
                          "reload_model_path": str(run_dir / "snapshots" / "2.pth")})
    assert torch.get_num_threads() >= 1
