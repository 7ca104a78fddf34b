"""Global magnitude masks for torchvision ResNet-50 at 90% sparsity: dg2pf vs torch.nn.utils.prune.

``dg2pf_core.algorithm.masks.magnitude_masks(params, 0.9)`` against
``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=0.9)`` on the same
weights (every Conv/Linear ``weight``, ~25.5M), each on a fresh copy of the model; only the call is
timed, and torch's reparametrisation is removed afterwards. The two run interleaved (order
alternating), medians reported. Also checks both prune the same number of weights and, when the
threshold value is not tied, the same set. Target: dg2pf >= 5x faster. Also timed, in the same
rotation: dg2pf with the default layer collapse guard (the cap ``DG2PFConfig`` gives at 90%), which
is what a job computes each pruning epoch; no target, its cost over the plain ranking is reported.

    .venv/bin/python bench/bench_masks.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import torch
import torch.nn.utils.prune as prune
from benchreport import Contention, contention_line, environment, environment_lines, median, table, write_result

from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.algorithm.masks import count_pruned, magnitude_masks, select_prunable
from dg2pf_core.models import build_model

TARGET_SPEEDUP = 5.0
ARCH, NUM_CLASSES, SPARSITY = "torchvision/resnet50", 1000, 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat instead of 3")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of each call")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)

    torch.manual_seed(0)
    base = build_model(ARCH, NUM_CLASSES).eval()
    names = select_prunable(base).names()
    n_weights = select_prunable(base).numel

    def dg2pf_call(model) -> dict[str, torch.Tensor]:
        return magnitude_masks(select_prunable(model).params, SPARSITY)

    cap = DG2PFConfig(sparsity=SPARSITY).layer_cap(SPARSITY)

    def guard_call(model) -> dict[str, torch.Tensor]:
        return magnitude_masks(select_prunable(model).params, SPARSITY, max_layer_sparsity=cap)

    def torch_call(model) -> None:
        # Same tensors as select_prunable picks, in the same order.
        parameters = [(model.get_submodule(n.rsplit(".", 1)[0]), "weight") for n in names]
        prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=SPARSITY)

    # One untimed call each: one-time costs (thread pool start-up, first touch of the allocator's
    # pages) belong to the process, not to a mask computation; in a run masks are recomputed once
    # per pruning epoch in a long-lived process.
    contention = Contention()
    for call in (dg2pf_call, guard_call, torch_call):
        call(copy.deepcopy(base))

    times: dict[str, list[float]] = {"dg2pf": [], "guard": [], "torch": []}
    checks: list[dict] = []
    for i in range(repeats):
        order = ["dg2pf", "guard", "torch"] if i % 2 == 0 else ["torch", "guard", "dg2pf"]
        ours = theirs = None
        for variant in order:
            model = copy.deepcopy(base)  # fresh copy, not timed
            gc.collect()
            t0 = time.perf_counter()
            if variant == "dg2pf":
                ours = dg2pf_call(model)
                times[variant].append(time.perf_counter() - t0)
            elif variant == "guard":
                guarded = guard_call(model)
                times[variant].append(time.perf_counter() - t0)
                assert count_pruned(guarded) == round(SPARSITY * n_weights)
                del guarded
            else:
                torch_call(model)
                times[variant].append(time.perf_counter() - t0)
                # torch's weight_mask is 1 for kept weights; dg2pf's mask is True for pruned ones.
                theirs = {n: model.get_submodule(n.rsplit(".", 1)[0]).weight_mask == 0 for n in names}
                for n in names:
                    prune.remove(model.get_submodule(n.rsplit(".", 1)[0]), "weight")
            del model
        checks.append(compare(base, names, ours, theirs))
        del ours, theirs

    med = {k: median(v) for k, v in times.items()}
    speedup = med["torch"] / med["dg2pf"]
    pair_speedups = [t / d for d, t in zip(times["dg2pf"], times["torch"])]
    met = speedup >= TARGET_SPEEDUP
    check = checks[0]
    same_count_all = all(c["same_count"] for c in checks)
    same_set_all = all(c["same_set"] for c in checks)

    env = environment()
    env["contention"] = contention.result()
    print(f"## bench_masks: global magnitude masks, {ARCH} ({n_weights:,} prunable weights), sparsity {SPARSITY}")
    print()
    print(environment_lines(env))
    print(contention_line(env["contention"]))
    print(
        f"- 1 untimed warm-up call each, then {repeats} timed repeats, interleaved (order alternating), "
        "each call on a fresh deepcopy of the model"
    )
    print()
    print(
        table(
            ["method", "median s", "min s", "max s", "repeats"],
            [
                ["dg2pf `magnitude_masks`", med["dg2pf"], min(times["dg2pf"]), max(times["dg2pf"]), repeats],
                [
                    "torch `prune.global_unstructured` (L1Unstructured)",
                    med["torch"],
                    min(times["torch"]),
                    max(times["torch"]),
                    repeats,
                ],
                [
                    f"dg2pf `magnitude_masks` with the layer collapse guard (cap {cap:.2f})",
                    med["guard"],
                    min(times["guard"]),
                    max(times["guard"]),
                    repeats,
                ],
            ],
        )
    )
    print()
    print(
        table(
            ["", "value"],
            [
                ["speedup (ratio of medians, torch / dg2pf)", f"{speedup:.2f}x"],
                ["median of per-repeat speedups", f"{median(pair_speedups):.2f}x"],
                ["ratio of minima (least-disturbed calls)", f"{min(times['torch']) / min(times['dg2pf']):.2f}x"],
                ["target", f">= {TARGET_SPEEDUP:g}x"],
                ["verdict", "met" if met else "NOT met"],
                [
                    "layer collapse guard's cost (ratio of medians, guard / plain dg2pf)",
                    f"{med['guard'] / med['dg2pf']:.2f}x",
                ],
            ],
        )
    )
    print()
    print("### Do both prune the same weights?")
    print()
    print(
        table(
            ["check", "result"],
            [
                ["weights pruned by dg2pf", f"{check['dg2pf_pruned']:,}"],
                ["weights pruned by torch", f"{check['torch_pruned']:,}"],
                ["expected round(0.9 x N)", f"{check['expected']:,}"],
                ["same number (every repeat)", "yes" if same_count_all else "NO"],
                ["weights whose magnitude equals the threshold", f"{check['at_threshold']:,}"],
                ["same set (every repeat)", "yes" if same_set_all else f"NO ({check['differing']:,} positions differ)"],
            ],
        )
    )
    if check["at_threshold"] > 1 and not same_set_all:
        print()
        print("The threshold value is tied, so the two may legitimately pick different weights among the ties.")

    profile_text = None
    if args.profile:
        profile_text = profile(base, dg2pf_call, torch_call, names)
        print()
        print(profile_text)

    path = write_result(
        "bench_masks",
        {
            "benchmark": "bench_masks",
            "environment": env,
            "config": {
                "arch": ARCH,
                "num_classes": NUM_CLASSES,
                "sparsity": SPARSITY,
                "guard_cap": cap,
                "warmup": 1,
                "repeats": repeats,
                "prunable_weights": n_weights,
            },
            "seconds": times,
            "median_seconds": med,
            "speedup_ratio_of_medians": speedup,
            "median_pair_speedup": median(pair_speedups),
            "speedup_ratio_of_minima": min(times["torch"]) / min(times["dg2pf"]),
            "checks": checks,
            "target_speedup": TARGET_SPEEDUP,
            "met": met,
            "profile": profile_text,
        },
    )
    print()
    print(f"JSON: {path}")


def profile(base, dg2pf_call, torch_call, names) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    for label, call in (("dg2pf magnitude_masks", dg2pf_call), ("torch global_unstructured", torch_call)):
        model = copy.deepcopy(base)
        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call(model)
        out.append(f"### torch.profiler, {label}, top 12 ops by self CPU time\n")
        out.append("```\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12) + "\n```")
        del model
    return "\n".join(out)


def compare(base, names, ours, theirs) -> dict:
    params = select_prunable(base).params
    flat = torch.cat([params[n].detach().abs().flatten() for n in names])
    k = round(SPARSITY * flat.numel())
    threshold = torch.kthvalue(flat, k).values
    differing = sum(int((ours[n] != theirs[n]).sum()) for n in names)
    dg, tv = count_pruned(ours), count_pruned(theirs)
    return {
        "dg2pf_pruned": dg,
        "torch_pruned": tv,
        "expected": k,
        "same_count": dg == tv == k,
        "threshold": float(threshold),
        "at_threshold": int((flat == threshold).sum()),
        "differing": differing,
        "same_set": differing == 0,
    }


if __name__ == "__main__":
    main()
