"""Annotated scans for evaluation: normalised images, checked labels and geometry
(docs/method.md#load-time-normalisation).

``validation.py`` loads the fold's query and support scans with :func:`load_annotated_scans` and hands the dicts
to ``evaluation.ep1_alp.evaluate_fold``. The same :class:`~dataloaders.normalization.Normalizer` as in training is
applied: the one stored in the checkpoint, or (CT) one computed from the fold's training scans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataloaders import niftiio
from dataloaders.dataset_info import DatasetInfo
from dataloaders.normalization import Normalizer, normalizer_from_scans


@dataclass
class AnnotatedScans:
    """Evaluation volumes keyed by scan id.

    Attributes:
        images: ``{id: (Z, H, W) float32}``, normalised.
        labels: ``{id: (Z, H, W) int32}``, values in the dataset's label map.
        geometry: ``{id: niftiio.Geometry}`` of the processed image (for writing predictions).
        normalizer: the normalisation that was applied.
    """

    images: dict[int, np.ndarray]
    labels: dict[int, np.ndarray]
    geometry: dict[int, niftiio.Geometry]
    normalizer: Normalizer


def load_annotated_scans(data_dir: str | Path, info: DatasetInfo, scan_ids: Sequence[int],
                         normalizer: Normalizer | None = None, train_scan_ids: Sequence[int] | None = None,
                         progress: bool = True) -> AnnotatedScans:
    """Load, check and normalise annotated scans.

    Args:
        data_dir: processed-data folder.
        info: dataset description (modality and label map).
        scan_ids: scans to load (queries and supports of a fold).
        normalizer: normalisation to apply, e.g. ``Normalizer.from_dict(checkpoint["normalizer"])``. Default:
            per-volume for MR; for CT the global statistics of ``train_scan_ids``.
        train_scan_ids: the fold's training scans (needed for CT when ``normalizer`` is not given).
        progress: show a tqdm bar.

    Raises:
        niftiio.DataFormatError: missing/corrupt files, grid mismatch, or label ids outside ``info.labels``.
        ValueError: CT without a normaliser or training scans.
    """
    if normalizer is None:
        if info.modality == "CT" and not train_scan_ids:
            raise ValueError(f"{info.name} is CT: pass the checkpoint's Normalizer or the fold's training scan ids "
                             f"(CT statistics come from the training scans: docs/method.md#q16-ct-statistics)")
        normalizer = normalizer_from_scans(data_dir, info.modality, list(train_scan_ids or ()), progress)
    known = set(info.labels)
    images: dict[int, np.ndarray] = {}
    labels: dict[int, np.ndarray] = {}
    geometry: dict[int, niftiio.Geometry] = {}
    for sid in tqdm([int(i) for i in scan_ids], desc="loading annotated scans", disable=not progress):
        scan = niftiio.load_scan(data_dir, sid, with_label=True, known_labels=known)
        # kept on the image's own grid: predictors resize for the network only (evaluation.predictors), so metrics and
        # predictions are on the grid of image_<id>.nii.gz
        images[sid], labels[sid], geometry[sid] = normalizer(scan.image), scan.label, scan.geometry
    return AnnotatedScans(images, labels, geometry, normalizer)
