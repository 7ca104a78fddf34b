"""Shared fixtures: tiny models and data for fast property tests, the real digits example for e2e."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dg2pf_core.loaders import LocalLoaders


class TinyNet(nn.Module):
    """Conv + BN + Linear: exercises every kind of tensor the loop handles, in milliseconds."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_data(n: int = 96, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    # Class-dependent means make the task learnable, so validation top-1 actually moves.
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / classes
    return TensorDataset(x, y)


@pytest.fixture
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_loaders() -> LocalLoaders:
    return LocalLoaders(tiny_data(96, seed=0), tiny_data(32, seed=1), tiny_data(32, seed=2), batch_size=16, eval_batch_size=64, seed=0)


@pytest.fixture(scope="session")
def digits_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pre-trained digits example (trained once per test session, ~1 min on 2 cores)."""
    from dg2pf_core.example import write_example

    out = tmp_path_factory.mktemp("example") / "digits"
    write_example("digits", out)
    return out
