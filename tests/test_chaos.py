"""CHAOS T2-SPIR pipeline on synthetic DICOM + PNG patients: geometry, slice order, label alignment, errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from data_preprocessing import chaos
from dataloaders.niftiio import (
    classmap_path,
    fgmask_path,
    image_path,
    label_path,
    list_scan_ids,
    read_label_volume,
    read_volume,
    superpix_path,
)
from tests.raw_fixtures import CHAOS_ORGANS, MARKER_VALUE, ChaosPatient, foreign_dicom, make_chaos_patient
from util.errors import RawDataError

MARKER = (5, 10, 40)  # spatial slice 5, rows 10..12, columns 40..42 (top of the image: a vertical flip would move it)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[int, ChaosPatient]:
    mr = tmp_path_factory.mktemp("chaos") / "MR"
    return {1: make_chaos_patient(mr, 1, marker=MARKER),
            5: make_chaos_patient(mr, 5, tilt_deg=12.0, png_style="liver_gt")}


@pytest.fixture(scope="module")
def processed(raw: dict[int, ChaosPatient], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chaos_out") / "chaos_MR_T2_normalized"
    before = _tree_digest(raw[1].mr_dir)
    assert chaos.main(["--raw", str(raw[1].mr_dir), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert _tree_digest(raw[1].mr_dir) == before  # raw inputs are never modified
    return out


def test_fixture_instance_numbers_do_not_follow_space(raw: dict[int, ChaosPatient]) -> None:
    inst = raw[1].instances
    assert inst != sorted(inst) and inst != sorted(inst, reverse=True)
    assert inst[MARKER[0]] != MARKER[0] + 1  # ordering by instance number would misplace the marker slice


def test_conversion_matches_the_gdcm_series_reader(raw: dict[int, ChaosPatient]) -> None:
    for pid, patient in raw.items():
        img, lbl = chaos.convert_patient(patient.mr_dir / str(pid), pid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(patient.mr_dir / str(pid) / "T2SPIR" / "DICOM_anon")))
        ref = reader.Execute()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref).astype(np.float32))
        assert img.GetSpacing() == pytest.approx(ref.GetSpacing(), abs=1e-5)
        assert img.GetOrigin() == pytest.approx(ref.GetOrigin(), abs=1e-4)
        assert img.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-6)
        assert lbl.GetSpacing() == img.GetSpacing() and lbl.GetOrigin() == img.GetOrigin()
        # spacing from the DICOM tags: (column spacing, row spacing, slice gap)
        assert img.GetSpacing() == pytest.approx((1.5, 1.7, 6.0), abs=1e-5)


def test_marker_lands_on_the_same_voxels(raw: dict[int, ChaosPatient]) -> None:
    patient = raw[1]
    img, lbl = chaos.convert_patient(patient.mr_dir / "1", 1)
    im, lb = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lbl)
    marker_img, marker_lbl = im == MARKER_VALUE, lb == 4  # the spleen is left out: grey 252 is only the marker
    k, r, c = MARKER
    expected = np.zeros_like(marker_img)
    expected[k, r:r + 3, c:c + 3] = True
    np.testing.assert_array_equal(marker_img, expected)
    np.testing.assert_array_equal(marker_lbl, expected)
    # each converted slice is the DICOM file of that spatial position, and its label the PNG with the same number
    for z in range(im.shape[0]):
        np.testing.assert_array_equal(im[z], pydicom.dcmread(patient.dicom_files[z]).pixel_array)
        grey = np.asarray(Image.open(patient.png_files[z]))
        np.testing.assert_array_equal(lb[z] > 0, grey > 0)


def test_zero_based_png_numbering_is_paired_with_an_offset(raw: dict[int, ChaosPatient],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    patient = raw[5]
    assert patient.png_files[0].name.startswith("liver_GT_")
    _, lbl = chaos.convert_patient(patient.mr_dir / "5", 5)
    assert "numbered from 0" in capsys.readouterr().out
    lb = sitk.GetArrayFromImage(lbl)
    for z, png in enumerate(patient.png_files):
        np.testing.assert_array_equal(lb[z] > 0, np.asarray(Image.open(png)) > 0)


def test_outputs_shape_spacing_labels(processed: Path, raw: dict[int, ChaosPatient]) -> None:
    assert list_scan_ids(processed) == [1, 5]  # the patient ids
    for sid in (1, 5):
        image, geom = read_volume(image_path(processed, sid))
        label, lgeom = read_label_volume(label_path(processed, sid))
        assert image.shape == label.shape == (7, 256, 256)  # int(8 * 6 / 7.7 + 1) = 7 slices
        assert geom.spacing == pytest.approx(chaos.TARGET_SPACING, abs=1e-5)
        assert lgeom == geom
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
        for path in (superpix_path(processed, sid), fgmask_path(processed, sid)):
            assert path.is_file()
    assert classmap_path(processed).is_file()
    assert not (processed / "intermediate").exists()  # removed after a full run


def _physical_points(path: Path, zyx: np.ndarray) -> np.ndarray:
    """(N, 3) patient positions of (N, 3) array indices (z, y, x) of a NIfTI file."""
    img = sitk.ReadImage(str(path))
    direction = np.array(img.GetDirection()).reshape(3, 3)
    return np.array(img.GetOrigin()) + (zyx[:, ::-1] * np.array(img.GetSpacing())) @ direction.T


def test_labels_sit_on_their_organs_after_the_pipeline(processed: Path, raw: dict[int, ChaosPatient]) -> None:
    patient = raw[5]  # the tilted series
    image, _ = read_volume(image_path(processed, 5))
    label, _ = read_label_volume(label_path(processed, 5))
    every = _physical_points(label_path(processed, 5), np.argwhere(label >= 0))  # C order, like label.ravel()
    assert _physical_points(label_path(processed, 5), np.array([[2, 3, 4]]))[0] == pytest.approx(
        sitk.ReadImage(str(label_path(processed, 5))).TransformIndexToPhysicalPoint((4, 3, 2)))
    outer, core = patient.model_grey(every, scale=1.15), patient.model_grey(every, scale=0.6)
    for (grey, *_), lid in zip(CHAOS_ORGANS, (1, 2, 3, 4)):
        assert np.mean(outer[label.ravel() == lid] == grey) > 0.95, grey  # labelled voxels lie in that organ
        assert np.mean(label.ravel()[core == grey] == lid) > 0.95, grey  # and the organ's core carries the label
    liver = image[label == 1]
    assert np.median(liver) == pytest.approx(CHAOS_ORGANS[0][1], rel=0.05)  # the image agrees with its label


def test_marker_keeps_its_physical_position(processed: Path, raw: dict[int, ChaosPatient]) -> None:
    label, _ = read_label_volume(label_path(processed, 1))
    zyx = np.argwhere(label == 4)
    assert len(zyx)
    points = _physical_points(label_path(processed, 1), zyx)
    k, r, c = MARKER
    truth = raw[1].physical(k, r + 1, c + 1)  # centre of the 3x3 square, from the DICOM tags
    offset = points.mean(axis=0) - truth
    assert abs(offset[0]) < 1.0 and abs(offset[1]) < 1.0  # in-plane, mm
    assert abs(offset[2]) < 1.0  # the output slice at 30.8 mm is closest to the marker slice at 30 mm


def test_rerun_gives_identical_files(processed: Path, raw: dict[int, ChaosPatient], tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert chaos.main(["--raw", str(raw[1].mr_dir), "--out", str(again), "--workers", "1", "--no-progress"]) == 0
    assert _tree_digest(again) == _tree_digest(processed)


def test_step_by_step_equals_one_command(processed: Path, raw: dict[int, ChaosPatient], tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    base = ["--raw", str(raw[1].mr_dir), "--out", str(out), "--work", str(work), "--workers", "1", "--no-progress"]
    for step in ("convert", "normalize", "classmap", "superpixels"):
        assert chaos.main(base + ["--steps", step]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["image_1.nii.gz", "image_5.nii.gz", "label_1.nii.gz",
                                                      "label_5.nii.gz"]  # kept between separate steps
    assert _tree_digest(out) == _tree_digest(processed)
    assert chaos.main(["--out", str(out), "--verify-only", "--no-progress"]) == 0
    superpix_path(out, 5).unlink()
    assert chaos.main(["--out", str(out), "--verify-only", "--no-progress"]) == 1


def test_raw_folder_discovery(raw: dict[int, ChaosPatient], tmp_path: Path) -> None:
    assert list(chaos.find_patients(raw[1].mr_dir)) == [1, 5]
    assert list(chaos.find_patients(raw[1].mr_dir.parent)) == [1, 5]  # the parent of MR works too
    with pytest.raises(RawDataError, match="no patient folders"):
        chaos.find_patients(tmp_path)
    assert chaos.slice_number(Path("IMG-0004-00017.dcm")) == 17
    assert chaos.slice_number(Path("liver_GT_016.png")) == 16
    with pytest.raises(RawDataError, match="no slice number"):
        chaos.slice_number(Path("ground.png"))


# -------------------------------------------------------------------- mismatches stop with patient and file
@pytest.fixture()
def patient(tmp_path: Path) -> ChaosPatient:
    return make_chaos_patient(tmp_path / "MR", 7, n_slices=6, rows=32, cols=32)


def _convert(p: ChaosPatient) -> None:
    chaos.convert_patient(p.mr_dir / str(p.pid), p.pid)


def test_png_without_dicom_slice(patient: ChaosPatient) -> None:
    extra = patient.png_files[0].with_name("IMG-0004-00099.png")
    shutil.copy(patient.png_files[0], extra)
    with pytest.raises(RawDataError, match=r"patient 7: IMG-0004-00099\.png has no DICOM slice with number 99"):
        _convert(patient)


def test_dicom_removed_at_the_end_leaves_its_png_unpaired(patient: ChaosPatient) -> None:
    patient.dicom_files[-1].unlink()
    with pytest.raises(RawDataError, match=rf"patient 7: {patient.png_files[-1].name} has no DICOM slice"):
        _convert(patient)


def test_dicom_without_png(patient: ChaosPatient) -> None:
    patient.png_files[2].unlink()
    with pytest.raises(RawDataError, match=rf"patient 7: DICOM slice {patient.dicom_files[2].name} has no "):
        _convert(patient)


@pytest.mark.parametrize("name", ["IMG-0104-00001.dcm", "IMG-0001-00001.dcm"])  # sorted after / before the rest
def test_series_mixing_two_acquisitions(patient: ChaosPatient, name: str) -> None:
    foreign = foreign_dicom(patient.dicom_files[3], patient.dicom_files[0].with_name(name), 1)
    with pytest.raises(RawDataError, match=rf"patient 7: {foreign.name} belongs to another acquisition"):
        _convert(patient)


def test_missing_slice_in_the_middle(patient: ChaosPatient) -> None:
    patient.dicom_files[3].unlink()
    patient.png_files[3].unlink()
    names = f"{patient.dicom_files[2].name} and {patient.dicom_files[4].name}"
    with pytest.raises(RawDataError, match=rf"patient 7: gap of 12\.000 mm between {names}"):
        _convert(patient)


def test_inconsistent_orientation(patient: ChaosPatient) -> None:
    ds = pydicom.dcmread(patient.dicom_files[4])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
    ds.save_as(patient.dicom_files[4])
    with pytest.raises(RawDataError, match=rf"patient 7: {patient.dicom_files[4].name} has another orientation"):
        _convert(patient)


def test_unknown_grey_value_names_patient_and_png(patient: ChaosPatient) -> None:
    grey = np.asarray(Image.open(patient.png_files[1])).copy()
    grey[0, 0] = 100
    Image.fromarray(grey).save(patient.png_files[1])
    with pytest.raises(RawDataError, match=rf"patient 7: {patient.png_files[1].name}: unexpected values \[100\]"):
        _convert(patient)


def test_png_of_the_wrong_size(patient: ChaosPatient) -> None:
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(patient.png_files[1])
    with pytest.raises(RawDataError, match=rf"patient 7: {patient.png_files[1].name} is 30x32 pixels"):
        _convert(patient)


def test_cli_reports_input_errors(patient: ChaosPatient, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    patient.png_files[2].unlink()
    code = chaos.main(["--raw", str(patient.mr_dir), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "error: patient 7: DICOM slice" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --raw is required by the convert step
        chaos.main(["--out", str(tmp_path / "o")])
