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

import copy
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


CALIBRATION_ROUNDS = 6  # end-to-end measurements that steer the aim (each: an allocation removed and timed)
CLOSE_ENOUGH = 0.03  # a measured network within 3% under the budget ends the calibration


class LatencyTarget:
    """The budget, the table, and the ``aim``: what the table must predict for a network to measure
    within the budget here (the budget itself until calibrated)."""

    def __init__(self, table: LatencyTable, budget_ms: float, plan: ChannelPlan, cap: Callable[[float], float]) -> None:
        self.table, self.budget_ms, self.plan, self.cap = table, budget_ms, plan, cap
        self.aim_ms = budget_ms
        self.multiple = 1
        self.calibration: list[dict[str, float]] = []  # per round: aim, predicted, measured (ms)

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
        """The table (``saved``: a resumed run's target, as JSON; ``given``: one the job brought, checked
        against this machine's setting; else measured here), the channel multiple the budget is reachable
        with (the largest of ``channel_multiple``, its halves, ... 1) and, for a table measured here, the
        aim calibrated end to end (``calibrate``). ``ConfigError`` (field ``latency_budget_ms``) when even
        the smallest network the layer collapse guard allows is predicted over the budget.

        Measuring and calibrating happen on rank 0; every rank gets the result (all choose the same
        channels)."""
        budget = float(config.latency_budget_ms)  # type: ignore[arg-type]
        if saved:
            return cls.from_json(json.loads(saved), budget, plan, config.layer_cap)
        machine = machine_here(
            network_id(model, input_shape),
            config.latency_backend,
            config.latency_threads,
            config.latency_batch_size,
            input_shape,
        )
        if given is not None:
            given.check(machine)
            check_layers(given, model, input_shape)
        doc: list[object] = [None]
        failure: BaseException | None = None
        if distributed.rank() == 0:
            try:
                table = given or measure_table(model, input_shape, machine, config, progress)
                target = cls(table, budget, plan, config.layer_cap)
                target.multiple = target.reachable_multiple(params, config.channel_multiple)
                if given is None:
                    target.calibrate(model, input_shape, params)
                doc = [target.to_doc()]
            except Exception as exc:  # noqa: BLE001 - told to every rank, then raised (none waits forever)
                failure = exc
                doc = [
                    {
                        "error": getattr(exc, "message", str(exc)),
                        "type": type(exc).__name__,
                        "field": getattr(exc, "field", None),
                    }
                ]
        if distributed.active():
            torch.distributed.broadcast_object_list(doc, src=0)
        if failure is not None:
            raise failure
        if isinstance(doc[0], dict) and "error" in doc[0]:
            if doc[0].get("type") == "ConfigError":
                raise ConfigError(str(doc[0]["error"]), field=doc[0].get("field"))
            raise RuntimeError(f"rank 0 could not prepare the latency target: {doc[0]['type']}: {doc[0]['error']}")
        return cls.from_json(doc[0], budget, plan, config.layer_cap)

    def reachable_multiple(self, params: Mapping[str, torch.Tensor], channel_multiple: int) -> int:
        """The width multiple the budget can be met with by the table (``channel_multiple``, halved while the
        fastest allocation the guard allows misses it); ConfigError with the numbers when none can."""
        m = max(1, channel_multiple)
        while True:
            fastest = allocate(self.plan, params, self.table, self.budget_ms, self.cap, m)
            if fastest.reached or m == 1:
                break
            m //= 2
        if not fastest.reached:
            raise ConfigError(
                f"latency_budget_ms {self.budget_ms:g} cannot be reached: the dense network measured "
                f"{self.table.dense_measured_ms:.4g} ms ({_how(self.table.machine)}), and the fastest network the "
                f"layer collapse guard allows is predicted at {fastest.predicted_ms:.4g} ms (raise "
                "max_layer_sparsity or lower layer_density_floor, or ask for a larger budget)",
                field="latency_budget_ms",
            )
        return m

    def calibrate(self, model: nn.Module, input_shape: tuple[int, ...], params: Mapping[str, torch.Tensor]) -> None:
        """Steer the aim by measuring: the network the input weights' allocation at the aim leaves is
        removed and timed end to end, for up to ``CALIBRATION_ROUNDS`` rounds or until one measures
        within ``CLOSE_ENOUGH`` under the budget. The next aim is the last scaled by goal / measured
        until one round measured under the budget and one over it, then the secant between the two
        closest (kept between them). The aim kept is the one whose network measured closest under the
        budget (none under it: the tightest tried). The table's layers are timed alone; this corrects
        what the network around them adds or saves (docs/benchmarks.md, "Latency budgets")."""
        m = self.table.machine
        dense = self.table.dense_ms()
        if self.budget_ms >= dense:
            return  # the dense network measured within it: nothing to prune, nothing to steer
        fastest = allocate(self.plan, params, self.table, 0.0, self.cap, self.multiple).predicted_ms
        aim, best = self.budget_ms, None
        under: tuple[float, float] | None = None  # (aim, measured) of the round measured closest under the budget
        over: tuple[float, float] | None = None  # ... and closest over it
        goal = self.budget_ms * (1 - CLOSE_ENOUGH / 2)
        for _ in range(CALIBRATION_ROUNDS):
            allocation = allocate(self.plan, params, self.table, aim, self.cap, self.multiple)
            net = copy.deepcopy(model).cpu()
            remove_channels(net, input_shape, self.plan.pruned_channels(allocation.pruned))
            measured = measure_network(net, input_shape, m.backend, m.threads, m.batch_size)
            self.calibration.append({"aim_ms": aim, "predicted_ms": allocation.predicted_ms, "measured_ms": measured})
            if measured <= self.budget_ms:
                if under is None or measured > under[1]:
                    under = (aim, measured)
            elif over is None or measured < over[1]:
                over = (aim, measured)
            if self.budget_ms * (1 - CLOSE_ENOUGH) <= measured <= self.budget_ms:
                break
            if measured > self.budget_ms and allocation.predicted_ms <= fastest:
                if under is None:
                    raise ConfigError(
                        f"latency_budget_ms {self.budget_ms:g} cannot be reached: the fastest network the layer "
                        f"collapse guard allows measured {measured:.4g} ms end to end ({_how(m)}; the dense "
                        f"network {self.table.dense_measured_ms:.4g} ms) (raise max_layer_sparsity or lower "
                        "layer_density_floor, or ask for a larger budget)",
                        field="latency_budget_ms",
                    )
                break  # nothing faster to try
            if under is not None and over is not None:
                # bracketed: the aim where the line through the two measures the goal (secant), kept inside
                (a0, t0), (a1, t1) = under, over
                aim = a0 + (goal - t0) * (a1 - a0) / (t1 - t0) if t1 > t0 else (a0 + a1) / 2
                aim = min(max(aim, min(a0, a1)), max(a0, a1))
            else:
                aim = aim * goal / measured
            aim = min(dense, max(fastest, aim))
        best = under
        self.aim_ms = best[0] if best is not None else min(c["aim_ms"] for c in self.calibration)

    # --- the state's copy ---
    def to_doc(self) -> dict:
        return {
            "table": self.table.to_json(),
            "aim_ms": self.aim_ms,
            "multiple": self.multiple,
            "calibration": list(self.calibration),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_doc())

    @classmethod
    def from_json(
        cls, doc: object, budget_ms: float, plan: ChannelPlan, cap: Callable[[float], float]
    ) -> LatencyTarget:
        if not isinstance(doc, dict) or "table" not in doc:
            raise ConfigError("the training state's latency target is damaged", field="latency_budget_ms")
        target = cls(LatencyTable.from_json(doc["table"]), budget_ms, plan, cap)
        target.aim_ms = float(doc.get("aim_ms", budget_ms))
        target.multiple = int(doc.get("multiple", 1))
        target.calibration = [dict(c) for c in doc.get("calibration", [])]
        return target

    # --- the rankings ---
    def select(self, params: Mapping[str, torch.Tensor], reduction: float) -> Allocation:
        """The channels to prune at schedule point ``reduction`` (1: the aim itself)."""
        dense = self.table.dense_ms()
        goal = dense - reduction * (dense - self.aim_ms)
        return allocate(self.plan, params, self.table, goal, self.cap, self.multiple)

    def summary(self, model: nn.Module, input_shape: tuple[int, ...]) -> LatencyObjective:
        """The final network (``model``, its channels removed) predicted and measured end to end."""
        m = self.table.machine
        widths = {n: (op.in_channels, op.out_channels) for n, op in layer_ops(model, input_shape).items()}
        predicted = self.table.predict({n: w for n, w in widths.items() if n in self.table.layers})
        notes = list(self.table.notes)
        here = machine_here("", m.backend, m.threads, m.batch_size, input_shape)
        elsewhere = here.cpu != m.cpu
        # Rank 0 measures, alone on its node's CPUs as far as this run goes; the others are told.
        result: list[object] = [None]
        if distributed.rank() == 0:
            try:
                result = [measure_network(model, input_shape, m.backend, m.threads, m.batch_size)]
            except Exception as exc:  # noqa: BLE001 - a trained network is not lost to its measurement
                result = [f"{type(exc).__name__}: {exc}"]
        if distributed.active():
            torch.distributed.broadcast_object_list(result, src=0)
        measured = result[0] if isinstance(result[0], float) else None
        if measured is None:
            notes.append(f"the final network could not be measured: {result[0]}")
        if elsewhere:
            notes.append(
                f"the table is of {m.cpu}; measured_ms is of this machine ({here.cpu}), so met is not judged: "
                "time the model where it serves (`dg2pf latency`)"
            )
        return LatencyObjective(
            budget_ms=self.budget_ms,
            aim_ms=self.aim_ms,
            backend=m.backend,
            threads=m.threads,
            batch_size=m.batch_size,
            cpu=m.cpu,
            dense_measured_ms=self.table.dense_measured_ms,
            predicted_ms=predicted,
            measured_ms=measured,
            error=None if not measured else predicted / measured - 1.0,
            met=None if measured is None or elsewhere else measured <= self.budget_ms,
            calibration=list(self.calibration),
            table_layers=len(self.table.layers),
            table_seconds=self.table.build_seconds,
            table_notes=notes,
        )


def check_layers(table: LatencyTable, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """``ConfigError`` (field ``latency_table``) unless the table's layers are the model's, shape for shape."""
    ops = layer_ops(model, input_shape)
    if set(ops) != set(table.layers) or any(table.layers[n].op != op for n, op in ops.items()):
        other = sorted(set(ops) ^ set(table.layers)) or [n for n, op in ops.items() if table.layers[n].op != op]
        raise ConfigError(
            f"latency_table: its layers are not this model's at this input size (first difference: {other[0]}): "
            "measure one for this checkpoint with `dg2pf latency-table`",
            field="latency_table",
        )


def _how(machine: Machine) -> str:
    return f"{machine.backend}, {machine.threads} thread(s), batch {machine.batch_size}"


def measure_table(
    model: nn.Module,
    input_shape: tuple[int, ...],
    machine: Machine,
    config: DG2PFConfig,
    progress: Callable[[str], None] | None,
) -> LatencyTable:
    """The latency table of ``model`` measured here on ``machine`` (its backend, threads, batch), widths in
    steps of the config's ``channel_multiple``, scaled by the dense network measured end to end."""

    def half(copy_: nn.Module) -> nn.Module:
        p = ChannelPlan.build(copy_, input_shape, config.selection())
        params = dict(copy_.named_parameters())
        pruned = p.select(params, 0.5, config.layer_cap(0.5), max(1, config.channel_multiple))
        remove_channels(copy_, input_shape, p.pruned_channels(pruned))
        return copy_

    return build_table(model, input_shape, machine, max(1, config.channel_multiple), half=half, progress=progress)
