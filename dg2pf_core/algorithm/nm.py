"""N:M granularity: masks where every group of M consecutive weights keeps at most N.

Groups run along the input channels, the layout sparse tensor cores use (NVIDIA's ASP prunes so): a
Linear's rows ``W[out, :]`` and, for a Conv ``W[out, in, kh, kw]``, the input channels of every output
channel and kernel tap ``W[out, :, y, x]``, each cut into groups of M consecutive weights. DG2PF reaches the
pattern gradually: at a
target ``s`` the globally smallest-magnitude weights are pruned, at most ``M - N`` per group, so the
candidates are the ``M - N`` smallest of each group and exactly ``round(s * total)`` of them, the
smallest over all tensors together, are pruned. At the final target ``(M - N) / M`` that is every
candidate: every group has exactly ``M - N`` pruned.

Masks follow ``masks``' convention (bool, ``True`` = pruned). The pattern is data only: the pruned
network runs as masked dense weights; nothing here calls a sparse kernel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dg2pf_contract.options import CHANNEL
from dg2pf_core.algorithm.masks import Masks, _smallest_k
from dg2pf_core.errors import ConfigError

UNSTRUCTURED = "unstructured"
MAX_M = 32
_NM = re.compile(r"([0-9]{1,2}):([0-9]{1,2})")


@dataclass(frozen=True)
class NM:
    """At most ``n`` nonzeros in every group of ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        """The fraction every group, and so every tensor, is pruned to at the end."""
        return (self.m - self.n) / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_granularity(text: object) -> NM | None:
    """``None`` for ``"unstructured"`` and ``"channel"``, the ``NM`` of an ``"N:M"`` string; ConfigError
    (field ``granularity``) for anything else."""
    if text in (UNSTRUCTURED, CHANNEL):
        return None
    match = _NM.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(
            f"granularity: must be 'unstructured', 'channel' (whole output channels removed) or "
            f"N:M such as '2:4' (at most N of every M consecutive weights kept), got {text!r}",
            field="granularity",
        )
    n, m = int(match[1]), int(match[2])
    if not 1 <= n < m <= MAX_M:
        raise ConfigError(
            f"granularity: N:M needs 1 <= N < M <= {MAX_M} (e.g. '2:4': 2 of every 4 kept), got {text!r}",
            field="granularity",
        )
    return NM(n, m)


def _row_length(shape: torch.Size) -> int:
    """The length the groups are cut from: the input channels (a Linear's row, a Conv's channels per tap)."""
    return shape[1] if len(shape) > 1 else 1


def _groups(w: torch.Tensor, m: int) -> torch.Tensor:
    """``w`` as rows of ``m`` consecutive input-channel weights: ``W[out, in, *k]`` -> ``[out * prod(k) * in/m, m]``."""
    if w.dim() > 2:
        w = w.movedim(1, -1)
    return w.reshape(-1, m)


def _ungroup(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of ``_groups`` for a tensor of ``shape``."""
    if len(shape) > 2:
        moved = (shape[0], *shape[2:], shape[1])
        return groups.reshape(moved).movedim(-1, 1).contiguous()
    return groups.reshape(shape)


def check_divisible(weights: Mapping[str, torch.Tensor], nm: NM) -> None:
    """Every tensor's rows (the flattened input dimension) split into whole groups of M; ConfigError
    (field ``granularity``) in one line naming the first misfits and the ``exclude`` pattern leaving
    them out. Reads shapes only: works on meta tensors (what a service checks at submit)."""
    misfits = [(name, w.shape) for name, w in weights.items() if _row_length(w.shape) % nm.m]
    if not misfits:
        return
    shown = misfits[:3]
    listed = ", ".join(
        f"{name} ({'x'.join(map(str, shape))}: "
        f"{_row_length(shape)} input channel{'' if _row_length(shape) == 1 else 's'})"
        for name, shape in shown
    )
    more = f" and {len(misfits) - len(shown)} more" if len(misfits) > len(shown) else ""
    names = "|".join(re.escape(name) for name, _ in shown)
    example = f"^({names})$" if len(shown) > 1 else f"^{names}$"
    raise ConfigError(
        f"granularity {nm} groups {nm.m} consecutive input channels of every output (and kernel tap), "
        f"but {len(misfits)} "
        f"prunable tensor(s) have a number of input channels that is not a multiple of {nm.m} (grouped and depthwise "
        f"convolutions among them): {listed}{more}; leave them out of pruning with "
        f"--exclude REGEX (`exclude` in a job's schedule), e.g. --exclude '{example}'",
        field="granularity",
    )


def nm_masks(weights: Mapping[str, torch.Tensor], sparsity: float, nm: NM) -> Masks:
    """Masks pruning exactly ``round(sparsity * total)`` weights, the smallest in magnitude over all
    tensors together, with at most ``M - N`` pruned in any group (see the module's docstring).

    ``sparsity`` must be in ``[0, (M - N) / M]``; at ``(M - N) / M`` every group has exactly ``N``
    weights kept. Ties are broken by position (tensor order, group, rank in the group), so equal
    inputs give equal masks on every process. Vectorised: one sort per tensor of its groups, one
    global selection.
    """
    if not 0.0 <= sparsity <= nm.sparsity + 1e-9:
        raise ConfigError(
            f"granularity {nm} prunes at most {nm.sparsity:g} of the weights, asked for {sparsity}", field="sparsity"
        )
    check_divisible(weights, nm)
    drop = nm.m - nm.n  # pruned per group at the end
    names = list(weights)
    total = sum(weights[n].numel() for n in names)
    first = weights[names[0]]
    # The M - N smallest of each group, in one buffer (ascending within a group, ties by position).
    scores = torch.empty(total // nm.m * drop, dtype=torch.float32, device=first.device)
    order: dict[str, torch.Tensor] = {}
    offset = 0
    for n in names:
        groups = _groups(weights[n].detach(), nm.m).abs().float()
        values, index = torch.sort(groups, dim=1, stable=True)
        order[n] = index[:, :drop].to(torch.uint8)  # positions < 32: a byte each, not int64's eight
        scores[offset : offset + order[n].numel()].copy_(values[:, :drop].reshape(-1))
        offset += order[n].numel()
    pruned = _smallest_k(scores, min(round(sparsity * total), scores.numel()))
    masks: Masks = {}
    offset = 0
    for n in names:
        chosen = pruned[offset : offset + order[n].numel()].view_as(order[n])
        groups = torch.zeros(order[n].shape[0], nm.m, dtype=torch.bool, device=first.device)
        masks[n] = _ungroup(groups.scatter_(1, order[n].long(), chosen), weights[n].shape)
        offset += order[n].numel()
    return masks


@torch.no_grad()
def nm_violations(weights: Mapping[str, torch.Tensor], nm: NM) -> int:
    """Groups holding more than N nonzero weights (0 for a network pruned to ``nm``)."""
    return int(sum(int(((_groups(w.detach(), nm.m) != 0).sum(dim=1) > nm.n).sum()) for w in weights.values()))
