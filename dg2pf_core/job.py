"""A pruning job end to end: validate every input, run DG2PF, write the artifacts.

``prepare`` is the one preflight: everything that can fail because of the user's input or this
machine (options, device and AMP mode, output location, checkpoints, data, a dry forward + backward
pass; see ``preflight``) is checked before any training starts, so a bad job fails in seconds with
a message, never after an hour of work. ``prune_to_dir`` keeps the run's state (the last epoch's
``TrainingState`` and the job) in a state directory while it trains, so a run interrupted or unable
to write its results is continued with ``resume=True`` (``dg2pf prune --resume DIR``), not lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dg2pf_contract.artifacts import Artifacts, StateDir, write_text_atomic
from dg2pf_contract.job import AUTO, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, JobSpec
from dg2pf_contract.results import Latency, Metrics

from .batchnorm import settled_channels
from .channels import (MAX_STRUCTURE_STAGES, STRUCTURE_KEY, ChannelPlan, Structure, apply_structure, check_architecture,
                       read_structure)
from .checkpoints import load_into, read_state_dict
from .compact import check_values
from .config import DG2PFConfig
from .data import DataRequest, DataSplits, load_dataset
from .data.registry import eval_crop_pct, parse_spec
from .errors import CheckpointError, ConfigError, DatasetError, DG2PFError, InputModelMismatch, TrainingDiverged
from .export import OutputDir, write_compact, write_model
from .latency import DEFAULT_BATCH_SIZES, DEFAULT_RUNS, DEFAULT_WARMUP, JOB_BUDGET_S, compare, measure_latency
from .loaders import LocalLoaders, Loaders, ShardedLoaders
from .loop import DG2PFResult, Progress, Reporter, run_dg2pf
from .masks import layer_sparsity, layer_warnings, select_prunable
from .metrics import size_report
from .nm import check_divisible, nm_violations
from .models import ArchSpec, build_model, get_arch
from .models.registry import build_meta, parameter_count
from .onnx_export import OnnxReport, export_onnx
from .plots import write_plots
from .preflight import check_device, check_fp16_range, check_output, dry_run
from .state import TrainingState

log = logging.getLogger(__name__)
# Loading weights into a model built on the meta device (a fit check, nothing computed) makes torch warn for
# every tensor; only this module builds such models, and the warning says nothing a user could act on.
warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter in the checkpoint to a meta parameter")


class OutputError(DG2PFError):
    """The results could not be written (disk full, permissions) after training finished."""

    field = "out"


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
        try:
            name, path = parse_spec(self.dataset)
        except DG2PFError:
            return  # reported by prepare, with the valid specs
        if path is not None:
            self.dataset = f"{name}:{_absolute(path)}"

    @classmethod
    def from_spec(cls, spec: JobSpec, checkpoint: str, teacher: str | None = None,
                  data_roots: list[str] | None = None) -> "PruneJob":
        """The job a spec describes, its checkpoint (and teacher) resolved to paths; ``data_roots``: the
        folders its data must stay inside (a service's)."""
        return cls(
            arch=spec.model.arch, num_classes=spec.model.num_classes, checkpoint=checkpoint,
            checkpoint_key=spec.model.checkpoint_key, dataset=spec.dataset.spec, config=DG2PFConfig.from_spec(spec),
            teacher=teacher, image_size=spec.dataset.image_size, val_fraction=spec.dataset.val_fraction,
            compact_values=spec.compact_values, skip_bad_images=spec.dataset.skip_bad_images,
            augment=None if spec.dataset.augment == AUTO else spec.dataset.augment, crop_pct=spec.dataset.crop_pct,
            allowed_roots=list(data_roots or []),
        )

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
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # the input checkpoint's, per tensor
    structure: Structure | None = None  # the input checkpoint's channel structure (already channel-pruned)

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


def load_checkpoint_model(arch: str, num_classes: int, checkpoint: str | Path, what: str = "checkpoint", *,
                          meta: bool = False, fp16_values: bool = False,
                          key: str | None = None) -> tuple[ArchSpec, nn.Module, dict[str, torch.dtype]]:
    """``arch`` built with ``num_classes`` and the checkpoint's weights (read by content, finite,
    fitting), and the dtype each tensor had in the checkpoint. Raises ``DG2PFError``.

    ``meta``: build the model on the meta device and only check the fit (names, shapes, dtype kinds):
    no memory for the weights (what a service checks at submit). ``fp16_values``: every value must
    fit float16 (``compact_values=fp16``)."""
    spec = get_arch(arch)
    state = read_state_dict(checkpoint, key=key)
    structure = read_structure(checkpoint)  # a channel-pruned model: other shapes than the architecture's
    if spec.ignored_keys:
        state = {k: v for k, v in state.items() if not k.startswith(spec.ignored_keys)}
    if fp16_values:
        check_fp16_range(state, f"the {what}'s")
    with warnings.catch_warnings():
        # Copying into meta tensors is the no-op wanted here; torch warns about every tensor. (Also filtered
        # once for the process below: catch_warnings is not thread-safe, and a service checks jobs in threads.)
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        model = build_meta(arch, num_classes) if meta and structure is None else build_model(arch, num_classes)
        if structure is not None:
            apply_structure(model, structure, arch)
        try:
            load_into(model, state, what=f"{what} {checkpoint}", arch=f"{arch} with num_classes={num_classes}")
        except CheckpointError as exc:
            if structure is None and _narrower(state, model):
                raise CheckpointError(f"{exc.message}; its layers are narrower than {arch}'s, as in a channel-pruned model, but "
                                      f"it carries no channel structure ({STRUCTURE_KEY} metadata): use the model.safetensors "
                                      "dg2pf wrote (a tool that re-saves a file can drop its metadata)",
                                      field=exc.field) from exc
            raise
    return spec, model, {k: v.dtype for k, v in state.items() if v.is_floating_point()}


def _narrower(state: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Whether some tensor of ``state`` has ``model``'s rank but is smaller along a dimension."""
    own = model.state_dict()
    return any(k in own and v.dim() == own[k].dim() and v.shape != own[k].shape
               and all(a <= b for a, b in zip(v.shape, own[k].shape)) for k, v in state.items())


def checkpoint_num_classes(arch: str, checkpoint: str | Path, key: str | None = None) -> int:
    """The number of classes ``checkpoint`` was trained for: the output size of ``arch``'s classifier
    (its last Conv/Linear, the convention the pruning code relies on) in the checkpoint. Raises
    ``DG2PFError`` when the file cannot be read or holds no such weight."""
    from .masks import PRUNABLE_MODULES

    get_arch(arch)  # an unknown name is named as such, with suggestions
    model = build_meta(arch, 2)
    last = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)]
    state = read_state_dict(checkpoint, key=key)
    key = f"{last[-1]}.weight" if last else None
    if key is None or key not in state or state[key].dim() < 2:
        raise CheckpointError(f"checkpoint {checkpoint} has no classifier weight {key or '(none in ' + arch + ')'} to "
                              f"count the classes from; give --num-classes", field="num_classes")
    return int(state[key].shape[0])


def load_model(arch: str, num_classes: int, checkpoint: str | Path, key: str | None = None) -> tuple[ArchSpec, nn.Module]:
    spec, model, _ = load_checkpoint_model(arch, num_classes, checkpoint, key=key)
    return spec, model


def load_data(dataset: str, arch: ArchSpec, num_classes: int, image_size: int | None, val_fraction: float, seed: int,
              skip_bad_images: bool = False, allowed_roots: tuple[str, ...] = (),
              augment: str | None = None, crop_pct: float | None = None) -> tuple[DataSplits, int]:
    size = arch.input_size if image_size is None else image_size
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, got {size}", field="image_size")
    splits = load_dataset(dataset, DataRequest(image_size=size, in_channels=arch.in_channels, val_fraction=val_fraction,
                                               seed=seed, skip_bad_images=skip_bad_images,
                                               allowed_roots=tuple(allowed_roots), augment=augment, crop_pct=crop_pct))
    if splits.num_classes != num_classes:
        raise DatasetError(
            f"dataset {dataset!r} has {splits.num_classes} classes but the model was given num_classes={num_classes}; "
            "they must match",
            field="num_classes",
        )
    return splits, size


def check_static(job: PruneJob, *, meta: bool = False, max_params: int | None = None,
                 ) -> tuple[ArchSpec, nn.Module, dict[str, torch.dtype], nn.Module | None]:
    """The checks that need neither the data nor the training machine: options, the architecture's
    size (``max_params``, counted before anything is built), the checkpoint(s) (by content, finite,
    fitting ``arch``), the selected weights (some, and for N:M granularity each row a whole number
    of groups) and fp16 compact values. What a service checks when a job is submitted (with
    ``meta``: the models are built on the meta device, no memory for weights); ``prepare`` runs them too."""
    job.config.validate()
    check_values(job.compact_values)
    if max_params is not None:
        count = parameter_count(job.arch, job.num_classes)
        if count > max_params:
            raise ConfigError(f"{job.arch} with {job.num_classes} classes has {count:,} parameters, over this service's "
                              f"limit of {max_params:,} (DG2PF_MAX_MODEL_PARAMS)", field="arch")
    if job.config.channel:
        check_architecture(job.arch)  # by name, before building: some graphs take minutes and GBs to trace
        earlier = read_structure(job.checkpoint)
        if earlier is not None and len(earlier.stages) >= MAX_STRUCTURE_STAGES:
            raise ConfigError(f"the checkpoint was channel-pruned {len(earlier.stages)} times already, the most a model "
                              f"records ({MAX_STRUCTURE_STAGES}): prune it with granularity 'unstructured' or N:M, or start "
                              "from a checkpoint with fewer stages", field="granularity")
    arch, model, dtypes = load_checkpoint_model(job.arch, job.num_classes, job.checkpoint, meta=meta,
                                                fp16_values=job.compact_values == "fp16", key=job.checkpoint_key)
    prunable = select_prunable(model, job.config.selection())  # --include/--exclude select something
    nm = job.config.nm()
    if nm is not None:
        check_divisible(prunable.params, nm)  # shapes only: meta tensors will do
    if job.config.channel:  # some group prunable, the MACs target reachable: traced on meta tensors too
        size = job.image_size or arch.input_size
        plan = ChannelPlan.build(model, (arch.in_channels, size, size), job.config.selection())
        if job.config.target_macs_ratio is not None:
            # (unrounded: a run rounds widths to a smaller multiple, down to 1, when the target needs it)
            plan.check_reachable(dict(model.named_parameters()), job.config.target_macs_ratio, job.config.layer_cap)
        else:
            plan.check_fraction(job.config.sparsity, job.config.layer_cap(job.config.sparsity))
    teacher = None
    if job.teacher is not None:
        try:
            _, teacher, _ = load_checkpoint_model(job.arch, job.num_classes, job.teacher, what="teacher checkpoint", meta=meta)
        except DG2PFError as exc:
            raise type(exc)(exc.message if "teacher" in exc.message else f"--teacher: {exc.message}", field="teacher") from exc
    return arch, model, dtypes, teacher


def prepare(job: PruneJob, *, out: str | Path | None = None, world_size: int = 1, dry: bool = True) -> PreparedJob:
    """The preflight: load and check everything (see ``preflight``); raises a ``DG2PFError`` naming
    the bad input. ``out``: the output directory to check; ``world_size``: the DDP workers the batch
    is split over; ``dry``: run the dry forward + backward pass (on the device that will train)."""
    job.config.validate()
    device = check_device(job.config.device, job.config.amp)
    if out is not None:
        check_output(out)
    arch, model, dtypes, teacher = check_static(job)
    splits, size = load_data(job.dataset, arch, job.num_classes, job.image_size, job.val_fraction, job.config.seed,
                             job.skip_bad_images, tuple(job.allowed_roots), job.augment, job.crop_pct)
    if dry:
        dry_run(model, teacher, splits.train, arch=job.arch, num_classes=job.num_classes, image_size=size,
                batch_size=job.config.batch_size, world_size=world_size, device=device, amp=job.config.amp)
    return PreparedJob(job, arch, model, teacher, splits, size, device, dtypes=dtypes, structure=read_structure(job.checkpoint))


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
        input_shape=prepared.input_shape,
    )


def result_metrics(prepared: PreparedJob, result: DG2PFResult, *, world_size: int, wall_seconds: float) -> Metrics:
    """The ``metrics.json`` document of a finished job (without the ``onnx`` and ``latency`` sections:
    ``write_results`` measures them on the weights as written)."""
    job = prepared.job
    size = size_report(result.model, result.masks, prepared.input_shape, prepared.device)
    last = result.history[-1] if result.history else {}
    layers = layer_sparsity(result.masks)
    nm = job.config.nm()
    # The check reads the weights as written, not the masks: groups over N nonzeros (0 when the pattern holds).
    violations = {} if nm is None else {
        "nm_violations": nm_violations(select_prunable(result.model, job.config.selection()).params, nm)}
    channel: dict = {}
    warned = layer_warnings(result.masks, job.config.warn_layer_sparsity)
    x = result.channels
    if job.config.channel and x is not None:
        # The result is the smaller dense network: sparsity is of channels, MACs and parameters against
        # the input model's (what this job started from).
        layers = x.layer_channels
        channel = {"target_macs_ratio": job.config.target_macs_ratio, "channels_total": x.channels_total,
                   "channels_pruned": x.channels_pruned, "channel_sparsity": x.channels_pruned / x.channels_total,
                   "macs_ratio": size.macs_sparse / x.macs_dense if x.macs_dense else None,
                   "params_dense": x.params_dense, "params_ratio": size.params_total / x.params_dense,
                   "skipped_groups": x.skipped_groups, "channel_multiple": x.channel_multiple}
        # The masks are gone with the removed channels: the collapse warning reads each group's fraction.
        warned = _channel_warnings(layers, job.config.warn_layer_sparsity)
        if not x.channels_pruned:
            warned = [_nothing_removed(job.config, x.channels_total, x.channel_multiple), *warned]
        elif job.config.target_macs_ratio is None and abs(channel["channel_sparsity"] - job.config.sparsity) > 0.02:
            warned.append(f"{channel['channel_sparsity']:.2%} of the channels were removed for sparsity {job.config.sparsity:g}: "
                          f"kept widths rounded up to multiples of {x.channel_multiple} (channel_multiple) under the layer "
                          "collapse guard could not come closer; lower channel_multiple for an exact channel fraction")
    return Metrics(
        arch=job.arch,
        num_classes=job.num_classes,
        dataset=job.dataset,
        image_size=prepared.image_size,
        augment=getattr(prepared.splits, "augment", None),  # the policy trained with: asked for, or the default
        # folder datasets' evaluation crop (validation, test and serving alike); None where no crop applies
        crop_pct=eval_crop_pct(job.dataset, job.crop_pct),
        in_channels=prepared.arch.in_channels,
        class_names=prepared.splits.class_names,
        target_sparsity=job.config.sparsity if job.config.target_macs_ratio is None else None,
        granularity=job.config.granularity,
        # The named configuration the job started from, and what it set otherwise (config holds every value).
        preset=job.config.preset,
        preset_departures=job.config.preset_departures(),
        # BatchNorm channels constant within every batch, settled to output their bias (dg2pf_core/batchnorm.py)
        bn_settled_channels=settled_channels(result.model),
        **violations,
        **channel,
        sparsity_prunable=channel["channel_sparsity"] if channel else size.sparsity_prunable,
        # Channel granularity: of the input model's parameters, the fraction removed (or zero).
        sparsity_total=1.0 - size.params_nonzero / x.params_dense if channel else size.sparsity_total,
        params_total=size.params_total,
        params_nonzero=size.params_nonzero,
        params_prunable=x.params_prunable if channel else size.prunable_total,
        macs_dense=x.macs_dense if channel else size.macs_dense,
        macs_sparse=size.macs_sparse,
        baseline_val_top1=result.baseline_val_top1,
        baseline_test_top1=result.baseline_test_top1,
        val_top1=result.best_val_top1,
        test_top1=result.test.top1 if result.test else None,
        test_top5=result.test.top5 if result.test else None,
        best_epoch=result.best_epoch,
        epochs=result.epochs,
        final_phase=last.get("phase"),
        world_size=world_size,
        wall_seconds=wall_seconds,
        layer_sparsity=layers,
        max_layer_sparsity=max(layers.values(), default=0.0),
        # N:M holds every tensor at (M-N)/M by construction: no cap applies.
        layer_cap=x.layer_cap if channel else job.config.layer_cap(job.config.sparsity)
        if job.config.scope == "global" and nm is None else None,
        # the data's, the run's (an input model near chance), then the result's
        warnings=[*(getattr(prepared.splits, "warnings", None) or []), *result.warnings, *warned],
        dtype=_dtype_summary(prepared.dtypes),
        skipped_images=len(getattr(prepared.splits, "skipped_images", []) or []),
        skipped_image_files=list(getattr(prepared.splits, "skipped_images", []) or [])[:100],
        config=job.config.to_dict(),
        history=result.history,
    )


def write_results(out: Path, prepared: PreparedJob, result: DG2PFResult, metrics: Metrics) -> Metrics:
    """Write a finished job's artifacts into ``out`` (a staging directory): ``model.safetensors``,
    ``model.compact.safetensors``, ``model.onnx`` (when it exports and matches PyTorch's logits) and
    ``metrics.json`` with its ``onnx`` and ``latency`` sections, and ``training.png`` and
    ``layers.png`` drawn from it (``plots``); returns the metrics written.

    ONNX and latency are measured on the weights as written (read back from ``model.safetensors``
    into the architecture, float32 on the CPU: what ``InferenceModel`` serves); neither can fail
    the job, each section says what happened. Nor can the plots: a failure to draw them is logged as
    a warning. ``OSError`` writing the model or metrics (disk full) propagates."""
    job = prepared.job
    files = Artifacts(out)
    structure = prepared.output_structure(result)
    write_model(result.model, files.model, prepared.dtypes, structure)
    write_compact(result.model, files.compact, job.compact_values, structure)
    _, pruned, _ = load_checkpoint_model(job.arch, job.num_classes, files.model, what="written model")
    onnx = export_onnx(pruned, prepared.input_shape, files.onnx, what=job.arch)
    macs_ratio = metrics.macs_sparse / metrics.macs_dense if metrics.macs_dense else None
    metrics = metrics.model_copy(update={"onnx": onnx.section(),
                                         "latency": job_latency(prepared, pruned, onnx, files.onnx, macs_ratio)})
    metrics.write(files.metrics)
    try:
        write_plots(metrics, out)
    except Exception as exc:  # noqa: BLE001 - pictures are drawn again any time (dg2pf plot); the model is the job
        log.warning("the job's plots (training.png, layers.png) were not drawn: %s: %s; the model and metrics.json are "
                    "written, draw them later with `dg2pf plot` on the output directory", type(exc).__name__, exc)
    return metrics


def job_latency(prepared: PreparedJob, pruned: nn.Module, onnx: OnnxReport, onnx_file: Path,
                macs_ratio: float | None) -> Latency:
    """The ``latency`` section of metrics.json: the unpruned input model (read again from the job's
    checkpoint) and the pruned one, timed side by side (``dg2pf_core.latency``) with this process's
    torch threads, within ``JOB_BUDGET_S``; on the GPU too when the job ran on one."""
    job = prepared.job
    notes: list[str] = []
    models = {"pruned": pruned}
    files = {"pruned": onnx_file} if onnx.written else {}
    if not onnx.written:
        notes.append(f"onnxruntime: not measured, there is no {Artifacts.ONNX} ({onnx.reason})")
    try:
        with tempfile.TemporaryDirectory(prefix="dg2pf-latency-") as tmp:
            try:
                _, models["dense"], _ = load_checkpoint_model(job.arch, job.num_classes, job.checkpoint, key=job.checkpoint_key)
            except DG2PFError as exc:
                notes.append(f"dense: not measured, the input checkpoint cannot be read again ({exc.message})")
            if onnx.written and "dense" in models:
                dense_onnx = export_onnx(models["dense"], prepared.input_shape, Path(tmp) / "dense.onnx", what="the dense model")
                if dense_onnx.written:
                    files["dense"] = Path(tmp) / "dense.onnx"
                else:
                    notes.append(f"onnxruntime: dense not measured ({dense_onnx.reason})")
            report = measure_latency(models, prepared.input_shape, onnx=files, batch_sizes=DEFAULT_BATCH_SIZES,
                                     runs=DEFAULT_RUNS, warmup=DEFAULT_WARMUP, cuda=prepared.device.type == "cuda",
                                     budget_s=JOB_BUDGET_S)
    except Exception as exc:  # noqa: BLE001 - a finished training is not lost to its latency measurement
        return Latency(measured=False, reason=f"{type(exc).__name__}: {exc}"[:500], macs_ratio=macs_ratio)
    document = report.to_dict()
    return Latency.model_validate({**{k: v for k, v in document.items() if k not in ("backends", "notes")},
                                   "backends": compare(report), "macs_ratio": macs_ratio, "notes": notes + document["notes"]})


def _nothing_removed(config: DG2PFConfig, channels: int, multiple: int = 1) -> str:
    """Why a channel job left the network as it was: its target was too mild for one channel, or for
    one block of ``multiple`` channels."""
    if config.target_macs_ratio is not None:
        why = f"target_macs_ratio {config.target_macs_ratio:g} is within one channel of the unpruned network's MACs"
    elif round(config.sparsity * channels) == 0:
        why = f"sparsity {config.sparsity:g} of {channels:,} prunable channels rounds to 0"
    else:
        return (f"no channel was removed: sparsity {config.sparsity:g} asks for {round(config.sparsity * channels):,} of "
                f"{channels:,} channels, and kept widths are rounded up to multiples of channel_multiple {multiple}, which "
                "put them all back; the model keeps the input's structure (only its weights were trained): lower "
                "channel_multiple or ask for a larger sparsity")
    return (f"no channel was removed: {why}; the model keeps the input's structure (only its weights were trained): "
            "ask for a larger sparsity or a smaller target_macs_ratio")


def _channel_warnings(removed: dict[str, float], threshold: float) -> list[str]:
    """The layer collapse warning of a channel job: groups (root layer -> fraction of its channels
    removed) beyond ``threshold``; empty when there are none."""
    above = {name: f for name, f in sorted(removed.items(), key=lambda kv: -kv[1]) if f > threshold}
    if not above:
        return []
    shown = ", ".join(f"{name} {f:.2%}" for name, f in list(above.items())[:5])
    more = f" and {len(above) - 5} more" if len(above) > 5 else ""
    return [f"{len(above)} layer(s) with more than {threshold:.0%} of their channels removed: {shown}{more}. A layer left "
            "with few channels can cost accuracy (layer collapse): raise layer_density_floor, lower max_layer_sparsity, "
            "ask for less (sparsity / a larger target_macs_ratio), or exclude the layer from pruning (exclude)."]


def _dtype_summary(dtypes: dict[str, torch.dtype]) -> str:
    """The floating dtype(s) of the input checkpoint, which the pruned model.safetensors keeps."""
    names = sorted({str(d).removeprefix("torch.") for d in dtypes.values()})
    return names[0] if len(names) == 1 else ("mixed: " + ", ".join(names) if names else "none")


def prune_to_dir(
    job: PruneJob,
    out: str | Path,
    *,
    progress: Progress | None = None,
    on_prepared: Callable[[PreparedJob], None] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    keep_state: bool = False,
) -> Metrics:
    """Run ``job`` in this process and write ``out/model.safetensors`` (dense, in the input
    checkpoint's dtypes), ``out/model.compact.safetensors`` (bitmask + nonzero values) and
    ``out/metrics.json``.

    Nothing is written to ``out`` until the run succeeds, and then all at once (temp dir + rename).
    With ``state_dir``, the job and every epoch's full training state are kept there while the run
    trains (created only once the preflight passed); ``resume`` continues from the state found
    there; the directory is removed after success unless ``keep_state``. If writing ``out`` fails
    after training, ``OutputError`` says where the state waits.
    """
    output = OutputDir(out)  # refuses a non-empty destination before any work
    started = time.perf_counter()
    prepared = prepare(job, out=out)
    if on_prepared is not None:
        on_prepared(prepared)
    state = None
    reporter = None
    lock = None
    saved: list[int] = []
    if state_dir is not None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_state_dir(state_dir, out)
        if resume and StateDir(state_dir).training_state.is_file():
            state = TrainingState.load(state_dir)
        # Atomic: rewritten on every resume, and a full disk must not empty the job a resume needs.
        write_text_atomic(StateDir(state_dir).job, json.dumps({"job": job.to_dict(), "out": os.path.abspath(out)}, indent=1))

        def reporter(record, s) -> None:
            s.save(state_dir)
            saved.append(record.epoch)

    try:
        result = run(prepared, progress=progress, reporter=reporter, resume=state)
    except (TrainingDiverged, ConfigError, InputModelMismatch):
        if state_dir is not None and not keep_state:
            # Resuming would diverge again / fail on the same options / refuse the same input model: start over instead.
            shutil.rmtree(state_dir, ignore_errors=True)
        raise
    except BaseException as exc:
        if saved:
            exc.state_kept = state_dir  # type: ignore[attr-defined] - where a front end says to --resume from
        raise
    finally:
        if lock is not None:
            lock.close()
    metrics = result_metrics(prepared, result, world_size=1, wall_seconds=time.perf_counter() - started)
    try:
        with output.staging() as tmp:
            metrics = write_results(tmp, prepared, result, metrics)
    except OSError as exc:
        kept = (f"; the trained state is kept in {state_dir}: fix the cause, then continue with "
                f"`dg2pf prune --resume {state_dir}`") if state_dir is not None else ""
        raise OutputError(f"training finished but {out} could not be written ({exc.strerror or exc}){kept}") from exc
    if state_dir is not None and not keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return metrics


def _lock_state_dir(state_dir: Path, out: str | Path):
    """One run trains in a state directory at a time (two `dg2pf prune` with the same --out)."""
    import fcntl

    fh = open(StateDir(state_dir).lock, "a+")  # noqa: SIM115 - closed when the run ends
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ConfigError(f"another dg2pf run is training for --out {out} (its state is in {state_dir}); wait for it "
                          "or choose another --out", field="out") from None
    return fh


def state_dir_for(out: str | Path) -> Path:
    """Where ``dg2pf prune`` keeps a run's state while it trains: ``OUT.dg2pf-run`` beside ``OUT``."""
    absolute = Path(os.path.abspath(os.path.expanduser(out)))
    if not absolute.name:
        raise ConfigError(f"output {out} is the root directory; give a new directory for the results", field="out")
    return absolute.with_name(absolute.name + ".dg2pf-run")


def read_state_dir(state_dir: str | Path) -> tuple[PruneJob, Path]:
    """The job and output path an interrupted run left in ``state_dir`` (``dg2pf prune --resume``)."""
    path = StateDir(state_dir).job
    if not path.is_file():
        raise ConfigError(f"{state_dir} is not a dg2pf run's state directory (no {StateDir.JOB}); give the OUT.dg2pf-run "
                          "directory an interrupted `dg2pf prune` named", field="resume")
    try:
        doc = json.loads(path.read_text())
        return PruneJob.from_dict(doc["job"]), Path(doc["out"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); the state directory is damaged", field="resume") from exc
