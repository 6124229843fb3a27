"""3D supervoxel pseudolabels: data_preprocessing.supervoxels and ``pseudolabel --dim 3``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_preprocessing.pseudolabel import generate_supervoxels, main
from data_preprocessing.superpixels import body_mask
from data_preprocessing.supervoxels import n_segments_for, supervoxel_volume
from dataloaders.dataset_info import DatasetDescriptionError, get_dataset_info, parse_description
from dataloaders.derived import image_fingerprint, read_source_fingerprint
from dataloaders.niftiio import Geometry, fgmask_path, image_path, read_volume, supervox_path, write_volume
from dataloaders.slice_counts import slice_counts
from tests.reliability_fixtures import copy_data

MR = 50.0001  # MR body threshold


def _box(n_z: int = 8) -> np.ndarray:
    """(n_z, 24, 24) volume: a 16 x 16 body of intensity 100 in a 4-voxel frame of air (0)."""
    img = np.zeros((n_z, 24, 24), np.float32)
    img[:, 4:20, 4:20] = 100
    return img


def test_two_tissues_give_two_supervoxels_split_exactly_at_the_edge() -> None:
    img = np.zeros((8, 24, 36), np.float32)
    img[:, 4:20, 4:18] = 100  # left tissue
    img[:, 4:20, 18:32] = 200  # right tissue
    body = 8 * 16 * 28
    sv, mask = supervoxel_volume(img, (1.0, 1.0, 1.0), MR, n_sv=body // 2)
    assert sv.dtype == np.int32 and mask.dtype == np.uint8
    assert np.array_equal(mask.astype(bool), img > MR)
    assert (sv[img <= MR] == 0).all()
    left, right = sv[0, 4, 4], sv[0, 4, 31]
    assert {int(left), int(right)} == {1, 2}
    assert (sv[:, 4:20, 4:18] == left).all() and (sv[:, 4:20, 18:32] == right).all()


def test_spacing_is_read_as_z_y_x_in_mm() -> None:
    # one uniform 8 x 16 x 16 body, two supervoxels: with 4 mm slices the body is 32 mm long in z, so it splits
    # between slices 3 and 4; with 1 mm slices it is 8 mm thick and splits in-plane (every slice holds both)
    thick, _ = supervoxel_volume(_box(), (4.0, 1.0, 1.0), MR, n_sv=1024)
    assert [np.unique(thick[z][thick[z] > 0]).tolist() for z in range(8)] == [[1]] * 4 + [[2]] * 4
    thin, _ = supervoxel_volume(_box(), (1.0, 1.0, 1.0), MR, n_sv=1024)
    assert all(np.unique(thin[z][thin[z] > 0]).tolist() == [1, 2] for z in range(8))


def test_empty_body_and_bad_arguments() -> None:
    sv, mask = supervoxel_volume(np.zeros((3, 8, 8), np.float32), (1, 1, 1), MR)
    assert not sv.any() and not mask.any()
    with pytest.raises(ValueError, match="spacing"):
        supervoxel_volume(_box(), (1.0, 1.0), MR)
    with pytest.raises(ValueError, match="compactness"):
        supervoxel_volume(_box(), (1, 1, 1), MR, compactness=0)
    with pytest.raises(ValueError, match="n_sv"):
        supervoxel_volume(_box(), (1, 1, 1), MR, n_sv=0)
    with pytest.raises(ValueError, match="volume"):
        supervoxel_volume(_box()[0], (1, 1, 1), MR)
    assert n_segments_for(10_000, 5000) == 2 and n_segments_for(2_400, 5000) == 1 and n_segments_for(0, 10) == 1


def test_cli_writes_supervox_files_on_the_image_grid(tmp_path: Path) -> None:
    geom = Geometry((1.0, 1.0, 4.0), (-11.5, 3.0, 40.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_volume(_box(), image_path(tmp_path, 0), geometry=geom)
    assert main(["--data-dir", str(tmp_path), "--dataset", "PHANTOM", "--dim", "3", "--n-sv", "1024",
                 "--workers", "1"]) == 0
    out = supervox_path(tmp_path, 0)
    ids, sgeom = read_volume(out)
    img = sitk.ReadImage(str(image_path(tmp_path, 0)))
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == img.GetSize() and written.GetSpacing() == img.GetSpacing()
    assert written.GetOrigin() == img.GetOrigin() and written.GetDirection() == img.GetDirection()
    assert sitk.GetArrayViewFromImage(written).dtype.kind in "iu"
    # SimpleITK spacing (x, y, z) = (1, 1, 4) reaches SLIC as (z, y, x) = (4, 1, 1): the z split of the test above
    assert [np.unique(ids[z][ids[z] > 0]).tolist() for z in range(8)] == [[1]] * 4 + [[2]] * 4
    assert read_source_fingerprint(out) == image_fingerprint(*read_volume(image_path(tmp_path, 0)))
    assert not fgmask_path(tmp_path, 0).exists() and not list(tmp_path.glob("superpix-*"))  # 3D files only


def test_phantom_supervoxels_inside_body_compact_and_sized(tiny_phantom: Path, tmp_path: Path) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    info = get_dataset_info("PHANTOM")
    n_sv = 312  # 5000 * (64/256)^2: the registry's size at the tiny phantom's 4x coarser in-plane pixels
    generate_supervoxels(data, info, workers=1, n_sv=n_sv, scan_ids=[0, 1], progress=False)
    for sid in (0, 1):
        ids, _ = read_volume(supervox_path(data, sid))
        image, _ = read_volume(image_path(data, sid))
        body = np.stack([body_mask(s, info.body_threshold) for s in image])
        fgmask, _ = read_volume(fgmask_path(data, sid))  # the 2D pipeline's body mask: the same definition
        assert np.array_equal(ids > 0, body) and np.array_equal(body, fgmask > 0)
        k = int(ids.max())
        assert np.array_equal(np.unique(ids), np.arange(k + 1))  # compact: 0..K, every id present
        requested = n_segments_for(int(body.sum()), n_sv)
        assert 0.5 * requested <= k <= 1.5 * requested, (k, requested)
        sizes = np.bincount(ids[ids > 0])[1:]
        assert 0.5 * n_sv <= np.median(sizes) <= 2 * n_sv
        spans = (slice_counts(ids)[:, 1:] > 0).sum(axis=0)
        assert np.median(spans) >= 2  # supervoxels cross slices: 3D episodes have neighbours to pair


def test_output_identical_for_any_worker_count(tiny_phantom: Path, tmp_path: Path) -> None:
    info = get_dataset_info("PHANTOM")
    one = copy_data(tiny_phantom, tmp_path / "one")
    two = copy_data(tiny_phantom, tmp_path / "two")
    scans = [0, 1, 5]
    generate_supervoxels(one, info, workers=1, n_sv=312, scan_ids=scans, progress=False)
    generate_supervoxels(two, info, workers=2, n_sv=312, scan_ids=scans, progress=False)
    for sid in scans:
        a, ga = read_volume(supervox_path(one, sid))
        b, gb = read_volume(supervox_path(two, sid))
        assert np.array_equal(a, b) and ga == gb
        assert read_source_fingerprint(supervox_path(one, sid)) == read_source_fingerprint(supervox_path(two, sid))


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, message in ((["--dim", "3", "--parity"], "error: --parity"),
                          (["--n-sv", "100"], "error: --n-sv and --compactness apply to --dim 3 only"),
                          (["--dim", "3", "--compactness", "0"], "error: argument --compactness: must be > 0")):
        with pytest.raises(SystemExit) as stop:
            main(["--data-dir", str(tmp_path), "--dataset", "PHANTOM", *args])
        assert stop.value.code == 2 and capsys.readouterr().err.startswith(message)
    assert main(["--data-dir", str(tmp_path / "none"), "--dataset", "PHANTOM", "--dim", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_registry_sizes(tiny_phantom: Path) -> None:
    # the generated phantom's own description keeps the ~60 cm3 size at its 64 x 64 grid: 5000 * (64/256)^2
    assert get_dataset_info(tiny_phantom / "dataset.json5").n_sv == 312
    assert get_dataset_info("CHAOST2").n_sv == 5000 and get_dataset_info("SABS").n_sv == 5000
    assert get_dataset_info("CMR").n_sv == 1000 and get_dataset_info("PHANTOM").n_sv == 5000
    raw = {"name": "X", "modality": "MR", "labels": {"0": "BG", "1": "A"}}
    assert parse_description(raw, Path("x.json5")).n_sv == 5000
    assert parse_description({**raw, "n_sv": 300}, Path("x.json5")).n_sv == 300
    with pytest.raises(DatasetDescriptionError, match="x.json5: 'n_sv' must be a positive integer"):
        parse_description({**raw, "n_sv": 0}, Path("x.json5"))
