"""3D supervoxel episodes (``superpix_dim=3``): dataloaders.supervoxel_dataset and its training wiring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_preprocessing.pseudolabel import generate_supervoxels
from dataloaders.dataset_info import get_dataset_info
from dataloaders.niftiio import DataFormatError, label_path, read_label_volume, supervox_path
from dataloaders.supervoxel_dataset import SupervoxelEpisodeDataset, default_min_support_pixels
from tests.reliability_fixtures import TINY, TINY32, cli, copy_data, files_under
from util.checkpoint import load_checkpoint
from util.cli import EXIT_USER_ERROR

TRAIN = [0, 1, 5]  # fold 2 of the tiny phantom (TINY): queries [2, 3], support [4]
INFO = get_dataset_info("PHANTOM")


@pytest.fixture(scope="module")
def sv_data(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny phantom with 3D supervoxels of its training scans (mean size 312 voxels = 5000 at 256 x 256)."""
    data = copy_data(tiny_phantom, tmp_path_factory.mktemp("sv") / "data")
    generate_supervoxels(data, INFO, workers=1, n_sv=312, scan_ids=TRAIN, progress=False)
    return data


def _dataset(data: Path, **kwargs) -> SupervoxelEpisodeDataset:
    args = {"seed": 5, "input_size": 64, "n_episodes": 400, "aug": "identity", "progress": False, **kwargs}
    return SupervoxelEpisodeDataset(data, INFO, TRAIN, **args)


def test_support_and_query_are_different_slices_of_the_supervoxel(sv_data: Path) -> None:
    ds = _dataset(sv_data)
    vols = {sid: read_label_volume(supervox_path(sv_data, sid))[0] for sid in TRAIN}  # read independently
    assert ds.min_support_pixels == default_min_support_pixels(64) == 12  # 200 * (64/256)^2 = 12.5
    for i in range(40):
        ep, meta = ds[i], ds.get_meta(i)
        (zs,), (zq,) = meta.support_z, meta.query_z
        assert abs(zs - zq) == 1  # two different, neighbouring slices
        assert (ep["scan_id"], ep["z_id"], ep["query_z_id"], ep["superpix_id"]) == (meta.scan_id, zs, zq,
                                                                                   meta.supervoxel_id)
        vol = vols[meta.scan_id]
        support = vol[zs] == meta.supervoxel_id
        query = vol[zq] == meta.supervoxel_id
        # identity augmentation: the masks are the supervoxel's cross-sections, voxel for voxel
        assert torch.equal(ep["support_fg"][0], torch.from_numpy(support.astype(np.float32)))
        assert torch.equal(ep["support_bg"][0], 1 - ep["support_fg"][0])
        assert torch.equal(ep["query_labels"][0], torch.from_numpy(query.astype(np.int64)))
        assert support.sum() >= ds.min_support_pixels and query.sum() >= 1
        assert meta.support_pixels == (int(support.sum()),) and meta.query_pixels == (int(query.sum()),)
        assert not torch.equal(ep["support_images"], ep["query_images"])
    directions = {np.sign(ds.get_meta(i).query_z[0] - ds.get_meta(i).support_z[0]) for i in range(40)}
    assert directions == {-1, 1}  # support above and below the query both occur


def test_episode_is_a_pure_function_of_seed_and_index(sv_data: Path) -> None:
    a = _dataset(sv_data, aug="sabs_aug")
    b = _dataset(sv_data, aug="sabs_aug")
    for i in (9, 3, 0, 3):  # any order, repeated
        ea, eb = a[i], b[i]
        for key in ("support_images", "support_fg", "query_images", "query_labels"):
            assert torch.equal(ea[key], eb[key]), (i, key)
    n_units = a.unit_scan.size
    first_pass = {(a.get_meta(i).scan_id, a.get_meta(i).supervoxel_id) for i in range(n_units)}
    assert len(first_pass) == n_units  # every usable supervoxel exactly once per pass
    other = _dataset(sv_data, seed=6)
    assert [a.get_meta(i) for i in range(10)] != [other.get_meta(i) for i in range(10)]


def test_setting2_exclusion_holds_for_support_and_query(sv_data: Path) -> None:
    labels = {sid: read_label_volume(label_path(sv_data, sid))[0] for sid in TRAIN}

    def kidney(sid: int, z: int) -> bool:
        return bool(np.isin(labels[sid][z], [2, 3]).any())

    s1 = _dataset(sv_data)
    touched = [m for m in map(s1.get_meta, range(400)) if any(kidney(m.scan_id, z) for z in m.support_z + m.query_z)]
    assert touched, "setting 1 never shows a kidney slice: the exclusion test below would be vacuous"
    s2 = _dataset(sv_data, exclude_classes=[2, 3])
    for i in range(400):
        m = s2.get_meta(i)
        assert not any(kidney(m.scan_id, z) for z in m.support_z + m.query_z), m
    assert s2.training_statistics()["n_usable_supervoxels"] < s1.training_statistics()["n_usable_supervoxels"]


def test_missing_supervoxels_name_the_file_and_the_command(tiny_phantom: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")  # 2D superpixels only
    with pytest.raises(DataFormatError, match=r"supervox-MIDDLE_0\.nii\.gz: supervoxel file missing .*--dim 3"):
        _dataset(data)
    code = cli("training.py", [*TINY, f"data_dir={data}", "superpix_dim=3", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert f"{supervox_path(data, 0)}: supervoxel file missing for scan 0 (and scans [1, 5])" in err
    assert f"python -m data_preprocessing.pseudolabel --data-dir {data} --dataset PHANTOM --dim 3" in err


def test_training_runs_with_superpix_dim_3(sv_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    two_steps = [u for u in TINY32 if not u.startswith(("n_steps=", "lr_milestones="))] + ["n_steps=2",
                                                                                          "lr_milestones=[1]"]
    assert cli("training.py", [*two_steps, f"data_dir={sv_data}", "superpix_dim=3", "setting=2",
                               f"run_dir={run}"]) == 0
    assert "snapshots/2.pth" in files_under(run)
    ckpt = load_checkpoint(run / "snapshots" / "2.pth")
    assert ckpt["config"]["superpix_dim"] == 3 and len(ckpt["train_log"]["loss"]) == 2
    record = ckpt["exclusion"]  # computed from the label files over the slices a 3D episode can show
    assert record["excluded_classes"] == [2, 3] and record["leak_free"] and record["trainable_slices"] > 0
    code = cli("training.py", [*TINY, f"data_dir={sv_data}", "superpix_dim=3", "episode_sampling=legacy",
                               f"run_dir={tmp_path / 'run2'}"])
    assert code == EXIT_USER_ERROR and "superpix_dim=3 needs episode_sampling='compact'" in capsys.readouterr().err
