"""engine/val_monitor.py and engine/tensorboard_log.py: val scans leave the training pool, snapshots are scored
with validation.py's protocol, the best snapshot is reported next to the final one, TensorBoard events read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import training  # noqa: F401  (registers the 'train' command)
import validation  # noqa: F401  (registers the 'validate' command)
from config_ssl_upload import ex
from dataloaders.dataset_info import Fold
from dataloaders.normalization import Normalizer
from engine.builders import build_model
from engine.val_monitor import ValMonitor, split_off_val_scans
from models.weights import load_original_checkpoint
from util.checkpoint import load_checkpoint
from util.errors import ConfigError

TINY = {
    "modelname": "lite_gn", "lr_schedule": "step", "lr_step_gamma": 0.1,
    "input_size": (64, 64), "feature_hw": [8, 8], "proto_grid_size": 2, "val_wsize": 2, "num_workers": 0,
    "eval_fold": 2, "n_steps": 4, "lr_milestones": [2], "save_snapshot_every": 2, "print_interval": 2,
    "eval_batch_size": 4, "save_predictions": False,
}


def test_split_off_val_scans_and_its_errors():
    fold = Fold(2, (2, 3), (4,), (0, 1, 5))
    assert split_off_val_scans(fold, []) == fold
    assert split_off_val_scans(fold, [5]) == Fold(2, (2, 3), (4,), (0, 1))
    for bad, msg in (([2], "is a query scan of fold 2"), ([4], "is the support scan"), ([9], "not a scan"),
                     ([0, 1, 5], "none is left"), ([5, 5], "distinct"), (["5"], "integer")):
        with pytest.raises(ConfigError, match=msg):
            split_off_val_scans(fold, bad)


def test_training_with_val_scans_and_tensorboard(tiny_phantom: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    common = {**TINY, "data_dir": str(tiny_phantom), "run_dir": str(run_dir), "eval_classes": [4]}  # one class: fast
    result = ex.run("train", named_configs=["demo"], config_updates={**common, "val_scans": [5], "tensorboard": True},
                    options={"--unobserved": True}).result
    ckpt = load_checkpoint(run_dir / "snapshots" / "4.pth")
    assert ckpt["fold"]["train"] == [0, 1]  # scan 5 held out of training
    hist = json.loads((run_dir / "val_history.json").read_text())
    assert hist["val_scans"] == [5] and hist["support_scans"] == [4] and hist["protocol"] == "ep1_alp"
    entries = hist["history"]
    assert [e["step"] for e in entries] == [2, 4]
    assert set(entries[0]["class_dice"]) == {"SPLEEN"} and hist["classes"] == {"4": "SPLEEN"}
    best = max(entries, key=lambda e: (e["mean_dice"], -e["step"]))
    assert result["best_snapshot"] == best == hist["best_snapshot"]
    assert result["final_checkpoint"].endswith("4.pth")  # the fixed final step is still the result

    # the score of the final snapshot is what validation.py's protocol gives on scan 5 (same functions)
    cfg = ckpt["config"]  # the run's resolved config
    model = build_model(cfg, torch.device("cpu"), for_training=False)
    load_original_checkpoint(model, ckpt["model"])
    model.train()
    fold = Fold(2, (2, 3), (4,), (0, 1))
    monitor = ValMonitor({**cfg, "val_scans": [5]}, _info(), fold, Normalizer.from_dict(ckpt["normalizer"]),
                         torch.device("cpu"), tmp_path / "again")
    (tmp_path / "again").mkdir()
    again = monitor.score(model, 4, "x.pth")
    assert model.training  # the monitor puts the model back into training mode
    assert again["mean_dice"] == pytest.approx(entries[1]["mean_dice"], abs=1e-6)

    # validation.py accepts the checkpoint: its training scans are the fold's without the val scans
    final = str(run_dir / "snapshots" / "4.pth")
    ex.run("validate", named_configs=["demo"], config_updates={**common, "reload_model_path": final},
           options={"--unobserved": True})
    res = json.loads((run_dir / "results.json").read_text())
    assert res["query_scans"] == [2, 3] and res["multishot_proto"] == "per_shot"

    # TensorBoard: loss terms and lr per step, val Dice per snapshot
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/query_loss", "train/align_loss", "train/lr", "val/dice/mean",
            "val/dice/SPLEEN"} <= tags
    log = json.loads((run_dir / "train_log.json").read_text())
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(log["loss"], rel=1e-6)
    lr = cfg["optim"]["lr"]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([lr, lr, lr * 0.1, lr * 0.1], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("val/dice/mean")] == \
        [(e["step"], pytest.approx(e["mean_dice"], rel=1e-6)) for e in entries]


def _info():
    from dataloaders.dataset_info import get_dataset_info

    return get_dataset_info("PHANTOM")


def test_val_scan_in_test_set_is_refused(tiny_phantom: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="query scan of fold 2"):
        ex.run("train", named_configs=["demo"], config_updates={**TINY, "data_dir": str(tiny_phantom),
                                                                 "run_dir": str(tmp_path / "r"), "val_scans": [3]},
               options={"--unobserved": True})
