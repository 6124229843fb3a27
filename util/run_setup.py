"""Setup shared by training.py and validation.py: device, run folder, fold, data checks, model, DDP.

Each function reads the resolved Sacred config (a dict) and raises a short error naming the key, file or scan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataloaders import niftiio
from dataloaders.dataset_info import DatasetInfo, Fold, get_dataset_info


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


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


def resolve_run_dir(run: Any, config: dict[str, Any]) -> Path:
    """Folder for snapshots/ and results: ``run_dir`` if set, else the file observer's run folder."""
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


def check_training_data(config: dict[str, Any], info: DatasetInfo, fold: Fold) -> None:
    """Fail early, naming the file, when a training scan lacks its superpixels or the class map is stale."""
    data_dir = Path(config["data_dir"])
    for sid in fold.train:
        path = niftiio.superpix_path(data_dir, sid, config["superpix_scale"])
        if not path.is_file():
            raise niftiio.DataFormatError(
                f"{path}: superpixel file missing for scan {sid}; generate it with "
                f"python -m data_preprocessing.pseudolabel --data-dir {data_dir} --dataset {info.name}")
    niftiio.load_classmap(data_dir, list(info.labels.values()), min_fg=config["min_fg_data"])
    if config["exclusion_rule"] not in ("any", "all"):
        raise ConfigError(f"exclusion_rule={config['exclusion_rule']!r} must be 'any' or 'all'")
    unknown = [c for c in config["exclude_cls_list"] if c not in info.class_names]
    if unknown:
        raise ConfigError(f"exclude_cls_list has ids {unknown} that {info.name} does not define "
                          f"({info.class_names})")


def build_training_dataset(config: dict[str, Any], info: DatasetInfo, fold: Fold):
    """The superpixel episode dataset over the fold's training scans (SPEC 5)."""
    import dataclasses

    from dataloaders.augmentations import PRESETS
    from dataloaders.superpixel_dataset import SuperpixelEpisodeDataset

    name = "identity" if config["which_aug"] == "none" else config["which_aug"]
    if name not in PRESETS:
        raise ConfigError(f"which_aug={config['which_aug']!r}: choose one of {sorted(PRESETS)} or 'none'")
    aug = dataclasses.replace(PRESETS[name], border_fill=config["border_fill"])
    size = tuple(config["input_size"])
    if len(size) != 2 or size[0] != size[1]:
        raise ConfigError(f"input_size={list(size)}: only square inputs are supported")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return SuperpixelEpisodeDataset(
        data_dir=config["data_dir"], info=info, scan_ids=list(fold.train),
        exclude_classes=list(config["exclude_cls_list"]), exclusion_rule=config["exclusion_rule"],
        superpix_scale=config["superpix_scale"], min_fg=config["min_fg_data"],
        n_episodes=config["n_steps"] * config["batch_size"] * world, seed=config["seed"], aug=aug,
        episode_sampling=config["episode_sampling"], n_shots=1, n_queries=config["n_queries"],
        input_size=int(size[0]),
    )


def build_model(config: dict[str, Any], device: torch.device, for_training: bool) -> torch.nn.Module:
    """FewShotSeg with the config's backbone and initialisation, on ``device``."""
    from models.grid_proto_fewshot import FewShotSeg

    if config["clsname"] != "grid_proto":
        raise ConfigError(f"clsname={config['clsname']!r}: only 'grid_proto' (ALPNet) is implemented")
    init = "coco" if config["use_coco_init"] and for_training and not config["reload_model_path"] else "none"
    weights_path = config["backbone_weights"] if for_training else None
    if weights_path:
        init = "none"
    model = FewShotSeg(
        backbone=config["modelname"], init=init, weights_path=weights_path,
        proto_grid_size=config["proto_grid_size"], feature_hw=tuple(config["feature_hw"]),
        val_wsize=config["val_wsize"], build_unused_aspp=config["build_unused_aspp"],
    )
    model = model.to(device)
    if config.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if config.get("compile"):
        model.encoder = torch.compile(model.encoder)
    return model


# ---------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    """torchrun environment: rank, local rank and world size (1 process when not under torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    def wrap(self, model: torch.nn.Module, config: dict[str, Any]) -> torch.nn.Module:
        """DistributedDataParallel around ``model`` when world size > 1 (optional SyncBatchNorm)."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if config.get("sync_bn"):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

    def cleanup(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup_distributed() -> DistContext:
    """Initialise the process group when launched by torchrun (env RANK/WORLD_SIZE), NCCL on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world)
