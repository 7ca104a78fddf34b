"""Inference latency on the CPU, dense vs pruned (90% unstructured; channel-pruned to a MACs ratio).

Does pruning make a model faster? Dense vs 90% unstructured, and dense vs channel pruning
(``granularity="channel"``) to a MACs ratio.

Models: torchvision resnet18 and mobilenet_v2 at 32x32 (10 classes, the CIFAR setting) and at
224x224 (1000 classes, the ImageNet setting), and resnet50 (224x224 for the unstructured part, both
sizes for the channel part). The dense model is random-initialised with trained-looking BatchNorm
statistics (seed 0); no training is needed to time a model, only its shapes (and, for the
unstructured part, its zeros) matter.

- *Unstructured* (section 10 of docs/benchmarks.md): the same weights with global magnitude masks at
  90% applied (``dg2pf_core.algorithm.masks.magnitude_masks``: the zeros a DG2PF run at 90% has, up to which
  weights they are). Dense kernels do the same work whatever the values.
- *Channel* (section 11): the smaller dense networks DG2PF's channel granularity leaves at
  ``target_macs_ratio`` 0.5 and 0.25: the channel fraction ``ChannelPlan.fit_macs`` finds under
  ``DG2PFConfig``'s default layer collapse guard and ``channel_multiple`` (kept widths rounded up to
  multiples of 16), the globally least important channel groups (``ChannelPlan.select``,
  root-mean-square magnitude) removed through Torch-Pruning's dependency graph
  (``Structure`` + ``apply_structure``, what every reader of a channel-pruned artifact replays). This
  is DG2PF's last ranking on these weights without the training before it: the layer shapes, and so
  the latency, are what a job at that ratio produces from such weights (trained weights rank the
  layers differently, so a real job's shapes, not its MACs ratio, may differ).

All models are timed with ``dg2pf_core.io.latency`` (what every job's metrics.json holds): the models of
one case interleaved in this process (dense and every pruned variant, one run of each per round, the
order rotating), PyTorch eager and ONNX Runtime (CPU provider, each model exported with
``dg2pf_core.io.onnx_export``, the job's exporter), batch 1 and 32, medians and p90s, with torch and ONNX
Runtime set to the same thread count (default: torch's).

Runs per cell (unstructured): 30 at batch 1 and at 32x32; at 224x224 batch 32, 10 (resnet50: 6).
Channel cells: 30 everywhere (``--runs`` to change). The counts are in the tables.

The reports go to stdout and ``bench/results/bench_latency.json`` (``bench_latency_channel.json``);
a full run of a part (no subset options, not ``--quick``, not ``--no-docs``) replaces its measured
block in docs/benchmarks.md (between its markers).

    .venv/bin/python bench/bench_latency.py [--part channel|unstructured|all] [--quick] [--no-docs]
        [--threads N] [--models resnet18 ...] [--sizes 32 224] [--batches 1 32] [--macs-ratios 0.5 0.25]
        [--runs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchreport import Contention, contention_line, environment, environment_lines, table, update_docs, write_result
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dg2pf_core import DG2PFConfig  # noqa: E402
from dg2pf_core.algorithm.channels import ChannelPlan, Structure, apply_structure  # noqa: E402
from dg2pf_core.algorithm.heads import HEADS_SUFFIX  # noqa: E402
from dg2pf_core.algorithm.masks import apply_masks_, magnitude_masks, select_prunable  # noqa: E402
from dg2pf_core.io.latency import measure_latency  # noqa: E402
from dg2pf_core.io.metrics import conv_linear_macs  # noqa: E402
from dg2pf_core.io.onnx_export import export_onnx  # noqa: E402
from dg2pf_core.models import build_model  # noqa: E402

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
# The channel part: every (arch, size) below at each MACs ratio, batch 1 and 32, 30 runs per cell.
CHANNEL_ARCHS = ("resnet18", "mobilenet_v2", "resnet50")
CHANNEL_SIZES = (32, 224)
MACS_RATIOS = (0.5, 0.25)
BATCHES = (1, 32)
CHANNEL_RUNS = 30
CLASSES = {32: 10, 224: 1000}
# Issue 19's target: at MACs 0.5, resnet50 at 224x224, batch 32 on ONNX Runtime runs in <= 0.6x the dense time.
TARGET = {"arch": "resnet50", "size": 224, "batch": 32, "backend": "onnxruntime", "ratio": 0.5, "latency_ratio": 0.6}


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


def export_all(
    models: dict[str, nn.Module], shape: tuple[int, int, int], tmp: Path, case: str
) -> tuple[dict[str, Path], dict[str, float]]:
    """Each model exported to ``tmp/<name>.onnx`` by the job's exporter (checked against PyTorch's
    logits): the files and the export seconds by name; exits naming ``case`` when one is refused."""
    files, seconds = {}, {}
    for name, model in models.items():
        report = export_onnx(model, shape, tmp / f"{name}.onnx", what=f"{case} ({name})")
        seconds[name] = report.seconds
        if not report.written:
            raise SystemExit(f"{case}: {report.reason}")
        files[name] = tmp / f"{name}.onnx"
    return files, seconds


def measure_case(arch: str, size: int, classes: int, runs: dict[int, int], tmp: Path) -> dict:
    dense, pruned = dense_and_pruned(arch, classes)
    shape = (3, size, size)
    macs_dense, macs_sparse = conv_linear_macs(pruned, shape, torch.device("cpu"))
    files, export_s = export_all({"dense": dense, "pruned": pruned}, shape, tmp, f"{arch} at {size}")
    cells = []
    for batch, n in runs.items():
        report = measure_latency(
            {"dense": dense, "pruned": pruned}, shape, onnx=files, batch_sizes=(batch,), runs=n, warmup=WARMUP
        )
        for backend, by_batch in report.timings.items():
            d, p = by_batch[batch]["dense"], by_batch[batch]["pruned"]
            cells.append(
                {
                    "backend": backend,
                    "batch": batch,
                    "runs": p.runs,
                    "dense_ms": d.median_ms,
                    "pruned_ms": p.median_ms,
                    "dense_p90_ms": d.p90_ms,
                    "pruned_p90_ms": p.p90_ms,
                    "speedup": d.median_ms / p.median_ms,
                }
            )
        print(
            f"({arch} {size} batch {batch}: {[(c['backend'], round(c['speedup'], 3)) for c in cells[-2:]]})",
            file=sys.stderr,
            flush=True,
        )
    return {
        "arch": arch,
        "image_size": size,
        "classes": classes,
        "macs_dense": macs_dense,
        "macs_sparse": macs_sparse,
        "macs_ratio": macs_sparse / macs_dense,
        "export_seconds": export_s,
        "cells": cells,
        "threads": report.threads,
    }


def channel_pruned(
    dense: nn.Module, arch: str, classes: int, shape: tuple[int, int, int], ratio: float, multiple: int | None = None
) -> tuple[nn.Module, dict]:
    """The smaller dense network DG2PF's channel granularity leaves at ``target_macs_ratio=ratio`` from
    ``dense``'s weights (its last ranking, under the default layer collapse guard), and how it was cut:
    kept widths rounded to ``DG2PFConfig.channel_multiple`` (``multiple`` overrides it; 1: not rounded),
    or the smaller multiple ``ChannelPlan.fit_macs`` falls back to when the MACs target needs it."""
    config = DG2PFConfig(
        granularity="channel", target_macs_ratio=ratio, **({"channel_multiple": multiple} if multiple else {})
    )
    plan = ChannelPlan.build(dense, shape, config.selection())
    params = dict(dense.named_parameters())
    fraction, _, used = plan.fit_macs(params, ratio, config.layer_cap, config.channel_multiple)
    selected = plan.select(params, fraction, config.layer_cap(fraction), used)
    stage = plan.pruned_channels(selected)
    pruned = trained_looking(build_model(arch, classes))
    pruned.load_state_dict(dense.state_dict())
    apply_structure(pruned, Structure(shape).then(stage))
    return pruned.eval(), {
        "channel_fraction": sum(map(len, stage.values())) / plan.channels,
        "channels_total": plan.channels,
        "groups": len(plan.groups),
        "skipped_groups": list(plan.skipped),
        "channel_multiple": used,
        "heads_total": sum(g.channels for g in plan.groups if g.root.endswith(HEADS_SUFFIX)),
        "heads_removed": sum(len(v) for k, v in stage.items() if k.endswith(HEADS_SUFFIX)),
    }


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_channel_case(
    arch: str, size: int, ratios: list[float], batches: list[int], runs: int, tmp: Path, round_to: int | None = None
) -> dict:
    """Dense and its channel-pruned variants (DG2PF's default channel_multiple; with ``round_to``, also
    variants at that channel_multiple), all timed interleaved in one ``measure_latency`` call per batch size."""
    classes, shape, cpu = CLASSES[size], (3, size, size), torch.device("cpu")
    torch.manual_seed(0)
    dense = trained_looking(build_model(f"torchvision/{arch}", classes))
    macs_dense, _ = conv_linear_macs(dense, shape, cpu)
    models, variants = {"dense": dense}, {}
    for ratio, multiple in [(r, m) for r in ratios for m in ((None, round_to) if round_to else (None,))]:
        name = f"macs{ratio:g}" + (f"-r{multiple}" if multiple else "")
        started = time.perf_counter()
        models[name], info = channel_pruned(dense, f"torchvision/{arch}", classes, shape, ratio, multiple)
        macs, _ = conv_linear_macs(models[name], shape, cpu)
        variants[name] = {
            "target_macs_ratio": ratio,
            "round_to": multiple,
            "macs_ratio": macs / macs_dense,  # round_to: not the default
            "params_ratio": _params(models[name]) / _params(dense),
            "prune_seconds": time.perf_counter() - started,
            **info,
        }
    files, export_s = export_all(models, shape, tmp, f"{arch} at {size}")
    cells = []
    for batch in batches:
        report = measure_latency(models, shape, onnx=files, batch_sizes=(batch,), runs=runs, warmup=WARMUP)
        for backend, by_batch in report.timings.items():
            timings = by_batch[batch]
            d = timings["dense"]
            for name in variants:
                p = timings[name]
                cells.append(
                    {
                        "backend": backend,
                        "batch": batch,
                        "variant": name,
                        "runs": p.runs,
                        "dense_runs": d.runs,
                        "dense_ms": d.median_ms,
                        "pruned_ms": p.median_ms,
                        "dense_p90_ms": d.p90_ms,
                        "pruned_p90_ms": p.p90_ms,
                        "speedup": d.median_ms / p.median_ms,
                        "latency_ratio": p.median_ms / d.median_ms,
                    }
                )
        print(
            f"({arch} {size} batch {batch}: "
            + ", ".join(
                f"{c['backend']} {c['variant']} {c['latency_ratio']:.3f}x" for c in cells if c["batch"] == batch
            )
            + " of dense latency)",
            file=sys.stderr,
            flush=True,
        )
    return {
        "arch": arch,
        "image_size": size,
        "classes": classes,
        "macs_dense": macs_dense,
        "params_dense": _params(dense),
        "variants": variants,
        "export_seconds": export_s,
        "cells": cells,
        "threads": report.threads,
    }


def channel_report(results: list[dict], env: dict, runs: int) -> str:
    lines = [
        "### bench_latency: dense vs channel-pruned (DG2PF channel granularity at a MACs ratio), PyTorch eager and "
        "ONNX Runtime, CPU",
        "",
        environment_lines(env),
        contention_line(env["contention"]),
        f"- torch intra-op threads = ONNX Runtime intra_op_num_threads = {results[0]['threads']} (inter-op 1, no "
        f"spin-wait); {WARMUP} warm-up rounds per cell, then {runs} timed rounds, the dense model and its pruned "
        "variants interleaved in one process; latency ratio = pruned median / dense median (below 1: the pruned "
        "model is faster), speed-up = its inverse; MACs ratio = Conv/Linear multiply-accumulates of the pruned network "
        "/ the dense one's, measured on the pruned network",
        "",
    ]
    rows = []
    for r in results:
        for c in r["cells"]:
            v = r["variants"][c["variant"]]
            rows.append(
                [
                    r["arch"] + f" (channel_multiple {v['channel_multiple']})",
                    f"{r['image_size']}x{r['image_size']}",
                    c["batch"],
                    c["backend"],
                    c["runs"],
                    f"{v['macs_ratio']:.3f}x",
                    f"{v['params_ratio']:.3f}x",
                    f"{c['dense_ms']:.2f}",
                    f"{c['pruned_ms']:.2f}",
                    f"{c['dense_p90_ms']:.2f}",
                    f"{c['pruned_p90_ms']:.2f}",
                    f"**{c['latency_ratio']:.3f}x**",
                    f"{c['speedup']:.2f}x",
                ]
            )
    lines.append(
        table(
            [
                "model",
                "input",
                "batch",
                "backend",
                "runs",
                "MACs pruned / dense",
                "params pruned / dense",
                "dense median ms",
                "pruned median ms",
                "dense p90 ms",
                "pruned p90 ms",
                "latency pruned / dense",
                "speed-up",
            ],
            rows,
        )
    )
    lines.append("")
    for target in sorted({v["target_macs_ratio"] for r in results for v in r["variants"].values()}, reverse=True):
        for backend in ("onnxruntime", "torch"):
            picked = [
                (r, c)
                for r in results
                for c in r["cells"]
                if c["backend"] == backend
                and r["variants"][c["variant"]]["target_macs_ratio"] == target
                and not r["variants"][c["variant"]].get("round_to")
            ]
            if picked:
                ratios = sorted(c["latency_ratio"] for _, c in picked)
                macs = [r["variants"][c["variant"]]["macs_ratio"] for r, c in picked]
                lines.append(
                    f"- MACs {target:g} ({min(macs):.3f}-{max(macs):.3f}x), {backend}: latency {ratios[0]:.3f}x to "
                    f"{ratios[-1]:.3f}x of dense over {len(ratios)} cells (median {ratios[len(ratios) // 2]:.3f}x)"
                )
    hit = [
        (r, c)
        for r in results
        for c in r["cells"]
        if r["arch"] == TARGET["arch"]
        and r["image_size"] == TARGET["size"]
        and c["batch"] == TARGET["batch"]
        and c["backend"] == TARGET["backend"]
        and r["variants"][c["variant"]]["target_macs_ratio"] == TARGET["ratio"]
    ]
    for r, c in hit:
        met = "met" if c["latency_ratio"] <= TARGET["latency_ratio"] else "NOT met"
        met += f", channel_multiple {r['variants'][c['variant']]['channel_multiple']}"
        lines.append(
            f"- target (issue 19: {TARGET['arch']} at {TARGET['size']}x{TARGET['size']}, batch {TARGET['batch']}, "
            f"{TARGET['backend']}, MACs {TARGET['ratio']:g}: latency <= {TARGET['latency_ratio']:g}x dense): "
            f"**{c['latency_ratio']:.3f}x, {met}**"
        )
    lines.append(
        "- channels removed (fraction of the prunable channels) for the MACs ratio: "
        + "; ".join(
            f"{r['arch']}@{r['image_size']} "
            + " / ".join(
                f"{name.removeprefix('macs')}: {v['channel_fraction']:.3f}" for name, v in r["variants"].items()
            )
            for r in results
        )
    )
    lines.append(
        "- export to ONNX (s, dense / "
        + " / ".join(results[0]["variants"])
        + "): "
        + "; ".join(
            f"{r['arch']}@{r['image_size']} " + " / ".join(f"{s:.1f}" for s in r["export_seconds"].values())
            for r in results
        )
    )
    return "\n".join(lines)


def report(results: list[dict], env: dict) -> str:
    lines = [
        f"### bench_latency: dense vs {SPARSITY:.0%} unstructured (global magnitude), "
        "PyTorch eager and ONNX Runtime, CPU",
        "",
        environment_lines(env),
        contention_line(env["contention"]),
        f"- torch intra-op threads = ONNX Runtime intra_op_num_threads = {results[0]['threads']} (inter-op 1, no "
        f"spin-wait); {WARMUP} warm-up rounds per cell, then the runs below, dense and pruned interleaved; "
        "speed-up = dense median / pruned median (above 1: the pruned model is faster)",
        "",
    ]
    rows = []
    for r in results:
        for c in r["cells"]:
            rows.append(
                [
                    r["arch"].removeprefix("torchvision/"),
                    f"{r['image_size']}x{r['image_size']}",
                    c["batch"],
                    c["backend"],
                    c["runs"],
                    f"{c['dense_ms']:.2f}",
                    f"{c['pruned_ms']:.2f}",
                    f"{c['dense_p90_ms']:.2f}",
                    f"{c['pruned_p90_ms']:.2f}",
                    f"**{c['speedup']:.3f}x**",
                    f"{r['macs_ratio']:.3f}x",
                ]
            )
    lines.append(
        table(
            [
                "model",
                "input",
                "batch",
                "backend",
                "runs",
                "dense median ms",
                "pruned median ms",
                "dense p90 ms",
                "pruned p90 ms",
                "speed-up",
                "MACs pruned / dense",
            ],
            rows,
        )
    )
    speedups = [c["speedup"] for r in results for c in r["cells"]]
    ort = [(r, c) for r in results for c in r["cells"] if c["backend"] == "onnxruntime"]
    torch_ = {
        (r["arch"], r["image_size"], c["batch"]): c["dense_ms"]
        for r in results
        for c in r["cells"]
        if c["backend"] == "torch"
    }
    ort_vs_torch = [torch_[(r["arch"], r["image_size"], c["batch"])] / c["dense_ms"] for r, c in ort]
    lines += [
        "",
        f"- speed-up over all {len(speedups)} cells: {min(speedups):.3f}x to {max(speedups):.3f}x "
        f"(median {sorted(speedups)[len(speedups) // 2]:.3f}x), at {min(r['macs_ratio'] for r in results):.3f}x-"
        f"{max(r['macs_ratio'] for r in results):.3f}x the MACs",
        f"- ONNX Runtime vs PyTorch eager, dense models: {min(ort_vs_torch):.2f}x to {max(ort_vs_torch):.2f}x as fast",
        "- export to ONNX (s, dense / pruned): "
        + "; ".join(
            f"{r['arch'].removeprefix('torchvision/')}@{r['image_size']} {r['export_seconds']['dense']:.1f} / "
            f"{r['export_seconds']['pruned']:.1f}"
            for r in results
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=("unstructured", "channel", "all"),
        default="channel",
        help="which comparison to run: dense vs 90%% unstructured (section 10), dense vs channel-pruned "
        "(section 11, the default), or both one after the other",
    )
    parser.add_argument("--quick", action="store_true", help="32x32 cases only, 5 runs; no docs update")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    parser.add_argument(
        "--models", nargs="+", choices=CHANNEL_ARCHS, help="only these torchvision models (a subset: no docs update)"
    )
    parser.add_argument("--sizes", nargs="+", type=int, choices=CHANNEL_SIZES, help="only these input sizes (a subset)")
    parser.add_argument(
        "--batches", nargs="+", type=int, help=f"only these batch sizes (default {list(BATCHES)}; a subset)"
    )
    parser.add_argument(
        "--macs-ratios",
        nargs="+",
        type=float,
        help=f"channel part: MACs ratios (default {list(MACS_RATIOS)}; a subset)",
    )
    parser.add_argument("--runs", type=int, help="timed rounds per cell instead of the defaults (no docs update)")
    parser.add_argument(
        "--round-to",
        type=int,
        help="channel part: also time variants with channel_multiple N (kept widths "
        "rounded up to multiples of N; 1: not rounded) beside DG2PF's default "
        "(no docs update)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runs is not None and args.runs < 2:
        parser.error("--runs must be >= 2")
    if any(not 0.0 < r < 1.0 for r in args.macs_ratios or ()):
        parser.error("--macs-ratios must be in (0, 1)")
    if args.round_to is not None and args.round_to < 1:
        parser.error("--round-to must be >= 1")
    subset = any(
        v is not None for v in (args.models, args.sizes, args.batches, args.macs_ratios, args.runs, args.round_to)
    )
    archs = args.models or (["resnet18", "mobilenet_v2"] if args.quick else list(CHANNEL_ARCHS))
    sizes = args.sizes or ([32] if args.quick else list(CHANNEL_SIZES))
    batches = args.batches or list(BATCHES)
    docs = not (args.quick or args.no_docs or subset)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        if args.part in ("unstructured", "all"):
            default_runs = 5 if args.quick else None
            cases = [
                (a, s, k, {b: args.runs or default_runs or n for b, n in r.items() if b in batches})
                for a, s, k, r in CASES
                if a.removeprefix("torchvision/") in archs and s in sizes
            ]
            run_unstructured([c for c in cases if c[3]], Path(tmp), docs)
        if args.part in ("channel", "all"):
            runs = args.runs or (5 if args.quick else CHANNEL_RUNS)
            run_channel(
                [(a, s) for s in sizes for a in archs],
                list(args.macs_ratios or MACS_RATIOS),
                batches,
                runs,
                Path(tmp),
                docs,
                args.round_to,
            )


def run_unstructured(cases: list, tmp: Path, docs: bool) -> None:
    if not cases:
        print("(unstructured: no case matches the selection)", file=sys.stderr)
        return
    contention = Contention()
    started = time.perf_counter()
    results = [measure_case(arch, size, classes, runs, tmp) for arch, size, classes, runs in cases]
    env = environment()
    env["contention"] = contention.result()
    env["wall_s"] = time.perf_counter() - started
    block = report(results, env)
    print(block)
    write_result("bench_latency", {"environment": env, "sparsity": SPARSITY, "results": results})
    if docs:
        update_docs(
            DOCS, "bench_latency", "## 10. `bench_latency`: inference latency, dense vs 90% unstructured", block
        )
        print(f"(updated {DOCS.relative_to(ROOT)})", file=sys.stderr)


def run_channel(
    cases: list[tuple[str, int]],
    ratios: list[float],
    batches: list[int],
    runs: int,
    tmp: Path,
    docs: bool,
    round_to: int | None = None,
) -> None:
    contention = Contention()
    started = time.perf_counter()
    results = [measure_channel_case(arch, size, ratios, batches, runs, tmp, round_to) for arch, size in cases]
    env = environment()
    env["contention"] = contention.result()
    env["wall_s"] = time.perf_counter() - started
    block = channel_report(results, env, runs)
    print(block)
    write_result("bench_latency_channel", {"environment": env, "target": TARGET, "results": results})
    if docs:
        update_docs(
            DOCS,
            "bench_latency_channel",
            "## 11. `bench_latency` (channel): inference latency, dense vs channel-pruned to a MACs ratio",
            block,
        )
        print(f"(updated {DOCS.relative_to(ROOT)})", file=sys.stderr)


if __name__ == "__main__":
    main()
