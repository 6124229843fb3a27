"""The training run behind ``python training.py``: set-up, resume, the step loop, snapshots (the MAE split: the
command line and config in ``training.py``, the machinery here, so that a benchmark or a test runs it without
importing a script).

:func:`run_training` is a Sacred captured function (``_run``, ``_config``, ``_log``): ``training.py`` registers it as
the experiment's main command, and ``bench.loop`` runs it through the same experiment. Its named steps:

1. :func:`set_up_run`: device, seeds, run folder (claimed: one training process per folder), fold, data checks,
   episode dataset, model, optimiser, scheduler;
2. :func:`restore_or_warm_start`: resume from a snapshot (``resume=True`` / ``resume_from``), or load initial
   weights (``reload_model_path``);
3. the loop: one :func:`engine.train_step.train_step` per batch; the loss terms are read back every
   ``print_interval`` steps (:class:`LossLog`, one host sync for many steps); a snapshot every
   ``save_snapshot_every`` steps, at the end and on a pre-emption signal (:func:`write_snapshot`).

Episode i of the run is drawn from the generator (seed, i), so the data order does not depend on the worker count
and a resumed run sees the episodes it would have seen (:class:`engine.builders.EpisodeIndexSampler`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_preprocessing.geometry import preprocessing_record
from dataloaders.dataset_info import DatasetInfo, Fold
from dataloaders.derived import check_checkpoint_matches_folder
from dataloaders.leakage import dataset_exclusion_record
from dataloaders.niftiio import write_json
from engine import preemption
from engine.builders import build_loader, build_model, build_optimizer, build_training_dataset
from engine.lr_schedule import build_scheduler
from engine.resume import (
    LOSS_KEYS,
    check_resume_config,
    claim_run_dir,
    find_resume_checkpoint,
    restore_scheduler_milestones,
    resume_history,
)
from engine.run_setup import (
    check_key_conflicts,
    check_training_config,
    check_training_data,
    config_sources,
    resolve_device,
    resolve_fold,
    resolve_run_dir,
)
from engine.step_guard import StepGuard
from engine.tensorboard_log import TensorBoardLog
from engine.train_step import NonFiniteLossError, train_step
from engine.val_monitor import ValMonitor, log_validation, split_off_val_scans
from models.weights import load_model_weights, load_original_checkpoint
from util.checkpoint import load_checkpoint, plain_config, save_checkpoint, snapshot_path
from util.distributed import DistContext, setup_distributed
from util.errors import ConfigError
from util.seeding import rng_state, seed_everything, set_deterministic, set_rng_state


@dataclass
class RunState:
    """Everything :func:`set_up_run` builds, and the loop's progress.

    Attributes:
        dist: the torchrun context (one process: rank 0 of 1).
        device: where the model trains.
        run_dir: the run folder (``snapshots/``, ``train_log.json``).
        info, fold: the dataset and the fold (val scans split off).
        dataset: the episode dataset (its ``normalizer`` is stored in every snapshot).
        model, optimizer, scheduler, scaler: the training objects (``scaler`` only with ``amp='fp16'``).
        exclusion: the setting-2 exclusion record computed from the data (:mod:`dataloaders.leakage`).
        preprocessing: what ``predict.py`` needs to bring new scans onto this grid (stored in every snapshot).
        resume_path: the snapshot to resume from, or ``None``.
        start_step: the step the loop starts at (0, or the resumed snapshot's).
        history: loss terms per step (``LOSS_KEYS``), for ``train_log.json`` and the snapshots.
    """

    dist: DistContext
    device: torch.device
    run_dir: Path
    info: DatasetInfo
    fold: Fold
    dataset: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    exclusion: dict[str, Any]
    preprocessing: dict[str, Any]
    resume_path: Path | None
    start_step: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in LOSS_KEYS})

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def set_up_run(_run: Any, config: dict[str, Any], log: Any) -> RunState:
    """Step 1: config checks, device, seeds, run folder, fold, data checks, dataset, model, optimiser, scheduler.

    Raises:
        ConfigError, DataFormatError, ...: a project error naming the key, file or scan, before any training.
    """
    check_training_config(config)  # bad values and keys that cannot act: refused before any file is touched
    user_keys, named_keys = config_sources(_run)
    ignored = check_key_conflicts(config, user_keys, named_keys, int(os.environ.get("WORLD_SIZE", "1")))
    dist = setup_distributed()
    for line in ignored if dist.rank == 0 else []:
        log.warning(line)
    device = resolve_device(config, dist)
    seed_everything(config["seed"] + dist.rank)
    set_deterministic(config["deterministic"])
    if config["deterministic"]:  # CUDA has no deterministic bilinear-upsampling backward or NLL loss: warn there
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = resolve_run_dir(_run, config, dist)  # under torchrun: rank 0's folder on every rank
    if dist.rank == 0:
        claim_run_dir(run_dir)  # one training process per run folder
    resume_path = find_resume_checkpoint(config, run_dir)  # fails now, not after loading data, on a used run_dir
    if dist.rank == 0:
        log.info("run folder: %s | device: %s | world size: %d", run_dir, device, dist.world_size)

    info, fold = resolve_fold(config)
    fold = split_off_val_scans(fold, config["val_scans"])  # val scans leave the training pool
    slice_counts = check_training_data(config, info, fold)  # per-slice class counts of the label files
    preprocessing = preprocessing_record(config["data_dir"], info.name, info.modality, fold.train, info.spacing_mm)
    dataset = build_training_dataset(config, info, fold)
    exclusion = dataset_exclusion_record(dataset, slice_counts, info, config)  # from the data, not the config
    if dist.rank == 0:
        log.info("dataset %s fold %d: train scans %s, held out %s; %s", info.name, fold.index, list(fold.train),
                 list(fold.held_out), dataset.training_statistics())

    model = build_model(config, device, for_training=True)
    model.allow_empty_support = config["episode_sampling"] == "legacy"  # the original trains on empty-FG episodes
    optimizer = build_optimizer(model, config["optim_type"], config["optim"])
    scheduler = build_scheduler(optimizer, config["lr_schedule"], config["n_steps"], config["lr_milestones"],
                                config["lr_step_gamma"])
    scaler = torch.amp.GradScaler(device.type) if config["amp"] == "fp16" else None
    return RunState(dist, device, run_dir, info, fold, dataset, model, optimizer, scheduler, scaler, exclusion,
                    preprocessing, resume_path)


def restore_or_warm_start(state: RunState, config: dict[str, Any], log: Any) -> None:
    """Step 2: continue from ``state.resume_path`` (weights, optimiser, scheduler, scaler, RNG, loss history), or
    initialise the weights from ``reload_model_path``.

    Raises:
        ConfigError: the snapshot is past ``n_steps``; CheckpointError / StateDictMismatchError: it does not fit.
    """
    if config["resume"] and state.resume_path is None:
        log.info("resume=True and %s holds no snapshot yet: starting from step 0", state.run_dir / "snapshots")
    if state.resume_path is not None:
        path = state.resume_path
        ckpt = load_checkpoint(path, map_location=state.device)
        changed = check_resume_config(ckpt.get("config"), config, path)
        check_checkpoint_matches_folder(ckpt, path, state.fold, config, state.info, state.dataset.normalizer)
        state.start_step = int(ckpt["step"])
        if state.start_step > config["n_steps"]:
            raise ConfigError(f"{path} is at step {state.start_step}, past n_steps={config['n_steps']}")
        load_model_weights(state.model, ckpt["model"], path)
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        if config["lr_schedule"] == "step":
            restore_scheduler_milestones(state.scheduler, config["lr_milestones"])
        if state.scaler is not None and ckpt.get("scaler"):
            state.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        state.history = resume_history(ckpt, path, state.start_step)
        log.info("resumed from %s at step %d%s", path, state.start_step,
                 f" (changed keys: {changed})" if changed else "")
    elif config["reload_model_path"]:
        load_original_checkpoint(state.model, config["reload_model_path"])
        log.info("initialised the model from %s", config["reload_model_path"])


class LossLog:
    """The loss terms of the steps since the last read-back, kept on the device; :meth:`read_back` fetches them in
    one host sync, counts non-finite steps, and logs the rest (Sacred scalars, TensorBoard, the progress bar).

    Args:
        run: the Sacred run (``log_scalar``).
        log: the run's logger.
        history: per-key lists the finite and non-finite terms are appended to (rank 0 only).
        max_nonfinite_steps: consecutive non-finite steps that stop the run.
        print_interval: steps between the mean-loss log lines.
        is_main: rank 0 (only it logs).
        tensorboard: optional :class:`engine.tensorboard_log.TensorBoardLog`.

    Raises (from :meth:`read_back`):
        NonFiniteLossError: ``max_nonfinite_steps`` consecutive steps with a NaN/Inf loss.
    """

    def __init__(self, run: Any, log: Any, history: dict[str, list[float]], max_nonfinite_steps: int,
                 print_interval: int, is_main: bool, tensorboard: TensorBoardLog | None = None) -> None:
        self.run, self.log, self.history = run, log, history
        self.max_bad, self.print_interval, self.is_main, self.tb = max_nonfinite_steps, print_interval, is_main, \
            tensorboard
        self.pending: list[tuple[int, float, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.consecutive_bad = 0
        self.skipped = 0
        self.bar: Any = None

    def add(self, step: int, lr: float, terms: dict[str, torch.Tensor], episodes: dict[str, torch.Tensor]) -> None:
        """Keep one step's terms (device tensors), the learning rate it used and its episode ids."""
        self.pending.append((step, lr, terms, episodes))

    def read_back(self) -> None:
        """Fetch the pending terms (one host sync); count, report and log the steps in order."""
        if not self.pending:
            return
        rows = torch.stack([torch.stack([t[k] for k in LOSS_KEYS]) for _, _, t, _ in self.pending]).tolist()
        records = list(self.pending)
        self.pending.clear()
        for (at, lr, _, episodes), row in zip(records, rows):
            terms = dict(zip(LOSS_KEYS, row))
            self._count(at, terms, episodes)
            if self.is_main:
                self._log(at, lr, terms)

    def _count(self, at: int, terms: dict[str, float], episodes: dict[str, torch.Tensor]) -> None:
        if math.isfinite(terms["loss"]):
            self.consecutive_bad = 0
            return
        self.consecutive_bad += 1
        self.skipped += 1
        self.log.warning("step %d: non-finite loss %s, update skipped (episodes: scan %s, slice %s, superpixel %s)",
                         at, terms["loss"], episodes["scan_id"].tolist(), episodes["z_id"].tolist(),
                         episodes["superpix_id"].tolist())
        if self.consecutive_bad >= self.max_bad:
            raise NonFiniteLossError(f"{self.consecutive_bad} consecutive steps with a non-finite loss (last at step "
                                     f"{at}); lower optim.lr, check the data, or try amp='off'")

    def _log(self, at: int, lr: float, terms: dict[str, float]) -> None:
        for key, value in terms.items():
            self.history[key].append(value)
            self.run.log_scalar(f"train.{key}", value, at)
        if self.tb is not None:
            self.tb.train_terms(at, terms, lr)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        if at % self.print_interval == 0:
            recent = self.history["loss"][-self.print_interval:]
            self.log.info("step %d: mean loss %.4f over the last %d steps", at, sum(recent) / len(recent),
                          len(recent))


def write_snapshot(state: RunState, config: dict[str, Any], step: int, ddp_report: dict[str, Any] | None) -> Path:
    """Write ``snapshots/<step>.pth`` (atomic) and ``train_log.json``: everything a resume, ``validation.py`` and
    ``predict.py`` need (weights, optimiser, scheduler, scaler, step, config, RNG states, normaliser, loss history,
    the DDP consistency report, the exclusion record, the preprocessing, the fold)."""
    fold = state.fold
    path = save_checkpoint({
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict() if state.scaler else None,
        "step": step, "config": plain_config(config), "rng": rng_state(),
        "normalizer": state.dataset.normalizer.to_dict(), "train_log": state.history, "ddp": ddp_report,
        "exclusion": state.exclusion, "preprocessing": state.preprocessing,
        "fold": {"index": fold.index, "queries": list(fold.queries), "support": list(fold.support),
                 "train": list(fold.train)},
    }, snapshot_path(state.run_dir, step))
    write_json(state.history, state.run_dir / "train_log.json", indent=None)
    return path


def check_support_foreground(batch: dict[str, Any], step: int, legacy: bool, log: Any) -> None:
    """Episodes with an empty support foreground: a bug with compact sampling; trained on, as the original did, in
    legacy sampling (only it draws empty superpixel ids or lets an augmentation push the support out of view: an
    all-zero FG prototype, S_fg = 0 everywhere, a small finite loss; docs/method.md#quirks).

    Raises:
        RuntimeError: an empty support foreground with compact sampling.
    """
    empty_fg = batch["support_fg"].flatten(1).sum(1) == 0
    if not bool(empty_fg.any()):
        return
    if not legacy:
        raise RuntimeError(f"step {step + 1}: empty support foreground in episodes "
                           f"{batch['index'][empty_fg].tolist()} with compact sampling (a bug)")
    log.info("step %d: empty-foreground episode (legacy sampling, scan %s slice %s superpixel %s), trained on as in "
             "the original", step + 1, batch["scan_id"].tolist(), batch["z_id"].tolist(),
             batch["superpix_id"].tolist())


def run_training(_run: Any, _config: dict[str, Any], _log: Any) -> dict[str, Any]:
    """Train ALPNet for exactly ``n_steps`` optimiser steps (module docstring). Returns the run's result dict:
    ``final_checkpoint``, ``steps``, ``skipped_steps``, ``elapsed_s``, ``best_snapshot`` (with ``val_scans``)."""
    t_start = time.perf_counter()
    config, n_steps = _config, _config["n_steps"]
    state = set_up_run(_run, config, _log)
    restore_or_warm_start(state, config, _log)
    model, device, dist = state.model, state.device, state.dist
    ddp_model = dist.wrap(model, config)
    # optional extras on rank 0: snapshot scoring on val_scans, TensorBoard events (both off by default)
    monitor = ValMonitor(config, state.info, state.fold, state.dataset.normalizer, device, state.run_dir,
                         state.start_step) if state.is_main and config["val_scans"] else None
    tb = TensorBoardLog(state.run_dir / "tensorboard") if state.is_main and config["tensorboard"] else None
    losses = LossLog(_run, _log, state.history, config["max_nonfinite_steps"], config["print_interval"],
                     state.is_main, tb)

    loader = build_loader(state.dataset, config, state.start_step, dist, device)
    model.train()
    guard = StepGuard(model, state.optimizer, device_side=device.type != "cpu")  # on GPU: skip without a host sync
    seen_episodes: list[int] = []  # global episode indices this rank trained on (DDP runs only)
    losses.bar = bar = tqdm(loader, total=n_steps - state.start_step, initial=0, desc="train",
                            disable=not state.is_main, dynamic_ncols=True, mininterval=1.0)
    step = state.start_step
    preempt = preemption.PreemptionGuard().install()  # SIGTERM/SIGUSR1: snapshot at the current step, then stop
    for batch in bar:
        check_support_foreground(batch, step, config["episode_sampling"] == "legacy", _log)
        if dist.world_size > 1:
            seen_episodes.extend(batch["index"].tolist())  # for the cross-rank check at snapshots
        lr = state.scheduler.get_last_lr()[0]  # the rate this step uses
        terms = train_step(ddp_model, batch, state.optimizer, state.scaler, device, config["amp"],
                           config["use_wce"], config["usealign"], config["ignore_label"], guard,
                           bg_weight=config["wce_bg_weight"])
        losses.add(step + 1, lr, terms, {k: batch[k] for k in ("scan_id", "z_id", "superpix_id")})
        state.scheduler.step()
        step += 1
        stop = preempt.requested(dist.world_size)
        snapshot_now = step % config["save_snapshot_every"] == 0 or step == n_steps or stop
        if snapshot_now or step % config["print_interval"] == 0:
            losses.read_back()  # before a snapshot: its history is complete, and a diverged run stops first
        # collective on all ranks: identical weights, disjoint episodes (stored in rank 0's checkpoint)
        ddp_report = dist.consistency_report(model, seen_episodes) if snapshot_now and dist.world_size > 1 else None
        if state.is_main and snapshot_now:
            path = write_snapshot(state, config, step, ddp_report)
            if monitor is not None:  # after the snapshot is on disk; the model returns to training mode
                log_validation(_run, tb, monitor.score(model, step, path))
            if tb is not None:
                tb.flush()
        if stop:
            bar.close()
            preempt.restore()
            raise preemption.Preempted(preempt.signum, step, snapshot_path(state.run_dir, step))
    losses.read_back()  # steps after the last print_interval
    bar.close()
    preempt.restore()
    dist.cleanup()
    if tb is not None:
        tb.close()
    elapsed = time.perf_counter() - t_start
    final = str(snapshot_path(state.run_dir, n_steps))
    if state.is_main:
        _log.info("done: %d steps in %.1f s, %d skipped; final checkpoint %s", n_steps - state.start_step, elapsed,
                  losses.skipped, final)
    return {"final_checkpoint": final, "steps": step, "skipped_steps": losses.skipped, "elapsed_s": elapsed,
            # validation-based choice, reported next to the fixed final step (never instead of it)
            "best_snapshot": monitor.best if monitor is not None else None}
