"""Checkpoints: atomic save, checked load, and finding the latest snapshot of a run.

A checkpoint is a dict ``{"model", "optimizer", "scheduler", "step", "config", "rng", "normalizer", "fold"}``;
``model`` alone is a plain state dict with the original's key names (``encoder.backbone.*``,
``encoder.localconv.weight``), so ``torch.load(path)["model"]`` loads into the original code too, and a plain
state dict written by the original is accepted wherever a checkpoint is (docs/method.md#checkpoint-layout).
Snapshots are ``<run_dir>/snapshots/<step>.pth`` with step = number of optimiser steps done (the original's
25000, 50000, ...).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from util.atomic import atomic_file
from util.errors import ProjectError

SNAPSHOT_PATTERN = re.compile(r"^(\d+)\.pth$")


class CheckpointError(ProjectError, ValueError):
    """A checkpoint is missing, corrupt or does not fit the model; the message names the file."""


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile(model)


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the key prefixes that model wrappers add to every key, in any nesting.

    ``nn.DataParallel`` and ``DistributedDataParallel`` save ``module.<key>``, ``torch.compile(model)`` saves
    ``_orig_mod.<key>`` (and DDP around a compiled model ``module._orig_mod.<key>``). A prefix is removed only when
    every key carries it, so a model whose own submodule is called ``module`` is left alone.

    Args:
        state: flat state dict.

    Returns:
        A new dict with the wrapper prefixes removed.
    """
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` atomically and durably (:func:`util.atomic.atomic_file`).

    A crash (even SIGKILL) during the write leaves the previous file, never a truncated one; file and folder are
    synced, so the new name also survives a power cut.
    """
    with atomic_file(path, durable=True) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (or a plain state dict, returned as ``{"model": sd}``).

    Model keys saved through a wrapper (``module.`` from DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``)
    are returned without the prefix (:func:`strip_wrapper_prefixes`).

    Raises:
        CheckpointError: file missing, unreadable or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, pickle.UnpicklingError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if msg.startswith("Weights only load failed"):  # torch's advice to drop weights_only does not apply here
            msg = "not a torch.save file, or it holds Python objects besides tensors and plain containers"
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    if "model" not in obj:
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"model": strip_wrapper_prefixes(obj)}
        raise CheckpointError(f"{path}: neither a checkpoint (no 'model' entry) nor a plain state dict")
    if isinstance(obj["model"], dict):  # saved from a DataParallel / DDP / torch.compile wrapper: the same model
        obj["model"] = strip_wrapper_prefixes(obj["model"])
    return obj


def plain_config(obj: Any) -> Any:
    """A deep copy of a (read-only) Sacred config made of plain dicts, lists and scalars, for ``weights_only`` loads."""
    if isinstance(obj, dict):
        return {str(k): plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v) for v in obj]
    return obj


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "snapshots" / f"{step}.pth"


def latest_snapshot(run_dir: str | Path) -> Path | None:
    """The snapshot with the highest step in ``<run_dir>/snapshots``, or ``None``."""
    folder = Path(run_dir) / "snapshots"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := SNAPSHOT_PATTERN.match(p.name))]
    return max(found)[1] if found else None
