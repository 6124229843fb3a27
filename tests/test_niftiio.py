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
