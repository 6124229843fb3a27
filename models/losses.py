"""Losses of SSL-ALPNet training (docs/method.md#losses).

* Query loss: cross-entropy with class weights [0.05 (BG), 1.0 (FG)] (``use_wce=True``), ``ignore_index`` 255,
  PyTorch's weighted mean (sum of w_y * loss / sum of w_y over non-ignored pixels), as in the original.
* Alignment loss: unweighted cross-entropy with ``ignore_index`` 255, per support shot, averaged over shots.

The class-weight tensor is created on the logits' device and dtype (no ``.cuda()``, docs/method.md#q6-hard-coded-cuda).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
QUERY_CLASS_WEIGHTS = (0.05, 1.0)  # BG, FG


def query_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: Sequence[float] | None = QUERY_CLASS_WEIGHTS,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Weighted cross-entropy between query logits and labels.

    Args:
        logits: (N, 2, H, W) query logits [BG, FG].
        labels: (N, H, W) integer labels in {0, 1, ignore_index}.
        class_weights: Per-class weights; None for unweighted CE (``use_wce=False``).
        ignore_index: Label value excluded from the loss.

    Returns:
        Scalar loss (NaN if every pixel is ignored, like ``nn.CrossEntropyLoss``).
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits (N, K, H, W) {tuple(logits.shape)} and labels (N, H, W) {tuple(labels.shape)}")
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    return F.cross_entropy(logits, labels.long(), weight=weight, ignore_index=ignore_index)


def alignment_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Unweighted cross-entropy per shot, then the mean over shots (the original divides each shot's CE by n_shots).

    A shot whose pixels are all ``ignore_index`` contributes 0 instead of NaN.

    Args:
        logits: (S, 2, H, W) support logits predicted from query prototypes.
        labels: (S, H, W) support labels in {0, 1, ignore_index}.
        ignore_index: Label value excluded from the loss.

    Returns:
        Scalar loss.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits (S, K, H, W) {tuple(logits.shape)} and labels (S, H, W) {tuple(labels.shape)}")
    labels = labels.long()
    pixel = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # (S, H, W), 0 if ignored
    valid = (labels != ignore_index).sum(dim=(1, 2)).clamp(min=1)
    return (pixel.sum(dim=(1, 2)) / valid).mean()


def support_labels(fg_mask: torch.Tensor, bg_mask: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Alignment target: 1 where fg_mask == 1, 0 where bg_mask == 1 (wins on overlap), ``ignore_index`` elsewhere.

    Args:
        fg_mask: (S, H, W) support foreground mask.
        bg_mask: (S, H, W) support background mask.
        ignore_index: Value of unlabelled pixels.

    Returns:
        (S, H, W) int64 labels.
    """
    labels = torch.full(fg_mask.shape, ignore_index, dtype=torch.long, device=fg_mask.device)
    labels[fg_mask == 1] = 1
    labels[bg_mask == 1] = 0  # written last, as in the original: a pixel in both masks counts as background
    return labels
