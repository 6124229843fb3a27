"""Checkpoints: atomic save, checked load, and finding the latest snapshot of a run.

A checkpoint is a dict ``{"model", "optimizer", "scheduler", "step", "config", "rng", "normalizer", "fold"}``;
``model`` alone is a plain state dict with the original's key names (``encoder.backbone.*``,
``encoder.localconv.weight``), so ``torch.load(path)["model"]`` loads into the original code too, and a plain
state dict written by the original is accepted wherever a checkpoint is (SPEC 6.1).
Snapshots are ``<run_dir>/snapshots/<step>.pth`` with step = number of optimiser steps done (the original's
25000, 50000, ...).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from models.weights import (
    ASPP_PREFIX,
    StateDictMismatchError,
    check_state_dict_fits,
    load_original_checkpoint,
    strip_wrapper_prefixes,
)

SNAPSHOT_PATTERN = re.compile(r"^(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the model; the message names the file."""


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` to a temporary name in the same folder, fsync, then rename.

    A crash (even SIGKILL) during the write leaves the previous file, never a truncated one; the folder is synced
    after the rename, so the new name also survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (or a plain state dict, returned as ``{"model": sd}``).

    Model keys saved through a wrapper (``module.`` from DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``)
    are returned without the prefix (:func:`models.weights.strip_wrapper_prefixes`).

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


def state_dict_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> str | None:
    """Why ``state`` does not fit ``model`` (first missing, unexpected and mis-shaped keys), or ``None`` if it fits.

    The original's unused ``encoder.aspp*`` keys are ignored unless the model builds them (Q7).
    """
    expected = model.state_dict()
    if not any(k.startswith(ASPP_PREFIX) for k in expected):
        state = {k: v for k, v in state.items() if not k.startswith(ASPP_PREFIX)}
    try:
        check_state_dict_fits(expected, state, str(path))
    except StateDictMismatchError as err:
        return str(err)
    return None


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a checkpoint's ``model`` state dict into ``model``, strictly.

    Raises:
        StateDictMismatchError: another architecture; the message names ``path`` and the first offending keys.
    """
    message = state_dict_mismatch(model, state, path)
    if message is not None:
        raise StateDictMismatchError(message)
    load_original_checkpoint(model, state)


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
