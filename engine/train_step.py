"""One optimiser step of ALPNet training on a batch of episodes (the MAE split: the step here, the loop in
:mod:`engine.train_loop`, the command line in ``training.py``), and the pieces it needs.

The step: forward pass on the support and query images, the query cross-entropy and the prototype-alignment loss
(the paper's Eq. 4-5; docs/method.md#losses), backward, optimiser step. A non-finite loss skips the update
(:mod:`engine.step_guard`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.step_guard import StepGuard, all_ranks_ok
from models.losses import QUERY_CLASS_WEIGHTS, query_loss
from util.errors import ProjectError


class NonFiniteLossError(ProjectError, RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss (a diverged run: the message says what to change)."""


def autocast_context(amp: str, device: torch.device):
    """Mixed precision context for ``amp`` in {"off", "bf16", "fp16"}."""
    if amp == "off":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def apply_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Backward pass and optimiser step of a finite ``loss`` (0-dim), through ``scaler`` when fp16 uses one."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_step(model: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, device: torch.device, amp: str, use_wce: bool,
               usealign: bool, ignore_label: int, guard: StepGuard | None = None,
               bg_weight: float = QUERY_CLASS_WEIGHTS[0]) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch of B episodes; returns the loss terms as 0-dim float32 tensors on ``device``.

    Args:
        batch: ``support_images`` (B, S, 3, H, W), ``support_fg``/``support_bg`` (B, S, H, W),
            ``query_images`` (B, Q, 3, H, W), ``query_labels`` (B, Q, H, W) int64.
        guard: the run's :class:`engine.step_guard.StepGuard` (default: a host-side one for this step).
        bg_weight: background weight of the query cross-entropy when ``use_wce`` (foreground 1.0; the paper's
            0.05 by default, config key ``wce_bg_weight``).

    Returns:
        ``loss``, ``query_loss``, ``align_loss``, not read back (the caller reads them every ``print_interval``
        steps, one host sync for many steps). ``loss`` is NaN when the step was skipped.

    A non-finite loss skips the update (no optimizer step; weights, momentum and BatchNorm statistics untouched);
    the caller counts it. With a device-side guard the decision never leaves the device (see
    :mod:`engine.step_guard`); under DDP it is taken on all ranks together. With ``channels_last`` the model converts
    its encoder batch itself.
    """
    if guard is None:
        guard = StepGuard(model, optimizer, device_side=False)
    supp = batch["support_images"].to(device, non_blocking=True)
    qry = batch["query_images"].to(device, non_blocking=True)
    fg = batch["support_fg"].to(device, non_blocking=True)
    bg = batch["support_bg"].to(device, non_blocking=True)
    labels = batch["query_labels"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    guard.begin()  # BatchNorm running statistics change in the forward pass: snapshot them (fused)
    with autocast_context(amp, device):
        out = model(supp, fg, bg, qry, compute_align=usealign)
    logits = out.logits.float()  # (B*Q, 2, H, W), episode-major
    weights = (bg_weight, QUERY_CLASS_WEIGHTS[1]) if use_wce else None
    q_loss = query_loss(logits, labels.flatten(0, 1), class_weights=weights, ignore_index=ignore_label)
    align_loss = out.align_loss.float() if usealign else torch.zeros((), device=device)
    loss = q_loss + align_loss
    ok = all_ranks_ok(torch.isfinite(loss.detach()))  # every rank skips together
    terms = {"loss": torch.where(ok, loss.detach(), math.nan), "query_loss": q_loss.detach(),
             "align_loss": align_loss.detach()}
    if scaler is None and guard.device_skip_ready():
        guard.before_update()
        loss.backward()
        optimizer.step()
        guard.after_update(ok)  # a non-finite step leaves no trace, decided on the device
        return terms
    if not bool(ok):  # host path: one read (free on CPU; on GPU only until the optimizer state exists, or fp16)
        guard.undo_forward()
        return terms
    apply_update(loss, optimizer, scaler)
    return terms
