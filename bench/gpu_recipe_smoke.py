"""A CIFAR recipe end to end on synthetic data, shortened: the GPU path (CUDA, AMP) of a real job.

What it does, in this process and through ``dg2pf_core.job.prune_to_dir`` (the code a service job
runs, minus Ray):

1. reads the recipe (default ``recipes/cifar10-resnet18-95.json``) and validates it as a JobSpec;
2. writes a synthetic CIFAR-10 in the real on-disk format (``cifar-10-batches-py/``: pickled
   ``data_batch_1..5``, ``test_batch``, ``batches.meta``; uint8 rows of 3072 bytes); each class is a
   colour plus noise, so the network has something to learn and validation top-1 moves;
3. saves a randomly initialised dense checkpoint of the recipe's arch as ``.safetensors``;
4. runs the recipe with the data and checkpoint swapped in and the budget shortened (pruning epochs,
   max epochs, images), on ``--device`` with the recipe's ``amp`` (or ``--amp``);
5. prints the device, the achieved sparsity (it must equal the target: the script exits 1 otherwise),
   the epochs, wall time and training throughput, and writes a JSON summary to ``--out``.

The figures say whether the path works and how fast one step of it is; the accuracy on synthetic data
says nothing about the paper's results.

    .venv/bin/python bench/gpu_recipe_smoke.py --out smoke-cuda.json                    # CUDA, recipe amp
    .venv/bin/python bench/gpu_recipe_smoke.py --out smoke-cuda-fp16.json --amp fp16    # the GradScaler path
    .venv/bin/python bench/gpu_recipe_smoke.py --device cpu --images-per-file 20 --batch-size 16 \\
        --pruning-epochs 2 --max-epochs 3 --out smoke-cpu.json                            # a check without a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from benchreport import environment

from dg2pf_contract.job import JobSpec
from dg2pf_core.algorithm.state import EpochRecord
from dg2pf_core.data.cifar10 import DEFAULT_CLASS_NAMES, META_FILE, SUBFOLDER, TEST_FILE, TRAIN_FILES
from dg2pf_core.errors import DG2PFError
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.job import PreparedJob, PruneJob, prune_to_dir
from dg2pf_core.models import build_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "cifar10-resnet18-95.json"


def write_synthetic_cifar10(root: Path, images_per_file: int, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` with five training files and a test file of ``images_per_file``
    images each, pickled as Python 3 writes the official batches (bytes keys, protocol 2)."""
    folder = root / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(10, 3))  # one mean RGB per class

    def batch(label: str) -> dict:
        labels = np.arange(images_per_file) % 10
        rng.shuffle(labels)
        pixels = colours[labels][:, :, None] + rng.normal(0, 40, size=(images_per_file, 3, 1024))
        data = np.clip(pixels, 0, 255).astype(np.uint8).reshape(images_per_file, 3072)  # R plane, G, B
        return {b"batch_label": label.encode(), b"data": data, b"labels": [int(x) for x in labels]}

    for i, name in enumerate(TRAIN_FILES, start=1):
        _pickle(folder / name, batch(f"training batch {i} of 5"))
    _pickle(folder / TEST_FILE, batch("testing batch 1 of 1"))
    _pickle(folder / META_FILE, {b"label_names": [n.encode() for n in DEFAULT_CLASS_NAMES], b"num_vis": 3072})
    return folder


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


class TrainTimer:
    """A ``Progress`` that times each epoch's training batches (evaluation excluded).

    ``float(loss)`` in the loop waits for the GPU on every batch, so the time of the last batch's
    report is when that epoch's training work ended.
    """

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self._start = self._last = 0.0
        self._batches = 0

    def start_epoch(self, phase: str, epoch: int, sparsity: float, batches: int) -> None:
        self._start = self._last = time.perf_counter()
        self._batches = 0

    def batch(self, loss: float) -> None:
        self._batches += 1
        self._last = time.perf_counter()

    def end_epoch(self, record: EpochRecord) -> None:
        if record.phase == "baseline":
            return
        self.epochs.append(
            {
                "phase": record.phase,
                "epoch": record.epoch,
                "sparsity": record.sparsity,
                "batches": self._batches,
                "train_seconds": self._last - self._start,
                "val_top1": record.val_top1,
                "seconds": record.seconds,
            }
        )
        print(
            f"  epoch {record.epoch:>2} {record.phase:<15} sparsity {record.sparsity:7.2%}  "
            f"loss {record.train_loss:.4f}  val top-1 {record.val_top1:6.2f}%  {record.seconds:6.1f} s",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="a cifar10 recipe (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON summary")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], help="default: the recipe's")
    parser.add_argument(
        "--images-per-file",
        type=int,
        default=2000,
        help="images in each of the 6 batch files: 5x train (minus the val hold-out), 1x test",
    )
    parser.add_argument("--pruning-epochs", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, help="default: the recipe's")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="DataLoader processes; 0 is what a service job gets today (default: 0)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the data, checkpoint and artifacts here (default: a temp dir)"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device on this machine (use --device cpu)")
    if args.images_per_file < 10:
        parser.error("--images-per-file must be >= 10 (one image per class)")

    document = json.loads(args.recipe.read_text())
    recipe = JobSpec.model_validate(document)  # the recipe as shipped must be valid
    if not recipe.dataset.spec.startswith("cifar10:"):
        parser.error(
            f"{args.recipe} is a {recipe.dataset.spec.split(':')[0]} recipe; this smoke run writes CIFAR-10 data"
        )
    amp = args.amp or recipe.schedule.amp

    with tempfile.TemporaryDirectory(prefix="dg2pf-smoke-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_folder = write_synthetic_cifar10(work / "data", args.images_per_file)
        checkpoint = work / "dense.safetensors"
        torch.manual_seed(0)
        save_state_dict(build_model(recipe.model.arch, recipe.model.num_classes).state_dict(), checkpoint)

        # The recipe, shortened; validated again as a JobSpec so the smoke run is a valid job too.
        document["dataset"]["spec"] = f"cifar10:{data_folder}"
        document["model"]["checkpoint"] = str(checkpoint)
        document["schedule"].update(
            pruning_epochs=args.pruning_epochs,
            max_epochs=args.max_epochs,
            amp=amp,
            **({"batch_size": args.batch_size} if args.batch_size else {}),
        )
        spec = JobSpec.model_validate(document)
        job = PruneJob.from_spec(spec, str(checkpoint))
        job.config = dataclasses.replace(job.config, device=str(device), loader_workers=args.loader_workers)
        cfg = job.config

        prepared: list[PreparedJob] = []
        timer = TrainTimer()
        amp_note = "" if amp == "none" or device.type == "cuda" else " (not applied: dg2pf autocasts on CUDA only)"
        print(
            f"recipe {args.recipe.name}: {spec.model.arch}, target sparsity {spec.sparsity:.0%}, "
            f"amp {amp}{amp_note}, batch {cfg.batch_size}, pruning epochs {cfg.pruning_epochs}, "
            f"max epochs {cfg.max_epochs}"
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        try:
            metrics = prune_to_dir(job, work / "out", progress=timer, on_prepared=prepared.append)
        except DG2PFError as exc:
            print(f"gpu_recipe_smoke: {exc.message}", file=sys.stderr)
            return 2
        wall = time.perf_counter() - started

    p = prepared[0]
    batch = cfg.batch_size
    train_len = len(p.splits.train)
    train_images = sum(min(e["batches"] * batch, train_len) for e in timer.epochs)
    train_seconds = sum(e["train_seconds"] for e in timer.epochs)
    # round(s * N) weights are pruned, so the achieved fraction is within half a weight of the target.
    tolerance = 0.5 / metrics.params_prunable + 1e-12
    sparsity_ok = abs(metrics.sparsity_prunable - spec.sparsity) <= tolerance
    summary = {
        "recipe": args.recipe.name,
        "arch": spec.model.arch,
        "device": str(p.device),
        "gpu": torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else None,
        "amp": amp,
        "amp_applied": amp != "none" and p.device.type == "cuda",
        "batch_size": batch,
        "loader_workers": cfg.loader_workers,
        "images": {"train": train_len, "val": len(p.splits.val), "test": len(p.splits.test) if p.splits.test else 0},
        "target_sparsity": spec.sparsity,
        "sparsity_prunable": metrics.sparsity_prunable,
        "sparsity_total": metrics.sparsity_total,
        "sparsity_ok": sparsity_ok,
        "max_layer_sparsity": metrics.max_layer_sparsity,
        "warnings": metrics.warnings,
        "params_prunable": metrics.params_prunable,
        "params_nonzero": metrics.params_nonzero,
        "epochs": metrics.epochs,
        "epochs_by_phase": dict(Counter(e["phase"] for e in timer.epochs)),
        "pruning_epochs": cfg.pruning_epochs,
        "max_epochs": cfg.max_epochs,
        "final_phase": metrics.final_phase,
        "val_top1": metrics.val_top1,
        "test_top1": metrics.test_top1,
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "train_images_per_s": train_images / train_seconds if train_seconds > 0 else None,
        "end_to_end_train_images_per_s": train_images / wall,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(p.device) / 2**30 if p.device.type == "cuda" else None,
        "per_epoch": timer.epochs,
        "environment": environment(p.device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")

    print(f"device             {summary['device']}" + (f" ({summary['gpu']})" if summary["gpu"] else ""))
    print(f"amp                {amp}{amp_note}")
    print(
        f"data               synthetic CIFAR-10: {train_len} train / {summary['images']['val']} val / "
        f"{summary['images']['test']} test"
    )
    print(f"target sparsity    {spec.sparsity:.2%}")
    print(
        f"achieved sparsity  {metrics.sparsity_prunable:.6%} of {metrics.params_prunable:,} prunable weights "
        f"({'= target' if sparsity_ok else 'NOT THE TARGET'}); {metrics.sparsity_total:.4%} of all parameters"
    )
    for warning in summary["warnings"]:
        print(f"warning            {warning}")
    print(
        f"epochs             {metrics.epochs} "
        f"({', '.join(f'{k} {v}' for k, v in summary['epochs_by_phase'].items())}); "
        f"final phase {metrics.final_phase}"
    )
    print(f"wall time          {wall:.1f} s (whole job: data loading, baseline, training, evaluation, artifacts)")
    print(
        f"throughput         {summary['train_images_per_s']:.1f} train images/s in the training loops "
        f"({train_images} images in {train_seconds:.1f} s; "
        f"{summary['end_to_end_train_images_per_s']:.1f}/s over the wall time)"
    )
    if summary["peak_gpu_memory_gib"] is not None:
        print(f"peak GPU memory    {summary['peak_gpu_memory_gib']:.2f} GiB")
    print(f"top-1 (synthetic)  val {metrics.val_top1:.2f}%  test {metrics.test_top1:.2f}%")
    print(f"wrote {args.out}")
    return 0 if sparsity_ok else 1


if __name__ == "__main__":
    sys.exit(main())
