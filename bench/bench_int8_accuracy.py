"""int8 accuracy composed with channel pruning on Fashion-MNIST (docs/benchmarks.md, section 18).

Issue 32's accuracy target: the int8 model's top-1 within 0.5 points of its own fp32 pruned model on
Fashion-MNIST. Everything runs through the product's job path:

1. The dense network: the fidelity harness's cached Fashion-MNIST pre-training (``bench/fidelity/pretrain.py``;
   28 px, 57,000 training images, 3,000 held out, 10 epochs), trained here first if its cache lacks it.
2. ``dg2pf quantize`` of the dense checkpoint (``quantize_checkpoint``): dense fp32 vs dense int8.
3. Per seed, a ``PruneJob`` (``prune_to_dir``, what ``dg2pf prune`` runs) with ``--granularity``
   (unstructured at ``--sparsity`` 0.9 by default; channel at ``--macs-ratio`` for architectures channel
   granularity takes), ``precision: int8`` and ``max_quantization_drop`` left at its default (0.5), its
   training split cut to ``--train-subset`` images (the fidelity cells' departure, for this 2-core
   machine's sake); the job quantizes model.onnx itself and keeps int8 only within the drop.

Reported per row: validation top-1 of the fp32 ONNX model and of the int8 one (the job's check), test
top-1 of both (fp32: the job's ``test_top1``; int8: ``quantization.test_top1_int8``; the official 10,000
test images), the kept calibration and the file sizes. Threads: ``--threads`` for training and evaluation.

    .venv/bin/python bench/bench_int8_accuracy.py [--models shufflenet_v2_x0_5] [--seeds 0 1 2] \
        [--granularity unstructured --sparsity 0.9 | --granularity channel --macs-ratio 0.5] \
        [--epochs 15] [--pruning-epochs 5] [--train-subset 8000] [--threads 2] [--out docs/int8-accuracy-fm.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fidelity.data import load_job_split, settings_for_dataset, train_subset  # noqa: E402
from bench.fidelity.pretrain import dense_model, settings_for  # noqa: E402
from dg2pf_core import DG2PFConfig, PruneJob  # noqa: E402
from dg2pf_core.job.prune import prune_to_dir  # noqa: E402
from dg2pf_core.job.quantization import quantize_checkpoint  # noqa: E402


def _row(kind: str, seed: int | None, q, fp32_test: float | None, seconds: float) -> dict:
    return {
        "model": kind,
        "seed": seed,
        "int8_kept": q.written,
        "reason": q.reason,
        "method": q.method,
        "reduce_range": q.reduce_range,
        "val_top1_fp32": q.val_top1_fp32,
        "val_top1_int8": q.val_top1_int8,
        "test_top1_fp32": fp32_test,
        "test_top1_int8": q.test_top1_int8,
        "test_drop": None if fp32_test is None or q.test_top1_int8 is None else round(fp32_test - q.test_top1_int8, 2),
        "bytes_fp32": q.bytes_fp32,
        "bytes_int8": q.bytes_int8,
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["shufflenet_v2_x0_5"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--pruning-epochs", type=int, default=5)
    p.add_argument("--train-subset", type=int, default=8000)
    p.add_argument(
        "--granularity",
        default="unstructured",
        help="unstructured (--sparsity) or channel (--macs-ratio; not on shufflenet, whose channel shuffle "
        "Torch-Pruning cannot trace)",
    )
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--macs-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "bench" / "fidelity" / "cache")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "int8-accuracy-fm.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = settings_for_dataset("fashion-mnist", args.train_subset)
    split = load_job_split(data, 0, subset=False)  # pre-training: the whole training split, as the harness
    pretrain_data = dataclasses.replace(data, train_subset=0)
    rows: list[dict] = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    done = {(r["arch"], r["model"], r["seed"]) for r in rows}

    def save() -> None:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")

    for arch in args.models:
        dense = dense_model(arch, split, pretrain_data, args.cache_dir, settings_for(arch, dataset="fashion-mnist"))
        print(f"[int8] {arch} dense: test top-1 {dense.test_top1:.2f}% ({dense.path.name})", flush=True)
        common = dict(arch=f"torchvision/{arch}", num_classes=10, dataset=data.spec())
        if (arch, "dense", None) not in done:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                q = quantize_checkpoint(
                    checkpoint=str(dense.path),
                    out=Path(tmp) / "q",
                    image_size=data.image_size,
                    val_fraction=data.job_val_fraction,
                    **common,
                )
            rows.append({"arch": arch, **_row("dense", None, q, dense.test_top1, time.perf_counter() - t0)})
            print(f"[int8] {rows[-1]}", flush=True)
            save()
        channel = args.granularity == "channel"
        kind = f"channel-macs{args.macs_ratio:g}" if channel else f"{args.granularity}-{args.sparsity:g}"
        target = dict(target_macs_ratio=args.macs_ratio) if channel else dict(sparsity=args.sparsity)
        for seed in args.seeds:
            if (arch, kind, seed) in done:
                continue
            config = DG2PFConfig(
                granularity=args.granularity,
                **target,
                precision="int8",
                max_epochs=args.epochs,
                pruning_epochs=args.pruning_epochs,
                seed=seed,
            )
            job = PruneJob(
                checkpoint=str(dense.path),
                config=config,
                image_size=data.image_size,
                val_fraction=data.job_val_fraction,
                **common,
            )

            def cut(prepared, seed=seed) -> None:  # the fidelity cells' departure: a training subset
                prepared.splits.train = train_subset(prepared.splits.train, args.train_subset, seed)

            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                m = prune_to_dir(job, Path(tmp) / "out", on_prepared=cut)
            row = _row(kind, seed, m.quantization, m.test_top1, time.perf_counter() - t0)
            row["macs_ratio"] = round(m.macs_sparse / m.macs_dense, 4) if m.macs_sparse and m.macs_dense else None
            rows.append({"arch": arch, **row})
            print(f"[int8] {rows[-1]}", flush=True)
            save()


if __name__ == "__main__":
    main()
