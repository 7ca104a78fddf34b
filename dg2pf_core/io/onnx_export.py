"""``model.onnx``: a pruned model for ONNX Runtime and other inference engines, kept only if it computes
what PyTorch computes.

The model is exported in eval mode, in float32 on the CPU (an fp16/bf16 model is exported as float32:
a job's ``model.onnx`` holds the weights of its ``model.safetensors`` as read back into the float32
architecture, which is what ``InferenceModel`` serves), for the job's input shape with a dynamic
batch axis, at the pinned opset ``OPSET``. It is then run on ONNX Runtime's CPU provider on a
batch of another size than the export's (so the dynamic axis is exercised too) and its logits are
compared with PyTorch's; the file is kept only if ``max |onnx - torch| <= ATOL * max(1, max |torch|)``.

Nothing here raises for a model that cannot be exported: the result says why (``OnnxReport.reason``,
one line a user can act on), so a finished training is never lost to its export.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import OnnxExport

# torch.onnx's function library (torchlib) is written for opset 18: exporting at it needs no version
# conversion, and ONNX Runtime has run it since 1.14.
OPSET = 18
# Allowed |onnx - torch| relative to the logits' scale: float32 kernels differ in summation order
# (observed: ~1e-7 on digits_cnn, ~4e-5 on resnet50 at logits of ~45, i.e. ~1e-6 relative).
ATOL = 1e-4
EXPORT_BATCH, CHECK_BATCH = 2, 3
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_MAX_REASON = 300


@dataclass(frozen=True)
class OnnxReport:
    written: bool
    opset: int = OPSET
    max_abs_diff: float | None = None  # over the check batch, when the check ran
    tolerance: float | None = None
    reason: str | None = None  # why the file was not written
    seconds: float = 0.0

    def section(self) -> OnnxExport:
        """The ``onnx`` section of metrics.json."""
        if not self.written:
            return OnnxExport(written=False, reason=self.reason)
        return OnnxExport(
            written=True,
            file=Artifacts.ONNX,
            opset=self.opset,
            max_abs_diff=self.max_abs_diff,
            tolerance=self.tolerance,
            check_batch=CHECK_BATCH,
            seconds=round(self.seconds, 2),
        )

    def to_dict(self) -> dict:
        return self.section().model_dump(exclude_unset=True)


def ort_session(path: str | Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's thread count),
    one inter-op thread, and no spin-waiting: idle threads of one session must not take the CPU from
    another one measured right after it (see ``latency``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    model = path if isinstance(path, bytes) else str(path)  # a file, or a serialized model in memory
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def export_onnx(
    model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *, check: bool = True, what: str = "the model"
) -> OnnxReport:
    """Export ``model`` for inputs ``[batch, *input_shape]`` to ``path`` and check it against PyTorch.

    ``path`` exists afterwards only if the export worked and (with ``check``) ONNX Runtime's logits
    matched PyTorch's within the tolerance. ``what`` names the model in the reason."""
    started = time.perf_counter()
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    cpu = _float32_cpu(model)
    try:
        try:
            _export(cpu, input_shape, partial)
        except ImportError as exc:
            return _failed(f"the ONNX exporter is not installed ({exc}); install onnx and onnxscript", started)
        except Exception as exc:  # noqa: BLE001 - whatever the exporter rejects, the job goes on without the file
            return _failed(f"the ONNX exporter could not convert {what}: {_root_cause(exc)}", started)
        if partial.stat().st_size >= 2**31:
            return _failed(f"{what} exported to more than 2 GiB, the limit of a single-file ONNX model", started)
        if not check:
            os.replace(partial, path)
            return OnnxReport(True, seconds=time.perf_counter() - started)
        try:
            diff, tolerance = _compare(cpu, input_shape, partial)
        except Exception as exc:  # noqa: BLE001 - a file ONNX Runtime cannot run is not kept either
            return _failed(f"ONNX Runtime could not run the exported model: {_root_cause(exc)}", started)
        if not diff <= tolerance:  # also catches NaN
            return _failed(
                f"the exported model's logits differ from PyTorch's by up to {diff:.3g} (allowed: "
                f"{tolerance:.3g}); not kept",
                started,
                diff,
                tolerance,
            )
        os.replace(partial, path)
        return OnnxReport(True, max_abs_diff=diff, tolerance=tolerance, seconds=time.perf_counter() - started)
    finally:
        partial.unlink(missing_ok=True)


def _float32_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when it already is float32 on the CPU, else a float32 CPU copy (the caller's
    model stays where it is); in eval mode either way (the caller's training flag is not restored
    here: a finished job's model is not trained further)."""
    params = [*model.parameters(), *model.buffers()]
    on_cpu_fp32 = all(
        t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32) for t in params
    )
    out = model if on_cpu_fp32 else copy.deepcopy(model).cpu().float()
    return out.eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export prints graphs and logs tracebacks (at ERROR level) when it gives up, and warns
    about deprecations: none of it is for the user of a job, who gets the reason instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _export(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    example = torch.zeros((EXPORT_BATCH, *input_shape))
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )


@torch.no_grad()
def _compare(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> tuple[float, float]:
    """(max |onnx - torch|, tolerance) on a fixed random batch of ``CHECK_BATCH`` inputs."""
    inputs = torch.randn((CHECK_BATCH, *input_shape), generator=torch.Generator().manual_seed(0))
    expected = model(inputs).float()
    session = ort_session(path)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]).float()
    if got.shape != expected.shape:
        raise ValueError(f"ONNX Runtime returned logits of shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    tolerance = ATOL * max(1.0, float(expected.abs().max()))
    return float((got - expected).abs().max()), tolerance


def _failed(reason: str, started: float, diff: float | None = None, tolerance: float | None = None) -> OnnxReport:
    return OnnxReport(
        False, reason=reason, max_abs_diff=diff, tolerance=tolerance, seconds=time.perf_counter() - started
    )


def _root_cause(exc: BaseException) -> str:
    """The innermost error's type and first line (the exporter wraps the real cause in pages of
    advice), and the line of the model's code that raised it when torch.export names one."""
    outer = str(exc)
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    where = re.findall(
        r'File "([^"]+)", line (\d+), in (\w+)', outer.split("The following call raised this error:")[-1]
    )
    if where and "The following call raised this error:" in outer:
        file, line, function = where[0]
        text += f" (in {function}, {os.path.basename(file)}:{line})"
    return text
