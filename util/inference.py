"""Test-time predictors for :func:`util.protocol.evaluate_fold`: the fast path and the original's naive path.

Both have the protocol's ``predict`` signature::

    predict(support_images (S, H, W) float32, support_masks (S, H, W) bool, query_images (N, H, W) float32)
        -> (N, H, W) bool

and are called once per (class, query scan, chunk). :class:`FastPredictor` encodes the chunk's support slices once,
pools their prototypes once and segments the query slices in batches under ``torch.inference_mode``.
:class:`NaivePredictor` does what the original does: for every query slice, encode support and query together
and pool the prototypes again. With the model in eval mode both give the same logits (up to float rounding).
"""

from __future__ import annotations

import numpy as np
import torch

from dataloaders.normalization import to_three_channels


def _images(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W) float array -> (N, 3, H, W) float32 tensor on ``device``."""
    return to_three_channels(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)).to(device)


def _masks(masks: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, H, W) bool -> fg and bg float masks (S, H, W) on ``device``."""
    fg = torch.as_tensor(np.ascontiguousarray(masks), dtype=torch.float32, device=device)
    return fg, 1.0 - fg


class FastPredictor:
    """Encode the support once per call, cache its prototypes, segment query slices in batches.

    Args:
        model: a :class:`models.grid_proto_fewshot.FewShotSeg`, put in eval mode here.
        device: where to run.
        window: ALP window at test time (``val_wsize``).
        batch_size: query slices per encoder pass.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, window: int = 2, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"eval batch size must be >= 1, got {batch_size}")
        self.model, self.device, self.window, self.batch_size = model.eval(), device, window, batch_size

    @torch.inference_mode()
    def logits(self, support_images: np.ndarray, support_masks: np.ndarray, query_images: np.ndarray) -> torch.Tensor:
        """(N, 2, H, W) logits of the query slices against the support (see module docstring for shapes)."""
        feats = self.model.encode(_images(support_images, self.device))
        fg, bg = _masks(support_masks, self.device)
        protos = self.model.prototypes_from_support(feats, fg, bg, window=self.window)
        out = []
        size = tuple(query_images.shape[-2:])
        for start in range(0, len(query_images), self.batch_size):
            q = _images(query_images[start:start + self.batch_size], self.device)
            out.append(self.model.segment_with_prototypes(self.model.encode(q), protos, size).float().cpu())
        return torch.cat(out)

    def __call__(self, support_images: np.ndarray, support_masks: np.ndarray, query_images: np.ndarray) -> np.ndarray:
        return (self.logits(support_images, support_masks, query_images).argmax(1) == 1).numpy()


class NaivePredictor:
    """The original's evaluation loop: one query slice at a time, support encoded again with every slice."""

    def __init__(self, model: torch.nn.Module, device: torch.device, window: int = 2) -> None:
        self.model, self.device, self.window = model.eval(), device, window

    @torch.inference_mode()
    def logits(self, support_images: np.ndarray, support_masks: np.ndarray, query_images: np.ndarray) -> torch.Tensor:
        """(N, 2, H, W) logits, one forward pass of the whole model per query slice."""
        supp = _images(support_images, self.device)[None]  # (1, S, 3, H, W)
        fg, bg = _masks(support_masks, self.device)
        out = []
        for z in range(len(query_images)):
            qry = _images(query_images[z:z + 1], self.device)[None]  # (1, 1, 3, H, W)
            res = self.model(supp, fg[None], bg[None], qry, window=self.window, compute_align=False)
            out.append(res.logits.float().cpu())
        return torch.cat(out)

    def __call__(self, support_images: np.ndarray, support_masks: np.ndarray, query_images: np.ndarray) -> np.ndarray:
        return (self.logits(support_images, support_masks, query_images).argmax(1) == 1).numpy()
