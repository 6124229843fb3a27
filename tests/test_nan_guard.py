"""Non-finite loss guard: a NaN/Inf step changes nothing, is logged with its episode, and too many in a row stop the
run with a clear message (exit code 2 on the command line)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.train_step import train_step
from tests.reliability_fixtures import TINY32, cli, files_under
from util.checkpoint import load_checkpoint
from util.cli import EXIT_USER_ERROR


class TinySegmenter(nn.Module):
    """A stand-in for FewShotSeg with a BatchNorm layer (its running statistics change in every forward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, supp, fg, bg, qry, compute_align: bool = True) -> SimpleNamespace:
        logits = self.bn(self.conv(qry.flatten(0, 1)))  # (B*Q, 2, H, W)
        return SimpleNamespace(logits=logits, align_loss=logits.mean() * 0)


def _batch(nan: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    qry = torch.rand(1, 1, 3, 8, 8, generator=g)
    if nan:
        qry[0, 0, 0, 2, 3] = math.nan
    return {"support_images": torch.rand(1, 1, 3, 8, 8, generator=g), "support_fg": torch.ones(1, 1, 8, 8),
            "support_bg": torch.zeros(1, 1, 8, 8), "query_images": qry,
            "query_labels": (torch.rand(1, 1, 8, 8, generator=g) > 0.5).long()}


def test_non_finite_step_leaves_weights_statistics_and_momentum_alone() -> None:
    torch.manual_seed(0)
    model = TinySegmenter()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = (opt, None, torch.device("cpu"), "off", True, True, 255)
    good = train_step(model, _batch(nan=False), *args)
    assert math.isfinite(good["loss"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    bad = train_step(model, _batch(nan=True), *args)
    assert math.isnan(bad["loss"])
    for k, v in model.state_dict().items():  # weights, BN running mean/var and its batch counter
        assert torch.equal(v, state[k]), k
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    # the next finite step goes on from the untouched state
    again = train_step(model, _batch(nan=False), *args)
    assert math.isfinite(again["loss"]) and all(torch.isfinite(v).all() for v in model.state_dict().values())



def test_diverging_run_stops_with_a_clear_message(tiny_phantom: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING)
    # lr 1e8 blows the weights up within a few steps: every loss after that is NaN
    code = cli("training.py", [*TINY32, f"data_dir={tiny_phantom}", f"run_dir={run_dir}", "n_steps=12",
                               "lr_milestones=[100]", "save_snapshot_every=2", "optim.lr=1e8",
                               "max_nonfinite_steps=3"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"error: 3 consecutive steps with a non-finite loss \(last at step (\d+)\); lower optim\.lr, "
                         r"check the data, or try amp='off'", last)
    assert match, last
    stop = int(match.group(1))
    skipped = re.findall(r"step (\d+): non-finite loss (?:nan|inf), update skipped \(episodes: scan \[(\d)\], "
                         r"slice \[(\d+)\], superpixel \[(\d+)\]\)", caplog.text)
    assert [int(s[0]) for s in skipped] == [stop - 2, stop - 1, stop]  # each skipped step names its episode
    assert all(s[1] in "015" for s in skipped)  # a training scan of fold 2
    # snapshots before the failure are complete and finite; nothing after it was written
    snaps = sorted(int(p.stem) for p in (run_dir / "snapshots").glob("*.pth"))
    assert snaps and max(snaps) < stop and files_under(run_dir) == sorted(
        ["train_log.json", *[f"snapshots/{s}.pth" for s in snaps]])
    assert load_checkpoint(run_dir / "snapshots" / f"{max(snaps)}.pth")["step"] == max(snaps)
