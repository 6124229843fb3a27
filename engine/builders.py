"""What a run builds from its config: the episode dataset of the fold's training scans, the model, the optimiser and
the DataLoader.

Each function reads the resolved Sacred config (a dict) and raises :class:`util.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from dataloaders.dataset_info import DatasetInfo, Fold
from engine import preemption
from util.distributed import DistContext
from util.errors import ConfigError
from util.seeding import worker_init_fn


def build_training_dataset(config: dict[str, Any], info: DatasetInfo, fold: Fold):
    """The episode dataset over the fold's training scans: 2D superpixels (docs/method.md#episodes) or, with
    ``superpix_dim=3``, 3D supervoxels (:mod:`dataloaders.supervoxel_dataset`)."""
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
    model = FewShotSeg.from_config(config, init=init, weights_path=weights_path)
    model = model.to(device)
    if config.get("channels_last"):
        # FewShotSeg.encode converts its 4D encoder batch to this layout when the weights are channels_last
        model = model.to(memory_format=torch.channels_last)
    if config.get("compile"):
        # in place: state-dict keys stay "encoder.*" (torch.compile(m) adds "_orig_mod."). Static shapes: a training
        # run feeds the encoder one (B * (S + Q), 3, H, W) batch every step, so one graph serves the whole run.
        model.encoder.compile(dynamic=False)
    return model


OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: torch.nn.Module, optim_type: str, optim: dict) -> torch.optim.Optimizer:
    """The run's optimiser from the config keys ``optim_type`` and ``optim``.

    * ``sgd`` (the paper's, docs/method.md#training-schedule): SGD with ``optim.lr``, ``optim.momentum`` and
      ``optim.weight_decay``.
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


def build_loader(dataset: torch.utils.data.Dataset, config: dict[str, Any], start_step: int, dist: DistContext,
                 device: torch.device) -> DataLoader:
    """The run's DataLoader: steps ``start_step .. n_steps - 1`` of this rank (:class:`EpisodeIndexSampler`); the
    workers ignore SIGTERM/SIGUSR1 (the main process snapshots, :mod:`engine.preemption`)."""
    workers = config["num_workers"]
    sampler = EpisodeIndexSampler(start_step, config["n_steps"], config["batch_size"], dist.rank, dist.world_size)
    return DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler, num_workers=workers,
                      worker_init_fn=preemption.worker_init(worker_init_fn),
                      pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
