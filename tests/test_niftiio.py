"""Processed-format I/O: geometry checks, truncated files, atomic writes, scan discovery, class-map checks."""

import json
from pathlib import Path

import numpy as np
import pytest

from dataloaders import niftiio as nio

GEOM = nio.Geometry(spacing=(1.25, 1.25, 7.7), origin=(-160.0, -150.0, 20.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _write_scan(d: Path, sid: int, shape=(4, 8, 8), label_geom: nio.Geometry | None = None,
                label_shape=None) -> None:
    rng = np.random.default_rng(sid)
    nio.write_volume(rng.normal(size=shape).astype(np.float32), nio.image_path(d, sid), GEOM)
    lab = np.zeros(label_shape or shape, np.uint8)
    lab[1:3, 2:5, 2:6] = 1
    nio.write_volume(lab, nio.label_path(d, sid), label_geom or GEOM)


def test_roundtrip_and_discovery(tmp_path: Path) -> None:
    for sid in (10, 2, 1):
        _write_scan(tmp_path, sid)
    assert nio.list_scan_ids(tmp_path) == [1, 2, 10]  # numeric, not lexicographic
    scan = nio.load_scan(tmp_path, 2, known_labels={0, 1})
    assert scan.image.shape == (4, 8, 8) and scan.image.dtype == np.float32
    assert scan.label.sum() == 2 * 3 * 4
    assert GEOM.mismatch(scan.geometry) is None  # NIfTI stores float32 spacing
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary files left


def test_missing_dir_and_no_images(tmp_path: Path) -> None:
    with pytest.raises(nio.DataFormatError, match="data directory not found"):
        nio.list_scan_ids(tmp_path / "nope")
    with pytest.raises(nio.DataFormatError, match=r"no image_<id>\.nii\.gz"):
        nio.list_scan_ids(tmp_path)


def test_shape_mismatch_names_file(tmp_path: Path) -> None:
    _write_scan(tmp_path, 3, label_shape=(4, 8, 9))
    with pytest.raises(nio.DataFormatError, match=r"label_3\.nii\.gz: shape \(4, 8, 9\) differs"):
        nio.load_scan(tmp_path, 3)


@pytest.mark.parametrize("field,geom", [
    ("spacing", nio.Geometry((1.25, 1.3, 7.7), GEOM.origin, GEOM.direction)),
    ("origin", nio.Geometry(GEOM.spacing, (-160.0, -150.0, 25.0), GEOM.direction)),
    ("direction", nio.Geometry(GEOM.spacing, GEOM.origin, (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))),
])
def test_geometry_mismatch_names_file(tmp_path: Path, field: str, geom: nio.Geometry) -> None:
    _write_scan(tmp_path, 4, label_geom=geom)
    with pytest.raises(nio.DataFormatError, match=rf"label_4\.nii\.gz: geometry differs .*{field}"):
        nio.load_scan(tmp_path, 4)


def test_superpixel_grid_checked(tmp_path: Path) -> None:
    _write_scan(tmp_path, 5)
    nio.write_volume(np.ones((3, 8, 8), np.int16), nio.superpix_path(tmp_path, 5), GEOM)
    with pytest.raises(nio.DataFormatError, match=r"superpix-MIDDLE_5\.nii\.gz: shape"):
        nio.load_scan(tmp_path, 5, with_superpix=True)


def test_float_superpixels_accepted(tmp_path: Path) -> None:
    _write_scan(tmp_path, 6)
    sp = np.arange(4 * 8 * 8, dtype=np.float64).reshape(4, 8, 8) % 7
    nio.write_volume(sp, nio.superpix_path(tmp_path, 6), GEOM)
    scan = nio.load_scan(tmp_path, 6, with_superpix=True)
    assert scan.superpix.dtype == np.int32 and np.array_equal(scan.superpix, sp.astype(np.int32))


def test_unknown_label_ids(tmp_path: Path) -> None:
    _write_scan(tmp_path, 7)
    with pytest.raises(nio.DataFormatError, match=r"label_7\.nii\.gz: label ids \[1\] are not in"):
        nio.load_scan(tmp_path, 7, known_labels={0, 2})


def test_truncated_volume_rejected(tmp_path: Path) -> None:
    _write_scan(tmp_path, 8, shape=(6, 32, 32))
    path = nio.image_path(tmp_path, 8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(nio.DataFormatError, match=r"image_8\.nii\.gz: truncated or corrupt"):
        nio.load_scan(tmp_path, 8)


def test_classmap_checks(tmp_path: Path) -> None:
    for sid in (1, 2):
        _write_scan(tmp_path, sid)
    names = ["BG", "LIVER"]
    with pytest.raises(nio.DataFormatError, match="class-slice index not found"):
        nio.load_classmap(tmp_path, names)
    path = nio.classmap_path(tmp_path)
    path.write_text("{not json")
    with pytest.raises(nio.DataFormatError, match="malformed JSON"):
        nio.load_classmap(tmp_path, names)
    good = {"BG": {"1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}, "LIVER": {"1": [1, 2], "2": [1, 2]}}
    path.write_text(json.dumps({**good, "LIVER": {"1": [1, 2]}}))
    with pytest.raises(nio.DataFormatError, match=r"stale index, scans \['2'\]"):
        nio.load_classmap(tmp_path, names)
    path.write_text(json.dumps({"BG": {**good["BG"], "9": []}, "LIVER": good["LIVER"]}))
    with pytest.raises(nio.DataFormatError, match=r"lists scans \['9'\] that have no image"):
        nio.load_classmap(tmp_path, names)
    path.write_text(json.dumps(good))
    assert nio.load_classmap(tmp_path, names) == good


def _nibabel_file(path: Path, arr_xyz: np.ndarray, kind: str, byteorder: str) -> Path:
    """A NIfTI file written by nibabel: ``kind`` "nifti1" or "nifti2", ``byteorder`` "<" or ">"."""
    import nibabel

    klass = {"nifti1": nibabel.Nifti1Image, "nifti2": nibabel.Nifti2Image}[kind]
    header = klass.header_class(endianness=byteorder)  # the byte order of the header and of the voxels
    header.set_data_dtype(arr_xyz.dtype)
    img = klass(arr_xyz, np.eye(4), header=header)
    nibabel.save(img, str(path))
    return path


@pytest.mark.parametrize("kind", ["nifti1", "nifti2"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_voxels_found_in_every_nifti_variant(tmp_path: Path, kind: str, byteorder: str,
                                                        dtype: type) -> None:
    arr = np.zeros((6, 5, 4), dtype)  # (x, y, z) as nibabel stores it
    arr[3, 2, 1], arr[0, 4, 3] = np.nan, -np.inf
    path = _nibabel_file(tmp_path / f"{kind}.nii.gz", arr, kind, byteorder)
    raw = nio.check_gzip_complete(path)
    header = nio.nifti_header(raw)
    assert header is not None and header.get_data_shape() == (6, 5, 4)
    assert header.sizeof_hdr == {"nifti1": 348, "nifti2": 540}[kind]
    assert header.endianness == byteorder and header.get_data_dtype() == np.dtype(dtype).newbyteorder(byteorder)
    assert (nio.check_gzip_complete(path)[:4] == {"<": b"\x5c\x01\x00\x00", ">": b"\x00\x00\x01\x5c"}[byteorder]
            if kind == "nifti1" else True)  # sizeof_hdr 348 in the file's byte order
    # the first non-finite voxel in file order (x fastest) is (x, y, z) = (3, 2, 1): (z, y, x) = (1, 2, 3)
    with pytest.raises(nio.DataFormatError, match=r"nifti\d\.nii\.gz: 2 voxels are NaN or infinite \(first at "
                                                  r"z, y, x = \(1, 2, 3\)\)"):
        nio.read_volume(path)
    arr[:] = 1.5  # finite: read, and the values survive either byte order
    path = _nibabel_file(tmp_path / f"ok_{kind}.nii", arr, kind, byteorder)
    nio.check_nifti_finite(path, path.read_bytes())


def test_nifti_check_leaves_other_files_alone_and_refuses_short_voxel_data(tmp_path: Path) -> None:
    assert nio.nifti_header(b"not a nifti file at all" * 20) is None
    assert nio.nifti_header(b"") is None
    ints = np.zeros((4, 4, 2), np.int16)
    path = _nibabel_file(tmp_path / "ints.nii", ints, "nifti1", "<")
    nio.check_nifti_finite(path, path.read_bytes())  # integer voxels cannot be NaN: nothing to check
    floats = _nibabel_file(tmp_path / "floats.nii", np.ones((8, 8, 4), np.float32), "nifti1", "<")
    raw = floats.read_bytes()
    with pytest.raises(nio.DataFormatError, match=r"floats\.nii: truncated, the header announces 256 voxels of 4 "
                                                  r"bytes from byte 352 but the file holds 852 bytes"):
        nio.check_nifti_finite(floats, raw[:852])
