"""BatchNorm recalibration: running statistics re-estimated for the network as it is now pruned.

A mask change shifts every later layer's activation statistics, while BatchNorm's running mean and
variance still describe the network before it; evaluation (and the next epoch's first steps) then
normalise with stale numbers. Recalibration resets them and takes the plain average over a few
training batches, without touching any weight.

Constant channels. Pruning leaves channels whose input is the same for every image of a batch: a
channel whose remaining weights read only input-independent values (padding, emptied channels, the
border of a 2x2 map), most often where the feature maps are 1x1 (shufflenet_v2_x0_5's stage 4 on 28 px
Fashion-MNIST: 2,144 such channels in a 98%-sparse network). Train-mode BatchNorm maps such a channel to
exactly its bias (its input minus the batch mean is 0), whatever the batch. Its value still moves from
batch to batch with the statistics upstream, so the running variance is ~0 while the running mean is
only the average of those values: eval-mode BatchNorm then outputs bias + gamma (x - mean) / sqrt(eps),
an offset the training never saw, amplified 316-fold, and a network scoring 68% with batch statistics
read 9.57% (the prediction of one class; docs/fidelity.md). ``settle_constant_channels`` makes eval mode
do what train mode does: such a channel's gamma is set to 0, so it outputs its bias in both modes (train
mode's output for it does not depend on gamma). Validation settles them for its own evaluation only
(``settled``), so training never sees the change; the written result has them settled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# A channel is constant when its average within-batch variance (the running variance a re-estimate gives)
# is at most this fraction of BatchNorm's eps: its train-mode output is then within 1% of gamma of its bias.
CONSTANT_VARIANCE = 1e-4


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


def constant_channels(model: nn.Module) -> dict[_BatchNorm, torch.Tensor]:
    """The channels, per affine BatchNorm layer, whose running variance says their input is constant
    within a batch (only layers that have some)."""
    out = {}
    for m in _tracking_norms(model):
        if m.affine:
            constant = m.running_var <= CONSTANT_VARIANCE * m.eps
            if constant.any():
                out[m] = constant
    return out


Settled = dict[_BatchNorm, tuple[torch.Tensor, torch.Tensor]]  # layer -> (its constant channels, their gamma before)


@torch.no_grad()
def settle_constant_channels(model: nn.Module) -> Settled:
    """Set gamma to 0 for every constant channel (``constant_channels``), so eval mode outputs its bias as
    train mode does; returns what ``unsettle`` needs to put the gammas back."""
    settled: Settled = {}
    for m, constant in constant_channels(model).items():
        settled[m] = (constant, m.weight[constant].clone())
        m.weight[constant] = 0.0
    return settled


@torch.no_grad()
def unsettle(settled: Settled) -> None:
    for m, (constant, gamma) in settled.items():
        m.weight[constant] = gamma


@contextmanager
def settled(model: nn.Module) -> Iterator[int]:
    """Constant channels settled inside the block, gammas restored after it; yields their count."""
    done = settle_constant_channels(model)
    try:
        yield sum(int(c.sum()) for c, _ in done.values())
    finally:
        unsettle(done)


def settled_channels(model: nn.Module) -> int:
    """Channels of ``model`` that are constant (``constant_channels``) and settled (gamma 0)."""
    return sum(int((m.weight[c] == 0).sum()) for m, c in constant_channels(model).items())


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer of ``model`` in eval mode (call after ``model.train()``): it then
    normalises by its running statistics and leaves them unchanged, while its affine weights still
    train."""
    for m in _tracking_norms(model):
        m.eval()


def _tracking_norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
