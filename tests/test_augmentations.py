"""Episode augmentation: determinism, shapes, binary masks, hand-checked affine/elastic/gamma steps."""

import math
from dataclasses import replace

import numpy as np
import pytest

from dataloaders import augmentations as A


def _slice(h: int = 48, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    image = rng.normal(size=(h, w)).astype(np.float32)
    label = np.zeros((h, w), np.int64)
    label[14:30, 10:34] = 1
    return image, label


def test_presets_match_spec() -> None:
    s = A.get_preset("sabs_aug")
    assert (s.rotate_deg, s.shift_px, s.shear_deg, s.scale) == (5.0, 5.0, 5.0, (0.9, 1.2))
    assert (s.elastic_alpha, s.elastic_sigma, s.elastic_kernel, s.gamma) == (10.0, 5.0, 21, (0.5, 1.5))
    assert not (s.flip_ud or s.flip_lr or s.transpose) and s.border_fill == "zero_normalised"
    v3 = A.get_preset("aug_v3")
    assert (v3.rotate_deg, v3.shift_px, v3.shear_deg, v3.scale, v3.elastic_alpha, v3.gamma) == (
        30.0, 30.0, 30.0, (0.8, 1.3), 20.0, (0.2, 1.8))
    assert A.AugParams.from_dict(v3.to_dict()) == v3
    with pytest.raises(KeyError, match="unknown augmentation preset"):
        A.get_preset("sabs")
    with pytest.raises(TypeError, match="rotate"):
        A.AugParams.from_dict({"rotate": 5})
    with pytest.raises(ValueError, match="border_fill"):
        A.AugParams(border_fill="mean")


def test_fixed_rng_is_deterministic_and_seed_matters() -> None:
    image, label = _slice()
    a = A.augment(image, label, A.SABS_AUG, np.random.default_rng(3))
    b = A.augment(image, label, A.SABS_AUG, np.random.default_rng(3))
    c = A.augment(image, label, A.SABS_AUG, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_shapes_dtypes_binary_mask() -> None:
    image, label = _slice(40, 56)
    rng = np.random.default_rng(0)
    for params in (A.SABS_AUG, A.AUG_V3, replace(A.SABS_AUG, border_fill="min")):
        out_img, out_lab = A.augment(image, label, params, rng)
        assert out_img.shape == (40, 56) and out_img.dtype == np.float32
        assert out_lab.shape == (40, 56) and out_lab.dtype == np.int64
        assert set(np.unique(out_lab)) <= {0, 1}
        # a 16x24 block under +-5 deg, +-5 px, zoom 0.9..1.2 keeps most of its area and stays a block
        assert 0.5 * label.sum() < out_lab.sum() < 2.0 * label.sum()
    lab3 = label.copy()
    lab3[32:40, 30:40] = 2
    _, out3 = A.augment(image, lab3, A.SABS_AUG, rng, n_classes=3)
    assert set(np.unique(out3)) == {0, 1, 2}
    with pytest.raises(ValueError, match="label values"):
        A.augment(image, lab3, A.SABS_AUG, rng, n_classes=2)


def test_identity_preset_returns_input_and_draws_nothing() -> None:
    image, label = _slice()
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    out_img, out_lab = A.augment(image, label, A.IDENTITY, rng)
    assert np.array_equal(out_img, image) and np.array_equal(out_lab, label)
    assert rng.bit_generator.state == before


def test_affine_matrix_by_hand() -> None:
    assert np.allclose(A.affine_matrix((9, 9), 0, 0, 0, 0, 1.0), [[1, 0, 0], [0, 1, 0]])
    t = math.radians(4.0)
    assert np.allclose(A.affine_matrix((9, 9), 0, 0, 0, 4.0, 1.0), [[1, -math.sin(t), 0], [0, math.cos(t), 0]])
    # zoom 2 about the centre (4, 4): x -> 2x - 4
    assert np.allclose(A.affine_matrix((9, 9), 0, 0, 0, 0, 2.0), [[2, 0, -4], [0, 2, -4]])
    # rotate then translate: the translation is not rotated
    m = A.affine_matrix((9, 9), 90.0, 2.0, 0.0, 0.0, 1.0)
    assert np.allclose(m @ [4, 4, 1], [6, 4])


def test_warp_identity_translation_rotation() -> None:
    image, _ = _slice(16, 16)
    ident = A.warp_affine(image[None], A.affine_matrix((16, 16), 0, 0, 0, 0, 1.0), [0.0])[0]
    assert np.allclose(ident, image, atol=1e-5)
    shifted = A.warp_affine(image[None], A.affine_matrix((16, 16), 0, 3.0, 0, 0, 1.0), [-9.0])[0]
    assert np.allclose(shifted[:, 3:], image[:, :-3], atol=1e-5)
    assert np.all(shifted[:, :3] == -9.0)  # constant border value
    rot = A.warp_affine(image[None], A.affine_matrix((16, 16), 90.0, 0, 0, 0, 1.0), [0.0])[0]
    assert np.allclose(rot, np.rot90(image), atol=1e-4)


def test_border_fill_zero_vs_min() -> None:
    image, label = _slice()
    image = image + 10.0  # all values far from 0
    big_shift = A.AugParams(rotate_deg=0, shift_px=0, shear_deg=0, scale=(0.5, 0.5), elastic_alpha=0, gamma=None)
    zero_img, zero_lab = A.augment(image, label, big_shift, np.random.default_rng(0))
    min_img, _ = A.augment(image, label, replace(big_shift, border_fill="min"), np.random.default_rng(0))
    assert zero_img[0, 0] == 0.0 and min_img[0, 0] == pytest.approx(image.min())
    assert zero_lab[0, 0] == 0  # both one-hot channels are 0 there: argmax of a tie is background


def test_elastic_alpha_zero_is_identity_and_field_is_smooth() -> None:
    image, label = _slice()
    only_elastic0 = replace(A.IDENTITY, elastic_alpha=0.0)
    out_img, out_lab = A.augment(image, label, only_elastic0, np.random.default_rng(1))
    assert np.array_equal(out_img, image) and np.array_equal(out_lab, label)
    zero = np.zeros(image.shape)
    assert np.array_equal(A.warp_elastic(image[None], zero, zero)[0], image)
    drow, dcol = A.elastic_field((64, 64), 10.0, 5.0, 21, np.random.default_rng(2))
    assert drow.shape == (64, 64) and np.abs(drow).max() < 10.0 and np.abs(dcol).max() < 10.0
    # blurred noise: neighbouring displacements are far more alike than independent U(-1, 1) draws would be
    assert np.abs(np.diff(drow, axis=1)).mean() < 0.2 * np.abs(drow).mean() + 1e-9
    # a constant shift field moves content by whole pixels (mode 'reflect' at the edge)
    moved = A.warp_elastic(image[None], zero, np.full(image.shape, 2.0))[0]
    assert np.allclose(moved[:, :-2], image[:, 2:])


def test_elastic_same_field_for_image_and_label() -> None:
    image = np.zeros((48, 48), np.float32)
    image[14:30, 10:34] = 1.0
    _, label = _slice()
    only_elastic = replace(A.IDENTITY, elastic_alpha=10.0)
    out_img, out_lab = A.augment(image, label, only_elastic, np.random.default_rng(9))
    assert np.array_equal(out_lab, (np.rint(out_img) > 0).astype(np.int64))
    assert not np.array_equal(out_lab, label)


def test_gamma_keeps_range_and_image_only() -> None:
    image, label = _slice()
    g = A.gamma_transform(image, 0.6)
    assert g.min() == pytest.approx(image.min(), abs=1e-6) and g.max() == pytest.approx(image.max(), abs=1e-6)
    assert np.allclose(A.gamma_transform(image, 1.0), image, atol=1e-6)
    x = np.array([[1.0, 2.0, 3.0]], np.float32)  # scaled 0, 0.5, 1 -> 0, 0.25, 1 -> 1, 1.5, 3
    assert np.allclose(A.gamma_transform(x, 2.0), [[1.0, 1.5, 3.0]])
    assert np.array_equal(A.gamma_transform(np.full((3, 3), 4.0, np.float32), 0.7), np.full((3, 3), 4.0))
    only_gamma = replace(A.IDENTITY, gamma=(0.5, 1.5))
    out_img, out_lab = A.augment(image, label, only_gamma, np.random.default_rng(0))
    assert np.array_equal(out_lab, label)
    assert out_img.min() == pytest.approx(image.min(), abs=1e-5) and out_img.max() == pytest.approx(image.max())
    assert not np.allclose(out_img, image)


def test_flips_when_enabled() -> None:
    image, label = _slice()
    always = replace(A.IDENTITY, flip_ud=True, flip_lr=True, flip_p=1.0)
    out_img, out_lab = A.augment(image, label, always, np.random.default_rng(0))
    assert np.array_equal(out_img, image[::-1, ::-1]) and np.array_equal(out_lab, label[::-1, ::-1])
    with pytest.raises(ValueError, match="square"):
        A.augment(image[:, :40], label[:, :40], replace(A.IDENTITY, transpose=True, flip_p=1.0),
                  np.random.default_rng(0))


# ------------------------------------------------------------------ parity with the original's arithmetic
def _original_sabs_aug(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``sabs_aug`` written from the original's formulas, in its own layout: an (H, W, 3) float32 stack warped at
    once, cv2 rotation/zoom centre (H/2, W//2), the float64 product of the matrices rounded to float32, warpAffine
    flag 3, fields dx (1st draw, columns) and dy (2nd draw, rows) rounded to float32, 3-D map_coordinates with the
    channel coordinate, rint + argmax, gamma lo + r ((x - lo + 1e-5) / r) ** g with r = hi - lo + 1e-5 in float32
    (NumPy 1.x promotion). Same draw order as :func:`A.augment`."""
    import cv2
    from scipy.ndimage import map_coordinates

    h, w = image.shape
    comp = np.stack([image, label == 0, label == 1], axis=-1).astype(np.float32)
    rot, tx, ty = rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(-5, 5)
    shear, zoom = rng.uniform(-5, 5), rng.uniform(0.9, 1.2)
    t = np.pi * shear / 180
    mats = [np.vstack([cv2.getRotationMatrix2D((h / 2, w // 2), rot, 1), [0, 0, 1]]),
            np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]]),
            np.array([[1, -np.sin(t), 0], [0, np.cos(t), 0], [0, 0, 1]]),
            np.vstack([cv2.getRotationMatrix2D((h / 2, w // 2), 0, zoom), [0, 0, 1]])]
    final = np.eye(3)
    for m in mats:
        final = np.dot(m, final)
    comp = cv2.warpAffine(comp, final.astype(np.float32)[:2], (w, h), flags=3, borderMode=cv2.BORDER_CONSTANT)
    dx = (cv2.GaussianBlur(rng.uniform(-1, 1, size=(h, w)), (21, 21), 5) * 10).astype(np.float32)
    dy = (cv2.GaussianBlur(rng.uniform(-1, 1, size=(h, w)), (21, 21), 5) * 10).astype(np.float32)
    rows, cols, chans = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    idx = [(rows + dy[..., None]).reshape(-1, 1), (cols + dx[..., None]).reshape(-1, 1), chans.reshape(-1, 1)]
    comp = map_coordinates(comp, idx, order=1, mode="reflect").reshape(h, w, 3)
    lab = np.argmax(np.rint(comp[..., 1:]), axis=-1)
    img = np.ascontiguousarray(comp[..., 0])  # contiguous, as the product's stack[0]: same layout for np.power
    g = rng.uniform(0.5, 1.5)
    lo = img.min()
    r = np.float32(float(img.max() - lo) + 1e-5)
    img = r * np.power((img - lo + np.float32(1e-5)) * np.float32(1.0) / r, np.float32(g)) + lo
    return img, lab


def test_parity_is_bit_identical_to_the_original_formulas() -> None:
    image, label = _slice(40, 40)
    for seed in range(3):
        got_img, got_lab = A.augment(image, label, replace(A.SABS_AUG, parity=True), np.random.default_rng(seed))
        ref_img, ref_lab = _original_sabs_aug(image, label, np.random.default_rng(seed))
        assert got_img.dtype == np.float32 and np.array_equal(got_img, ref_img)
        assert np.array_equal(got_lab, ref_lab)
        # the default (pixel-grid centre, float64, no 1e-5) is a different function of the same draws
        def_img, _ = A.augment(image, label, A.SABS_AUG, np.random.default_rng(seed))
        assert np.abs(def_img - ref_img).max() > 1e-3


def test_parity_affine_centre_and_float32_by_hand() -> None:
    # rotation by 90 deg on a 4x4 image: M = [[c, s, (1 - c) cx - s cy], [-s, c, s cx + (1 - c) cy]], c = 0, s = 1
    default = A.affine_matrix((4, 4), 90.0, 0.0, 0.0, 0.0, 1.0)
    parity = A.affine_matrix((4, 4), 90.0, 0.0, 0.0, 0.0, 1.0, parity=True)
    np.testing.assert_allclose(default, [[0, 1, 0], [-1, 0, 3]], atol=1e-12)  # centre (1.5, 1.5)
    np.testing.assert_allclose(parity, [[0, 1, 0], [-1, 0, 4]], atol=1e-7)  # centre (H/2, W//2) = (2, 2)
    assert default.dtype == np.float64 and parity.dtype == np.float32
    # non-square: the original's centre is x = H/2, y = W//2 (its arguments in that order): H=6, W=5 -> (3, 2)
    zoom = A.affine_matrix((6, 5), 0.0, 0.0, 0.0, 0.0, 2.0, parity=True)
    np.testing.assert_allclose(zoom, [[2, 0, -3], [0, 2, -2]], atol=1e-6)  # (1 - 2) * (3, 2)


def test_parity_gamma_and_elastic_fields_by_hand() -> None:
    img = np.array([[0.0, 1.0], [3.0, 4.0]], np.float32)
    # r = 4 + 1e-5; out = r ((x + 1e-5) / r) ** 2: x = 0 -> 1e-10 / r, x = 4 -> r
    out = A.gamma_transform_parity(img, 2.0)
    r = np.float32(4 + 1e-5)
    expected = np.array([[1e-10 / 4, (1 + 1e-5) ** 2 / r], [(3 + 1e-5) ** 2 / r, r]])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-12)
    assert out[1, 1] == r and out[0, 0] > 0  # the max moves up by 1e-5, the min to ~2.5e-11
    np.testing.assert_array_equal(A.gamma_transform(img, 2.0), [[0, 0.25], [2.25, 4]])
    # fields: the same two draws, swapped and rounded to float32 under parity
    d_row, d_col = A.elastic_field((24, 24), 10.0, 5.0, 21, np.random.default_rng(3))
    p_row, p_col = A.elastic_field((24, 24), 10.0, 5.0, 21, np.random.default_rng(3), parity=True)
    assert p_row.dtype == p_col.dtype == np.float32 and d_row.dtype == np.float64
    np.testing.assert_array_equal(p_col, d_row.astype(np.float32))
    np.testing.assert_array_equal(p_row, d_col.astype(np.float32))


def test_composed_warp_matches_the_two_stages() -> None:
    """The default one-resampling warp = affine then elastic: exact when either stage is alone (up to cv2's 1/32-px
    bilinear weights), and within interpolation blur when both run; sample positions far outside reflect like
    scipy's mode='reflect'."""
    from dataloaders.augmentations import (
        affine_matrix,
        elastic_field,
        reflect_coords,
        warp_affine,
        warp_composed,
        warp_elastic,
    )

    yy, xx = np.mgrid[0:96, 0:80]
    image = (np.sin(xx / 7.0) + np.cos(yy / 11.0)).astype(np.float32)
    disc = ((xx - 40) ** 2 + (yy - 50) ** 2 < 20 ** 2)
    stack = np.stack([image, ~disc, disc]).astype(np.float32)
    matrix = affine_matrix((96, 80), 4.0, 3.0, -2.0, 3.0, 1.1)
    drow, dcol = elastic_field((96, 80), 30.0, 5.0, 21, np.random.default_rng(3))  # reaches past the border
    assert np.abs(warp_composed(stack, None, drow, dcol, [0, 0, 0]) - warp_elastic(stack, drow, dcol)).max() < 1e-4
    fill = [-1.5, 0.0, 0.0]
    assert np.abs(warp_composed(stack, matrix, None, None, fill) - warp_affine(stack, matrix, fill)).max() < 1e-4
    both = warp_composed(stack, matrix, drow / 3, dcol / 3, fill)
    two = warp_elastic(warp_affine(stack, matrix, fill), drow / 3, dcol / 3)
    assert np.abs(both - two).mean() < 5e-3
    assert (np.argmax(np.rint(both[1:]), 0) != np.argmax(np.rint(two[1:]), 0)).mean() < 0.01
    assert np.allclose(reflect_coords(np.array([-0.3, -1.2, -2.5, 5.3, 6.4, 7.5, 13.0, -13.0]), 6),
                       [-0.3, 0.2, 1.5, 5.3, 4.6, 3.5, 1.0, 0.0])  # period 12: 13 -> 1, -13 -> -1 -> 0
