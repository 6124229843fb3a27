"""One physical scale: a scan written at 0.7 mm and at 3 mm in-plane lands on the same processed grid in mm.

The organs keep their size in mm (areas within 3 % on the processed grid), and ``predict.py`` gives the same Dice for
both copies; the checkpoint records the in-plane spacing of its training scans, measured on their headers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from data_preprocessing.geometry import (
    CT_SPACING,
    PrepareSettings,
    prediction_settings,
    preprocess_image,
    preprocess_label,
    preprocessing_record,
)
from data_preprocessing.phantom import synthesize_scan
from dataloaders.niftiio import DataFormatError, Geometry, image_path, write_volume
from models.grid_proto_fewshot import FewShotSeg


def _phantom(seed: int, scan_id: int) -> tuple[sitk.Image, sitk.Image]:
    """A CT-like phantom scan and its label as SimpleITK images in HU (the phantom stores 0..255 of -125..275)."""
    image, label, geom = synthesize_scan(seed, scan_id, size=128, n_slices_range=(20, 24), appearance="ct")
    img = geom.apply(sitk.GetImageFromArray(image / 255.0 * 400.0 - 125.0))
    lab = geom.apply(sitk.GetImageFromArray(label.astype(np.uint8)))
    return img, lab


def _at_spacing(img: sitk.Image, spacing: float, nearest: bool) -> sitk.Image:
    """The same field of view resampled to ``spacing`` mm in-plane (slices kept)."""
    size = [int(round(n * s / spacing)) for n, s in zip(img.GetSize()[:2], img.GetSpacing()[:2])]
    new_spacing = (spacing, spacing, img.GetSpacing()[2])
    origin = np.asarray(img.GetOrigin()) - np.asarray(img.GetSpacing()) / 2 + np.asarray(new_spacing) / 2
    origin[2] = img.GetOrigin()[2]
    return sitk.Resample(img, [*size, img.GetSize()[2]], sitk.Transform(),
                         sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, tuple(origin), new_spacing,
                         img.GetDirection(), -1000.0 if not nearest else 0, img.GetPixelID())


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scale")
    out = {}
    img, lab = _phantom(3, 0)
    for name, spacing in (("fine", 0.7), ("coarse", 3.0)):
        sitk.WriteImage(_at_spacing(img, spacing, False), str(root / f"{name}.nii.gz"))
        sitk.WriteImage(_at_spacing(lab, spacing, True), str(root / f"{name}_lab.nii.gz"))
        out[name], out[f"{name}_lab"] = root / f"{name}.nii.gz", root / f"{name}_lab.nii.gz"
    sup_img, sup_lab = _phantom(3, 1)  # another patient as the support, at its own 2.34 mm
    sitk.WriteImage(sup_img, str(root / "sup.nii.gz"))
    sitk.WriteImage(sup_lab, str(root / "sup_lab.nii.gz"))
    out["sup"], out["sup_lab"] = root / "sup.nii.gz", root / "sup_lab.nii.gz"
    torch.manual_seed(0)
    model = FewShotSeg(backbone="lite_gn", init="none", proto_grid_size=2, feature_hw=(8, 8), val_wsize=2)
    settings = PrepareSettings("CT", size=192)
    torch.save({"model": model.state_dict(), "step": 0,
                "config": {"modelname": "lite_gn", "proto_grid_size": 2, "feature_hw": [8, 8], "val_wsize": 2},
                "preprocessing": {"settings": settings.to_dict(), "spacing_mm": settings.spacing}},
               root / "model.pth")
    out["ckpt"], out["root"] = root / "model.pth", root
    return out


def test_ct_default_is_one_fixed_spacing_and_sabs_keeps_its_rule() -> None:
    assert PrepareSettings("CT").spacing == CT_SPACING == 1.6
    assert PrepareSettings("CT").inplane_spacing((0.7, 0.7, 2.0)) == (1.6, 1.6)
    assert PrepareSettings("CT").inplane_spacing((3.0, 3.0, 5.0)) == (1.6, 1.6)
    sabs = PrepareSettings.registry("SABS", "CT")
    assert sabs.spacing_rule == "sabs" and sabs.inplane_spacing((0.8, 0.6, 5.0)) == pytest.approx((1.4, 1.05))
    # a record written before the rule existed (CT, spacing None) keeps meaning the SABS rule
    old = {"modality": "CT", "spacing": None, "z_spacing": None, "size": 256, "window": [-125, 275],
           "mr_clip_percentile": None}
    assert PrepareSettings.from_dict(old) == sabs
    with pytest.raises(ValueError, match="spacing_rule"):
        PrepareSettings("MR", spacing_rule="sabs")


def test_organ_areas_in_mm_are_kept_on_the_processed_grid(copies: dict[str, Path]) -> None:
    settings = PrepareSettings("CT", size=192)
    areas = {}
    for name in ("fine", "coarse"):
        img = sitk.ReadImage(str(copies[name]))
        assert img.GetSpacing()[0] == pytest.approx({"fine": 0.7, "coarse": 3.0}[name])
        arr, transform, _ = preprocess_image(img, settings)
        lab = preprocess_label(sitk.ReadImage(str(copies[f"{name}_lab"])), transform)
        assert transform.processed.spacing[:2] == (1.6, 1.6)
        areas[name] = {c: int((lab == c).sum()) for c in (1, 2, 3, 4)}
    for c in (1, 2, 3, 4):
        assert areas["fine"][c] > 500
        assert abs(areas["fine"][c] - areas["coarse"][c]) <= 0.03 * areas["fine"][c], (c, areas)


def test_predict_gives_the_same_dice_for_both_resolutions(copies: dict[str, Path], tmp_path: Path) -> None:
    dice = {}
    for name in ("fine", "coarse"):
        out = tmp_path / name
        argv = ["--checkpoint", str(copies["ckpt"]), "--classes", "LIVER=1,SPLEEN=4", "--out", str(out),
                "--device", "cpu", "--support-image", str(copies["sup"]), "--support-label", str(copies["sup_lab"]),
                "--query", str(copies[name]), "--query-label", str(copies[f"{name}_lab"]), "--method", "atlas"]
        assert predict.main(argv) == 0
        summary = json.loads((out / "predictions.json").read_text())
        assert summary["preprocessing"]["spacing"] == 1.6 and summary["spacing"].startswith("1.6 mm")
        dice[name] = {c: v["dice"] for c, v in summary["queries"][name]["classes"].items()}
    for c in ("LIVER", "SPLEEN"):
        assert dice["fine"][c] > 0.25, dice  # another patient carried by registration: a real overlap
        assert abs(dice["fine"][c] - dice["coarse"][c]) <= 0.03, dice


def test_the_checkpoint_records_the_measured_spacing(tmp_path: Path) -> None:
    geom = Geometry((1.6, 1.6, 5.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    for sid in (0, 1):
        write_volume(np.zeros((3, 8, 8), np.float32), image_path(tmp_path, sid), geometry=geom)
    rec = preprocessing_record(tmp_path, "MINE", "CT", [0, 1], declared_spacing=1.6)
    assert rec["spacing_mm"] == 1.6 and rec["settings"]["spacing"] == 1.6
    settings, why = prediction_settings({"preprocessing": rec})
    assert settings.spacing == 1.6 and "1.6 mm" in why
    # a registry phantom of another size: the measured spacing wins over the registry's nominal one
    assert preprocessing_record(tmp_path, "PHANTOM", "MR", [0, 1])["settings"]["spacing"] == 1.6
    # two scales in one dataset are refused, naming the file
    write_volume(np.zeros((3, 8, 8), np.float32), image_path(tmp_path, 2),
                 geometry=Geometry((0.8, 0.8, 5.0), (0.0, 0.0, 0.0), geom.direction))
    with pytest.raises(DataFormatError, match=r"image_2\.nii\.gz: in-plane spacing 0\.8 mm"):
        preprocessing_record(tmp_path, "MINE", "CT", [0, 1, 2])
    # the SABS rule: each scan keeps its own; the record holds the median, predict.py uses it and says so
    sabs = preprocessing_record(tmp_path, "SABS", "CT", [0, 1, 2])
    assert sabs["settings"]["spacing_rule"] == "sabs" and sabs["spacing_mm"] == 1.6
    settings, why = prediction_settings({"preprocessing": sabs})
    assert settings.spacing == 1.6 and settings.spacing_rule == "fixed" and "median of the 3" in why
    # an older SABS checkpoint without a measured spacing: the dataset's typical one
    settings, why = prediction_settings({"config": {"dataset": "SABS"}}, fallback_spacing=1.37)
    assert settings.spacing == 1.37 and "typical" in why
