"""What a job is: ``PruneJob`` (what to prune, on which data, to which sparsity, how; plain values that
travel to Ray workers and into job records) and ``PreparedJob`` (that job once the preflight loaded and
checked everything: the models, the data splits, the device)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from dg2pf_contract.job import AUTO, JobSpec
from dg2pf_core.algorithm.channels import Structure
from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.algorithm.latency_table import LatencyTable
from dg2pf_core.algorithm.loop import DG2PFResult
from dg2pf_core.data import DataSplits
from dg2pf_core.data.loaders import LocalLoaders, ShardedLoaders
from dg2pf_core.data.registry import parse_spec
from dg2pf_core.errors import DG2PFError
from dg2pf_core.io.compact import check_values
from dg2pf_core.models import ArchSpec


def _absolute(path: str) -> str:
    # Ray workers and resumed runs do not share the caller's working directory.
    return os.path.abspath(os.path.expanduser(path))


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
    skip_bad_images: bool = False  # leave out unreadable images (counted in metrics.json) instead of failing
    augment: str | None = None  # training augmentation policy (data.AUGMENT_POLICIES); None: the dataset's default
    crop_pct: float | None = None  # folder datasets' evaluation crop (data.transforms.FitAndCrop); None: 0.875
    allowed_roots: list[str] = field(default_factory=list)  # the data must stay inside these folders (a service's)
    # The entry of a checkpoint holding two sets of weights (raw + EMA) to prune; None: a file with one set
    checkpoint_key: str | None = None

    def __post_init__(self) -> None:
        check_values(self.compact_values)
        self.checkpoint = _absolute(self.checkpoint)
        if self.teacher is not None:
            self.teacher = _absolute(self.teacher)
        if isinstance(self.config.latency_table, str) and self.config.latency_table:
            # as the other paths: a Ray worker or a resume elsewhere reads the same file
            self.config.latency_table = _absolute(self.config.latency_table)
        try:
            name, path = parse_spec(self.dataset)
        except DG2PFError:
            return  # reported by prepare, with the valid specs
        if path is not None:
            self.dataset = f"{name}:{_absolute(path)}"

    @classmethod
    def from_spec(
        cls, spec: JobSpec, checkpoint: str, teacher: str | None = None, data_roots: list[str] | None = None
    ) -> PruneJob:
        """The job a spec describes, its checkpoint (and teacher) resolved to paths; ``data_roots``: the
        folders its data must stay inside (a service's)."""
        return cls(
            arch=spec.model.arch,
            num_classes=spec.model.num_classes,
            checkpoint=checkpoint,
            checkpoint_key=spec.model.checkpoint_key,
            dataset=spec.dataset.spec,
            config=DG2PFConfig.from_spec(spec),
            teacher=teacher,
            image_size=spec.dataset.image_size,
            val_fraction=spec.dataset.val_fraction,
            compact_values=spec.compact_values,
            skip_bad_images=spec.dataset.skip_bad_images,
            augment=None if spec.dataset.augment == AUTO else spec.dataset.augment,
            crop_pct=spec.dataset.crop_pct,
            allowed_roots=list(data_roots or []),
        )

    def to_dict(self) -> dict:
        """Plain values only: travels to Ray workers and into job records."""
        return {**dataclasses.asdict(self), "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> PruneJob:
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
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # the input checkpoint's, per tensor
    structure: Structure | None = None  # the input checkpoint's channel structure (already channel-pruned)
    latency_table: LatencyTable | None = None  # latency_budget_ms with latency_table: the table read at preflight

    def output_structure(self, result: DG2PFResult) -> Structure | None:
        """What rebuilds the result from the architecture: the input's structure, then this run's removal."""
        removed = result.structure
        if removed is None or removed.empty:
            return self.structure
        base = self.structure or Structure(removed.input_shape)
        return Structure(base.input_shape, (*base.stages, *removed.stages))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.arch.in_channels, self.image_size, self.image_size)

    def sharded_loaders(self, rank: int, world_size: int) -> ShardedLoaders:
        c = self.job.config
        return ShardedLoaders(
            self.splits.train,
            self.splits.val,
            self.splits.test,
            rank=rank,
            world_size=world_size,
            batch_size=c.batch_size,
            eval_batch_size=c.eval_batch_size,
            seed=c.seed,
            workers=c.loader_workers,
            pin_memory=self.device.type == "cuda",
        )

    def local_loaders(self) -> LocalLoaders:
        c = self.job.config
        return LocalLoaders(
            self.splits.train,
            self.splits.val,
            self.splits.test,
            batch_size=c.batch_size,
            eval_batch_size=c.eval_batch_size,
            seed=c.seed,
            workers=c.loader_workers,
            pin_memory=self.device.type == "cuda",
        )
