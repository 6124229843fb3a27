"""Run set-up shared by training.py and validation.py: device, run folder, fold, and the data checks before work.

Each function reads the resolved Sacred config (a dict) and raises a short error naming the key, file or scan. The
objects a run builds from its config (episode dataset, model) are in :mod:`engine.builders`; the torchrun helpers
in :mod:`util.distributed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dataloaders import niftiio
from dataloaders.dataset_info import DatasetInfo, Fold, get_dataset_info
from util.distributed import DistContext
from util.errors import ConfigError


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
