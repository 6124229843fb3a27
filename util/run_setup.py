"""Setup shared by training.py and validation.py: device, run folder, fold, data checks, model, DDP.

Each function reads the resolved Sacred config (a dict) and raises a short error naming the key, file or scan.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

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
    from data_preprocessing.class_slice_index import slice_class_counts
    from dataloaders.derived import check_classmap_matches, classmap_command, pseudolabel_command
    from dataloaders.leakage import check_setting2_config

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
        counts[sid] = slice_class_counts(scan.label, n_classes)
    check_classmap_matches(cmap, counts, data_dir, info, min_fg)
    return counts


def build_training_dataset(config: dict[str, Any], info: DatasetInfo, fold: Fold):
    """The episode dataset over the fold's training scans: 2D superpixels (SPEC 5) or, with ``superpix_dim=3``,
    3D supervoxels (:mod:`dataloaders.supervoxel_dataset`)."""
    import dataclasses

    from dataloaders.augmentations import PRESETS
    from dataloaders.superpixel_dataset import SuperpixelEpisodeDataset

    name = "identity" if config["which_aug"] == "none" else config["which_aug"]
    if name not in PRESETS:
        raise ConfigError(f"which_aug={config['which_aug']!r}: choose one of {sorted(PRESETS)} or 'none'")
    aug = dataclasses.replace(PRESETS[name], border_fill=config["border_fill"], parity=bool(config.get("aug_parity")))
    size = tuple(config["input_size"])
    if len(size) != 2 or size[0] != size[1]:
        raise ConfigError(f"input_size={list(size)}: only square inputs are supported")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.get("superpix_dim", 2) == 3:  # support and query: neighbouring slices of one 3D supervoxel
        from dataloaders.supervoxel_dataset import SupervoxelEpisodeDataset

        return SupervoxelEpisodeDataset(
            data_dir=config["data_dir"], info=info, scan_ids=list(fold.train),
            exclude_classes=list(config["exclude_cls_list"]), exclusion_rule=config["exclusion_rule"],
            superpix_scale=config["superpix_scale"], min_fg=config["min_fg_data"],
            n_episodes=config["n_steps"] * config["batch_size"] * world, seed=config["seed"], aug=aug,
            n_shots=1, n_queries=config["n_queries"], input_size=int(size[0]),
        )
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
        multishot_proto=config.get("multishot_proto", "per_shot"),
    )
    model = model.to(device)
    if config.get("channels_last"):
        # FewShotSeg.encode converts its 4D encoder batch to this layout when the weights are channels_last
        model = model.to(memory_format=torch.channels_last)
    if config.get("compile"):
        # in place: state-dict keys stay "encoder.*" (torch.compile(m) adds "_orig_mod."). Static shapes: a training
        # run feeds the encoder one (B * (S + Q), 3, H, W) batch every step, so one graph serves the whole run.
        model.encoder.compile(dynamic=False)
    return model


# ---------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    """torchrun environment: rank, local rank and world size (1 process when not under torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    def wrap(self, model: torch.nn.Module, config: dict[str, Any]) -> torch.nn.Module:
        """DistributedDataParallel around ``model`` when world size > 1 (optional SyncBatchNorm).

        DDP broadcasts rank 0's parameters and buffers when it wraps the model, so every rank starts from the same
        weights whatever its own initialisation; gradients are averaged over ranks at every step.

        Raises:
            ConfigError: ``episode_sampling="legacy"`` (a single-process parity mode: the original trained on
                one GPU); ``sync_bn=True`` on CPU (PyTorch's SyncBatchNorm needs GPUs).
        """
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if config.get("episode_sampling") == "legacy":
            raise ConfigError("episode_sampling='legacy' (single-process parity mode) cannot run under torchrun; "
                              "use the default 'compact' sampling for multi-GPU training")
        on_gpu = next(model.parameters()).is_cuda
        if config.get("sync_bn"):
            if not on_gpu:
                raise ConfigError("sync_bn=True needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
                                  "drop sync_bn for CPU (gloo) runs")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [self.local_rank] if on_gpu else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

    def cleanup(self) -> None:
        """Destroy the process group (a no-op in one process)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself in one process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def consistency_report(self, model: torch.nn.Module, episodes: list[int]) -> dict[str, Any]:
        """Check across ranks that the weights are identical and that the ranks drew different episodes.

        Collective: every rank must call it at the same step. Rank 0 stores the result in its checkpoint.

        Args:
            model: the unwrapped model.
            episodes: the global episode indices this rank has trained on since the run (or resume) started.

        Returns:
            ``world_size``; ``in_sync`` (every rank's per-tensor checksums equal rank 0's); ``mismatched`` (names of
            differing tensors, at most 10); ``checksums`` (per rank, the sums over tensors of the two checksums of
            :func:`state_checksums`); ``episodes_per_rank``; ``episodes_first`` (per rank, its first 8 indices);
            ``episodes_shared`` (indices drawn by more than one rank; 0 expected).
        """
        names, sums = state_checksums(model)
        device = next(model.parameters()).device
        local = sums.to(device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, local)
        all_sums = [g.cpu() for g in gathered]
        seen: list[list[int] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(seen, [int(i) for i in episodes])
        differs = torch.zeros(len(names), dtype=torch.bool)
        for other in all_sums[1:]:
            differs |= (other != all_sums[0]).any(dim=1)
        counts: dict[int, int] = {}
        for rank_eps in seen:
            for i in set(rank_eps):
                counts[i] = counts.get(i, 0) + 1
        report = {
            "world_size": self.world_size,
            "in_sync": not bool(differs.any()),
            "mismatched": [names[i] for i in differs.nonzero().flatten()[:10].tolist()],
            "checksums": [[float(v) for v in s.sum(dim=0)] for s in all_sums],
            "episodes_per_rank": [len(e) for e in seen],
            "episodes_first": [list(e[:8]) for e in seen],
            "episodes_shared": sum(1 for c in counts.values() if c > 1),
        }
        if not report["in_sync"]:
            logging.getLogger(__name__).error("DDP ranks hold different weights (%s): the run is not data-parallel "
                                              "any more", report["mismatched"])
        return report


def state_checksums(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """Per-tensor checksums of a model's state dict, to compare weights across processes cheaply.

    Returns:
        The tensor names (sorted) and a (T, 2) float64 CPU tensor: per tensor, the sum of its values and the sum
        weighted by position (i + 1) / n, which also changes when values are permuted. Bitwise equal tensors give
        bitwise equal checksums.
    """
    state = model.state_dict()
    names = sorted(state)
    rows = []
    for name in names:
        x = state[name].detach().flatten().double()
        weights = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device) / max(x.numel(), 1)
        rows.append(torch.stack([x.sum(), (x * weights).sum()]).cpu())
    return names, torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (an all-reduce under torchrun; ``flag`` itself in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    if torch.distributed.get_world_size() == 1:
        return flag
    bad = torch.tensor([0.0 if flag else 1.0], device=device)
    torch.distributed.all_reduce(bad)
    return float(bad.item()) == 0.0


def setup_distributed() -> DistContext:
    """Initialise the process group when launched by torchrun (env RANK/WORLD_SIZE).

    Backends: gloo without CUDA; with CUDA, NCCL for CUDA tensors and gloo for CPU tensors (so ``device=cpu`` runs
    on a GPU machine work too).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world)
