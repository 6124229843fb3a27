"""Learning-rate schedules of training.py (config key ``lr_schedule``).

* ``step`` (default, the paper's, docs/method.md#training-schedule): ``MultiStepLR``, lr = base * ``lr_step_gamma`` **
  (milestones passed); the paper's configs decay by 0.95 every 1000 steps.
* ``cosine``: ``CosineAnnealingLR`` over the run, lr = base * (1 + cos(pi t / n_steps)) / 2 (Loshchilov & Hutter,
  SGDR, ICLR 2017, without restarts); ``lr_milestones`` and ``lr_step_gamma`` cannot act (a training run refuses
  them when set on the command line: :data:`engine.run_setup.KEY_CONFLICTS`).
* ``poly``: ``PolynomialLR``, lr = base * (1 - t / n_steps) ** 0.9 (the "poly" policy of DeepLab, Chen et al.,
  TPAMI 2018); ``lr_milestones`` and ``lr_step_gamma`` likewise.

t is the number of scheduler steps taken (optimiser step t + 1 uses the lr after t scheduler steps). All three are
torch's own schedulers, so their state is checkpointed and resumed like the optimiser's.
"""

from __future__ import annotations

import torch

from util.errors import ConfigError

LR_SCHEDULES = ("step", "cosine", "poly")
POLY_POWER = 0.9


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, n_steps: int, milestones: list[int],
                    gamma: float) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler for ``schedule`` (one of :data:`LR_SCHEDULES`), stepped once per optimiser step.

    Args:
        optimizer: the run's optimiser (its lr is the base lr).
        schedule: ``step``, ``cosine`` or ``poly``.
        n_steps: optimiser steps of the run (the length of ``cosine`` and ``poly``).
        milestones: ``lr_milestones`` (``step`` only).
        gamma: ``lr_step_gamma`` (``step`` only).

    Raises:
        ConfigError (a ``ValueError``): unknown schedule, or ``n_steps`` < 1 for ``cosine``/``poly``.
    """
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule={schedule!r}: choose one of {LR_SCHEDULES}")
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if n_steps < 1:
        raise ConfigError(f"lr_schedule={schedule!r} needs n_steps >= 1, got {n_steps}")
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps, eta_min=0.0)
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=n_steps, power=POLY_POWER)
