"""data_preprocessing.geometry: reading scans in any format and geometry, the processed grid and the way back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_preprocessing.geometry import (
    Grid,
    GridTransform,
    PrepareSettings,
    label_values,
    preprocess_image,
    preprocess_label,
    preprocessing_from_checkpoint,
    to_source_grid,
)
from data_preprocessing.scan_reader import check_same_grid, list_scans, read_label, read_scan, scan_name
from dataloaders.niftiio import DataFormatError
from tests.raw_fixtures import foreign_dicom, make_chaos_patient
from util.errors import RawDataError

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _image(arr: np.ndarray, spacing, origin, direction=IDENTITY) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in direction))
    return img


def _centroid_mm(img: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Physical centroid (mm) of the voxels of a (Z, H, W) mask on ``img``'s grid."""
    idx = np.argwhere(mask)[:, ::-1].astype(np.float64).mean(axis=0)  # (x, y, z)
    return np.array(img.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
            and a.GetDirection() == b.GetDirection())


def _scan_with_marker(shape_zyx=(8, 40, 36), marker=(3, 11, 25), value=7):
    """A body-like volume with an asymmetric bright block and its label (id ``value``) at ``marker`` (z, y, x)."""
    rng = np.random.default_rng(0)
    arr = rng.normal(100.0, 3.0, shape_zyx).astype(np.float32)
    lab = np.zeros(shape_zyx, dtype=np.uint16)
    z, y, x = marker
    lab[z, y:y + 3, x:x + 2] = value
    arr[lab > 0] = 600.0
    return arr, lab


# ---------------------------------------------------------------------- exact round trips (no interpolation)
FOREIGN = {
    "lps_identity": IDENTITY,
    "ras_x_y_flipped": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    "x_flipped": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "y_flipped": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    "z_flipped": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "x_y_swapped_z_flipped": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_round_trip_is_exact_when_the_spacing_already_matches(name: str) -> None:
    # 1.25 mm in-plane (the MR target): no interpolation, only reorientation and padding, so every voxel of the
    # label comes back to exactly its own place, and the image voxels land on the same physical points.
    arr, lab = _scan_with_marker()
    img = _image(arr, (1.25, 1.25, 4.0), (12.0, -30.0, 7.5), FOREIGN[name])
    lbl = _image(lab, (1.25, 1.25, 4.0), (12.0, -30.0, 7.5), FOREIGN[name])
    out, transform, pimg = preprocess_image(img, PrepareSettings("MR", mr_clip_percentile=100.0, size=64))
    assert out.shape == (8, 64, 64) and out.dtype == np.float32
    assert pimg.GetDirection() == IDENTITY  # the common orientation: LPS, identity for axis-aligned scans
    plab = preprocess_label(lbl, transform)
    assert plab.dtype == np.int32 and set(np.unique(plab)) == {0, 7} and (plab == 7).sum() == 6
    # the marker is the same physical object in the source and in the processed grid
    np.testing.assert_allclose(_centroid_mm(pimg, plab == 7), _centroid_mm(img, lab == 7), atol=1e-6)
    np.testing.assert_allclose(_centroid_mm(pimg, out > 300), _centroid_mm(img, arr > 300), atol=1e-6)
    back = to_source_grid(plab, transform)
    assert _same_geometry(back, img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), lab)
    nearest = to_source_grid(plab, transform, interpolation="nearest")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nearest), lab)


def test_ras_and_lps_versions_of_one_scan_give_identical_processed_arrays() -> None:
    arr, _ = _scan_with_marker()
    spacing = (0.9, 0.9, 3.0)
    lps = _image(arr, spacing, (-20.0, -15.0, 0.0))
    # The same physical volume stored NIfTI-style (RAS): x and y reversed, direction diag(-1, -1, 1), origin at the
    # old last column / last row.
    corner = lps.TransformIndexToPhysicalPoint((arr.shape[2] - 1, arr.shape[1] - 1, 0))
    ras = _image(arr[:, ::-1, ::-1].copy(), spacing, corner, (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    assert lps.TransformIndexToPhysicalPoint((3, 5, 2)) == pytest.approx(
        ras.TransformIndexToPhysicalPoint((arr.shape[2] - 1 - 3, arr.shape[1] - 1 - 5, 2)))
    out_lps, t_lps, _ = preprocess_image(lps, PrepareSettings("MR", mr_clip_percentile=100.0, size=48))
    out_ras, t_ras, _ = preprocess_image(ras, PrepareSettings("MR", mr_clip_percentile=100.0, size=48))
    np.testing.assert_array_equal(out_lps, out_ras)
    assert t_lps.processed == t_ras.processed
    # the bright block stays at the upper right of the slice (patient's left, anterior), as in the LPS original
    z, ys, xs = np.nonzero(out_lps > 300)
    assert set(z) == {3} and ys.mean() < 24 and xs.mean() > 24


def test_identity_scan_keeps_its_slices_the_same_way_up() -> None:
    # The phantom and the registry's processed scans carry the identity (LPS) direction: an identity scan at the
    # target spacing and size must come out unchanged.
    arr, _ = _scan_with_marker((5, 32, 32))
    img = _image(arr, (1.25, 1.25, 7.7), (0.0, 0.0, 0.0))
    out, transform, pimg = preprocess_image(img, PrepareSettings("MR", mr_clip_percentile=100.0, size=32))
    np.testing.assert_array_equal(out, arr)
    assert _same_geometry(pimg, img) and transform.crop_start == (0, 0)


# ---------------------------------------------------------------------- interpolating round trips
def test_anisotropic_permuted_scan_marker_returns_to_the_same_point() -> None:
    # Sagittal-like storage: array axis x is the patient's z. Spacing 0.7 x 1.6 x 2.2 mm, in-plane target 1.0 mm.
    arr, lab = _scan_with_marker((10, 30, 24), marker=(5, 12, 9))
    direction = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)  # columns: index x -> patient z, y -> x, z -> y
    img = _image(arr, (0.7, 1.6, 2.2), (5.0, 8.0, -3.0), direction)
    lbl = _image(lab, (0.7, 1.6, 2.2), (5.0, 8.0, -3.0), direction)
    out, transform, pimg = preprocess_image(img, PrepareSettings("MR", spacing=1.0, size=40))
    assert transform.reoriented.direction == IDENTITY
    assert transform.processed.spacing == (1.0, 1.0, 0.7)  # slices along the patient's z, kept (0.7 mm)
    assert out.shape == (24, 40, 40)
    plab = preprocess_label(lbl, transform)
    back = to_source_grid(plab, transform)
    assert _same_geometry(back, img)
    source_mm = _centroid_mm(img, lab == 7)
    np.testing.assert_allclose(_centroid_mm(pimg, plab == 7), source_mm, atol=0.5)
    np.testing.assert_allclose(_centroid_mm(back, sitk.GetArrayFromImage(back) == 7), source_mm, atol=0.5)


def test_512_ct_in_hu_windowed_resampled_and_mapped_back() -> None:
    rng = np.random.default_rng(1)
    hu = rng.normal(-1000.0, 5.0, (4, 512, 512)).astype(np.float32)
    hu[:, 100:420, 80:440] = 40.0  # body
    lab = np.zeros(hu.shape, dtype=np.uint8)
    lab[1:3, 300:330, 350:380] = 1  # an organ near the patient's left, posterior
    hu[lab == 1] = 75.0
    spacing, origin = (0.7, 0.7, 5.0), (-179.0, -200.0, -600.0)
    img, lbl = _image(hu, spacing, origin), _image(lab, spacing, origin)
    settings = PrepareSettings("CT", spacing_rule="sabs")  # the SABS registry pipeline's rule
    assert settings.window == (-125.0, 275.0) and settings.spacing is None
    out, transform, pimg = preprocess_image(img, settings)
    # the SABS rule: 1.75 x 0.7 mm in-plane, round(512 / 1.75) = 293 resampled voxels, centre 256 kept
    assert transform.processed.spacing == pytest.approx((1.225, 1.225, 5.0))
    assert transform.resampled.size == (293, 293, 4) and transform.crop_start == (18, 18)
    assert out.shape == (4, 256, 256)
    assert out.min() == 0.0 and transform.pad_value == 0.0  # air (-1000 HU) is below the window: 0
    plab = preprocess_label(lbl, transform)
    inside = out[plab == 1]
    np.testing.assert_allclose(inside[inside > 0], (75.0 + 125.0) / 400.0 * 255.0, rtol=0, atol=5.0)
    assert np.median(inside) == pytest.approx(127.5, abs=1e-3)  # (75 + 125) / 400 * 255
    back = to_source_grid(plab, transform)
    assert _same_geometry(back, img) and sitk.GetArrayViewFromImage(back).dtype == np.uint8
    back_arr = sitk.GetArrayFromImage(back)
    np.testing.assert_allclose(_centroid_mm(back, back_arr == 1), _centroid_mm(img, lab == 1), atol=0.7)
    dice = 2 * np.sum((back_arr == 1) & (lab == 1)) / (np.sum(back_arr == 1) + np.sum(lab == 1))
    assert dice > 0.9


def _whole_volume_reference(lbl: sitk.Image, grid: Grid) -> np.ndarray:
    """The per-value rule on whole volumes (no bounding boxes): the reference for the block-wise resampling."""
    arr = sitk.GetArrayFromImage(lbl)
    out = np.zeros(grid.shape_zyx, np.int32)
    for value in sorted(int(v) for v in np.unique(arr) if v):
        mask = sitk.GetImageFromArray((arr == value).astype(np.float32))
        mask.CopyInformation(lbl)
        res = sitk.Resample(mask, list(grid.size), sitk.Transform(), sitk.sitkLinear, grid.origin, grid.spacing,
                            grid.direction, 0.0, sitk.sitkFloat32)
        out[sitk.GetArrayFromImage(res) >= 0.5] = value
    return out


def test_blockwise_label_resampling_equals_the_whole_volume_rule() -> None:
    # An oblique scan (20 degrees about z, axes permuted) with three overlapping organs, one touching the border.
    rng = np.random.default_rng(7)
    lab = np.zeros((14, 40, 36), np.int32)
    lab[3:9, 5:20, 4:15] = 3
    lab[6:12, 15:30, 10:25] = 1
    lab[0:4, 30:40, 0:8] = 12
    lab[rng.random(lab.shape) < 0.002] = 5  # scattered single voxels
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    img = _image(lab.astype(np.float32), (0.9, 1.3, 2.1), (4.0, -7.0, 11.0), rot.ravel())
    lbl = _image(lab, (0.9, 1.3, 2.1), (4.0, -7.0, 11.0), rot.ravel())
    _, transform, _ = preprocess_image(img, PrepareSettings("MR", spacing=1.1, size=40))
    got = preprocess_label(lbl, transform)
    want = _whole_volume_reference(sitk.DICOMOrient(lbl, "LPS"), transform.processed)
    np.testing.assert_array_equal(got, want)
    assert set(np.unique(got)) >= {0, 1, 3, 12}
    proc = transform.processed.apply(sitk.GetImageFromArray(got))
    back = sitk.GetArrayFromImage(to_source_grid(got, transform))
    np.testing.assert_array_equal(back, _whole_volume_reference(proc, transform.source))
    src = transform.source
    nearest = sitk.Resample(proc, list(src.size), sitk.Transform(), sitk.sitkNearestNeighbor, src.origin, src.spacing,
                            src.direction, 0, sitk.sitkInt32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(to_source_grid(got, transform, "nearest")),
                                  sitk.GetArrayFromImage(nearest))


def test_z_resampling_and_padding() -> None:
    arr, lab = _scan_with_marker((12, 20, 20), marker=(6, 8, 8))
    img, lbl = _image(arr, (2.0, 2.0, 1.0), (0.0, 0.0, 0.0)), _image(lab, (2.0, 2.0, 1.0), (0.0, 0.0, 0.0))
    out, transform, pimg = preprocess_image(img, PrepareSettings("MR", spacing=2.0, z_spacing=3.0, size=30))
    assert out.shape == (4, 30, 30) and transform.crop_start == (-5, -5)
    assert transform.processed.origin == pytest.approx((-10.0, -10.0, 0.0))
    assert np.all(out[:, :5, :] == transform.pad_value)  # padding holds the minimum
    plab = preprocess_label(lbl, transform)
    back = sitk.GetArrayFromImage(to_source_grid(plab, transform))
    assert (plab == 7).any() and np.abs(_centroid_mm(pimg, plab == 7) - _centroid_mm(img, lab == 7)).max() <= 1.5
    assert back.shape == lab.shape


# ---------------------------------------------------------------------- reading
def test_dicom_series_with_shuffled_file_order_and_arbitrary_names(tmp_path: Path) -> None:
    patient = make_chaos_patient(tmp_path / "MR", 3, n_slices=6, rows=40, cols=36, pixel_spacing=(1.5, 1.25),
                                 gap=5.0, marker=(4, 10, 20))
    series = tmp_path / "series_a"
    series.mkdir()
    order = np.random.default_rng(5).permutation(len(patient.dicom_files))
    for n, k in enumerate(order):  # UID-like names without slice numbers, in a shuffled order
        shutil.copy(patient.dicom_files[k], series / f"1.2.826.0.{n * 7919 % 1000}.dcm")
    img, name = read_scan(series)
    assert name == "series_a" and img.GetSize() == (36, 40, 6)
    assert img.GetSpacing() == pytest.approx((1.25, 1.5, 5.0))
    arr = sitk.GetArrayFromImage(img)
    z, r, c = np.argwhere(arr >= 4000)[0]
    assert (z, r, c) == (4, 10, 20)  # spatial order restored from ImagePositionPatient
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((20, 10, 4)), patient.physical(4, 10, 20),
                               atol=1e-4)
    # the marker lands on the same physical point after preprocessing
    out, transform, pimg = preprocess_image(img, PrepareSettings("MR", mr_clip_percentile=100.0, size=48))
    np.testing.assert_allclose(_centroid_mm(pimg, out == out.max()), patient.physical(4, 11, 21), atol=1.3)
    # a folder of DICOM files is one scan
    assert list_scans([series]) == [series]


def test_dicom_folder_mixing_two_series_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    patient = make_chaos_patient(tmp_path / "MR", 4, n_slices=4, rows=24, cols=24)
    folder = patient.dicom_files[0].parent
    foreign_dicom(patient.dicom_files[1], folder / "IMG-0004-00099.dcm", 99)
    with pytest.raises(RawDataError, match=str(folder)):
        read_scan(folder)


def test_formats_are_read_with_their_geometry(tmp_path: Path) -> None:
    arr, _ = _scan_with_marker((4, 10, 12), marker=(1, 2, 3))
    img = _image(arr, (0.8, 0.9, 2.5), (1.0, 2.0, 3.0), FOREIGN["x_flipped"])
    for fname in ("a.nii.gz", "b.nii", "c.nrrd", "d.mha", "e.mhd"):
        sitk.WriteImage(img, str(tmp_path / fname))
        got, name = read_scan(tmp_path / fname)
        assert name == fname.split(".")[0] and got.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_array_equal(sitk.GetArrayFromImage(got), arr)
        assert got.GetSpacing() == pytest.approx(img.GetSpacing())
        assert got.GetOrigin() == pytest.approx(img.GetOrigin())
        assert got.GetDirection() == pytest.approx(img.GetDirection())


def test_bad_scans_are_errors_naming_the_file(tmp_path: Path) -> None:
    arr, _ = _scan_with_marker((3, 8, 8), marker=(1, 2, 3))
    arr[1, 2, 3] = np.nan
    for name in ("nan.mha", "nan.nii.gz", "nan.nii"):  # (ITK's NIfTI reader turns NaN into 0: checked apart)
        sitk.WriteImage(_image(arr, (1, 1, 1), (0, 0, 0)), str(tmp_path / name))
        with pytest.raises((RawDataError, DataFormatError), match=rf"{name}: .*NaN"):
            read_scan(tmp_path / name)
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(_image(np.zeros((3, 8, 8), np.float32), (1, 1, 1), (0, 0, 0)), str(good))
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="cut.nii.gz"):
        read_scan(tmp_path / "cut.nii.gz")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(RawDataError, match="flat.nii.gz: expected a 3D"):
        read_scan(tmp_path / "flat.nii.gz")
    sitk.WriteImage(_image(np.full((2, 4, 4), 1.5, np.float32), (1, 1, 1), (0, 0, 0)), str(tmp_path / "frac.nii.gz"))
    with pytest.raises(RawDataError, match="frac.nii.gz: label file holds non-integer"):
        read_label(tmp_path / "frac.nii.gz")


def test_label_on_another_grid_is_an_error_naming_both_files(tmp_path: Path) -> None:
    arr, lab = _scan_with_marker((4, 16, 16), marker=(1, 2, 3))
    img = _image(arr, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    ipath, lpath = tmp_path / "scan7.nii.gz", tmp_path / "scan7_seg.nii.gz"
    for spacing, origin, shape in (((1.0, 1.0, 2.0), (5.0, 0.0, 0.0), (4, 16, 16)),  # shifted by 5 mm
                                   ((1.5, 1.0, 2.0), (0.0, 0.0, 0.0), (4, 16, 16)),  # other spacing
                                   ((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (4, 16, 15))):  # other size
        lbl = _image(np.zeros(shape, np.uint8), spacing, origin)
        with pytest.raises(RawDataError, match=r"scan7_seg\.nii\.gz.*scan7\.nii\.gz"):
            check_same_grid(img, lbl, ipath, lpath)
    flipped = _image(lab, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), FOREIGN["y_flipped"])
    with pytest.raises(RawDataError, match="scan7_seg.nii.gz"):
        check_same_grid(img, flipped, ipath, lpath)
    same = check_same_grid(img, _image(lab, (1.0, 1.0, 2.0), (0.0, 0.0, 1e-5)), ipath, lpath)
    assert _same_geometry(same, img)


def test_list_scans_expands_folders_in_numeric_order(tmp_path: Path) -> None:
    vol = _image(np.zeros((2, 4, 4), np.float32), (1, 1, 1), (0, 0, 0))
    files = tmp_path / "files"
    files.mkdir()
    for name in ("scan10.nii.gz", "scan2.nrrd", "scan1.mhd"):
        sitk.WriteImage(vol, str(files / name))  # scan1.mhd also writes scan1.raw, skipped
    dicoms = tmp_path / "dicoms"
    for sub in ("p10", "p9"):
        (dicoms / sub).mkdir(parents=True)
        (dicoms / sub / "x.dcm").write_bytes(b"")
    single = tmp_path / "single.nii.gz"
    sitk.WriteImage(vol, str(single))
    got = list_scans([single, files, dicoms])
    assert got == [single, files / "scan1.mhd", files / "scan2.nrrd", files / "scan10.nii.gz", dicoms / "p9",
                   dicoms / "p10"]
    assert [scan_name(p) for p in got] == ["single", "scan1", "scan2", "scan10", "p9", "p10"]
    (files / "notes.txt").write_text("x")
    with pytest.raises(RawDataError, match="notes.txt"):
        list_scans([files])
    with pytest.raises(RawDataError, match="missing"):
        list_scans([tmp_path / "missing"])
    with pytest.raises(RawDataError, match="listed twice"):
        list_scans([single, single])


# ---------------------------------------------------------------------- settings, transform, checkpoints
def test_settings_defaults_validation_and_json_round_trip() -> None:
    mr, ct = PrepareSettings("MR"), PrepareSettings("CT", spacing=1.5, z_spacing=3, window=(-100, 200))
    assert (mr.spacing, mr.z_spacing, mr.size, mr.window, mr.mr_clip_percentile) == (1.25, None, 256, None, 99.5)
    assert ct.window == (-100.0, 200.0) and ct.mr_clip_percentile is None and ct.z_spacing == 3.0
    assert PrepareSettings("CT").inplane_spacing((0.8, 0.6, 5.0)) == (1.6, 1.6)  # one fixed scale by default
    assert PrepareSettings("CT", spacing_rule="sabs").inplane_spacing((0.8, 0.6, 5.0)) == pytest.approx((1.4, 1.05))
    for s in (mr, ct, PrepareSettings("CT"), PrepareSettings("CT", spacing_rule="sabs")):
        assert PrepareSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for bad in ({"modality": "PET"}, {"modality": "MR", "window": (0, 1)}, {"modality": "CT", "spacing": -1.0},
                {"modality": "CT", "window": (5, 5)}, {"modality": "MR", "size": 0},
                {"modality": "MR", "mr_clip_percentile": 0}):
        with pytest.raises(ValueError):
            PrepareSettings(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        PrepareSettings.from_dict({"modality": "MR", "spacng": 1.0})


def test_transform_round_trips_through_json() -> None:
    arr, _ = _scan_with_marker((3, 10, 10), marker=(1, 2, 3))
    _, transform, _ = preprocess_image(_image(arr, (1.1, 0.9, 3.0), (1, 2, 3), FOREIGN["z_flipped"]),
                                       PrepareSettings("MR", size=16))
    again = GridTransform.from_dict(json.loads(json.dumps(transform.to_dict())))
    assert again == transform and isinstance(again.source, Grid)
    assert again.intensity["clip_percentile"] == 99.5


def test_preprocessing_from_checkpoint() -> None:
    s = PrepareSettings("CT", spacing=1.2)
    assert preprocessing_from_checkpoint({"preprocessing": {"settings": s.to_dict()}, "config": {}}) == s
    chaos = preprocessing_from_checkpoint({"config": {"dataset": "CHAOST2"}})
    assert (chaos.modality, chaos.spacing, chaos.z_spacing) == ("MR", 1.25, 7.7)
    sabs = preprocessing_from_checkpoint({"config": {"dataset": "SABS"}})
    assert (sabs.modality, sabs.spacing, sabs.z_spacing, sabs.window) == ("CT", None, None, (-125.0, 275.0))
    assert preprocessing_from_checkpoint({"encoder.conv1.weight": 0}) is None  # an original state dict
    assert preprocessing_from_checkpoint({"config": {"dataset": "/gone/mydata.json5"}}) is None


def test_label_values() -> None:
    assert label_values(np.array([[0, 5, 5], [2, 0, 7]], np.uint8)) == [2, 5, 7]
    assert label_values(np.array([0, 1 << 21, 3], np.int64)) == [3, 1 << 21]  # large ids: the sorting path
    assert label_values(np.array([4, 0], np.uint64)) == [4]
    assert label_values(np.zeros((2, 2), np.int32)) == []
