"""Static int8 post-training quantization of an exported model (ONNX Runtime's tooling), checked, not trusted.

``quantize_int8`` takes the fp32 ``model.onnx`` a job exported and images the job already has:

- activations are calibrated on training images (``CALIBRATION_IMAGES`` of them, as served: the
  caller passes them without training augmentation), weights quantized per output channel, QDQ format
  (ONNX Runtime fuses the Quantize/DequantizeLinear pairs into integer kernels);
- each calibration method of ``METHODS`` is tried and the one with the best validation top-1 kept
  (ties: the first), every candidate's figure recorded;
- the kept model is written only if its validation top-1 is within ``max_drop`` points of the fp32
  model's (both run by ONNX Runtime on the same images); otherwise nothing is written and the report
  says why with both numbers;
- ``reduce_range`` (7-bit weights) is used on x86 CPUs without VNNI, where ONNX Runtime documents that
  u8s8 products can saturate (AVX2/AVX-512 without VNNI); with VNNI (this machine's AVX512-VNNI) or
  off x86 the full range is used. The choice is recorded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from dg2pf_contract.results import Quantization
from dg2pf_core.io.onnx_export import ort_session

CALIBRATION_IMAGES = 256
METHODS = ("minmax", "percentile")  # onnxruntime.quantization.CalibrationMethod names, in order of preference


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (None: not x86 or unknown)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def needs_reduce_range() -> bool:
    return cpu_has_vnni() is False


def onnx_top1(path: str | Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], threads: int = 1) -> float:
    """Top-1 (percent) of an ONNX model run by ONNX Runtime over ``(images, labels)`` batches, by the rule
    every evaluation and the serving answers use (``metrics.evaluate``: torch's top-k; int8 logits can tie)."""
    from dg2pf_core.io.metrics import evaluate  # noqa: PLC0415
    from dg2pf_core.io.onnx_backend import OrtModule  # noqa: PLC0415

    accuracy = evaluate(OrtModule(ort_session(path, threads), Path(path)), batches, torch.device("cpu"))
    if accuracy.samples == 0:
        raise ValueError("no images to evaluate")
    return accuracy.top1


def _calibration(images: Iterable[torch.Tensor], limit: int) -> list[np.ndarray]:
    out, n = [], 0
    for x in images:
        if n >= limit:
            break
        x = x[: limit - n]
        out.append(x.float().numpy())
        n += len(x)
    return out


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of batches."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name, self.batches, self.i = name, batches, 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def quantize_file(fp32: Path, out: Path, batches: list[np.ndarray], method: str, reduce_range: bool) -> None:
    """``fp32`` quantized into ``out`` as every int8 model here is (QDQ, per-channel int8 weights, uint8
    activations calibrated by ``method`` on ``batches``), unchecked: ``quantize_int8`` checks."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    fp32, out = Path(fp32).resolve(), Path(out).resolve()
    name = ort_session(fp32, 1).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="dg2pf-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX Runtime's calibrators print their progress and warn about the graph: not the job's log (its
        # augmented calibration model goes to a temporary folder of its own).
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _logging_off():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(out),
                _Reader(name, batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                }[method],
            )


@contextlib.contextmanager
def _logging_off() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(
    fp32: str | Path,
    out: str | Path,
    calibration: Iterable[torch.Tensor],
    val: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_drop: float,
    *,
    fp32_val_top1: float | None = None,
) -> Quantization:
    """Quantize ``fp32`` to ``out`` if the int8 model keeps validation top-1 within ``max_drop`` points; the
    report is the contract's ``Quantization`` (metrics.json's section, less the test top-1 the caller adds).

    ``calibration``: image batches (training images); ``val``: a re-iterable of (images, labels) batches.
    ``fp32_val_top1``: the fp32 ONNX model's validation top-1 when already known."""
    started = time.perf_counter()
    fp32, out = Path(fp32), Path(out)
    reduce_range = needs_reduce_range()
    batches = _calibration(calibration, CALIBRATION_IMAGES)
    report = Quantization(
        precision="int8",
        written=False,
        reduce_range=reduce_range,
        calibration_images=sum(len(b) for b in batches),
        max_drop=max_drop,
        bytes_fp32=fp32.stat().st_size,
    )
    if not batches:
        report.reason = "no training images to calibrate the activations with"
        return report
    reference = onnx_top1(fp32, val) if fp32_val_top1 is None else fp32_val_top1
    report.val_top1_fp32 = reference
    best: tuple[float, Path, str] | None = None
    with tempfile.TemporaryDirectory(prefix="dg2pf-int8-out-") as tmp:
        for method in METHODS:
            candidate = Path(tmp) / f"{method}.onnx"
            try:
                quantize_file(fp32, candidate, batches, method, reduce_range)
                top1 = onnx_top1(candidate, val)
            except Exception as exc:  # a method ONNX Runtime cannot apply to this graph: recorded, others tried
                report.candidates.append({"method": method, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            report.candidates.append({"method": method, "val_top1": top1})
            if best is None or top1 > best[0]:
                best = (top1, candidate, method)
        if best is None:
            report.reason = "ONNX Runtime could not quantize the model: " + "; ".join(
                f"{c['method']}: {c['error']}" for c in report.candidates
            )
        else:
            top1, candidate, method = best
            report.method, report.val_top1_int8 = method, top1
            if reference - top1 > max_drop:
                report.reason = (
                    f"int8 validation top-1 {top1:.2f} is {reference - top1:.3g} points under fp32's {reference:.2f}, "
                    f"more than max_quantization_drop {max_drop:g}: the fp32 model is kept"
                )
            else:
                shutil.copyfile(candidate, out)
                report.written, report.file, report.bytes_int8 = True, out.name, out.stat().st_size
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def batches_of(loader: Iterable) -> Iterator[torch.Tensor]:
    """The images of a loader's (images, labels) batches."""
    for x, _ in loader:
        yield x
