"""Self-supervised training of ALPNet on superpixel episodes (SPEC 5-7).

    python training.py with CHAOST2 setting2 label_sets=0 eval_fold=0
    python training.py with demo run_dir=runs/demo            # CPU, a few minutes, on the phantom
    torchrun --nproc_per_node=4 training.py with SABS          # several GPUs (DDP)

The loop runs exactly ``n_steps`` optimiser steps. Episode i of the run is drawn from the generator (seed, i), so
the data order does not depend on the worker count and a resumed run (``resume=True``, or
``resume_from=<run folder | checkpoint>``) sees the episodes it would have seen. Checkpoints (atomic) hold model,
optimizer, scheduler, step, config, RNG states, loss history and the normaliser (docs/troubleshooting.md).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from config_ssl_upload import ex
from data_preprocessing.geometry import preprocessing_record
from dataloaders.derived import check_checkpoint_matches_folder
from dataloaders.leakage import dataset_exclusion_record
from dataloaders.niftiio import write_json
from engine import preemption
from engine.lr_schedule import build_scheduler
from engine.step_guard import StepGuard, all_ranks_ok
from engine.tensorboard_log import TensorBoardLog
from engine.val_monitor import ValMonitor, log_validation, split_off_val_scans
from models.losses import QUERY_CLASS_WEIGHTS, query_loss
from util.checkpoint import load_checkpoint, load_model_weights, plain_config, save_checkpoint, snapshot_path
from util.cli import run_cli
from util.resume import (
    LOSS_KEYS,
    check_resume_config,
    claim_run_dir,
    find_resume_checkpoint,
    restore_scheduler_milestones,
    resume_history,
)
from util.run_setup import (
    ConfigError,
    build_model,
    build_training_dataset,
    check_training_data,
    resolve_device,
    resolve_fold,
    resolve_run_dir,
    setup_distributed,
)
from util.seeding import rng_state, seed_everything, set_deterministic, set_rng_state, worker_init_fn


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss."""


class EpisodeIndexSampler(torch.utils.data.Sampler[int]):
    """Yields the global episode indices of steps ``start_step .. n_steps - 1`` for one rank.

    Step s of rank r (of ``world`` ranks) uses episodes ``(s * world + r) * batch_size + j``, j < batch_size.
    """

    def __init__(self, start_step: int, n_steps: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.start_step, self.n_steps, self.batch_size = start_step, n_steps, batch_size
        self.rank, self.world = rank, world

    def __iter__(self):
        for s in range(self.start_step, self.n_steps):
            base = (s * self.world + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)

    def __len__(self) -> int:
        return (self.n_steps - self.start_step) * self.batch_size


def autocast_context(amp: str, device: torch.device):
    """Mixed precision context for ``amp`` in {"off", "bf16", "fp16"}."""
    if amp == "off":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, device: torch.device, amp: str, use_wce: bool,
               usealign: bool, ignore_label: int, guard: StepGuard | None = None,
               bg_weight: float = QUERY_CLASS_WEIGHTS[0]) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch of B episodes; returns the loss terms as 0-dim float32 tensors on ``device``.

    Args:
        batch: ``support_images`` (B, S, 3, H, W), ``support_fg``/``support_bg`` (B, S, H, W),
            ``query_images`` (B, Q, 3, H, W), ``query_labels`` (B, Q, H, W) int64.
        guard: the run's :class:`engine.step_guard.StepGuard` (default: a host-side one for this step).
        bg_weight: background weight of the query cross-entropy when ``use_wce`` (foreground 1.0; the paper's
            0.05 by default, config key ``wce_bg_weight``).

    Returns:
        ``loss``, ``query_loss``, ``align_loss``, not read back (the caller reads them every ``print_interval``
        steps, one host sync for many steps). ``loss`` is NaN when the step was skipped.

    A non-finite loss skips the update (no optimizer step; weights, momentum and BatchNorm statistics untouched);
    the caller counts it. With a device-side guard the decision never leaves the device (see
    :mod:`engine.step_guard`); under DDP it is taken on all ranks together. With ``channels_last`` the model converts
    its encoder batch itself.
    """
    if guard is None:
        guard = StepGuard(model, optimizer, device_side=False)
    supp = batch["support_images"].to(device, non_blocking=True)
    qry = batch["query_images"].to(device, non_blocking=True)
    fg = batch["support_fg"].to(device, non_blocking=True)
    bg = batch["support_bg"].to(device, non_blocking=True)
    labels = batch["query_labels"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    guard.begin()  # BatchNorm running statistics change in the forward pass: snapshot them (fused)
    with autocast_context(amp, device):
        out = model(supp, fg, bg, qry, compute_align=usealign)
    logits = out.logits.float()  # (B*Q, 2, H, W), episode-major
    weights = (bg_weight, QUERY_CLASS_WEIGHTS[1]) if use_wce else None
    q_loss = query_loss(logits, labels.flatten(0, 1), class_weights=weights, ignore_index=ignore_label)
    align_loss = out.align_loss.float() if usealign else torch.zeros((), device=device)
    loss = q_loss + align_loss
    ok = all_ranks_ok(torch.isfinite(loss.detach()))  # every rank skips together
    terms = {"loss": torch.where(ok, loss.detach(), math.nan), "query_loss": q_loss.detach(),
             "align_loss": align_loss.detach()}
    if scaler is None and guard.device_skip_ready():
        guard.before_update()
        loss.backward()
        optimizer.step()
        guard.after_update(ok)  # a non-finite step leaves no trace, decided on the device
        return terms
    if not bool(ok):  # host path: one read (free on CPU; on GPU only until the optimizer state exists, or fp16)
        guard.undo_forward()
        return terms
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return terms


OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: torch.nn.Module, optim_type: str, optim: dict) -> torch.optim.Optimizer:
    """The run's optimiser from the config keys ``optim_type`` and ``optim``.

    * ``sgd`` (the paper's, SPEC 7): SGD with ``optim.lr``, ``optim.momentum`` and ``optim.weight_decay``.
    * ``adamw``: AdamW (Loshchilov & Hutter, ICLR 2019) with ``optim.lr`` and decoupled ``optim.weight_decay``
      (``optim.momentum`` is not used; betas are torch's defaults 0.9, 0.999).

    Raises:
        ConfigError: unknown ``optim_type``.
    """
    if optim_type == "sgd":
        return torch.optim.SGD(model.parameters(), lr=optim["lr"], momentum=optim["momentum"],
                               weight_decay=optim["weight_decay"])
    if optim_type == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=optim["lr"], weight_decay=optim["weight_decay"])
    raise ConfigError(f"optim_type={optim_type!r}: choose one of {OPTIMIZERS} ('sgd' is the paper's)")


@ex.main
def train(_run, _config: dict, _log, seed: int, n_steps: int, batch_size: int, num_workers: int, optim: dict,
         lr_milestones: list, lr_step_gamma: float, save_snapshot_every: int, print_interval: int, amp: str,
         use_wce: bool, usealign: bool, ignore_label: int, max_nonfinite_steps: int, resume: bool,
         reload_model_path: str | None, deterministic: bool, optim_type: str,
          episode_sampling: str) -> dict:
    # ------------------------------------------------------------------ setup
    t_start = time.perf_counter()
    dist = setup_distributed()
    device = resolve_device(_config, dist)
    seed_everything(seed + dist.rank)
    set_deterministic(deterministic)
    if deterministic:  # CUDA has no deterministic bilinear-upsampling backward or NLL loss: warn there, not fail
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = resolve_run_dir(_run, _config, dist)  # under torchrun: rank 0's folder on every rank
    is_main = dist.rank == 0
    if is_main:
        claim_run_dir(run_dir)  # one training process per run folder
    resume_path = find_resume_checkpoint(_config, run_dir)  # fails now, not after loading data, on a used run_dir
    if is_main:
        _log.info("run folder: %s | device: %s | world size: %d", run_dir, device, dist.world_size)

    info, fold = resolve_fold(_config)
    fold = split_off_val_scans(fold, _config["val_scans"])  # val scans leave the training pool (engine/val_monitor.py)
    slice_counts = check_training_data(_config, info, fold)  # per-slice class counts of the label files
    # what predict.py needs to bring new scans onto this grid (scans.json of a prepared folder, else the registry's)
    preprocessing = preprocessing_record(_config["data_dir"], info.name, info.modality)
    dataset = build_training_dataset(_config, info, fold)
    exclusion = dataset_exclusion_record(dataset, slice_counts, info, _config)  # from the data, not the config
    if is_main:
        _log.info("dataset %s fold %d: train scans %s, held out %s; %s", info.name, fold.index, list(fold.train),
                  list(fold.held_out), dataset.training_statistics())

    model = build_model(_config, device, for_training=True)
    model.allow_empty_support = episode_sampling == "legacy"  # Q2 parity: empty-FG episodes are trained on
    optimizer = build_optimizer(model, optim_type, optim)
    scheduler = build_scheduler(optimizer, _config["lr_schedule"], n_steps, lr_milestones, lr_step_gamma)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    # ------------------------------------------------------------------ resume / warm start
    start_step, history = 0, {k: [] for k in LOSS_KEYS}
    if resume and resume_path is None:
        _log.info("resume=True and %s holds no snapshot yet: starting from step 0", run_dir / "snapshots")
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location=device)
        changed = check_resume_config(ckpt.get("config"), _config, resume_path)
        check_checkpoint_matches_folder(ckpt, resume_path, fold, _config, info, dataset.normalizer)
        start_step = int(ckpt["step"])
        if start_step > n_steps:
            raise ConfigError(f"{resume_path} is at step {start_step}, past n_steps={n_steps}")
        load_model_weights(model, ckpt["model"], resume_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if _config["lr_schedule"] == "step":
            restore_scheduler_milestones(scheduler, lr_milestones)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        history = resume_history(ckpt, resume_path, start_step)
        _log.info("resumed from %s at step %d%s", resume_path, start_step,
                  f" (changed keys: {changed})" if changed else "")
    elif reload_model_path:
        from models.weights import load_original_checkpoint

        load_original_checkpoint(model, reload_model_path)
        _log.info("initialised the model from %s", reload_model_path)

    ddp_model = dist.wrap(model, _config)
    # optional extras on rank 0: snapshot scoring on val_scans, TensorBoard events (both off by default)
    monitor = ValMonitor(_config, info, fold, dataset.normalizer, device, run_dir, start_step) \
        if is_main and _config["val_scans"] else None
    tb = TensorBoardLog(run_dir / "tensorboard", optim["lr"], lr_milestones, lr_step_gamma, _config["lr_schedule"],
                        n_steps) \
        if is_main and _config["tensorboard"] else None

    # ------------------------------------------------------------------ loop
    sampler = EpisodeIndexSampler(start_step, n_steps, batch_size, dist.rank, dist.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        worker_init_fn=preemption.worker_init(worker_init_fn),  # workers ignore SIGTERM/SIGUSR1
                        pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
    model.train()
    consecutive_bad, skipped = 0, 0
    guard = StepGuard(model, optimizer, device_side=device.type != "cpu")  # on GPU: skip without a host sync
    # Loss terms stay on the device until read back every print_interval steps and at snapshots (one sync for
    # many steps): (step, terms, episode ids for the report of a skipped step).
    pending: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def read_back() -> None:
        """Read the pending loss terms (one host sync); count, report and log the steps in order."""
        nonlocal consecutive_bad, skipped
        if not pending:
            return
        rows = torch.stack([torch.stack([t[k] for k in LOSS_KEYS]) for _, t, _ in pending]).tolist()
        records = list(pending)
        pending.clear()
        for (at, _, episodes), row in zip(records, rows):
            terms = dict(zip(LOSS_KEYS, row))
            if not math.isfinite(terms["loss"]):
                consecutive_bad += 1
                skipped += 1
                _log.warning("step %d: non-finite loss %s, update skipped (episodes: scan %s, slice %s, "
                             "superpixel %s)", at, terms["loss"], episodes["scan_id"].tolist(),
                             episodes["z_id"].tolist(), episodes["superpix_id"].tolist())
                if consecutive_bad >= max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{consecutive_bad} consecutive steps with a non-finite loss (last at step {at}); "
                        f"lower optim.lr, check the data, or try amp='off'")
            else:
                consecutive_bad = 0
            if is_main:
                for key, value in terms.items():
                    history[key].append(value)
                for key, value in terms.items():
                    _run.log_scalar(f"train.{key}", value, at)
                if tb is not None:
                    tb.train_terms(at, terms)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
                if at % print_interval == 0:
                    recent = history["loss"][-print_interval:]
                    _log.info("step %d: mean loss %.4f over the last %d steps", at, sum(recent) / len(recent),
                              len(recent))

    seen_episodes: list[int] = []  # global episode indices this rank trained on (DDP runs only)
    bar = tqdm(loader, total=n_steps - start_step, initial=0, desc="train", disable=not is_main,
               dynamic_ncols=True, mininterval=1.0)
    step = start_step
    preempt = preemption.PreemptionGuard().install()  # SIGTERM/SIGUSR1: snapshot at the current step, then stop
    for batch in bar:
        empty_fg = batch["support_fg"].flatten(1).sum(1) == 0
        if bool(empty_fg.any()):
            # Only the legacy sampler (Q2 parity) draws empty superpixel ids (or lets an augmentation push the
            # support foreground out of view). The original trains on such an episode like on any other: all-zero
            # FG prototype, S_fg = 0 everywhere, a small finite loss, an optimiser and a scheduler step. Legacy mode
            # does the same (the model accepts the empty support: allow_empty_support).
            if episode_sampling != "legacy":
                raise RuntimeError(f"step {step + 1}: empty support foreground in episodes "
                                   f"{batch['index'][empty_fg].tolist()} with compact sampling (a bug)")
            _log.info("step %d: empty-foreground episode (legacy sampling, scan %s slice %s superpixel %s), "
                      "trained on as in the original", step + 1, batch["scan_id"].tolist(), batch["z_id"].tolist(),
                      batch["superpix_id"].tolist())
        if dist.world_size > 1:
            seen_episodes.extend(batch["index"].tolist())  # for the cross-rank check at snapshots
        terms = train_step(ddp_model, batch, optimizer, scaler, device, amp, use_wce, usealign, ignore_label, guard,
                           bg_weight=_config["wce_bg_weight"])
        pending.append((step + 1, terms, {k: batch[k] for k in ("scan_id", "z_id", "superpix_id")}))
        scheduler.step()
        step += 1
        stop = preempt.requested(dist.world_size)
        snapshot_now = step % save_snapshot_every == 0 or step == n_steps or stop
        if snapshot_now or step % print_interval == 0:
            read_back()  # before a snapshot: its history is complete, and a diverged run stops before writing it
        # collective on all ranks: identical weights, disjoint episodes (stored in rank 0's checkpoint)
        ddp_report = dist.consistency_report(model, seen_episodes) if snapshot_now and dist.world_size > 1 else None
        if is_main:
            if snapshot_now:
                save_checkpoint({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "step": step, "config": plain_config(_config), "rng": rng_state(),
                    "normalizer": dataset.normalizer.to_dict(), "train_log": history, "ddp": ddp_report,
                    "exclusion": exclusion, "preprocessing": preprocessing,
                    "fold": {"index": fold.index, "queries": list(fold.queries), "support": list(fold.support),
                             "train": list(fold.train)},
                }, snapshot_path(run_dir, step))
                write_json(history, run_dir / "train_log.json", indent=None)
                if monitor is not None:  # after the snapshot is on disk; the model returns to training mode
                    log_validation(_run, tb, monitor.score(model, step, snapshot_path(run_dir, step)))
                if tb is not None:
                    tb.flush()
        if stop:
            bar.close()
            preempt.restore()
            raise preemption.Preempted(preempt.signum, step, snapshot_path(run_dir, step))
    read_back()  # steps after the last print_interval
    bar.close()
    preempt.restore()
    dist.cleanup()
    if tb is not None:
        tb.close()
    elapsed = time.perf_counter() - t_start
    final = str(snapshot_path(run_dir, n_steps))
    if is_main:
        _log.info("done: %d steps in %.1f s, %d skipped; final checkpoint %s", n_steps - start_step, elapsed,
                  skipped, final)
    return {"final_checkpoint": final, "steps": step, "skipped_steps": skipped, "elapsed_s": elapsed,
            # validation-based choice, reported next to the fixed final step (never instead of it)
            "best_snapshot": monitor.best if monitor is not None else None}


if __name__ == "__main__":
    sys.exit(run_cli(ex, sys.argv, extra_errors=(NonFiniteLossError,)))
