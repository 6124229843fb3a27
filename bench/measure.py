"""Measurement plumbing: run a function in a fresh process and collect its peak memory; repeated timings.

Only public timing tools are used: ``time.perf_counter`` (with ``torch.cuda.synchronize`` before reading it on
CUDA), ``resource.getrusage`` for the peak resident set size, ``torch.cuda.max_memory_allocated`` for CUDA.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from util.errors import ProjectError
from util.provenance import cpu_name

# Modules the fork server imports once, so that each measurement process starts in milliseconds.
_PRELOAD = ["torch", "bench.suite", "bench.loop", "training", "evaluation.predictors", "data_preprocessing.pseudolabel",
            "dataloaders.superpixel_dataset"]


class BenchError(ProjectError, RuntimeError):
    """A measurement process failed (its traceback is on stderr) or a benchmark argument is invalid."""


def _context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where available (fresh, CUDA-safe processes, torch imported once), else ``spawn``."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _peak_memory() -> dict[str, float]:
    """Peak RSS of this process and of its largest finished child (MiB); peak CUDA allocation when CUDA was used."""
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 2**20
    if children > 0:
        out["peak_rss_children_mb"] = children
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _child(conn: Connection, fn: Callable[..., dict[str, Any]], args: tuple, kwargs: dict) -> None:
    """Measurement process: run ``fn``, add the peak memory, send the dict back (a failure just exits non-zero)."""
    value = fn(*args, **kwargs)
    value.update(_peak_memory())
    conn.send(value)
    conn.close()


def run_isolated(fn: Callable[..., dict[str, Any]], *args: Any, isolate: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn(*args, **kwargs)`` in a new process and return its result dict plus ``peak_rss_mb`` (and
    ``peak_rss_children_mb``, ``peak_cuda_mb`` where they apply) and ``wall_s`` (process start included).

    Args:
        fn: a module-level function returning a dict (picklable results).
        isolate: False runs in this process (peak memory is then the process's peak so far; for tests).

    Raises:
        BenchError: the process exited without a result.
    """
    start = time.perf_counter()
    if not isolate:
        value = fn(*args, **kwargs)
        value.update(_peak_memory())
        return {**value, "wall_s": round(time.perf_counter() - start, 2)}
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args, kwargs), name=f"bench-{fn.__name__}")
    proc.start()
    sender.close()
    try:
        value = receiver.recv()
    except EOFError:
        proc.join()
        raise BenchError(f"measurement {fn.__name__} failed (exit code {proc.exitcode}); its traceback is above") \
            from None
    proc.join()
    return {**value, "wall_s": round(time.perf_counter() - start, 2)}


def sync(device: str) -> None:
    """Wait for queued GPU work (``torch.cuda.synchronize``) so that ``perf_counter`` brackets it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_repeated(fn: Callable[[], Any], device: str, warmup: int, reps_min: int, reps_max: int,
                  budget_s: float) -> list[float]:
    """Seconds of each timed call of ``fn`` after ``warmup`` untimed calls.

    At least ``reps_min`` and at most ``reps_max`` timed calls; stops after ``reps_min`` once the timed calls
    have used ``budget_s`` seconds.
    """
    if reps_min < 1 or reps_max < reps_min:
        raise BenchError(f"need 1 <= reps_min <= reps_max, got {reps_min}, {reps_max}")
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < reps_max and (len(times) < reps_min or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, Any]:
    """Median and the raw timings (seconds, rounded to 0.1 ms)."""
    return {"median_s": statistics.median(times), "times_s": [round(t, 4) for t in times]}


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# CPU features that change the measured speed (bf16 and vector width), recorded with each run.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_features() -> list[str]:
    """Which of :data:`_CPU_FLAGS` the CPU has (from /proc/cpuinfo; empty where it is absent)."""
    if not os.path.exists("/proc/cpuinfo"):
        return []
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _CPU_FLAGS if f in have]
    return []


def environment(device: str) -> dict[str, Any]:
    """Versions and the machine (run it isolated on CUDA: it initialises the device)."""
    import torch

    env: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": cpu_name(), "cpu_features": cpu_features(), "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError("--device cuda: CUDA is not available here")
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   bf16_supported=torch.cuda.is_bf16_supported())
    return env


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages (empty where the platform has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def synthetic_batch(batch_size: int, size: int, seed: int = 0) -> dict[str, Any]:
    """B one-shot episodes like the loader's: a textured slice, an elliptic superpixel as foreground.

    Returns:
        ``support_images``/``query_images`` (B, 1, 3, H, W) float32, ``support_fg``/``support_bg`` (B, 1, H, W)
        float32, ``query_labels`` (B, 1, H, W) int64.
    """
    import torch

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs, masks = [], []
    for _ in range(batch_size):
        cy, cx = rng.uniform(0.35, 0.65, size=2)
        mask = ((yy - cy) / 0.15) ** 2 + ((xx - cx) / 0.1) ** 2 <= 1.0
        img = rng.normal(0.0, 1.0, (size, size)) + 1.5 * mask
        imgs.append(img.astype(np.float32))
        masks.append(mask)
    img_t = torch.from_numpy(np.stack(imgs))[:, None, None].expand(-1, 1, 3, -1, -1).contiguous()
    fg = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    return {"support_images": img_t, "query_images": img_t.flip(-1).contiguous(), "support_fg": fg,
            "support_bg": 1.0 - fg, "query_labels": fg.flip(-1).long()}
