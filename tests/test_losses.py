"""Tests for models/losses.py: weighted query CE and alignment CE against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import alignment_ce, query_loss, support_labels


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    """One image, 1x3 pixels: (0, 0) labelled BG, (0, ln 3) labelled FG, a third pixel ignored."""
    logits = torch.tensor([[[[0.0, 0.0, 5.0]], [[0.0, math.log(3.0), -5.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    return logits, labels


def test_query_loss_weighted_mean_by_hand():
    logits, labels = _logits()
    # pixel 0: -log(1/2), class weight 0.05; pixel 1: -log(3/4), weight 1; PyTorch divides by the weight sum
    expected = (0.05 * math.log(2) + math.log(4 / 3)) / 1.05
    assert query_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert query_loss(logits, labels, class_weights=None).item() == pytest.approx(
        (math.log(2) + math.log(4 / 3)) / 2, rel=1e-6
    )


def test_query_loss_follows_logits_dtype_and_device():
    logits, labels = _logits()
    out = query_loss(logits.double(), labels)
    assert out.dtype == torch.float64 and out.device == logits.device
    with pytest.raises(ValueError, match="labels"):
        query_loss(logits, labels[0])


def test_alignment_ce_mean_over_shots_and_all_ignored_shot():
    logits, labels = _logits()
    two = torch.cat([logits, logits])
    ignored = torch.full_like(labels, 255)
    per_shot = (math.log(2) + math.log(4 / 3)) / 2  # unweighted
    assert alignment_ce(logits, labels).item() == pytest.approx(per_shot, rel=1e-6)
    # a shot with no labelled pixel adds 0 (not NaN); the mean is over shots
    assert alignment_ce(two, torch.cat([labels, ignored])).item() == pytest.approx(per_shot / 2, rel=1e-6)


def test_support_labels():
    fg = torch.tensor([[[1, 1, 0, 0]]])
    bg = torch.tensor([[[0, 1, 1, 0]]])
    assert support_labels(fg, bg).tolist() == [[[1, 0, 0, 255]]]  # overlap -> BG, as in the original
