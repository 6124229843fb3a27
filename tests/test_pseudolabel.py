"""Tests of data_preprocessing.pseudolabel: written files, geometry, worker-count invariance, CLI errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from data_preprocessing.pseudolabel import generate_pseudolabels, main
from data_preprocessing.superpixels import superpixel_volume
from dataloaders.dataset_info import get_dataset_info
from dataloaders.niftiio import Geometry, fgmask_path, image_path, read_volume, superpix_path, write_volume

REPO = Path(__file__).resolve().parent.parent
GEOMETRY = Geometry(spacing=(1.25, 1.25, 7.7), origin=(12.5, -30.0, 4.0),
                    direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
SCANS = (0, 3)


def phantom_volume(rng: np.random.Generator, z: int = 3, size: int = 64) -> np.ndarray:
    """(Z, size, size) float32 MR-like volume: noisy air below 50, a body ellipse with smooth organs above 50."""
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.47 * size)) ** 2 <= 1.0
    vol = np.empty((z, size, size), dtype=np.float32)
    for k in range(z):
        organs = ndimage.gaussian_filter(rng.random((size, size)), sigma=size / 12)
        organs = (organs - organs.min()) / (np.ptp(organs) + 1e-9)
        inside = 80.0 + 300.0 * organs + rng.normal(0.0, 8.0, (size, size))
        vol[k] = np.where(body, np.maximum(inside, 55.0), rng.uniform(0.0, 20.0, (size, size)))
    return vol


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with image_0 and image_3 (3 slices of 64x64 each), non-trivial geometry."""
    root = tmp_path_factory.mktemp("phantom")
    rng = np.random.default_rng(7)
    for sid in SCANS:
        write_volume(phantom_volume(rng), image_path(root, sid), geometry=GEOMETRY)
    return root


def copy_images(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for sid in SCANS:
        shutil.copy(image_path(src, sid), image_path(dst, sid))
    return dst


def test_files_geometry_dtype_and_content(phantom_dir: Path, tmp_path: Path) -> None:
    data = copy_images(phantom_dir, tmp_path / "d")
    info = get_dataset_info("PHANTOM")
    written = generate_pseudolabels(data, info, workers=1, progress=False)
    assert written == [p for sid in SCANS for p in (superpix_path(data, sid), fgmask_path(data, sid))]
    for sid in SCANS:
        image, _ = read_volume(image_path(data, sid))
        want_sp, want_mask = superpixel_volume(image, info.body_threshold)  # mode MIDDLE
        sp_img = sitk.ReadImage(str(superpix_path(data, sid)))
        mask_img = sitk.ReadImage(str(fgmask_path(data, sid)))
        assert sp_img.GetPixelID() == sitk.sitkInt32
        assert mask_img.GetPixelID() == sitk.sitkUInt8
        for img in (sp_img, mask_img):
            assert GEOMETRY.mismatch(Geometry.of(img)) is None
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sp_img), want_sp)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask_img), want_mask)
        assert want_sp.max() >= 2 and want_mask.any()


def test_byte_identical_for_any_worker_count(phantom_dir: Path, tmp_path: Path) -> None:
    info = get_dataset_info("PHANTOM")
    one = copy_images(phantom_dir, tmp_path / "one")
    two = copy_images(phantom_dir, tmp_path / "two")
    paths_one = generate_pseudolabels(one, info, workers=1, legacy=True, progress=False)
    paths_two = generate_pseudolabels(two, info, workers=2, legacy=True, progress=False)
    assert len(paths_one) == len(paths_two) == 2 * len(SCANS)
    for a, b in zip(paths_one, paths_two, strict=True):
        assert a.name == b.name
        assert a.read_bytes() == b.read_bytes()
    image, _ = read_volume(image_path(one, 3))
    sp, _ = read_volume(superpix_path(one, 3))
    np.testing.assert_array_equal(sp, superpixel_volume(image, info.body_threshold, legacy=True)[0])


def test_byte_identical_whole_scan_path(tmp_path: Path) -> None:
    """With at least 2 scans per worker, each worker writes whole scans: still the same bytes as one process."""
    info = get_dataset_info("PHANTOM")
    rng = np.random.default_rng(11)
    dirs = [tmp_path / "one", tmp_path / "two"]
    for d in dirs:
        d.mkdir()
    for sid in range(5):
        vol = phantom_volume(rng, z=2)
        for d in dirs:
            write_volume(vol, image_path(d, sid), geometry=GEOMETRY)
    paths_one = generate_pseudolabels(dirs[0], info, workers=1, progress=False)
    paths_two = generate_pseudolabels(dirs[1], info, workers=2, progress=False)
    assert len(paths_one) == len(paths_two) == 10
    for a, b in zip(paths_one, paths_two, strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_scan_subset_and_summary(phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_images(phantom_dir, tmp_path / "d")
    info = get_dataset_info("PHANTOM")
    written = generate_pseudolabels(data, info, scan_ids=[3], progress=False)
    assert written == [superpix_path(data, 3), fgmask_path(data, 3)]
    assert not superpix_path(data, 0).exists()
    assert "1 scans, 3 slices" in capsys.readouterr().out


def test_bad_arguments(phantom_dir: Path) -> None:
    info = get_dataset_info("PHANTOM")
    with pytest.raises(ValueError, match="not implemented"):
        generate_pseudolabels(phantom_dir, info, scale="FINE", progress=False)
    with pytest.raises(ValueError, match="image_5.nii.gz"):
        generate_pseudolabels(phantom_dir, info, scan_ids=[5], progress=False)


def test_cli_writes_requested_scan(phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_images(phantom_dir, tmp_path / "d")
    rc = main(["--data-dir", str(data), "--dataset", "PHANTOM", "--workers", "1", "--scans", "0", "--parity"])
    assert rc == 0
    assert superpix_path(data, 0).is_file() and fgmask_path(data, 0).is_file()
    assert not superpix_path(data, 3).exists()
    assert "legacy ids" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["--data-dir", str(missing), "--dataset", "PHANTOM", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    tmp_path.joinpath("empty").mkdir()
    assert main(["--data-dir", str(tmp_path / "empty"), "--dataset", "PHANTOM"]) == 2
    assert "no image_<id>.nii.gz" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "--dataset", "NO_SUCH_SET"]) == 2
    assert "unknown dataset 'NO_SUCH_SET'" in capsys.readouterr().err


def test_module_entry_point_missing_folder(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "data_preprocessing.pseudolabel", "--data-dir", str(tmp_path / "nowhere"),
         "--dataset", "PHANTOM"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data directory not found" in proc.stderr and "Traceback" not in proc.stderr
