"""``validation.py with protocol=ep2``: whole-volume scoring end to end on the tiny phantom, protocol recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import validation  # noqa: F401  (registers the 'validate' command)
from config_ssl_upload import ex
from dataloaders import niftiio
from models.grid_proto_fewshot import FewShotSeg
from util.errors import ConfigError

TINY = {
    "modelname": "lite_gn", "lr_schedule": "step",
    "input_size": (64, 64), "feature_hw": [8, 8], "proto_grid_size": 2, "val_wsize": 2, "num_workers": 0,
    "eval_fold": 2, "eval_batch_size": 4,
}


def test_validate_ep2_scores_whole_volumes(tiny_phantom: Path, tmp_path: Path) -> None:
    common = {**TINY, "data_dir": str(tiny_phantom), "run_dir": str(tmp_path / "run")}
    torch.manual_seed(0)  # an untrained lite_gn, saved as a plain state dict (as the original writes them)
    model = FewShotSeg(backbone="lite_gn", init="none", proto_grid_size=2, feature_hw=(8, 8), val_wsize=2)
    ckpt = str(tmp_path / "random.pth")
    torch.save(model.state_dict(), ckpt)
    ex.run("validate", named_configs=["demo"], config_updates={**common, "reload_model_path": ckpt,
                                                               "protocol": "ep2", "baseline": True},
           options={"--unobserved": True})
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["protocol"] == "ep2" and res["classes"] == [1, 2, 3, 4]
    assert set(res["estimated_ranges"]) == {f"{q},{c}" for q in (2, 3) for c in (1, 2, 3, 4)}
    for q in ("2", "3"):
        label, _ = niftiio.read_label_volume(niftiio.label_path(tiny_phantom, int(q)))
        for c in ("1", "2", "3", "4"):
            cell = res["per_scan"][q][c]
            pred, _ = niftiio.read_volume(tmp_path / "run" / "interm_preds" / f"scan_{q}_label_{c}.nii.gz")
            fg = pred > 0
            # counts over the WHOLE volume (EP2), recomputed from the written prediction
            assert cell["tp"] == int((fg & (label == int(c))).sum())
            assert cell["fp"] == int((fg & (label != int(c))).sum())
            assert cell["fn"] == int((~fg & (label == int(c))).sum())
    assert res["mean_dice"] == pytest.approx(np.mean([res["per_scan"][q][c]["dice"] for q in ("2", "3")
                                                      for c in ("1", "2", "3", "4")]))
    assert "baseline" in res and 0.0 <= res["baseline"]["mean_dice"] <= 1.0
    with pytest.raises(ConfigError, match="protocol='ep3'"):
        ex.run("validate", named_configs=["demo"], config_updates={**common, "reload_model_path": ckpt,
                                                                   "protocol": "ep3"},
               options={"--unobserved": True})
