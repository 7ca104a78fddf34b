"""Tiny models and data for fast property tests (imported by tests as ``from tiny import ...``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


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
