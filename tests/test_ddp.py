"""DDP through torchrun on CPU (gloo, 2 processes): both ranks end with identical weights and drew different episodes.

The run is a real ``python -m torch.distributed.run --standalone --nproc_per_node=2 training.py with demo ...`` on a
tiny phantom. Each snapshot stores rank 0's cross-rank check (``ckpt["ddp"]``, written by
``engine.run_setup.DistContext.consistency_report``): per-rank weight checksums and the episode indices each rank
trained on. The test also recomputes the checksum of the saved weights, so the comparison is about these weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.builders import EpisodeIndexSampler
from models.grid_proto_fewshot import FewShotSeg
from util.checkpoint import load_checkpoint
from util.distributed import state_checksums

REPO = Path(__file__).resolve().parent.parent
TINY = ["modelname=lite_gn", "lr_schedule=step",
        "input_size=[64,64]", "feature_hw=[8,8]", "proto_grid_size=2", "num_workers=0", "eval_fold=2", "n_steps=4",
        "lr_milestones=[2]", "save_snapshot_every=2", "print_interval=2", "use_file_observer=False"]



def test_sampler_gives_ranks_disjoint_episodes() -> None:
    per_rank = [list(EpisodeIndexSampler(1, 4, batch_size=2, rank=r, world=3)) for r in range(3)]
    assert per_rank[0] == [6, 7, 12, 13, 18, 19]  # step s, rank r: (s * world + r) * B + j
    assert per_rank[2] == [10, 11, 16, 17, 22, 23]
    flat = sorted(i for eps in per_rank for i in eps)
    assert flat == list(range(6, 24))  # steps 1..3 of all ranks: every episode once


def test_torchrun_two_ranks_identical_weights(tiny_phantom: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "training.py",
           "with", "demo", *TINY, f"data_dir={tiny_phantom}", f"run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "snapshots").glob("*.pth")) == ["2.pth", "4.pth"]

    ckpt = load_checkpoint(run_dir / "snapshots" / "4.pth")
    report = ckpt["ddp"]
    assert report["world_size"] == 2 and report["in_sync"] and report["mismatched"] == []
    assert report["checksums"][0] == report["checksums"][1]
    # the checksum is that of the saved (unwrapped) weights: keys without "module."
    assert not any(k.startswith("module.") for k in ckpt["model"])
    model = FewShotSeg(backbone="lite_gn", init="none", proto_grid_size=2, feature_hw=(8, 8))
    model.load_state_dict(ckpt["model"])
    _, sums = state_checksums(model)
    assert sums.sum(dim=0).tolist() == pytest.approx(report["checksums"][0], rel=1e-12)
    # 4 steps x batch 1 per rank; rank r trained on episodes 2s + r
    assert report["episodes_per_rank"] == [4, 4] and report["episodes_shared"] == 0
    assert report["episodes_first"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # training moved the weights between the two snapshots, and the ranks were in sync at step 2 as well
    early = load_checkpoint(run_dir / "snapshots" / "2.pth")
    assert early["ddp"]["in_sync"] and early["ddp"]["episodes_first"] == [[0, 2], [1, 3]]
    assert not torch.equal(early["model"]["encoder.localconv.weight"], ckpt["model"]["encoder.localconv.weight"])
    # rank 0 alone logged: one training log with the 4 steps
    assert len(ckpt["train_log"]["loss"]) == 4
