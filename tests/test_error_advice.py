"""Error advice that works: each suggested command or override, followed as printed, fixes the error (the original
command then succeeds); checkpoints saved through DataParallel / DDP / torch.compile wrappers load."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability_fixtures import REPO, TINY, cli, copy_data
from util.checkpoint import load_checkpoint
from util.cli import EXIT_USER_ERROR

SHORT = [*TINY, "n_steps=2", "lr_milestones=[1]", "save_snapshot_every=2"]


def _last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.strip().splitlines() if line.startswith("error: ")][-1]


def _run_command(command: str) -> None:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def checkpoint(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("advice_run")
    assert cli("training.py", [f"data_dir={tiny_phantom}", f"run_dir={run}", *SHORT]) == 0
    return run / "snapshots" / "2.pth"


def test_missing_classmap_command_builds_the_right_file(tiny_phantom: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    updates = ["min_fg_data=100", f"data_dir={data}", f"run_dir={tmp_path / 'run'}", *SHORT]
    assert cli("training.py", updates) == EXIT_USER_ERROR
    line = _last_error(capsys)
    command = f"python -m data_preprocessing.class_slice_index --data-dir {data} --dataset PHANTOM --min-fg 100"
    assert line == f"error: {data}/classmap_100.json: class-slice index not found; build it with {command}"
    _run_command(command)
    assert (data / "classmap_100.json").is_file()
    assert cli("training.py", updates) == 0, capsys.readouterr().err


def test_missing_superpixels_command_regenerates_them(tiny_phantom: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    (data / "superpix-MIDDLE_5.nii.gz").unlink()
    (data / "superpix-MIDDLE_0.nii.gz").unlink()
    updates = [f"data_dir={data}", f"run_dir={tmp_path / 'run'}", *SHORT]
    assert cli("training.py", updates) == EXIT_USER_ERROR
    line = _last_error(capsys)
    command = f"python -m data_preprocessing.pseudolabel --data-dir {data} --dataset PHANTOM --scans 0,5"
    assert line == (f"error: {data}/superpix-MIDDLE_0.nii.gz: superpixel file missing for scan 0 (and scans [5]); "
                    f"generate it with {command}")
    _run_command(command)
    assert cli("training.py", updates) == 0, capsys.readouterr().err


def test_architecture_override_as_printed(checkpoint: Path, tiny_phantom: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    common = [*TINY, f"data_dir={tiny_phantom}", f"reload_model_path={checkpoint}", "save_predictions=False"]
    wrong = ["input_size=(32, 32)", "feature_hw=[4, 4]"]
    assert cli("validation.py", [*common, *wrong, f"run_dir={tmp_path / 'a'}"]) == EXIT_USER_ERROR
    line = _last_error(capsys)
    match = re.search(r"add (\S+) after 'with'", line)
    assert match and match.group(1) == "'feature_hw=[8,8]'", line
    (override,) = shlex.split(match.group(1))  # what the shell hands to the script
    assert cli("validation.py", [*common, *wrong, override, f"run_dir={tmp_path / 'b'}"]) == 0


@pytest.fixture(scope="module")
def plain_results(checkpoint: Path, tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("plain_eval")
    assert cli("validation.py", [*TINY, f"data_dir={tiny_phantom}", f"run_dir={out}",
                                 f"reload_model_path={checkpoint}", "save_predictions=False"]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("prefix,bare", [("module.", False), ("_orig_mod.", True), ("module._orig_mod.", False)])
def test_wrapped_model_checkpoints_load(prefix: str, bare: bool, checkpoint: Path, plain_results: dict,
                                        tiny_phantom: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(checkpoint)
    wrapped = {prefix + k: v for k, v in ckpt["model"].items()}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped if bare else dict(ckpt, model=wrapped), path)  # a bare state dict, or a full checkpoint
    out = tmp_path / "eval"
    assert cli("validation.py", [*TINY, f"data_dir={tiny_phantom}", f"run_dir={out}", f"reload_model_path={path}",
                                 "save_predictions=False"]) == 0
    assert json.loads((out / "results.json").read_text())["per_scan"] == plain_results["per_scan"]
    if prefix == "module.":  # resuming from a DDP-saved training checkpoint works as well
        assert cli("training.py", [f"data_dir={tiny_phantom}", f"run_dir={tmp_path / 'resumed'}",
                                   f"resume_from={path}", *TINY, "n_steps=3", "lr_milestones=[1]",
                                   "save_snapshot_every=3"]) == 0
