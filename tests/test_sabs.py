"""Synapse / SABS CT pipeline on synthetic 512x512 HU scans: window formula, renumbering, grid, labels, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_preprocessing import sabs
from dataloaders.niftiio import (
    classmap_path,
    image_path,
    label_path,
    list_scan_ids,
    read_label_volume,
    read_volume,
    superpix_path,
)
from tests.raw_fixtures import SynapseCase, make_synapse
from util.errors import RawDataError

NAMES = ("img0021", "img0002", "img0010")  # sorted: img0002 -> 0, img0010 -> 1, img0021 -> 2
N_SLICES = (3, 4, 5)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SynapseCase]]:
    root = tmp_path_factory.mktemp("synapse")
    return root, make_synapse(root, names=NAMES, n_slices=N_SLICES)


@pytest.fixture(scope="module")
def processed(raw: tuple[Path, dict[str, SynapseCase]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = raw
    out = tmp_path_factory.mktemp("sabs_out") / "sabs_CT_normalized"
    before = _digest(root)
    assert sabs.main(["--raw", str(root), "--out", str(out), "--workers", "1", "--no-progress",
                      "--keep-intermediate"]) == 0
    assert _digest(root) == before  # raw inputs are never modified
    return out


def test_fixture_is_synapse_like(raw: tuple[Path, dict[str, SynapseCase]]) -> None:
    case = raw[1]["img0002"]
    img = sitk.ReadImage(str(case.image_file))
    assert img.GetSize() == (512, 512, 4) and img.GetSpacing() == pytest.approx((0.7, 0.7, 3.0))
    assert case.hu.min() <= -1000 and case.hu.max() >= 700  # HU values


def test_renumbering_follows_sorted_names(processed: Path, raw: tuple[Path, dict[str, SynapseCase]]) -> None:
    mapping = json.loads((processed / sabs.ID_MAP_NAME).read_text())
    assert mapping == {"0": {"image": "img0002.nii.gz", "label": "label0002.nii.gz"},
                       "1": {"image": "img0010.nii.gz", "label": "label0010.nii.gz"},
                       "2": {"image": "img0021.nii.gz", "label": "label0021.nii.gz"}}
    assert list_scan_ids(processed) == [0, 1, 2]
    for sid, name in enumerate(("img0002", "img0010", "img0021")):
        image, _ = read_volume(image_path(processed, sid))
        assert image.shape[0] == raw[1][name].hu.shape[0]  # 4, 5, 3 slices: each scan kept its own data
        work_label, _ = read_label_volume(label_path(processed / "intermediate", sid))
        np.testing.assert_array_equal(work_label, raw[1][name].label)  # labels copied unchanged


def test_window_formula_on_the_intermediate(processed: Path, raw: tuple[Path, dict[str, SynapseCase]]) -> None:
    work_image, geom = read_volume(image_path(processed / "intermediate", 1))
    hu = raw[1]["img0010"].hu.astype(np.float64)
    expected = (np.clip(hu, -125, 275) + 125) / 400 * 255
    np.testing.assert_allclose(work_image, expected, rtol=0, atol=1e-3)
    assert geom.spacing == pytest.approx((0.7, 0.7, 3.0)) and geom.origin == pytest.approx(raw[1]["img0010"].origin)


def test_output_grid_is_exactly_256(processed: Path, raw: tuple[Path, dict[str, SynapseCase]]) -> None:
    for sid, name in enumerate(("img0002", "img0010", "img0021")):
        image, geom = read_volume(image_path(processed, sid))
        label, lgeom = read_label_volume(label_path(processed, sid))
        z = raw[1][name].hu.shape[0]
        assert image.shape == label.shape == (z, 256, 256)
        assert geom.spacing == pytest.approx((0.7 * 1.75, 0.7 * 1.75, 3.0))  # 448 px -> 256 px, z unchanged
        # the first output voxel is the raw voxel (32, 32): the crop moved the origin by 32 px
        ox, oy, oz = raw[1][name].origin
        assert geom.origin == pytest.approx((ox + 32 * 0.7, oy + 32 * 0.7, oz))
        assert lgeom == geom
        assert set(np.unique(label)) == {0, 1, 2, 3, 6, 8}
        assert 0.0 <= image.min() and image.max() <= 255.0
        liver = image[label == 6]
        assert np.median(liver) == pytest.approx((60 + 125) / 400 * 255, abs=3.0)  # labels sit on their organs
        assert superpix_path(processed, sid).is_file()
    assert classmap_path(processed).is_file()


def test_label_matches_a_direct_subsample(processed: Path, raw: tuple[Path, dict[str, SynapseCase]]) -> None:
    # output pixel j sits on raw pixel 32 + 1.75 j; where the raw label is constant around it, it must agree
    label, _ = read_label_volume(label_path(processed, 0))
    raw_label = raw[1]["img0002"].label
    js = np.arange(0, 256, 5)
    src = np.rint(32 + 1.75 * js).astype(int)
    sub = raw_label[:, src][:, :, src]
    out = label[:, js][:, :, js]
    assert np.mean(out == sub) > 0.97


def test_rerun_identical_and_intermediate_removed(processed: Path, raw: tuple[Path, dict[str, SynapseCase]],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "again"
    assert sabs.main(["--raw", str(raw[0]), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert not (out / "intermediate").exists()
    kept = {k: v for k, v in _digest(processed).items() if not k.startswith("intermediate")}
    assert _digest(out) == kept


def test_parity_grid_and_per_volume_rescale(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    cases = make_synapse(root, names=("img0005",), n_slices=(2,), hu_range=(-100.0, 200.0))
    out = tmp_path / "out"
    assert sabs.main(["--raw", str(root), "--out", str(out), "--workers", "1", "--no-progress", "--parity",
                      "--keep-intermediate"]) == 0
    work_image, _ = read_volume(image_path(out / "intermediate", 0))
    hu = cases["img0005"].hu.astype(np.float64)
    np.testing.assert_allclose(work_image, (hu - hu.min()) / (hu.max() - hu.min()) * 255, atol=1e-3)
    image, geom = read_volume(image_path(out, 0))
    assert image.shape == (2, 257, 257)  # the original's grid (docs/method.md#q1-sabs-257-grid)
    assert geom.spacing == pytest.approx((0.7 * 1.75, 0.7 * 1.75, 3.0))


def test_missing_label_and_unknown_label_value(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    cases = make_synapse(root, names=("img0001", "img0002"), n_slices=(1, 1), size=96)
    cases["img0002"].label_file.unlink()
    with pytest.raises(RawDataError, match=r"img0002\.nii\.gz: no label file with number 2"):
        sabs.find_pairs(root)
    lab = cases["img0001"].label.copy()
    lab[0, 0, 0] = 14
    bad = sitk.GetImageFromArray(lab)
    bad.CopyInformation(sitk.ReadImage(str(cases["img0001"].image_file)))
    sitk.WriteImage(bad, str(cases["img0001"].label_file))
    (root / "img" / "img0002.nii.gz").unlink()
    with pytest.raises(RawDataError, match=r"label0001\.nii\.gz: unexpected values \[14\]"):
        sabs.normalize_all(root, tmp_path / "w", tmp_path / "o", progress=False)
    with pytest.raises(RawDataError, match="folder not found"):
        sabs.find_pairs(tmp_path / "nothing")


def test_label_on_another_grid_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    cases = make_synapse(root, names=("img0001",), n_slices=(1,), size=96)
    lbl = sitk.ReadImage(str(cases["img0001"].label_file))
    lbl.SetOrigin((0.0, 0.0, 50.0))
    sitk.WriteImage(lbl, str(cases["img0001"].label_file))
    with pytest.raises(RawDataError, match=r"label0001\.nii\.gz: not on the grid of its image .*img0001"):
        sabs.normalize_all(root, tmp_path / "w", tmp_path / "o", progress=False)


def test_roi_grid_rules() -> None:
    spacing, size = sabs.roi_grid((448, 448, 7), (0.8, 0.6, 2.5), "exact")
    assert size == (256, 256, 7) and spacing == pytest.approx((1.4, 1.05, 2.5))
    spacing, size = sabs.roi_grid((448, 448, 7), (0.8, 0.6, 2.5), "legacy257")
    assert size == (257, 257, 7) and spacing == pytest.approx((1.4, 1.05, 2.5))
    with pytest.raises(ValueError, match="unknown SABS grid"):
        sabs.roi_grid((448, 448, 7), (0.8, 0.6, 2.5), "other")  # type: ignore[arg-type]
