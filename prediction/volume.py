"""Whole-volume few-shot segmentation of a query scan from k annotated support scans (the ``predict.py`` path).

Every requested class is segmented with the EP2 rule of :func:`evaluation.ep1_alp.ep2_segment_class` (the same function
``validation.py with protocol=ep2`` scores): support slices at the chunk centres of each support scan's organ, the
organ's range estimated in the query from the body z-extents (no query label is used), every query slice scored,
largest 3D connected component kept. With k support scans the model receives the k slices of a chunk as its
multi-shot support and pools their prototypes (docs/method.md#several-shots).

Classes are combined into one label volume: a voxel claimed by several classes goes to the class with the largest margin
S_fg - S_bg (the ALP scores, docs/method.md#adaptive-local-prototype-pooling); labels keep the ids the supports carry
(e.g. the user's own 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from evaluation.ep2 import ClassSegmentation, MarginFn, SupportScan, ep2_segment_class


@dataclass
class VolumeSegmentation:
    """Output of :func:`segment_volume`.

    Attributes:
        labels: (Z, H, W) int32 label volume on the model's grid; 0 = background, else the class ids requested.
        classes: {class id: :class:`evaluation.ep1_alp.ClassSegmentation`} (per-class mask, margin, supports, range).
    """

    labels: np.ndarray
    classes: dict[int, ClassSegmentation]


def combine_classes(masks: dict[int, np.ndarray], margins: dict[int, np.ndarray]) -> np.ndarray:
    """One label volume from per-class masks; a voxel in several masks goes to the class with the largest margin.

    Args:
        masks: {class id: (Z, H, W) bool}.
        margins: {class id: (Z, H, W) float S_fg - S_bg}.

    Returns:
        (Z, H, W) int32; ties go to the class listed first.
    """
    ids = list(masks)
    if not ids:
        raise ValueError("combine_classes needs at least one class")
    shape = masks[ids[0]].shape
    best = np.full(shape, -np.inf, np.float32)
    out = np.zeros(shape, np.int32)
    for c in ids:
        take = masks[c] & (margins[c] > best)
        out[take] = c
        best[take] = margins[c][take]
    return out


def segment_volume(margin: MarginFn, supports: Sequence[SupportScan], query_image: np.ndarray,
                   query_body: np.ndarray, classes: Sequence[int], n_part: int = 3, keep_largest: bool = True,
                   progress: bool = False) -> VolumeSegmentation:
    """Segment the requested classes in a whole query volume.

    Args:
        margin: S_fg - S_bg of query slices against a support set (``evaluation.ep2.margin_fn(FastPredictor(...))``).
        supports: k >= 1 annotated support scans on the model's grid (image normalised, labels holding ``classes``).
        query_image: (Z, H, W) float32 normalised query, same H, W as the supports (Z may differ).
        query_body: (Z, H, W) bool body mask of the query.
        classes: label ids to segment, as they appear in the support labels.
        n_part: support slices per support scan (chunks).
        keep_largest: keep only the largest 3D connected component per class.
        progress: tqdm bar over the classes.

    Raises:
        ValueError: a support lacks a class, an empty body mask, or mismatched in-plane sizes.
    """
    per_class: dict[int, ClassSegmentation] = {}
    for c in tqdm(list(classes), desc="classes", unit="class", disable=not progress, leave=False):
        per_class[int(c)] = ep2_segment_class(margin, supports, query_image, query_body, int(c), n_part, keep_largest)
    labels = combine_classes({c: s.mask for c, s in per_class.items()}, {c: s.margin for c, s in per_class.items()})
    return VolumeSegmentation(labels=labels, classes=per_class)
