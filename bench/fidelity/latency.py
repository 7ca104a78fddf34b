"""Channel pruning to a measured latency budget: DG2PF's ``latency_budget_ms`` against two peers pruned
to the same measured latency, each with the same training budget (issue 31's comparison).

Latency is ONNX Runtime's, 1 thread, batch 32 (``LATENCY``), measured end to end by
``dg2pf_core.algorithm.latency_table.measure_network`` (the ruler a ``latency_budget_ms`` job uses). A
cell's budget is ``share`` x the dense network's measured latency (measured once per model and kept in
``<results>/<model>/dense-latency.json`` so resumed cells prune to the same budget).

- ``dg2pf-latency``: ``DG2PFConfig(granularity="channel", latency_budget_ms=B)``: the per-layer latency
  table, the knapsack allocation per ranking, the aim calibrated end to end, then DG2PF as usual.
- ``dg2pf-channel-at-latency``: dg2pf's global channel ranking (``sparsity`` = a channel fraction, what
  ``sparsity`` and ``target_macs_ratio`` channel jobs use), the fraction chosen before training by
  bisection so that the dense network pruned one-shot by that ranking measures at most B; then the same
  DG2PF run (distillation, simulated pruning, fine-tuning). The training moves the ranking, so the final
  network is measured again like every cell.
- ``tp-uniform-at-latency``: Torch-Pruning's progressive loop as its README writes it:
  ``MagnitudePruner(MagnitudeImportance(p=2), global_pruning=False, pruning_ratio=r,
  iterative_steps=P, round_to=16)``, one ``step()`` per pruning epoch with an epoch of training after
  it, then training to E (cross-entropy, AdamW, as ``tp-magnitude``); the uniform ratio ``r`` chosen the
  same way (one-shot, bisection, measured at most B).

The peers' knobs are calibrated on measured latency, so the three meet the same budget by the same
ruler; every cell's final network and the dense network are measured again side by side after training.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dg2pf_core.algorithm.channels import ChannelPlan, remove_channels
from dg2pf_core.algorithm.latency_table import measure_network
from dg2pf_core.io.latency import cpu_name

from .channel import _classifier, macs, train_progressively
from .dg2pf_family import _run, make_config
from .registry import Cell, MethodUnavailable, Outcome, register_method

LATENCY = {"backend": "onnxruntime", "threads": 1, "batch": 32}
ROUNDS = 8  # bisection steps for a peer's knob: 1/256 of the range


def network_ms(model: nn.Module, shape: tuple[int, ...]) -> float:
    return measure_network(model, shape, LATENCY["backend"], LATENCY["threads"], LATENCY["batch"])


def dense_latency(results: Path, dense, shape: tuple[int, ...]) -> float:
    """The dense network's latency, measured once per results directory and dense checkpoint."""
    path = results / dense.arch / "dense-latency.json"
    here = cpu_name()
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("cpu", here) != here:  # budgets in ms mean nothing on another CPU
            raise SystemExit(
                f"{path} was measured on {kept['cpu']!r}, this is {here!r}: its cells' budgets do not hold here; "
                "pass another --results-dir"
            )
        if kept.get("dense_sha256") == dense.sha256 and kept.get("latency") == LATENCY:
            return float(kept["ms"])
    ms = network_ms(dense.build(), shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"dense_sha256": dense.sha256, "latency": LATENCY, "cpu": here, "ms": ms}
    path.write_text(json.dumps(doc, indent=1))
    return ms


def _budget(cell: Cell) -> float:
    if cell.latency_budget_ms is None:
        raise MethodUnavailable(f"method {cell.method!r} prunes to a latency budget: run it with --latency-shares")
    return cell.latency_budget_ms


def calibrate(prune: Callable[[float], nn.Module], shape: tuple[int, ...], budget: float) -> tuple[float, dict]:
    """The smallest knob whose one-shot pruned network (``prune(knob)``) measures at most ``budget``, by
    bisection on measured latency, and the trace of every measurement. The range searched is [0, hi], hi
    the last knob of 0.05, 0.10, ... 0.95 up to which the MACs never rise: past it a pruner leaves layers
    whole (Torch-Pruning skips a layer whose width rounded to ``round_to`` would be 0), so latency stops
    falling with the knob. Unreachable at hi: MethodUnavailable."""
    hi, last = 0.0, macs(prune(0.0), shape)
    for knob in [round(0.05 * i, 2) for i in range(1, 20)]:
        now = macs(prune(knob), shape)
        if now > last:
            break
        hi, last = knob, now
    lo = 0.0
    trace = [{"knob": hi, "ms": network_ms(prune(hi), shape)}]
    if trace[-1]["ms"] > budget:
        reached = trace[-1]["ms"]
        raise MethodUnavailable(f"budget {budget:.3f} ms unreachable: {reached:.3f} ms at the largest knob {hi}")
    for _ in range(ROUNDS):
        mid = (lo + hi) / 2
        trace.append({"knob": mid, "ms": network_ms(prune(mid), shape)})
        if trace[-1]["ms"] <= budget:
            hi = mid
        else:
            lo = mid
    return hi, {"range": [0.0, trace[0]["knob"]], "trace": trace}


@register_method(
    "dg2pf-latency",
    "DG2PFConfig(granularity='channel', latency_budget_ms=B): latency table, knapsack allocation per ranking, "
    "aim calibrated end to end; otherwise the defaults",
    kind="latency",
)
def dg2pf_latency(cell: Cell) -> Outcome:
    return _run(
        cell,
        {
            "granularity": "channel",
            "latency_budget_ms": _budget(cell),
            "latency_backend": LATENCY["backend"],
            "latency_threads": LATENCY["threads"],
            "latency_batch_size": LATENCY["batch"],
        },
    )


@register_method(
    "dg2pf-channel-at-latency",
    "DG2PFConfig(granularity='channel', sparsity=f): the global channel ranking, f bisected so the one-shot "
    "pruned dense network measures <= B; otherwise the defaults",
    kind="latency",
)
def dg2pf_channel_at_latency(cell: Cell) -> Outcome:
    budget, shape = _budget(cell), cell.split.input_shape
    dense = cell.dense.build().eval()
    plan = ChannelPlan.build(dense, shape)
    params = dict(dense.named_parameters())
    config = make_config(cell, {"granularity": "channel", "sparsity": 0.5})

    def prune(fraction: float) -> nn.Module:
        chosen = plan.select(params, fraction, config.layer_cap(fraction), config.channel_multiple)
        net = copy.deepcopy(dense)
        remove_channels(net, shape, plan.pruned_channels(chosen))
        return net

    fraction, calibration = calibrate(prune, shape, budget)
    if fraction == 0.0:
        raise MethodUnavailable(f"the dense network already measures within {budget:.3f} ms: nothing to prune")
    outcome = _run(cell, {"granularity": "channel", "sparsity": fraction})
    outcome.notes["calibration"] = {"channel_fraction": fraction, **calibration}
    return outcome


def _tp_pruner(model: nn.Module, shape: tuple[int, ...], ratio: float, steps: int):
    try:
        import torch_pruning as tp  # noqa: PLC0415
    except ImportError as exc:
        raise MethodUnavailable(f"torch-pruning is not installed ({exc})") from exc
    return tp.pruner.MagnitudePruner(
        model,
        torch.zeros((1, *shape)),
        importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=False,
        pruning_ratio=ratio,
        iterative_steps=steps,
        round_to=16,  # DG2PFConfig's default channel_multiple: the same width grid as the DG2PF cells
        ignored_layers=[_classifier(model)],
    )


@register_method(
    "tp-uniform-at-latency",
    "Torch-Pruning MagnitudePruner(MagnitudeImportance(p=2), global_pruning=False, pruning_ratio=r, "
    "iterative_steps=P, round_to=16): its progressive loop, an epoch after each step, then AdamW cross-entropy "
    "to E; r bisected so the one-shot pruned dense network measures <= B",
    kind="latency",
)
def tp_uniform_at_latency(cell: Cell) -> Outcome:
    budget, shape = _budget(cell), cell.split.input_shape

    def prune(ratio: float) -> nn.Module:
        net = cell.dense.build().eval()
        _tp_pruner(net, shape, ratio, 1).step()
        return net

    ratio, calibration = calibrate(prune, shape, budget)
    torch.manual_seed(cell.seed)
    model = cell.dense.build()
    pruner = _tp_pruner(model, shape, ratio, cell.budget.pruning_epochs)

    def step() -> None:
        model.eval()  # tracing and importance must not move BatchNorm statistics
        pruner.step()

    outcome = train_progressively(cell, model, [step] * cell.budget.pruning_epochs)
    outcome.notes["calibration"] = {"uniform_ratio": ratio, **calibration}
    return outcome
