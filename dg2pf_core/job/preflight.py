"""Checks before any training: what can fail because of the user's input or this machine fails here,
in seconds, with one line saying what to fix — never after an epoch, never as a traceback.

``prepare`` runs them in this order: options; device and AMP mode (valid for this machine); the output
location (writable, no file in the way: ``io.export.check_output``); the checkpoint(s) (recognised by
content, finite, fitting the architecture; fp16 compact values in range: ``check_static``, through
``job.model``); the data (every image decoded once, bad ones named or skipped); and a dry forward +
backward pass of the model on one real training batch at the configured batch size (per worker), image
size, device and AMP mode, which catches input sizes an architecture cannot take, a batch of 1 with
BatchNorm, outputs that are not logits, and a batch that does not fit in GPU memory. The dry run
leaves no trace: the model's weights and buffers and the RNG states are put back as they were.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dg2pf_core.algorithm.channels import MAX_STRUCTURE_STAGES, ChannelPlan, check_architecture, read_structure
from dg2pf_core.algorithm.latency_table import LatencyTable, check_batch_bytes
from dg2pf_core.algorithm.masks import select_prunable
from dg2pf_core.algorithm.nm import check_divisible
from dg2pf_core.errors import ConfigError, DG2PFError
from dg2pf_core.io.compact import check_values
from dg2pf_core.io.export import check_output
from dg2pf_core.job.data import load_data
from dg2pf_core.job.model import load_checkpoint_model
from dg2pf_core.job.spec import PreparedJob, PruneJob
from dg2pf_core.models import ArchSpec, get_arch, hf
from dg2pf_core.models.registry import parameter_count

_DEVICE_HINT = "use auto, cpu, cuda or cuda:N"


def check_static(
    job: PruneJob,
    *,
    meta: bool = False,
    max_params: int | None = None,
) -> tuple[ArchSpec, nn.Module, dict[str, torch.dtype], nn.Module | None]:
    """The checks that need neither the data nor the training machine: options, the architecture's
    size (``max_params``, counted before anything is built), the checkpoint(s) (by content, finite,
    fitting ``arch``), the selected weights (some, and for N:M granularity each row a whole number
    of groups) and fp16 compact values. What a service checks when a job is submitted (with
    ``meta``: the models are built on the meta device, no memory for weights); ``prepare`` runs them too."""
    job.config.validate()
    check_values(job.compact_values)
    if max_params is not None:
        count = parameter_count(job.arch, job.num_classes, job.checkpoint)
        if count > max_params:
            raise ConfigError(
                f"{job.arch} with {job.num_classes} classes has {count:,} parameters, over this service's "
                f"limit of {max_params:,} (DG2PF_MAX_MODEL_PARAMS)",
                field="arch",
            )
    if job.config.channel:
        # by name, before building: some graphs take minutes and GBs to trace
        check_architecture(get_arch(job.arch, job.checkpoint).name)
        earlier = read_structure(hf.weights_path(job.checkpoint))
        if earlier is not None and len(earlier.stages) >= MAX_STRUCTURE_STAGES:
            raise ConfigError(
                f"the checkpoint was channel-pruned {len(earlier.stages)} times already, the most a model "
                f"records ({MAX_STRUCTURE_STAGES}): prune it with granularity 'unstructured' or N:M, or start "
                "from a checkpoint with fewer stages",
                field="granularity",
            )
    arch, model, dtypes = load_checkpoint_model(
        job.arch,
        job.num_classes,
        job.checkpoint,
        meta=meta,
        fp16_values=job.compact_values == "fp16",
        key=job.checkpoint_key,
    )
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
            _, teacher, _ = load_checkpoint_model(
                job.arch, job.num_classes, job.teacher, what="teacher checkpoint", meta=meta
            )
        except DG2PFError as exc:
            raise type(exc)(
                exc.message if "teacher" in exc.message else f"--teacher: {exc.message}", field="teacher"
            ) from exc
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
    c = job.config
    if c.latency_budget_ms is not None or c.max_top1_drop is not None:  # before the data and the dry run
        size = arch.input_size if job.image_size is None else job.image_size
        shape = (arch.in_channels, size, size)
        check_batch_bytes(c.latency_batch_size, shape, "latency_batch_size", "latency_batch_size", model)
    splits, size = load_data(
        job.dataset,
        arch,
        job.num_classes,
        job.image_size,
        job.val_fraction,
        job.config.seed,
        job.skip_bad_images,
        tuple(job.allowed_roots),
        job.augment,
        job.crop_pct,
    )
    if dry:
        dry_run(
            model,
            teacher,
            splits.train,
            arch=job.arch,
            num_classes=job.num_classes,
            image_size=size,
            batch_size=job.config.batch_size,
            world_size=world_size,
            device=device,
            amp=job.config.amp,
        )
    # A latency table the job brought: read (inside the data roots, for a service) before any training.
    table = (
        None
        if job.config.latency_table is None
        else LatencyTable.read(job.config.latency_table, tuple(job.allowed_roots))
    )
    return PreparedJob(
        job,
        arch,
        model,
        teacher,
        splits,
        size,
        device,
        dtypes=dtypes,
        structure=read_structure(hf.weights_path(job.checkpoint)),
        latency_table=table,
    )


def check_device(name: str, amp: str) -> torch.device:
    """The torch device ``name`` asks for, if this machine has it, and an AMP mode it supports.

    Raises ConfigError (field ``device`` or ``amp``): an unknown device name, CUDA asked for where
    torch sees no GPU (or fewer than N+1), AMP asked for where it would not run (autocast is used on
    CUDA only: on CPU the run is fp32 and claiming fp16 in metrics.json would be false).
    """
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device {name!r} is not a device name; {_DEVICE_HINT}", field="device") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device {name!r}: dg2pf trains on cpu or cuda; {_DEVICE_HINT}", field="device")
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ConfigError(
                    f"device {name!r}: torch sees no CUDA GPU on this machine "
                    "(torch.cuda.is_available() is False); use --device cpu or auto",
                    field="device",
                )
            if device.index is not None and device.index >= count:
                raise ConfigError(
                    f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}", field="device"
                )
    if amp != "none" and device.type != "cuda":
        raise ConfigError(
            f"amp {amp!r} needs a CUDA device (mixed precision runs under CUDA autocast only), and this run "
            f"is on {device}; use --amp none on CPU",
            field="amp",
        )
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("amp 'bf16': this GPU does not support bfloat16; use --amp fp16 or none", field="amp")
    return device


@contextlib.contextmanager
def _untouched(model: nn.Module, device: torch.device):
    """Put the model's state (weights, BatchNorm statistics) and the RNG states back afterwards."""
    saved = copy.deepcopy(model.state_dict())
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    training = model.training
    try:
        yield
    finally:
        model.load_state_dict(saved)
        model.train(training)
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _first_batch(dataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(min(size, len(dataset)))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def dry_run(
    model: nn.Module,
    teacher: nn.Module | None,
    train_set,
    *,
    arch: str,
    num_classes: int,
    image_size: int,
    batch_size: int,
    world_size: int,
    device: torch.device,
    amp: str,
) -> None:
    """One forward + backward pass on the first real training batch, as each worker will run it.

    Raises ConfigError naming the cause: the batch a worker sees is 1 and the model has BatchNorm;
    the architecture cannot take ``image_size`` inputs; its training-mode output is not a logits
    tensor of shape [batch, num_classes]; the logits or the gradients are not finite; the batch
    does not fit in GPU memory.
    """
    from dg2pf_core.io.metrics import autocast_context

    per_worker = max(1, batch_size // world_size)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    workers = f" over {world_size} workers" if world_size > 1 else ""
    if has_bn and min(per_worker, len(train_set)) < 2:
        raise ConfigError(
            f"batch_size {batch_size}{workers} gives each training step {min(per_worker, len(train_set))} "
            f"image; {arch} has BatchNorm layers, which need at least 2 per step in training: use "
            f"--batch-size {2 * world_size} or more",
            field="batch_size",
        )
    model.to(device)
    with _untouched(model, device):
        inputs, targets = _first_batch(train_set, per_worker)
        inputs, targets = inputs.to(device), targets.to(device)
        model.train()
        try:
            with autocast_context(device, amp):
                logits = model(inputs)
                if teacher is not None:
                    teacher.to(device).eval()
                    with torch.no_grad():
                        teacher(inputs)
        except torch.OutOfMemoryError:
            raise ConfigError(
                f"batch_size {batch_size}{workers} does not fit in {device}'s memory for {arch} at "
                f"{image_size}x{image_size}; lower --batch-size",
                field="batch_size",
            ) from None
        except Exception as exc:  # noqa: BLE001 - the model cannot take this input: say which and why
            raise ConfigError(
                f"{arch} cannot run on {image_size}x{image_size} inputs ({_last_line(exc)}); "
                f"give a --image-size it accepts (its default: leave --image-size out)",
                field="image_size",
            ) from None
        if not isinstance(logits, torch.Tensor):
            raise ConfigError(
                f"{arch} returns a {type(logits).__name__} in training mode, not a logits tensor; "
                "dg2pf cannot prune it",
                field="arch",
            )
        if tuple(logits.shape) != (len(inputs), num_classes):
            raise ConfigError(
                f"{arch} returns logits of shape {tuple(logits.shape)} for a batch of {len(inputs)}, "
                f"expected ({len(inputs)}, {num_classes})",
                field="arch",
            )
        if not bool(torch.isfinite(logits).all()):
            raise ConfigError(
                f"{arch} gives non-finite logits on the first training batch with this checkpoint; "
                "check the checkpoint and the data",
                field="checkpoint",
            )
        loss = F.cross_entropy(logits.float(), targets)
        try:
            loss.backward()
        except torch.OutOfMemoryError:
            raise ConfigError(
                f"batch_size {batch_size}{workers} does not fit in {device}'s memory for {arch} at "
                f"{image_size}x{image_size} (backward pass); lower --batch-size",
                field="batch_size",
            ) from None
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            raise ConfigError(
                f"{arch}: the gradients of {len(bad)} tensor(s) are not finite on the first batch "
                f"(first: {bad[0]}); check the checkpoint and the data",
                field="checkpoint",
            )
        # Evaluation and the teacher run in eval mode, on the stored BatchNorm statistics: a checkpoint
        # can be finite and still give NaN there (a negative running_var).
        model.eval()
        check_eval_forward(
            model,
            inputs,
            arch=arch,
            num_classes=num_classes,
            image_size=image_size,
            device=device,
            amp=amp,
            what="the checkpoint",
        )
        if teacher is not None:
            check_eval_forward(
                teacher,
                inputs,
                arch=arch,
                num_classes=num_classes,
                image_size=image_size,
                device=device,
                amp=amp,
                what="the teacher checkpoint",
            )


@torch.no_grad()
def check_eval_forward(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    arch: str,
    num_classes: int,
    image_size: int,
    device: torch.device,
    amp: str = "none",
    what: str = "the checkpoint",
) -> None:
    """An eval-mode forward pass on ``inputs`` [B, C, H, W] gives finite logits [B, num_classes];
    ConfigError otherwise (the input size the model cannot take, or broken stored statistics)."""
    from dg2pf_core.io.metrics import autocast_context

    model.eval()
    try:
        with autocast_context(device, amp):
            logits = model(inputs.to(device))
    except Exception as exc:  # noqa: BLE001 - the model cannot take this input: say which and why
        raise ConfigError(
            f"{arch} cannot run on {image_size}x{image_size} inputs ({_last_line(exc)}); "
            f"give a --image-size it accepts (its default: leave --image-size out)",
            field="image_size",
        ) from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(inputs), num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(
            f"{arch} returns {got} in eval mode for a batch of {len(inputs)}, expected "
            f"({len(inputs)}, {num_classes}) logits",
            field="arch",
        )
    if not bool(torch.isfinite(logits).all()):
        raise ConfigError(
            f"{arch} with {what} gives non-finite logits in eval mode on the first batch (its stored "
            "BatchNorm statistics may be broken, e.g. a negative running_var): re-export it from a "
            "healthy training run",
            field="checkpoint",
        )


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text[:240]}"
