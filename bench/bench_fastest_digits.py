"""The fastest cifar/resnet18 within one point of dense on the digits: a max_top1_drop job end to end.

1. A dense cifar/resnet18 is trained on scikit-learn's digits at 32x32 (``pretrain``: Adam, cosine,
   best validation epoch kept; seed 0), written as a checkpoint.
2. The job: ``granularity channel``, ``max_top1_drop 1.0``, latency on ONNX Runtime with 1 thread at
   batch 32 (the issue's setting), ``samples`` latency budgets, each a DG2PF trial on Ray Tune
   (``dg2pf_ray.fastest.fastest_within``, what ``dg2pf prune --max-top1-drop 1.0`` runs).
3. Reported: the dense network's and the chosen network's latency (the driver's own measurement after
   the search, one network at a time), their ratio, validation and test top-1 of both, and every trial.

Command: ``.venv/bin/python bench/bench_fastest_digits.py [--samples 4] [--epochs 8] [--checkpoint FILE]
[--pruning-epochs 2] [--max-epochs 6] [--json FILE]``
(about half an hour on 2 cores; 25 min with
``--checkpoint`` and ``--samples 3``). Results: docs/benchmarks.md, "Latency budgets".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.io.export import write_model
from dg2pf_core.job.example import pretrain
from dg2pf_ray.cluster import connect
from dg2pf_ray.fastest import fastest_within
from dg2pf_ray.tune import TuneOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--checkpoint", help="a dense cifar/resnet18 trained on digits at 32x32 (skips step 1)")
    parser.add_argument("--pruning-epochs", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-fastest-"))
    t0 = time.perf_counter()
    checkpoint = args.checkpoint
    if checkpoint is None:
        model, dense = pretrain("cifar/resnet18", 10, "digits", epochs=args.epochs, lr=2e-3, image_size=32)
        checkpoint = str(work / "dense.safetensors")
        write_model(model, checkpoint)
        print(f"dense: val top-1 {dense.val_top1:.2f}, test top-1 {dense.test_top1:.2f}", flush=True)
    train_s = time.perf_counter() - t0
    config = DG2PFConfig(
        granularity="channel",
        max_top1_drop=1.0,
        latency_backend="onnxruntime",
        latency_threads=1,
        latency_batch_size=32,
        pruning_epochs=args.pruning_epochs,
        max_epochs=args.max_epochs,
        patience=2,
    )
    job = PruneJob("cifar/resnet18", 10, checkpoint, "digits", config, image_size=32)
    ray.shutdown()
    connect(None)
    try:
        t1 = time.perf_counter()
        m = fastest_within(job, work / "out", TuneOptions(samples=args.samples, storage_path=str(work / "store")))
        search_s = time.perf_counter() - t1
    finally:
        ray.shutdown()
    o = m.objective
    chosen = next(p for p in o.points if p.chosen)
    row = {
        "command": " ".join(sys.argv),
        "dense_train_s": round(train_s),
        "dense_test_top1": round(m.baseline_test_top1, 2),
        "search_s": round(search_s),
        "dense_ms": round(o.dense_measured_ms, 2),
        "chosen_ms": round(chosen.measured_ms, 2),
        "speedup": round(o.dense_measured_ms / chosen.measured_ms, 2),
        "baseline_val_top1": round(o.baseline_val_top1, 2),
        "chosen_val_top1": round(chosen.val_top1, 2),
        "chosen_test_top1": round(m.test_top1, 2),
        "met": o.met,
        "reason": o.reason,
        "trials": [p.model_dump() for p in o.points],
        "out": str(work / "out"),
    }
    print(json.dumps(row, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
