"""Learning-rate schedules (engine/lr_schedule.py) and the query CE background weight (``wce_bg_weight``)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.lr_schedule import build_scheduler
from engine.resume import RESUME_MUST_MATCH
from engine.train_step import train_step
from tests.reliability_fixtures import TINY32, cli, script
from util.checkpoint import load_checkpoint
from util.cli import EXIT_USER_ERROR


def _lrs(schedule: str, n_steps: int, milestones: list[int], gamma: float, base: float = 0.1) -> list[float]:
    """The lr each of the ``n_steps`` optimiser steps uses under the real torch scheduler."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(opt, schedule, n_steps, milestones, gamma)
    out = []
    for _ in range(n_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_hand_values() -> None:
    lrs = _lrs("cosine", 8, [], 0.1)
    # t = 0, 2, 4, 6 scheduler steps: (1 + cos(pi t / 8)) / 2 = 1, (1 + 1/sqrt 2) / 2, 1/2, (1 - 1/sqrt 2) / 2
    expected = [1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2]
    assert lrs[0::2] == pytest.approx([0.1 * e for e in expected], rel=1e-6)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing, never reaching 0 within the run


def test_poly_hand_values() -> None:
    lrs = _lrs("poly", 4, [], 0.1)
    assert lrs == pytest.approx([0.1, 0.1 * 0.75 ** 0.9, 0.1 * 0.5 ** 0.9, 0.1 * 0.25 ** 0.9], rel=1e-6)


def test_step_is_the_papers_multistep() -> None:
    lrs = _lrs("step", 6, [2, 4], 0.5)
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_scheduler_state_resumes_exactly() -> None:
    """A cosine run stopped at step 7 and resumed from the state dicts continues with the same lrs."""
    full = _lrs("cosine", 20, [], 0.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, "cosine", 20, [], 0.1)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    sched2 = build_scheduler(opt2, "cosine", 20, [], 0.1)
    sched2.load_state_dict(sched.state_dict())
    rest = []
    for _ in range(13):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx(full[7:], rel=1e-9)


def test_bad_schedule_is_refused() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        build_scheduler(opt, "linear", 10, [], 0.1)
    with pytest.raises(ValueError, match="n_steps >= 1"):
        build_scheduler(opt, "cosine", 0, [], 0.1)
    assert {"lr_schedule", "wce_bg_weight"} <= set(RESUME_MUST_MATCH)


class _FixedLogits(nn.Module):
    """Returns fixed logits (one parameter so that the optimiser has something to step)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, supp, fg, bg, qry, compute_align: bool = True) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits, align_loss=torch.zeros(()))


def test_bg_weight_enters_the_query_loss() -> None:
    # 2 pixels: one BG pixel with p(BG) = 1/2, one FG pixel with p(FG) = 1/(1 + e): loss_bg = ln 2, loss_fg = ln(1 + e)
    logits = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): pixel 0 [0, 0], pixel 1 [1, 0]
    labels = torch.tensor([[[[0, 1]]]])  # (B=1, Q=1, 1, 2)
    batch = {"support_images": torch.zeros(1, 1, 3, 1, 2), "support_fg": torch.ones(1, 1, 1, 2),
             "support_bg": torch.zeros(1, 1, 1, 2), "query_images": torch.zeros(1, 1, 3, 1, 2),
             "query_labels": labels}
    l_bg, l_fg = math.log(2.0), math.log(1.0 + math.e)
    for use_wce, w, expected in [(True, 0.05, (0.05 * l_bg + l_fg) / 1.05), (True, 0.3, (0.3 * l_bg + l_fg) / 1.3),
                                 (False, 0.3, (l_bg + l_fg) / 2)]:
        model = _FixedLogits(logits)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        terms = train_step(model, batch, opt, None, torch.device("cpu"), "off", use_wce, False, 255, bg_weight=w)
        assert float(terms["query_loss"]) == pytest.approx(expected, rel=1e-6)
    # the default is the paper's 0.05
    model = _FixedLogits(logits)
    terms = train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), None, torch.device("cpu"), "off",
                       True, False, 255)
    assert float(terms["query_loss"]) == pytest.approx((0.05 * l_bg + l_fg) / 1.05, rel=1e-6)


def test_training_with_cosine_schedule(tiny_phantom: Path, tmp_path: Path) -> None:
    """A 4-step run with ``lr_schedule=cosine``: every step's lr (TensorBoard) and the checkpointed scheduler."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    no_milestones = [u for u in TINY32 if not u.startswith("lr_milestones=")]  # refused under cosine (test below)
    assert cli("training.py", [*no_milestones, f"data_dir={tiny_phantom}", f"run_dir={run_dir}", "lr_schedule=cosine",
                               "tensorboard=True"]) == 0
    ckpt = load_checkpoint(run_dir / "snapshots" / "4.pth")
    lr = ckpt["config"]["optim"]["lr"]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    c = math.cos(math.pi / 4)
    # steps 1..4 after 0..3 scheduler steps of T_max = 4
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([lr, lr * (1 + c) / 2, lr / 2, lr * (1 - c) / 2],
                                                                      rel=1e-6)
    assert ckpt["scheduler"]["T_max"] == 4 and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)


def test_unknown_schedule_and_milestones_under_cosine_are_refused_before_any_work(tmp_path: Path) -> None:
    """The real script: one ``error:`` line, exit 2, before the data are read (the data folder does not exist)."""
    run_dir = tmp_path / "run"
    common = ["training.py", "with", "demo", f"data_dir={tmp_path / 'no_data'}", f"run_dir={run_dir}",
              "use_file_observer=False"]
    proc = script([*common, "lr_schedule=linear"])
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: lr_schedule='linear': choose one of ['step', 'cosine', 'poly']"
    assert "Traceback" not in proc.stderr  # (the lines before are Sacred's log: no observer, command started)
    proc = script([*common, "lr_milestones=[230]"])  # the demo's cosine schedule has no milestones
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: lr_milestones=[230] cannot act with lr_schedule='cosine': cosine and poly decay smoothly over n_steps, "
        "without milestones (drop the ignored key, or change the key that blocks it)")
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()
