"""Tests for prediction/volume.py: placement from correspondences, scoring, the one decision for all classes, the
atlas vote, and k-shot, on hand-built cases (correspondences are small stand-ins with the attributes the module
reads, so every expected value can be worked out by hand)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from prediction.volume import (
    Placement,
    QueryScan,
    SupportScan,
    atlas_labels,
    combine_by_margin,
    decide,
    place_registered,
    score_class,
    segment_volume,
)


@dataclass
class FakeCorrespondence:
    """Support slice = query slice + ``shift``; labels carried by the same shift (zero outside the support)."""

    shift: int
    query_shape: tuple[int, int, int]
    support_shape: tuple[int, int, int]
    prior_margin: int = 0
    query_spacing_zyx: tuple[float, float, float] = (5.0, 1.0, 1.0)
    score: float = 1.0
    overlap_mm: float = 0.0
    z_offset_mm: float = 0.0
    stages: tuple[str, ...] = ("z",)
    stage_seconds: dict = field(default_factory=dict)

    @property
    def support_z_raw(self) -> np.ndarray:
        return np.arange(self.query_shape[0], dtype=float) + self.shift

    def warp_label(self, label: np.ndarray) -> np.ndarray:
        out = np.zeros(self.query_shape, label.dtype)
        for z in range(self.query_shape[0]):
            if 0 <= z + self.shift < label.shape[0]:
                out[z] = label[z + self.shift]
        return out

    def class_z_range(self, label: np.ndarray, c: int, margin_mm: float) -> tuple[int, int, bool, bool]:
        zs = np.flatnonzero((self.warp_label(label) == c).any(axis=(1, 2)))
        sup = np.flatnonzero((label == c).any(axis=(1, 2)))
        open_lo, open_hi = bool(sup[0] == 0), bool(sup[-1] == label.shape[0] - 1)
        lo = 0 if open_lo else int(zs[0])
        hi = self.query_shape[0] - 1 if open_hi else int(zs[-1])
        return lo, hi, open_lo, open_hi

    def prior(self, label: np.ndarray, c: int, margin_mm: float, inplane_margin_mm: float) -> np.ndarray:
        """The carried mask grown by ``prior_margin`` voxel steps, then the real prior's dilation in mm."""
        from scipy import ndimage

        from prediction.correspondence import _dilate_mm

        m = self.warp_label(label) == c
        m = ndimage.binary_dilation(m, iterations=self.prior_margin) if self.prior_margin else m
        return _dilate_mm(m, self.query_spacing_zyx, margin_mm, inplane_margin_mm)


def _support(label: np.ndarray) -> SupportScan:
    img = label.astype(np.float32)
    return SupportScan(img, label, img, (5.0, 1.0, 1.0))


def test_place_registered_matched_slices_range_and_prior() -> None:
    lab = np.zeros((10, 4, 4), np.int32)
    lab[3:7, 1:3, 1:3] = 5  # support organ on slices 3..6
    corr = FakeCorrespondence(shift=2, query_shape=(8, 4, 4), support_shape=(10, 4, 4))
    p = place_registered([corr], [_support(lab)], 5, support_choice="matched", margin_mm=0.0, inplane_margin_mm=0.0)
    # query z maps to support z + 2; organ slices 3..6 of the support are query slices 1..4
    assert p.z_range == (1, 4) and p.open_ends == (False, False)
    np.testing.assert_array_equal(p.support_slices[0], [-1, 3, 4, 5, 6, -1, -1, -1])
    assert p.prior.sum() == 4 * 4 and p.prior[1:5, 1:3, 1:3].all()
    # chunks: organ slices [3, 4, 5, 6], n_part 2 -> centres L[int(0.25 * 4)] = 4, L[int(0.75 * 4)] = 6
    c = place_registered([corr], [_support(lab)], 5, support_choice="chunks", n_part=2)
    np.testing.assert_array_equal(c.support_slices[0], [-1, 4, 4, 6, 6, -1, -1, -1])


def test_open_end_when_the_support_organ_touches_its_field_of_view() -> None:
    lab = np.zeros((6, 4, 4), np.int32)
    lab[3:6, 1:3, 1:3] = 5  # reaches the support's last slice: the organ may go on above
    corr = FakeCorrespondence(shift=0, query_shape=(12, 4, 4), support_shape=(6, 4, 4))
    p = place_registered([corr], [_support(lab)], 5, use_prior=False)
    assert p.z_range == (3, 11) and p.open_ends == (False, True)
    # query slices above the support are compared with the support organ's last slice
    np.testing.assert_array_equal(p.support_slices[0], [-1, -1, -1, 3, 4, 5, 5, 5, 5, 5, 5, 5])


def test_score_class_groups_slices_by_support_set_and_masks_the_prior() -> None:
    lab = np.zeros((4, 3, 3), np.int32)
    lab[1:3] = 1
    sup = _support(lab)
    calls = []

    def margin(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        calls.append((s.shape[0], len(q)))
        return np.ones(q.shape, np.float32)

    prior = np.ones((5, 3, 3), bool)
    prior[:, 0, 0] = False
    placement = Placement([np.array([-1, 1, 1, 2, -1])], (1, 3), (False, False), prior)
    out = score_class(margin, [sup], np.zeros((5, 3, 3), np.float32), 1, placement)
    assert sorted(calls) == [(1, 1), (1, 2)]  # slices 1, 2 share support slice 1; slice 3 uses slice 2
    assert np.isneginf(out[0]).all() and np.isneginf(out[4]).all() and np.isneginf(out[:, 0, 0]).all()
    assert (out[1:4, 1:, 1:] == 1).all()


def test_decide_one_decision_for_all_classes_by_hand() -> None:
    a = np.array([[[2.0, 0.5, -1.0, -np.inf]]])
    b = np.array([[[1.0, 3.0, -0.5, 0.2]]])
    # voxel 0: a wins (2 > 1); voxel 1: b (3 > 0.5); voxel 2: none positive -> background; voxel 3: b (a excluded)
    np.testing.assert_array_equal(decide({5: a, 7: b}, keep_largest=False), [[[5, 7, 0, 7]]])
    # the largest component per class: b's two voxels (1 and 3) are apart; the first one found is kept
    np.testing.assert_array_equal(decide({5: a, 7: b}), [[[5, 7, 0, 0]]])


def test_asking_for_one_class_or_several_gives_the_same_mask_where_priors_do_not_overlap() -> None:
    rng = np.random.default_rng(0)
    m1 = rng.normal(size=(3, 8, 8)).astype(np.float32)
    m2 = rng.normal(size=(3, 8, 8)).astype(np.float32)
    m1[:, :, 4:] = -np.inf  # class 1 allowed on the left half only, class 2 on the right half
    m2[:, :, :4] = -np.inf
    both = decide({1: m1, 2: m2}, keep_largest=False)
    np.testing.assert_array_equal(both == 1, decide({1: m1}, keep_largest=False) == 1)
    np.testing.assert_array_equal(both == 2, decide({2: m2}, keep_largest=False) == 2)


def test_combine_by_margin_is_the_previous_rule() -> None:
    m1 = np.array([[[True, True, False]]])
    m2 = np.array([[[False, True, True]]])
    out = combine_by_margin({5: m1, 1: m2}, {5: np.array([[[1.0, 2.0, 0.0]]]), 1: np.array([[[0.0, 3.0, 1.0]]])})
    np.testing.assert_array_equal(out, [[[5, 1, 1]]])


def test_atlas_vote_with_two_and_three_shots() -> None:
    shape = (1, 1, 4)
    labs = [np.array([[[5, 5, 0, 7]]]), np.array([[[5, 0, 0, 7]]]), np.array([[[0, 0, 7, 5]]])]
    corrs = [FakeCorrespondence(0, shape, shape) for _ in labs]
    sups = [_support(lab.astype(np.int32)) for lab in labs]
    # two shots: a class carried by at least one of two (half) wins; voxel 3: 7 twice
    np.testing.assert_array_equal(atlas_labels(corrs[:2], sups[:2], [5, 7]), [[[5, 5, 0, 7]]])
    # three shots: at least 2 of 3 needed; voxel 3: 7 twice vs 5 once -> 7; voxel 1: 5 once -> background
    np.testing.assert_array_equal(atlas_labels(corrs, sups, [5, 7]), [[[5, 0, 0, 7]]])


def test_two_shot_placement_unions_ranges_and_priors_and_pairs_the_matched_slices() -> None:
    lab_a = np.zeros((10, 4, 4), np.int32)
    lab_a[2:5, 0:2, 0:2] = 1  # organ on support A slices 2..4, top-left
    lab_b = np.zeros((10, 4, 4), np.int32)
    lab_b[5:8, 2:4, 2:4] = 1  # organ on support B slices 5..7, bottom-right
    ca = FakeCorrespondence(shift=0, query_shape=(10, 4, 4), support_shape=(10, 4, 4))
    cb = FakeCorrespondence(shift=2, query_shape=(10, 4, 4), support_shape=(10, 4, 4))
    p = place_registered([ca, cb], [_support(lab_a), _support(lab_b)], 1, support_choice="matched", margin_mm=0.0,
                         inplane_margin_mm=0.0)
    # A places the organ on query 2..4, B on query 3..5 (support 5..7 shifted by 2): the union 2..5
    assert p.z_range == (2, 5)
    np.testing.assert_array_equal(p.support_slices[0], [-1, -1, 2, 3, 4, 4, -1, -1, -1, -1])
    np.testing.assert_array_equal(p.support_slices[1], [-1, -1, 5, 5, 6, 7, -1, -1, -1, -1])
    assert p.prior[2:5, 0:2, 0:2].all() and p.prior[3:6, 2:4, 2:4].all() and p.prior.sum() == 12 + 12

    calls = []

    def margin(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        calls.append(s.shape[0])
        return np.ones(q.shape, np.float32)

    query = QueryScan(np.zeros((10, 4, 4), np.float32), np.zeros((10, 4, 4), np.float32), (5.0, 1.0, 1.0))
    seg = segment_volume(margin, [_support(lab_a), _support(lab_b)], query, [1], correspondences=[ca, cb],
                         modality="MR", support_choice="matched", margin_mm=0.0, inplane_margin_mm=0.0)
    assert set(calls) == {2}  # every support set holds one slice of each shot
    assert seg.classes[1].support_slices == [[2, 3, 4], [5, 6, 7]]
    assert seg.labels[2:6].astype(bool).sum() == 24 and not seg.labels[[0, 1, 6, 7, 8, 9]].any()


def test_unknown_method_and_missing_class_are_refused() -> None:
    lab = np.zeros((3, 2, 2), np.int32)
    lab[1] = 1
    query = QueryScan(np.zeros((3, 2, 2), np.float32), np.zeros((3, 2, 2), np.float32), (5.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        segment_volume(lambda s, m, q: q, [_support(lab)], query, [1], method="nearest")
    with pytest.raises(ValueError, match="holds no slice of class 2"):
        segment_volume(lambda s, m, q: q, [_support(lab)], query, [2])


def test_best_chunk_keeps_each_voxels_largest_margin_over_the_chunks() -> None:
    from prediction.volume import score_best_chunk

    lab = np.zeros((6, 2, 2), np.int32)
    lab[0:6] = 1  # organ on support slices 0..5: chunk centres for n_part 3 are L[1], L[3], L[5] = 1, 3, 5
    sup = _support(lab)
    seen = []

    def margin(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        z = int(s[0, 0, 0])  # the support image holds its slice index
        seen.append(z)
        return np.full(q.shape, {1: -1.0, 3: 2.0, 5: 0.5}[z], np.float32)

    sup = SupportScan(np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 2, 2), np.float32), lab,
                      lab.astype(np.float32), (5.0, 1.0, 1.0))
    placement = Placement([np.array([1, 1, -1])], (0, 1), (False, False), None)
    out = score_best_chunk(margin, [sup], np.zeros((3, 2, 2), np.float32), 1, placement, 3)
    assert sorted(set(seen)) == [1, 3, 5]
    assert (out[:2] == 2.0).all() and np.isneginf(out[2]).all()

