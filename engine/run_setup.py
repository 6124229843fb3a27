"""Run set-up shared by training.py and validation.py: config checks, device, run folder, fold, and the data checks
before work.

Each function reads the resolved Sacred config (a dict) and raises a short error naming the key, file or scan. The
objects a run builds from its config (episode dataset, model) are in :mod:`engine.builders`; the torchrun helpers
in :mod:`util.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dataloaders import niftiio
from dataloaders.dataset_info import DatasetInfo, Fold, get_dataset_info
from engine.builders import OPTIMIZERS
from engine.lr_schedule import LR_SCHEDULES
from models.backbone import LITE_WIDTHS
from util.distributed import DistContext
from util.errors import ConfigError

AMP_MODES = ("off", "bf16", "fp16")


# ---------------------------------------------------------------------- config checks (before any work)
def check_training_config(config: dict[str, Any]) -> None:
    """Refuse, before a file is read or written, config values a training run cannot use: a closed choice
    (``lr_schedule``, ``optim_type``, ``amp``) outside its choices, or a backbone option the backbone lacks.

    Raises:
        ConfigError: naming the key (and the key it contradicts).
    """
    for key, allowed in (("lr_schedule", LR_SCHEDULES), ("optim_type", OPTIMIZERS), ("amp", AMP_MODES)):
        if config[key] not in allowed:
            raise ConfigError(f"{key}={config[key]!r}: choose one of {list(allowed)}")
    if config["modelname"] in LITE_WIDTHS:
        starts_elsewhere = config["backbone_weights"] or config["reload_model_path"] or config["resume_from"]
        if config["use_coco_init"] and not starts_elsewhere:
            raise ConfigError(f"use_coco_init=True: modelname={config['modelname']!r} has no COCO weights; pass "
                              f"use_coco_init=False (random init) or backbone_weights=<file>")
        if config["build_unused_aspp"]:
            raise ConfigError(f"build_unused_aspp=True: modelname={config['modelname']!r} has no ASPP head (only the "
                              f"ResNet backbones do); drop build_unused_aspp")


@dataclass(frozen=True)
class KeyConflict:
    """A config key that cannot act while another key (or the environment) holds some value.

    Attributes:
        key: the key that would be ignored (dotted for nested keys, e.g. ``optim.momentum``).
        cause: the key that stops it; ``WORLD_SIZE`` stands for the number of torchrun processes.
        blocks: ``view -> True`` when ``cause`` stops ``key`` (``view``: the config plus ``WORLD_SIZE``).
        why: the reason, for the message.
        inert: values of ``key`` that do nothing anyway (an empty list, a switch turned off): never reported.
    """

    key: str
    cause: str
    blocks: Callable[[dict[str, Any]], bool]
    why: str
    inert: tuple[Any, ...] = ()


def _decaying_schedule(view: dict[str, Any]) -> bool:
    return view["lr_schedule"] in ("cosine", "poly")


def _no_observer(view: dict[str, Any]) -> bool:
    return not view["use_file_observer"]


#: Every pair of the config (config_ssl_upload.py) where one key cannot act under the other's value, in training.
#: Keys that act in ``validation.py`` (``val_wsize``, ``eval_batch_size``, ``eval_classes``, ``n_sup_part``,
#: ``z_margin``, ...) are not listed: the sweep and the examples pass the same words to both scripts.
KEY_CONFLICTS: tuple[KeyConflict, ...] = (
    KeyConflict("lr_milestones", "lr_schedule", _decaying_schedule,
                "cosine and poly decay smoothly over n_steps, without milestones", inert=([],)),
    KeyConflict("lr_step_gamma", "lr_schedule", _decaying_schedule,
                "only the step schedule multiplies the lr by lr_step_gamma"),
    KeyConflict("lr_step_gamma", "lr_milestones", lambda v: v["lr_schedule"] == "step" and not v["lr_milestones"],
                "without a milestone the step schedule never decays the lr"),
    KeyConflict("optim.momentum", "optim_type", lambda v: v["optim_type"] == "adamw",
                "AdamW has no momentum term (its betas are torch's defaults)"),
    KeyConflict("wce_bg_weight", "use_wce", lambda v: not v["use_wce"],
                "the query cross-entropy is unweighted with use_wce=False"),
    KeyConflict("border_fill", "which_aug", lambda v: v["which_aug"] == "none",
                "without augmentation no slice is warped, so no border is filled"),
    KeyConflict("aug_parity", "which_aug", lambda v: v["which_aug"] == "none",
                "without augmentation there is no augmentation arithmetic to reproduce", inert=(False,)),
    KeyConflict("exclusion_rule", "exclude_cls_list", lambda v: not v["exclude_cls_list"],
                "no class is excluded (setting 1), so no slice is dropped by either rule"),
    KeyConflict("multishot_proto", "n_shots", lambda v: v["n_shots"] == 1,
                "one support scan has no prototypes of other shots to combine"),
    KeyConflict("gpu_id", "device", lambda v: v["device"] != "auto",
                "gpu_id picks the GPU only with device=auto"),
    KeyConflict("gpu_id", "WORLD_SIZE", lambda v: v["WORLD_SIZE"] > 1,
                "under torchrun each process uses the GPU of its local rank"),
    KeyConflict("sync_bn", "WORLD_SIZE", lambda v: v["WORLD_SIZE"] == 1,
                "SyncBatchNorm synchronises the processes of a torchrun (DDP) run; this is one process",
                inert=(False,)),
    KeyConflict("sync_bn", "modelname", lambda v: v["modelname"] in LITE_WIDTHS,
                "the lite backbones use GroupNorm: there is no BatchNorm to synchronise", inert=(False,)),
    KeyConflict("use_coco_init", "backbone_weights", lambda v: bool(v["backbone_weights"]),
                "the encoder starts from backbone_weights", inert=(False,)),
    KeyConflict("use_coco_init", "reload_model_path", lambda v: bool(v["reload_model_path"]),
                "the whole model starts from reload_model_path", inert=(False,)),
    KeyConflict("resume", "resume_from", lambda v: bool(v["resume_from"]),
                "resume_from names the checkpoint the run continues from", inert=(False,)),
    KeyConflict("reload_model_path", "resume_from", lambda v: bool(v["resume_from"]),
                "a resumed run takes its weights from resume_from", inert=(None,)),
    KeyConflict("path.log_dir", "use_file_observer", _no_observer, "no file observer writes there"),
    KeyConflict("exp_prefix", "use_file_observer", _no_observer, "it only names the file observer's folder"),
)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_key_conflicts(config: dict[str, Any], updated_keys: Iterable[str], named_keys: Iterable[str] = (),
                        world_size: int = 1) -> list[str]:
    """Keys of :data:`KEY_CONFLICTS` that cannot act under the other keys' values.

    A key the user set (``with key=value``, or ``config_updates``) that cannot act is an error; one a named config
    set is a warning (the named config is a recipe, the user may override the key that blocks it); a default value
    is neither (the defaults are the paper's and apply to every run). A value in the pair's ``inert`` values never
    counts.

    Args:
        config: the resolved config.
        updated_keys: the keys the user set (dotted paths).
        named_keys: the keys a named config set (dotted paths).
        world_size: processes of the run (``WORLD_SIZE`` under torchrun, else 1).

    Returns:
        One warning line per conflict of a named-config key.

    Raises:
        ConfigError: the user set a key that cannot act; the message names both keys of every such pair.
    """
    view = {**config, "WORLD_SIZE": world_size}
    updated, named = set(updated_keys), set(named_keys)
    errors: list[str] = []
    warnings: list[str] = []
    for pair in KEY_CONFLICTS:
        value = _lookup(view, pair.key)
        if value in pair.inert or not pair.blocks(view):
            continue
        text = (f"{pair.key}={_shown(value)} cannot act with {pair.cause}={_shown(_lookup(view, pair.cause))}: "
                f"{pair.why}")
        if pair.key in updated:
            errors.append(text)
        elif pair.key in named:
            warnings.append(f"{text} (set by a named config; ignored)")
    if errors:
        raise ConfigError("; ".join(errors) + " (drop the ignored key, or change the key that blocks it)")
    return warnings


def config_sources(run: Any) -> tuple[set[str], set[str]]:
    """The keys the user set and the keys named configs set, for :func:`check_key_conflicts`.

    Sacred keeps the user's updates (``with key=value`` or ``ex.run(config_updates=...)``) in
    ``run.meta_info["config_updates"]``; ``run.config_modifications`` lists every key that differs from the
    default scope (the user's and the named configs'). Nested keys are dotted (``optim.lr``), with their parents.

    Args:
        run: the Sacred run (``_run``).

    Returns:
        (keys set by the user, keys set by named configs only).
    """
    user: set[str] = set()

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            path = f"{prefix}{key}"
            user.add(path)
            if isinstance(value, dict) and value:
                walk(value, f"{path}.")

    walk(dict(run.meta_info.get("config_updates") or {}), "")
    mods = run.config_modifications
    changed = set(mods.added) | set(mods.modified) | set(mods.typechanged)
    return user, changed - user


# ---------------------------------------------------------------------- device and folders
def resolve_device(config: dict[str, Any], dist: DistContext | None = None) -> torch.device:
    """``device`` key: "auto" picks CUDA (``gpu_id``, or the local rank under torchrun) when present, else CPU."""
    name = config["device"]
    if name == "auto":
        if torch.cuda.is_available():
            index = dist.local_rank if dist is not None and dist.world_size > 1 else config["gpu_id"]
            return torch.device(f"cuda:{index}")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def resolve_run_dir(run: Any, config: dict[str, Any], dist: DistContext | None = None) -> Path:
    """Folder for snapshots/ and results: ``run_dir`` if set, else the file observer's run folder.

    Under torchrun (``dist`` with world size > 1) rank 0 resolves the folder (only it has an observer) and every
    rank gets rank 0's answer, so all ranks read and resume from the same snapshots.
    """
    if dist is not None and dist.world_size > 1:
        path = dist.broadcast_object(str(resolve_run_dir(run, config)) if dist.rank == 0 else None)
        return Path(path)
    if config["run_dir"]:
        path = Path(config["run_dir"])
    else:
        dirs = [obs.dir for obs in run.observers if getattr(obs, "dir", None)]
        if not dirs:
            raise ConfigError("no output folder: set run_dir=<folder> (runs started with --unobserved need it)")
        path = Path(dirs[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_fold(config: dict[str, Any]) -> tuple[DatasetInfo, Fold]:
    """Dataset info and the fold's queries / support / training scans, with ``support_idx`` applied.

    ``support_idx`` indexes the held-out list (queries followed by the fold's support scans; -1 = last).
    """
    info = get_dataset_info(config["dataset"])
    for key, allowed in (("n_ways", (1,)), ("n_queries", (1,))):
        if config[key] not in allowed:
            raise ConfigError(f"{key}={config[key]} is not supported (allowed: {list(allowed)}): ALPNet episodes "
                              f"are 1-way with one query per episode")
    if not isinstance(config["n_shots"], int) or config["n_shots"] < 1:
        raise ConfigError(f"n_shots={config['n_shots']} must be a positive integer")
    if not isinstance(config["n_sup_part"], int) or config["n_sup_part"] < 1:
        raise ConfigError(f"n_sup_part={config['n_sup_part']} must be a positive integer")
    available = niftiio.list_scan_ids(config["data_dir"])
    fold = info.fold(config["eval_fold"], available=available, n_shots=config["n_shots"])
    held = list(fold.held_out)
    if not held:  # a training-only fold (an unlabelled dataset from data_preprocessing.prepare): nothing held out
        return info, fold
    support_idx = list(config["support_idx"])
    if len(support_idx) != config["n_shots"]:
        support_idx = list(range(-config["n_shots"], 0)) if support_idx == [-1] else support_idx
    if len(support_idx) != config["n_shots"]:
        raise ConfigError(f"support_idx={support_idx} must list n_shots={config['n_shots']} positions")
    for i in support_idx:
        if not -len(held) <= i < len(held):
            raise ConfigError(f"support_idx={support_idx}: {i} is outside the held-out list {held} of fold "
                              f"{fold.index}")
    support = tuple(held[i] for i in support_idx)
    queries = tuple(s for s in held if s not in support)
    return info, Fold(fold.index, queries, support, fold.train)


def check_training_data(config: dict[str, Any], info: DatasetInfo, fold: Fold) -> dict[int, Any]:
    """Fail early, naming the file: missing superpixels, a missing class map or one that disagrees with the label
    files, bad config lists, a setting-2 config that would leak (``dataloaders.leakage``), or a scan of the fold
    (held-out ones included) whose image or label is truncated, off the image grid, non-finite, or holds label ids
    the dataset does not define.

    Returns:
        scan id -> (Z, C) int64 per-slice pixel counts of every class in the label file, for every scan of the
        fold (C = largest label id + 1); ``training.py`` computes the run's exclusion record from them.
    """
    from dataloaders.derived import check_classmap_matches, classmap_command, pseudolabel_command
    from dataloaders.leakage import check_setting2_config
    from dataloaders.slice_counts import slice_counts

    data_dir = Path(config["data_dir"])
    for key in ("n_steps", "batch_size", "save_snapshot_every", "print_interval", "max_nonfinite_steps"):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"{key}={config[key]!r} must be a positive integer")
    if isinstance(config["min_fg_data"], bool) or not isinstance(config["min_fg_data"], int) \
            or config["min_fg_data"] < 1:
        raise ConfigError(f"min_fg_data={config['min_fg_data']!r} must be a positive integer (pixels per slice)")
    if not fold.train:
        raise ConfigError(f"fold {fold.index} with n_shots={config['n_shots']} holds out every scan "
                          f"{list(fold.held_out)}: no training scan is left")
    if config["exclusion_rule"] not in ("any", "all"):
        raise ConfigError(f"exclusion_rule={config['exclusion_rule']!r} must be 'any' or 'all'")
    unknown = [c for c in config["exclude_cls_list"] if c not in info.class_names]
    if unknown:
        raise ConfigError(f"exclude_cls_list has ids {unknown} that {info.name} does not define "
                          f"({info.class_names})")
    check_setting2_config(config, info)
    dim = config.get("superpix_dim", 2)
    if dim not in (2, 3):
        raise ConfigError(f"superpix_dim={dim!r} must be 2 (per-slice superpixels) or 3 (3D supervoxels)")
    if dim == 3:
        if config["episode_sampling"] != "compact":
            raise ConfigError(f"episode_sampling={config['episode_sampling']!r} reproduces the original's 2D "
                              f"superpixel episodes; superpix_dim=3 needs episode_sampling='compact'")
        from dataloaders.supervoxel_dataset import supervoxel_command

        missing = [sid for sid in fold.train
                   if not niftiio.supervox_path(data_dir, sid, config["superpix_scale"]).is_file()]
        if missing:
            raise niftiio.DataFormatError(
                f"{niftiio.supervox_path(data_dir, missing[0], config['superpix_scale'])}: supervoxel file missing "
                f"for scan {missing[0]}" + (f" (and scans {missing[1:]})" if missing[1:] else "")
                + f" (superpix_dim=3); build them with {supervoxel_command(data_dir, info, config['superpix_scale'])}")
    else:
        missing = [sid for sid in fold.train
                   if not niftiio.superpix_path(data_dir, sid, config["superpix_scale"]).is_file()]
    if missing and dim == 2:
        raise niftiio.DataFormatError(
            f"{niftiio.superpix_path(data_dir, missing[0], config['superpix_scale'])}: superpixel file missing for "
            f"scan {missing[0]}" + (f" (and scans {missing[1:]})" if missing[1:] else "") + "; generate it with "
            + pseudolabel_command(data_dir, info, missing, config["superpix_scale"]))
    min_fg = config["min_fg_data"]
    cmap = niftiio.load_classmap(data_dir, list(info.labels.values()), min_fg=min_fg,
                                 rebuild=classmap_command(data_dir, info, min_fg))
    # Every scan of the fold, held-out ones included, so that a day of training never ends on a broken label file.
    n_classes = max(info.labels) + 1
    counts: dict[int, Any] = {}
    for sid in tqdm(sorted(set(fold.train) | set(fold.held_out)), desc="checking scans", leave=False):
        scan = niftiio.load_scan(data_dir, sid, with_label=True, known_labels=set(info.labels))
        counts[sid] = slice_counts(scan.label, n_classes)
    check_classmap_matches(cmap, counts, data_dir, info, min_fg)
    return counts
