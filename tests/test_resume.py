"""Crash safety: atomic checkpoints, exact resume after a SIGKILL, ``resume_from``, one process per run folder."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reliability_fixtures import REPO, TINY32, cli, files_under
from util.checkpoint import load_checkpoint, save_checkpoint
from util.cli import EXIT_USER_ERROR

RESUME = [*TINY32, "n_steps=20", "lr_milestones=[10]", "save_snapshot_every=10", "print_interval=5"]



def _losses(run_dir: Path) -> dict[str, list[float]]:
    return json.loads((run_dir / "train_log.json").read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_sigkill_then_resume_gives_the_straight_run(tiny_phantom: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli("training.py", [*RESUME, f"data_dir={tiny_phantom}", f"run_dir={straight}"]) == 0

    # the real script, killed (SIGKILL: no handler runs) once snapshot 10 is on disk
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "training.py", "with", "demo", *RESUME, f"data_dir={tiny_phantom}",
                                 f"run_dir={killed}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (killed / "snapshots" / "10.pth").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no snapshot after 300 s"
            time.sleep(0.005)
        proc.kill()
        proc.wait()
    assert not (killed / "snapshots" / "20.pth").exists(), "the run finished before it could be killed"

    caplog.clear()
    caplog.set_level(logging.INFO)
    assert cli("training.py", [*RESUME, f"data_dir={tiny_phantom}", f"run_dir={killed}", "resume=True"]) == 0
    assert f"resumed from {killed / 'snapshots' / '10.pth'} at step 10" in caplog.text

    a, b = _losses(straight), _losses(killed)
    for key in ("loss", "query_loss", "align_loss"):
        assert len(a[key]) == len(b[key]) == 20
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
    wa, wb = _weights(straight / "snapshots" / "20.pth"), _weights(killed / "snapshots" / "20.pth")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    assert not [p for p in killed.rglob(".tmp-*")]  # no half-written file left by the kill


def test_resume_from_another_run_folder(tiny_phantom: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    short = [*TINY32, "n_steps=4", "lr_milestones=[3]", "save_snapshot_every=2"]
    assert cli("training.py", [*short, f"data_dir={tiny_phantom}", f"run_dir={first}"]) == 0
    (first / "snapshots" / "4.pth").unlink()  # the first run "crashed" after step 2
    assert cli("training.py", [*short, f"data_dir={tiny_phantom}", f"run_dir={second}", f"resume_from={first}"]) == 0
    a, b = _losses(first), _losses(second)
    assert len(b["loss"]) == 4 and b["loss"][:2] == a["loss"][:2]  # history carried over from the checkpoint
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=0, atol=1e-6)
    assert sorted(p.name for p in (second / "snapshots").iterdir()) == ["4.pth"]
    # resume=True on a finished run does nothing and keeps the log
    assert cli("training.py", [*short, f"data_dir={tiny_phantom}", f"run_dir={second}", "resume=True"]) == 0
    assert _losses(second) == b


def test_two_processes_never_share_a_run_folder(tiny_phantom: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(run_dir / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 42 on node7')\n"
         "f.flush(); print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli("training.py", [*TINY32, f"data_dir={tiny_phantom}", f"run_dir={run_dir}", "n_steps=2"])
    finally:
        holder.kill()
        holder.wait()
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"error: run_dir={run_dir} is in use by another training process (pid 42 on node7)" in err
    assert files_under(run_dir) == []


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "snapshots" / "10.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 10}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 20, "bad": lambda: None}, path)  # fails mid-write
    assert load_checkpoint(path)["step"] == 10 and torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(path.parent) == ["10.pth"]  # no temporary file left
