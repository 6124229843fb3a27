"""Legacy sampling (``episode_sampling=legacy``, docs/method.md#q2-superpixel-numbering): an empty-foreground episode
gets a normal optimiser step, as in the original (all-zero FG prototype, S_fg = 0 everywhere, a small finite loss),
instead of being skipped."""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_preprocessing.pseudolabel import generate_pseudolabels
from dataloaders.dataset_info import get_dataset_info
from dataloaders.niftiio import list_scan_ids
from dataloaders.superpixel_dataset import SuperpixelEpisodeDataset
from engine.train_step import train_step
from models.alpmodule import EmptyMaskError
from models.grid_proto_fewshot import FewShotSeg
from tests.reliability_fixtures import TINY32, cli, copy_data
from util.checkpoint import load_checkpoint

LR, MOMENTUM, WD = 0.01, 0.9, 5e-4


def _empty_fg_batch(size: int = 32) -> dict[str, torch.Tensor]:
    """One 1-shot episode whose support (and therefore query) foreground is empty, as a legacy empty id gives."""
    g = torch.Generator().manual_seed(0)
    fg = torch.zeros(1, 1, size, size)
    return {"support_images": torch.rand(1, 1, 3, size, size, generator=g), "support_fg": fg,
            "support_bg": 1.0 - fg, "query_images": torch.rand(1, 1, 3, size, size, generator=g),
            "query_labels": torch.zeros(1, 1, size, size, dtype=torch.long)}


def _model() -> FewShotSeg:
    torch.manual_seed(0)
    return FewShotSeg("lite_gn", init="none", feature_hw=(4, 4), proto_grid_size=2, val_wsize=2).train()


def test_empty_support_raises_unless_legacy() -> None:
    model = _model()
    batch = _empty_fg_batch()
    with pytest.raises(EmptyMaskError, match="support foreground mask is empty"):
        model(batch["support_images"], batch["support_fg"], batch["support_bg"], batch["query_images"])


def test_empty_foreground_episode_takes_a_normal_sgd_step() -> None:
    model = _model()
    model.allow_empty_support = True
    batch = _empty_fg_batch()

    # Reference on a copy: S_fg is exactly 0 (the zero FG prototype has cosine 0 with every feature), so with an
    # all-background query label the weighted CE is the plain mean of -log softmax([S_bg, 0])[0] = softplus(-S_bg).
    ref = copy.deepcopy(model)
    out = ref(batch["support_images"], batch["support_fg"], batch["support_bg"], batch["query_images"])
    assert torch.count_nonzero(out.logits[:, 1]) == 0
    expected_q = F.softplus(-out.logits[:, 0]).mean().detach()
    loss_ref = F.cross_entropy(out.logits, batch["query_labels"].flatten(0, 1),
                               weight=torch.tensor([0.05, 1.0])) + out.align_loss
    loss_ref.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    terms = train_step(model, batch, opt, None, torch.device("cpu"), "off", use_wce=True, usealign=True,
                       ignore_label=255)
    loss = float(terms["loss"])
    assert torch.isfinite(torch.tensor(loss)) and 0 < loss < 1.0  # small: S_bg > 0 dominates everywhere
    # float32 logits near S_bg ~ 15-20: the CE of train_step carries ~1e-7 absolute rounding
    assert float(terms["query_loss"]) == pytest.approx(float(expected_q), abs=2e-7)
    assert 0 < float(expected_q) < 1e-3
    # First SGD step with momentum: the buffer is the gradient itself, so w' = w - lr * (g + wd * w).
    assert grads, "no gradient reached the encoder"
    for name, p in model.named_parameters():
        g = grads.get(name, torch.zeros_like(p))
        torch.testing.assert_close(p.detach(), before[name] - LR * (g + WD * before[name]), rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_legacy_run_trains_on_its_empty_foreground_episode(tiny_phantom: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    data = copy_data(tiny_phantom, tmp_path / "data")
    generate_pseudolabels(data, get_dataset_info("PHANTOM"), legacy=True, progress=False)  # the original's ids
    updates = [*TINY32, f"data_dir={data}", "episode_sampling=legacy", "n_steps=40", "lr_milestones=[1000]"]
    info = get_dataset_info("PHANTOM")
    fold = info.fold(2, available=list_scan_ids(data))  # TINY32: eval_fold=2
    # the run's episode i is drawn from (seed 1234, i); the draw of slice and id precedes any augmentation
    dataset = SuperpixelEpisodeDataset(data, info, fold.train, seed=1234, episode_sampling="legacy", input_size=32,
                                       n_episodes=40, progress=False)
    empty = [i for i in range(40) if dataset.get_meta(i).fg_pixels == 0]
    assert empty, "the legacy ids of the tiny phantom give no empty-foreground episode in 40 draws"
    n_steps = empty[0] + 1  # the run ends on its first empty-foreground episode
    updates[updates.index("n_steps=40")] = f"n_steps={n_steps}"
    updates += [f"save_snapshot_every={n_steps}", f"run_dir={tmp_path / 'run'}"]
    with caplog.at_level(logging.INFO):
        assert cli("training.py", updates) == 0
    assert re.search(rf"step {n_steps}: empty-foreground episode \(legacy sampling.*trained on", caplog.text)
    ckpt = load_checkpoint(tmp_path / "run" / "snapshots" / f"{n_steps}.pth")
    assert ckpt["scheduler"]["last_epoch"] == n_steps  # the scheduler stepped on it too
    assert len(ckpt["train_log"]["loss"]) == n_steps  # a finite loss was recorded for every step
    assert all(math.isfinite(v) for v in ckpt["train_log"]["loss"])  # no skipped (NaN) step
