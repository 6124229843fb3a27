"""Tests for prediction/correspondence.py: image-only support-to-query correspondence on the synthetic phantom.

Phantom scans of seed 0 at 128 x 128 (2.34 mm pixels, 5 mm slices for CT, 7.7 mm for MR); each scan id is another
"patient" whose organ slice ranges differ (the phantom places organs at random fractions of its height, so two
patients also differ in z scale). "Where the anatomy matches" between two patients is measured from the organ
labels: the least-squares line support slice = a * query slice + b through the 8 organ ends (first and last slice of
liver, kidneys, spleen).
"""

from __future__ import annotations

import numpy as np
import pytest

import prediction.correspondence as corr
from data_preprocessing.phantom import synthesize_scan
from prediction.correspondence import Correspondence, SupportAtlas, prepare_support, register

SIZE = 128
CT_DZ = 5.0


def _scan(scan_id: int, appearance: str = "ct") -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    image, label, geom = synthesize_scan(0, scan_id, size=SIZE, appearance=appearance)  # type: ignore[arg-type]
    sx, sy, sz = geom.spacing
    return image, label, (sz, sy, sx)


@pytest.fixture(scope="module")
def scans() -> dict[int, tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    return {i: _scan(i) for i in range(6)}


@pytest.fixture(scope="module")
def atlases(scans: dict) -> dict[int, SupportAtlas]:
    return {i: prepare_support(scans[i][0], scans[i][2], scans[i][1], "CT") for i in (0, 1, 2)}


@pytest.fixture(scope="module")
def atlas0(atlases: dict) -> SupportAtlas:
    return atlases[0]


def _organ_ends(label: np.ndarray) -> np.ndarray:
    """(8,) first and last slice of classes 1..4."""
    out = []
    for c in (1, 2, 3, 4):
        zs = np.flatnonzero((label == c).any(axis=(1, 2)))
        out += [zs[0], zs[-1]]
    return np.array(out, float)


def _anatomical_map(support_label: np.ndarray, query_label: np.ndarray) -> np.poly1d:
    """Support slice as a function of query slice where the organs match: least-squares line through the ends."""
    return np.poly1d(np.polyfit(_organ_ends(query_label), _organ_ends(support_label), 1))


def _z_range(label: np.ndarray, c: int) -> tuple[int, int] | None:
    zs = np.flatnonzero((label == c).any(axis=(1, 2)))
    return (int(zs[0]), int(zs[-1])) if zs.size else None


# ----------------------------------------------------------------------------------------------- self crops
@pytest.mark.parametrize("start", [0, 6, 13])
def test_shifted_crop_of_itself_recovers_the_shift(scans: dict, atlas0: SupportAtlas, start: int) -> None:
    image, label, spacing = scans[0]
    c = register(atlas0, image[start:start + 20], spacing, "CT")
    assert isinstance(c, Correspondence)
    assert c.support_z.shape == (20,)
    assert np.all(np.isfinite(c.support_z))
    assert np.abs(c.support_z - (np.arange(20) + start)).max() < 1.0
    assert c.score > 0.95  # the same image: near-perfect correlation
    assert c.overlap_mm == pytest.approx(20 * CT_DZ)
    warped = c.warp_label()
    assert (warped == label[start:start + 20]).mean() > 0.99


def test_shifted_crop_mr_and_other_z_spacing() -> None:
    """MR appearance; the query crop resampled to half the slice spacing (7.7 mm support, 3.85 mm query)."""
    image, label, (dz, dy, dx) = _scan(3, "mr")
    atlas = prepare_support(image, (dz, dy, dx), label, "MR")
    crop = image[10:28]
    fine = 0.5 * (crop[:-1] + crop[1:])
    query = np.empty((2 * crop.shape[0] - 1,) + crop.shape[1:], np.float32)
    query[0::2], query[1::2] = crop, fine  # slice k of the query = support slice 10 + k / 2
    c = register(atlas, query, (dz / 2, dy, dx), "MR")
    expected = 10 + np.arange(query.shape[0]) / 2
    assert np.abs(c.support_z - expected).max() < 1.0


# ----------------------------------------------------------------------------------------------- other patients
# Measured on 10 phantom patients (module report): about 85-90 % of cross-patient slab placements land within 2
# slices of the anatomical line, the rest are misses of 3-11 slices. The tests therefore check 27 placements
# (supports 0-2 x queries 3-5 x 3 slab positions) and require the typical behaviour, not a perfect score. The z stage
# alone is tested here: with the default z_from_search the linear stages keep its slice matches (tested below) and
# only the Demons stage refines them locally.
PAIRS = [(s, q) for s in (0, 1, 2) for q in (3, 4, 5)]


def _starts(n_slices: int) -> tuple[int, ...]:
    """Starts of the 20-slice slabs: bottom, middle, top of the scan."""
    return 0, (n_slices - 20) // 2, n_slices - 20


def test_query_slab_of_another_patient_lands_where_the_anatomy_matches(scans: dict, atlases: dict) -> None:
    errors = []
    for s, q in PAIRS:
        q_image, q_label, q_spacing = scans[q]
        for start in _starts(q_image.shape[0]):
            c = register(atlases[s], q_image[start:start + 20], q_spacing, "CT", stages=("z",))
            assert np.isfinite(c.support_z).sum() >= 18  # the slab lies inside the whole support
            expected = _anatomical_map(scans[s][1], q_label)(np.arange(20) + start)
            errors.append(float(np.nanmedian(c.support_z - expected)))
    errors_abs = np.abs(errors)
    assert np.median(errors_abs) <= 1.5, errors
    assert np.mean(errors_abs <= 2.0) >= 0.75, errors


def test_support_slab_inside_a_whole_query(scans: dict) -> None:
    errors = []
    for s, q in PAIRS:
        s_image, s_label, s_spacing = scans[s]
        q_image, q_label, q_spacing = scans[q]
        for start in _starts(s_image.shape[0]):
            atlas = prepare_support(s_image[start:start + 20], s_spacing, s_label[start:start + 20], "CT")
            c = register(atlas, q_image, q_spacing, "CT", stages=("z",))
            inside = np.isfinite(c.support_z)
            assert 15 <= inside.sum() <= 25  # about the slab's 20 slices matched, the rest outside the support
            idx = np.flatnonzero(inside)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # one contiguous run of query slices
            # query slice k matches support-slab slice line(k) - start
            expected = _anatomical_map(s_label, q_label)(np.arange(q_image.shape[0])) - start
            errors.append(float(np.median(c.support_z[inside] - expected[inside])))
    errors_abs = np.abs(errors)
    assert np.median(errors_abs) <= 1.5, errors
    assert np.mean(errors_abs <= 2.0) >= 0.75, errors


# ----------------------------------------------------------------------------------------------- z ranges, priors
def test_open_ends_when_the_support_organ_touches_its_field_of_view(scans: dict) -> None:
    s_image, s_label, s_spacing = scans[0]
    liver = _z_range(s_label, 1)
    assert liver is not None
    top = liver[0] + 8  # support slab cut through the liver: its organ touches the top of the slab
    atlas = prepare_support(s_image[:top], s_spacing, s_label[:top], "CT")
    closed_errors = []
    for q in (3, 4, 5):
        q_image, q_label, q_spacing = scans[q]
        c = register(atlas, q_image, q_spacing, "CT")
        lo, hi, open_lo, open_hi = c.class_z_range(None, 1, margin_mm=0.0)
        assert (open_lo, open_hi) == (False, True)
        assert hi == q_image.shape[0] - 1  # an open end is not limited
        closed_errors.append(lo - _z_range(q_label, 1)[0])  # type: ignore[index]
        lo10, hi10, _, _ = c.class_z_range(None, 1, margin_mm=10.0)  # 10 mm at 5 mm slices: 2 slices lower
        assert (lo10, hi10) == (max(0, lo - 2), hi)
        # the prior continues the organ beyond the open end (query slices above the support's field of view)
        above = np.flatnonzero(c.support_z_raw > atlas.shape[0] - 0.5)
        assert above.size > 0 and not np.isfinite(c.support_z[above]).any()
        assert c.prior(None, 1, 10.0, 5.0)[above].any(axis=(1, 2)).all()
        # ends of the other classes are open exactly where they touch the slab's ends
        for k in (2, 3, 4):
            if (atlas.label == k).any():
                zk = _z_range(atlas.label, k)
                assert c.class_z_range(None, k, 0.0)[2:] == (zk[0] == 0, zk[1] == top - 1)  # type: ignore[index]
    assert np.median(np.abs(closed_errors)) <= 3, closed_errors


def test_class_z_range_of_whole_scans_and_absent_class(scans: dict, atlas0: SupportAtlas) -> None:
    q_image, q_label, q_spacing = scans[2]
    c = register(atlas0, q_image, q_spacing, "CT")
    for k in (1, 2, 3, 4):
        lo, hi, open_lo, open_hi = c.class_z_range(None, k, margin_mm=0.0)
        true = _z_range(q_label, k)
        assert true is not None and not open_lo and not open_hi
        assert abs(lo - true[0]) <= 3 and abs(hi - true[1]) <= 3, (k, (lo, hi), true)
        lo_m, hi_m, _, _ = c.class_z_range(None, k, margin_mm=12.0)  # 12 mm at 5 mm slices: 3 slices
        assert (lo_m, hi_m) == (max(0, lo - 3), min(q_image.shape[0] - 1, hi + 3))
    with pytest.raises(ValueError, match="absent"):
        c.class_z_range(None, 7, 0.0)


def test_prior_contains_the_query_organ(scans: dict, atlas0: SupportAtlas) -> None:
    q_image, q_label, q_spacing = scans[1]
    c = register(atlas0, q_image, q_spacing, "CT")
    for k in (1, 2, 3, 4):
        prior = c.prior(None, k, margin_mm=20.0, inplane_margin_mm=20.0)
        truth = q_label == k
        assert prior.shape == q_label.shape and prior.dtype == bool
        covered = (prior & truth).sum() / truth.sum()
        assert covered >= 0.95, f"class {k}: prior holds {covered:.3f} of the organ"
        assert prior.mean() < 0.25  # and is not the whole volume


def test_prior_dilates_in_plane_and_along_z_by_their_own_margins_in_mm() -> None:
    mask = np.zeros((9, 11, 11), bool)
    mask[4, 5, 5] = True
    out = corr._dilate_mm(mask, (5.0, 1.0, 1.0), 10.0, 2.0)
    # in-plane: the disc of radius 2 mm (13 pixels); along z: 10 mm / 5 mm = 2 slices either way
    assert out[4].sum() == 13 and out[4, 5, 3] and not out[4, 4, 3]
    assert [int(out[z].sum()) for z in range(9)] == [0, 0, 13, 13, 13, 13, 13, 0, 0]
    # pixels of 0.5 x 1 mm: the same 2 mm reach 4 rows and 2 columns; 7 mm along z at 5 mm slices: 1 slice
    out = corr._dilate_mm(mask, (5.0, 0.5, 1.0), 7.0, 2.0)
    assert out[4, 1, 5] and not out[4, 0, 5] and out[4, 5, 3] and not out[4, 5, 2]
    assert [bool(out[z].any()) for z in range(9)] == [False, False, False, True, True, True, False, False, False]
    assert corr._dilate_mm(mask, (5.0, 1.0, 1.0), 0.0, 0.0) is mask


# ----------------------------------------------------------------------------------------------- reuse, API
def test_prepare_support_is_done_once_and_the_atlas_is_untouched(scans: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    s_image, s_label, s_spacing = scans[0]
    calls: list[tuple[int, ...]] = []
    real = corr._prepare

    def counting(image: np.ndarray, *args: object, **kwargs: object) -> object:
        calls.append(image.shape)
        return real(image, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(corr, "_prepare", counting)
    atlas = prepare_support(s_image, s_spacing, s_label, "CT")
    assert calls == [s_image.shape]
    before = {name: getattr(atlas.volume, name).copy() for name in ("coarse", "body", "search", "search_body")}
    for qid in (1, 2):
        q_image, _, q_spacing = scans[qid]
        register(atlas, q_image[:20], q_spacing, "CT", stages=("z", "rigid"))
    # one preparation per query, none of the support
    assert calls == [s_image.shape, (20, SIZE, SIZE), (20, SIZE, SIZE)]
    for name, arr in before.items():
        assert np.array_equal(getattr(atlas.volume, name), arr)
        assert not getattr(atlas.volume, name).flags.writeable
    assert atlas.label is not None and not atlas.label.flags.writeable


def test_stages_metrics_and_reproducibility(scans: dict, atlas0: SupportAtlas) -> None:
    q_image, _, q_spacing = scans[1]
    query = q_image[5:25]
    a = register(atlas0, query, q_spacing, "CT", stages=("z", "rigid", "affine", "demons"))  # default seed 0
    b = register(atlas0, query, q_spacing, "CT", stages=("z", "rigid", "affine", "demons"))
    assert np.allclose(a.support_z, b.support_z, atol=1e-6) and a.stage_scores == b.stage_scores
    assert np.array_equal(a.warp_label(), b.warp_label())
    assert list(a.stage_transforms) == ["z", "rigid", "affine", "demons"] and a.z_scale_locked
    assert a.at_stage("z").stages == ("z",)
    # z comes from the search: the linear stages move in-plane only (z row and column of the matrix untouched)
    affine = a.stage_transforms["affine"]
    assert [affine.GetMatrix()[i] for i in (2, 5, 6, 7, 8)] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert affine.GetTranslation()[2] == a.stage_transforms["z"].GetOffset()[2]
    assert np.allclose(a.at_stage("affine").support_z, a.at_stage("z").support_z, atol=1e-6)
    assert np.nanmax(np.abs(a.support_z - a.at_stage("z").support_z)) < 1.5  # Demons refines z locally only
    # with z_from_search=False the affine may move z but keeps its z scale (lock_z_scale)
    free = register(atlas0, query, q_spacing, "CT", stages=("z", "rigid", "affine"), z_from_search=False)
    rigid_m, affine_m = free.stage_transforms["rigid"].GetMatrix(), free.stage_transforms["affine"].GetMatrix()
    assert np.allclose([affine_m[i] for i in (6, 7, 8)], [rigid_m[i] for i in (6, 7, 8)])
    for metric in ("mattes", "meansquares"):
        c = register(atlas0, query, q_spacing, "CT", stages=("z",), search_metric=metric)
        assert np.isfinite(c.support_z).sum() >= 15 and -1 <= c.score <= 1  # at least the minimum overlap
        assert (c.search_metric, c.metric) == (metric, "correlation")  # CT-CT stages keep their default
    mr = register(atlas0, query, q_spacing, "MR", stages=("z",))  # CT support, MR query: Mattes for both
    assert (mr.search_metric, mr.metric) == ("mattes", "mattes")
    only_init = register(atlas0, query, q_spacing, "CT", stages=("rigid",))
    assert "init" in only_init.stage_transforms


def test_warp_label_is_nearest_neighbour_and_cached(scans: dict, atlas0: SupportAtlas) -> None:
    q_image, _, q_spacing = scans[2]
    c = register(atlas0, q_image[8:30], q_spacing, "CT", stages=("z",))
    w = c.warp_label()
    assert w.shape == (22, SIZE, SIZE) and w.dtype == np.uint8
    assert set(np.unique(w).tolist()) <= {0, 1, 2, 3, 4}
    w[:] = 9  # the caller's copy: the cache is not affected
    assert (c.warp_label() != 9).all()
    other = (atlas0.label == 2).astype(np.int16)  # any label of the support's shape
    assert set(np.unique(c.warp_label(other)).tolist()) <= {0, 1}
    assert c.nearest_support_slice(0) == int(round(c.support_z[0]))


def test_a_stage_that_lowers_the_correlation_is_undone(scans: dict, atlas0: SupportAtlas,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    q_image, _, q_spacing = scans[1]
    real = corr._run_linear

    def diverging(fixed: object, moving: object, mask: object, transform: object, *args: object) -> float:
        value = real(fixed, moving, mask, transform, *args)  # type: ignore[arg-type]
        if isinstance(transform, corr.sitk.Euler3DTransform):  # the rigid stage "diverges" 150 mm sideways
            t = transform.GetTranslation()
            transform.SetTranslation((t[0] + 150.0, t[1], t[2]))
        return value

    monkeypatch.setattr(corr, "_run_linear", diverging)
    c = register(atlas0, q_image[5:25], q_spacing, "CT", stages=("z", "rigid", "affine"))
    assert c.reverted == ("rigid",)
    assert c.stage_scores["rigid"] == c.stage_scores["z"]
    assert c.stage_transforms["rigid"] is c.stage_transforms["z"]
    assert c.score >= c.stage_scores["z"] - corr.REVERT_TOLERANCE


def test_failed_registration_is_flagged(scans: dict, atlas0: SupportAtlas) -> None:
    q_image, _, q_spacing = scans[3]
    good = register(atlas0, q_image, q_spacing, "CT")
    assert not good.likely_failed() and good.score == good.stage_scores["affine"]
    rng = np.random.default_rng(0)
    noise = np.where(q_image > 5, rng.uniform(0, 255, q_image.shape), 0).astype(np.float32)  # a body of noise
    bad = register(atlas0, noise, q_spacing, "CT")
    assert bad.likely_failed() and bad.score < good.score - 0.2


def test_bad_input_raises(scans: dict, atlas0: SupportAtlas) -> None:
    image, label, spacing = scans[0]
    with pytest.raises(ValueError, match="modality"):
        prepare_support(image, spacing, label, "PET")
    with pytest.raises(ValueError, match="3D"):
        prepare_support(image[0], spacing)
    with pytest.raises(ValueError, match="spacing"):
        prepare_support(image, (5.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="shape"):
        prepare_support(image, spacing, label[:-1])
    with pytest.raises(ValueError, match="integer"):
        prepare_support(image, spacing, label + 0.5)
    with pytest.raises(ValueError, match="NaN"):
        register(atlas0, np.full((10, SIZE, SIZE), np.nan, np.float32), spacing)
    with pytest.raises(ValueError, match="stages"):
        register(atlas0, image, spacing, stages=("affine", "z"))
    with pytest.raises(ValueError, match="stages"):
        register(atlas0, image, spacing, stages=("z", "warp"))
    with pytest.raises(ValueError, match="metric"):
        register(atlas0, image, spacing, metric="ncc")
    with pytest.raises(ValueError, match="search_metric"):
        register(atlas0, image, spacing, search_metric="ncc")
    with pytest.raises(ValueError, match="body"):
        register(atlas0, np.zeros((10, SIZE, SIZE), np.float32), spacing)
    with pytest.raises(ValueError, match="iterations"):
        register(atlas0, image, spacing, iterations=0)
    with pytest.raises(ValueError, match="scale_mode"):
        register(atlas0, image, spacing, scale_mode="guess")
    c = register(atlas0, image[:12], spacing, stages=("z",))
    with pytest.raises(ValueError, match="query slice"):
        c.support_slice(12)
    with pytest.raises(ValueError, match="margin"):
        c.prior(None, 1, -1.0, 5.0)
    with pytest.raises(ValueError, match="margin"):
        c.prior(None, 1, 10.0, -1.0)
    with pytest.raises(ValueError, match="margin"):
        c.class_z_range(None, 1, -1.0)
    with pytest.raises(ValueError, match="absent"):
        c.prior(None, 9, 10.0, 5.0)
