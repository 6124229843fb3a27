"""Evaluation on the image's own grid: slices whose size is not ``input_size`` are resized for the encoder only
(evaluation/predictors.py), and every metric and written prediction is on the grid of ``image_<id>.nii.gz``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataloaders import niftiio
from evaluation.predictors import FastPredictor
from models.grid_proto_fewshot import FewShotSeg
from tests.reliability_fixtures import TINY32, cli

SHORT32 = [*TINY32, "n_steps=2", "lr_milestones=[1]", "save_snapshot_every=2"]  # 64x64 slices, input_size 32


def test_validation_scores_and_writes_on_the_image_grid(tiny_phantom: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("training.py", [f"data_dir={tiny_phantom}", f"run_dir={run}", *SHORT32]) == 0
    out = tmp_path / "eval"
    assert cli("validation.py", [*SHORT32, f"data_dir={tiny_phantom}", f"run_dir={out}",
                                 f"reload_model_path={run / 'snapshots' / '2.pth'}"]) == 0
    res = json.loads((out / "results.json").read_text())
    checked = 0
    for sid in res["query_ids"]:
        image = niftiio.read_sitk(niftiio.image_path(tiny_phantom, sid))
        label, _ = niftiio.read_label_volume(niftiio.label_path(tiny_phantom, sid))
        for c in res["classes"]:
            pred_img = niftiio.read_sitk(out / "interm_preds" / f"scan_{sid}_label_{c}.nii.gz")
            # the prediction overlays the image: same size, spacing, origin and direction
            assert pred_img.GetSize() == image.GetSize() == (64, 64, 12)
            assert pred_img.GetSpacing() == image.GetSpacing() and pred_img.GetOrigin() == image.GetOrigin()
            assert pred_img.GetDirection() == image.GetDirection()
            pred = niftiio.read_label_volume(out / "interm_preds" / f"scan_{sid}_label_{c}.nii.gz")[0] == c
            gt = label == c
            tp, fp, fn = int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum())
            # results.json's Dice is the Dice of the written prediction against the label file
            assert res["per_scan"][str(sid)][str(c)]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-9)
            checked += 1
    assert checked == len(res["query_ids"]) * len(res["classes"]) == 8


def test_fast_predictor_resizes_for_the_encoder_only() -> None:
    torch.manual_seed(0)
    model = FewShotSeg(backbone="lite_gn", init="none", proto_grid_size=2, feature_hw=(4, 4), val_wsize=2).eval()
    rng = np.random.default_rng(0)
    sup = rng.normal(size=(1, 48, 48)).astype(np.float32)
    mask = np.zeros((1, 48, 48), bool)
    mask[0, 10:30, 12:36] = True
    qry = rng.normal(size=(3, 48, 48)).astype(np.float32)
    pred = FastPredictor(model, torch.device("cpu"), window=2, input_size=32)
    logits = pred.logits(sup, mask, qry)
    assert logits.shape == (3, 2, 48, 48)  # on the slices' own grid
    with torch.inference_mode():  # by hand: bilinear resize to 32, encode, prototypes from the 48x48 mask
        def enc(x: np.ndarray) -> torch.Tensor:
            t = F.interpolate(torch.from_numpy(x)[:, None], size=(32, 32), mode="bilinear", align_corners=False)
            return model.encode(t.expand(-1, 3, -1, -1).contiguous())
        fg = torch.from_numpy(mask).float()
        protos = model.prototypes_from_support(enc(sup), fg, 1.0 - fg, window=2)
        want = model.segment_with_prototypes(enc(qry), protos, (48, 48))
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(pred(sup, mask, qry), (want[:, 1] > want[:, 0]).numpy())
    # slices already at input_size are encoded as they are
    same = FastPredictor(model, torch.device("cpu"), window=2, input_size=48).logits(sup, mask, qry)
    plain = FastPredictor(model, torch.device("cpu"), window=2).logits(sup, mask, qry)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
