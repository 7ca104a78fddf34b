"""Accuracy of DG2PF channel pruning on the digits example: does half the compute keep the accuracy?

The example checkpoint (``dg2pf example digits``: digits_cnn trained on scikit-learn's digits at
16x16, ``dg2pf_core.job.example.write_example`` with seed 0, unless ``--checkpoint`` gives one) is pruned
with ``granularity="channel"`` and ``target_macs_ratio`` 0.5 through the job path a user's
``dg2pf prune --granularity channel --target-macs-ratio 0.5`` takes (``dg2pf_core.job.prune_to_dir``:
preflight, DG2PF, physical removal, model files, ONNX export, metrics.json with its latency
section), once per seed, every other option at its default (10 pruning epochs, at most 60 in all,
patience 4). Each run's metrics.json gives the dense and pruned test top-1 (the same held-out test
split), the MACs and parameters of the smaller network, and the job's own latency measurement
(dense and pruned interleaved, PyTorch eager and ONNX Runtime, batch 1 and 32, within the job's
latency budget).

Target (issue 19): test top-1 within 1 point of the dense model at MACs 0.5.

The report goes to stdout and ``bench/results/bench_channel_digits.json``; unless ``--no-docs`` (or a
subset: ``--seeds``/``--macs-ratios`` other than the defaults, ``--quick``), the measured block of
docs/benchmarks.md section 12 (between its markers) is replaced.

    .venv/bin/python bench/bench_channel_digits.py [--seeds 0 1 2 3 4] [--macs-ratios 0.5] [--checkpoint PATH]
        [--threads N] [--quick] [--no-docs]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchreport import Contention, contention_line, environment, environment_lines, table, update_docs, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dg2pf_contract.artifacts import Artifacts  # noqa: E402
from dg2pf_core import DG2PFConfig  # noqa: E402
from dg2pf_core.job import PruneJob, prune_to_dir  # noqa: E402
from dg2pf_core.job.example import write_example  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SEEDS = (0, 1, 2, 3, 4)
MACS_RATIOS = (0.5,)
TARGET_POINTS = 1.0  # test top-1 within this many points of dense (issue 19)


def run_one(checkpoint: Path, ratio: float, seed: int, out: Path, quick: bool) -> dict:
    extra = {"pruning_epochs": 2, "max_epochs": 4} if quick else {}
    job = PruneJob(
        arch="digits_cnn",
        num_classes=10,
        checkpoint=str(checkpoint),
        dataset="digits",
        config=DG2PFConfig(granularity="channel", target_macs_ratio=ratio, seed=seed, **extra),
    )
    started = time.perf_counter()
    m = prune_to_dir(job, out)
    wall = time.perf_counter() - started
    backends = m.latency.backends if m.latency is not None else {}
    speedups = {
        f"{backend} b{batch}": cell.speedup
        for backend, by_batch in backends.items()
        for batch, cell in by_batch.items()
    }
    print(
        f"(macs {ratio:g} seed {seed}: test {m.baseline_test_top1:.2f} -> {m.test_top1:.2f}, "
        f"{m.epochs} epochs, {wall:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return {
        "macs_ratio_target": ratio,
        "seed": seed,
        "dense_test_top1": m.baseline_test_top1,
        "test_top1": m.test_top1,
        "dense_val_top1": m.baseline_val_top1,
        "val_top1": m.val_top1,
        "macs_ratio": m.macs_sparse / m.macs_dense,
        "params_ratio": m.params_ratio,
        "channel_sparsity": m.channel_sparsity,
        "epochs": m.epochs,
        "best_epoch": m.best_epoch,
        "final_phase": m.final_phase,
        "wall_seconds": wall,
        "latency_speedups": speedups,
        "latency_threads": m.latency.threads if m.latency else None,
        "latency_runs": {f"{b} b{n}": cell.runs for b, by in backends.items() for n, cell in by.items()},
    }


def report(runs: list[dict], example: dict, env: dict) -> str:
    lines = [
        "### bench_channel_digits: DG2PF channel pruning to a MACs ratio on the digits example, test top-1",
        "",
        environment_lines(env),
        contention_line(env["contention"]),
        f"- dense model: {example['what']}; test split {example['test_images']} images (one image = "
        f"{100 / example['test_images']:.2f} points)",
        "- each row: one `prune_to_dir` job (DG2PFConfig defaults but granularity, target_macs_ratio and seed); "
        "latency speed-ups = dense median / pruned median from the job's own metrics.json (dense and pruned "
        f"interleaved, torch and ONNX Runtime threads: {runs[0]['latency_threads']}, within the job's latency budget)",
        "",
    ]
    rows = []
    for r in runs:
        sp = r["latency_speedups"]
        rows.append(
            [
                f"{r['macs_ratio_target']:g}",
                r["seed"],
                f"{r['dense_test_top1']:.2f}",
                f"{r['test_top1']:.2f}",
                f"**{r['test_top1'] - r['dense_test_top1']:+.2f}**",
                f"{r['macs_ratio']:.3f}x",
                f"{r['params_ratio']:.3f}x",
                f"{r['channel_sparsity']:.3f}",
                f"{r['epochs']} (best {r['best_epoch']})",
                " / ".join(
                    f"{sp.get(k):.2f}x" if sp.get(k) else "-"
                    for k in ("onnxruntime b1", "onnxruntime b32", "torch b1", "torch b32")
                ),
                f"{r['wall_seconds']:.0f}",
            ]
        )
    lines.append(
        table(
            [
                "MACs target",
                "seed",
                "dense test top-1 %",
                "pruned test top-1 %",
                "Δ",
                "MACs kept",
                "params kept",
                "channels removed",
                "epochs",
                "speed-up ORT b1 / b32 / eager b1 / b32",
                "wall s",
            ],
            rows,
        )
    )
    lines.append("")
    for ratio in sorted({r["macs_ratio_target"] for r in runs}, reverse=True):
        rs = [r for r in runs if r["macs_ratio_target"] == ratio]
        deltas = [r["test_top1"] - r["dense_test_top1"] for r in rs]
        mean = statistics.fmean(deltas)
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        verdict = ("met" if mean >= -TARGET_POINTS else "NOT met") + (
            f" (every seed within {TARGET_POINTS:g})"
            if all(d >= -TARGET_POINTS for d in deltas)
            else f" (seeds below: {sum(d < -TARGET_POINTS for d in deltas)} of {len(deltas)})"
        )
        lines.append(
            f"- MACs {ratio:g}: test top-1 {statistics.fmean(r['test_top1'] for r in rs):.2f} ± "
            f"{statistics.stdev([r['test_top1'] for r in rs]) if len(rs) > 1 else 0.0:.2f} over {len(rs)} seeds "
            "vs dense "
            f"{rs[0]['dense_test_top1']:.2f}: Δ {mean:+.2f} ± {std:.2f} points; target (within {TARGET_POINTS:g} point "
            f"of dense): **{verdict}**"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, help=f"DG2PF seeds (default {list(SEEDS)})")
    parser.add_argument("--macs-ratios", nargs="+", type=float, help=f"default {list(MACS_RATIOS)}")
    parser.add_argument("--checkpoint", type=Path, help="a digits_cnn checkpoint (default: train the example, seed 0)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="one seed, 2 pruning epochs of 4; no docs update")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else list(SEEDS))
    ratios = args.macs_ratios or list(MACS_RATIOS)
    if any(not 0.0 < r < 1.0 for r in ratios):
        parser.error("--macs-ratios must be in (0, 1)")
    contention = Contention()
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-channel-digits-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            t0 = time.perf_counter()
            trained = write_example("digits", Path(tmp) / "example", seed=0)
            checkpoint = Artifacts(Path(tmp) / "example").model
            what = (
                f"the digits example (`dg2pf example digits`, seed 0: {trained.epochs} epochs, val "
                f"{trained.val_top1:.2f}%, test {trained.test_top1:.2f}%, trained in {time.perf_counter() - t0:.0f} s)"
            )
        else:
            what = f"`{checkpoint}`"
        for ratio in ratios:
            for seed in seeds:
                runs.append(run_one(checkpoint, ratio, seed, Path(tmp) / f"out-{ratio:g}-{seed}", args.quick))
    test_images = _test_images()
    env = environment()
    env["contention"] = contention.result()
    env["wall_s"] = time.perf_counter() - started
    block = report(runs, {"what": what, "test_images": test_images}, env)
    print(block)
    write_result("bench_channel_digits", {"environment": env, "runs": runs, "dense": what})
    subset = args.seeds is not None or args.macs_ratios is not None or args.checkpoint is not None
    if not (args.quick or args.no_docs or subset):
        update_docs(
            DOCS,
            "bench_channel_digits",
            "## 12. `bench_channel_digits`: accuracy of channel pruning at MACs 0.5, digits example",
            block,
        )
        print(f"(updated {DOCS.relative_to(ROOT)})", file=sys.stderr)


def _test_images() -> int:
    from dg2pf_core.job import load_data  # noqa: PLC0415
    from dg2pf_core.models import get_arch  # noqa: PLC0415

    splits, _ = load_data("digits", get_arch("digits_cnn"), 10, None, 0.1, 0)
    return len(splits.test)


if __name__ == "__main__":
    main()
