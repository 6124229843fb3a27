"""Optional TensorBoard logging of a training run (``tensorboard=True``), through torch's own ``SummaryWriter``.

Scalars, all with the optimiser step as the x axis:

* ``train/loss``, ``train/query_loss``, ``train/align_loss``: the loss terms of every step (docs/method.md#losses);
* ``train/lr``: the learning rate that step used, as the scheduler set it (:mod:`engine.lr_schedule`);
* ``val/dice/mean`` and ``val/dice/<CLASS>``: validation Dice at each snapshot when ``val_scans`` is set
  (:mod:`engine.val_monitor`).

Events go to ``<run folder>/tensorboard``; view them with ``tensorboard --logdir <run folder>/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from util.errors import ConfigError


class TensorBoardLog:
    """Writes the run's scalars as TensorBoard events.

    Args:
        log_dir: event folder (created).

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                              "(it is in requirements.txt)") from None
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def train_terms(self, step: int, terms: dict[str, float], lr: float) -> None:
        """Loss terms of one step (``loss``, ``query_loss``, ``align_loss``) and the learning rate the step used (the
        scheduler's, read before its ``step()``)."""
        for key, value in terms.items():
            self.writer.add_scalar(f"train/{key}", value, step)
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
