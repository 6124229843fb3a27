"""Tests for models/backbone.py (and the encoder-init part of models/weights.py): shapes, parameter counts,
offline behaviour of the pretrained-weights lookup, and local weights files in every supported layout."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.hub
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50

from models.backbone import Encoder, LiteGNBackbone
from models.weights import (
    PretrainedWeightsUnavailable,
    StateDictMismatchError,
    expected_cache_path,
    fetch_pretrained,
    find_cached_weights,
    load_encoder_weights,
)

COCO101 = "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth"


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Empty TORCH_HOME and a download function that fails like a machine without network; records its calls."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    calls: list = []

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append((url, dst))
        raise URLError("[Errno -3] Temporary failure in name resolution")

    def no_hub_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.hub.load_state_dict_from_url must not be called")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_hub_load)
    return {"calls": calls}


# ----------------------------------------------------------------------------------------------- lite_gn


def test_lite_gn_architecture_and_shapes():
    torch.manual_seed(0)
    enc = Encoder("lite_gn", init="none")
    assert isinstance(enc.backbone, LiteGNBackbone)
    assert _n_params(enc.backbone) == 998_336 and _n_params(enc.localconv) == 128 * 256
    assert enc.localconv.bias is None and enc.localconv.kernel_size == (1, 1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    x = torch.randn(2, 3, 64, 64)
    out = enc(x)
    assert out.shape == (2, 256, 8, 8)
    assert enc(torch.randn(1, 3, 65, 66)).shape == (1, 256, 9, 9)  # ceil(H / 8)
    torch.testing.assert_close(enc(x[1:]), out[1:], rtol=1e-4, atol=1e-5)  # GroupNorm: batch-independent
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        enc(torch.randn(1, 1, 64, 64))


def test_lite_gn_s_is_lite_gn_narrower() -> None:
    """The demo's backbone: widths (24, 32, 96), same layers, dilations and output stride; parameters by hand."""
    enc = Encoder("lite_gn_s", init="none")
    assert isinstance(enc.backbone, LiteGNBackbone) and enc.backbone.out_channels == 96
    big = Encoder("lite_gn", init="none")
    assert [type(m) for m in enc.backbone.modules()] == [type(m) for m in big.backbone.modules()]
    assert [m.conv1.dilation for m in enc.backbone.body] == [(1, 1), (2, 2), (4, 4)]
    # 3x3 convs: 3*24 + 24*32 + 2*32*32 + 32*96 + 6*96*96 weights (x9); GroupNorms: 2 per channel
    convs = 9 * (3 * 24 + 24 * 32 + 2 * 32 * 32 + 32 * 96 + 6 * 96 * 96)
    norms = 2 * (24 + 32 + 2 * 32 + 96 + 6 * 96)
    assert _n_params(enc.backbone) == convs + norms == 552_888
    assert _n_params(enc.localconv) == 96 * 256
    assert enc(torch.randn(2, 3, 64, 64)).shape == (2, 256, 8, 8)
    with pytest.raises(ValueError, match="'lite_gn_s' has no pretrained weights"):
        Encoder("lite_gn_s", init="coco")


def test_lite_gn_rejects_pretrained_init_and_aspp():
    for init in ("coco", "imagenet"):
        with pytest.raises(ValueError, match="no pretrained weights"):
            Encoder("lite_gn", init=init)
    with pytest.raises(ValueError, match="ResNet"):
        Encoder("lite_gn", init="none", build_unused_aspp=True)
    with pytest.raises(ValueError, match="unknown backbone"):
        Encoder("resnet18", init="none")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- ResNet trunks


def test_res50_shapes_params_and_gradients(offline):
    enc = Encoder("dlfcn_res50", init="none")
    assert _n_params(enc) == 23_508_032 + 524_288
    out = enc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 256, 8, 8)  # output stride 8
    out.square().mean().backward()
    assert enc.backbone.conv1.weight.grad.abs().sum() > 0
    assert enc.localconv.weight.grad.abs().sum() > 0
    assert offline["calls"] == []


def test_res101_with_unused_aspp_parity(offline):
    enc = Encoder("dlfcn_res101", init="none", build_unused_aspp=True)
    keys = list(enc.state_dict())
    assert len(keys) == 663
    assert sum(k.startswith("backbone.") for k in keys) == 624 and "localconv.weight" in keys
    assert sum(k.startswith("aspp_out.0.") for k in keys) == 36
    assert {"aspp_out.1.weight", "asppconv.weight"} <= set(keys)
    used = _n_params(enc.backbone) + _n_params(enc.localconv)
    assert (_n_params(enc.backbone), _n_params(enc.localconv)) == (42_500_160, 524_288)  # 42.50 M + 0.52 M
    assert used == 43_024_448 and _n_params(enc) == 59_214_912  # 43.02 M used, 59.21 M in all (docs/method.md#network)
    assert enc.backbone.layer4[0].conv2.dilation == (2, 2) and enc.backbone.layer4[1].conv2.dilation == (4, 4)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 256, 4, 4)
    out.mean().backward()
    assert enc.backbone.layer1[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in enc.aspp_out.parameters()) and enc.asppconv.weight.grad is None
    assert offline["calls"] == []


# ----------------------------------------------------------------------------------------------- pretrained lookup


def test_init_none_never_downloads(offline, tmp_path):
    enc = Encoder("dlfcn_res50", init="none")
    assert enc.init_source == "random"
    assert offline["calls"] == []
    assert not (tmp_path / "torch_home").exists()


@pytest.mark.parametrize(
    ("name", "init", "filename"),
    [
        ("dlfcn_res101", "coco", "deeplabv3_resnet101_coco-586e9e4e.pth"),
        ("dlfcn_res50", "coco", "deeplabv3_resnet50_coco-cd0a2569.pth"),
        ("dlfcn_res101", "imagenet", "resnet101-63fe2227.pth"),
    ],
)
def test_unavailable_pretrained_weights_message(offline, tmp_path, name, init, filename):
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / filename
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        Encoder(name, init=init)
    message = str(info.value)
    assert str(expected) in message
    assert "backbone_weights=" in message and "use_coco_init=False" in message
    assert "Temporary failure in name resolution" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no urllib traceback attached
    assert offline["calls"] == [(f"https://download.pytorch.org/models/{filename}", str(expected))]


def test_cached_file_is_found_without_network(offline, tmp_path):
    current = expected_cache_path(COCO101)
    assert current == tmp_path / "torch_home" / "hub" / "checkpoints" / "deeplabv3_resnet101_coco-586e9e4e.pth"
    assert find_cached_weights(COCO101) is None
    legacy = tmp_path / "torch_home" / "checkpoints" / current.name  # torch <= 1.5 layout used by the original
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"x")
    assert fetch_pretrained(COCO101, "COCO", "") == legacy
    current.parent.mkdir(parents=True)
    current.write_bytes(b"y")
    assert fetch_pretrained(COCO101, "COCO", "") == current
    assert offline["calls"] == []


def test_coco_layout_loads_backbone_only(offline):
    coco_like = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).state_dict()
    assert any(k.startswith("aux_classifier.") for k in coco_like)  # COCO files carry the aux head
    enc = Encoder("dlfcn_res50", init="none")
    localconv_before = enc.localconv.weight.detach().clone()
    parts = load_encoder_weights(enc, coco_like)
    assert parts.layout == "deeplabv3" and parts.localconv is None
    for key, value in enc.backbone.state_dict().items():
        assert torch.equal(value, coco_like[f"backbone.{key}"]), key
    assert torch.equal(enc.localconv.weight, localconv_before)


# ----------------------------------------------------------------------------------------------- local files


def _lite_source() -> Encoder:
    torch.manual_seed(7)
    enc = Encoder("lite_gn", init="none")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.rand_like(p))  # make every tensor differ from a fresh init
    return enc


@pytest.mark.parametrize("layout", ["original", "deeplabv3", "backbone", "wrapped"])
def test_weights_path_layouts(tmp_path, layout):
    src = _lite_source()
    bb = src.backbone.state_dict()
    if layout == "original":
        state = {f"encoder.backbone.{k}": v for k, v in bb.items()} | {"encoder.localconv.weight": src.localconv.weight}
    elif layout == "deeplabv3":
        state = {f"backbone.{k}": v for k, v in bb.items()} | {"classifier.4.weight": torch.zeros(21, 256, 1, 1)}
    elif layout == "backbone":
        state = dict(bb) | {"fc.weight": torch.zeros(1000, 128)}
    else:  # a training checkpoint of this project
        sd = {f"encoder.backbone.{k}": v for k, v in bb.items()} | {"encoder.localconv.weight": src.localconv.weight}
        state = {"model": sd, "step": 25000}
    path = tmp_path / f"{layout}.pth"
    torch.save(state, path)
    torch.manual_seed(99)
    enc = Encoder("lite_gn", init="none", weights_path=path)
    for key, value in enc.backbone.state_dict().items():
        assert torch.equal(value, bb[key]), key
    same_localconv = torch.equal(enc.localconv.weight, src.localconv.weight)
    assert same_localconv == (layout in ("original", "wrapped"))
    assert str(path) in enc.init_source


def test_weights_path_wrong_architecture_lists_keys(tmp_path):
    bb = _lite_source().backbone.state_dict()
    del bb["body.2.conv2.weight"]
    bb["extra.weight"] = torch.zeros(3)
    bb["down.0.weight"] = torch.zeros(64, 48, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(bb, path)
    with pytest.raises(StateDictMismatchError) as info:
        Encoder("lite_gn", init="none", weights_path=path)
    message = str(info.value)
    assert str(path) in message
    for fragment in ("1 missing", "body.2.conv2.weight", "1 unexpected", "extra.weight", "down.0.weight"):
        assert fragment in message
    with pytest.raises(FileNotFoundError, match="not found"):
        Encoder("lite_gn", init="none", weights_path=tmp_path / "absent.pth")
