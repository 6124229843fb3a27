"""Pre-emption (engine/preemption.py): SIGTERM / SIGUSR1 during training write a snapshot at the current step, the
script exits with 128 + signal number, and ``resume=True`` continues exactly as the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import training  # noqa: F401 - registers the train command on the experiment
from engine import train_loop
from engine.preemption import PreemptionGuard
from tests.reliability_fixtures import REPO, TINY32, cli
from util.checkpoint import load_checkpoint
from util.cli import EXIT_SIGTERM, EXIT_SIGUSR1

RUN = [*TINY32, "n_steps=8", "lr_milestones=[4]", "save_snapshot_every=4", "print_interval=1"]


def _losses(run_dir: Path) -> dict[str, list[float]]:
    return json.loads((run_dir / "train_log.json").read_text())


def test_sigterm_between_snapshots_then_resume_is_exact(tiny_phantom: Path, tmp_path: Path) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli("training.py", [*RUN, f"data_dir={tiny_phantom}", f"run_dir={straight}"]) == 0

    # the real script with a DataLoader worker, signalled as SLURM does: SIGTERM to the whole process group
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "training.py", "with", "demo", *RUN, "num_workers=1",
                                 f"data_dir={tiny_phantom}", f"run_dir={stopped}"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while "step 1: mean loss" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "step 1 not reached after 300 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_SIGTERM, log_path.read_text()
    text = log_path.read_text()
    (snap,) = [p for p in (stopped / "snapshots").iterdir()]
    step = int(snap.stem)
    assert 1 <= step < 4, step  # between the periodic snapshots (4, 8)
    assert f"pre-empted by SIGTERM at step {step}: snapshot {snap} written; continue with resume=True" in text
    assert "Traceback" not in text
    assert load_checkpoint(snap)["step"] == step and len(_losses(stopped)["loss"]) == step
    assert not list(stopped.rglob(".tmp-*"))

    assert cli("training.py", [*RUN, f"data_dir={tiny_phantom}", f"run_dir={stopped}", "resume=True"]) == 0
    a, b = _losses(straight), _losses(stopped)
    for key in ("loss", "query_loss", "align_loss"):
        assert len(a[key]) == len(b[key]) == 8
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
    wa = load_checkpoint(straight / "snapshots" / "8.pth")["model"]
    wb = load_checkpoint(stopped / "snapshots" / "8.pth")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_sigusr1_snapshot_at_the_current_step(tiny_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    real_step, calls = train_loop.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives during step 3
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "train_step", step_then_signal)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR1)
    code = cli("training.py", [*TINY32, "n_steps=8", "lr_milestones=[4]", "save_snapshot_every=5",
                               f"data_dir={tiny_phantom}", f"run_dir={run}"])
    err = capsys.readouterr().err
    assert code == EXIT_SIGUSR1 == 138, err
    assert f"pre-empted by SIGUSR1 at step 3: snapshot {run / 'snapshots' / '3.pth'} written" in err
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["3.pth"]
    assert len(calls) == 3 and len(_losses(run)["loss"]) == 3
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored


def _install_and_return() -> PreemptionGuard:
    return PreemptionGuard().install()  # returns without restore(), as a run that raised would


def test_guard_records_while_its_function_runs_and_passes_signals_on_after() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        guard = PreemptionGuard().install()  # this test function is the owner
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.signum == signal.SIGUSR1 and seen == []
        guard.restore()
        stale = _install_and_return()
        os.kill(os.getpid(), signal.SIGUSR1)  # the installing function is gone: the old handler gets the signal
        assert stale.signum is None and seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is not stale._handle  # and is back in place
    finally:
        signal.signal(signal.SIGUSR1, previous)
