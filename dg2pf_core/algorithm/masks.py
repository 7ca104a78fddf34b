"""Magnitude masks: which weights are pruned.

A mask is plain data: ``{parameter name: bool tensor}`` where ``True`` marks a *pruned* weight.
The pruning rule is a pure function of tensors (torch.nn.utils.prune style, without hooks), so masks
can be inspected, saved, broadcast between workers and compared bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dg2pf_core.algorithm.patterns import compile_pattern, search
from dg2pf_core.errors import ConfigError

Masks = dict[str, torch.Tensor]
Scope = Literal["global", "layerwise"]

#: module types whose ``weight`` is prunable by default
PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Selection:
    """Which weights take part in pruning.

    Default: the ``weight`` of every Conv and Linear layer. ``include``/``exclude`` are regular
    expressions searched for (``re.search`` semantics, RE2 syntax: dg2pf_core/algorithm/patterns.py) in
    parameter names; ``exclude`` wins.
    """

    keep_classifier_dense: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                compile_pattern(pattern, name)


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
        if selection.include and not any(search(p, name, "include") for p in selection.include):
            continue
        if any(search(p, name, "exclude") for p in selection.exclude):
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


def layer_caps(weights: Mapping[str, torch.Tensor], max_layer_sparsity: float, k: int) -> dict[str, int]:
    """The most weights each tensor may lose to a global ranking pruning ``k`` weights.

    ``floor(max_layer_sparsity * n_i)``. Where those sum to less than ``k`` because of the rounding
    (a target sparsity equal to the cap), the tensors closest to their next whole weight get one
    more, just enough of them, and never so that a tensor is emptied; a shortfall left after that is
    the caller's to report.
    """
    caps = {name: math.floor(max_layer_sparsity * w.numel() + 1e-9) for name, w in weights.items()}
    deficit = k - sum(caps.values())
    if deficit > 0:
        remainder = {name: max_layer_sparsity * w.numel() - caps[name] for name, w in weights.items()}
        for name in sorted(weights, key=lambda n: -remainder[n]):  # stable: the same order on every rank
            if deficit == 0:
                break
            if caps[name] + 1 < weights[name].numel():
                caps[name] += 1
                deficit -= 1
    return caps


def classifier_weight(model: nn.Module) -> str | None:
    """The classifier's weight name: the last Conv/Linear layer in module order (fc, classifier.1, head...),
    the same convention ``keep_classifier_dense`` uses."""
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_MODULES) and getattr(module, "weight", None) is not None:
            last = f"{module_name}.weight" if module_name else "weight"
    return last


@dataclass(frozen=True)
class EmptyingGuard:
    """The weights no ranking may prune, so that no path through the network is cut: the
    ``per_tensor`` largest-magnitude weights of every prunable tensor, and the ``per_class``
    largest of every output row of the classifier (``classifier``, a weight name: one row per class;
    a class whose row is empty can only be predicted through its bias). A minimum count, not a
    density floor: it changes nothing until a ranking would leave fewer weights than that, so the
    global ranking is otherwise the paper's. 0 turns each part off."""

    per_tensor: int = 1
    per_class: int = 1
    classifier: str | None = None

    @property
    def active(self) -> bool:
        return self.per_tensor > 0 or (self.per_class > 0 and self.classifier is not None)

    @torch.no_grad()
    def kept(self, weights: Mapping[str, torch.Tensor]) -> Masks:
        """``{name: bool tensor}``, True for a weight the guard keeps (only tensors it keeps some of)."""
        keep: Masks = {}
        for name, w in weights.items():
            mags = w.detach().abs()
            mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
            if self.per_tensor > 0:
                n = min(self.per_tensor, w.numel())
                mask.view(-1)[torch.topk(mags.flatten(), n, sorted=False).indices] = True
            if self.per_class > 0 and name == self.classifier and w.dim() >= 2:
                rows = mags.reshape(w.shape[0], -1)
                n = min(self.per_class, rows.shape[1])
                top = torch.topk(rows, n, dim=1, sorted=False).indices
                mask.view(w.shape[0], -1).scatter_(1, top, True)
            if mask.any():
                keep[name] = mask
        return keep


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: Scope = "global",
    max_layer_sparsity: float = 1.0,
    keep: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Masks pruning the smallest-magnitude weights.

    ``global``: one ranking over all tensors together; exactly ``round(sparsity * N)`` weights are
    pruned, N being the total number of weights. ``layerwise``: each tensor pruned to
    ``round(sparsity * n_i)`` on its own. Ties are broken by position, so equal inputs give equal
    masks on every process.

    ``max_layer_sparsity`` < 1 caps every tensor of a global ranking at that fraction pruned: a
    tensor whose share of the smallest weights would exceed its cap is pruned to the cap exactly, and
    the weights it keeps are taken from the other tensors' ranking instead, so the global count is
    still exact. The result is the smallest-magnitude set under the caps (greedy with per-tensor
    capacities is optimal), found by capping the overflowing tensors and ranking the rest again.

    ``keep`` (``{name: bool tensor}``, e.g. ``EmptyingGuard.kept``): weights never pruned; the others
    are ranked as usual and the global count stays exact (layerwise: each tensor prunes at most its
    unkept weights).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}", field="sparsity")
    if not 0.0 < max_layer_sparsity <= 1.0:
        raise ConfigError(f"max_layer_sparsity must be in (0, 1], got {max_layer_sparsity}", field="max_layer_sparsity")
    keep = {n: m for n, m in (keep or {}).items() if n in weights}
    kept = {n: int(keep[n].sum()) if n in keep else 0 for n in weights}
    if scope == "layerwise":
        return {
            name: _smallest_k(
                _scores(w, keep.get(name)), min(round(sparsity * w.numel()), w.numel() - kept[name])
            ).view_as(w)
            for name, w in weights.items()
        }
    if scope != "global":
        raise ConfigError(f"scope must be 'global' or 'layerwise', got {scope!r}", field="scope")
    total = sum(w.numel() for w in weights.values())
    k = round(sparsity * total)
    if k > total - sum(kept.values()):
        raise ConfigError(
            f"sparsity {sparsity} needs {k} of {total} weights pruned, but the emptying guard keeps "
            f"{sum(kept.values())} of them (min_weights_per_tensor, min_weights_per_class): lower the sparsity "
            "or the guard's counts",
            field="sparsity",
        )
    if max_layer_sparsity >= 1.0:
        return _global_smallest(weights, k, keep)
    caps = layer_caps(weights, max_layer_sparsity, k)
    caps = {n: min(c, weights[n].numel() - kept[n]) for n, c in caps.items()}
    if k > sum(caps.values()):
        raise ConfigError(
            f"sparsity {sparsity} needs {k} of {total} weights pruned, but max_layer_sparsity "
            f"{max_layer_sparsity} lets at most {sum(caps.values())} go: raise max_layer_sparsity "
            "(1.0 turns the cap off) or lower the sparsity",
            field="max_layer_sparsity",
        )
    capped: dict[str, torch.Tensor] = {}
    while True:
        free = {n: w for n, w in weights.items() if n not in capped}
        masks = _global_smallest(free, k - sum(caps[n] for n in capped), keep) if free else {}
        over = [n for n, m in masks.items() if int(m.sum()) > caps[n]]
        if not over:
            break
        # A tensor over its cap now stays over it once others are capped too (their weights leave
        # the ranking, so the threshold only rises): cap it for good and rank the rest again.
        for n in over:
            w = weights[n]
            capped[n] = _smallest_k(_scores(w, keep.get(n)), caps[n]).view_as(w)
    masks.update(capped)
    return {n: masks[n] for n in weights}


def _scores(w: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The flat magnitudes of ``w`` a ranking sorts, kept weights at +inf (never among the smallest)."""
    scores = w.detach().abs().flatten().float()
    if keep is not None:
        scores.masked_fill_(keep.flatten(), float("inf"))
    return scores


def _global_smallest(
    weights: Mapping[str, torch.Tensor], k: int, keep: Mapping[str, torch.Tensor] | None = None
) -> Masks:
    """Masks of exactly the ``k`` smallest-magnitude weights over all ``weights`` together, none of
    the ``keep`` ones (``k`` must not exceed the others' count)."""
    names = list(weights)
    first = weights[names[0]]
    keep = keep or {}
    # One buffer of magnitudes, filled in place: no per-tensor temporaries, no concatenation copy.
    flat = torch.empty(sum(weights[n].numel() for n in names), dtype=torch.float32, device=first.device)
    offset = 0
    for n in names:
        w = weights[n].detach().reshape(-1)
        part = flat[offset : offset + w.numel()]
        part.copy_(w).abs_()
        if n in keep:
            part.masked_fill_(keep[n].reshape(-1).to(part.device), float("inf"))
        offset += w.numel()
    pruned = _smallest_k(flat, k)
    masks: Masks = {}
    offset = 0
    for n in names:
        w = weights[n]
        masks[n] = pruned[offset : offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


def count_pruned(masks: Mapping[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


def recovered(previous: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> int:
    """Weights pruned by ``previous`` that ``current`` keeps: the paper's weight recovery, counted.

    Tensors missing from either mask count as not pruned there (the first ranking recovers nothing)."""
    # Summed on the masks' device, read back once (not one device sync per tensor).
    return int(sum((previous[n].to(m.device) & ~m).sum() for n, m in current.items() if n in previous))


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return count_pruned(masks) / total if total else 0.0


def layer_sparsity(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(m.float().mean()) for name, m in masks.items()}


def layers_above(masks: Mapping[str, torch.Tensor], threshold: float) -> dict[str, float]:
    """The tensors pruned beyond ``threshold`` (fraction), most pruned first: candidates for collapse."""
    above = {name: s for name, s in layer_sparsity(masks).items() if s > threshold}
    return dict(sorted(above.items(), key=lambda item: -item[1]))


def layer_warnings(masks: Mapping[str, torch.Tensor], threshold: float) -> list[str]:
    """Warnings, for a result, about tensors pruned beyond ``threshold``; empty when there are none."""
    above = layers_above(masks, threshold)
    if not above:
        return []
    shown = ", ".join(f"{name} {s:.2%}" for name, s in list(above.items())[:5])
    more = f" and {len(above) - 5} more" if len(above) > 5 else ""
    emptied = sum(1 for s in above.values() if s >= 1.0)
    gone = f"; {emptied} of them entirely pruned (the network's path through them is cut)" if emptied else ""
    return [
        f"{len(above)} layer(s) pruned beyond {threshold:.0%}: {shown}{more}{gone}. A layer left with few "
        "weights can cost accuracy (layer collapse): raise layer_density_floor, lower max_layer_sparsity or "
        "the sparsity, or exclude the layer from pruning (exclude) if the accuracy suffers."
    ]


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
