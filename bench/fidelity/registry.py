"""The method registry: a name -> a function that prunes one dense model for one cell.

This module holds what a method is (its ``Cell`` in, its ``Outcome`` out, ``register_method``); the method
modules import it, and ``methods`` imports them all, so the registry is full once ``methods`` is imported.

A method receives a ``Cell`` (what to prune, to which sparsity or MACs ratio, with which seed and budget) and
returns an ``Outcome``: the pruned model (scored afterwards by ``measure``, the same for all), or,
for methods that run in another process, the numbers that process measured with the same rule.
The implementations live beside this file, one per family: ``dg2pf_family`` (DG2PF, its ablations
and the peers expressible as DG2PF configurations), ``torch_prune``, ``inc`` and ``channel`` (channel
pruning to a MACs ratio: DG2PF's channel granularity and Torch-Pruning's own pruner).

Methods are of one of three kinds: ``sparsity`` (a fraction of the weights set to zero; the default
grid), ``macs`` (whole channels removed until the network keeps a fraction of its dense
multiply-accumulates; cells run with ``--macs-ratios``) or ``latency`` (whole channels removed until the
network measures within a share of the dense network's latency; cells run with ``--latency-shares``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .data import DataSettings, JobSplit, Split
from .measure import Measured
from .pretrain import Dense


@dataclass(frozen=True)
class Budget:
    epochs: int = 15  # E: total training epochs of a cell, all phases
    pruning_epochs: int = 6  # P: epochs over which the sparsity is raised, where a method has a schedule
    patience: int = 4  # early stopping inside E, the same for every method; the best-val model is kept
    batch_size: int = 64

    def check(self) -> None:
        if self.pruning_epochs < 1 or self.epochs < self.pruning_epochs:
            raise ValueError(f"need 1 <= pruning epochs ({self.pruning_epochs}) <= epochs ({self.epochs})")


@dataclass
class Cell:
    model: str
    method: str
    sparsity: float
    seed: int
    budget: Budget
    dense: Dense
    split: Split | JobSplit  # the cell's data (fashion-mnist: the product's, for this seed)
    data: DataSettings
    npz: Path | None  # the split as arrays, for out-of-process methods (digits only)
    threads: int
    macs_ratio: float | None = (
        None  # methods of kind "macs": the fraction of the dense MACs to keep (sparsity is then 0)
    )
    latency_budget_ms: float | None = None  # methods of kind "latency": the measured latency to meet


@dataclass
class Outcome:
    epochs: int  # training epochs actually run
    model: nn.Module | None = None  # in-process methods: scored by measure.measure
    measured: Measured | None = None  # out-of-process methods: their own measurement, same rule
    notes: dict = field(default_factory=dict)  # method-specific detail kept in the cell's JSON
    cpu_seconds: float | None = None  # out-of-process methods: their process's CPU time


class MethodUnavailable(RuntimeError):
    """The method cannot run here (a missing dependency or environment); the cell is recorded as failed."""


MethodFn = Callable[[Cell], Outcome]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    description: str  # one line: how it is implemented (shown in the report)
    in_grid: bool = True  # False: an investigation variant, run only when named with --methods
    kind: str = "sparsity"  # "sparsity" (a weight sparsity target), "macs" (a MACs ratio) or "latency" (a budget)


METHODS: dict[str, Method] = {}


KINDS = ("sparsity", "macs", "latency")


def register_method(
    name: str, description: str, *, in_grid: bool = True, kind: str = "sparsity"
) -> Callable[[MethodFn], MethodFn]:
    if kind not in KINDS:
        raise ValueError(f"method {name!r}: kind must be one of {KINDS}, got {kind!r}")

    def wrap(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, fn, description, in_grid, kind)
        return fn

    return wrap
