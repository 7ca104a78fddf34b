"""Fine-tuning methods side by side: DG2PF's SGD fine-tuning vs linear over-parameterized fine-tuning
with similarity-preserving distillation, on the real digits data at 90% and 95% sparsity.

Every run starts from the same pre-trained digits example and has the same schedule; only ``finetune``
differs (``sgd`` or ``overparam``, defaults otherwise: expansion 4, sp_weight 3000). Per sparsity and
mode, over ``--seeds`` seeds (the seed drives shuffling, the order of batches and the chains' initial
bases): test top-1 (mean, spread = max - min, sample std), the fine-tuning phase's epochs and
seconds per epoch, and the mode's time ratio. Runs are interleaved (sgd, overparam per seed) so
machine noise hits both alike.

    .venv/bin/python bench/bench_overparam.py [--seeds 3] [--pruning-epochs 8] [--max-epochs 30] [--patience 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchreport import Contention, contention_line, environment, environment_lines, table, write_result

from dg2pf_contract.artifacts import Artifacts
from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.job import prune_to_dir
from dg2pf_core.job.example import write_example

MODES = ("sgd", "overparam")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--pruning-epochs", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=3)
    args = parser.parse_args()

    contention = Contention()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        example = Path(tmp) / "example"
        base = write_example("digits", example)
        print(f"pre-trained digits example: test top-1 {base.test_top1:.2f}%", flush=True)
        for sparsity in args.sparsities:
            for seed in range(args.seeds):
                for mode in MODES:
                    config = DG2PFConfig(
                        sparsity=sparsity,
                        pruning_epochs=args.pruning_epochs,
                        max_epochs=args.max_epochs,
                        patience=args.patience,
                        seed=seed,
                        finetune=mode,
                        device="cpu",
                    )
                    job = PruneJob("digits_cnn", 10, str(Artifacts(example).model), "digits", config)
                    started = time.perf_counter()
                    m = prune_to_dir(job, Path(tmp) / f"{sparsity}-{seed}-{mode}")
                    ft = [r for r in m.history if r.phase == "finetuning"]
                    run = {
                        "sparsity": sparsity,
                        "seed": seed,
                        "mode": mode,
                        "test_top1": m.test_top1,
                        "achieved": m.sparsity_prunable,
                        "epochs": m.epochs,
                        "best_epoch": m.best_epoch,
                        "finetune_epochs": len(ft),
                        "finetune_s_per_epoch": statistics.mean(r.seconds for r in ft) if ft else None,
                        "best_phase": next(r.phase for r in m.history if r.epoch == m.best_epoch),
                        # the fine-tuning method's own effect, whether or not an epoch of it is chosen
                        "val_before_finetuning": max(
                            r.val_top1
                            for r in m.history
                            if r.phase == "distillation"
                            or (r.phase == "gradual_pruning" and r.epoch == args.pruning_epochs)
                        ),
                        "val_best_finetuning": max((r.val_top1 for r in ft), default=None),
                        "wall_s": time.perf_counter() - started,
                    }
                    runs.append(run)
                    print(
                        f"{sparsity:.0%} seed {seed} {mode:<9} test {run['test_top1']:6.2f}%  "
                        f"epochs {run['epochs']:>2} "
                        f"(fine-tuning {len(ft)}, best from {run['best_phase']}; val before/best in fine-tuning "
                        f"{run['val_before_finetuning']:.2f}/{run['val_best_finetuning'] or float('nan'):.2f})  "
                        f"{run['wall_s']:5.1f} s",
                        flush=True,
                    )

    rows, summary = [], []
    for sparsity in args.sparsities:
        per_mode = {}
        for mode in MODES:
            rs = [r for r in runs if r["sparsity"] == sparsity and r["mode"] == mode]
            tops = [r["test_top1"] for r in rs]
            secs = [r["finetune_s_per_epoch"] for r in rs if r["finetune_s_per_epoch"] is not None]
            per_mode[mode] = {
                "mean": statistics.mean(tops),
                "spread": max(tops) - min(tops),
                "std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
                "s_per_epoch": statistics.mean(secs) if secs else None,
                "finetune_epochs": statistics.mean(r["finetune_epochs"] for r in rs),
            }
        ratio = (
            per_mode["overparam"]["s_per_epoch"] / per_mode["sgd"]["s_per_epoch"]
            if per_mode["sgd"]["s_per_epoch"] and per_mode["overparam"]["s_per_epoch"]
            else None
        )
        for mode in MODES:
            p = per_mode[mode]
            rows.append(
                [
                    f"{sparsity:.0%}",
                    mode,
                    f"{p['mean']:.2f}",
                    f"{p['spread']:.2f}",
                    f"{p['std']:.2f}",
                    f"{p['finetune_epochs']:.1f}",
                    f"{p['s_per_epoch']:.2f}" if p["s_per_epoch"] else "-",
                    f"{ratio:.2f}x" if mode == "overparam" and ratio else "",
                ]
            )
        summary.append({"sparsity": sparsity, "modes": per_mode, "time_ratio": ratio})
    env = environment()
    print()
    print(environment_lines(env))
    print(contention_line(contention.result()))
    print(
        f"schedule: pruning_epochs {args.pruning_epochs}, max_epochs {args.max_epochs}, patience {args.patience}; "
        f"seeds 0..{args.seeds - 1}"
    )
    print(
        table(
            [
                "sparsity",
                "fine-tuning",
                "test top-1 mean %",
                "spread",
                "std",
                "fine-tuning epochs",
                "s / fine-tuning epoch",
                "time vs sgd",
            ],
            rows,
        )
    )
    write_result("overparam", {"env": env, "args": vars(args), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
