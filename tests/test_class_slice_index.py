"""Tests of data_preprocessing.class_slice_index on hand-built label volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_preprocessing.class_slice_index import build_classmap, main, write_classmap
from dataloaders.dataset_info import get_dataset_info
from dataloaders.niftiio import Geometry, classmap_path, image_path, label_path, load_classmap, write_volume

NAMES = {0: "BG", 1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"}  # the PHANTOM / CHAOST2 label map
GEOMETRY = Geometry(spacing=(1.25, 1.25, 7.7), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def hand_labels() -> dict[int, np.ndarray]:
    """Two scans (ids 2 and 10) of 5 slices of 4x4, class pixels placed by hand."""
    a = np.zeros((5, 4, 4), dtype=np.int16)
    # slice 0: background only
    a[1, 0, 0] = 1  # slice 1: one LIVER pixel
    a[2, 1, 1:3] = 1  # slice 2: two LIVER pixels and one RK pixel
    a[2, 3, 3] = 2
    a[3] = 3  # slice 3: LK everywhere, no background
    a[4, 2, 0:2] = 4  # slice 4: two SPLEEN pixels
    b = np.zeros((4, 4, 4), dtype=np.uint8)
    b[0, 0, 0:3] = 2  # three RK pixels
    b[3, 1, 1] = 1
    return {10: b, 2: a}


def test_build_classmap_min_fg_1() -> None:
    cmap = build_classmap(hand_labels(), NAMES, min_fg=1)
    assert cmap == {
        "BG": {"2": [0, 1, 2, 4], "10": [0, 1, 2, 3]},
        "LIVER": {"2": [1, 2], "10": [3]},
        "RK": {"2": [2], "10": [0]},
        "LK": {"2": [3], "10": []},
        "SPLEEN": {"2": [4], "10": []},
    }
    assert list(cmap) == ["BG", "LIVER", "RK", "LK", "SPLEEN"]
    assert list(cmap["BG"]) == ["2", "10"]  # numeric scan order


def test_build_classmap_min_fg_2() -> None:
    cmap = build_classmap(hand_labels(), NAMES, min_fg=2)
    assert cmap == {
        "BG": {"2": [0, 1, 2, 4], "10": [0, 1, 2, 3]},
        "LIVER": {"2": [2], "10": []},
        "RK": {"2": [], "10": [0]},
        "LK": {"2": [3], "10": []},
        "SPLEEN": {"2": [4], "10": []},
    }


def test_build_classmap_rejects_unknown_ids_and_bad_min_fg() -> None:
    labels = hand_labels()
    labels[10][1, 2, 2] = 7
    with pytest.raises(ValueError, match=r"scan 10: label ids \[7\]"):
        build_classmap(labels, NAMES)
    with pytest.raises(ValueError, match="min_fg"):
        build_classmap(hand_labels(), NAMES, min_fg=0)


@pytest.fixture()
def label_dir(tmp_path: Path) -> Path:
    """Folder with image_/label_ files for scans 2 and 10."""
    for sid, lab in hand_labels().items():
        write_volume(np.zeros(lab.shape, np.float32), image_path(tmp_path, sid), geometry=GEOMETRY)
        write_volume(lab, label_path(tmp_path, sid), geometry=GEOMETRY)
    return tmp_path


def test_write_classmap_file(label_dir: Path) -> None:
    info = get_dataset_info("PHANTOM")
    path = write_classmap(label_dir, info, min_fg=2, progress=False)
    assert path == classmap_path(label_dir, 2) and path.name == "classmap_2.json"
    assert json.loads(path.read_text()) == build_classmap(hand_labels(), NAMES, min_fg=2)
    path1 = write_classmap(label_dir, info, progress=False)
    assert path1.name == "classmap_1.json"
    cmap = load_classmap(label_dir, list(info.labels.values()))
    assert cmap["LIVER"] == {"2": [1, 2], "10": [3]}


def test_cli_prints_slices_per_class(label_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data-dir", str(label_dir), "--dataset", "PHANTOM"]) == 0
    out = capsys.readouterr().out
    assert "classmap_1.json" in out
    assert "LIVER: 3 slices in 2/2 scans" in out
    assert "SPLEEN: 1 slices in 1/2 scans" in out


def test_cli_rejects_unknown_label_ids(label_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = hand_labels()[10]
    bad[2, 0, 0] = 9
    write_volume(bad, label_path(label_dir, 10), geometry=GEOMETRY)
    assert main(["--data-dir", str(label_dir), "--dataset", "PHANTOM"]) == 2
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after the progress bar
    assert last.startswith("error: ") and "label_10.nii.gz: label ids [9]" in last
    assert not classmap_path(label_dir, 1).exists()


def test_cli_missing_folder_and_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data-dir", str(tmp_path / "nowhere"), "--dataset", "PHANTOM"]) == 2
    assert "data directory not found" in capsys.readouterr().err
    write_volume(np.zeros((2, 4, 4), np.float32), image_path(tmp_path, 4), geometry=GEOMETRY)
    assert main(["--data-dir", str(tmp_path), "--dataset", "PHANTOM", "--min-fg", "1"]) == 2
    assert "label_4.nii.gz: file not found" in capsys.readouterr().err
