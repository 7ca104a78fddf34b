"""Inference latency, dense vs 90% unstructured: does magnitude pruning make a model faster on the CPU?

For torchvision resnet18 and mobilenet_v2 at 32x32 (10 classes, the CIFAR setting) and 224x224 (1000
classes, the ImageNet setting) and resnet50 at 224x224: a random-initialised model with
trained-looking BatchNorm statistics (seed 0) is the dense model; the pruned model is the same
weights with global magnitude masks at 90% applied (``dg2pf_core.masks.magnitude_masks``: the same
zeros a DG2PF run at 90% has, up to which weights they are; no training is needed to time them, since
dense kernels do the same work whatever the values). Both are timed with ``dg2pf_core.latency`` —
what every job's metrics.json holds — interleaved in this process, PyTorch eager and ONNX Runtime
(CPU provider, the model exported with ``dg2pf_core.onnx_export``, the job's exporter), batch 1 and
32, medians and p90s, with torch and ONNX Runtime set to the same thread count (default: torch's).

Runs per cell: 30 at batch 1 and at 32x32; at 224x224 batch 32, 10 (resnet50: 6), so the full run
stays under ~10 minutes on 2 cores; the counts are in the table.

The report goes to stdout and ``bench/results/bench_latency.json``; unless ``--no-docs`` (or
``--quick``), the measured block of docs/benchmarks.md section 10 (between its markers) is replaced.

    .venv/bin/python bench/bench_latency.py [--quick] [--no-docs] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchreport import Contention, contention_line, environment, environment_lines, table, update_docs, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dg2pf_core.latency import measure_latency  # noqa: E402
from dg2pf_core.masks import apply_masks_, magnitude_masks, select_prunable  # noqa: E402
from dg2pf_core.metrics import conv_linear_macs  # noqa: E402
from dg2pf_core.models import build_model  # noqa: E402
from dg2pf_core.onnx_export import export_onnx  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SPARSITY = 0.9
# (arch, image size, classes, {batch: runs}); the quick variant divides the runs and keeps the small inputs
CASES = [
    ("torchvision/resnet18", 32, 10, {1: 30, 32: 30}),
    ("torchvision/mobilenet_v2", 32, 10, {1: 30, 32: 30}),
    ("torchvision/resnet18", 224, 1000, {1: 30, 32: 10}),
    ("torchvision/mobilenet_v2", 224, 1000, {1: 30, 32: 10}),
    ("torchvision/resnet50", 224, 1000, {1: 30, 32: 6}),
]
WARMUP = 3


def trained_looking(model: nn.Module) -> nn.Module:
    """BatchNorm statistics away from their 0/1 defaults, as a trained model has them."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def dense_and_pruned(arch: str, classes: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = trained_looking(build_model(arch, classes))
    pruned = trained_looking(build_model(arch, classes))
    pruned.load_state_dict(dense.state_dict())
    params = select_prunable(pruned).params
    apply_masks_(params, magnitude_masks(params, SPARSITY))
    return dense, pruned


def measure_case(arch: str, size: int, classes: int, runs: dict[int, int], tmp: Path) -> dict:
    dense, pruned = dense_and_pruned(arch, classes)
    shape = (3, size, size)
    macs_dense, macs_sparse = conv_linear_macs(pruned, shape, torch.device("cpu"))
    files, export_s = {}, {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        report = export_onnx(model, shape, tmp / f"{name}.onnx", what=f"{arch} ({name})")
        export_s[name] = report.seconds
        if not report.written:
            raise SystemExit(f"{arch} at {size}: {report.reason}")
        files[name] = tmp / f"{name}.onnx"
    cells = []
    for batch, n in runs.items():
        report = measure_latency({"dense": dense, "pruned": pruned}, shape, onnx=files, batch_sizes=(batch,), runs=n,
                                 warmup=WARMUP)
        for backend, by_batch in report.timings.items():
            d, p = by_batch[batch]["dense"], by_batch[batch]["pruned"]
            cells.append({"backend": backend, "batch": batch, "runs": p.runs, "dense_ms": d.median_ms, "pruned_ms": p.median_ms,
                          "dense_p90_ms": d.p90_ms, "pruned_p90_ms": p.p90_ms, "speedup": d.median_ms / p.median_ms})
        print(f"({arch} {size} batch {batch}: {[(c['backend'], round(c['speedup'], 3)) for c in cells[-2:]]})",
              file=sys.stderr, flush=True)
    return {"arch": arch, "image_size": size, "classes": classes, "macs_dense": macs_dense, "macs_sparse": macs_sparse,
            "macs_ratio": macs_sparse / macs_dense, "export_seconds": export_s, "cells": cells,
            "threads": report.threads}


def report(results: list[dict], env: dict) -> str:
    lines = [f"### bench_latency: dense vs {SPARSITY:.0%} unstructured (global magnitude), PyTorch eager and ONNX Runtime, CPU",
             "", environment_lines(env), contention_line(env["contention"]),
             f"- torch intra-op threads = ONNX Runtime intra_op_num_threads = {results[0]['threads']} (inter-op 1, no "
             f"spin-wait); {WARMUP} warm-up rounds per cell, then the runs below, dense and pruned interleaved; "
             "speed-up = dense median / pruned median (above 1: the pruned model is faster)", ""]
    rows = []
    for r in results:
        for c in r["cells"]:
            rows.append([r["arch"].removeprefix("torchvision/"), f"{r['image_size']}x{r['image_size']}", c["batch"], c["backend"],
                         c["runs"], f"{c['dense_ms']:.2f}", f"{c['pruned_ms']:.2f}", f"{c['dense_p90_ms']:.2f}",
                         f"{c['pruned_p90_ms']:.2f}", f"**{c['speedup']:.3f}x**", f"{r['macs_ratio']:.3f}x"])
    lines.append(table(["model", "input", "batch", "backend", "runs", "dense median ms", "pruned median ms", "dense p90 ms",
                        "pruned p90 ms", "speed-up", "MACs pruned / dense"], rows))
    speedups = [c["speedup"] for r in results for c in r["cells"]]
    ort = [(r, c) for r in results for c in r["cells"] if c["backend"] == "onnxruntime"]
    torch_ = {(r["arch"], r["image_size"], c["batch"]): c["dense_ms"] for r in results for c in r["cells"] if c["backend"] == "torch"}
    ort_vs_torch = [torch_[(r["arch"], r["image_size"], c["batch"])] / c["dense_ms"] for r, c in ort]
    lines += ["", f"- speed-up over all {len(speedups)} cells: {min(speedups):.3f}x to {max(speedups):.3f}x "
              f"(median {sorted(speedups)[len(speedups) // 2]:.3f}x), at {min(r['macs_ratio'] for r in results):.3f}x-"
              f"{max(r['macs_ratio'] for r in results):.3f}x the MACs",
              f"- ONNX Runtime vs PyTorch eager, dense models: {min(ort_vs_torch):.2f}x to {max(ort_vs_torch):.2f}x as fast",
              "- export to ONNX (s, dense / pruned): " + "; ".join(
                  f"{r['arch'].removeprefix('torchvision/')}@{r['image_size']} {r['export_seconds']['dense']:.1f} / "
                  f"{r['export_seconds']['pruned']:.1f}" for r in results)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32x32 cases only, 5 runs; no docs update")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(a, s, k, {b: 5 for b in r}) for a, s, k, r in CASES if s == 32] if args.quick else CASES
    contention = Contention()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        for arch, size, classes, runs in cases:
            results.append(measure_case(arch, size, classes, runs, Path(tmp)))
    env = environment()
    env["contention"] = contention.result()
    env["wall_s"] = time.perf_counter() - started
    block = report(results, env)
    print(block)
    write_result("bench_latency", {"environment": env, "sparsity": SPARSITY, "results": results})
    if not (args.quick or args.no_docs):
        update_docs(DOCS, "bench_latency", '## 10. `bench_latency`: inference latency, dense vs 90% unstructured', block)
        print(f"(updated {DOCS.relative_to(ROOT)})", file=sys.stderr)


if __name__ == "__main__":
    main()
