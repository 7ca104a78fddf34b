"""A channel run pruned to ``latency_budget_ms``: its latency table, the budget each ranking prunes to,
and the final network measured against the budget.

The table is measured once per run, before training (on rank 0 under DDP, then sent to every rank,
so all choose the same channels), kept in the training state (a resumed run prunes by the same table,
and its weights stay bit-identical), and checked against the machine it answers for. The gradual
schedule runs over the latency to remove: a ranking at schedule point ``r`` (0 to 1) prunes to
``dense - r * (dense - budget)`` by the table. ``allocate`` keeps, per layer, the channels worth the
most for the time they cost.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping

import torch
from torch import nn

from dg2pf_contract.results import LatencyObjective
from dg2pf_core.algorithm import distributed
from dg2pf_core.algorithm.allocation import Allocation, allocate
from dg2pf_core.algorithm.channels import ChannelPlan, remove_channels
from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.algorithm.latency_table import (
    LatencyTable,
    Machine,
    build_table,
    layer_ops,
    machine_here,
    measure_network,
)
from dg2pf_core.errors import ConfigError


def network_id(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """What a table is of: the model's class and every Conv/Linear layer's name and shape."""
    ops = layer_ops(model, input_shape)
    digest = hashlib.sha256(json.dumps({n: op.key() for n, op in ops.items()}, sort_keys=True).encode()).hexdigest()
    return f"{type(model).__name__} {len(ops)} layers {digest[:16]}"


class LatencyTarget:
    def __init__(self, table: LatencyTable, budget_ms: float, plan: ChannelPlan, cap: Callable[[float], float]) -> None:
        self.table, self.budget_ms, self.plan, self.cap = table, budget_ms, plan, cap
        self.multiple = 1

    @classmethod
    def prepare(
        cls,
        model: nn.Module,
        input_shape: tuple[int, ...],
        plan: ChannelPlan,
        params: Mapping[str, torch.Tensor],
        config: DG2PFConfig,
        saved: str = "",
        given: LatencyTable | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> LatencyTarget:
        """The table (``saved``: a resumed run's, as JSON; ``given``: one the job brought, checked against
        this machine; else measured here), and the channel multiple the budget is reachable with (the
        largest of ``channel_multiple``, its halves, ... 1). ``ConfigError`` (field ``latency_budget_ms``)
        when even the smallest network the layer collapse guard allows is predicted over the budget."""
        machine = machine_here(
            network_id(model, input_shape),
            config.latency_backend,
            config.latency_threads,
            config.latency_batch_size,
            input_shape,
        )
        if saved:
            table = LatencyTable.from_json(json.loads(saved))
        elif given is not None:
            given.check(machine)
            table = given
        else:
            table = _measured_once(model, input_shape, machine, plan, config, progress)
        target = cls(table, float(config.latency_budget_ms), plan, config.layer_cap)  # type: ignore[arg-type]
        m = max(1, config.channel_multiple)
        while True:
            fastest = allocate(plan, params, table, target.budget_ms, config.layer_cap, m)
            if fastest.reached or m == 1:
                break
            m //= 2
        if not fastest.reached:
            raise ConfigError(
                f"latency_budget_ms {target.budget_ms:g} cannot be reached: the dense network measured "
                f"{table.dense_measured_ms:.4g} ms ({_how(table.machine)}), and the fastest network the layer "
                f"collapse guard allows is predicted at {fastest.predicted_ms:.4g} ms (raise max_layer_sparsity or "
                "lower layer_density_floor, or ask for a larger budget)",
                field="latency_budget_ms",
            )
        target.multiple = m
        return target

    def to_json(self) -> str:
        return json.dumps(self.table.to_json())

    def select(self, params: Mapping[str, torch.Tensor], reduction: float) -> Allocation:
        """The channels to prune at schedule point ``reduction`` (1: the budget itself)."""
        dense = self.table.dense_ms()
        budget = dense - reduction * (dense - self.budget_ms)
        return allocate(self.plan, params, self.table, budget, self.cap, self.multiple)

    def summary(self, model: nn.Module, input_shape: tuple[int, ...]) -> LatencyObjective:
        """The final network (``model``, its channels removed) predicted and measured end to end."""
        m = self.table.machine
        widths = {n: (op.in_channels, op.out_channels) for n, op in layer_ops(model, input_shape).items()}
        predicted = self.table.predict({n: w for n, w in widths.items() if n in self.table.layers})
        notes = list(self.table.notes)
        try:
            measured: float | None = measure_network(model, input_shape, m.backend, m.threads, m.batch_size)
        except Exception as exc:  # noqa: BLE001 - a trained network is not lost to its measurement
            measured = None
            notes.append(f"the final network could not be measured: {type(exc).__name__}: {exc}")
        return LatencyObjective(
            budget_ms=self.budget_ms,
            backend=m.backend,
            threads=m.threads,
            batch_size=m.batch_size,
            cpu=m.cpu,
            dense_measured_ms=self.table.dense_measured_ms,
            predicted_ms=predicted,
            measured_ms=measured,
            error=None if not measured else predicted / measured - 1.0,
            met=None if measured is None else measured <= self.budget_ms,
            table_layers=len(self.table.layers),
            table_seconds=self.table.build_seconds,
            table_notes=notes,
        )


def _how(machine: Machine) -> str:
    return f"{machine.backend}, {machine.threads} thread(s), batch {machine.batch_size}"


def _measured_once(
    model: nn.Module,
    input_shape: tuple[int, ...],
    machine: Machine,
    plan: ChannelPlan,
    config: DG2PFConfig,
    progress: Callable[[str], None] | None,
) -> LatencyTable:
    """Measured on rank 0 and sent to the others (every rank must choose the same channels)."""
    doc = [None]
    if distributed.rank() == 0:

        def half(copy_: nn.Module) -> nn.Module:
            p = ChannelPlan.build(copy_, input_shape, config.selection())
            params = dict(copy_.named_parameters())
            pruned = p.select(params, 0.5, config.layer_cap(0.5), max(1, config.channel_multiple))
            remove_channels(copy_, input_shape, p.pruned_channels(pruned))
            return copy_

        layers = [n for n in layer_ops(model, input_shape)]
        table = build_table(
            model, input_shape, machine, max(1, config.channel_multiple), half=half, layers=layers, progress=progress
        )
        doc = [table.to_json()]
    if distributed.active():
        torch.distributed.broadcast_object_list(doc, src=0)
    return LatencyTable.from_json(doc[0])
