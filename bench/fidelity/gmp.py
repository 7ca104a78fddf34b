"""Independent peers with their own training loop: gradual magnitude pruning and one-shot pruning.

None of them runs on dg2pf_core's loop; they share one trainer (``train_peer``) so that what differs
between them is only the pruning rule and the loss:

- ``gmp-ao``: Zhu & Gupta's gradual magnitude pruning ("To prune, or not to prune", 2017) through
  ``torch.ao.pruning``: every Conv/Linear weight pruned *layer by layer* to the level of ``CubicSL``
  (``s_t = s (1 - (1 - t / (n dt))^3)``), the masks updated every ``DELTA_T`` optimiser steps over the
  P pruning epochs, the pruned values kept under the mask (``FakeSparsity`` parametrization) and
  squashed at the end. ``WeightNormSparsifier`` itself ranks 2-D blocks of the last two dimensions and
  fails on 4-D convolution weights (``RuntimeError: shape ... is invalid``), so the sparsifier is
  ``torch.ao.pruning.BaseSparsifier`` with WeightNormSparsifier's unstructured case (1x1 blocks, one
  zero per block: the smallest magnitudes of the masked weight) written for any shape.
- ``gmp-global``: the same schedule and update interval with one *global* magnitude ranking over all
  Conv/Linear weights (dg2pf_core's ``magnitude_masks``, with the emptying guard every method here gets:
  no tensor and no classifier row emptied).
- ``gmp-global-kd``: ``gmp-global`` trained on the distillation loss from the dense network (the standard
  form at T=4, alpha=0.75): what distillation adds to GMP without DG2PF's simulated pruning.
- ``oneshot-ft``: one global magnitude cut to the target before the first step (same guard), then
  fine-tuning.

The trainer (all four): SGD with Nesterov momentum 0.9, weight decay ``WEIGHT_DECAY``, gradient norm
clipped at ``CLIP`` (a safeguard), learning rate ``LR`` decayed by a cosine over the E epochs (the dense networks
were trained this way, at a peak of
0.05), cross-entropy (or the distillation loss), the cell's data and batch size, and what every DG2PF
cell gets too: BatchNorm statistics re-estimated on 32 training batches before each validation, the
best validation top-1 among the epochs at the final sparsity kept, early stopping with the budget's
patience once the final sparsity is reached.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import BaseSparsifier, CubicSL

from dg2pf_core.algorithm.batchnorm import recalibrate_batchnorm, settle_constant_channels, settled
from dg2pf_core.algorithm.distillation import kd_loss
from dg2pf_core.algorithm.masks import (
    EmptyingGuard,
    apply_masks_,
    classifier_weight,
    magnitude_masks,
    zero_masked_grads_,
)
from dg2pf_core.io.metrics import evaluate

from .data import loaders
from .registry import Cell, Outcome, register_method

LR, WEIGHT_DECAY, MOMENTUM = 0.01, 5e-5, 0.9
# Gradient norm clipping, a safeguard only (DG2PF clips at 0.5 with AdamW): per-layer GMP at 98% without it
# diverged to a NaN loss in its 9th epoch (shufflenet_v2_x0_5, Fashion-MNIST, seed 0).
CLIP = 5.0
DELTA_T = 32  # optimiser steps between mask updates (Zhu & Gupta: 100-1000 on ImageNet-sized epochs)
BN_BATCHES = 32  # as DG2PFConfig.bn_recalibration_batches
KD_T, KD_ALPHA = 4.0, 0.75
PRUNABLE = (nn.Conv2d, nn.Linear)


class MagnitudeSparsifier(BaseSparsifier):
    """torch.ao.pruning's sparsifier interface with a per-tensor unstructured magnitude mask: the
    ``round(sparsity_level * n)`` smallest |w| of the (masked) weight are zeroed, ties by position."""

    def __init__(self, sparsity_level: float = 0.5) -> None:
        super().__init__(defaults={"sparsity_level": sparsity_level})

    @torch.no_grad()
    def update_mask(self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs) -> None:  # type: ignore[override]
        mask = getattr(module.parametrizations, tensor_name)[0].mask
        w = getattr(module, tensor_name)  # the masked weight: pruned entries rank lowest and stay pruned
        k = round(sparsity_level * w.numel())
        flat = torch.ones(w.numel(), dtype=mask.dtype, device=mask.device)
        if k > 0:
            order = torch.sort(w.detach().abs().flatten(), stable=True).indices
            flat[order[:k]] = 0
        mask.copy_(flat.view_as(mask))


def cubic_level(sparsity: float, update: int, updates: int) -> float:
    """Zhu & Gupta's level after ``update`` of ``updates`` mask updates (CubicSL with s_0 = 0, dt = 1)."""
    return CubicSL.sparsity_compute_fn(0.0, sparsity, update, 0, 1, updates)


class _Pruner:
    """The pruning rule of one peer, applied at optimiser-step boundaries."""

    def __init__(self, model: nn.Module, kind: str, sparsity: float, updates: int) -> None:
        self.model, self.kind, self.sparsity, self.updates = model, kind, sparsity, updates
        self.done = 0
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
        self.masks: dict[str, torch.Tensor] = {}
        if kind == "ao":
            self.sparsifier = MagnitudeSparsifier(sparsity_level=sparsity)
            self.sparsifier.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n, _ in self.layers])
            self.scheduler = CubicSL(self.sparsifier, init_sl=0.0, init_t=0, delta_t=1, total_t=updates)
        else:
            self.params = {f"{n}.weight": m.weight for n, m in self.layers}
            classifier = classifier_weight(model)
            self.guard = EmptyingGuard(1, 1, classifier)

    def level(self) -> float:
        return self.sparsity if self.kind == "oneshot" else cubic_level(self.sparsity, self.done, self.updates)

    def update(self) -> float:
        """The next mask update; returns the level it pruned to."""
        self.done += 1
        if self.kind == "ao":
            with warnings.catch_warnings():
                # torch's advice for per-epoch loops (sparsifier first); here the scheduler sets the level
                # of this update, then the sparsifier prunes to it
                warnings.filterwarnings("ignore", message=r"Detected call of `scheduler\.step\(\)` before")
                self.scheduler.step()
            self.sparsifier.step()
            return float(self.sparsifier.groups[0]["sparsity_level"])
        level = self.level()
        self.masks = magnitude_masks(self.params, level, "global", 1.0, self.guard.kept(self.params))
        apply_masks_(self.params, self.masks)
        return level

    def after_backward(self) -> None:
        if self.kind != "ao":
            zero_masked_grads_(self.params, self.masks)

    def after_step(self) -> None:
        if self.kind != "ao":
            apply_masks_(self.params, self.masks)

    @torch.no_grad()
    def zeros(self) -> dict[str, int]:
        """Exactly-zero entries of every pruned weight as the forward pass sees it (masked)."""
        return {f"{n}.weight": int((m.weight == 0).sum()) for n, m in self.layers}

    def snapshot(self) -> dict:
        """What restores the model's weights and masks as they are now (``restore``)."""
        masks = (
            [m.parametrizations.weight[0].mask.clone() for _, m in self.layers]
            if self.kind == "ao"
            else {k: v.clone() for k, v in self.masks.items()}
        )
        return {"state": copy.deepcopy(self.model.state_dict()), "masks": masks}

    def restore(self, snapshot: dict) -> None:
        # torch.ao's FakeSparsity keeps its mask out of the state dict: the masks are put back by hand.
        self.model.load_state_dict(snapshot["state"], strict=self.kind != "ao")
        if self.kind == "ao":
            for (_, m), mask in zip(self.layers, snapshot["masks"]):
                m.parametrizations.weight[0].mask.copy_(mask)
        else:
            self.masks = snapshot["masks"]

    def finish(self) -> None:
        if self.kind == "ao":
            self.sparsifier.squash_mask()


def train_peer(cell: Cell, kind: str, distill: bool, delta_t: int = DELTA_T) -> Outcome:
    """Prune and train ``cell``'s dense model with the peer ``kind`` ("ao", "global", "oneshot"), the
    masks updated every ``delta_t`` optimiser steps; ``notes["levels"]`` lists every update's step,
    level and (per pruned tensor) zero count."""
    torch.manual_seed(cell.seed)
    budget, cpu = cell.budget, torch.device("cpu")
    model = cell.dense.build()
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if distill else None
    batches = loaders(cell.split, cell.data, batch_size=budget.batch_size, seed=cell.seed)
    per_epoch = batches.train_batches()
    pruning_steps = (1 if kind == "oneshot" else budget.pruning_epochs) * per_epoch
    updates = max(1, pruning_steps // delta_t) if kind != "oneshot" else 1
    total_steps = budget.epochs * per_epoch
    pruner = _Pruner(model, kind, cell.sparsity, updates)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
    )
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if teacher is not None:

        def loss_fn(x, y):
            with torch.no_grad():
                t = teacher(x)
            return kd_loss(model(x), t, y, KD_T, KD_ALPHA)
    else:

        def loss_fn(x, y):
            return F.cross_entropy(model(x), y)

    levels: list[dict] = []
    history: list[dict] = []
    step, best, best_state, best_epoch, stale, epochs = 0, -1.0, None, 0, 0, 0
    if kind == "oneshot":
        levels.append({"step": 0, "level": pruner.update(), "zeros": pruner.zeros()})
    for epoch in range(budget.epochs):
        model.train()
        total = 0.0
        for x, y in batches.train(epoch):
            if kind != "oneshot" and pruner.done < updates and step % delta_t == 0 and step > 0:
                levels.append({"step": step, "level": pruner.update(), "zeros": pruner.zeros()})
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(x, y)
            loss.backward()
            pruner.after_backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            pruner.after_step()
            schedule.step()
            total += float(loss.detach())
            step += 1
        if kind != "oneshot" and step >= pruning_steps and pruner.done < updates:
            levels.append(
                {"step": step, "level": pruner.update(), "zeros": pruner.zeros()}
            )  # the last: the final sparsity
        epochs += 1
        final = pruner.done >= updates
        with torch.random.fork_rng(devices=[]):
            recalibrate_batchnorm(model, batches.train(epoch), cpu, BN_BATCHES)
        with settled(model):
            val = evaluate(model, batches.val(), cpu).top1
        history.append(
            {"epoch": epochs, "loss": total / per_epoch, "val_top1": val, "level": pruner.level(), "final": final}
        )
        if not final:
            continue
        if val > best:
            best, best_epoch, stale = val, epochs, 0
            best_state = pruner.snapshot()
        else:
            stale += 1
            if stale >= budget.patience:
                break
    pruner.restore(best_state)
    pruner.finish()
    settle_constant_channels(model)
    return Outcome(
        epochs=epochs,
        model=model,
        notes={
            "levels": levels,
            "history": history,
            "best_epoch": best_epoch,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "delta_t": delta_t,
            "clip": CLIP,
        },
    )


@register_method(
    "gmp-ao",
    "Zhu & Gupta GMP through torch.ao.pruning (per-layer magnitude, CubicSL, masks every "
    f"{DELTA_T} steps, pruned values kept), SGD + cosine lr",
)
def gmp_ao(cell: Cell) -> Outcome:
    return train_peer(cell, "ao", distill=False)


@register_method(
    "gmp-global",
    f"GMP with one global magnitude ranking every {DELTA_T} steps (cubic schedule, emptying guard), SGD + cosine lr",
)
def gmp_global(cell: Cell) -> Outcome:
    return train_peer(cell, "global", distill=False)


@register_method(
    "gmp-global-kd", "gmp-global trained with distillation from the dense network (standard KD, T=4, alpha=0.75)"
)
def gmp_global_kd(cell: Cell) -> Outcome:
    return train_peer(cell, "global", distill=True)


@register_method(
    "oneshot-ft", "one global magnitude cut to the target (emptying guard), then fine-tuning: SGD + cosine lr"
)
def oneshot_ft(cell: Cell) -> Outcome:
    return train_peer(cell, "oneshot", distill=False)
