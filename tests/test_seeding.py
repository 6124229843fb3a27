"""Seeding helpers: reproducible global RNGs, checkpointable RNG state, worker seeds, deterministic mode."""

import io
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from util import seeding


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_reproduces_all_generators() -> None:
    seeding.seed_everything(123)
    a = _draws()
    seeding.seed_everything(123)
    assert _draws() == a
    seeding.seed_everything(124)
    b = _draws()
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_rng_state_roundtrip_through_torch_save() -> None:
    seeding.seed_everything(7)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    state = seeding.rng_state()
    expected = _draws()
    buf = io.BytesIO()
    torch.save({"rng": state}, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)["rng"]  # checkpoint-safe: no NumPy objects inside
    _draws()  # move every generator on
    seeding.set_rng_state(restored)
    assert _draws() == expected
    with pytest.raises(KeyError, match="numpy"):
        seeding.set_rng_state({"python": state["python"], "torch": state["torch"]})


def test_make_generator() -> None:
    a = torch.randperm(10, generator=seeding.make_generator(3))
    b = torch.randperm(10, generator=seeding.make_generator(3))
    c = torch.randperm(10, generator=seeding.make_generator(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


class _NumpyDraw(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[int, float]:
        info = torch.utils.data.get_worker_info()
        return info.id, float(np.random.rand())


def _worker_draws(seed: int) -> dict[int, list[float]]:
    loader = DataLoader(_NumpyDraw(), batch_size=None, num_workers=2, worker_init_fn=seeding.worker_init_fn,
                        generator=seeding.make_generator(seed))
    out: dict[int, list[float]] = {}
    for wid, val in loader:
        out.setdefault(int(wid), []).append(val)
    return out


def test_worker_init_fn_gives_distinct_reproducible_worker_streams() -> None:
    first, again, other = _worker_draws(11), _worker_draws(11), _worker_draws(12)
    assert first == again
    assert first[0] != first[1]  # the two workers do not share NumPy's state (docs/method.md#q5-unseeded-numpy)
    assert first != other


def test_set_deterministic_toggles_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    try:
        seeding.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        seeding.set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
