"""Tests for data_preprocessing/phantom.py: files, format, geometry, anatomy invariants, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_preprocessing.phantom import generate_phantom, main, save_preview, synthesize_scan
from dataloaders.dataset_info import get_dataset_info
from dataloaders.niftiio import list_scan_ids, read_volume

SIZE, NZ = (64, (12, 14))


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    ids = generate_phantom(out, n_scans=2, seed=3, size=SIZE, n_slices_min=NZ[0], n_slices_max=NZ[1], workers=2)
    assert ids == [0, 1]
    return out


def test_files_written(phantom_dir: Path) -> None:
    names = sorted(p.name for p in phantom_dir.iterdir())
    assert names == ["dataset.json5", "image_0.nii.gz", "image_1.nii.gz", "label_0.nii.gz", "label_1.nii.gz"]


def test_dtypes_shapes_geometry(phantom_dir: Path) -> None:
    for sid in (0, 1):
        img, gi = read_volume(phantom_dir / f"image_{sid}.nii.gz")
        lab, gl = read_volume(phantom_dir / f"label_{sid}.nii.gz")
        assert img.dtype == np.float32 and lab.dtype == np.uint8
        assert img.shape == lab.shape and img.shape[1:] == (SIZE, SIZE) and NZ[0] <= img.shape[0] <= NZ[1]
        assert gi.mismatch(gl) is None
        assert np.allclose(gi.spacing, (1.25 * 256 / SIZE, 1.25 * 256 / SIZE, 7.7))
        assert gi.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        # the field of view is centred in x: the origin is half the extent to the left
        assert gi.origin[0] == pytest.approx(-(SIZE - 1) / 2 * gi.spacing[0])


def test_anatomy_invariants(phantom_dir: Path) -> None:
    for sid in (0, 1):
        img, _ = read_volume(phantom_dir / f"image_{sid}.nii.gz")
        lab, _ = read_volume(phantom_dir / f"label_{sid}.nii.gz")
        nz, _, w = lab.shape
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}  # every organ in every scan, nothing else
        extents = {}
        for c in (1, 2, 3, 4):
            zs = np.flatnonzero((lab == c).any(axis=(1, 2)))
            assert np.array_equal(zs, np.arange(zs[0], zs[-1] + 1)), f"class {c} slices not contiguous: {zs}"
            assert 0 < zs[0] and zs[-1] < nz - 1, f"class {c} must not touch the first/last slice"
            extents[c] = len(zs)
        assert extents[1] == max(extents.values())  # the liver spans the most slices
        assert extents[2] < extents[1] and extents[3] < extents[1]
        cols = {c: np.nonzero(lab == c)[2].mean() for c in (1, 2, 3, 4)}
        assert cols[2] < w / 2 < cols[3]  # RK on the image's left, LK on its right
        assert cols[1] < w / 2 < cols[4]  # liver image-left, spleen image-right
        # MR: air (image corners) under the body-mask threshold, organs above it
        assert img[:, :5, :5].max() < 50 and img[:, -5:, -5:].max() < 50
        assert img[lab > 0].min() > 50
        assert img.max() < 4000


def test_description_file(phantom_dir: Path) -> None:
    info = get_dataset_info(phantom_dir / "dataset.json5")
    assert info.modality == "MR" and info.data_dir == phantom_dir.resolve()
    assert info.labels == {0: "BG", 1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"}
    assert info.body_threshold == pytest.approx(50.0001)
    fold = info.fold(0, available=list_scan_ids(phantom_dir))
    assert set(fold.queries) | set(fold.support) == {0, 1} and not set(fold.queries) & set(fold.support)


def test_deterministic_across_processes(phantom_dir: Path) -> None:
    # the fixture wrote with two worker processes; this process must reproduce the same bytes
    img, lab, geom = synthesize_scan(3, 1, SIZE, NZ)
    img_f, g_f = read_volume(phantom_dir / "image_1.nii.gz")
    lab_f, _ = read_volume(phantom_dir / "label_1.nii.gz")
    assert np.array_equal(img, img_f) and np.array_equal(lab, lab_f) and geom.mismatch(g_f) is None


def test_seed_changes_output() -> None:
    a = synthesize_scan(0, 0, 48, (12, 12))
    b = synthesize_scan(0, 0, 48, (12, 12))
    c = synthesize_scan(1, 0, 48, (12, 12))
    d = synthesize_scan(0, 1, 48, (12, 12))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[1], d[1])


def test_ct_appearance(tmp_path: Path) -> None:
    img, lab, geom = synthesize_scan(2, 0, 48, (12, 12), appearance="ct")
    assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 255
    assert img[:, :4, :4].max() == 0  # air is clipped to the bottom of the window
    assert np.median(img[lab == 1]) > np.median(img[:, 20:28, 20:28][lab[:, 20:28, 20:28] == 0]) - 200
    assert geom.spacing[2] == pytest.approx(5.0)
    generate_phantom(tmp_path, n_scans=2, seed=2, size=48, appearance="ct", n_slices_min=12, n_slices_max=12)
    info = get_dataset_info(tmp_path / "dataset.json5")
    assert info.modality == "CT" and info.name == "PHANTOM_CT"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_scans"):
        generate_phantom(tmp_path, n_scans=1)
    with pytest.raises(ValueError, match="appearance"):
        synthesize_scan(0, 0, 48, (12, 12), appearance="pet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="12"):
        synthesize_scan(0, 0, 48, (8, 10))


def test_cli_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    main(["--out", str(out), "--n-scans", "2", "--seed", "5", "--size", "48", "--n-slices-min", "12",
          "--n-slices-max", "12", "--workers", "1", "--preview", str(tmp_path / "p.png")])
    assert list_scan_ids(out) == [0, 1]
    assert (tmp_path / "p.png").stat().st_size > 1000
    png = save_preview(out, tmp_path / "q.png", scan_ids=[1], n_slices=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
