"""Tests for models/alpmodule.py: ALP prototypes and scores checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.alpmodule import (
    SCALE,
    EmptyMaskError,
    Prototypes,
    compute_prototypes,
    fg_global_rule,
    global_prototype,
    local_prototypes,
    resize_mask,
    safe_normalize,
    score,
    score_classes,
    similarity,
)


def _t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


@pytest.fixture
def toy() -> tuple[torch.Tensor, torch.Tensor]:
    """C=2 features on a 4x4 map (one shot) and a FG mask; with window 2 the four windows are

    window  features (ch0 | ch1)         mean feature   FG mean   BG mean
    (0,0)   [1 1;1 1] | [0 0;0 0]        (1, 0)         1         0
    (0,1)   [0 0;0 0] | [2 2;2 2]        (0, 2)         0.75      0.25
    (1,0)   [3 3;3 5] | [4 4;4 4]        (3.5, 4)       1         0
    (1,1)   [0 2;2 0] | [0 0;0 2]        (1, 0.5)       0         1
    """
    ch0 = [[1, 1, 0, 0], [1, 1, 0, 0], [3, 3, 0, 2], [3, 5, 2, 0]]
    ch1 = [[0, 0, 2, 2], [0, 0, 2, 2], [4, 4, 0, 0], [4, 4, 0, 2]]
    fg = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    feats = _t([[ch0, ch1]])  # (1, 2, 4, 4)
    mask = _t([[fg]])  # (1, 1, 4, 4)
    return feats, mask


def test_local_prototypes_by_hand(toy):
    feats, fg = toy
    torch.testing.assert_close(local_prototypes(feats, fg, 2), _t([[1, 0], [3.5, 4]]))  # windows (0,0), (1,0)
    torch.testing.assert_close(local_prototypes(feats, 1 - fg, 2), _t([[1, 0.5]]))  # window (1,1)
    # window 4 = the whole map: FG mean 11/16 < 0.95 -> nothing kept
    assert local_prototypes(feats, fg, 4).shape == (0, 2)


def test_global_prototype_by_hand(toy):
    feats, fg = toy
    # FG area 11; sum F*M: ch0 = 4 (0,0) + 0 (0,1) + 14 (1,0) = 18, ch1 = 0 + 6 + 16 = 22
    torch.testing.assert_close(global_prototype(feats, fg), _t([[18 / (11 + 1e-5), 22 / (11 + 1e-5)]]))


def test_modes_by_hand(toy):
    feats, fg = toy
    bg = compute_prototypes(feats, 1 - fg, 2, "gridconv")
    assert (bg.mode, bg.n_local, bg.fallback) == ("gridconv", 1, False)
    torch.testing.assert_close(bg.vectors, _t([[1, 0.5]]))
    # the original's rule window 4 on the 4x4 map: max avgpool = 11/16 < 0.95 -> global prototype only
    fg_default = compute_prototypes(feats, fg, 2, "gridconv+")
    assert (fg_default.mode, fg_default.n_local) == ("mask", 0)
    torch.testing.assert_close(fg_default.vectors, _t([[18 / 11, 22 / 11]]), rtol=1e-5, atol=1e-5)
    # with a 2x2 rule window two windows are 100 % FG -> locals + global (global last)
    fg_plus = compute_prototypes(feats, fg, 2, "gridconv+", fg_global_rule_window=2)
    assert (fg_plus.mode, fg_plus.n_local) == ("gridconv+", 2)
    torch.testing.assert_close(fg_plus.vectors, _t([[1, 0], [3.5, 4], [18 / 11, 22 / 11]]), rtol=1e-5, atol=1e-5)
    masked = compute_prototypes(feats, fg, 2, "mask", fg_global_rule_window=2)
    assert masked.mode == "mask" and masked.vectors.shape == (1, 2)


def test_keep_threshold_is_strict_and_configurable():
    feats = torch.arange(2 * 16, dtype=torch.float32).reshape(1, 2, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 0.96  # window (0,0) mean 0.96 > 0.95: kept
    mask[..., :2, 2:] = 0.94  # window (0,1) mean 0.94: dropped
    mask[..., 2:, :2] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # window (1,0) mean exactly 0.75
    assert local_prototypes(feats, mask, 2).shape[0] == 1
    assert local_prototypes(feats, mask, 2, thresh=0.75).shape[0] == 2  # 0.96 and 0.94 > 0.75, 0.75 is not
    # the gridconv+ rule is ">=": a window at exactly the threshold passes it
    only_exact = torch.zeros(1, 1, 4, 4)
    only_exact[..., 2:, :2] = mask[..., 2:, :2]
    assert fg_global_rule(only_exact, rule_window=2, thresh=0.75)
    assert not fg_global_rule(only_exact, rule_window=2, thresh=0.76)
    both = compute_prototypes(feats, only_exact, 2, "gridconv+", thresh=0.75, fg_global_rule_window=2)
    assert (both.mode, both.n_local) == ("gridconv+", 0)  # rule passed (>=) but no window kept (>): global only


def test_fg_rule_uses_4x4_window_even_at_val_wsize_2():
    feats = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    block = torch.zeros(1, 1, 8, 8)
    block[..., :4, :4] = 1  # an aligned 4x4 FG block: four 2x2 windows + rule passes
    out = compute_prototypes(feats, block, 2, "gridconv+")
    assert (out.mode, out.n_local) == ("gridconv+", 4)
    holed = block.clone()
    holed[..., 3, 3] = 0  # 4x4 mean 15/16 < 0.95, although three 2x2 windows are still 100 % FG
    assert local_prototypes(feats, holed, 2).shape[0] == 3
    # the 4x4 rule decides (docs/method.md#q13-rule-window-4x4)
    assert compute_prototypes(feats, holed, 2, "gridconv+").mode == "mask"
    assert compute_prototypes(feats, holed, 2, "gridconv+", fg_global_rule_window=2).n_local == 3
    shifted = torch.zeros(1, 1, 8, 8)
    shifted[..., 2:6, 2:6] = 1  # a full 4x4 block that straddles the non-overlapping 4x4 grid
    assert compute_prototypes(feats, shifted, 2, "gridconv+").mode == "mask"


def test_multi_shot_global_prototype_pools_all_shots():
    feats = torch.zeros(2, 2, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    feats[0, 0] = 2.0
    mask[0, 0, 0, 0] = 1  # shot 0: area 1, feature (2, 0)
    feats[1, 1] = 4.0
    mask[1, 0, :1, :3] = 1  # shot 1: area 3, feature (0, 4)
    # sum over both shots / total area = (2, 12) / 4, not the mean of the per-shot means (1, 2)
    torch.testing.assert_close(global_prototype(feats, mask), _t([[0.5, 3.0]]), rtol=1e-5, atol=1e-5)
    two_windows = torch.ones(2, 1, 4, 4)
    assert local_prototypes(feats, two_windows, 2).shape == (8, 2)  # 4 windows x 2 shots


def test_empty_bg_falls_back_to_global_prototype(toy):
    feats, fg = toy
    near_fg = fg.clone()  # BG = 1 - mask: windows (0,1) 0.25 and (1,1) 1 -> make (1,1) only 0.75 BG
    near_fg[..., 3, 3] = 1
    bg = compute_prototypes(feats, 1 - near_fg, 2, "gridconv")
    assert (bg.mode, bg.n_local, bg.fallback) == ("mask", 0, True)
    # global BG prototype: BG pixels (1,3), (2,2), (2,3), (3,2): ch0 0+0+2+2 = 4, ch1 2+0+0+0 = 2, area 4
    torch.testing.assert_close(bg.vectors, _t([[1.0, 0.5]]), rtol=1e-5, atol=1e-5)
    none = compute_prototypes(feats, torch.zeros_like(fg), 2, "gridconv")
    assert none.fallback and torch.equal(none.vectors, torch.zeros(1, 2))
    assert torch.equal(score(feats, none), torch.zeros(1, 4, 4))  # zero prototype -> cos 0 everywhere


def test_empty_fg_raises_unless_allowed(toy):
    feats, _ = toy
    empty = torch.zeros(1, 1, 4, 4)
    with pytest.raises(EmptyMaskError, match="empty foreground"):
        compute_prototypes(feats, empty, 2, "gridconv+")
    with pytest.raises(ValueError):
        compute_prototypes(feats, empty, 2, "mask")
    zero = compute_prototypes(feats, empty, 2, "gridconv+", allow_empty=True)
    assert zero.mode == "mask" and torch.equal(zero.vectors, torch.zeros(1, 2))


def test_score_by_hand():
    protos = Prototypes(_t([[1, 0], [0, 2]]), "gridconv", 2)  # directions e1 and e2
    query = _t([[[[1, 3, 0, 1]], [[0, 4, 0, 1]]]])  # (1, 2, 1, 4): q = (1,0), (3,4), (0,0), (1,1)
    d = similarity(query, protos)[0, :, 0]  # (K=2, 4)
    torch.testing.assert_close(d, _t([[20, 12, 0, 20 / math.sqrt(2)], [0, 16, 0, 20 / math.sqrt(2)]]))

    def soft(d1: float, d2: float) -> float:
        w1, w2 = math.exp(d1), math.exp(d2)
        return (w1 * d1 + w2 * d2) / (w1 + w2)

    expected = _t([[[soft(20, 0), soft(12, 16), 0.0, 20 / math.sqrt(2)]]])
    torch.testing.assert_close(score(query, protos), expected)
    assert abs(soft(12, 16) - (12 + 16 * math.exp(4)) / (1 + math.exp(4))) < 1e-9
    glob = Prototypes(_t([[3, 4]]), "mask", 0)
    torch.testing.assert_close(score(query, glob), _t([[[12, 20, 0, 20 * 7 / (5 * math.sqrt(2))]]]))


def test_toy_end_to_end_score(toy):
    feats, fg = toy
    fg_protos = compute_prototypes(feats, fg, 2, "gridconv+", fg_global_rule_window=2)
    q = _t([[[[3]], [[4]]]])  # one query pixel (3, 4)
    pg = (18 / 11, 22 / 11)
    cos = [3 / 5, (3 * 3.5 + 16) / (5 * math.hypot(3.5, 4)), (3 * pg[0] + 4 * pg[1]) / (5 * math.hypot(*pg))]
    d = [20 * c for c in cos]
    expected = sum(math.exp(x) * x for x in d) / sum(math.exp(x) for x in d)
    assert score(q, fg_protos).item() == pytest.approx(expected, rel=1e-5)


def test_scoring_many_queries_reuses_prototypes(toy):
    feats, fg = toy
    protos = compute_prototypes(feats, fg, 2, "gridconv+", fg_global_rule_window=2)
    queries = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    batched = score(queries, protos)
    assert batched.shape == (5, 4, 4)
    for i in range(5):
        torch.testing.assert_close(batched[i : i + 1], score(queries[i : i + 1], protos))


def test_resize_mask_bilinear_to_feature_size():
    mask = torch.zeros(1, 8, 8)
    mask[0, :4] = 1
    small = resize_mask(mask, (4, 4))
    assert small.shape == (1, 1, 4, 4)
    torch.testing.assert_close(small[0, 0], _t([[1] * 4, [1] * 4, [0] * 4, [0] * 4]))
    dot = torch.zeros(1, 1, 8, 8)
    dot[..., 0, 0] = 1  # halving with align_corners=False averages 2x2 pixels
    assert resize_mask(dot, (4, 4))[0, 0, 0, 0].item() == pytest.approx(0.25)


def test_bad_shapes_and_windows_raise(toy):
    feats, fg = toy
    with pytest.raises(ValueError, match="mask must be"):
        compute_prototypes(feats, fg[:, :, :2], 2, "gridconv")
    with pytest.raises(ValueError, match="does not fit"):
        local_prototypes(feats, fg, 5)
    with pytest.raises(ValueError, match="unknown prototype mode"):
        compute_prototypes(feats, fg, 2, "grid")  # type: ignore[arg-type]


# ------------------------------------------------------------------ several shots (docs/method.md#several-shots)
@pytest.fixture
def two_shots() -> tuple[torch.Tensor, torch.Tensor]:
    """Two shots of C=2 features on a 2x2 map; with window 2 each shot has one window (the whole map).

    shot  features (ch0 | ch1)        FG mask      local (mean FG > 0.95)   sum(F M)   sum(M)
    1     [2 2;2 2] | [0 0;0 0]       [1 1;1 1]    (2, 0)                   (8, 0)     4
    2     [0 0;0 4] | [0 0;0 4]       [0 0;0 1]    none (0.25)              (4, 4)     1

    per-shot globals p1 = (8, 0)/4.00001, p2 = (4, 4)/1.00001; pooled global (12, 4)/5.00001.
    """
    f1 = [[[2, 2], [2, 2]], [[0, 0], [0, 0]]]
    f2 = [[[0, 0], [0, 4]], [[0, 0], [0, 4]]]
    m1 = [[[1, 1], [1, 1]]]
    m2 = [[[0, 0], [0, 1]]]
    return _t([f1, f2]), _t([m1, m2])


def _grid_score(cosines: list[float]) -> float:
    """sum_k softmax_k(d) d_k with d_k = 20 cos_k, worked out with math (independent of the module)."""
    d = [20 * c for c in cosines]
    z = sum(math.exp(x) for x in d)
    return sum(math.exp(x) / z * x for x in d)


def test_two_shot_per_shot_rule_by_hand(two_shots):
    feats, fg = two_shots
    p1, p2 = [8 / (4 + 1e-5), 0.0], [4 / (1 + 1e-5), 4 / (1 + 1e-5)]
    plus = compute_prototypes(feats, fg, 2, "gridconv+", fg_global_rule_window=2)  # rule: shot 1 is 100 % FG
    assert (plus.mode, plus.n_local) == ("gridconv+", 1)
    torch.testing.assert_close(plus.vectors, _t([[2, 0], p1, p2]))  # locals of all shots, then one global per shot
    masked = compute_prototypes(feats, fg, 2, "mask")
    torch.testing.assert_close(masked.vectors, _t([[(p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2]]))  # mean of p1, p2
    # query pixels (1, 0) and (0, 1): cosines with (2, 0), p1, p2 are (1, 1, 1/sqrt2) and (0, 0, 1/sqrt2)
    query = _t([[[[1, 0]], [[0, 1]]]])  # (1, 2, 1, 2)
    r = 1 / math.sqrt(2)
    expected = _t([[[_grid_score([1, 1, r]), _grid_score([0, 0, r])]]])
    torch.testing.assert_close(score(query, plus), expected, rtol=1e-5, atol=1e-5)
    # mask mode: the mean prototype ~ (3, 2), cosines 3/sqrt13 and 2/sqrt13
    torch.testing.assert_close(score(query, masked), _t([[[20 * 3 / math.sqrt(13), 20 * 2 / math.sqrt(13)]]]),
                               rtol=1e-4, atol=1e-4)


def test_two_shot_pooled_rule_by_hand(two_shots):
    feats, fg = two_shots
    pooled = [12 / (5 + 1e-5), 4 / (5 + 1e-5)]
    plus = compute_prototypes(feats, fg, 2, "gridconv+", fg_global_rule_window=2, multishot="pooled")
    assert (plus.mode, plus.n_local) == ("gridconv+", 1)
    torch.testing.assert_close(plus.vectors, _t([[2, 0], pooled]))
    masked = compute_prototypes(feats, fg, 2, "mask", multishot="pooled")
    torch.testing.assert_close(masked.vectors, _t([pooled]))
    # cosines of (1, 0) and (0, 1) with (12, 4): 3/sqrt10 and 1/sqrt10
    query = _t([[[[1, 0]], [[0, 1]]]])
    c, s = 3 / math.sqrt(10), 1 / math.sqrt(10)
    torch.testing.assert_close(score(query, plus), _t([[[_grid_score([1, c]), _grid_score([0, s])]]]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score(query, masked), _t([[[20 * c, 20 * s]]]), rtol=1e-5, atol=1e-5)
    # the two rules differ on this example (0.74 of score on random features in the issue; here by hand)
    per_shot = compute_prototypes(feats, fg, 2, "mask")
    assert float((score(query, per_shot) - score(query, masked)).abs().max()) > 1.0


def test_one_shot_rules_identical():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 4, 8, 8, generator=gen)
    mask = (torch.rand(1, 1, 8, 8, generator=gen) > 0.3).float()
    mask[..., :4, :4] = 1
    for mode in ("gridconv", "gridconv+", "mask"):
        a = compute_prototypes(feats, mask, 2, mode, multishot="per_shot")
        b = compute_prototypes(feats, mask, 2, mode, multishot="pooled")
        assert (a.mode, a.n_local) == (b.mode, b.n_local)
        assert torch.equal(a.vectors, b.vectors)
    with pytest.raises(ValueError, match="multishot"):
        compute_prototypes(feats, mask, 2, "mask", multishot="average")  # type: ignore[arg-type]


def test_background_locals_collected_over_shots(two_shots):
    feats, fg = two_shots
    for rule in ("per_shot", "pooled"):
        bg = compute_prototypes(feats, 1 - fg, 1, "gridconv", multishot=rule)
        # window 1: BG pixels are the 3 of shot 2 with features (0, 0); shot 1 has none
        assert (bg.mode, bg.n_local) == ("gridconv", 3)
        torch.testing.assert_close(bg.vectors, torch.zeros(3, 2))


def test_score_classes_equals_one_score_per_class_and_the_1x1_conv() -> None:
    """The shared-normalisation scoring gives the per-class scores, and the matmul similarity the 1x1 conv."""
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(3, 16, 6, 7, generator=gen, dtype=torch.float64)
    bg = Prototypes(torch.randn(5, 16, generator=gen, dtype=torch.float64), "gridconv", 5)
    fg = Prototypes(torch.randn(1, 16, generator=gen, dtype=torch.float64), "mask", 0)
    both = score_classes(query, [bg, fg])
    assert both.shape == (3, 2, 6, 7)
    assert torch.allclose(both, torch.stack([score(query, bg), score(query, fg)], dim=1), rtol=0, atol=1e-12)
    conv = F.conv2d(safe_normalize(query, 1), safe_normalize(bg.vectors, 1)[:, :, None, None]) * SCALE
    assert torch.allclose(similarity(query, bg), conv, rtol=0, atol=1e-12)
