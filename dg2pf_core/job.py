"""A pruning job end to end: validate every input, run DG2PF, write the artifacts.

``prepare`` does all the checking that can fail because of the user's input (architecture,
checkpoint, dataset, classes, options) before any training starts, so a bad job fails in seconds
with a message, never after an hour of work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_into, read_state_dict
from .compact import check_values
from .config import DG2PFConfig
from .data import DataRequest, DataSplits, load_dataset
from .errors import ConfigError, DatasetError
from .export import OutputDir, write_compact, write_metrics, write_model
from .loaders import LocalLoaders, Loaders, ShardedLoaders
from .loop import DG2PFResult, Progress, Reporter, resolve_device, run_dg2pf
from .masks import layer_sparsity, layer_warnings
from .metrics import size_report
from .models import ArchSpec, build_model, get_arch
from .state import TrainingState


@dataclass
class PruneJob:
    """What to prune, on which data, to which sparsity, how."""

    arch: str
    num_classes: int
    checkpoint: str
    dataset: str
    config: DG2PFConfig
    teacher: str | None = None  # a separate teacher checkpoint of the same architecture
    image_size: int | None = None  # default: the architecture's input size
    val_fraction: float = 0.1
    compact_values: str = "fp32"  # value dtype of model.compact.safetensors: "fp32" (exact) or "fp16"

    def __post_init__(self) -> None:
        check_values(self.compact_values)

    def to_dict(self) -> dict:
        """Plain values only: travels to Ray workers and into job records."""
        return {**dataclasses.asdict(self), "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "PruneJob":
        values = dict(values)
        config = values.pop("config")
        return cls(**values, config=config if isinstance(config, DG2PFConfig) else DG2PFConfig.from_dict(config))


@dataclass
class PreparedJob:
    job: PruneJob
    arch: ArchSpec
    model: nn.Module
    teacher: nn.Module | None
    splits: DataSplits
    image_size: int
    device: torch.device
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.arch.in_channels, self.image_size, self.image_size)

    def sharded_loaders(self, rank: int, world_size: int) -> ShardedLoaders:
        c = self.job.config
        return ShardedLoaders(
            self.splits.train, self.splits.val, self.splits.test, rank=rank, world_size=world_size,
            batch_size=c.batch_size, eval_batch_size=c.eval_batch_size, seed=c.seed,
            workers=c.loader_workers, pin_memory=self.device.type == "cuda",
        )

    def local_loaders(self) -> LocalLoaders:
        c = self.job.config
        return LocalLoaders(
            self.splits.train, self.splits.val, self.splits.test,
            batch_size=c.batch_size, eval_batch_size=c.eval_batch_size, seed=c.seed,
            workers=c.loader_workers, pin_memory=self.device.type == "cuda",
        )


def load_model(arch: str, num_classes: int, checkpoint: str | Path) -> tuple[ArchSpec, nn.Module]:
    spec = get_arch(arch)
    model = build_model(arch, num_classes)
    load_into(model, read_state_dict(checkpoint), arch=f"{arch} with num_classes={num_classes}")
    return spec, model


def load_data(dataset: str, arch: ArchSpec, num_classes: int, image_size: int | None, val_fraction: float, seed: int) -> tuple[DataSplits, int]:
    size = image_size or arch.input_size
    if size < 8:
        raise ConfigError(f"image_size must be >= 8, got {size}", field="image_size")
    splits = load_dataset(dataset, DataRequest(image_size=size, in_channels=arch.in_channels, val_fraction=val_fraction, seed=seed))
    if splits.num_classes != num_classes:
        raise DatasetError(
            f"dataset {dataset!r} has {splits.num_classes} classes but the model was given num_classes={num_classes}; "
            "they must match",
            field="num_classes",
        )
    return splits, size


def prepare(job: PruneJob) -> PreparedJob:
    """Load and check everything; raises a ``DG2PFError`` naming the bad input."""
    job.config.validate()
    check_values(job.compact_values)
    arch, model = load_model(job.arch, job.num_classes, job.checkpoint)
    teacher = None
    if job.teacher is not None:
        _, teacher = load_model(job.arch, job.num_classes, job.teacher)
    splits, size = load_data(job.dataset, arch, job.num_classes, job.image_size, job.val_fraction, job.config.seed)
    return PreparedJob(job, arch, model, teacher, splits, size, resolve_device(job.config.device))


def run(
    prepared: PreparedJob,
    *,
    loaders: Loaders | None = None,
    progress: Progress | None = None,
    reporter: Reporter | None = None,
    resume: TrainingState | None = None,
) -> DG2PFResult:
    return run_dg2pf(
        prepared.model, loaders or prepared.local_loaders(), prepared.job.config,
        teacher=prepared.teacher, reporter=reporter, progress=progress, resume=resume, device=prepared.device,
    )


def result_metrics(prepared: PreparedJob, result: DG2PFResult, *, world_size: int, wall_seconds: float) -> dict:
    """The ``metrics.json`` document of a finished job."""
    job = prepared.job
    size = size_report(result.model, result.masks, prepared.input_shape, prepared.device)
    last = result.history[-1] if result.history else {}
    layers = layer_sparsity(result.masks)
    return {
        "arch": job.arch,
        "num_classes": job.num_classes,
        "dataset": job.dataset,
        "image_size": prepared.image_size,
        "in_channels": prepared.arch.in_channels,
        "class_names": prepared.splits.class_names,
        "target_sparsity": job.config.sparsity,
        "sparsity_prunable": size.sparsity_prunable,
        "sparsity_total": size.sparsity_total,
        "params_total": size.params_total,
        "params_nonzero": size.params_nonzero,
        "params_prunable": size.prunable_total,
        "flops_dense": size.flops_dense,
        "flops_sparse": size.flops_sparse,
        "flops_unit": "multiply-accumulates of Conv/Linear layers per sample",
        "baseline_val_top1": result.baseline_val_top1,
        "baseline_test_top1": result.baseline_test_top1,
        "val_top1": result.best_val_top1,
        "test_top1": result.test.top1 if result.test else None,
        "test_top5": result.test.top5 if result.test else None,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "final_phase": last.get("phase"),
        "world_size": world_size,
        "wall_seconds": wall_seconds,
        "layer_sparsity": layers,
        "max_layer_sparsity": max(layers.values(), default=0.0),
        "layer_cap": job.config.layer_cap(job.config.sparsity) if job.config.scope == "global" else None,
        "warnings": layer_warnings(result.masks, job.config.warn_layer_sparsity),
        "config": job.config.to_dict(),
        "history": result.history,
    }


def prune_to_dir(
    job: PruneJob,
    out: str | Path,
    *,
    progress: Progress | None = None,
    on_prepared: Callable[[PreparedJob], None] | None = None,
    reporter: Reporter | None = None,
    resume: TrainingState | None = None,
) -> dict:
    """Run ``job`` in this process and write ``out/model.safetensors`` (dense),
    ``out/model.compact.safetensors`` (bitmask + nonzero values) and ``out/metrics.json``.

    Nothing is written until the run succeeds, and then all at once (temp dir + rename).
    ``reporter`` receives every epoch's full state (to save it); ``resume`` continues from one.
    """
    output = OutputDir(out)  # refuses a non-empty destination before any work
    started = time.perf_counter()
    prepared = prepare(job)
    if on_prepared is not None:
        on_prepared(prepared)
    result = run(prepared, progress=progress, reporter=reporter, resume=resume)
    metrics = result_metrics(prepared, result, world_size=1, wall_seconds=time.perf_counter() - started)
    with output.staging() as tmp:
        write_model(result.model, tmp / "model.safetensors")
        write_compact(result.model, tmp / "model.compact.safetensors", job.compact_values)
        write_metrics(metrics, tmp / "metrics.json")
    return metrics
