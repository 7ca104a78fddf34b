"""A finished job's ``model.onnx`` answering on ONNX Runtime, behind the same ``InferenceModel``.

``load_onnx_model(output_dir, threads)`` returns an ``InferenceModel`` whose logits come from an
``onnxruntime.InferenceSession`` (CPU provider) of the job's ``model.onnx`` (its ``model.int8.onnx`` when
the job kept one: ``precision`` says which); inputs, image
preprocessing, top-k and labels are ``InferenceModel``'s own, so an answer differs from the PyTorch
one only by the float32 rounding the job's export check allowed (``onnx_export.ATOL`` relative to
the logits' scale). Only the ONNX file is read, besides ``metrics.json``: no PyTorch weights are
loaded.

A job whose export failed has no ``model.onnx``; ``OnnxUnavailable`` then says why, with the reason
the job recorded in its ``metrics.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import ModelInfo
from dg2pf_core.errors import CheckpointError
from dg2pf_core.io.inference import InferenceModel, read_job_metrics
from dg2pf_core.io.onnx_export import ort_session

BACKEND = "onnxruntime"
log = logging.getLogger(__name__)


class OnnxUnavailable(CheckpointError):
    """A job's output has no ``model.onnx`` ONNX Runtime could serve."""


class OrtModule(nn.Module):
    """An ONNX Runtime session as a module: ``forward([N, C, H, W] float32) -> [N, num_classes]``
    float32 logits on the CPU, for any batch size ``N`` (a job's model.onnx has a dynamic batch axis).

    It has no parameters; ``InferenceModel`` runs it like the PyTorch architecture. ``session.run``
    is thread-safe, so concurrent forward passes need no lock."""

    def __init__(self, session: Any, path: Path) -> None:
        super().__init__()
        self.session, self.path = session, path
        self.input_name = session.get_inputs()[0].name

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


def onnx_missing_reason(output_dir: str | Path, meta: ModelInfo | None = None) -> str | None:
    """``None`` when ``output_dir`` holds a ``model.onnx``, else why it does not, in words a user can
    act on: the export failure the job recorded in ``metrics.json`` (``meta``, read when not given)."""
    files = Artifacts(output_dir)
    if files.onnx.is_file():
        return None
    section = (meta if meta is not None else read_job_metrics(files.root)).onnx
    if section is None:
        return (
            f"the job wrote no {files.ONNX} (its {files.METRICS} has no 'onnx' section: it ran before dg2pf "
            "exported ONNX); run the job again to get one"
        )
    if not section.written:
        return f"the job's ONNX export failed: {section.reason or 'no reason recorded'}"
    return f"{files.ONNX} was written by the job but is no longer in {files.root}"


def _int8_kept(files: Artifacts, meta: ModelInfo) -> bool:
    q = meta.quantization
    if q is None or not q.written:
        return False
    size = files.int8_onnx.stat().st_size if files.int8_onnx.is_file() else None
    if size is None or (q.bytes_int8 is not None and size != q.bytes_int8):
        log.warning(
            "%s: metrics.json says the job kept %s (%s bytes), but the file there is %s: serving %s instead",
            files.root,
            files.INT8_ONNX,
            q.bytes_int8,
            "missing" if size is None else f"{size} bytes",
            files.ONNX,
        )
        return False
    return True


def load_onnx_model(output_dir: str | Path, threads: int) -> InferenceModel:
    """The job in ``output_dir`` with its logits computed by ONNX Runtime's CPU provider, using
    ``threads`` intra-op threads (one inter-op thread, no spin-waiting: idle sessions of other models
    in the same process cost no CPU).

    Raises ``CheckpointError`` for an output directory that is not a finished job's, and
    ``OnnxUnavailable`` (naming the directory and the job's recorded export failure) when it has no
    ``model.onnx`` or ONNX Runtime cannot load it."""
    out = Path(output_dir)
    meta = read_job_metrics(out)
    reason = onnx_missing_reason(out, meta)
    if reason is not None:
        raise OnnxUnavailable(f"{out} cannot be served by ONNX Runtime: {reason}", field="model")
    # A job run with precision int8 kept model.int8.onnx only when it passed its accuracy check: it is
    # served when metrics.json says so and the file is the one the job wrote (its size); else model.onnx.
    files = Artifacts(out)
    precision = "int8" if _int8_kept(files, meta) else "fp32"
    onnx = files.int8_onnx if precision == "int8" else files.onnx
    try:
        session = ort_session(onnx, threads=max(1, int(threads)))
    except ImportError as exc:
        raise OnnxUnavailable(f"ONNX Runtime is not installed ({exc}); install onnxruntime", field="model") from exc
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a bad or truncated file
        raise OnnxUnavailable(
            f"ONNX Runtime cannot load {onnx}: {str(exc).splitlines()[0][:300]}", field="model"
        ) from exc
    return InferenceModel.for_module(OrtModule(session, onnx), meta, backend=BACKEND, precision=precision)
