"""Tests for the checkpoint part of models/weights.py: original SSL-ALPNet state dicts (663 keys) load strictly into
FewShotSeg, exports carry the original's names, and wrong-architecture files fail with the offending keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet101
from torchvision.models.segmentation.deeplabv3 import ASPP

from models.grid_proto_fewshot import FewShotSeg
from models.weights import StateDictMismatchError, export_original_state_dict, load_original_checkpoint


@pytest.fixture(scope="module")
def original_state() -> dict[str, torch.Tensor]:
    """A state dict with the original's names and shapes, built from torchvision modules (not from models/)."""
    torch.manual_seed(11)
    trunk = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=None).backbone
    state = {f"encoder.backbone.{k}": v for k, v in trunk.state_dict().items()}
    state["encoder.localconv.weight"] = torch.randn(256, 2048, 1, 1)
    state.update({f"encoder.aspp_out.0.{k}": v for k, v in ASPP(2048, [12, 24, 36]).state_dict().items()})
    state["encoder.aspp_out.1.weight"] = nn.Conv2d(256, 256, 3, padding=1, bias=False).weight.detach()
    state["encoder.asppconv.weight"] = nn.Conv2d(256, 256, 1, bias=False).weight.detach()
    for value in state.values():  # distinguishable from any fresh init (BN running stats, counters included)
        if value.is_floating_point():
            value.add_(0.5)
        else:
            value.fill_(25000)
    return state


@pytest.fixture(scope="module")
def res101() -> FewShotSeg:
    return FewShotSeg("dlfcn_res101", init="none")


def test_original_checkpoint_loads_strictly(original_state, res101, tmp_path):
    assert len(original_state) == 663
    path = tmp_path / "original_100000.pth"
    torch.save(original_state, path)
    report = load_original_checkpoint(res101, path, strict=True)
    path.unlink()  # ~240 MB
    assert len(report.ignored_aspp) == 38 and all(k.startswith("encoder.aspp") for k in report.ignored_aspp)
    assert report.loaded == 625 and report.missing == [] and report.unexpected == []
    loaded = res101.state_dict()
    assert len(loaded) == 625
    for key, value in loaded.items():
        assert torch.equal(value, original_state[key]), key


def test_export_has_original_names_and_round_trips(original_state, res101):
    load_original_checkpoint(res101, original_state)
    plain = export_original_state_dict(res101)
    assert set(plain) == {k for k in original_state if not k.startswith("encoder.aspp")}
    full = export_original_state_dict(res101, add_unused_aspp=True)
    assert len(full) == 663
    assert {k: tuple(v.shape) for k, v in full.items()} == {k: tuple(v.shape) for k, v in original_state.items()}
    parity = FewShotSeg("dlfcn_res101", init="none", build_unused_aspp=True)
    report = load_original_checkpoint(parity, full, strict=True)  # the 663-key model takes the aspp keys too
    assert report.ignored_aspp == [] and report.loaded == 663
    for key, value in parity.state_dict().items():
        assert torch.equal(value, full[key]), key


def test_wrong_architecture_lists_keys(res101):
    res50 = FewShotSeg("dlfcn_res50", init="none").state_dict()
    with pytest.raises(StateDictMismatchError) as info:
        load_original_checkpoint(res101, res50)
    message = str(info.value)
    assert "missing keys" in message and "encoder.backbone.layer3.6.conv1.weight" in message
    lite = FewShotSeg("lite_gn", init="none").state_dict()
    with pytest.raises(StateDictMismatchError) as info:
        load_original_checkpoint(res101, lite)
    message = str(info.value)
    assert "unexpected keys" in message and "encoder.backbone.stem.0.0.weight" in message
    assert "encoder.localconv.weight: file (256, 128, 1, 1) vs model (256, 2048, 1, 1)" in message
    with pytest.raises(StateDictMismatchError, match="shape mismatch"):
        load_original_checkpoint(res101, {"encoder.localconv.weight": torch.zeros(256, 128, 1, 1)}, strict=False)


def test_training_checkpoint_wrapper_and_non_strict(tmp_path: Path):
    torch.manual_seed(3)
    src = FewShotSeg("lite_gn", init="none")
    path = tmp_path / "snapshot.pth"
    torch.save({"model": src.state_dict(), "step": 100, "config": {"modelname": "lite_gn"}}, path)
    torch.manual_seed(4)
    dst = FewShotSeg("lite_gn", init="none")
    load_original_checkpoint(dst, path)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())
    partial = {k: v for k, v in src.state_dict().items() if k != "encoder.localconv.weight"}
    partial["encoder.extra.weight"] = torch.zeros(1)
    report = load_original_checkpoint(dst, partial, strict=False)
    assert report.missing == ["encoder.localconv.weight"] and report.unexpected == ["encoder.extra.weight"]
    with pytest.raises(ValueError, match="2048-channel"):
        export_original_state_dict(dst, add_unused_aspp=True)
