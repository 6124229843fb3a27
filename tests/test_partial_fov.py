"""Partial fields of view on phantom-derived files, through prediction.volume (the path of predict.py and EP2).

Patients are phantom scans (CT appearance) of different seeds. The network is replaced by the learning-free
intensity baseline (models.intensity_baseline, the same ``margin`` interface), so the properties below are those of
the placement (registration, z-range with open ends, prior) and hold without a trained checkpoint; the figures with
trained checkpoints are in docs/protocols.md.

- a query that is a 20-slice slab cut from a longer scan (its own origin) is segmented as on the whole scan: on the
  slab's slices its Dice is at most 0.05 below the whole scan's;
- a support that covers only part of the query's organs leaves the query's range open on the cut side: the whole
  query segmented from a 20-slice support slab reaches at least 0.9 x the Dice it gets from the whole support.
"""

from __future__ import annotations

import numpy as np
import pytest

from data_preprocessing.phantom import synthesize_scan
from evaluation.ep2 import margin_fn
from evaluation.metric import mask_dice
from models.intensity_baseline import IntensityBaseline
from prediction.volume import QueryScan, SupportScan, prepare_atlases, segment_volume

LIVER, SPLEEN = 1, 4


def _scan(seed: int, scan_id: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    image, label, geom = synthesize_scan(seed, scan_id, size=128, n_slices_range=(44, 48), appearance="ct")
    return image.astype(np.float32), label.astype(np.int32), tuple(float(v) for v in reversed(geom.spacing))


def _norm(image: np.ndarray) -> np.ndarray:
    return ((image - 100.0) / 60.0).astype(np.float32)


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return mask_dice(pred, gt)


@pytest.fixture(scope="module")
def scans() -> dict:
    sup_img, sup_lab, sup_sp = _scan(11, 0)
    qry_img, qry_lab, qry_sp = _scan(12, 0)
    return {"support": SupportScan(_norm(sup_img), sup_lab, sup_img, sup_sp), "sup_raw": sup_img,
            "query_img": qry_img, "query_lab": qry_lab, "query_sp": qry_sp}


def _segment(support: SupportScan, image: np.ndarray, spacing: tuple[float, float, float], classes: list[int]):
    query = QueryScan(_norm(image), image, spacing)
    return segment_volume(margin_fn(IntensityBaseline()), [support], query, classes, modality="CT",
                          atlases=prepare_atlases([support], "CT"))


def test_a_query_slab_is_segmented_as_on_the_whole_scan(scans: dict) -> None:
    full = _segment(scans["support"], scans["query_img"], scans["query_sp"], [LIVER, SPLEEN])
    lab = scans["query_lab"]
    zs = np.flatnonzero((lab == LIVER).any(axis=(1, 2)))
    start = int(zs[len(zs) // 2]) - 10  # 20 slices through the liver, the spleen's lower part
    cut = slice(start, start + 20)
    slab = _segment(scans["support"], scans["query_img"][cut], scans["query_sp"], [LIVER, SPLEEN])
    assert slab.labels.shape == (20, *lab.shape[1:])
    for c in (LIVER, SPLEEN):
        whole_on_slab = _dice(full.labels[cut] == c, lab[cut] == c)
        on_slab = _dice(slab.labels == c, lab[cut] == c)
        assert whole_on_slab > 0.4, (c, whole_on_slab)
        # the slab loses at most 0.05 (here it does as well or better: the whole scan's largest component may
        # keep a false positive that the slab does not hold; 0.911 vs 0.910 liver, 0.835 vs 0.782 spleen)
        assert on_slab >= whole_on_slab - 0.05, (c, on_slab, whole_on_slab)
    # the slab is placed where its anatomy is: its slices match the support slices the whole scan's do
    corr_full, corr_slab = full.correspondences[0], slab.correspondences[0]
    np.testing.assert_allclose(corr_slab.support_z_raw, corr_full.support_z_raw[cut], atol=1.5)


def test_a_support_slab_leaves_the_range_open_on_its_cut_sides(scans: dict) -> None:
    sup = scans["support"]
    zs = np.flatnonzero((sup.label == LIVER).any(axis=(1, 2)))
    start = int(zs[len(zs) // 2]) - 10
    cut = slice(start, start + 20)  # the support's liver is cut at both ends
    slab = SupportScan(sup.image[cut], sup.label[cut], sup.raw[cut], sup.spacing_zyx)
    assert (slab.label[0] == LIVER).any() and (slab.label[-1] == LIVER).any()
    lab = scans["query_lab"]
    whole = _segment(sup, scans["query_img"], scans["query_sp"], [LIVER])
    from_slab = _segment(slab, scans["query_img"], scans["query_sp"], [LIVER])
    assert from_slab.classes[LIVER].placement.open_ends == (True, True)
    assert from_slab.classes[LIVER].placement.z_range == (0, lab.shape[0] - 1)  # the network decides
    d_whole = _dice(whole.labels == LIVER, lab == LIVER)
    d_slab = _dice(from_slab.labels == LIVER, lab == LIVER)
    assert d_whole > 0.4 and d_slab >= 0.9 * d_whole, (d_slab, d_whole)
