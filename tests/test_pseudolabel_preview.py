"""Tests for data_preprocessing/pseudolabel_preview.py and ``pseudolabel --preview``: the statistics against
hand-computed ones, the PNGs (present, readable, of the expected size), the missing-file error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_preprocessing import pseudolabel
from data_preprocessing.pseudolabel_preview import (
    CAPTION_HEIGHT,
    enlargement,
    preview_slices,
    region_stats,
    scan_stats,
    write_preview,
)
from dataloaders import niftiio

# spacing (x, y, z) in mm: one pixel is 0.5 x 0.8 = 0.4 mm^2, one voxel 1.2 mm^3
GEOM = niftiio.Geometry(spacing=(0.5, 0.8, 3.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _hand_ids() -> np.ndarray:
    """(4, 10, 12) ids: slice 0 empty; slice 1 ids 1 (6 px) and 2 (10 px); slice 2 id 3 (20 px); slice 3 ids 1 (4 px),
    4 (4 px) and 5 (1 px)."""
    ids = np.zeros((4, 10, 12), np.int32)
    ids[1, 0:2, 0:3] = 1
    ids[1, 5:7, 0:5] = 2
    ids[2, 2:6, 2:7] = 3
    ids[3, 0:2, 0:2] = 1
    ids[3, 8:10, 8:10] = 4
    ids[3, 5, 5] = 5
    return ids


def _folder(root: Path, n_scans: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for sid in range(n_scans):
        niftiio.write_volume(rng.normal(size=(4, 10, 12)).astype(np.float32), niftiio.image_path(root, sid), GEOM)
        niftiio.write_volume(_hand_ids(), niftiio.superpix_path(root, sid), GEOM)
    return root


def test_statistics_by_hand() -> None:
    ids = _hand_ids()
    assert region_stats(ids[0], 0.4) == {"regions": 0, "pixels": 0, "mean_pixels": pytest.approx(math.nan,
                                                                                                  nan_ok=True),
                                         "mean_mm2": pytest.approx(math.nan, nan_ok=True)}
    assert region_stats(ids[1], 0.4) == {"regions": 2, "pixels": 16, "mean_pixels": 8.0, "mean_mm2": pytest.approx(3.2)}
    assert region_stats(ids[3], 0.4) == {"regions": 3, "pixels": 9, "mean_pixels": 3.0, "mean_mm2": pytest.approx(1.2)}
    # 3 slices hold 2 + 1 + 3 = 6 regions of 16 + 20 + 9 = 45 pixels: 2 per slice, 7.5 px = 3.0 mm^2 each
    assert scan_stats(ids, GEOM.spacing, dim=2) == {"slices": 3, "regions_per_slice": 2.0, "mean_pixels": 7.5,
                                                    "mean_mm2": pytest.approx(3.0)}
    # as supervoxels: 5 distinct ids over 45 voxels: 9 voxels = 9 x 1.2 mm^3 each
    three = scan_stats(ids, GEOM.spacing, dim=3)
    assert three["supervoxels"] == 5 and three["mean_voxels"] == 9.0 and three["mean_mm3"] == pytest.approx(10.8)
    assert preview_slices(ids, 3) == [1, 2, 3] and preview_slices(ids, 1) == [2]
    assert preview_slices(np.zeros((3, 2, 2), np.int32), 3) == []


def test_preview_files_and_statistics(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    report = write_preview(data, tmp_path / "out", "PHANTOM", scan_ids=[1])
    assert list(report["scans"]) == ["1"]
    scan = report["scans"]["1"]
    assert (scan["slices"], scan["regions_per_slice"], scan["mean_pixels"]) == (3, 2.0, 7.5)
    assert [(p["z"], p["regions"], p["mean_pixels"]) for p in scan["slices_previewed"]] == [(1, 2, 8.0), (2, 1, 20.0),
                                                                                           (3, 3, 3.0)]
    # one PNG per previewed slice: both panels enlarged by a whole factor to >= 256 px, under the caption band
    f = enlargement(10, 12)
    assert f == 22
    for entry in scan["slices_previewed"]:
        with Image.open(tmp_path / "out" / entry["png"]) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (2 * 12 * f, 10 * f + CAPTION_HEIGHT)
            pixels = np.asarray(img)
        left, right = pixels[CAPTION_HEIGHT:, :12 * f], pixels[CAPTION_HEIGHT:, 12 * f:]
        assert (left[..., 0] == left[..., 1]).all()  # the slice in grey
        assert (right != left).any(axis=-1).sum() > 0 and (right == 255).all(axis=-1).any()  # colours, white borders
        assert (pixels[:CAPTION_HEIGHT] > 200).all(axis=-1).any()  # the caption: light text on black
    saved = json.loads((tmp_path / "out" / "preview.json").read_text())
    assert saved["scans"]["1"]["mean_mm2"] == pytest.approx(3.0) and saved["dim"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["preview.json", "scan_1_z1.png", "scan_1_z2.png",
                                                                     "scan_1_z3.png"]


def test_cli_preview_on_the_tiny_phantom(tiny_phantom: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preview"
    assert pseudolabel.main(["--dataset", "PHANTOM", "--data-dir", str(tiny_phantom), "--preview", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "preview.json").read_text())
    assert list(report["scans"]) == ["0", "1", "2"]  # the first 3 scans
    for sid, scan in report["scans"].items():
        ids, geom = niftiio.read_label_volume(niftiio.superpix_path(tiny_phantom, int(sid)))
        used = [z for z in range(ids.shape[0]) if ids[z].any()]
        counts = [len(set(ids[z][ids[z] > 0].tolist())) for z in used]
        assert scan["slices"] == len(used) and scan["regions_per_slice"] == pytest.approx(np.mean(counts))
        assert scan["mean_pixels"] == pytest.approx(sum(int((ids[z] > 0).sum()) for z in used) / sum(counts))
        assert scan["mean_mm2"] == pytest.approx(scan["mean_pixels"] * geom.spacing[0] * geom.spacing[1])
        assert len(scan["slices_previewed"]) == 3
        for entry in scan["slices_previewed"]:
            with Image.open(out / entry["png"]) as img:
                assert img.size == (2 * 64 * 4, 64 * 4 + CAPTION_HEIGHT)
            assert f"{entry['png']}: {entry['regions']} region{'' if entry['regions'] == 1 else 's'}, " in printed
        assert f"scan {sid}: {scan['slices']} slices with superpixels" in printed


def test_missing_pseudolabels_and_options_that_do_not_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path / "data")
    niftiio.superpix_path(data, 0).unlink()
    out = tmp_path / "out"
    assert pseudolabel.main(["--dataset", "PHANTOM", "--data-dir", str(data), "--preview", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {data}/superpix-MIDDLE_0.nii.gz: superpixels file not found; generate it with python -m "
        f"data_preprocessing.pseudolabel --dataset PHANTOM --data-dir {data} --scans 0")
    assert pseudolabel.main(["--dataset", "PHANTOM", "--data-dir", str(data), "--preview", str(out), "--dim", "3",
                             "--scans", "1"]) == 2
    assert "supervox-MIDDLE_1.nii.gz: supervoxels file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        pseudolabel.main(["--dataset", "PHANTOM", "--data-dir", str(data), "--preview", str(out), "--parity"])
    assert exit_info.value.code == 2 and "--preview reads the existing pseudolabels" in capsys.readouterr().err
