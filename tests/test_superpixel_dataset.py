"""Superpixel episodes: masks from the drawn superpixel, setting-2 exclusion rules, determinism, legacy sampling."""

import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from dataloaders.normalization import Normalizer
from dataloaders.superpixel_dataset import SuperpixelEpisodeDataset

INFO = get_dataset_info("PHANTOM")  # MR, labels 0 BG, 1 LIVER, 2 RK, 3 LK, 4 SPLEEN
SCANS = [0, 1, 2]
N_Z, SIZE = 6, 64
# class -> (slices holding it, square block [a:b, a:b]); RK and LK share slice 3 only
BLOCKS = {1: ({1, 2}, (10, 20)), 2: ({2, 3}, (30, 40)), 3: ({3, 4}, (44, 52)), 4: ({5}, (20, 28))}
GEOM = niftiio.Geometry((1.5, 1.5, 4.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
LEGACY_LUT = np.array([0, 1, 3, 5, 5])  # legacy-style ids with gaps: {1, 3, 5} present, 2 and 4 empty


def _volumes(sid: int, legacy: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + sid)
    image = (rng.uniform(100, 200, (N_Z, SIZE, SIZE)) + 20 * np.arange(N_Z)[:, None, None] + 5 * sid).astype(
        np.float32)
    label = np.zeros((N_Z, SIZE, SIZE), np.uint8)
    for c, (zs, (a, b)) in BLOCKS.items():
        for z in zs:
            label[z, a:b, a:b] = c
    sp = np.zeros((N_Z, SIZE, SIZE), np.int32)
    for z in range(N_Z):
        if sid == 0 and z == 0:
            continue  # one slice without superpixels
        for q, (r, c) in enumerate([(8, 8), (8, 32), (32, 8), (32, 32)]):  # four 24x24 quadrants of the body
            sp[z, r:r + 24, c:c + 24] = (q + z + sid) % 4 + 1
    if legacy:
        sp = LEGACY_LUT[sp]
    return image, label, sp


def _make_data(root: Path, legacy: bool = False, classmap: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cmap: dict[str, dict[str, list[int]]] = {name: {} for name in INFO.labels.values()}
    for sid in SCANS:
        image, label, sp = _volumes(sid, legacy)
        niftiio.write_volume(image, niftiio.image_path(root, sid), GEOM)
        niftiio.write_volume(label, niftiio.label_path(root, sid), GEOM)
        niftiio.write_volume(sp, niftiio.superpix_path(root, sid), GEOM)
        for c, name in INFO.labels.items():
            cmap[name][str(sid)] = [z for z in range(N_Z) if np.any(label[z] == c)]
    if classmap:
        niftiio.write_json(cmap, niftiio.classmap_path(root))
    return root


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_data(tmp_path_factory.mktemp("compact"))


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_data(tmp_path_factory.mktemp("legacy"), legacy=True)


def _ds(data_dir: Path, **kw) -> SuperpixelEpisodeDataset:
    args = {"info": INFO, "scan_ids": SCANS, "input_size": SIZE, "n_episodes": 40, "seed": 1, "progress": False}
    args.update(kw)
    return SuperpixelEpisodeDataset(data_dir, **args)


def test_unaugmented_episode_is_the_drawn_superpixel_of_the_slice(compact_dir: Path) -> None:
    ds = _ds(compact_dir, aug="identity")
    for idx in range(len(ds)):
        sample, meta = ds[idx], ds.get_meta(idx)
        assert (sample["scan_id"], sample["z_id"], sample["superpix_id"], sample["index"]) == (
            meta.scan_id, meta.z, meta.superpix_id, idx)
        image, _, sp = _volumes(meta.scan_id, legacy=False)
        mask = torch.from_numpy((sp[meta.z] == meta.superpix_id).astype(np.float32))
        assert mask.sum() == meta.fg_pixels == 24 * 24
        assert torch.equal(sample["support_fg"][0], mask) and torch.equal(sample["support_bg"][0], 1 - mask)
        assert torch.equal(sample["query_labels"][0], mask.long())
        norm = (image[meta.z] - image.mean(dtype=np.float64)) / image.std(dtype=np.float64)  # MR: per volume
        for key in ("support_images", "query_images"):
            assert sample[key].shape == (1, 3, SIZE, SIZE) and sample[key].dtype == torch.float32
            for ch in range(3):
                assert np.allclose(sample[key][0, ch].numpy(), norm, atol=1e-5)


def test_augmented_episodes_binary_nonempty_and_independent_views(compact_dir: Path) -> None:
    ds = _ds(compact_dir, n_episodes=12)
    for idx in range(len(ds)):
        s = ds[idx]
        assert s["support_fg"].shape == (1, SIZE, SIZE) and s["support_fg"].dtype == torch.float32
        assert s["query_labels"].shape == (1, SIZE, SIZE) and s["query_labels"].dtype == torch.int64
        assert set(s["support_fg"].unique().tolist()) <= {0.0, 1.0}
        assert set(s["query_labels"].unique().tolist()) <= {0, 1}
        assert torch.equal(s["support_bg"], 1 - s["support_fg"])
        assert ds.get_meta(idx).fg_pixels > 0 and s["support_fg"].sum() > 0 and s["query_labels"].sum() > 0
        assert not torch.equal(s["support_images"], s["query_images"])  # two independent augmentations
        # support and query come from the same 24x24 superpixel: similar foreground areas
        assert 0.5 < s["support_fg"].sum() / s["query_labels"].sum() < 2.0


def test_each_pass_visits_every_eligible_slice_once(compact_dir: Path) -> None:
    ds = _ds(compact_dir, aug="identity", n_episodes=34)
    eligible = {(s, z) for s in SCANS for z in range(N_Z)} - {(0, 0)}
    assert ds.training_statistics()["n_eligible_slices"] == len(eligible) == 17
    first = [(m.scan_id, m.z) for m in map(ds.get_meta, range(17))]
    second = [(m.scan_id, m.z) for m in map(ds.get_meta, range(17, 34))]
    assert set(first) == set(second) == eligible and len(set(first)) == 17
    assert first != second


def _label_holds(scan_id: int, z: int, classes: list[int]) -> list[bool]:
    _, label, _ = _volumes(scan_id, legacy=False)
    return [bool(np.any(label[z] == c)) for c in classes]


@pytest.mark.parametrize("sampling", ["compact", "legacy"])
def test_setting2_any_drops_every_slice_with_any_excluded_class(compact_dir: Path, sampling: str) -> None:
    ds = _ds(compact_dir, exclude_classes=[2, 3], exclusion_rule="any", episode_sampling=sampling, n_episodes=150)
    stats = ds.training_statistics()
    assert stats["n_excluded_slices"] == 9 and stats["excluded_slices_per_class"] == {"RK": 6, "LK": 6}
    assert stats["n_eligible_slices"] == 8 and stats["n_empty_slices"] == 1
    seen = Counter()
    for idx in range(len(ds)):
        m = ds.get_meta(idx)
        assert not any(_label_holds(m.scan_id, m.z, [2, 3])), (m.scan_id, m.z)  # checked on the label volume
        assert (m.scan_id, m.z) != (0, 0)  # the empty slice is never used
        seen[m.z] += 1
    assert set(seen) == {0, 1, 5}  # slices 2 and 4 hold only one of the two classes and are dropped too
    if sampling == "legacy":
        assert any(ds.get_meta(i).n_redirects > 0 for i in range(len(ds)))


def test_setting2_all_rule_is_leaky(compact_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ds = _ds(compact_dir, exclude_classes=[2, 3], exclusion_rule="all", n_episodes=150)
    assert "leaky" in caplog.text
    assert ds.training_statistics()["n_excluded_slices"] == 3
    zs = {ds.get_meta(idx).z for idx in range(len(ds))}
    assert 3 not in zs and {2, 4} <= zs  # slices with RK only or LK only stay in training


def test_same_seed_and_index_give_the_same_episode_for_any_worker_count(compact_dir: Path) -> None:
    ds = _ds(compact_dir, n_episodes=6)
    direct = [ds[i] for i in reversed(range(6))][::-1]  # access order does not matter
    again = _ds(compact_dir, n_episodes=6)  # a fresh (e.g. resumed) dataset
    for workers in (0, 2):
        loader = DataLoader(again, batch_size=None, shuffle=False, num_workers=workers)
        for a, b in zip(direct, loader, strict=True):
            for key in ("support_images", "support_fg", "query_images", "query_labels"):
                assert torch.equal(a[key], b[key]), (workers, key)
            assert (a["scan_id"], a["z_id"], a["superpix_id"]) == (b["scan_id"], b["z_id"], b["superpix_id"])
    assert not torch.equal(direct[0]["query_images"], direct[1]["query_images"])
    other_seed = _ds(compact_dir, n_episodes=6, seed=2)
    assert not torch.equal(direct[0]["query_images"], other_seed[0]["query_images"])


def test_legacy_ids_with_gaps_give_empty_foreground(legacy_dir: Path) -> None:
    legacy = _ds(legacy_dir, aug="identity", episode_sampling="legacy", n_episodes=60)
    metas = [legacy.get_meta(i) for i in range(len(legacy))]
    assert {m.superpix_id for m in metas} <= {1, 2, 3, 4}  # randint(1, max_id=5): the top id 5 never drawn
    empty = [m for m in metas if m.fg_pixels == 0]
    assert empty and {m.superpix_id for m in empty} <= {2, 4}
    s = legacy[empty[0].index]
    assert s["support_fg"].sum() == 0 and s["query_labels"].sum() == 0 and s["support_bg"].min() == 1
    compact = _ds(legacy_dir, aug="identity", n_episodes=60)
    ids = {compact.get_meta(i).superpix_id for i in range(len(compact))}
    assert ids == {1, 3, 5} and all(compact.get_meta(i).fg_pixels > 0 for i in range(len(compact)))


def test_legacy_empty_slice_moves_to_the_next_slice(compact_dir: Path) -> None:
    ds = _ds(compact_dir, aug="identity", episode_sampling="legacy", n_episodes=18)
    counts = Counter((m.scan_id, m.z) for m in map(ds.get_meta, range(18)))  # one pass over all 18 slices
    assert counts[(0, 0)] == 0 and counts[(0, 1)] == 2
    assert all(n == 1 for key, n in counts.items() if key != (0, 1)) and len(counts) == 17


def test_ct_normaliser_from_training_scans(compact_dir: Path) -> None:
    ds = _ds(compact_dir, info=replace(INFO, modality="CT"), scan_ids=[0, 1], aug="identity")
    raw = [_volumes(s, legacy=False)[0].astype(np.float64) for s in (0, 1)]
    flat = np.concatenate([r.ravel() for r in raw])
    assert ds.normalizer.kind == "global" and ds.normalizer.scan_ids == (0, 1)
    assert ds.normalizer.mean == pytest.approx(flat.mean()) and ds.normalizer.std == pytest.approx(flat.std())
    assert np.allclose(ds.images[1], (raw[1] - flat.mean()) / flat.std(), atol=1e-5)
    given = Normalizer("global", 150.0, 10.0)
    ds2 = _ds(compact_dir, info=replace(INFO, modality="CT"), scan_ids=[0], normalizer=given)
    assert ds2.normalizer is given and np.allclose(ds2.images[0], (raw[0] - 150.0) / 10.0, atol=1e-5)


def test_shots_queries_and_input_size(compact_dir: Path) -> None:
    s = _ds(compact_dir, n_shots=2, n_queries=3, input_size=48, n_episodes=2)[0]
    assert s["support_images"].shape == (2, 3, 48, 48) and s["support_fg"].shape == (2, 48, 48)
    assert s["query_images"].shape == (3, 3, 48, 48) and s["query_labels"].shape == (3, 48, 48)
    assert not torch.equal(s["support_images"][0], s["support_images"][1])
    # 64x64 slices with input_size 128: resized (never padded): ids by nearest pixel, i.e. each pixel doubled;
    # the image bilinearly (align_corners=False): output pixel i samples input position (i + 0.5) / 2 - 0.5
    native = _ds(compact_dir, aug="identity", input_size=64, n_episodes=2)
    big = _ds(compact_dir, aug="identity", input_size=128, n_episodes=2)
    for k in range(len(SCANS)):
        np.testing.assert_array_equal(big.superpix[k], native.superpix[k].repeat(2, axis=1).repeat(2, axis=2))
        img, out = native.images[k], big.images[k]
        assert out.shape == (img.shape[0], 128, 128)
        # pixel (1, 1) samples (0.25, 0.25): weights 0.75 / 0.25 per axis
        want = 0.75 * (0.75 * img[:, 0, 0] + 0.25 * img[:, 0, 1]) + 0.25 * (0.75 * img[:, 1, 0] + 0.25 * img[:, 1, 1])
        np.testing.assert_allclose(out[:, 1, 1], want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out[:, 0, 0], img[:, 0, 0], rtol=0, atol=1e-5)  # edge: clamped to pixel 0
    p = big[0]
    assert p["query_images"].shape == (1, 3, 128, 128)
    k = SCANS.index(p["scan_id"])
    np.testing.assert_array_equal(p["query_labels"][0].numpy(), big.superpix[k][p["z_id"]] == p["superpix_id"])


def test_errors_name_the_problem(compact_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not foreground classes"):
        _ds(compact_dir, exclude_classes=[0])
    with pytest.raises(ValueError, match="exclusion_rule"):
        _ds(compact_dir, exclusion_rule="and")
    with pytest.raises(ValueError, match="no eligible training slice"):
        _ds(compact_dir, scan_ids=[0], exclude_classes=[1, 2, 3, 4])
    with pytest.raises(IndexError):
        _ds(compact_dir, n_episodes=3)[3]
    no_map = _make_data(tmp_path / "nomap", classmap=False)
    assert len(_ds(no_map)) == 40  # setting 1 needs no class map
    with pytest.raises(niftiio.DataFormatError, match="classmap_1.json"):
        _ds(no_map, exclude_classes=[2])
    cmap = json.loads(niftiio.classmap_path(compact_dir).read_text())
    cmap["RK"]["1"] = [2, 3, 99]
    niftiio.write_json(cmap, niftiio.classmap_path(no_map))
    with pytest.raises(niftiio.DataFormatError, match="outside 0..5"):
        _ds(no_map, exclude_classes=[2])
