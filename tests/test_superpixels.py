"""Tests of data_preprocessing.superpixels: body mask, Felzenszwalb wrapper, compact and legacy numbering
(docs/method.md#q2-superpixel-numbering)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from data_preprocessing.superpixels import (
    body_mask,
    felzenszwalb_slice,
    relabel_compact,
    relabel_legacy,
    scale_params,
    superpixel_slice,
    superpixel_volume,
)

MR_THRESHOLD = 50.0001


def phantom_volume(rng: np.random.Generator, z: int = 3, size: int = 64) -> np.ndarray:
    """(Z, size, size) float32 MR-like volume: noisy air below 50, a body ellipse with smooth organs above 50."""
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.47 * size)) ** 2 <= 1.0
    vol = np.empty((z, size, size), dtype=np.float32)
    for k in range(z):
        organs = ndimage.gaussian_filter(rng.random((size, size)), sigma=size / 12)
        organs = (organs - organs.min()) / (np.ptp(organs) + 1e-9)
        inside = 80.0 + 300.0 * organs + rng.normal(0.0, 8.0, (size, size))
        air = rng.uniform(0.0, 20.0, (size, size))
        vol[k] = np.where(body, np.maximum(inside, 55.0), air)
    return vol


def walk_legacy(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Literal step-by-step walk of the original numbering, as described in docs/method.md (reference for the LUT)."""
    seg = segments.astype(np.int64).copy()
    ids = list(np.unique(seg))
    top = max(ids)
    seg[seg == 0] = top + 1
    ids.append(top)
    seg = seg * mask.astype(np.int64)
    out = np.zeros(seg.shape, dtype=np.int64)
    counter = 1
    for v in ids:
        if v == 0:
            continue
        out[seg == v] = counter
        counter += 1
    return out


# ---------------------------------------------------------------- body mask
def test_body_mask_threshold_is_strict() -> None:
    img = np.array([[50.0001, 50.0002, 50.0002],
                    [0.0, 50.0002, 49.0],
                    [0.0, 0.0, 0.0]])
    expected = np.array([[0, 1, 1],
                         [0, 1, 0],
                         [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(body_mask(img, MR_THRESHOLD), expected)


def test_body_mask_keeps_largest_8_connected_component() -> None:
    img = np.zeros((8, 8))
    img[0:2, 0:2] = 100  # two 2x2 squares touching at a corner: 8 pixels when 8-connected
    img[2:4, 2:4] = 100
    img[5:8, 5:7] = 100  # a 3x2 block: 6 pixels, larger than either square alone
    expected = np.zeros((8, 8), dtype=bool)
    expected[0:2, 0:2] = True
    expected[2:4, 2:4] = True
    np.testing.assert_array_equal(body_mask(img, 1e-4), expected)


def test_body_mask_fills_enclosed_holes_only() -> None:
    img = np.zeros((7, 9))
    img[1:6, 1:6] = 100
    img[3, 3] = 0  # enclosed hole: filled
    img[2:4, 5] = 0  # notch on the block's right edge, open to the outside -> stays empty
    mask = body_mask(img, 1e-4)
    assert mask[3, 3]
    assert not mask[2, 5] and not mask[3, 5]
    assert mask.sum() == 25 - 2
    assert mask.dtype == bool


def test_body_mask_empty_slice() -> None:
    mask = body_mask(np.full((5, 5), 50.0), MR_THRESHOLD)
    assert mask.dtype == bool and not mask.any()


# ---------------------------------------------------------------- Felzenszwalb
def test_felzenszwalb_integer_input_uses_raw_intensities() -> None:
    rng = np.random.default_rng(0)
    img = phantom_volume(rng, z=1)[0]
    as_int = np.rint(img).astype(np.int16)
    np.testing.assert_array_equal(felzenszwalb_slice(as_int, min_size=50),
                                  felzenszwalb_slice(as_int.astype(np.float64), min_size=50))


def test_scale_params_middle_and_unknown() -> None:
    assert scale_params("MIDDLE") == {"scale": 1.0, "sigma": 1.0, "min_size": 400}
    with pytest.raises(ValueError, match="not implemented"):
        scale_params("FINE")


# ---------------------------------------------------------------- relabelling, hand-worked example
# Segment 0 meets the body at (0, 1); segment 2 lies wholly outside the body; the top id is m = 5.
SEGMENTS = np.array([[0, 0, 1, 1, 2],
                     [0, 3, 3, 1, 2],
                     [4, 4, 3, 5, 5],
                     [4, 4, 5, 5, 5]])
MASK = np.array([[0, 1, 1, 1, 0],
                 [0, 1, 1, 1, 0],
                 [1, 1, 1, 1, 1],
                 [0, 0, 1, 1, 1]], dtype=bool)


def test_relabel_legacy_hand_worked() -> None:
    # List walked: [0, 1, 2, 3, 4, 5, 5]. 0 skipped; 1->1; 2->2 (no pixel inside: id 2 empty); 3->3; 4->4;
    # 5->5, then the second 5 rewrites the same pixels to 6 (id 5 empty). Former segment 0 (moved to 6,
    # never listed) -> 0, so its in-body pixel (0, 1) is 0.
    expected = np.array([[0, 0, 1, 1, 0],
                         [0, 3, 3, 1, 0],
                         [4, 4, 3, 6, 6],
                         [0, 0, 6, 6, 6]], dtype=np.int32)
    out = relabel_legacy(SEGMENTS, MASK)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(walk_legacy(SEGMENTS, MASK), expected)


def test_relabel_compact_hand_worked() -> None:
    # In-body segments 0, 1, 3, 4, 5 -> 1, 2, 3, 4, 5.
    expected = np.array([[0, 1, 2, 2, 0],
                         [0, 3, 3, 2, 0],
                         [4, 4, 3, 5, 5],
                         [0, 0, 5, 5, 5]], dtype=np.int32)
    out = relabel_compact(SEGMENTS, MASK)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected)


def test_relabel_legacy_counts_positions_not_values() -> None:
    # Non-contiguous ids {0, 2, 7}: list [0, 2, 7, 7] -> 2 gets 1, 7 gets 2 then 3.
    seg = np.array([[0, 2, 7], [2, 7, 7]])
    mask = np.ones_like(seg, dtype=bool)
    np.testing.assert_array_equal(relabel_legacy(seg, mask), [[0, 1, 3], [1, 3, 3]])


def test_relabel_legacy_single_segment_is_empty() -> None:
    seg = np.zeros((3, 3), dtype=np.int64)
    assert not relabel_legacy(seg, np.ones((3, 3), bool)).any()


def test_relabel_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        relabel_compact(SEGMENTS, MASK[:2])
    with pytest.raises(ValueError, match="integer"):
        relabel_legacy(SEGMENTS.astype(float), MASK)


# ---------------------------------------------------------------- realistic slices
@pytest.fixture(scope="module")
def slice_and_segments() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = phantom_volume(np.random.default_rng(1), z=1)[0]
    return img, felzenszwalb_slice(img, min_size=50), body_mask(img, MR_THRESHOLD)


def test_relabel_compact_realistic(slice_and_segments: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, seg, mask = slice_and_segments
    out = relabel_compact(seg, mask)
    k = int(out.max())
    assert k >= 3
    np.testing.assert_array_equal(np.unique(out[mask]), np.arange(1, k + 1))  # contiguous, no empty id
    assert not out[~mask].any()
    # Same partition of the body as the Felzenszwalb segments, ids in increasing segment order.
    pairs = np.unique(np.stack([seg[mask], out[mask]]), axis=1)
    assert pairs.shape[1] == k
    assert np.all(np.diff(pairs[0]) > 0) and np.all(np.diff(pairs[1]) > 0)


def test_relabel_legacy_realistic_matches_walk(slice_and_segments: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, seg, mask = slice_and_segments
    out = relabel_legacy(seg, mask)
    np.testing.assert_array_equal(out, walk_legacy(seg, mask))
    top = int(seg.max())
    assert not out[~mask].any()
    assert not (out == top).any()  # the top id is always left empty
    assert (out == top + 1).any() == bool(mask[seg == top].any())


def test_superpixel_volume_per_slice() -> None:
    vol = phantom_volume(np.random.default_rng(2), z=3)
    for legacy in (False, True):
        superpix, fgmask = superpixel_volume(vol, MR_THRESHOLD, legacy=legacy, min_size=50)
        assert superpix.shape == fgmask.shape == vol.shape
        assert superpix.dtype == np.int32 and fgmask.dtype == np.uint8
        assert set(np.unique(fgmask)) == {0, 1}
        assert not superpix[fgmask == 0].any()
        for z in range(vol.shape[0]):
            ids, mask = superpixel_slice(vol[z], MR_THRESHOLD, legacy=legacy, min_size=50)
            np.testing.assert_array_equal(superpix[z], ids)
            np.testing.assert_array_equal(fgmask[z], mask)
    with pytest.raises(ValueError, match="Z, H, W"):
        superpixel_volume(vol[0], MR_THRESHOLD)
