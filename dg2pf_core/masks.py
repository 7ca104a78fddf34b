"""Magnitude masks: which weights are pruned.

A mask is plain data: ``{parameter name: bool tensor}`` where ``True`` marks a *pruned* weight.
The pruning rule is a pure function of tensors (torch.nn.utils.prune style, without hooks), so masks
can be inspected, saved, broadcast between workers and compared bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .errors import ConfigError

Masks = dict[str, torch.Tensor]
Scope = Literal["global", "layerwise"]

#: module types whose ``weight`` is prunable by default
PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Selection:
    """Which weights take part in pruning.

    Default: the ``weight`` of every Conv and Linear layer. ``include``/``exclude`` are regular
    expressions matched (``re.search``) against parameter names; ``exclude`` wins.
    """

    keep_classifier_dense: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"invalid name pattern {pattern!r}: {exc}", field="include") from exc


@dataclass
class PrunableSet:
    """The named weight tensors that are ranked for pruning, in model order."""

    params: dict[str, nn.Parameter] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def names(self) -> list[str]:
        return list(self.params)


def select_prunable(model: nn.Module, selection: Selection = Selection()) -> PrunableSet:
    """Collect the prunable weights of ``model`` (unwrapping DDP's ``module.`` transparently)."""
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    candidates: list[tuple[str, nn.Parameter]] = []
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_MODULES) and getattr(module, "weight", None) is not None:
            name = f"{module_name}.weight" if module_name else "weight"
            candidates.append((name, module.weight))
    if selection.keep_classifier_dense and candidates:
        # The classifier is the last Conv/Linear layer in module order (fc, classifier.1, head...).
        candidates = candidates[:-1]
    chosen: dict[str, nn.Parameter] = {}
    for name, param in candidates:
        if selection.include and not any(re.search(p, name) for p in selection.include):
            continue
        if any(re.search(p, name) for p in selection.exclude):
            continue
        chosen[name] = param
    if not chosen:
        raise ConfigError(
            "no prunable weights selected: the model has no Conv/Linear weights matching the "
            f"include={list(selection.include)} / exclude={list(selection.exclude)} patterns",
            field="include",
        )
    return PrunableSet(chosen)


def _smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` smallest entries of the flat tensor ``scores``.

    O(N): one selection (kthvalue) for the threshold; ties at the threshold are broken by position
    (lowest flat index first), looking only at the tied entries, so the result is deterministic and
    has exactly ``k`` entries whatever the ties.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    threshold = torch.kthvalue(scores, k).values
    pruned = scores < threshold
    need = k - int(pruned.sum())
    tied = torch.nonzero(scores == threshold).flatten()[:need]  # ascending positions
    pruned[tied] = True
    return pruned


def magnitude_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, scope: Scope = "global"
) -> Masks:
    """Masks pruning the smallest-magnitude weights.

    ``global``: one ranking over all tensors together; exactly ``round(sparsity * N)`` weights are
    pruned, N being the total number of weights. ``layerwise``: each tensor pruned to
    ``round(sparsity * n_i)`` on its own. Ties are broken by position, so equal inputs give equal
    masks on every process.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}", field="sparsity")
    if scope == "layerwise":
        return {
            name: _smallest_k(w.detach().abs().flatten(), round(sparsity * w.numel())).view_as(w)
            for name, w in weights.items()
        }
    if scope != "global":
        raise ConfigError(f"scope must be 'global' or 'layerwise', got {scope!r}", field="scope")
    names = list(weights)
    first = weights[names[0]]
    # One buffer of magnitudes, filled in place: no per-tensor temporaries, no concatenation copy.
    flat = torch.empty(sum(weights[n].numel() for n in names), dtype=torch.float32, device=first.device)
    offset = 0
    for n in names:
        w = weights[n].detach().reshape(-1)
        flat[offset : offset + w.numel()].copy_(w).abs_()
        offset += w.numel()
    pruned = _smallest_k(flat, round(sparsity * flat.numel()))
    masks: Masks = {}
    offset = 0
    for n in names:
        w = weights[n]
        masks[n] = pruned[offset : offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


def count_pruned(masks: Mapping[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return count_pruned(masks) / total if total else 0.0


def layer_sparsity(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(m.float().mean()) for name, m in masks.items()}


@torch.no_grad()
def apply_masks_(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Hard pruning: set every masked weight to exactly 0, in place."""
    for name, mask in masks.items():
        params[name].masked_fill_(mask, 0.0)


@torch.no_grad()
def zero_masked_grads_(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        grad = params[name].grad
        if grad is not None:
            grad.masked_fill_(mask, 0.0)


def masks_checksum(masks: Mapping[str, torch.Tensor]) -> int:
    """A cheap order-sensitive fingerprint of a mask set, for cross-process equality checks."""
    total = 0
    for i, name in enumerate(sorted(masks)):
        flat = masks[name].flatten()
        idx = torch.nonzero(flat).flatten().to(torch.int64)
        # Weighted index sum: differs when any pruned position differs (collisions are negligible).
        total += (i + 1) * int(((idx * 2654435761) % 1_000_000_007).sum()) + int(flat.sum())
    return total % (2**61 - 1)
