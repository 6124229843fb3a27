"""Shared helpers of the reliability tests: a tiny processed phantom, tiny configs, and the scripts' command lines.

``cli`` runs a script's command line through :func:`util.cli.run_cli`, the function its ``__main__`` block calls
(the same code path as ``python training.py ...`` without the cost of a new interpreter); ``script`` runs the real
script in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import training  # noqa: F401  (registers the 'train' command)
import validation  # noqa: F401  (registers the 'validate' command)
from config_ssl_upload import ex
from data_preprocessing.class_slice_index import write_classmap
from data_preprocessing.phantom import generate_phantom
from data_preprocessing.pseudolabel import generate_pseudolabels
from dataloaders.dataset_info import get_dataset_info
from util.cli import run_cli

REPO = Path(__file__).resolve().parent.parent
# 6 phantom scans of 64x64x12; fold 2: queries [2, 3], support [4], training scans [0, 1, 5]. The tests were written for
# lite_gn and the step schedule (the demo config's until it moved to lite_gn_s and the cosine schedule), so TINY pins
# both.
TINY = ["input_size=(64, 64)", "feature_hw=[8, 8]", "proto_grid_size=2", "val_wsize=2", "num_workers=0",
        "eval_fold=2", "n_steps=4", "lr_milestones=[2]", "save_snapshot_every=2", "print_interval=2",
        "eval_batch_size=4", "modelname=lite_gn", "lr_schedule=step", "use_file_observer=False"]
# Smaller input (the 64x64 slices are cropped to 32x32) for the tests that train 20 steps.
TINY32 = [*TINY[2:], "input_size=(32, 32)", "feature_hw=[4, 4]"]


def build_phantom(data: Path) -> Path:
    """Write the tiny processed phantom (images, labels, class map, superpixels) into ``data``."""
    generate_phantom(data, n_scans=6, seed=3, size=64, n_slices_min=12, n_slices_max=12)
    info = get_dataset_info("PHANTOM")
    write_classmap(data, info, progress=False)
    generate_pseudolabels(data, info, workers=1, progress=False)
    return data


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cli(script: str, updates: Sequence[str], command: str | None = None,
        flags: Sequence[str] = ()) -> int:
    """Exit code of ``python <script> [command] [flags] with demo <updates>`` run in this process."""
    command = command or {"training.py": "train", "validation.py": "validate"}[script]
    argv = [script, command, *flags, "with", "demo", *updates]
    return run_cli(ex, argv)


def script(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository root (a new interpreter: the real command line)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def files_under(folder: Path) -> list[str]:
    """Relative paths of the files under ``folder`` (none if it does not exist), the run lock left out."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ".lock")
