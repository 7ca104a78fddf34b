"""The same small DG2PF job in one process, on Ray Train with 1 worker and with 2 workers (CPU, gloo).

Job: ``digits_cnn`` pre-trained on scikit-learn's digits (``dg2pf example digits``), pruned to 90%
with ``DG2PFConfig(sparsity=0.9, pruning_epochs=3, max_epochs=6, patience=100)``, so every run does
exactly 6 training epochs (3 gradual pruning + 3 distillation; checked). Three variants:

- ``single``: ``dg2pf_core.job.prune_to_dir(job, out)`` in this process;
- ``ray1``: ``dg2pf_ray.train.prune_on_ray(job, out, RayOptions(workers=1))``;
- ``ray2``: the same with ``RayOptions(workers=2)`` (2 DDP ranks, gloo).

Ray is started once (``dg2pf_ray.cluster.connect(None)``, timed apart) before the first Ray run, as a
private local instance: ``RAY_TMPDIR`` points at a fresh directory and ``RAY_ADDRESS`` is dropped, so
``ray.init()`` cannot join a cluster someone else started on this machine with ``ray start`` (it
would otherwise, through ``/tmp/ray/ray_current_cluster``), and the CPU time of Ray's processes
(children of this driver) is counted as ours, not as other processes'.
The runs go interleaved (single, ray1, ray2, single, ray1, ray2, ...), medians reported. Per run:
end-to-end wall seconds on the driver (the call, including Ray worker start-up, per-epoch
checkpoints and the final copy), training seconds (sum of ``history[i]["seconds"]`` for epochs >= 1:
the loop's own epoch time, i.e. masks + training steps + validation of each epoch) and training
samples/s = training samples per epoch (1293) x 6 / training seconds.

    .venv/bin/python bench/bench_ray_train.py [--quick] [--example DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchreport import (
    ProcessTreeContention,
    contention_line,
    environment,
    environment_lines,
    median,
    table,
    write_result,
)

EPOCHS = 6
VARIANTS = ("single", "ray1", "ray2")
LABELS = {
    "single": "single process (`prune_to_dir`)",
    "ray1": "Ray Train, 1 worker",
    "ray2": "Ray Train, 2 workers (DDP, gloo)",
}


def make_example(root: Path) -> Path:
    out = root / "ex"
    dg2pf = Path(sys.executable).with_name("dg2pf")
    subprocess.run([str(dg2pf), "example", "digits", "--out", str(out), "--quiet"], check=True)
    return out


def ray_worker_threads() -> dict:
    """What a Ray task holding 1 CPU (as each Ray Train worker does by default) sees: Ray sets
    OMP_NUM_THREADS to the task's CPU count when the driver has not set it."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> dict:
        import torch

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    return ray.get(probe.remote())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat instead of 2")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--example", type=Path, default=None, help="a `dg2pf example digits` output dir to reuse")
    parser.add_argument("--keep", action="store_true", help="keep the outputs and Ray storage (temp dir)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)

    # A private Ray instance (see the docstring); set before ray is imported. A short path: Ray's
    # unix socket paths live under it.
    ray_tmp = tempfile.mkdtemp(prefix="brt-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    if os.environ.pop("RAY_ADDRESS", None):
        print("(RAY_ADDRESS ignored: this benchmark always starts its own local Ray)", file=sys.stderr)

    import ray

    from dg2pf_contract.artifacts import Artifacts
    from dg2pf_core import DG2PFConfig, PruneJob
    from dg2pf_core.job import load_data, prune_to_dir
    from dg2pf_core.models import get_arch
    from dg2pf_ray.cluster import connect
    from dg2pf_ray.train import RayOptions, prune_on_ray

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_train-"))
    example = args.example
    example_made = example is None
    if example is None:
        t0 = time.perf_counter()
        example = make_example(tmp)
        print(f"(made the pre-trained example in {time.perf_counter() - t0:.0f} s: {example})", file=sys.stderr)
    checkpoint = Artifacts(example).model
    if not checkpoint.exists():
        parser.error(f"{checkpoint} does not exist; pass the --out dir of `dg2pf example digits`")

    def job() -> PruneJob:
        config = DG2PFConfig(sparsity=0.9, pruning_epochs=3, max_epochs=EPOCHS, patience=100)
        return PruneJob("digits_cnn", 10, str(checkpoint), "digits", config)

    splits, _ = load_data("digits", get_arch("digits_cnn"), 10, None, job().val_fraction, job().config.seed)
    train_samples = len(splits.train)
    batch = job().config.batch_size
    stepped = (train_samples // batch) * batch  # drop_last; the same 1280 for 1 and 2 ranks (2 x 20 x 32)

    contention = ProcessTreeContention()
    t0 = time.perf_counter()
    connect(None)
    ray_start_s = time.perf_counter() - t0
    worker_threads = ray_worker_threads()
    storage = tmp / "ray-storage"

    def run(variant: str, i: int) -> dict:
        out = tmp / f"out-{variant}-{i}"
        c = ProcessTreeContention()
        t0 = time.perf_counter()
        if variant == "single":
            m = prune_to_dir(job(), out)
        else:
            workers = 1 if variant == "ray1" else 2
            m = prune_on_ray(
                job(),
                out,
                RayOptions(workers=workers, storage_path=str(storage), run_name=f"bench-{variant}-{i}", verbose=False),
            )
        wall = time.perf_counter() - t0
        cont = c.result()
        epochs = [h for h in m.history if h.epoch >= 1]
        if m.epochs != EPOCHS or len(epochs) != EPOCHS:
            raise SystemExit(
                f"{variant}: expected {EPOCHS} training epochs, got metrics epochs={m.epochs}, "
                f"history {[h.epoch for h in epochs]}"
            )
        if any(h.restarts for h in m.history):
            raise SystemExit(f"{variant}: the run restarted, its timings are not comparable")
        train_s = sum(h.seconds for h in epochs)
        return {
            "variant": variant,
            "repeat": i,
            "world_size": m.world_size,
            "wall_s": wall,
            "train_s": train_s,
            "non_train_s": wall - train_s,
            # Ray runs: the worker's own wall time, from after its job preparation to the end of the
            # loop (metrics["wall_seconds"]); the rest of end-to-end is Ray's per-run start-up and
            # teardown, the driver's own checks and the final copy.
            "worker_wall_s": m.wall_seconds if variant != "single" else None,
            "samples_per_s": train_samples * EPOCHS / train_s,
            "epoch_seconds": [h.seconds for h in epochs],
            "baseline_eval_s": next((h.seconds for h in m.history if h.epoch == 0), None),
            "phases": [h.phase for h in epochs],
            "sparsity_prunable": m.sparsity_prunable,
            "val_top1": m.val_top1,
            "test_top1": m.test_top1,
            "contention": cont,
        }

    runs: list[dict] = []
    try:
        for i in range(repeats):
            for variant in VARIANTS:
                r = run(variant, i)
                runs.append(r)
                print(
                    f"({variant} #{i}: wall {r['wall_s']:.1f} s, training {r['train_s']:.1f} s, "
                    f"other processes {100 * r['contention']['other_share']:.0f}%)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(ray_tmp, ignore_errors=True)
        else:
            print(f"(kept {tmp} and {ray_tmp})", file=sys.stderr)

    env = environment()
    env["contention"] = contention.result()
    env["ray"] = ray.__version__
    env["ray_worker_probe"] = worker_threads

    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    med = {
        v: {k: median([r[k] for r in by[v]]) for k in ("wall_s", "train_s", "non_train_s", "samples_per_s")}
        for v in VARIANTS
    }
    ratios = {
        "samples_per_s_ray2_over_ray1": med["ray2"]["samples_per_s"] / med["ray1"]["samples_per_s"],
        "train_s_ray1_over_single": med["ray1"]["train_s"] / med["single"]["train_s"],
        "train_s_ray2_over_single": med["ray2"]["train_s"] / med["single"]["train_s"],
        "ray1_e2e_overhead_s": med["ray1"]["wall_s"] - med["single"]["wall_s"],
        "ray2_e2e_overhead_s": med["ray2"]["wall_s"] - med["single"]["wall_s"],
        "ray1_fixed_overhead_s": med["ray1"]["non_train_s"] - med["single"]["non_train_s"],
        "ray2_fixed_overhead_s": med["ray2"]["non_train_s"] - med["single"]["non_train_s"],
    }
    worst = max(r["contention"]["other_share"] for r in runs)

    print(f"## bench_ray_train: DG2PF digits_cnn on digits, 90% sparsity, {EPOCHS} epochs: one process vs Ray Train")
    print()
    print(environment_lines(env))
    print(
        f"- Ray {ray.__version__}, private local instance started once in {ray_start_s:.1f} s "
        "(not in any figure below); "
        f"a 1-CPU Ray task sees OMP_NUM_THREADS={worker_threads['OMP_NUM_THREADS']}, "
        f"torch {worker_threads['torch_threads']} intra-op thread(s)"
    )
    print(contention_line(env["contention"]) + " (CPU of Ray's processes counts as ours)")
    print(f"- worst single run: other processes {100 * worst:.0f}% of the machine")
    print(
        f"- {repeats} repeat(s) of each variant, interleaved ({', '.join(VARIANTS)}, ...), medians; "
        f"{train_samples} training samples per epoch "
        f"({stepped} stepped on per epoch by every variant: drop_last, batch {batch})"
    )
    print()
    print(
        table(
            [
                "variant",
                "end-to-end s",
                "training s (6 epochs)",
                "rest s",
                "train samples/s",
                "runs: end-to-end s",
                "runs: training s",
            ],
            [
                [
                    LABELS[v],
                    med[v]["wall_s"],
                    med[v]["train_s"],
                    med[v]["non_train_s"],
                    med[v]["samples_per_s"],
                    " / ".join(f"{r['wall_s']:.1f}" for r in by[v]),
                    " / ".join(f"{r['train_s']:.1f}" for r in by[v]),
                ]
                for v in VARIANTS
            ],
        )
    )
    print()
    print(
        table(
            ["", "value"],
            [
                ["samples/s, 2 workers / 1 worker", f"{ratios['samples_per_s_ray2_over_ray1']:.2f}x"],
                ["training s, Ray Train 1 worker / single process", f"{ratios['train_s_ray1_over_single']:.2f}x"],
                ["training s, Ray Train 2 workers / single process", f"{ratios['train_s_ray2_over_single']:.2f}x"],
                [
                    "Ray end-to-end overhead, 1 worker (end-to-end s minus single process)",
                    f"{ratios['ray1_e2e_overhead_s']:+.1f} s",
                ],
                [
                    "of which outside the training epochs (rest s minus single process)",
                    f"{ratios['ray1_fixed_overhead_s']:+.1f} s",
                ],
                [
                    "Ray end-to-end overhead, 2 workers (end-to-end s minus single process)",
                    f"{ratios['ray2_e2e_overhead_s']:+.1f} s",
                ],
                ["of which outside the training epochs", f"{ratios['ray2_fixed_overhead_s']:+.1f} s"],
            ],
        )
    )
    print()
    print(
        "Training s = sum of the loop's per-epoch `seconds` (epochs 1-6: mask computation, training steps, "
        "validation); rest s = end-to-end minus training (job preparation, baseline + test evaluation, "
        "Ray worker start-up, per-epoch checkpoints, artifacts)."
    )
    print()
    print("Where the Ray runs' rest goes (medians):")
    print()
    rows = []
    for v in ("ray1", "ray2"):
        outside = median([r["wall_s"] - r["worker_wall_s"] for r in by[v]])
        inside = median([r["worker_wall_s"] - r["train_s"] for r in by[v]])
        rows.append([LABELS[v], outside, inside])
    print(
        table(
            [
                "variant",
                "outside the worker's run s (driver checks, Ray run + worker start-up, process group, "
                "job preparation on the worker, final report + checkpoint, teardown, final copy)",
                "inside the worker's run, outside the epochs s (DDP wrap, baseline + test evaluation, "
                "7 per-epoch reports with checkpoints, metrics)",
            ],
            rows,
        )
    )
    print()
    print(
        table(
            ["run", "variant", "end-to-end s", "training s", "samples/s", "val top-1", "sparsity", "other processes"],
            [
                [
                    f"{r['repeat']}",
                    r["variant"],
                    r["wall_s"],
                    r["train_s"],
                    r["samples_per_s"],
                    r["val_top1"],
                    f"{r['sparsity_prunable']:.4f}",
                    f"{100 * r['contention']['other_share']:.0f}%",
                ]
                for r in runs
            ],
        )
    )

    path = write_result(
        "bench_ray_train",
        {
            "benchmark": "bench_ray_train",
            "environment": env,
            "config": {
                "arch": "digits_cnn",
                "dataset": "digits",
                "sparsity": 0.9,
                "pruning_epochs": 3,
                "max_epochs": EPOCHS,
                "patience": 100,
                "batch_size": batch,
                "train_samples_per_epoch": train_samples,
                "stepped_samples_per_epoch": stepped,
                "repeats": repeats,
                "order": list(VARIANTS),
                "example": str(example),
                "example_made_by_script": example_made,
            },
            "ray_start_s": ray_start_s,
            "runs": runs,
            "medians": med,
            "ratios": ratios,
        },
    )
    print()
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
