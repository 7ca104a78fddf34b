"""One optimisation step with simulated or hard pruning.

Simulated pruning (DG2PF's gradual phase): the masked weights are zeroed for the forward and
backward pass and put back bit-exactly afterwards, so a weight pruned by mistake keeps its value
and can win its place back at the next ranking. Two recovery variants:

- ``frozen`` (the paper's pseudo-code, default): only unpruned weights are updated; masked weights
  leave the step with exactly the value they entered it with.
- ``feedback`` (dynamic pruning with feedback): the gradient is taken at the pruned point and
  applied to all weights, masked ones included.

Hard pruning (distillation after the last pruning epoch, pruned fine-tuning): masked weights are
exactly 0 after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch

from dg2pf_contract.options import RECOVERY_MODES
from dg2pf_core.algorithm.masks import apply_masks_, zero_masked_grads_

Recovery = Literal["frozen", "feedback"]


def _backup(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Only the masked values are kept (4 bytes x sparsity per weight), not a copy of every tensor.
    return {name: params[name].detach().masked_select(mask) for name, mask in masks.items()}


@torch.no_grad()
def _restore(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], backup: Mapping[str, torch.Tensor]
) -> None:
    for name, mask in masks.items():
        params[name].masked_scatter_(mask, backup[name])


def _backward_and_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    before_step: Callable[[], None],
    clip_params: list[torch.Tensor],
    clip_norm: float | None,
    scaler: torch.amp.GradScaler | None,
) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    before_step()
    if clip_norm is not None and clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(clip_params, clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def simulated_step(
    compute_loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    *,
    recovery: Recovery = "frozen",
    clip_params: list[torch.Tensor],
    clip_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward/backward with masked weights zeroed, then one optimiser step per ``recovery``."""
    if recovery not in RECOVERY_MODES:  # before touching the weights: a bad name changes nothing
        raise ValueError(f"recovery must be one of {RECOVERY_MODES}, got {recovery!r}")
    backup = _backup(params, masks)
    apply_masks_(params, masks)
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss()
    if recovery == "frozen":
        # Masked weights get no gradient (and so no share of the clipping norm); whatever the
        # optimiser still does to them (weight decay, momentum) is undone by the restore.
        _backward_and_step(loss, optimizer, lambda: zero_masked_grads_(params, masks), clip_params, clip_norm, scaler)
        _restore(params, masks, backup)
    else:  # feedback
        _backward_and_step(loss, optimizer, lambda: _restore(params, masks, backup), clip_params, clip_norm, scaler)
    return loss.detach()


def hard_step(
    compute_loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    *,
    clip_params: list[torch.Tensor],
    clip_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One step of a network whose mask is final: pruned weights are exactly 0 afterwards."""
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss()
    _backward_and_step(loss, optimizer, lambda: zero_masked_grads_(params, masks), clip_params, clip_norm, scaler)
    apply_masks_(params, masks)
    return loss.detach()
