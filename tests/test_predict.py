"""predict.py and prediction/run.py with the report: foreign geometries, user label ids, k-shot, methods, errors,
values.

Scans are tiny synthetic MR-like volumes (12 x 48 x 48, 1.25 mm in-plane, 7.7 mm slices): air 0, a body cylinder of
100, an organ box of 200 labelled 5 and another box of 150 labelled 1. The model is an untrained ``lite_gn``
saved in a checkpoint that records its preprocessing (MR, 1.25 mm, size 48), so the processed grid of a scan written
on that grid is the scan's own grid.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from evaluation.metric import hd95
from models.grid_proto_fewshot import FewShotSeg
from prediction import run
from prediction.volume import VolumeSegmentation, segment_volume

SPACING = (1.25, 1.25, 7.7)
SETTINGS = {"modality": "MR", "spacing": 1.25, "z_spacing": None, "size": 48, "window": None,
            "mr_clip_percentile": 99.5}
LPS_FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # a NIfTI RAS-stored scan, as SimpleITK (LPS) reads it


def _volumes(shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    z, y, x = np.mgrid[:12, :48, :48]
    img = np.zeros((12, 48, 48), np.float32)
    body = (y - 24) ** 2 / 20 ** 2 + (x - 24) ** 2 / 22 ** 2 <= 1
    img[body] = 100
    lab = np.zeros((12, 48, 48), np.uint8)
    organ = (z >= 3 + shift) & (z <= 8 + shift) & (y >= 14) & (y < 26) & (x >= 10) & (x < 22)
    other = (z >= 2) & (z <= 9) & (y >= 28) & (y < 36) & (x >= 28) & (x < 38)
    img[organ], lab[organ] = 200, 5
    img[other], lab[other] = 150, 1
    return img, lab


def _write(arr: np.ndarray, path: Path, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def _foreign(img_path: Path, out: Path, size, spacing, direction, nearest: bool) -> Path:
    """Resample a scan onto another grid (other size, spacing and direction) covering the same body."""
    src = sitk.ReadImage(str(img_path))
    centre = np.asarray(src.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in src.GetSize()]))
    d = np.asarray(direction).reshape(3, 3)
    origin = centre - d @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    res = sitk.Resample(src, list(size), sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                        tuple(origin), spacing, direction, 0.0, src.GetPixelID())
    sitk.WriteImage(res, str(out))
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = FewShotSeg(backbone="lite_gn", init="none", proto_grid_size=2, feature_hw=(8, 8), val_wsize=2)
    ckpt = {"model": model.state_dict(), "step": 0,
            "config": {"modelname": "lite_gn", "proto_grid_size": 2, "feature_hw": [8, 8], "val_wsize": 2,
                       "n_sup_part": 3},
            "preprocessing": {"settings": SETTINGS}}
    torch.save(ckpt, root / "model.pth")
    paths = {"ckpt": root / "model.pth", "root": root}
    for name, shift in (("sup", 0), ("sup2", 1), ("qry", 1)):
        img, lab = _volumes(shift)
        paths[name] = _write(img, root / f"{name}.nii.gz")
        paths[f"{name}_lab"] = _write(lab, root / f"{name}_lab.nii.gz")
    # the query in a foreign geometry: flipped x, anisotropic spacing, another size; and a RAS-stored one
    for name, size, spacing, direction in (("flip", (40, 56, 12), (1.5, 1.1, 7.7), LPS_FLIP_X),
                                           ("ras", (52, 44, 14), (1.2, 1.4, 6.6), RAS)):
        paths[name] = _foreign(paths["qry"], root / f"{name}.nii.gz", size, spacing, direction, False)
        paths[f"{name}_lab"] = _foreign(paths["qry_lab"], root / f"{name}_lab.nii.gz", size, spacing, direction,
                                        True)
    return paths


def _args(case: dict[str, Path], out: Path, queries: list[str], labels: list[str] | None = None,
          supports: tuple[str, ...] = ("sup",), classes: str = "ORGAN=5") -> list[str]:
    argv = ["--checkpoint", str(case["ckpt"]), "--classes", classes, "--out", str(out), "--device", "cpu"]
    for s in supports:
        argv += ["--support-image", str(case[s]), "--support-label", str(case[f"{s}_lab"])]
    argv += ["--query", *[str(case[q]) for q in queries]]
    if labels:
        argv += ["--query-label", *[str(case[f"{q}_lab"]) for q in labels]]
    return argv


def test_hd95_by_hand() -> None:
    a = np.zeros((3, 4, 8), bool)
    b = np.zeros((3, 4, 8), bool)
    a[1, 1, 1] = True
    b[1, 1, 4] = True  # 3 voxels apart along x (W), 0.5 mm each: every surface distance is 1.5 mm
    assert hd95(a, b, (2.0, 1.0, 0.5)) == pytest.approx(1.5)
    assert hd95(a, a, (2.0, 1.0, 0.5)) == 0.0
    assert np.isnan(hd95(a, np.zeros_like(a), (1.0, 1.0, 1.0)))


def test_class_values_by_hand() -> None:
    seg = np.zeros((4, 5, 6), np.uint8)
    ref = np.zeros((4, 5, 6), np.uint8)
    seg[1:3, 1:4, 1:5] = 5  # 24 voxels on slices 1..2
    ref[1:3, 1:4, 1:3] = 5  # 12 voxels, all inside the prediction
    v = run.class_values(seg, ref, 5, (0.5, 1.0, 2.0))  # (x, y, z) mm: 1 mm^3 voxels
    assert v["volume_ml"] == pytest.approx(24 / 1000) and v["reference_volume_ml"] == pytest.approx(12 / 1000)
    assert v["n_slices"] == 2 and v["slices"] == [1, 2]
    assert v["dice"] == pytest.approx(2 * 12 / (24 + 12))
    assert v["label_id"] == 5 and v["hd95_mm"] > 0


def test_foreign_geometry_query_gets_its_exact_grid(case: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert predict.main(_args(case, out, ["flip", "ras", "qry"], ["flip", "ras", "qry"])) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert list(summary["queries"]) == ["flip", "ras", "qry"]
    for name in ("flip", "ras", "qry"):
        src = sitk.ReadImage(str(case[name]))
        seg = sitk.ReadImage(str(out / f"{name}_seg.nii.gz"))
        assert seg.GetSize() == src.GetSize()
        assert np.allclose(seg.GetSpacing(), src.GetSpacing(), rtol=0, atol=1e-6)
        assert np.allclose(seg.GetOrigin(), src.GetOrigin(), rtol=0, atol=1e-4)
        assert np.allclose(seg.GetDirection(), src.GetDirection(), rtol=0, atol=1e-6)
        arr = sitk.GetArrayFromImage(seg)
        assert set(np.unique(arr).tolist()) <= {0, 5}  # the user's id, not a contiguous one
        entry = summary["queries"][name]["classes"]["ORGAN"]
        voxel_ml = float(np.prod(src.GetSpacing())) / 1000
        assert entry["label_id"] == 5 and entry["volume_ml"] == pytest.approx((arr == 5).sum() * voxel_ml)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(case[f"{name}_lab"]))) == 5
        tp, fp, fn = ((arr == 5) & ref).sum(), ((arr == 5) & ~ref).sum(), ((arr != 5) & ref).sum()
        if tp + fp + fn:
            assert entry["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert summary["queries"][name]["registration"][0]["overlap_mm"] > 0
        overlay = sitk.ReadImage(str(out / summary["queries"][name]["overlay"]))  # one picture per query
        assert overlay.GetNumberOfComponentsPerPixel() >= 3 and min(overlay.GetSize()) > 100
    assert summary["method"] == "registered" and summary["rule"].startswith("registered:")
    assert summary["spacing"] == "1.25 mm, the checkpoint's training data"
    page = (out / "report.html").read_text()
    assert all(name in page for name in ("flip", "ras", "qry")) and "http" not in page.replace("http-equiv", "")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not list(tmp_path.glob(".tmp-*"))


def test_known_prediction_gives_hand_values(case: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A segmenter that returns the query's own reference (known prediction): Dice 1, HD95 0, exact volume."""
    _, lab = _volumes(1)

    def perfect(margin, supports, query, classes, **kw) -> VolumeSegmentation:
        real = segment_volume(margin, supports, query, classes, **kw)
        return VolumeSegmentation(np.where(lab == 5, 5, 0).astype(np.int32), real.classes, real.method,
                                  real.correspondences)

    monkeypatch.setattr(run, "segment_volume", perfect)
    out = tmp_path / "out"
    assert predict.main(_args(case, out, ["qry"], ["qry"])) == 0
    entry = json.loads((out / "predictions.json").read_text())["queries"]["qry"]["classes"]["ORGAN"]
    n = int((lab == 5).sum())  # 6 slices x 12 x 12 = 864 voxels of 1.25 x 1.25 x 7.7 mm
    assert n == 864
    assert entry["volume_ml"] == pytest.approx(864 * 1.25 * 1.25 * 7.7 / 1000)
    assert entry["dice"] == 1.0 and entry["hd95_mm"] == 0.0
    assert entry["n_slices"] == 6 and entry["slices"] == [4, 9]


def test_k_shot_and_every_method_through_the_command_line(case: dict[str, Path], tmp_path: Path) -> None:
    for method in ("registered", "atlas", "body"):
        out = tmp_path / method
        argv = _args(case, out, ["flip"], ["flip"], supports=("sup", "sup2"), classes="ORGAN=5,OTHER=1")
        assert predict.main(argv + ["--method", method]) == 0
        summary = json.loads((out / "predictions.json").read_text())
        assert summary["method"] == method and summary["rule"].startswith(f"{method}:")
        assert len(summary["supports"]) == 2 and set(summary["queries"]["flip"]["classes"]) == {"ORGAN", "OTHER"}
        assert len(summary["queries"]["flip"]["registration"]) == (0 if method == "body" else 2)  # one per shot
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "flip_seg.nii.gz"))))) <= {0, 1, 5}
        assert method in (out / "report.html").read_text()


def test_atlas_method_carries_the_support_label(case: dict[str, Path], tmp_path: Path) -> None:
    """The query is the support itself: registration is the identity and the atlas gives the support's label."""
    out = tmp_path / "out"
    assert predict.main(_args(case, out, ["sup"], ["sup"], classes="ORGAN=5,OTHER=1") + ["--method", "atlas"]) == 0
    entry = json.loads((out / "predictions.json").read_text())["queries"]["sup"]["classes"]
    assert entry["ORGAN"]["dice"] > 0.95 and entry["OTHER"]["dice"] > 0.95


def test_support_label_without_the_class_is_an_error(case: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert predict.main(_args(case, out, ["qry"], classes="ORGAN=5,KIDNEY=7")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "sup_lab.nii.gz" in err and "KIDNEY=7" in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_label_on_another_grid_names_both_files(case: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = _args(case, out, ["flip"], ["flip"])
    argv[argv.index("--query-label") + 1] = str(case["qry_lab"])  # 48x48x12, flip is 40x56x12
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "qry_lab.nii.gz" in err and "flip.nii.gz" in err
    assert not out.exists()


def test_failure_during_work_leaves_nothing(case: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    empty = _write(np.zeros((12, 48, 48), np.float32), tmp_path / "empty.nii.gz")  # no body: EP2 cannot place it
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("{}")  # a previous output: kept when the new run fails
    argv = _args(case, out, ["qry"])
    argv[argv.index("--query") + 1] = str(empty)
    assert predict.main(argv) == 2
    assert "empty.nii.gz" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["predictions.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.nii.gz", "out"]
    # a folder holding something else is refused before any work
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert predict.main(_args(case, other, ["qry"])) == 2
    assert "notes.txt" not in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"


def test_plain_state_dict_needs_modelname_and_flags(case: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(case["ckpt"], weights_only=True)["model"], plain)
    argv = _args(case, tmp_path / "out", ["qry"])
    argv[argv.index("--checkpoint") + 1] = str(plain)
    assert predict.main(argv) == 2
    assert "records no preprocessing" in capsys.readouterr().err
    assert predict.main(argv + ["--modality", "MR", "--size", "48"]) == 2
    assert "--modelname" in capsys.readouterr().err
    # lite_gn with the default grid (proto_grid_size 8, 32x32 features) has the same weights: it loads
    assert predict.main(argv + ["--modality", "MR", "--size", "48", "--modelname", "lite_gn"]) == 0
    assert (tmp_path / "out" / "qry_seg.nii.gz").is_file()
