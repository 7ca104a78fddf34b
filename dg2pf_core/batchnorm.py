"""BatchNorm recalibration: running statistics re-estimated for the network as it is now pruned.

A mask change shifts every later layer's activation statistics, while BatchNorm's running mean and
variance still describe the network before it; evaluation (and the next epoch's first steps) then
normalise with stale numbers. Recalibration resets them and takes the plain average over a few
training batches, without touching any weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def has_batchnorm(model: nn.Module) -> bool:
    return bool(_tracking_norms(model))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, device: torch.device, limit: int) -> int:
    """Re-estimate every BatchNorm's running statistics over up to ``limit`` batches of ``batches``
    (``(inputs, targets)`` pairs); returns the number of batches used. Weights are not changed."""
    norms = _tracking_norms(model)
    if not norms or limit <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    used = 0
    try:
        for inputs, _targets in batches:
            model(inputs.to(device, non_blocking=True))
            used += 1
            if used >= limit:
                break
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer of ``model`` in eval mode (call after ``model.train()``): it then
    normalises by its running statistics and leaves them unchanged, while its affine weights still
    train."""
    for m in _tracking_norms(model):
        m.eval()


def _tracking_norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
