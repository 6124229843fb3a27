"""launch.demo.export_foreign: the demo's foreign-geometry copy of a processed scan covers the same physical points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dataloaders import niftiio
from launch.demo import FOREIGN_DIRECTION, FOREIGN_SIZE, FOREIGN_SPACING, export_foreign


def test_export_foreign_keeps_physical_positions(tmp_path: Path) -> None:
    img = np.zeros((3, 64, 64), np.float32)
    lab = np.zeros((3, 64, 64), np.uint8)
    lab[1, 20:30, 10:16] = 4  # rows (y) 20..29, columns (x) 10..15 on slice 1
    img[lab > 0] = 100
    geom = niftiio.Geometry((5.0, 5.0, 7.7), (-157.5, -140.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    niftiio.write_volume(img, niftiio.image_path(tmp_path, 0), geom)
    niftiio.write_volume(lab, niftiio.label_path(tmp_path, 0), geom)
    img_path, lab_path = export_foreign(tmp_path, 0, tmp_path / "raw")
    out = sitk.ReadImage(str(lab_path))
    assert out.GetSize() == (FOREIGN_SIZE, FOREIGN_SIZE, 3)
    assert np.allclose(out.GetSpacing(), (FOREIGN_SPACING, FOREIGN_SPACING, 7.7))
    assert np.allclose(out.GetDirection(), FOREIGN_DIRECTION)
    src = sitk.ReadImage(str(niftiio.label_path(tmp_path, 0)))
    # the centre of the labelled block (x 12.5, y 24.5, z 1) is labelled in the export at the same point in mm
    point = src.TransformContinuousIndexToPhysicalPoint((12.5, 24.5, 1.0))
    idx = out.TransformPhysicalPointToIndex(point)
    assert out[idx] == 4
    arr = sitk.GetArrayFromImage(out)
    assert set(np.unique(arr).tolist()) == {0, 4} and not arr[0].any() and not arr[2].any()
    # the block is 6 x 10 voxels of 5 mm: 30 x 50 mm, about (30 / 0.7) x (50 / 0.7) voxels in the export
    assert abs(int((arr == 4).sum()) - (30 / 0.7) * (50 / 0.7)) < 0.1 * (30 / 0.7) * (50 / 0.7)
    # x and y run the other way (RAS-stored): a larger source index is a smaller exported index
    i = out.TransformPhysicalPointToIndex(src.TransformIndexToPhysicalPoint((10, 20, 1)))
    j = out.TransformPhysicalPointToIndex(src.TransformIndexToPhysicalPoint((15, 29, 1)))
    assert j[0] < i[0] and j[1] < i[1] and j[2] == i[2] == 1
    ii = sitk.ReadImage(str(img_path))
    assert ii.GetSize() == out.GetSize() and ii.GetOrigin() == out.GetOrigin()
