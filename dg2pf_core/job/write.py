"""A finished job's artifacts written into its output directory: the models, ``model.onnx``,
``metrics.json`` and the plots drawn from it."""

from __future__ import annotations

import logging
from pathlib import Path

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import Metrics
from dg2pf_core.algorithm.loop import DG2PFResult
from dg2pf_core.io.export import write_compact, write_model
from dg2pf_core.io.onnx_export import export_onnx
from dg2pf_core.io.plots import write_plots
from dg2pf_core.job.model import load_checkpoint_model
from dg2pf_core.job.results import job_latency, job_quantization
from dg2pf_core.job.spec import PreparedJob
from dg2pf_core.models import hf

log = logging.getLogger(__name__)


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
    if job.arch == hf.HF_ARCH:  # config.json and the image processor's beside model.safetensors: a model directory
        hf.write_files(hf.model_dir_of(job.checkpoint), out)
    _, pruned, _ = load_checkpoint_model(job.arch, job.num_classes, files.model, what="written model")
    onnx = export_onnx(pruned, prepared.input_shape, files.onnx, what=job.arch)
    macs_ratio = metrics.macs_sparse / metrics.macs_dense if metrics.macs_dense else None
    update: dict = {"onnx": onnx.section()}
    int8 = None
    if job.config.precision == "int8":
        update["quantization"] = quantization = job_quantization(prepared, onnx, files)
        int8 = files.int8_onnx if quantization.written else None
        if not quantization.written:
            done = "kept" if quantization.val_top1_int8 is not None else "made"  # checked and refused, or never made
            why = f"precision int8: {Artifacts.INT8_ONNX} not {done}: {quantization.reason}"
            update["warnings"] = [*metrics.warnings, why]
    update["latency"] = job_latency(prepared, pruned, onnx, files.onnx, macs_ratio, int8)
    metrics = metrics.model_copy(update=update)
    metrics.write(files.metrics)
    try:
        write_plots(metrics, out)
    except Exception as exc:  # noqa: BLE001 - pictures are drawn again any time (dg2pf plot); the model is the job
        log.warning(
            "the job's plots (training.png, layers.png) were not drawn: %s: %s; the model and metrics.json are "
            "written, draw them later with `dg2pf plot` on the output directory",
            type(exc).__name__,
            exc,
        )
    return metrics
