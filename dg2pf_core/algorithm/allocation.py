"""Channel widths per layer under a latency budget: a greedy knapsack over a measured latency table.

Given a model's channel groups (``ChannelPlan``), each channel's importance (the root-mean-square
magnitude the global ranking uses) and a ``LatencyTable``, ``allocate`` prunes, one step of
``multiple`` channels at a time, the step that loses the least importance per millisecond it saves
(HALP's latency-aware knapsack, NeurIPS 2022, solved greedily as NetAdapt does), until the table
predicts the network within the budget. A step that saves nothing by the table is never taken: a
layer whose width does not change its latency keeps its channels. Within a group the least important
channels go first; the layer collapse guard (``cap``: the most of a group that may go at the network's
channel fraction) is respected, and every group keeps at least one channel.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from dg2pf_core.algorithm.channels import ChannelPlan
from dg2pf_core.algorithm.latency_table import LatencyTable

_CAP_BELOW_ONE = 1.0 - 1e-9


@dataclass
class Allocation:
    pruned: dict[str, torch.Tensor]  # group root -> bool vector of its pruned channels
    predicted_ms: float
    reached: bool  # the prediction is within the budget

    @property
    def channels_pruned(self) -> int:
        return sum(int(v.sum()) for v in self.pruned.values())


@dataclass
class _Touch:
    layer: str
    dim: int  # 0: the layer's output width, 1: its input width
    ranks: list[int]  # sorted: the importance rank (in the group) of each position's channel


class _Widths:
    """The layers' (in, out) widths as groups lose channels; the table's sum kept up to date."""

    def __init__(self, table: LatencyTable) -> None:
        self.table = table
        self.removed = {name: [0, 0] for name in table.layers}  # name -> [in removed, out removed]

    def width(self, name: str, extra_in: int = 0, extra_out: int = 0) -> tuple[int, int]:
        op = self.table.layers[name].op
        r = self.removed[name]
        return op.in_channels - r[0] - extra_in, op.out_channels - r[1] - extra_out

    def ms(self, name: str, extra_in: int = 0, extra_out: int = 0) -> float:
        return self.table.layers[name].at(*self.width(name, extra_in, extra_out))

    def all(self) -> dict[str, tuple[float, float]]:
        return {name: self.width(name) for name in self.table.layers}


def allocate(
    plan: ChannelPlan,
    params: Mapping[str, torch.Tensor],
    table: LatencyTable,
    budget_ms: float,
    cap: Callable[[float], float],
    multiple: int = 1,
) -> Allocation:
    """The pruned channels that bring the table's prediction within ``budget_ms`` keeping the most
    importance (``reached`` False: the guard let no more go, and ``pruned`` is the fastest found)."""
    importance = plan.importance(params)
    total = plan.channels
    m = max(1, multiple)
    order: dict[str, torch.Tensor] = {}
    cum: dict[str, list[float]] = {}
    touches: dict[str, list[_Touch]] = {}
    options: dict[str, list[int]] = {}  # group -> the removal counts it may take, ascending
    for g in plan.groups:
        imp = importance[g.root]
        order[g.root] = torch.argsort(imp, stable=True)
        rank = torch.empty_like(order[g.root])
        rank[order[g.root]] = torch.arange(g.channels)
        sums = [0.0]
        for v in imp[order[g.root]].tolist():
            sums.append(sums[-1] + v)
        cum[g.root] = sums
        seen: dict[tuple[str, int], _Touch] = {}
        for item in g.items:
            if not item.param.endswith(".weight") and item.param != "weight":
                continue
            layer = item.param
            if layer not in table.layers or item.dim not in (0, 1):
                continue
            ranks = sorted(rank[item.roots].tolist())
            key = (layer, item.dim)
            if key in seen:
                seen[key].ranks = sorted(seen[key].ranks + ranks)
            else:
                seen[key] = _Touch(layer, item.dim, ranks)
        touches[g.root] = list(seen.values())
        step = g.multiple(m)
        kept = [g.channels] + [w for w in range(((g.channels - 1) // step) * step, 0, -step) if w >= 1]
        options[g.root] = [g.channels - w for w in kept]

    widths = _Widths(table)
    removed = {g.root: 0 for g in plan.groups}
    step_at = {g.root: 0 for g in plan.groups}  # index into options
    count = 0
    predicted = table.predict(widths.all())

    def entries(root: str, k_old: int, k_new: int) -> list[tuple[str, int, int]]:
        """(layer, extra in removed, extra out removed) when the group goes from k_old to k_new removed."""
        out: dict[str, list[int]] = {}
        for t in touches[root]:
            n = bisect.bisect_left(t.ranks, k_new) - bisect.bisect_left(t.ranks, k_old)
            if n:
                out.setdefault(t.layer, [0, 0])[0 if t.dim == 1 else 1] += n
        return [(layer, d[0], d[1]) for layer, d in out.items()]

    while True:
        if predicted <= budget_ms:  # by the running total: confirmed by the sum afresh, which may differ by
            predicted = table.predict(widths.all())  # rounding (a step early: the budget missed by 1e-15)
            if predicted <= budget_ms:
                break
        best: tuple[float, str, int, float, list] | None = None
        for g in plan.groups:
            # The first removal count past this group's current one that saves time by the table: a
            # flat stretch (a layer whose width does not change its latency there) is jumped over.
            for i in range(step_at[g.root] + 1, len(options[g.root])):
                k_new = options[g.root][i]
                after = (count + k_new - removed[g.root]) / total
                if k_new > math.floor(min(cap(after), _CAP_BELOW_ONE) * g.channels + 1e-9):
                    break
                change = entries(g.root, removed[g.root], k_new)
                saving = table.scale * sum(widths.ms(layer) - widths.ms(layer, di, do) for layer, di, do in change)
                if saving > 1e-12:
                    lost = cum[g.root][k_new] - cum[g.root][removed[g.root]]
                    score = lost / saving
                    if best is None or score < best[0]:
                        best = (score, g.root, i, saving, change)
                    break
        if best is None:
            break
        _, root, i, saving, change = best
        k_new = options[root][i]
        for layer, di, do in change:
            widths.removed[layer][0] += di
            widths.removed[layer][1] += do
        count += k_new - removed[root]
        removed[root], step_at[root] = k_new, i
        predicted -= saving
    predicted = table.predict(widths.all())  # summed afresh: no drift from the running updates
    pruned = {}
    for g in plan.groups:
        chosen = torch.zeros(g.channels, dtype=torch.bool)
        chosen[order[g.root][: removed[g.root]]] = True
        pruned[g.root] = chosen
    return Allocation(pruned, predicted, predicted <= budget_ms)


def widths_of(plan: ChannelPlan, table: LatencyTable, pruned: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """The layers' (in, out) widths once ``pruned`` (group root -> bool vector) is removed."""
    removed = {name: [0, 0] for name in table.layers}
    for g in plan.groups:
        chosen = pruned[g.root]
        for item in g.items:
            if item.param not in table.layers or item.dim not in (0, 1):
                continue
            removed[item.param][0 if item.dim == 1 else 1] += int(chosen[item.roots].sum())
    out = {}
    for name, e in table.layers.items():
        r_in, r_out = removed[name]
        if e.op.depthwise and e.op.in_channels == e.op.out_channels:
            r_in = r_out  # a depthwise conv's inputs go with its outputs (the group names its weight once, dim 0)
        out[name] = (e.op.in_channels - r_in, e.op.out_channels - r_out)
    return out
