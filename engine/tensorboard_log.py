"""Optional TensorBoard logging of a training run (``tensorboard=True``), through torch's own ``SummaryWriter``.

Scalars, all with the optimiser step as the x axis:

* ``train/loss``, ``train/query_loss``, ``train/align_loss``: the loss terms of every step (SPEC 6.3);
* ``train/lr``: the learning rate that step used (``lr_schedule``: MultiStepLR, SPEC 7, or engine/lr_schedule.py);
* ``val/dice/mean`` and ``val/dice/<CLASS>``: validation Dice at each snapshot when ``val_scans`` is set
  (:mod:`engine.val_monitor`).

Events go to ``<run folder>/tensorboard``; view them with ``tensorboard --logdir <run folder>/tensorboard``.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

from engine.lr_schedule import lr_at
from util.run_setup import ConfigError


def multistep_lr(base_lr: float, milestones: list[int], gamma: float, step: int) -> float:
    """Learning rate of optimiser step ``step`` (1-based) under ``MultiStepLR``: after ``step - 1`` scheduler steps,
    ``base_lr * gamma ** #{m in milestones : m <= step - 1}``."""
    return base_lr * gamma ** bisect.bisect_right(sorted(int(m) for m in milestones), step - 1)


class TensorBoardLog:
    """Writes the run's scalars as TensorBoard events.

    Args:
        log_dir: event folder (created).
        base_lr: ``optim.lr``.
        milestones: ``lr_milestones``.
        gamma: ``lr_step_gamma``.
        schedule: ``lr_schedule`` (``step``, ``cosine``, ``poly``; :mod:`engine.lr_schedule`).
        n_steps: ``n_steps`` (the length of ``cosine`` and ``poly``).

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: Path, base_lr: float, milestones: list[int], gamma: float, schedule: str = "step",
                 n_steps: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                              "(it is in requirements.txt)") from None
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.base_lr, self.milestones, self.gamma = float(base_lr), list(milestones), float(gamma)
        self.schedule, self.n_steps = schedule, int(n_steps)

    def train_terms(self, step: int, terms: dict[str, float]) -> None:
        """Loss terms of one step (``loss``, ``query_loss``, ``align_loss``) and the step's learning rate."""
        for key, value in terms.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        lr = lr_at(self.base_lr, self.schedule, self.n_steps, self.milestones, self.gamma, step)
        self.writer.add_scalar("train/lr", lr, step)

    def validation(self, entry: dict[str, Any]) -> None:
        """Validation Dice of a snapshot (an entry of :meth:`engine.val_monitor.ValMonitor.score`)."""
        if entry["mean_dice"] is not None:
            self.writer.add_scalar("val/dice/mean", entry["mean_dice"], entry["step"])
        for name, value in entry["class_dice"].items():
            if value is not None:
                self.writer.add_scalar(f"val/dice/{name}", value, entry["step"])
        self.writer.flush()

    def flush(self) -> None:
        """Write pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
