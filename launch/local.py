"""Runs on this machine's devices: one run per device entry at a time, the others wait in a queue."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from launch.runs import Run, execute, log_of


def run_local(runs: Sequence[Run], out: Path, extra: Sequence[str], devices: Sequence[str],
              log: Callable[[str], None] = print) -> list[str]:
    """Run ``runs`` with at most one run per entry of ``devices`` at a time; returns the failures (one line each)."""
    todo: queue.Queue[Run] = queue.Queue()
    for run in runs:
        todo.put(run)
    failures: list[str] = []
    n_cpu = devices.count("cpu")
    threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else None

    def worker(slot: int, device: str) -> None:
        while True:
            try:
                run = todo.get_nowait()
            except queue.Empty:
                return
            log(f"[{device}#{slot}] start {run.name}")
            start = time.perf_counter()
            code = execute(run, out, extra, device, threads if device == "cpu" else None)
            took = time.perf_counter() - start
            if code == 0:
                log(f"[{device}#{slot}] done  {run.name} ({took:.0f} s)")
            else:
                failures.append(f"{run.name}: exit code {code} (log: {log_of(run, out)})")
                log(f"[{device}#{slot}] FAILED {run.name}: exit code {code} after {took:.0f} s")

    pool = [threading.Thread(target=worker, args=(i, d), name=f"sweep-{d}-{i}") for i, d in enumerate(devices)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return failures
