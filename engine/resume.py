"""Crash-safe training runs: claim the run folder, pick the checkpoint to resume, check it, restore every state.

A resumed run is the run it continues: model, optimizer (momentum), scheduler, AMP scaler, RNG states, the step counter
and the loss history come from the checkpoint, and the episodes are a pure function of (seed, step), so steps after the
resume are the steps the run would have taken (docs/method.md#q5-unseeded-numpy). Config keys that change the trajectory
must therefore be equal; changing them is a new run (use ``reload_model_path`` for a warm start instead).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from util.checkpoint import latest_snapshot, plain_config
from util.errors import ConfigError

# Keys whose change makes a resumed run a different run (data order, model, loss, optimiser).
RESUME_MUST_MATCH = (
    "dataset", "eval_fold", "label_sets", "setting", "exclude_cls_list", "exclusion_rule", "seed", "batch_size",
    "n_queries", "episode_sampling", "which_aug", "border_fill", "input_size", "superpix_scale", "min_fg_data",
    "modelname", "clsname", "proto_grid_size", "feature_hw", "usealign", "use_wce", "ignore_label", "optim_type",
    "optim", "lr_step_gamma", "build_unused_aspp", "wce_bg_weight", "lr_schedule", "aug_parity", "val_scans",
)
# Keys that may differ silently (where and how the run executes, not what it computes).
RESUME_MAY_DIFFER = (
    "run_dir", "path", "resume", "resume_from", "device", "gpu_id", "num_workers", "print_interval",
    "save_snapshot_every", "use_file_observer", "exp_prefix", "data_dir", "reload_model_path", "max_nonfinite_steps",
    "tensorboard", "multishot_proto",  # logging; a test-time rule (training episodes have one shot)
)
LOSS_KEYS = ("loss", "query_loss", "align_loss")
_LOCKS: dict[str, Any] = {}  # run folders this process has claimed (kept open for the life of the process)


def claim_run_dir(run_dir: Path) -> None:
    """Take an exclusive lock on ``<run_dir>/.lock`` so two training processes never write one run folder.

    The lock is an ``flock``: the kernel drops it when the process ends, even on SIGKILL, so a crashed run never
    blocks its own resume. A second claim from the same process (in-process reruns) is a no-op.

    Raises:
        ConfigError: another process holds the folder.
    """
    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        return
    path = Path(run_dir) / ".lock"
    fh = open(path, "a+")  # kept open on purpose: the lock lives as long as the file is open
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().strip() or "unknown process"
        fh.close()
        raise ConfigError(f"run_dir={run_dir} is in use by another training process ({owner}); wait for it to "
                          f"finish or choose another run_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    fh.flush()
    _LOCKS[key] = fh


def find_resume_checkpoint(config: dict[str, Any], run_dir: Path) -> Path | None:
    """The checkpoint a training run starts from, or ``None`` for a fresh start.

    - ``resume_from=<file.pth>``: that file; ``resume_from=<folder>``: the latest ``snapshots/<step>.pth`` of that
      run folder (or of that snapshots folder);
    - ``resume=True``: the latest snapshot of ``run_dir`` (``None`` if there is none yet: a job script may always
      pass ``resume=True``);
    - otherwise ``None``, and ``run_dir`` must not hold snapshots of an earlier run (they would be overwritten).

    Raises:
        ConfigError: ``resume_from`` holds no checkpoint; ``resume=True`` without ``run_dir`` (an observed run gets a
            new folder each time, so there would be nothing to resume); a fresh run in a used ``run_dir``.
    """
    resume_from = config.get("resume_from")
    if resume_from:
        src = Path(resume_from)
        if src.is_file():
            return src
        if not src.is_dir():
            raise ConfigError(f"resume_from={resume_from}: no such checkpoint file or run folder")
        found = latest_snapshot(src.parent if src.name == "snapshots" else src)
        if found is None:
            raise ConfigError(f"resume_from={resume_from}: no snapshots/<step>.pth in this folder")
        return found
    if config.get("resume"):
        if not config.get("run_dir"):
            raise ConfigError("resume=True needs run_dir=<folder of the run to continue> (an observed run gets a "
                              "new folder every time), or pass resume_from=<run folder or checkpoint>")
        return latest_snapshot(run_dir)
    existing = latest_snapshot(run_dir)
    if existing is not None:
        raise ConfigError(f"run_dir={run_dir} already holds snapshots of a run (latest: {existing.name}); continue "
                          f"it with resume=True, or choose another run_dir (nothing was overwritten)")
    return None


def check_resume_config(stored: dict[str, Any] | None, config: dict[str, Any], path: Path) -> list[str]:
    """Refuse to resume a checkpoint made with another trajectory-defining config.

    Returns:
        The other keys that differ (informational; e.g. ``n_steps`` when a run is extended).

    Raises:
        ConfigError: a key of :data:`RESUME_MUST_MATCH` differs (the message lists them with both values).
    """
    if not stored:
        raise ConfigError(f"{path}: holds no config (not a training checkpoint of this project); start a new run "
                          f"from it with reload_model_path={path} instead of resuming")
    current = plain_config(dict(config))
    clash = [f"{k}: {stored[k]!r} in the checkpoint, {current[k]!r} now" for k in RESUME_MUST_MATCH
             if k in stored and k in current and stored[k] != current[k]]
    if clash:
        raise ConfigError(f"{path}: cannot resume with a different config ({'; '.join(clash)}); resume with the "
                          f"checkpoint's values, or start a new run with reload_model_path={path}")
    return sorted(k for k in current if k in stored and stored[k] != current[k] and k not in RESUME_MAY_DIFFER)


def restore_scheduler_milestones(scheduler: torch.optim.lr_scheduler.MultiStepLR, milestones: list[int]) -> None:
    """After ``load_state_dict`` (which restores the checkpoint's milestones), apply this run's ``lr_milestones``."""
    scheduler.milestones = Counter(int(m) for m in milestones)


def resume_history(ckpt: dict[str, Any], path: Path, start_step: int) -> dict[str, list[float]]:
    """Per-step loss terms of steps 1..``start_step`` of the run being resumed.

    From the checkpoint's ``train_log`` entry; for checkpoints without it, from ``train_log.json`` next to its
    ``snapshots`` folder, cut at ``start_step`` and padded with NaN where it is short.
    """
    log = ckpt.get("train_log")
    if log is None:
        json_path = Path(path).parent.parent / "train_log.json"
        log = json.loads(json_path.read_text()) if json_path.is_file() else {}
    out = {}
    for key in LOSS_KEYS:
        values = [float(v) for v in list(log.get(key, []))[:start_step]]
        out[key] = values + [math.nan] * (start_step - len(values))
    return out
