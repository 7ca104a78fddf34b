"""Pruning to a latency budget: how well the per-layer latency table predicts, and what its allocation
buys against the global channel ranking (docs/benchmarks.md, section "Latency budgets").

For each architecture (random-initialised, trained-looking BatchNorm statistics, seed 0; the shapes
decide latency, not the values) and batch size: the job's latency table is measured
(``LatencyTarget.prepare``, as a ``latency_budget_ms`` job does: ONNX Runtime, 1 thread), then for budgets
of 0.8, 0.6 and 0.4 of the dense network's measured latency

- the allocation (``allocate``: per layer, the channels worth the most for the time they cost) at the
  budget itself is removed and the network measured end to end (``uncalibrated``: the table alone);
- then as a job does: the aim calibrated end to end (``LatencyTarget.calibrate``, up to 4 rounds), the
  allocation at the aim removed and measured again (a fresh measurement, not the calibration's);
- the global ranking (``ChannelPlan.select``, what ``sparsity`` and ``target_macs_ratio`` jobs use)
  removing the same number of channels is measured too: the latency the same channel count gives when
  the choice ignores latency.

No training: this measures the latency side only (which widths, how fast). Whether the allocation's
choice keeps accuracy as well as the global ranking's at the same latency needs trained runs: not
measured here. Command: ``.venv/bin/python bench/bench_latency_budget.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
from bench_latency import trained_looking

from dg2pf_core import DG2PFConfig
from dg2pf_core.algorithm.allocation import allocate
from dg2pf_core.algorithm.channels import ChannelPlan, remove_channels
from dg2pf_core.algorithm.latency_table import measure_network
from dg2pf_core.algorithm.latency_target import LatencyTarget
from dg2pf_core.models import build_model

CASES = [("cifar/resnet18", (3, 32, 32)), ("torchvision/mobilenet_v2", (3, 64, 64))]
BATCHES = (1, 32)
SHARES = (0.8, 0.6, 0.4)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for arch, shape in CASES:
        model = trained_looking(build_model(arch, 10)).eval()
        plan = ChannelPlan.build(model, shape)
        params = dict(model.named_parameters())
        for batch in BATCHES:
            cfg = DG2PFConfig(
                granularity="channel", latency_budget_ms=1e6, latency_backend="onnxruntime", latency_batch_size=batch
            )
            t0 = time.perf_counter()
            table = LatencyTarget.prepare(model, shape, plan, params, cfg).table
            build_s = time.perf_counter() - t0
            dense = table.dense_measured_ms
            for share in SHARES:
                budget = share * dense
                a = allocate(plan, params, table, budget, cfg.layer_cap, cfg.channel_multiple)
                net = copy.deepcopy(model)
                remove_channels(net, shape, plan.pruned_channels(a.pruned))
                uncalibrated = measure_network(net, shape, "onnxruntime", 1, batch)
                target = LatencyTarget(table, budget, plan, cfg.layer_cap)
                target.multiple = cfg.channel_multiple
                t1 = time.perf_counter()
                target.calibrate(model, shape, params)
                calibrate_s = time.perf_counter() - t1
                a = allocate(plan, params, table, target.aim_ms, cfg.layer_cap, cfg.channel_multiple)
                net = copy.deepcopy(model)
                remove_channels(net, shape, plan.pruned_channels(a.pruned))
                measured = measure_network(net, shape, "onnxruntime", 1, batch)
                frac = a.channels_pruned / plan.channels
                ranked = plan.select(params, frac, cfg.layer_cap(frac), cfg.channel_multiple)
                glob = copy.deepcopy(model)
                remove_channels(glob, shape, plan.pruned_channels(ranked))
                global_ms = measure_network(glob, shape, "onnxruntime", 1, batch)
                row = {
                    "arch": arch,
                    "input": "x".join(map(str, shape[1:])),
                    "batch": batch,
                    "table_s": round(build_s, 1),
                    "dense_ms": round(dense, 3),
                    "budget_ms": round(budget, 3),
                    "uncalibrated_measured_ms": round(uncalibrated, 3),
                    "uncalibrated_met": uncalibrated <= budget,
                    "calibration_rounds": len(target.calibration),
                    "calibrate_s": round(calibrate_s, 1),
                    "aim_ms": round(target.aim_ms, 3),
                    "predicted_ms": round(a.predicted_ms, 3),
                    "measured_ms": round(measured, 3),
                    "met": measured <= budget,
                    "measured_over_budget": round(measured / budget, 3),
                    "channels_pruned": f"{a.channels_pruned}/{plan.channels}",
                    "global_same_channels_ms": round(global_ms, 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    json.dump(rows, sys.stdout if len(sys.argv) < 2 else open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
