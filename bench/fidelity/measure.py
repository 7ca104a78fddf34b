"""What a pruned model is scored on, computed the same way whichever method produced it.

Sparsity is read off the weights themselves (exactly-zero entries of every Conv2d/Linear weight),
not off a method's own mask bookkeeping, so methods with different mask representations (dg2pf_core
masks, torch.nn.utils.prune's reparametrisation, INC) are compared on one ruler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from dg2pf_core.io.metrics import evaluate

from .data import JobSplit, Split

MEASURED_MODULES = (nn.Conv2d, nn.Linear)
EMPTY = 1.0  # a layer counts as emptied when every weight is zero


@dataclass
class Measured:
    test_top1: float
    val_top1: float
    sparsity: float
    layer_sparsity: dict[str, float]

    def summary(self) -> dict:
        worst = max(self.layer_sparsity, key=self.layer_sparsity.get) if self.layer_sparsity else None
        return {
            "test_top1": self.test_top1,
            "val_top1": self.val_top1,
            "sparsity": self.sparsity,
            "max_layer_sparsity": self.layer_sparsity.get(worst) if worst else None,
            "max_layer": worst,
            "layers_emptied": sum(1 for v in self.layer_sparsity.values() if v >= EMPTY),
            "layer_sparsity": self.layer_sparsity,
        }


def zero_fractions(model: nn.Module) -> tuple[float, dict[str, float]]:
    """(zero fraction over all Conv2d/Linear weights, per-layer zero fraction)."""
    zeros = total = 0
    per_layer: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, MEASURED_MODULES):
            w = module.weight.detach()
            z = int((w == 0).sum())
            per_layer[f"{name}.weight"] = z / w.numel()
            zeros, total = zeros + z, total + w.numel()
    return zeros / total, per_layer


def from_layer_sparsity(test_top1: float, val_top1: float, sparsity: float, layers: Mapping[str, float]) -> Measured:
    return Measured(float(test_top1), float(val_top1), float(sparsity), {k: float(v) for k, v in layers.items()})


@torch.no_grad()
def measure(model: nn.Module, split: Split | JobSplit) -> Measured:
    device = torch.device("cpu")
    model = model.to(device).eval()
    val_set, test_set = split.eval_sets()
    val, test = DataLoader(val_set, batch_size=256), DataLoader(test_set, batch_size=256)
    sparsity, layers = zero_fractions(model)
    return Measured(evaluate(model, test, device).top1, evaluate(model, val, device).top1, sparsity, layers)
