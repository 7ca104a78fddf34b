"""Tiny models, data and result documents for fast property tests (imported by tests as ``from tiny import ...``)."""

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


def metrics_document(**fields) -> dict:
    """A whole metrics.json of an unstructured run (with ``fields`` set over it), as this version writes it."""
    record = {
        "phase": "baseline",
        "epoch": 0,
        "sparsity": 0.0,
        "train_loss": None,
        "val_top1": 40.0,
        "val_top5": 80.0,
        "lr": None,
        "seconds": 0.5,
        "is_best": False,
        "restarts": 0,
        "recovered": None,
        "rankings": None,
        "recovered_per_ranking": None,
    }
    document = {
        "arch": "digits_cnn",
        "num_classes": 10,
        "dataset": "digits",
        "image_size": 16,
        "in_channels": 1,
        "class_names": [str(i) for i in range(10)],
        "target_sparsity": 0.5,
        "granularity": "unstructured",
        "sparsity_prunable": 0.5,
        "sparsity_total": 0.45,
        "params_total": 1000,
        "params_nonzero": 550,
        "params_prunable": 900,
        "macs_dense": 20_000,
        "macs_sparse": 10_000,
        "baseline_val_top1": 40.0,
        "baseline_test_top1": 39.0,
        "val_top1": 60.0,
        "test_top1": 58.5,
        "test_top5": 90.0,
        "best_epoch": 1,
        "epochs": 1,
        "final_phase": "gradual_pruning",
        "world_size": 1,
        "wall_seconds": 3.5,
        "layer_sparsity": {"conv.weight": 0.4, "fc.weight": 0.6},
        "max_layer_sparsity": 0.6,
        "layer_cap": 1.0,
        "warnings": [],
        "config": {"sparsity": 0.5, "pruning_epochs": 1},
        "history": [
            record,
            {
                **record,
                "phase": "gradual_pruning",
                "epoch": 1,
                "sparsity": 0.5,
                "train_loss": 1.5,
                "val_top1": 60.0,
                "lr": 0.001,
                "is_best": True,
                "recovered": 3,
                "rankings": 1,
                "recovered_per_ranking": [3],
            },
        ],
    }
    return {**document, **fields}
