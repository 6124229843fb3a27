"""Load-time normalisation: CT global statistics, MR per-volume z-score, serialisation, input format."""

import json

import numpy as np
import pytest
import torch

from dataloaders import niftiio
from dataloaders.normalization import (
    STD_FLOOR,
    Normalizer,
    ct_stats,
    fit_normalizer,
    normalizer_from_scans,
    resize_slices,
    to_three_channels,
)


def _volumes() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(0, 255, size=s).astype(np.float32) for s in [(3, 5, 4), (2, 6, 6), (4, 3, 3)]]


def test_ct_stats_equal_hand_computed() -> None:
    vols = _volumes()
    flat = np.concatenate([v.ravel().astype(np.float64) for v in vols])
    mean, std = ct_stats(vols)
    assert mean == pytest.approx(flat.mean(), rel=1e-12)
    assert std == pytest.approx(flat.std(), rel=1e-12)
    assert ct_stats([np.array([1.0, 3.0]), np.array([5.0])]) == pytest.approx((3.0, np.sqrt(8 / 3)))
    with pytest.raises(ValueError, match="no voxels"):
        ct_stats([])


def test_global_normalizer_uses_training_stats() -> None:
    vols = _volumes()
    norm = fit_normalizer("CT", vols, scan_ids=[4, 7, 9])
    assert norm.kind == "global" and norm.scan_ids == (4, 7, 9)
    other = np.full((2, 2, 2), 100.0, np.float32)
    out = norm(other)
    assert out.dtype == np.float32
    assert np.allclose(out, (100.0 - norm.mean) / norm.std)
    with pytest.raises(ValueError, match="training volumes"):
        fit_normalizer("CT")


def test_mr_per_volume_zscore_and_constant_volume() -> None:
    v = _volumes()[1] * 3 + 50
    norm = fit_normalizer("MR")
    out = norm(v)
    expected = (v.astype(np.float64) - v.mean(dtype=np.float64)) / v.std(dtype=np.float64)
    assert out.dtype == np.float32 and np.allclose(out, expected, atol=1e-5)
    assert abs(out.mean()) < 1e-5 and out.std() == pytest.approx(1.0, abs=1e-5)
    const = norm(np.full((2, 3, 3), 7.0))
    assert np.all(const == 0) and np.all(np.isfinite(const))
    flat = Normalizer("global", 5.0, 0.0)(np.array([5.0, 6.0]))
    assert np.allclose(flat, [0.0, 1.0 / STD_FLOOR])  # the std floor avoids /0


def test_normalizer_dict_roundtrip_through_json() -> None:
    norm = Normalizer("global", 101.5, 42.25, (1, 2))
    again = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm
    assert Normalizer.from_dict(Normalizer("per_volume").to_dict()) == Normalizer("per_volume")
    with pytest.raises(KeyError, match="unknown keys"):
        Normalizer.from_dict({"kind": "global", "mean": 0, "std": 1, "fold": 2})
    with pytest.raises(ValueError, match="kind"):
        Normalizer("zscore")
    with pytest.raises(ValueError, match="needs mean and std"):
        Normalizer("global", 1.0)


def test_normalizer_from_scans_reads_images(tmp_path) -> None:
    vols = _volumes()[:2]
    geom = niftiio.Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    for sid, v in zip((3, 8), vols, strict=True):
        niftiio.write_volume(v, niftiio.image_path(tmp_path, sid), geom)
    norm = normalizer_from_scans(tmp_path, "CT", [3, 8], progress=False)
    assert (norm.mean, norm.std) == pytest.approx(ct_stats(vols)) and norm.scan_ids == (3, 8)
    assert normalizer_from_scans(tmp_path, "MR", [3], progress=False) == Normalizer("per_volume")


def test_resize_slices_by_hand() -> None:
    v = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    # 4 -> 2, bilinear, align_corners=False: output pixel i samples input position 2i + 0.5, the mean of 2i, 2i+1
    small = resize_slices(v, 2, "image")
    want = v.reshape(2, 2, 2, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(small, want, rtol=0, atol=1e-6)
    ids = np.arange(2 * 4 * 4, dtype=np.int32).reshape(2, 4, 4)
    # nearest-exact: output pixel i takes input pixel floor((i + 0.5) * 2) = 2i + 1; dtype kept, no new id
    np.testing.assert_array_equal(resize_slices(ids, 2, "ids"), ids[:, 1::2, 1::2])
    assert resize_slices(ids, 2, "ids").dtype == np.int32
    assert resize_slices(v, 4, "image") is v  # already the right size: untouched
    with pytest.raises(ValueError, match="kind must be 'image' or 'ids'"):
        resize_slices(v, 2, "label")


def test_to_three_channels_numpy_and_torch() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = to_three_channels(x)
    assert y.shape == (3, 3, 4) and all(np.array_equal(y[c], x) for c in range(3))
    stack = np.stack([x, x + 1])
    ys = to_three_channels(stack)
    assert ys.shape == (2, 3, 3, 4) and np.array_equal(ys[1, 2], x + 1) and ys.flags.c_contiguous
    t = to_three_channels(torch.from_numpy(stack))
    assert isinstance(t, torch.Tensor) and t.shape == (2, 3, 3, 4) and t.is_contiguous()
    assert torch.equal(t[0, 1], torch.from_numpy(x))
    with pytest.raises(ValueError, match="expects"):
        to_three_channels(np.zeros((1, 2, 3, 4)))
