"""data_preprocessing.prepare: a user's scans in foreign geometries -> a processed folder that trains."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import training  # noqa: F401  (registers the 'train' command)
import validation  # noqa: F401  (registers the 'validate' command)
from config_ssl_upload import ex
from data_preprocessing.geometry import GridTransform, PrepareSettings, to_source_grid
from data_preprocessing.prepare import labelled_folds, main, pair_labels
from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from tests.raw_fixtures import make_chaos_patient
from util.checkpoint import load_checkpoint
from util.errors import ConfigError, RawDataError
from util.options import parse_classes

RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
RAW_IDS = {1: 50, 2: 60, 3: 70, 4: 80}  # phantom id -> id in the "user's" label files


def _export_ras(src: Path, sid: int, folder: Path, stem: str, label_stem: str | None = None) -> tuple[Path, Path]:
    """Write processed phantom scan ``sid`` NIfTI-style (x and y reversed, RAS direction): the same physical scan.

    Labels get the user's raw ids :data:`RAW_IDS`. Returns (image path, label path).
    """
    folder.mkdir(parents=True, exist_ok=True)
    img = niftiio.read_sitk(niftiio.image_path(src, sid))
    lab, _ = niftiio.read_label_volume(niftiio.label_path(src, sid))
    raw = np.zeros(lab.shape, np.uint8)
    for pid, rid in RAW_IDS.items():
        raw[lab == pid] = rid
    arr = sitk.GetArrayFromImage(img)
    corner = img.TransformIndexToPhysicalPoint((arr.shape[2] - 1, arr.shape[1] - 1, 0))
    out = []
    for data, name in ((arr, stem), (raw, label_stem or f"{stem}_seg")):
        vol = sitk.GetImageFromArray(np.ascontiguousarray(data[:, ::-1, ::-1]))
        vol.SetSpacing(img.GetSpacing())
        vol.SetOrigin(corner)
        vol.SetDirection(RAS)
        path = folder / f"{name}.nii.gz"
        sitk.WriteImage(vol, str(path))
        out.append(path)
    return out[0], out[1]


# ---------------------------------------------------------------------- option parsing, pairing, folds
def test_parse_classes() -> None:
    assert parse_classes("LIVER=5, SPLEEN=1") == {"LIVER": 5, "SPLEEN": 1}
    assert list(parse_classes("B=2,A=1")) == ["B", "A"]  # order kept: B -> 1, A -> 2
    for bad in ("LIVER", "LIVER=x", "1A=3", "BG=2", "A=1,A=2", "A=1,B=1", "A=0", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="--classes"):
            parse_classes(bad)


def test_pair_labels_by_name_by_order_and_errors(tmp_path: Path) -> None:
    imgs = [tmp_path / "case2_0000.nii.gz", tmp_path / "liver3.nii.gz", tmp_path / "other.nrrd"]
    assert pair_labels(imgs, [tmp_path / "lab" / "liver3_seg.nii.gz", tmp_path / "lab" / "case2.nii.gz"]) == \
        [tmp_path / "lab" / "case2.nii.gz", tmp_path / "lab" / "liver3_seg.nii.gz", None]
    by_order = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c.nii.gz"]
    assert pair_labels(imgs, by_order) == by_order  # names do not match, as many labels as images
    assert pair_labels(imgs, []) == [None, None, None]
    with pytest.raises(RawDataError, match="zz_seg.nii.gz: no image with a matching name"):
        pair_labels(imgs, [tmp_path / "zz_seg.nii.gz"])
    with pytest.raises(RawDataError, match="4 labels for 3 images"):
        pair_labels(imgs, by_order + [tmp_path / "d.nii.gz"])


def test_labelled_folds_cover_the_labelled_scans_once() -> None:
    labelled = [0, 2, 3, 5, 6, 8, 9]  # scans 1, 4, 7 unlabelled
    folds = labelled_folds(range(10), labelled, 5)
    assert len(folds) == 5
    queries = [q for f in folds for q in f["queries"]]
    assert sorted(queries) == labelled and len(queries) == len(set(queries))  # each labelled scan once
    for f in folds:
        assert len(f["support"]) == 1 and f["support"][0] in labelled and f["support"][0] not in f["queries"]
    # chunk bounds round(k * 7 / 5) = 0, 1, 3, 4, 6, 7
    assert [f["queries"] for f in folds] == [[0], [2, 3], [5], [6, 8], [9]]
    assert [f["support"] for f in folds] == [[2], [5], [6], [9], [0]]
    assert labelled_folds(range(3), [0, 2], 5) == [{"queries": [0], "support": [2]}, {"queries": [2], "support": [0]}]
    assert labelled_folds(range(4), [1], 5) == [{"queries": [], "support": []}]
    assert labelled_folds(range(4), [], 5) == [{"queries": [], "support": []}]


# ---------------------------------------------------------------------- end to end
def test_foreign_geometry_prepare_reproduces_the_processed_phantom(tiny_phantom: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    images = [_export_ras(tiny_phantom, sid, raw / "img", f"pat{sid * 5}")[0] for sid in (0, 1, 2)]
    labels = sorted((raw / "img").glob("*_seg.nii.gz"))
    (raw / "lab").mkdir()
    for p in labels:
        p.rename(raw / "lab" / p.name)
    # images given one by one in a shuffled order, labels as a folder (paired by name)
    out = tmp_path / "own"
    args = ["--images", str(images[2]), str(images[0]), str(images[1]), "--labels", str(raw / "lab"), "--modality",
            "MR", "--spacing", "5.0", "--size", "64", "--mr-clip-percentile", "100", "--classes", "SPLEEN=80,LIVER=50",
            "--no-progress"]
    assert main([*args, "--out", str(out), "--workers", "2"]) == 0
    scans = json.loads((out / "scans.json").read_text())
    assert [scans["scans"][str(i)]["name"] for i in range(3)] == ["pat10", "pat0", "pat5"]
    assert scans["classes"] == {"SPLEEN": {"id": 1, "raw_id": 80}, "LIVER": {"id": 2, "raw_id": 50}}
    assert PrepareSettings.from_dict(scans["settings"]) == PrepareSettings("MR", spacing=5.0, size=64,
                                                                           mr_clip_percentile=100)
    for new_id, sid in enumerate((2, 0, 1)):
        phantom_img, pgeom = niftiio.read_volume(niftiio.image_path(tiny_phantom, sid))
        phantom_lab, _ = niftiio.read_label_volume(niftiio.label_path(tiny_phantom, sid))
        img, geom = niftiio.read_volume(niftiio.image_path(out, new_id))
        lab, _ = niftiio.read_label_volume(niftiio.label_path(out, new_id))
        # the RAS export comes back the same way up, on the same physical grid, with the same voxels
        np.testing.assert_allclose(img, phantom_img, rtol=0, atol=1e-4)  # (no clip: percentile 100)
        assert pgeom.mismatch(geom) is None
        expected = np.where(phantom_lab == 4, 1, np.where(phantom_lab == 1, 2, 0))  # spleen -> 1, liver -> 2
        np.testing.assert_array_equal(lab, expected)
        assert scans["scans"][str(new_id)]["label_ids"] == [50, 80]
        # scans.json maps a processed label back onto the user's file, voxel for voxel
        transform = GridTransform.from_dict(scans["scans"][str(new_id)]["transform"])
        back = to_source_grid(np.where(lab == 1, 80, np.where(lab == 2, 50, 0)), transform)
        user = sitk.ReadImage(scans["scans"][str(new_id)]["label"])
        user_arr = sitk.GetArrayFromImage(user)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), np.where(np.isin(user_arr, [50, 80]), user_arr, 0))
        assert back.GetOrigin() == user.GetOrigin() and back.GetDirection() == user.GetDirection()
    for name in ("superpix-MIDDLE_0.nii.gz", "fgmask_2.nii.gz", "classmap_1.json", "dataset.json5", "verify.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".tmp-*"))
    info = get_dataset_info(out / "dataset.json5")
    assert info.labels == {0: "BG", 1: "SPLEEN", 2: "LIVER"} and info.eval_classes == (1, 2)
    assert info.data_dir == out.resolve() and info.test_classes(0) == [1, 2]
    folds = [info.fold(k, available=[0, 1, 2]) for k in range(info.n_folds)]
    assert [(f.queries, f.support) for f in folds] == [((0,), (1,)), ((1,), (2,)), ((2,), (0,))]
    assert json.loads((out / "verify.json").read_text())["ok"] is True
    # the same inputs with one worker: the same processed files
    out1 = tmp_path / "own1"
    assert main([*args, "--out", str(out1), "--workers", "1"]) == 0
    for sid in range(3):
        for path_fn in (niftiio.image_path, niftiio.label_path, niftiio.superpix_path):
            np.testing.assert_array_equal(niftiio.read_volume(path_fn(out, sid))[0],
                                          niftiio.read_volume(path_fn(out1, sid))[0])


def test_unlabelled_prepare_trains(tiny_phantom: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for sid in (0, 1, 3):
        _export_ras(tiny_phantom, sid, raw, f"scan{sid}")
    for p in raw.glob("*_seg.nii.gz"):
        p.unlink()
    patient = make_chaos_patient(tmp_path / "MR", 7, n_slices=12, rows=60, cols=56, pixel_spacing=(1.6, 1.6),
                                 gap=6.0)
    dicom = patient.dicom_files[0].parent  # a DICOM series folder next to the NIfTI files
    out = tmp_path / "unlabelled"
    assert main(["--images", str(raw), str(dicom), "--modality", "MR", "--out", str(out), "--spacing", "5.0",
                 "--size", "64", "--no-progress"]) == 0
    desc = json.loads("\n".join(line for line in (out / "dataset.json5").read_text().splitlines()
                                if not line.startswith("//")))
    assert desc["labels"] == {"0": "BG"} and desc["eval_classes"] == []
    assert desc["folds"] == [{"queries": [], "support": []}]
    for sid in range(4):
        assert not niftiio.read_label_volume(niftiio.label_path(out, sid))[0].any()  # unlabelled: all background
    scans = json.loads((out / "scans.json").read_text())
    assert scans["scans"]["3"]["name"] == "DICOM_anon" and scans["scans"]["3"]["label"] is None
    run_dir = tmp_path / "run"
    updates = {"dataset": str(out / "dataset.json5"), "data_dir": str(out), "run_dir": str(run_dir),
               "modelname": "lite_gn", "lr_schedule": "step",
               "input_size": (64, 64), "feature_hw": [8, 8], "proto_grid_size": 2, "num_workers": 0, "n_steps": 2,
               "lr_milestones": [1], "save_snapshot_every": 2, "print_interval": 1, "eval_classes": None}
    result = ex.run("train", named_configs=["demo"], config_updates=updates, options={"--unobserved": True})
    assert result.result["steps"] == 2
    ckpt = load_checkpoint(run_dir / "snapshots" / "2.pth")
    assert ckpt["fold"] == {"index": 0, "queries": [], "support": [], "train": [0, 1, 2, 3]}
    assert ckpt["preprocessing"]["settings"] == PrepareSettings("MR", spacing=5.0, size=64).to_dict()
    assert ckpt["preprocessing"]["source"] == str(out / "scans.json")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        ex.run("validate", named_configs=["demo"], options={"--unobserved": True},
               config_updates={**updates, "reload_model_path": str(run_dir / "snapshots" / "2.pth")})


def test_bad_inputs_fail_before_writing_anything(tiny_phantom: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "raw"
    img0, lab0 = _export_ras(tiny_phantom, 0, raw, "a")
    img1, lab1 = _export_ras(tiny_phantom, 1, raw, "b")
    shifted = niftiio.read_sitk(lab1)
    shifted.SetOrigin(tuple(v + d for v, d in zip(shifted.GetOrigin(), (10.0, 0.0, 0.0))))  # 10 mm off its image
    sitk.WriteImage(shifted, str(lab1))
    out = tmp_path / "out"
    code = main(["--images", str(img0), str(img1), "--labels", str(lab0), str(lab1), "--modality", "MR",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and str(lab1) in err and str(img1) in err and "origin" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    # a --classes id that no label holds
    assert main(["--images", str(img0), "--labels", str(lab0), "--modality", "MR", "--out", str(out),
                 "--classes", "LIVER=50,KIDNEY=9", "--size", "64", "--spacing", "5", "--no-progress"]) == 2
    assert "KIDNEY=9: no label file holds" in capsys.readouterr().err and not out.exists()
    # an existing, non-empty output folder
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["--images", str(img0), "--modality", "MR", "--out", str(out), "--no-progress"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (out / "keep.txt").is_file()
    # option errors: argparse's exit 2
    for argv in (["--window", "0", "100"], ["--classes", "LIVER"], ["--name", "my data"]):
        with pytest.raises(SystemExit) as stop:
            main(["--images", str(img0), "--modality", "MR", "--out", str(tmp_path / "x"), *argv])
        assert stop.value.code == 2
    assert not (tmp_path / "x").exists()
