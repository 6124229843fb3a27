"""Seeding, RNG state capture for checkpoints, and deterministic mode (docs/method.md#q5-unseeded-numpy).

The episode dataset needs none of the global state here (each episode has its own ``np.random.Generator``);
these helpers cover everything else: model init, dropout, third-party code using global NumPy/Python RNGs.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, NumPy's legacy global RNG (for third-party code), torch and all CUDA devices.

    Returns:
        ``seed``.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python and NumPy's global RNG of the worker from its torch seed.

    ``torch.initial_seed()`` inside a worker is the loader's base seed + ``worker_id``, so workers differ from each
    other and from run to run only if the run seed does (on old torch every worker had the same NumPy state:
    docs/method.md#q5-unseeded-numpy).
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (for DataLoader shuffling and samplers)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch and CUDA RNG states, as plain lists and tensors.

    The result survives ``torch.save`` / ``torch.load(weights_only=True)`` (no NumPy arrays inside).
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state` (CUDA states only if present and CUDA is available)."""
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise KeyError(f"RNG state has no '{key}' entry")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    nps = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.asarray(nps["key"], dtype=np.uint32), "pos": int(nps["pos"])},
                         "has_gauss": int(nps["has_gauss"]), "gauss": float(nps["gauss"])})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_deterministic(flag: bool) -> None:
    """Turn deterministic mode on or off.

    On: ``torch.use_deterministic_algorithms(True)`` (non-deterministic ops raise), cuDNN deterministic and not
    benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (it must be set before the first
    cuBLAS call, so call this early). Off: the original's speed setting, ``cudnn.benchmark = True``
    (docs/method.md#q5-unseeded-numpy).
    """
    if flag:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(flag))
    torch.backends.cudnn.deterministic = bool(flag)
    torch.backends.cudnn.benchmark = not flag
