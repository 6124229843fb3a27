"""Tests for models/grid_proto_fewshot.py: FewShotSeg forward/backward, batching, the fast evaluation path and the
alignment loss, including its empty-prediction cases, with a hand-built feature encoder where values are exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.alpmodule import EmptyMaskError
from models.grid_proto_fewshot import FewShotSeg
from models.losses import query_loss

H = W = 64  # -> 8x8 features


class PoolEncoder(nn.Module):
    """Features = 8x8 average pooling of the image (3 channels), so prototypes and scores are known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.detach().clone())
        return F.avg_pool2d(x, 8)


def _image(top: tuple[float, float, float], bottom: tuple[float, float, float], split: str = "cols") -> torch.Tensor:
    """(3, H, W) image whose first half (left or top) has colour ``top`` and second half colour ``bottom``."""
    img = torch.empty(3, H, W)
    first = (slice(None), slice(None), slice(0, W // 2)) if split == "cols" else (slice(None), slice(0, H // 2))
    second = (slice(None), slice(None), slice(W // 2, W)) if split == "cols" else (slice(None), slice(H // 2, H))
    img[first] = torch.tensor(top)[:, None, None]
    img[second] = torch.tensor(bottom)[:, None, None]
    return img


RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def _support() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-shot support (1, 1, ...): left half FG (red), right half BG (green)."""
    fg = torch.zeros(1, 1, H, W)
    fg[..., : W // 2] = 1
    return _image(RED, GREEN)[None, None], fg, 1 - fg


def _pool_model(**kwargs: object) -> FewShotSeg:
    torch.manual_seed(0)
    model = FewShotSeg("lite_gn", init="none", **kwargs)
    model.encoder = PoolEncoder()
    return model


def _up(small: torch.Tensor) -> torch.Tensor:
    return F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------- exact values


def test_logits_are_bg_fg_scores_upsampled():
    model = _pool_model().eval()
    supp, fg, bg = _support()
    qry = _image(RED, GREEN, split="rows")[None, None]  # top half looks like FG, bottom like BG
    out = model(supp, fg, bg, qry)
    # every FG prototype is (1,0,0) and every BG prototype (0,1,0): S = 20 cos = 20 or 0
    small = torch.zeros(1, 2, 8, 8)
    small[0, 1, :4] = 20  # S_fg on the top half
    small[0, 0, 4:] = 20  # S_bg on the bottom half
    assert out.logits.shape == (1, 2, H, W)
    torch.testing.assert_close(out.logits, _up(small))
    assert out.fg_modes == ["gridconv+"] and out.bg_fallback == [False]
    assert float(out.align_loss) == 0.0 and not out.align_loss.requires_grad  # eval: no alignment loss


def test_support_and_query_encoded_in_one_batch():
    model = _pool_model().train()
    g = torch.Generator().manual_seed(3)
    supp = torch.rand(2, 2, 3, H, W, generator=g)
    qry = torch.rand(2, 1, 3, H, W, generator=g)
    fg = torch.zeros(2, 2, H, W)
    fg[..., :32, :32] = 1
    model(supp, fg, 1 - fg, qry)
    # one encoder call: BatchNorm sees support and query together (docs/method.md#q25-joint-batchnorm)
    (batch,) = model.encoder.calls
    torch.testing.assert_close(batch, torch.cat([supp.flatten(0, 1), qry.flatten(0, 1)]))


def test_windows_train_eval_and_override():
    model = _pool_model()
    assert (model.train_window, model.val_wsize) == (4, 2)
    feats = torch.rand(1, 3, 8, 8)
    fg = torch.zeros(1, H, W)
    fg[:, :32, :32] = 1
    assert model.train().prototypes_from_support(feats, fg, 1 - fg).window == 4
    assert model.eval().prototypes_from_support(feats, fg, 1 - fg).window == 2
    assert model.prototypes_from_support(feats, fg, 1 - fg, window=1).fg.n_local == 16
    with pytest.raises(ValueError, match="one window"):
        FewShotSeg("lite_gn", init="none", feature_hw=(32, 16))
    with pytest.raises(ValueError, match="align_empty_fg"):
        FewShotSeg("lite_gn", init="none", align_empty_fg="drop")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- alignment loss


def test_alignment_loss_when_query_matches_support():
    model = _pool_model().train()
    supp, fg, bg = _support()
    out = model(supp, fg, bg, supp.clone())
    assert (out.align_empty_fg, out.align_skipped, out.align_bg_fallback) == (0, 0, 0)
    # support re-segmented from query prototypes: S_fg = 20 on the left, S_bg = 20 on the right
    small = torch.zeros(1, 2, 8, 8)
    small[0, 1, :, :4] = 20
    small[0, 0, :, 4:] = 20
    expected = F.cross_entropy(_up(small), fg[0].long())
    torch.testing.assert_close(out.align_loss, expected)


def test_empty_predicted_fg_is_skipped_and_averaged_over_episodes():
    model = _pool_model().train()
    supp, fg, bg = _support()
    good = model(supp, fg, bg, supp.clone())
    all_bg = _image(GREEN, GREEN)[None, None]  # query predicted all BG -> no FG prototype for the alignment
    skipped = model(supp, fg, bg, all_bg)
    assert (skipped.align_empty_fg, skipped.align_skipped) == (1, 1) and float(skipped.align_loss) == 0.0
    both = model(supp.repeat(2, 1, 1, 1, 1), fg.repeat(2, 1, 1, 1), bg.repeat(2, 1, 1, 1), torch.cat([supp, all_bg]))
    assert (both.align_empty_fg, both.align_skipped) == (1, 1)
    torch.testing.assert_close(both.align_loss, good.align_loss / 2)  # sum over episodes / B; skipped adds 0


def test_empty_predicted_fg_zero_prototype_parity():
    model = _pool_model(align_empty_fg="zero_prototype").train()
    supp, fg, bg = _support()
    out = model(supp, fg, bg, _image(GREEN, GREEN)[None, None])
    assert (out.align_empty_fg, out.align_skipped) == (1, 0)
    small = torch.zeros(1, 2, 8, 8)  # S_fg = 0 everywhere (zero FG prototype); S_bg = 20 on the green half
    small[0, 0, :, 4:] = 20
    torch.testing.assert_close(out.align_loss, F.cross_entropy(_up(small), fg[0].long()))


def test_all_foreground_prediction_uses_global_bg_fallback():
    model = _pool_model().train()
    supp, fg, bg = _support()
    out = model(supp, fg, bg, _image(RED, RED)[None, None])
    assert (out.align_empty_fg, out.align_skipped, out.align_bg_fallback) == (0, 0, 1)
    small = torch.zeros(1, 2, 8, 8)  # S_bg = 0 (global BG prototype of an empty mask = 0); S_fg = 20 on red
    small[0, 1, :, :4] = 20
    torch.testing.assert_close(out.align_loss, F.cross_entropy(_up(small), fg[0].long()))
    assert torch.isfinite(out.align_loss)


def test_alignment_ignores_unlabelled_support_pixels():
    model = _pool_model().train()
    supp, fg, bg = _support()
    bg_partial = bg.clone()
    bg_partial[..., :, 48:] = 0  # right quarter neither FG nor BG -> label 255
    out = model(supp, fg, bg_partial, supp.clone())
    small = torch.zeros(1, 2, 8, 8)
    small[0, 1, :, :4] = 20
    small[0, 0, :, 4:] = 20
    labels = fg[0].long()
    labels[..., 48:] = 255
    torch.testing.assert_close(out.align_loss, F.cross_entropy(_up(small), labels, ignore_index=255))


# ----------------------------------------------------------------------------------------------- real encoders


def test_lite_forward_backward_and_fast_path():
    torch.manual_seed(0)
    model = FewShotSeg("lite_gn", init="none", align_empty_fg="zero_prototype").train()
    g = torch.Generator().manual_seed(5)
    supp = torch.rand(2, 2, 3, H, W, generator=g)
    qry = torch.rand(2, 1, 3, H, W, generator=g)
    fg = torch.zeros(2, 2, H, W)
    fg[..., :, :32] = 1
    out = model(supp, fg, 1 - fg, qry)
    assert out.logits.shape == (2, 2, H, W) and len(out.fg_modes) == 2
    assert out.align_skipped == 0 and torch.isfinite(out.align_loss) and out.align_loss.requires_grad
    loss = query_loss(out.logits, fg[:, 0].long()) + out.align_loss
    loss.backward()
    assert model.encoder.localconv.weight.grad.abs().sum() > 0
    assert model.encoder.backbone.stem[0][0].weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        batched = model(supp, fg, 1 - fg, qry).logits
        for b in range(2):  # each episode uses its own prototypes
            single = model(supp[b : b + 1], fg[b : b + 1], 1 - fg[b : b + 1], qry[b : b + 1]).logits
            torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-4, atol=1e-4)
            protos = model.prototypes_from_support(model.encode(supp[b]), fg[b], 1 - fg[b])
            fast = model.segment_with_prototypes(model.encode(qry[b]), protos, (H, W))
            torch.testing.assert_close(fast, single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", ["dlfcn_res50", "dlfcn_res101"])
def test_resnet_forward_backward(backbone):
    torch.manual_seed(0)
    model = FewShotSeg(backbone, init="none").train()
    g = torch.Generator().manual_seed(1)
    supp = torch.rand(1, 1, 3, H, W, generator=g)
    fg = torch.zeros(1, 1, H, W)
    fg[..., :, :32] = 1
    out = model(supp, fg, 1 - fg, supp + 0.05 * torch.rand(1, 1, 3, H, W, generator=g))
    assert out.logits.shape == (1, 2, H, W) and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.align_loss)
    (query_loss(out.logits, fg[:, 0].long()) + out.align_loss).backward()
    assert model.encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.encoder.localconv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise():
    model = _pool_model().eval()
    supp, fg, bg = _support()
    with pytest.raises(ValueError, match=r"\(B, S, 3, H, W\)"):
        model(supp[0], fg, bg, supp)
    with pytest.raises(ValueError, match="supp_fg"):
        model(supp, fg[0], bg, supp)
    two = supp.repeat(2, 1, 1, 1, 1)
    fg2 = fg.repeat(2, 1, 1, 1)
    fg2[1] = 0
    with pytest.raises(EmptyMaskError, match="episode 1 of 2"):
        model(two, fg2, 1 - fg2, two)
    tiny = torch.zeros(1, H, W)
    tiny[0, 0, 0] = 1  # one pixel: at 8x8 features the bilinear downsampling misses it entirely
    protos = model.prototypes_from_support(torch.rand(1, 3, 8, 8), tiny, 1 - tiny)
    assert protos.fg.mode == "mask" and torch.count_nonzero(protos.fg.vectors) == 0  # the original's zero prototype
    assert torch.count_nonzero(model.score_small(torch.rand(2, 3, 8, 8), protos)[:, 1]) == 0


def test_multishot_rule_reaches_the_prototypes():
    feats = torch.rand(2, 3, 8, 8)
    fg = torch.zeros(2, H, W)
    fg[:, :32, :32] = 1
    per_shot = _pool_model().eval().prototypes_from_support(feats, fg, 1 - fg)
    pooled = _pool_model(multishot_proto="pooled").eval().prototypes_from_support(feats, fg, 1 - fg)
    # eval window 2: 4 FG windows per shot (the 4x4 FG corner of the 8x8 map) x 2 shots, + 2 per-shot globals or 1
    assert (per_shot.fg.n_local, per_shot.fg.vectors.shape[0]) == (8, 10)
    assert (pooled.fg.n_local, pooled.fg.vectors.shape[0]) == (8, 9)
    torch.testing.assert_close(per_shot.fg.vectors[:8], pooled.fg.vectors[:8])
    with pytest.raises(ValueError, match="multishot_proto"):
        FewShotSeg("lite_gn", init="none", multishot_proto="mean")  # type: ignore[arg-type]
