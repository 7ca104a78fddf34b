"""One DG2PF training step vs one plain training step, same model and batch.

Plain step: zero_grad, cross-entropy forward, backward, AdamW step.
DG2PF step: ``simulated_step`` (recovery="frozen", grad clipping 0.5) around a loss made of a frozen
teacher's forward under no_grad, the student's forward and ``kd_loss``; 50% magnitude masks.

The two steps are timed interleaved (the order alternates every pair) on one model, so drift in the
machine's speed hits both alike; the headline is the ratio of the medians. A separate instrumented
pass times the DG2PF step's parts (teacher forward, mask backup/apply/restore, ...) to explain the
ratio. Target: DG2PF step <= 1.45x the plain step.

    .venv/bin/python bench/bench_step.py [--quick] [--device cuda [--amp bf16]] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from benchreport import Contention, contention_line, environment, environment_lines, median, table, write_result

import dg2pf_core.algorithm.simulated as simulated
from dg2pf_core.algorithm.distillation import kd_loss
from dg2pf_core.algorithm.masks import magnitude_masks, select_prunable
from dg2pf_core.io.metrics import autocast_context
from dg2pf_core.models import build_model

TARGET_RATIO = 1.45
ARCH, NUM_CLASSES, BATCH, SPARSITY, CLIP_NORM = "cifar/resnet18", 10, 64, 0.5, 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps each instead of 8")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype (cuda only)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops per step")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    if args.amp != "none" and device.type != "cuda":
        parser.error("--amp bf16 needs --device cuda (autocast is only used on cuda in dg2pf)")
    steps = args.steps or (3 if args.quick else 8)
    warmup = 2

    torch.manual_seed(0)
    model = build_model(ARCH, NUM_CLASSES).to(device).train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), device=device)
    all_params = [p for p in model.parameters() if p.requires_grad]
    params = select_prunable(model).params
    masks = magnitude_masks(params, SPARSITY)
    plain_opt = torch.optim.AdamW(all_params, lr=1e-4)
    dg2pf_opt = torch.optim.AdamW(all_params, lr=1e-4)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def amp():
        return autocast_context(device, args.amp)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        with amp():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        plain_opt.step()

    def compute_loss() -> torch.Tensor:
        with torch.no_grad(), amp():
            teacher_logits = teacher(x)
        with amp():
            student_logits = model(x)
        return kd_loss(student_logits, teacher_logits, y)

    def dg2pf_step() -> None:
        simulated.simulated_step(
            compute_loss, dg2pf_opt, params, masks, recovery="frozen", clip_params=all_params, clip_norm=CLIP_NORM
        )

    def timed(fn: Callable[[], None]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    contention = Contention()
    for _ in range(warmup):
        plain_step()
        dg2pf_step()
    sync()

    # Headline: interleaved, alternating which variant goes first.
    times: dict[str, list[float]] = {"plain": [], "dg2pf": []}
    pair_ratios: list[float] = []
    for i in range(steps):
        order = [("plain", plain_step), ("dg2pf", dg2pf_step)]
        if i % 2:
            order.reverse()
        pair = {name: timed(fn) for name, fn in order}
        for name, t in pair.items():
            times[name].append(t)
        pair_ratios.append(pair["dg2pf"] / pair["plain"])
    plain_med, dg2pf_med = median(times["plain"]), median(times["dg2pf"])
    ratio = dg2pf_med / plain_med

    headline_contention = contention.result()

    # Breakdown: the same steps with each part timed (synchronised), in a separate pass so the
    # timers' own cost stays out of the headline.
    contention = Contention()
    parts, shares = breakdown(steps, sync, timed, plain_step, dg2pf_step, plain_opt, dg2pf_opt, teacher, model)
    breakdown_contention = contention.result()

    env = environment(device)
    env["contention"] = {"headline": headline_contention, "breakdown": breakdown_contention}
    met = ratio <= TARGET_RATIO
    headline = table(
        ["variant", "median s/step", "min s/step", "max s/step", "steps"],
        [
            [name, median(ts), min(ts), max(ts), len(ts)]
            for name, ts in (("plain (CE + AdamW)", times["plain"]), ("DG2PF simulated_step", times["dg2pf"]))
        ],
    )
    ratio_rows = [
        ["ratio of medians (DG2PF / plain)", f"{ratio:.3f}x"],
        ["median of per-pair ratios", f"{median(pair_ratios):.3f}x"],
        ["ratio of minima (least-disturbed steps)", f"{min(times['dg2pf']) / min(times['plain']):.3f}x"],
        ["target", f"<= {TARGET_RATIO}x"],
        ["verdict", "met" if met else "NOT met"],
    ]
    dg_total = parts["dg2pf"]["total"]
    pl_total = parts["plain"]["total"]
    part_rows = [
        [label, f"{parts['dg2pf'][key] * 1e3:.1f}", f"{100 * shares['dg2pf'][key]:.1f}%"] for key, label in DG2PF_PARTS
    ]
    part_rows.append(["**whole DG2PF step**", f"{dg_total * 1e3:.1f}", "100%"])
    part_rows.append(["(whole plain step, same pass)", f"{pl_total * 1e3:.1f}", f"ratio {dg_total / pl_total:.3f}x"])
    teacher_share, mask_share = shares["dg2pf"]["teacher"], shares["dg2pf"]["mask_total"]
    mask_ms = parts["dg2pf"]["mask_total"] * 1e3
    plain_rows = [
        [label, f"{parts['plain'][key] * 1e3:.1f}", f"{100 * shares['plain'][key]:.1f}%"] for key, label in PLAIN_PARTS
    ]
    plain_rows.append(["**whole plain step**", f"{pl_total * 1e3:.1f}", "100%"])

    print(
        f"## bench_step: {ARCH}, batch {BATCH}, {device.type}"
        + (f", autocast {args.amp}" if args.amp != "none" else "")
    )
    print()
    print(environment_lines(env))
    print(contention_line(headline_contention).replace("- other", "- headline steps: other"))
    print(contention_line(breakdown_contention).replace("- other", "- breakdown steps: other"))
    print(f"- {warmup} warm-up steps each, then {steps} timed steps each, interleaved (order alternating)")
    print()
    print(headline)
    print()
    print(table(["", "value"], ratio_rows))
    print()
    print(f"### Where the DG2PF step's time goes ({steps} instrumented steps: median ms, median share of its own step)")
    print()
    print(table(["part", "ms", "share of DG2PF step"], part_rows))
    print()
    print(
        f"Teacher forward: {100 * teacher_share:.1f}% of the DG2PF step; "
        f"mask backup + apply + masked-grad zeroing + restore: {100 * mask_share:.1f}% ({mask_ms:.1f} ms)."
    )
    print()
    print("Plain step, same instrumentation:")
    print()
    print(table(["part", "ms", "share of plain step"], plain_rows))

    profile_text = None
    if args.profile:
        profile_text = profile(plain_step, dg2pf_step, sync, device)
        print()
        print(profile_text)

    path = write_result(
        "bench_step",
        {
            "benchmark": "bench_step",
            "environment": env,
            "config": {
                "arch": ARCH,
                "num_classes": NUM_CLASSES,
                "batch": BATCH,
                "sparsity": SPARSITY,
                "clip_norm": CLIP_NORM,
                "recovery": "frozen",
                "amp": args.amp,
                "warmup": warmup,
                "steps": steps,
            },
            "seconds": times,
            "median_seconds": {"plain": plain_med, "dg2pf": dg2pf_med},
            "ratio_of_medians": ratio,
            "median_pair_ratio": median(pair_ratios),
            "ratio_of_minima": min(times["dg2pf"]) / min(times["plain"]),
            "breakdown_median_seconds": parts,
            "breakdown_median_share": shares,
            "share_of_dg2pf_step": {"teacher_forward": teacher_share, "mask_backup_apply_restore": mask_share},
            "target_ratio": TARGET_RATIO,
            "met": met,
            "profile": profile_text,
        },
    )
    print()
    print(f"JSON: {path}")


DG2PF_PARTS = (
    ("backup", "mask backup (`_backup`, masked_select)"),
    ("apply", "apply masks (`apply_masks_`)"),
    ("zero_grad", "optimizer.zero_grad"),
    ("teacher", "teacher forward (no_grad, eval)"),
    ("student", "student forward + kd_loss"),
    ("backward", "backward"),
    ("zero_grads", "zero masked grads (`zero_masked_grads_`)"),
    ("clip", "clip_grad_norm_ (all params)"),
    ("step", "AdamW step"),
    ("restore", "mask restore (`_restore`, masked_scatter_)"),
    ("other", "unaccounted (Python glue)"),
)
MASK_PARTS = ("backup", "apply", "zero_grads", "restore")
PLAIN_PARTS = (
    ("zero_grad", "optimizer.zero_grad"),
    ("forward", "forward + cross-entropy"),
    ("backward", "backward"),
    ("step", "AdamW step"),
    ("other", "unaccounted (Python glue)"),
)


def breakdown(steps, sync, timed, plain_step, dg2pf_step, plain_opt, dg2pf_opt, teacher, model):
    """Median seconds and median share of the step per part, by wrapping the functions ``simulated_step``
    looks up at call time."""
    acc: dict[str, float] = defaultdict(float)

    def wrap(key: str, fn: Callable) -> Callable:
        def timed_call(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            acc[key] += time.perf_counter() - t0
            return out

        return timed_call

    patches = [
        (simulated, "_backup", "backup"),
        (simulated, "apply_masks_", "apply"),
        (simulated, "zero_masked_grads_", "zero_grads"),
        (simulated, "_restore", "restore"),
        (torch.nn.utils, "clip_grad_norm_", "clip"),
        (torch.Tensor, "backward", "backward"),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    instance_patches = [
        (dg2pf_opt, "step", "step"),
        (dg2pf_opt, "zero_grad", "zero_grad"),
        (plain_opt, "step", "step"),
        (plain_opt, "zero_grad", "zero_grad"),
        (teacher, "forward", "teacher"),
    ]
    student_forward = model.forward
    results: dict[str, dict[str, list[float]]] = {"plain": defaultdict(list), "dg2pf": defaultdict(list)}
    try:
        for obj, name, key in patches:
            setattr(obj, name, wrap(key, getattr(obj, name)))
        for obj, name, key in instance_patches:
            setattr(obj, name, wrap(key, getattr(obj, name)))
        for i in range(steps):
            order = [("plain", plain_step), ("dg2pf", dg2pf_step)]
            if i % 2:
                order.reverse()
            for variant, fn in order:
                acc.clear()
                # The student forward is only separable from the loss by timing it; in the DG2PF
                # step it is "student forward + kd_loss" = compute_loss minus the teacher.
                model.forward = wrap("forward", student_forward)
                total = timed(fn)
                del model.forward
                parts = dict(acc)
                r = results[variant]
                r["total"].append(total)
                if variant == "plain":
                    accounted = sum(parts.get(k, 0.0) for k in ("zero_grad", "forward", "backward", "step"))
                    for k in ("zero_grad", "forward", "backward", "step"):
                        r[k].append(parts.get(k, 0.0))
                else:
                    # kd_loss is tiny next to the forward; folded into "student".
                    parts["student"] = parts.pop("forward", 0.0)
                    keys = [k for k, _ in DG2PF_PARTS if k != "other"]
                    accounted = sum(parts.get(k, 0.0) for k in keys)
                    for k in keys:
                        r[k].append(parts.get(k, 0.0))
                r["other"].append(total - accounted)
                if variant == "dg2pf":
                    r["mask_total"].append(sum(parts.get(k, 0.0) for k in MASK_PARTS))
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        for obj, name, _ in instance_patches:
            delattr(obj, name)
        if "forward" in model.__dict__:
            del model.forward
    # Shares are taken within each step, then the median over steps: a step slowed down by another
    # process slows all its parts alike, so its shares stay meaningful while its milliseconds do not.
    # (Medians of the parts need not add up to exactly 100%.)
    seconds = {variant: {k: median(v) for k, v in r.items()} for variant, r in results.items()}
    shares = {
        variant: {k: median([t / total for t, total in zip(v, r["total"])]) for k, v in r.items()}
        for variant, r in results.items()
    }
    return seconds, shares


def profile(plain_step, dg2pf_step, sync, device) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for name, fn in (("plain", plain_step), ("dg2pf", dg2pf_step)):
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                fn()
            sync()
        out.append(f"### torch.profiler, {name} step (2 steps), top 15 ops by self time\n")
        out.append("```\n" + prof.key_averages().table(sort_by=sort, row_limit=15) + "\n```")
    return "\n".join(out)


if __name__ == "__main__":
    main()
