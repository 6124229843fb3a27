"""Verification of processed folders: the table's numbers and each integrity check; raw pair grid check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_preprocessing import verify
from data_preprocessing.class_slice_index import write_classmap
from data_preprocessing.scan_reader import check_same_grid
from data_preprocessing.verify import verify_dataset
from dataloaders.dataset_info import get_dataset_info
from dataloaders.niftiio import (
    Geometry,
    classmap_path,
    fgmask_path,
    image_path,
    label_path,
    superpix_path,
    write_volume,
)
from util.errors import RawDataError

GEOM = Geometry((1.25, 1.25, 7.7), (-100.0, -90.0, 5.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
INFO = get_dataset_info("CHAOST2")


def _scan(d: Path, sid: int, organs: dict[int, list[int]], geom: Geometry = GEOM) -> None:
    """A (4, 16, 16) scan: body intensity 200 inside rows/cols 2..13, class c on the slices organs[c]."""
    image = np.zeros((4, 16, 16), np.float32)
    image[:, 2:14, 2:14] = 200.0
    label = np.zeros((4, 16, 16), np.uint8)
    for c, zs in organs.items():
        for z in zs:
            label[z, 3 + c, 4:8] = c
    write_volume(image, image_path(d, sid), geom)
    write_volume(label, label_path(d, sid), geom)
    write_volume((image > 0).astype(np.int32) * 3, superpix_path(d, sid), geom)
    write_volume((image > 0).astype(np.uint8), fgmask_path(d, sid), geom)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    _scan(tmp_path, 1, {1: [0, 1, 2], 2: [1], 4: [2, 3]})
    _scan(tmp_path, 2, {1: [1, 2], 3: [0, 1]})
    write_classmap(tmp_path, INFO, progress=False)
    return tmp_path


def test_table_numbers(folder: Path) -> None:
    report = verify_dataset(folder, INFO, expect_hw=(16, 16), expect_spacing=(1.25, 1.25, 7.7), progress=False)
    assert report.ok, report.errors
    s1, s2 = report.scans
    assert s1.shape == (4, 16, 16) and s1.spacing == pytest.approx((1.25, 1.25, 7.7))
    assert s1.label_ids == [0, 1, 2, 4] and s1.slices_per_class == {1: 3, 2: 1, 3: 0, 4: 2}
    assert s2.slices_per_class == {1: 2, 2: 0, 3: 2, 4: 0}
    assert s1.fg_in_body == 1.0
    table = report.table()
    assert "LIVER" in table and "5 (2 scans)" in table and "verification passed" in table
    assert any("18 scans of the CHAOST2 scan list" in w for w in report.warnings)
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_each_check_reports_its_file(folder: Path) -> None:
    lab = np.zeros((4, 16, 16), np.uint8)
    lab[0, 0, 0] = 7  # unknown id, outside the body
    write_volume(lab, label_path(folder, 2), GEOM)
    shifted = Geometry(GEOM.spacing, (0.0, 0.0, 0.0), GEOM.direction)
    write_volume(np.zeros((4, 16, 16), np.int32), superpix_path(folder, 1), shifted)
    fgmask_path(folder, 2).unlink()
    report = verify_dataset(folder, INFO, expect_hw=(32, 32), expect_spacing=(1.0, None, 7.7), progress=False)
    text = "\n".join(report.errors)
    assert not report.ok
    assert f"{label_path(folder, 2)}: label ids [7] are not in the CHAOST2 label map" in text
    assert f"{superpix_path(folder, 1)}: geometry differs from image_1.nii.gz: origin" in text
    assert f"{fgmask_path(folder, 2)}: file not found" in text
    assert f"{image_path(folder, 1)}: in-plane size (16, 16) != expected (32, 32)" in text
    assert f"{image_path(folder, 1)}: spacing x = 1.2500 mm != expected 1.0 mm" in text
    assert "stale index" in text  # the class map no longer matches label_2
    assert any("0.0% of labelled voxels lie inside the body" in w for w in report.warnings)


def test_label_grid_and_classmap_presence(folder: Path) -> None:
    write_volume(np.zeros((3, 16, 16), np.uint8), label_path(folder, 1), GEOM)
    classmap_path(folder).unlink()
    report = verify_dataset(folder, INFO, progress=False)
    text = "\n".join(report.errors)
    assert f"{label_path(folder, 1)}: shape (3, 16, 16) differs from image_1.nii.gz (4, 16, 16)" in text
    assert "class-slice index not found" in text
    assert verify_dataset(folder / "none", INFO, progress=False).errors[0].endswith("data directory not found")


def test_cli_exit_codes(folder: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert verify.main(["--data-dir", str(folder), "--dataset", "CHAOST2", "--report", str(tmp_path / "r.json")]) == 0
    assert "verification passed" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["scans"][0]["scan_id"] == 1
    superpix_path(folder, 1).unlink()
    assert verify.main(["--data-dir", str(folder), "--dataset", "CHAOST2"]) == 1
    assert verify.main(["--data-dir", str(folder), "--dataset", "CHAOST2", "--no-superpixels"]) == 0
    assert verify.main(["--data-dir", str(folder), "--dataset", "NOPE"]) == 2


def test_check_pair_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = sitk.GetImageFromArray(np.zeros((2, 4, 5), np.int16))
    img.SetSpacing((0.7, 0.7, 3.0))
    lbl = sitk.GetImageFromArray(np.ones((2, 4, 5), np.uint8))
    lbl.SetSpacing((0.7001, 0.7, 3.0))  # header rounding: accepted, image geometry used, reported
    out = check_same_grid(img, lbl, tmp_path / "img.nii.gz", tmp_path / "lbl.nii.gz")
    assert out.GetSpacing() == img.GetSpacing() and sitk.GetArrayFromImage(out).sum() == 40
    assert "header differs slightly" in capsys.readouterr().out
    lbl.SetOrigin((0.0, 0.0, 6.0))
    with pytest.raises(RawDataError, match=r"lbl\.nii\.gz: not on the grid of its image .*img\.nii\.gz: "):
        check_same_grid(img, lbl, tmp_path / "img.nii.gz", tmp_path / "lbl.nii.gz")
    with pytest.raises(RawDataError, match=r"lbl\.nii\.gz: not on the grid of its image .*: size \(5, 4, 1\) differs"):
        check_same_grid(img, lbl[:, :, :1], tmp_path / "img.nii.gz", tmp_path / "lbl.nii.gz")


def test_show_scan_draws_image_labels_and_superpixels(folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    fig = verify.show_scan(folder, 1)
    assert len(fig.axes) == 3
    assert fig.axes[0].get_title() == "scan 1, slice 1: image"  # slices 1 and 2 hold 8 labelled pixels, 1 first
    assert fig.axes[1].get_title() == "labels [1, 2]" and fig.axes[2].get_title() == "1 superpixels"
    superpix_path(folder, 1).unlink()
    assert len(verify.show_scan(folder, 1, z=3).axes) == 2
