"""MS-CMRSeg bSSFP pipeline on synthetic NIfTI cases: discovery, label map, output grid, geometry, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_preprocessing import cmr
from dataloaders.niftiio import (
    classmap_path,
    image_path,
    label_path,
    list_scan_ids,
    read_label_volume,
    read_volume,
    superpix_path,
)
from tests.raw_fixtures import CmrCase, make_cmr
from util.errors import RawDataError


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, CmrCase]]:
    root = tmp_path_factory.mktemp("mscmrseg")
    return root, make_cmr(root, patients=(12, 3), unlabelled=(40,))


@pytest.fixture(scope="module")
def processed(raw: tuple[Path, dict[int, CmrCase]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmr_out") / "cmr_MR_normalized"
    assert cmr.main(["--raw", str(raw[0]), "--out", str(out), "--workers", "1", "--no-progress",
                     "--keep-intermediate"]) == 0
    return out


def test_discovery_skips_unlabelled_images(raw: tuple[Path, dict[int, CmrCase]]) -> None:
    cases, unlabelled = cmr.find_cases(raw[0])
    assert list(cases) == [3, 12] and unlabelled == [40]
    assert cases[3][0].name == "patient3_C0.nii.gz" and cases[3][1].name == "patient3_C0_manual.nii.gz"


def test_label_values_mapped_on_the_original_grid(processed: Path, raw: tuple[Path, dict[int, CmrCase]]) -> None:
    for n in (3, 12):
        lab, geom = read_label_volume(label_path(processed / "intermediate", n))
        expected = np.select([raw[1][n].label == 200, raw[1][n].label == 500, raw[1][n].label == 600], [1, 2, 3], 0)
        np.testing.assert_array_equal(lab, expected)  # 200 LV_MYO -> 1, 500 LV_BP -> 2, 600 RV -> 3
        src = sitk.ReadImage(str(raw[1][n].image_file))
        assert geom.direction == pytest.approx(src.GetDirection()) and geom.origin == pytest.approx(src.GetOrigin())


def test_outputs_grid_and_labels(processed: Path) -> None:
    assert list_scan_ids(processed) == [3, 12]  # the patient numbers
    for n in (3, 12):
        image, geom = read_volume(image_path(processed, n))
        label, lgeom = read_label_volume(label_path(processed, n))
        assert image.shape == label.shape == (7, 256, 256)  # int(5 * 10 / 7.99 + 1) = 7 slices
        assert geom.spacing == pytest.approx(cmr.TARGET_SPACING, abs=1e-5) and lgeom == geom
        assert set(np.unique(label)) == {0, 1, 2, 3}
        assert np.median(image[label == 2]) == pytest.approx(620, rel=0.05)  # blood pool label on bright blood
        assert np.median(image[label == 1]) == pytest.approx(120, rel=0.15)  # myocardium on dark muscle
        assert superpix_path(processed, n).is_file()
    assert classmap_path(processed).is_file()


def test_lv_centre_keeps_its_physical_position(processed: Path, raw: tuple[Path, dict[int, CmrCase]]) -> None:
    def centre(path: Path, value: int) -> np.ndarray:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        zyx = np.argwhere(arr == value)[:, ::-1] * np.array(img.GetSpacing())
        mid = zyx.mean(axis=0)
        return np.array(img.GetOrigin()) + np.array(img.GetDirection()).reshape(3, 3) @ mid

    before = centre(raw[1][12].label_file, 500)
    after = centre(label_path(processed, 12), 2)
    assert np.abs(before - after)[:2] == pytest.approx([0, 0], abs=0.8)  # in-plane, mm (direction flips y)


def test_unknown_label_value_and_orphan_label(tmp_path: Path) -> None:
    cases = make_cmr(tmp_path / "raw", patients=(1,), unlabelled=(), size=(24, 24), n_slices=2)
    lab = sitk.ReadImage(str(cases[1].label_file))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 1220  # a scar value of the LGE labels
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(cases[1].label_file))
    with pytest.raises(RawDataError, match=r"patient1_C0_manual\.nii\.gz: unexpected values \[1220\]"):
        cmr.convert_all(tmp_path / "raw", tmp_path / "work", progress=False)
    cases[1].image_file.unlink()
    with pytest.raises(RawDataError, match=r"patient1_C0_manual\.nii\.gz: label without its image"):
        cmr.find_cases(tmp_path / "raw")


def test_size_mismatch_and_duplicates(tmp_path: Path) -> None:
    cases = make_cmr(tmp_path / "raw", patients=(2,), unlabelled=(), size=(24, 24), n_slices=2)
    small = sitk.GetImageFromArray(np.zeros((2, 20, 24), np.int16))
    sitk.WriteImage(small, str(cases[2].label_file))
    with pytest.raises(RawDataError,
                       match=r"patient2_C0_manual\.nii\.gz: not on the grid of its image .*: size \(24, 20, 2\)"):
        cmr.convert_all(tmp_path / "raw", tmp_path / "work", progress=False)
    copy = tmp_path / "raw" / "copy"
    copy.mkdir()
    (copy / "patient2_C0.nii.gz").write_bytes(cases[2].image_file.read_bytes())
    with pytest.raises(RawDataError, match="patient 2 is also found"):
        cmr.find_cases(tmp_path / "raw")
    with pytest.raises(RawDataError, match="no patient<N>_C0_manual"):
        cmr.find_cases(copy)


def test_selected_scans_and_verify_only(raw: tuple[Path, dict[int, CmrCase]], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cmr.main(["--raw", str(raw[0]), "--out", str(out), "--scans", "12", "--workers", "1",
                     "--no-progress"]) == 0
    assert list_scan_ids(out) == [12]
    capsys.readouterr()
    assert cmr.main(["--out", str(out), "--verify-only", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "7x256x256" in table and "1.250, 1.250, 7.990" in table and "verification passed" in table
    assert cmr.main(["--raw", str(raw[0]), "--out", str(out), "--scans", "99", "--no-progress"]) == 2


def test_anatomy_check_of_the_label_convention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = make_cmr(tmp_path / "raw", patients=(1,), unlabelled=(), size=(48, 48), n_slices=2)
    mapped = np.select([cases[1].label == 200, cases[1].label == 500, cases[1].label == 600], [1, 2, 3], 0)
    assert cmr.lv_ring_fraction(mapped) > 0.9  # the myocardium encloses the blood pool
    assert cmr.lv_ring_fraction(np.zeros((1, 4, 4), np.uint8)) is None
    lab = sitk.ReadImage(str(cases[1].label_file))
    arr = sitk.GetArrayFromImage(lab)
    swapped = np.where(arr == 200, 500, np.where(arr == 500, 200, arr)).astype(np.int16)  # another convention
    bad = sitk.GetImageFromArray(swapped)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(cases[1].label_file))
    cmr.convert_all(tmp_path / "raw", tmp_path / "work", progress=False)
    assert "of the ring around the LV blood pool (raw 500) is myocardium" in capsys.readouterr().out
