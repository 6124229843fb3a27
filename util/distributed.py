"""torchrun helpers: the process group, DDP wrapping, and cross-rank checks of the weights (standard library and
torch only).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from util.errors import ConfigError


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
