"""Loop-overhead measurement of the host-sync-free training loop: steps/s of the real training loop around a nearly free
network.

:func:`measure_loop` runs the training run of ``training.py`` (:func:`engine.train_loop.run_training`: data
pipeline, episode sampler, loss, step guard,
read-back and logging, checkpoint policy) with the encoder replaced by :class:`OneLayerEncoder`, one strided
convolution, on 64x64 inputs: what is left of a step's time is the host work of the loop itself, the figure that
decides GPU throughput once the network is fast.

:func:`legacy_train_step` is the training step as it was before the host-sync-free loop (three ``float(loss)`` reads, an
all-reduce of the finiteness and one clone per buffer per step), kept only to time it against
:func:`engine.train_step.train_step` in one run (``train_step_ratio_legacy_vs_new`` in the results).
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch
from torch import nn

from models.backbone import FEATURE_CHANNELS, OUTPUT_STRIDE


class OneLayerEncoder(nn.Module):
    """(N, 3, H, W) -> (N, 256, H/8, W/8) with one 8x8 convolution of stride 8 (H and W multiples of 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, FEATURE_CHANNELS, kernel_size=OUTPUT_STRIDE, stride=OUTPUT_STRIDE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def measure_loop(data_dir: str, fold_index: int, device: str, n_steps: int = 300, workers: int = 0,
                 size: int = 64, warmup: int = 20, threads: int | None = 1) -> dict[str, Any]:
    """Steps/s of ``training.train`` on the phantom with :class:`OneLayerEncoder`, after ``warmup`` steps.

    The rate is taken between the starts of step ``warmup + 1`` and of the last step (run setup, data loading and
    the final checkpoint are outside it; the read-backs every ``print_interval`` = 100 steps are inside).
    ``steps_per_cpu_s`` divides by the CPU time of the training process instead (with 0 workers and one thread:
    the rate of an otherwise idle machine, whatever else runs on it; DataLoader workers' CPU time is not in it).

    Args:
        data_dir: the processed phantom (with pseudolabels).
        fold_index: its fold (training scans feed the loop).
        device: "cpu" or "cuda[:i]".
        n_steps: steps of the run (> warmup + 1).
        workers: DataLoader workers.
        size: input size (slices are resized to it once, when the dataset loads).
        threads: torch intra-op threads (``None``: leave the default). One by default: on 64x64 tensors more
            threads only add synchronisation, which on a shared machine costs far more than the work.
    """
    from config_ssl_upload import ex
    from engine import train_loop

    ex.command(train_loop.run_training)  # the training run, without importing the training.py script
    if n_steps <= warmup + 1:
        raise ValueError(f"n_steps={n_steps} must exceed warmup + 1 = {warmup + 1}")
    build = train_loop.build_model
    starts: list[tuple[float, float]] = []  # (wall, CPU time of this process) at the start of each step
    step = train_loop.train_step

    def one_layer_model(config: dict[str, Any], dev: torch.device, for_training: bool) -> nn.Module:
        model = build(config, dev, for_training)
        model.encoder = OneLayerEncoder().to(dev)
        return model

    def timed_step(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        starts.append((time.perf_counter(), time.process_time()))
        return step(*args, **kwargs)

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    train_loop.build_model, train_loop.train_step = one_layer_model, timed_step
    try:
        with tempfile.TemporaryDirectory(prefix="bench_loop_") as run_dir:
            run = ex.run("run_training", named_configs=["demo"],
                         options={"--unobserved": True, "--loglevel": "WARNING"},
                         config_updates={
                             "data_dir": data_dir, "run_dir": run_dir, "eval_fold": fold_index, "device": device,
                             "num_workers": workers, "n_steps": n_steps,
                             "input_size": (size, size), "feature_hw": [size // 8, size // 8], "proto_grid_size": 2,
                             "print_interval": 100, "save_snapshot_every": n_steps, "use_file_observer": False})
        used_threads = torch.get_num_threads()
    finally:
        train_loop.build_model, train_loop.train_step = build, step
        torch.set_num_threads(default_threads)
    timed = starts[warmup:]
    n = len(timed) - 1
    return {"steps_per_s": n / (timed[-1][0] - timed[0][0]), "steps_timed": n,
            "steps_per_cpu_s": n / (timed[-1][1] - timed[0][1]),
            "run_s": run.result["elapsed_s"], "workers": workers, "input_size": size, "encoder": "one conv 8x8/8",
            "torch_threads": used_threads,
            "skipped_steps": run.result["skipped_steps"]}


def legacy_train_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None, device: torch.device, amp: str, use_wce: bool,
                      usealign: bool, ignore_label: int) -> dict[str, float]:
    """The step before the device-side guard (same arguments as :func:`engine.train_step.train_step`, floats out):
    for timing only."""
    from engine.train_step import apply_update, autocast_context
    from models.losses import QUERY_CLASS_WEIGHTS, query_loss
    from util.distributed import all_ranks_true

    supp = batch["support_images"].to(device, non_blocking=True)
    qry = batch["query_images"].to(device, non_blocking=True)
    fg = batch["support_fg"].to(device, non_blocking=True)
    bg = batch["support_bg"].to(device, non_blocking=True)
    labels = batch["query_labels"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    buffers = [b for b in model.buffers() if b.numel()]
    saved_buffers = [b.detach().clone() for b in buffers]
    with autocast_context(amp, device):
        out = model(supp, fg, bg, qry, compute_align=usealign)
    logits = out.logits.float()
    q_loss = query_loss(logits, labels.flatten(0, 1), class_weights=QUERY_CLASS_WEIGHTS if use_wce else None,
                        ignore_index=ignore_label)
    align_loss = out.align_loss.float() if usealign else torch.zeros((), device=device)
    loss = q_loss + align_loss
    terms = {"loss": float(loss.detach()), "query_loss": float(q_loss.detach()),
             "align_loss": float(align_loss.detach())}
    if not all_ranks_true(math.isfinite(terms["loss"]), device):
        terms["loss"] = math.nan
        with torch.no_grad():
            for buf, old in zip(buffers, saved_buffers):
                buf.copy_(old)
        return terms
    apply_update(loss, optimizer, scaler)
    return terms


def measure_step_ratio(backbone: str, size: int, device: str, reps: int = 3, warmup: int = 1,
                       threads: int | None = None) -> dict[str, Any]:
    """Median seconds of :func:`legacy_train_step` and of :func:`engine.train_step.train_step` (with the run's
    :class:`engine.step_guard.StepGuard`), alternated on one model and batch so that both see the same machine load.

    Args:
        threads: torch intra-op threads for the measurement (``None``: the default).

    Returns:
        ``legacy_s``, ``new_s`` (medians over ``reps`` steps each), ``ratio`` = legacy_s / new_s (> 1: faster now);
        ``cpu_ratio``, the same with the CPU time of this process (on CPU with one thread it does not depend on
        what else runs on the machine).
    """
    import statistics

    from bench.measure import sync, synthetic_batch
    from engine.step_guard import StepGuard
    from engine.train_step import train_step
    from models.grid_proto_fewshot import FewShotSeg

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = FewShotSeg(backbone=backbone, init="none", proto_grid_size=8, feature_hw=(size // 8, size // 8))
    model = model.to(dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    guard = StepGuard(model, optimizer, device_side=dev.type != "cpu")
    batch = synthetic_batch(1, size)
    args = (model, batch, optimizer, None, dev, "off", True, True, 255)
    times: dict[str, list[float]] = {"legacy": [], "new": []}
    cpu: dict[str, list[float]] = {"legacy": [], "new": []}
    for i in range(warmup + reps):
        for name, run in (("legacy", lambda: legacy_train_step(*args)), ("new", lambda: train_step(*args, guard))):
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    legacy, new = statistics.median(times["legacy"]), statistics.median(times["new"])
    cpu_ratio = statistics.median(cpu["legacy"]) / statistics.median(cpu["new"])
    return {"legacy_s": legacy, "new_s": new, "ratio": legacy / new, "cpu_ratio": cpu_ratio, "times_s": times,
            "cpu_s": cpu, "backbone": backbone, "input_size": size, "reps": reps,
            "torch_threads": torch.get_num_threads()}
