"""Annotated evaluation scans: normalisation (MR per volume, CT from training scans), label checks, geometry."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dataloaders import niftiio
from dataloaders.dataset_info import get_dataset_info
from dataloaders.manual_anno_dataset import load_annotated_scans
from dataloaders.normalization import Normalizer

INFO = get_dataset_info("PHANTOM")  # MR, labels 0..4
CT_INFO = replace(INFO, modality="CT")
GEOMS = {sid: niftiio.Geometry((1.5, 1.5, 4.0 + sid), (10.0 * sid, 0.0, -5.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
         for sid in range(4)}


def _scan(sid: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sid)
    image = rng.uniform(0, 255, (5, 16, 16)).astype(np.float32) + 30 * sid
    label = np.zeros((5, 16, 16), np.uint8)
    label[1:3, 2:6, 3:9] = 1
    label[2:5, 9:14, 9:12] = 1 + sid  # class 1..4 by scan
    return image, label


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    for sid in range(4):
        image, label = _scan(sid)
        niftiio.write_volume(image, niftiio.image_path(tmp_path, sid), GEOMS[sid])
        niftiio.write_volume(label, niftiio.label_path(tmp_path, sid), GEOMS[sid])
    return tmp_path


def test_mr_scans_per_volume_zscore_labels_geometry(data_dir: Path) -> None:
    out = load_annotated_scans(data_dir, INFO, [2, 0], progress=False)
    assert list(out.images) == [2, 0] and out.normalizer == Normalizer("per_volume")
    for sid in (0, 2):
        image, label = _scan(sid)
        expected = (image - image.mean(dtype=np.float64)) / image.std(dtype=np.float64)
        assert out.images[sid].dtype == np.float32 and np.allclose(out.images[sid], expected, atol=1e-5)
        assert np.array_equal(out.labels[sid], label)
        assert GEOMS[sid].mismatch(out.geometry[sid]) is None


def test_ct_uses_training_scan_statistics(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="q16-ct-statistics"):
        load_annotated_scans(data_dir, CT_INFO, [0], progress=False)
    out = load_annotated_scans(data_dir, CT_INFO, [0, 1], train_scan_ids=[2, 3], progress=False)
    train = np.concatenate([_scan(s)[0].ravel().astype(np.float64) for s in (2, 3)])
    assert out.normalizer.scan_ids == (2, 3)
    assert (out.normalizer.mean, out.normalizer.std) == pytest.approx((train.mean(), train.std()))
    image0 = _scan(0)[0]
    assert np.allclose(out.images[0], (image0 - train.mean()) / train.std(), atol=1e-5)
    # a normaliser restored from a checkpoint dict gives the same volumes without reading training scans
    again = load_annotated_scans(data_dir, CT_INFO, [0], normalizer=Normalizer.from_dict(out.normalizer.to_dict()),
                                 progress=False)
    assert np.array_equal(again.images[0], out.images[0])


def test_unknown_label_value_is_an_error(data_dir: Path) -> None:
    image, label = _scan(1)
    label[0, 0, 0] = 7
    niftiio.write_volume(label, niftiio.label_path(data_dir, 1), GEOMS[1])
    with pytest.raises(niftiio.DataFormatError, match=r"label_1\.nii\.gz: label ids \[7\]"):
        load_annotated_scans(data_dir, INFO, [0, 1], progress=False)

