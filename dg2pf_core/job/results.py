"""A finished job's result document: the ``Metrics`` of ``metrics.json`` (``result_metrics``), its
``latency`` section (``job_latency``), its ``quantization`` section (``job_quantization``, precision int8)
and the warnings it carries."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import Latency, Metrics, Quantization
from dg2pf_core.algorithm.batchnorm import settled_channels
from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.algorithm.loop import DG2PFResult
from dg2pf_core.algorithm.masks import layer_sparsity, layer_warnings, select_prunable
from dg2pf_core.algorithm.nm import nm_violations
from dg2pf_core.data.registry import DataSplits, eval_crop_pct
from dg2pf_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dg2pf_core.errors import DG2PFError
from dg2pf_core.io.latency import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_RUNS,
    DEFAULT_WARMUP,
    JOB_BUDGET_S,
    compare,
    measure_latency,
)
from dg2pf_core.io.metrics import size_report
from dg2pf_core.io.onnx_export import OnnxReport, export_onnx
from dg2pf_core.job.data import load_data
from dg2pf_core.job.model import load_checkpoint_model
from dg2pf_core.job.spec import PreparedJob
from dg2pf_core.models import get_arch


def result_metrics(prepared: PreparedJob, result: DG2PFResult, *, world_size: int, wall_seconds: float) -> Metrics:
    """The ``metrics.json`` document of a finished job (without the ``onnx`` and ``latency`` sections:
    ``write_results`` measures them on the weights as written)."""
    job, spec = prepared.job, prepared.arch
    size = size_report(result.model, result.masks, prepared.input_shape, prepared.device)
    last = result.history[-1] if result.history else {}
    layers = layer_sparsity(result.masks)
    nm = job.config.nm()
    # The check reads the weights as written, not the masks: groups over N nonzeros (0 when the pattern holds).
    violations = (
        {}
        if nm is None
        else {"nm_violations": nm_violations(select_prunable(result.model, job.config.selection()).params, nm)}
    )
    channel: dict = {}
    warned = layer_warnings(result.masks, job.config.warn_layer_sparsity)
    x = result.channels
    if job.config.channel and x is not None:
        # The result is the smaller dense network: sparsity is of channels, MACs and parameters against
        # the input model's (what this job started from).
        layers = x.layer_channels
        channel = {
            "target_macs_ratio": job.config.target_macs_ratio,
            "channels_total": x.channels_total,
            "channels_pruned": x.channels_pruned,
            "channel_sparsity": x.channels_pruned / x.channels_total,
            "macs_ratio": size.macs_sparse / x.macs_dense if x.macs_dense else None,
            "params_dense": x.params_dense,
            "params_ratio": size.params_total / x.params_dense,
            "skipped_groups": x.skipped_groups,
            "channel_multiple": x.channel_multiple,
        }
        # The masks are gone with the removed channels: the collapse warning reads each group's fraction.
        warned = _channel_warnings(layers, job.config.warn_layer_sparsity)
        if not x.channels_pruned:
            warned = [_nothing_removed(job.config, x.channels_total, x.channel_multiple), *warned]
        elif (
            job.config.target_macs_ratio is None
            and job.config.latency_budget_ms is None
            and abs(channel["channel_sparsity"] - job.config.sparsity) > 0.02
        ):
            warned.append(
                f"{channel['channel_sparsity']:.2%} of the channels were removed for sparsity {job.config.sparsity:g}: "
                f"kept widths rounded up to multiples of {x.channel_multiple} (channel_multiple) under the layer "
                "collapse guard could not come closer; lower channel_multiple for an exact channel fraction"
            )
    return Metrics(
        arch=job.arch,
        num_classes=job.num_classes,
        dataset=job.dataset,
        image_size=prepared.image_size,
        augment=getattr(prepared.splits, "augment", None),  # the policy trained with: asked for, or the default
        # folder datasets' evaluation crop (validation, test and serving alike); None where no crop applies
        crop_pct=eval_crop_pct(job.dataset, job.crop_pct if job.crop_pct is not None else spec.crop_pct),
        # the architecture's own preprocessing, kept with the model: serving reads it here, not from a registry
        # (a timm or package upgrade) that may have changed since
        mean=list(spec.mean or IMAGENET_MEAN),
        std=list(spec.std or IMAGENET_STD),
        interpolation=spec.interpolation or "bilinear",
        in_channels=prepared.arch.in_channels,
        class_names=prepared.splits.class_names,
        target_sparsity=job.config.sparsity
        if job.config.target_macs_ratio is None and job.config.latency_budget_ms is None
        else None,
        granularity=job.config.granularity,
        # The named configuration the job started from, and what it set otherwise (config holds every value).
        preset=job.config.preset,
        preset_departures=job.config.preset_departures(),
        # BatchNorm channels constant within every batch, settled to output their bias
        # (dg2pf_core/algorithm/batchnorm.py)
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
        layer_cap=x.layer_cap
        if channel
        else job.config.layer_cap(job.config.sparsity)
        if job.config.scope == "global" and nm is None
        else None,
        # the data's, the run's (an input model near chance), then the result's
        warnings=[
            *(getattr(prepared.splits, "warnings", None) or []),
            *result.warnings,
            *warned,
            *_over_budget(result),
        ],
        latency_objective=result.latency,
        dtype=_dtype_summary(prepared.dtypes),
        skipped_images=len(getattr(prepared.splits, "skipped_images", []) or []),
        skipped_image_files=list(getattr(prepared.splits, "skipped_images", []) or [])[:100],
        config=job.config.to_dict(),
        history=result.history,
    )


def job_quantization(prepared: PreparedJob, onnx: OnnxReport, files: Artifacts) -> Quantization:
    """Precision int8: ``model.int8.onnx`` from ``model.onnx`` (``dg2pf_core.io.quantize``), calibrated on
    the job's training images, kept only within ``max_quantization_drop`` of the fp32 model's validation
    top-1; its test top-1 when kept. Never fails the job: the section says what happened."""
    cfg = prepared.job.config
    if not onnx.written:
        return Quantization(
            precision=cfg.precision, written=False, reason=f"there is no {Artifacts.ONNX} to quantize ({onnx.reason})"
        )
    job = prepared.job
    try:
        # The training images as served (no augmentation), the same split: what activations are calibrated on.
        plain, _ = load_data(
            job.dataset,
            get_arch(job.arch, job.checkpoint),
            job.num_classes,
            job.image_size,
            job.val_fraction,
            cfg.seed,
            job.skip_bad_images,
            tuple(job.allowed_roots),
            "none",
            job.crop_pct,
        )
        return quantization_section(plain, files, cfg.max_quantization_drop, cfg.eval_batch_size)
    except Exception as exc:  # noqa: BLE001 - a finished training is not lost to its quantization
        files.int8_onnx.unlink(missing_ok=True)
        return Quantization(precision=cfg.precision, written=False, reason=f"{type(exc).__name__}: {exc}"[:500])


def quantization_section(splits: DataSplits, files: Artifacts, max_drop: float, eval_batch_size: int) -> Quantization:
    """``files.onnx`` quantized into ``files.int8_onnx`` when it keeps ``max_drop`` (calibrated on the
    training split, which ``splits`` gives without augmentation; checked on the validation split; the test
    top-1 of the kept model), as a section."""
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from dg2pf_core.io.quantize import batches_of, onnx_top1, quantize_int8  # noqa: PLC0415

    batch = min(64, eval_batch_size)
    calibration = DataLoader(splits.train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(splits.val, batch_size=eval_batch_size)
    report = quantize_int8(files.onnx, files.int8_onnx, batches_of(calibration), val, max_drop)
    if report.written and splits.test is not None:
        test = DataLoader(splits.test, batch_size=eval_batch_size)
        report.test_top1_int8 = onnx_top1(files.int8_onnx, test, torch.get_num_threads())
    return report


def job_latency(
    prepared: PreparedJob,
    pruned: nn.Module,
    onnx: OnnxReport,
    onnx_file: Path,
    macs_ratio: float | None,
    int8_file: Path | None = None,
) -> Latency:
    """The ``latency`` section of metrics.json: the unpruned input model (read again from the job's
    checkpoint) and the pruned one, timed side by side (``dg2pf_core.io.latency``) with this process's
    torch threads, within ``JOB_BUDGET_S``; on the GPU too when the job ran on one."""
    job = prepared.job
    notes: list[str] = []
    models = {"pruned": pruned}
    files = {"pruned": onnx_file} if onnx.written else {}
    if int8_file is not None:
        files["int8"] = int8_file
    if not onnx.written:
        notes.append(f"onnxruntime: not measured, there is no {Artifacts.ONNX} ({onnx.reason})")
    try:
        with tempfile.TemporaryDirectory(prefix="dg2pf-latency-") as tmp:
            try:
                _, models["dense"], _ = load_checkpoint_model(
                    job.arch, job.num_classes, job.checkpoint, key=job.checkpoint_key
                )
            except DG2PFError as exc:
                notes.append(f"dense: not measured, the input checkpoint cannot be read again ({exc.message})")
            if onnx.written and "dense" in models:
                dense_onnx = export_onnx(
                    models["dense"], prepared.input_shape, Path(tmp) / "dense.onnx", what="the dense model"
                )
                if dense_onnx.written:
                    files["dense"] = Path(tmp) / "dense.onnx"
                else:
                    notes.append(f"onnxruntime: dense not measured ({dense_onnx.reason})")
            report = measure_latency(
                models,
                prepared.input_shape,
                onnx=files,
                batch_sizes=DEFAULT_BATCH_SIZES,
                runs=DEFAULT_RUNS,
                warmup=DEFAULT_WARMUP,
                cuda=prepared.device.type == "cuda",
                budget_s=JOB_BUDGET_S,
            )
    except Exception as exc:  # noqa: BLE001 - a finished training is not lost to its latency measurement
        return Latency(measured=False, reason=f"{type(exc).__name__}: {exc}"[:500], macs_ratio=macs_ratio)
    document = report.to_dict()
    return Latency.model_validate(
        {
            **{k: v for k, v in document.items() if k not in ("backends", "notes")},
            "backends": compare(report),
            "macs_ratio": macs_ratio,
            "notes": notes + document["notes"],
        }
    )


OVER_BUDGET = "the pruned network measured"  # how the over-budget warning begins


def _over_budget(result: DG2PFResult) -> list[str]:
    """The warning of a network measured over its latency budget (the table predicted it within)."""
    x = result.latency
    if x is None or x.met is not False or x.measured_ms is None:
        return []
    return [
        f"{OVER_BUDGET} {x.measured_ms:.4g} ms ({x.backend}, {x.threads} thread(s), batch "
        f"{x.batch_size}), over latency_budget_ms {x.budget_ms:g}: the latency table predicted "
        f"{x.predicted_ms:.4g} ms ({100 * (x.error or 0):+.1f}%); ask for a budget that much lower"
    ]


def _nothing_removed(config: DG2PFConfig, channels: int, multiple: int = 1) -> str:
    """Why a channel job left the network as it was: its target was too mild for one channel, or for
    one block of ``multiple`` channels."""
    if config.latency_budget_ms is not None:
        return (
            f"no channel was removed: the dense network already measured within latency_budget_ms "
            f"{config.latency_budget_ms:g} (or no step of channel_multiple {multiple} saved time by the latency "
            "table); the model keeps the input's structure (only its weights were trained): ask for a smaller budget"
        )
    if config.target_macs_ratio is not None:
        why = f"target_macs_ratio {config.target_macs_ratio:g} is within one channel of the unpruned network's MACs"
    elif round(config.sparsity * channels) == 0:
        why = f"sparsity {config.sparsity:g} of {channels:,} prunable channels rounds to 0"
    else:
        return (
            f"no channel was removed: sparsity {config.sparsity:g} asks for {round(config.sparsity * channels):,} of "
            f"{channels:,} channels, and kept widths are rounded up to multiples of channel_multiple {multiple}, which "
            "put them all back; the model keeps the input's structure (only its weights were trained): lower "
            "channel_multiple or ask for a larger sparsity"
        )
    return (
        f"no channel was removed: {why}; the model keeps the input's structure (only its weights were trained): "
        "ask for a larger sparsity or a smaller target_macs_ratio"
    )


def _channel_warnings(removed: dict[str, float], threshold: float) -> list[str]:
    """The layer collapse warning of a channel job: groups (root layer -> fraction of its channels
    removed) beyond ``threshold``; empty when there are none."""
    above = {name: f for name, f in sorted(removed.items(), key=lambda kv: -kv[1]) if f > threshold}
    if not above:
        return []
    shown = ", ".join(f"{name} {f:.2%}" for name, f in list(above.items())[:5])
    more = f" and {len(above) - 5} more" if len(above) > 5 else ""
    return [
        f"{len(above)} layer(s) with more than {threshold:.0%} of their channels removed: {shown}{more}. A layer left "
        "with few channels can cost accuracy (layer collapse): raise layer_density_floor, lower max_layer_sparsity, "
        "ask for less (sparsity / a larger target_macs_ratio), or exclude the layer from pruning (exclude)."
    ]


def _dtype_summary(dtypes: dict[str, torch.dtype]) -> str:
    """The floating dtype(s) of the input checkpoint, which the pruned model.safetensors keeps."""
    names = sorted({str(d).removeprefix("torch.") for d in dtypes.values()})
    return names[0] if len(names) == 1 else ("mixed: " + ", ".join(names) if names else "none")
