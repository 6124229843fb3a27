"""Pre-emption: SIGTERM or SIGUSR1 during training -> snapshot at the current step, then a documented exit.

Clusters stop jobs with SIGTERM, then SIGKILL after a grace period (SLURM ``KillWait``, 30 s by default;
Kubernetes ``terminationGracePeriodSeconds``); SLURM can also send SIGUSR1 ahead of the time limit
(``#SBATCH --signal=USR1@120``). While the training loop runs, :class:`PreemptionGuard` turns either signal
into a flag; the loop checks it once per step (after the optimiser step, so the step in flight completes),
writes the usual atomic snapshot ``snapshots/<step>.pth`` at that step and raises :class:`Preempted`.
``python training.py ...`` then exits with ``128 + signal number``: **143** after SIGTERM, **138** after
SIGUSR1, and ``resume=True`` (same ``run_dir``) continues exactly as if the run had not stopped.

DataLoader workers ignore both signals (:func:`worker_init`): a signal sent to the whole process group must not
kill a worker before the main process has written its snapshot; the main process stops them when it exits, and
PyTorch's worker watchdog ends them if the main process dies.

Under torchrun the ranks agree on stopping (an all-reduce of the flag on CPU tensors, only when world size > 1),
so every rank reaches the snapshot's collectives at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

import torch

from util.errors import RunInterrupted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RunInterrupted):
    """Training stopped on a pre-emption signal after writing a snapshot; Sacred marks the run INTERRUPTED.

    Attributes:
        signum: the signal received.
        step: the step of the snapshot written.
        snapshot: its path.
        exit_code: ``128 + signum``.
    """

    def __init__(self, signum: int, step: int, snapshot: str) -> None:
        self.signum, self.step, self.snapshot = int(signum), int(step), str(snapshot)
        self.exit_code = 128 + self.signum
        super().__init__(f"pre-empted by {signal.Signals(self.signum).name} at step {self.step}: snapshot "
                         f"{self.snapshot} written; continue with resume=True")


class PreemptionGuard:
    """Records SIGTERM/SIGUSR1 instead of dying while the function that installed it runs.

    ``install()`` is called right before the training loop and ``restore()`` right after it. The handler acts only
    while the installing function's frame is on the interrupted stack; once that function has returned or raised
    (an in-process run that failed without reaching ``restore()``), the handler restores the previous handlers and
    passes the signal on to them, so a stale guard never swallows a signal. Outside the main thread (where Python
    cannot install handlers) it does nothing.

    Attributes:
        signum: the first pre-emption signal received, or ``None``.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._owner: tuple[int, Any] | None = None  # (id, code) of the installing frame (no reference kept)

    def install(self) -> PreemptionGuard:
        """Install the handlers for the caller's lifetime (see the class docstring); returns ``self``."""
        if threading.current_thread() is threading.main_thread():
            caller = sys._getframe(1)
            self._owner = (id(caller), caller.f_code)
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._owner = None

    def _owner_running(self, frame: FrameType | None) -> bool:
        while frame is not None:
            if self._owner is not None and id(frame) == self._owner[0] and frame.f_code is self._owner[1]:
                return True
            frame = frame.f_back
        return False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._owner_running(frame):
            if self.signum is None:
                self.signum = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()  # the loop is gone: behave as if the guard had never been installed
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def requested(self, world_size: int = 1) -> bool:
        """Whether to stop now: this process got a signal, or (under torchrun) any rank did.

        Collective when ``world_size`` > 1: every rank must call it at every step.
        """
        local = self.signum is not None
        if world_size <= 1:
            return local
        flag = torch.tensor([float(self.signum or 0)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # CPU tensor: gloo, no GPU sync
        if self.signum is None and flag.item() > 0:
            self.signum = int(flag.item())
        return self.signum is not None


def _ignore_and_init(init: Callable[[int], None] | None, worker_id: int) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if init is not None:
        init(worker_id)


def worker_init(init: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that ignores the pre-emption signals, then calls ``init`` (picklable)."""
    return partial(_ignore_and_init, init)
