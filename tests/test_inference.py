"""Tests of evaluation.predictors: the fast predictor gives the naive (original) path's logits and Dice, with fewer
encodes.

Logits are compared with ``atol = rtol = 1e-5``: the paths encode different batches (support + one query vs many
queries), so float32 convolutions round differently; on logits of magnitude ~20 (20 x cosine) the observed gap is
about 1.5e-5 absolute, i.e. < 1e-6 relative. Predictions (argmax of the logits) are compared exactly except at
near-ties, pixels whose two logits are within that rounding of each other (:func:`_assert_same_masks`), and Dice
exactly when no such pixel differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.ep1_alp import evaluate_fold
from evaluation.predictors import FastPredictor, NaivePredictor
from models.grid_proto_fewshot import FewShotSeg

SIZE, N_SLICES = 64, 10
DEVICE = torch.device("cpu")
# |S_fg - S_bg| at or below this is a near-tie: 2 x the logit tolerance (1e-5 + 1e-5 x |logit| ~ 20). Which way such
# a pixel goes depends on the CPU's SIMD kernels: on an AVX-512 host one pixel of the fold below is an exact tie in
# the naive logits that the fast path's rounding breaks the other way (on AVX2 it does not).
NEAR_TIE = 2 * (1e-5 + 1e-5 * 20)


def make_model() -> FewShotSeg:
    """Tiny lite_gn ALPNet (64x64 input -> 8x8 features) in eval mode, random but non-identity residual blocks."""
    torch.manual_seed(0)
    model = FewShotSeg(backbone="lite_gn", init="none", proto_grid_size=2, feature_hw=(8, 8), val_wsize=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):  # break the identity init of the residual blocks
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def make_scan(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(Z, 64, 64) float32 image and int32 labels: a bright disc (class 1) and a dark square (class 2)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    image = rng.normal(0.0, 0.3, (N_SLICES, SIZE, SIZE)).astype(np.float32)
    label = np.zeros((N_SLICES, SIZE, SIZE), np.int32)
    cy, cx = rng.integers(22, 42, size=2)
    for z in range(1, 8):
        radius = 10 + 2 * min(z, 8 - z)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        label[z][disc] = 1
    for z in range(3, 9):
        label[z, 4:20, 40:60] = 2
    image += np.where(label == 1, 2.0, 0.0) + np.where(label == 2, -1.5, 0.0)
    return image.astype(np.float32), label


@pytest.fixture(scope="module")
def volumes() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    rng = np.random.default_rng(11)
    scans = {sid: make_scan(rng) for sid in (0, 1, 2)}
    return {s: v[0] for s, v in scans.items()}, {s: v[1] for s, v in scans.items()}


def _assert_same_masks(pred: np.ndarray, naive_logits: torch.Tensor) -> int:
    """``pred`` is the naive logits' argmax mask except at near-ties (:data:`NEAR_TIE`); returns how many differ."""
    want = (naive_logits.argmax(1) == 1).numpy()
    margin = (naive_logits[:, 1] - naive_logits[:, 0]).abs().numpy()
    differ = pred != want
    assert np.all(margin[differ] <= NEAR_TIE), f"{differ.sum()} pixels differ, margins up to {margin[differ].max()}"
    assert differ.sum() <= 1e-3 * differ.size  # a few ties, not a systematic difference
    return int(differ.sum())


def test_logits_match_naive_within_1e5(volumes) -> None:
    images, labels = volumes
    model = make_model()
    support = images[0][[2, 5]]
    masks = labels[0][[2, 5]] == 1
    queries = images[1][1:8]
    naive = NaivePredictor(model, DEVICE).logits(support[:1], masks[:1], queries)
    fast = FastPredictor(model, DEVICE, batch_size=3)  # 7 slices: batches of 3, 3, 1
    first = fast.logits(support[:1], masks[:1], queries)
    assert first.shape == naive.shape == (7, 2, SIZE, SIZE)
    torch.testing.assert_close(first, naive, rtol=1e-5, atol=1e-5)
    assert fast.stats["encoded"] == 1 + 7
    # a second call with a query slice repeated hits the caches and still agrees
    again = fast.logits(support[:1], masks[:1], queries[[0, 0, 3]])
    torch.testing.assert_close(again, naive[[0, 0, 3]], rtol=1e-5, atol=1e-5)
    assert fast.stats["encoded"] == 8 and fast.stats["prototype_hits"] == 1
    # two shots, and a cache too small for one slice (every entry evicted at once)
    naive2 = NaivePredictor(model, DEVICE).logits(support, masks, queries)
    tiny_cache = FastPredictor(model, DEVICE, batch_size=4, cache_mb=1e-6)
    torch.testing.assert_close(tiny_cache.logits(support, masks, queries), naive2, rtol=1e-5, atol=1e-5)
    assert len(tiny_cache._feats) == 0
    # the masks of __call__ are the argmax of the same logits (up to near-ties), and not trivial
    pred = fast(support[:1], masks[:1], queries)
    _assert_same_masks(pred, naive)
    assert 0.02 < pred.mean() < 0.98


def test_channels_last_model_gives_the_same_logits(volumes) -> None:
    images, labels = volumes
    model = make_model()
    support, masks, queries = images[0][4:5], labels[0][4:5] == 1, images[2][2:6]
    plain = FastPredictor(model, DEVICE).logits(support, masks, queries)
    model_cl = make_model().to(memory_format=torch.channels_last)
    assert model_cl.encoder_channels_last() and not model.encoder_channels_last()
    torch.testing.assert_close(FastPredictor(model_cl, DEVICE).logits(support, masks, queries), plain,
                               rtol=1e-5, atol=1e-5)


def test_same_fold_result_as_naive_with_fewer_encodes(volumes) -> None:
    images, labels = volumes
    model = make_model()
    fast = FastPredictor(model, DEVICE, batch_size=4)
    naive = NaivePredictor(model, DEVICE)
    encodes = {"naive": 0}
    original_encode = model.encode

    def counting_encode(imgs: torch.Tensor) -> torch.Tensor:
        encodes["naive"] += imgs.shape[0]
        return original_encode(imgs)

    fast_masks, naive_logits = [], []  # per predict call, to tell near-ties from real differences
    naive_logits_fn = naive.logits

    def fast_predict(*args: np.ndarray) -> np.ndarray:
        fast_masks.append(fast(*args))
        return fast_masks[-1]

    def recording_logits(*args: np.ndarray) -> torch.Tensor:  # NaivePredictor.__call__ takes the argmax of these
        naive_logits.append(naive_logits_fn(*args))
        return naive_logits[-1]

    naive.logits = recording_logits
    res_fast = evaluate_fold(fast_predict, images, labels, support_ids=[0], query_ids=[1, 2], classes=[1, 2])
    model.encode = counting_encode  # the naive path encodes through forward -> encode
    res_naive = evaluate_fold(naive, images, labels, support_ids=[0], query_ids=[1, 2], classes=[1, 2])
    ties = sum(_assert_same_masks(m, lg) for m, lg in zip(fast_masks, naive_logits, strict=True))
    assert sum(int((res_fast.predictions[k] != res_naive.predictions[k]).sum()) for k in res_naive.predictions) <= ties
    tol = 1e-3 if ties else 0.0  # a tie moves one pixel between TP, FP and FN: Dice by ~1e-4 here; else exact
    for scan, per_class in res_naive.per_scan.items():
        for c, want in per_class.items():
            got = res_fast.per_scan[scan][c]
            assert got.keys() == want.keys() == {"tp", "fp", "fn", "dice", "precision", "recall", "dice_per_slice"}
            assert sum(abs(got[k] - want[k]) for k in ("tp", "fp", "fn")) <= ties, (scan, c)
            for k in ("dice", "precision", "recall"):
                assert got[k] == pytest.approx(want[k], abs=tol), (scan, c, k)
    assert res_fast.metrics["mean_dice"] == pytest.approx(res_naive.metrics["mean_dice"], abs=tol)
    dice = [d["dice"] for scan in res_fast.per_scan.values() for d in scan.values()]
    assert len(dice) == 4 and any(d > 0 for d in dice)
    # naive: (support + query) per scored slice; fast: each distinct slice once (query slices shared by classes)
    scored = sum(hi - lo + 1 for lo, hi in res_naive.scored.values())
    assert encodes["naive"] == 2 * scored
    distinct_queries = sum(len({z for (s, _), (lo, hi) in res_fast.scored.items() if s == q
                                for z in range(lo, hi + 1)}) for q in (1, 2))
    distinct_supports = len({z for d in res_fast.support_slices.values() for zs in d.values() for z in zs})
    assert fast.stats["encoded"] == distinct_queries + distinct_supports
    assert fast.stats["encoded"] < encodes["naive"] / 2


def test_bad_arguments() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="batch size"):
        FastPredictor(model, DEVICE, batch_size=0)
    with pytest.raises(ValueError, match="cache_mb"):
        FastPredictor(model, DEVICE, cache_mb=-1)
