"""What computes a served model's logits (``DG2PF_SERVE_BACKEND``), and loading a model with it.

- ``torch`` (default): the job's architecture with its compact weights (``InferenceModel.load``), on
  the replica's device (a GPU with ``DG2PF_SERVE_GPUS_PER_REPLICA``).
- ``onnxruntime``: the job's ``model.onnx`` on ONNX Runtime's CPU provider
  (``dg2pf_core.io.onnx_backend``); no PyTorch weights are loaded.

Either way the model is an ``InferenceModel``: request parsing, image preprocessing, input errors,
top-k and labels are the same code, and the logits agree within the tolerance every job's export
was checked against (``dg2pf_core.io.onnx_export.ATOL`` relative to the largest logit).

A job whose ONNX export failed has no ``model.onnx``. On an ``onnxruntime`` service it is served by
PyTorch rather than refused: the two compute the same answers, so the backend is the operator's
choice of speed, not a property a prediction depends on, and a model the exporter cannot convert
(or one deployed before the backend was switched) stays servable. The switch is not silent: the
replica logs it with the job's recorded export failure, every predict response names the backend
that answered (``"backend"``), and ``GET /models`` shows it per model. This module imports no Ray,
so the API reports the same choice the replicas make.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dg2pf_core.io.inference import InferenceModel
from dg2pf_core.io.onnx_backend import BACKEND as ONNXRUNTIME
from dg2pf_core.io.onnx_backend import load_onnx_model, onnx_missing_reason

log = logging.getLogger("dg2pf.serving")

TORCH = "torch"
BACKENDS = (TORCH, ONNXRUNTIME)


def backend_for(configured: str, output_dir: str | Path) -> tuple[str, str | None]:
    """The backend that serves the job in ``output_dir`` on a service configured with ``configured``,
    and why it is not ``configured`` (``None`` when it is).

    Raises ``CheckpointError`` when ``output_dir`` is not a finished job's output."""
    if configured not in BACKENDS:
        raise ValueError(f"unknown serving backend {configured!r}; one of {', '.join(BACKENDS)}")
    if configured == ONNXRUNTIME:
        reason = onnx_missing_reason(output_dir)
        if reason is not None:
            return TORCH, reason
    return configured, None


def load_served_model(
    model_id: str, output_dir: str | Path, configured: str, device: str, threads: int
) -> InferenceModel:
    """Model ``model_id`` (the job's output in ``output_dir``) as ``configured`` serves it: ONNX Runtime
    with ``threads`` intra-op threads, or PyTorch on ``device`` (also when an ``onnxruntime`` service
    falls back for a job without ``model.onnx``, logged here). ``model.backend`` says which.

    Raises ``DG2PFError`` subclasses (``CheckpointError``, ``OnnxUnavailable``) with a message naming
    the files when the job's output cannot be loaded."""
    backend, reason = backend_for(configured, output_dir)
    if backend == ONNXRUNTIME:
        return load_onnx_model(output_dir, threads)
    if reason is not None:
        log.warning(
            "model %s is served by PyTorch, not ONNX Runtime (DG2PF_SERVE_BACKEND=%s): %s", model_id, configured, reason
        )
    return InferenceModel.load(output_dir, device)
