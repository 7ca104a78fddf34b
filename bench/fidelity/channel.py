"""Channel pruning to a MACs ratio: DG2PF's channel granularity against Torch-Pruning's own pruner.

Both remove whole output channels (with everything coupled to them: BatchNorms, the next layers'
inputs, residual sums) until the network keeps ``cell.macs_ratio`` of the dense network's Conv/Linear
multiply-accumulates (``dg2pf_core.io.metrics.conv_linear_macs``, the ruler every cell is measured with),
over the same P pruning epochs within the same E epochs, with the same early stopping and best-val
selection; the classifier's outputs are never pruned.

- ``dg2pf-channel``: ``DG2PFConfig(granularity="channel", target_macs_ratio=r)``, otherwise the
  defaults (the ``dg2pf`` cell's configuration): channel groups ranked by RMS magnitude, one global
  ranking under the layer collapse guard, simulated group pruning on the linear schedule with
  distillation, physical removal after the last pruning epoch, then distillation and SGD fine-tuning
  on the smaller network.
- ``tp-magnitude``: what a Torch-Pruning user writes, following its own benchmark script
  (``benchmarks/main.py``, ``progressive_pruning``): ``tp.pruner.MagnitudePruner`` with
  ``tp.importance.MagnitudeImportance(p=2)`` (its defaults: mean group reduction, mean normalizer),
  ``global_pruning=True``, ``pruning_ratio=1.0`` over ``TP_STEPS`` iterative steps, and
  ``pruner.step()`` repeated until the MACs fall to the target. Made gradual like ``torch-prune-l1``:
  at pruning epoch i of P the target is the i-th point of a linear path from 1 to r, one epoch of
  training after each; then training on the final network until E or early stopping. Loss:
  cross-entropy; optimiser: AdamW with DG2PFConfig's default lr and weight decay (rebuilt after each
  pruning, whose new tensors it must hold).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dg2pf_core.io.metrics import conv_linear_macs, evaluate

from .data import loaders
from .dg2pf_family import _run
from .registry import Cell, MethodUnavailable, Outcome, register_method
from .torch_prune import LR, WEIGHT_DECAY

# Torch-Pruning's benchmark default: each step removes up to 1/400 of the prunable channels, so the MACs
# land at most one small step under the target.
TP_STEPS = 400
CPU = torch.device("cpu")


def macs_path(ratio: float, steps: int) -> list[float]:
    """The MACs ratio to reach at each of ``steps`` pruning epochs: linear from 1 to ``ratio``, exact at the end."""
    path = [1.0 - (1.0 - ratio) * (i + 1) / steps for i in range(steps)]
    path[-1] = ratio
    return path


def macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    return conv_linear_macs(model, shape, CPU)[0]


def _input_shape(cell: Cell) -> tuple[int, ...]:
    return cell.split.input_shape


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]


def _target(cell: Cell) -> float:
    if cell.macs_ratio is None:
        raise MethodUnavailable(f"method {cell.method!r} prunes to a MACs ratio: run it with --macs-ratios")
    return cell.macs_ratio


@register_method(
    "dg2pf-channel",
    "DG2PFConfig(granularity='channel', target_macs_ratio=r), otherwise the defaults: RMS group magnitude, global "
    "ranking under the layer guard, simulated group pruning with KD, physical removal after P, "
    "then KD + SGD fine-tuning",
    kind="macs",
)
def dg2pf_channel(cell: Cell) -> Outcome:
    return _run(cell, {"granularity": "channel", "target_macs_ratio": _target(cell)})


@register_method(
    "dg2pf-channel-no-kd",
    "dg2pf-channel with kd_alpha=0: cross-entropy only, no teacher",
    kind="macs",
    in_grid=False,
)
def dg2pf_channel_no_kd(cell: Cell) -> Outcome:
    return _run(cell, {"granularity": "channel", "target_macs_ratio": _target(cell), "kd_alpha": 0.0})


@register_method(
    "tp-magnitude",
    f"Torch-Pruning MagnitudePruner(MagnitudeImportance(p=2), global_pruning=True, pruning_ratio=1.0, "
    f"iterative_steps={TP_STEPS}), step() until the MACs reach each point of a linear path to r over P epochs "
    "(one epoch after each), then AdamW cross-entropy training to E",
    kind="macs",
)
def tp_magnitude(cell: Cell) -> Outcome:
    ratio = _target(cell)
    try:
        import torch_pruning as tp  # noqa: PLC0415
    except ImportError as exc:
        raise MethodUnavailable(f"torch-pruning is not installed ({exc})") from exc
    torch.manual_seed(cell.seed)
    budget = cell.budget
    shape = _input_shape(cell)
    model = cell.dense.build()
    dense_macs = macs(model, shape)
    pruner = tp.pruner.MagnitudePruner(
        model,
        torch.zeros((1, *shape)),
        importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=True,
        pruning_ratio=1.0,
        iterative_steps=TP_STEPS,
        ignored_layers=[_classifier(model)],
    )
    steps: list[dict] = []
    state = {"reached": 1.0}

    def prune_to(target: float) -> None:
        model.eval()  # tracing and importance must not move BatchNorm statistics
        while state["reached"] > target and pruner.current_step < TP_STEPS:
            pruner.step()
            state["reached"] = macs(model, shape) / dense_macs
        steps.append({"target": target, "macs_ratio": state["reached"], "tp_step": pruner.current_step})

    prunes = [lambda t=t: prune_to(t) for t in macs_path(ratio, budget.pruning_epochs)]
    outcome = train_progressively(cell, model, prunes)
    outcome.notes.update({"steps": steps, "tp_steps": TP_STEPS})
    return outcome


def train_progressively(cell: Cell, model: nn.Module, prunes: list) -> Outcome:
    """Torch-Pruning's progressive loop as its users write it: each of ``prunes`` (one per pruning
    epoch) changes the network, then one epoch of training; then training on the final network until
    the budget E or early stopping, the best-validation network kept. Cross-entropy, AdamW with
    DG2PFConfig's default lr and weight decay, rebuilt after each pruning (whose new tensors it must hold)."""
    budget = cell.budget
    batches = loaders(cell.split, cell.data, batch_size=budget.batch_size, seed=cell.seed)
    optimizer = None

    def train_one(epoch: int) -> None:
        model.train()
        for x, y in batches.train(epoch):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    epoch = 0
    for prune in prunes:
        prune()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        train_one(epoch)
        epoch += 1

    best_val, best_model, stale = evaluate(model, batches.val(), CPU).top1, copy.deepcopy(model), 0
    best_epoch = epoch
    while epoch < budget.epochs and stale < budget.patience:
        train_one(epoch)
        epoch += 1
        val = evaluate(model, batches.val(), CPU).top1
        if val > best_val:
            best_val, best_model, best_epoch, stale = val, copy.deepcopy(model), epoch, 0
        else:
            stale += 1
    return Outcome(
        epochs=epoch,
        model=best_model,
        notes={"best_epoch": best_epoch, "best_val_top1": best_val, "lr": LR, "weight_decay": WEIGHT_DECAY},
    )
