"""``torch-prune-l1``: iterative global L1 pruning with PyTorch's own ``torch.nn.utils.prune``.

What a PyTorch user would write with the stock tool, independent of dg2pf_core's masks: P pruning
steps, each ``prune.global_unstructured(..., prune.L1Unstructured, amount=k)`` with ``k`` the number
of further weights that brings the cumulative sparsity to the next point of a linear path to the
target, one training epoch after each step; then training at the final sparsity until the budget E
or early stopping; the best-validation weights are kept and the reparametrisation is removed
(``prune.remove``). Loss: cross-entropy; optimiser: AdamW with DG2PFConfig's default lr and weight
decay, so the optimiser is not what differs from the DG2PF family.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

from dg2pf_core import DG2PFConfig
from dg2pf_core.io.metrics import evaluate

from .data import loaders
from .registry import Cell, Outcome, register_method

_DEFAULTS = DG2PFConfig(sparsity=0.5)
LR, WEIGHT_DECAY = _DEFAULTS.lr, _DEFAULTS.weight_decay


def linear_path(sparsity: float, steps: int) -> list[float]:
    path = [sparsity * (i + 1) / steps for i in range(steps)]
    path[-1] = sparsity  # exact, whatever the float arithmetic did
    return path


def _current_weights(module: nn.Module) -> torch.Tensor:
    # After prune has reparametrised a module, ``module.weight`` is recomputed only in the forward
    # pre-hook, so it lags the last optimiser step; rank by the weights as they are now.
    if hasattr(module, "weight_orig"):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


@register_method(
    "torch-prune-l1",
    "torch.nn.utils.prune.global_unstructured(L1Unstructured), P steps on a linear path, one epoch after "
    "each, then AdamW training to E; prune.remove at the end",
)
def torch_prune_l1(cell: Cell) -> Outcome:
    torch.manual_seed(cell.seed)
    budget = cell.budget
    model = cell.dense.build()
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.weight.numel() for m, _ in layers)
    # prune keeps the original Parameter object as weight_orig, so this optimiser stays valid.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    batches = loaders(cell.split, cell.data, batch_size=budget.batch_size, seed=cell.seed)
    device = torch.device("cpu")

    def train_one(epoch: int) -> None:
        model.train()
        for x, y in batches.train(epoch):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    pruned, epoch, steps = 0, 0, []
    for target in linear_path(cell.sparsity, budget.pruning_epochs):
        k = round(target * total) - pruned
        if k > 0:
            # An int amount is a count among the weights not yet pruned: exactly the step's share.
            prune.global_unstructured(
                layers,
                pruning_method=prune.L1Unstructured,
                amount=k,
                importance_scores={(m, n): _current_weights(m) for m, n in layers},
            )
            pruned += k
        steps.append({"epoch": epoch + 1, "target": target, "pruned": pruned})
        train_one(epoch)
        epoch += 1

    best_val, best_state, stale = evaluate(model, batches.val(), device).top1, copy.deepcopy(model.state_dict()), 0
    best_epoch = epoch
    while epoch < budget.epochs and stale < budget.patience:
        train_one(epoch)
        epoch += 1
        val = evaluate(model, batches.val(), device).top1
        if val > best_val:
            best_val, best_state, best_epoch, stale = val, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
    model.load_state_dict(best_state)
    for module, name in layers:
        prune.remove(module, name)
    return Outcome(
        epochs=epoch,
        model=model,
        notes={
            "steps": steps,
            "best_epoch": best_epoch,
            "best_val_top1": best_val,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
        },
    )
