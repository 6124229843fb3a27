"""training.build_optimizer: the config keys optim_type / optim give the optimiser they name."""

from __future__ import annotations

import pytest
import torch

from engine.builders import build_optimizer
from util.errors import ConfigError

OPTIM = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}


def test_sgd_is_the_papers_optimiser_with_the_config_values() -> None:
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model, "sgd", OPTIM)
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 0.01)


def test_adamw_first_step_by_hand() -> None:
    """AdamW's first step: p <- p (1 - lr wd) - lr g / (|g| + eps), i.e. about lr against the gradient's sign."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    model = torch.nn.Module()
    model.p = p
    opt = build_optimizer(model, "adamw", OPTIM)
    assert type(opt) is torch.optim.AdamW
    p.grad = torch.tensor([0.5, -3.0])
    opt.step()
    expected = torch.tensor([1.0, -2.0]) * (1 - 0.1 * 0.01) - 0.1 * torch.tensor([1.0, -1.0])
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_unknown_optimiser_names_the_key() -> None:
    with pytest.raises(ConfigError, match="optim_type='adam'.*sgd.*adamw"):
        build_optimizer(torch.nn.Linear(2, 1), "adam", OPTIM)
