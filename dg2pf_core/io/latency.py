"""Measured inference latency: models side by side, PyTorch eager and ONNX Runtime, per batch size.

How it times (the house rule of docs/benchmarks.md): the models being compared run **interleaved in
one process** (one run of each in turn, the order rotating every round), so noise from other
processes hits them alike, and each figure is the median (and 90th percentile) of ``runs`` timed
forward passes after ``warmup`` untimed rounds. Thread counts are set, not inherited: PyTorch's
intra-op threads and ONNX Runtime's ``intra_op_num_threads`` are both ``threads`` (default: torch's
current count), ONNX Runtime with one inter-op thread and no spin-waiting.

The cost is bounded: with ``budget_s`` the time is shared out over the (backend, batch size) cells;
a cell whose rounds would not fit gets fewer runs (at least ``MIN_RUNS`` while budget is left) and
says so in ``notes``, and its ``runs`` is the count actually timed. Nothing is cut silently.

On a CUDA device (``cuda=True``) the PyTorch models are also timed on the GPU (``torch_cuda``), with
``torch.cuda.synchronize()`` around every timed run. That path is written but has not run here (no
GPU was available to the session that wrote it).

Unstructured sparsity does not make dense kernels faster: a 90%-sparse model runs as fast as the
dense one on PyTorch and ONNX Runtime alike (measured: docs/benchmarks.md, section 10).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dg2pf_core.io.onnx_export import ort_session

MIN_RUNS = 3
DEFAULT_BATCH_SIZES = (1, 32)
DEFAULT_RUNS, DEFAULT_WARMUP = 30, 5
JOB_BUDGET_S = 60.0  # what a job spends measuring, all cells together


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict:
        return {"median_ms": _figure(self.median_ms), "p90_ms": _figure(self.p90_ms), "runs": self.runs}


@dataclass
class LatencyReport:
    """``timings[backend][batch][model name]``; backends: ``torch`` (CPU), ``onnxruntime`` (CPU),
    ``torch_cuda``."""

    threads: int
    runs: int  # asked for per cell; each Timing has the count actually timed
    warmup: int
    budget_s: float | None
    timings: dict[str, dict[int, dict[str, Timing]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cuda_device: str | None = None

    def to_dict(self) -> dict:
        return {
            "device": "cpu",
            "cpu": cpu_name(),
            "threads": self.threads,
            "runs": self.runs,
            "warmup": self.warmup,
            "budget_s": self.budget_s,
            "seconds": round(self.seconds, 2),
            **({"cuda_device": self.cuda_device} if self.cuda_device else {}),
            "backends": {
                b: {str(n): {m: t.to_dict() for m, t in cells.items()} for n, cells in by_batch.items()}
                for b, by_batch in self.timings.items()
            },
            "notes": list(self.notes),
        }


def measure_latency(
    models: nn.Module | Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    onnx: str | Path | Mapping[str, str | Path] | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    cuda: bool = False,
    budget_s: float | None = None,
) -> LatencyReport:
    """Time ``models`` (one model, or several by name, timed interleaved) on random inputs
    ``[batch, *input_shape]`` for each batch size: PyTorch eager on the CPU, ONNX Runtime on the CPU
    for the models ``onnx`` gives a file for (a single path goes with a single model), and PyTorch
    on the GPU with ``cuda``. The models are left as they were (copied where a device differs)."""
    named = {"model": models} if isinstance(models, nn.Module) else dict(models)
    files = {} if onnx is None else ({next(iter(named)): onnx} if isinstance(onnx, (str, Path)) else dict(onnx))
    threads = threads or torch.get_num_threads()
    report = LatencyReport(threads=threads, runs=runs, warmup=warmup, budget_s=budget_s)
    started = time.perf_counter()
    backends: list[tuple[str, Callable[[], dict[str, Callable]]]] = [("torch", lambda: _torch_runners(named, "cpu"))]
    if files:
        backends.append(("onnxruntime", lambda: _ort_runners(files, threads)))
    if cuda:
        report.cuda_device = torch.cuda.get_device_name()
        backends.append(("torch_cuda", lambda: _torch_runners(named, "cuda")))
    cells = [(b, n) for b, _ in backends for n in batch_sizes]
    previous_threads = torch.get_num_threads()
    training = {name: m.training for name, m in named.items()}  # timed in eval mode, then put back
    torch.set_num_threads(threads)
    try:
        done = 0
        for backend, make in backends:
            runners = make()
            for batch in batch_sizes:
                left = None if budget_s is None else budget_s - (time.perf_counter() - started)
                share = None if left is None else left / (len(cells) - done)
                done += 1
                if share is not None and share <= 0:
                    report.notes.append(f"{backend} batch {batch}: not measured, the {budget_s:g} s budget was spent")
                    continue
                report.timings.setdefault(backend, {})[batch] = _time_cell(
                    runners,
                    batch,
                    input_shape,
                    runs,
                    warmup,
                    share,
                    backend == "torch_cuda",
                    report.notes,
                    f"{backend} batch {batch}",
                )
    finally:
        torch.set_num_threads(previous_threads)
        for name, m in named.items():
            m.train(training[name])
    report.seconds = time.perf_counter() - started
    return report


def compare(report: LatencyReport, dense: str = "dense", pruned: str = "pruned") -> dict:
    """The ``backends`` of a job's latency section: per backend and batch size, ``dense_ms``,
    ``pruned_ms`` (medians), ``speedup`` = dense / pruned (above 1: the pruned model is faster),
    their p90s and the runs timed."""
    out: dict = {}
    for backend, by_batch in report.timings.items():
        for batch, cells in by_batch.items():
            row: dict = {}
            if pruned in cells:
                row.update(
                    pruned_ms=_figure(cells[pruned].median_ms),
                    pruned_p90_ms=_figure(cells[pruned].p90_ms),
                    runs=cells[pruned].runs,
                )
            if dense in cells:
                row.update(dense_ms=_figure(cells[dense].median_ms), dense_p90_ms=_figure(cells[dense].p90_ms))
            if pruned in cells and dense in cells:
                row["speedup"] = _figure(cells[dense].median_ms / cells[pruned].median_ms)
            if "int8" in cells:  # precision int8: model.int8.onnx, on ONNX Runtime only
                row.update(int8_ms=_figure(cells["int8"].median_ms), int8_p90_ms=_figure(cells["int8"].p90_ms))
                if dense in cells:
                    row["int8_speedup"] = _figure(cells[dense].median_ms / cells["int8"].median_ms)
            out.setdefault(backend, {})[str(batch)] = row
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


# --- runners: one callable per model that runs a forward pass on a batch ---------------------------


def _torch_runners(models: Mapping[str, nn.Module], device: str) -> dict[str, Callable]:
    runners = {}
    for name, model in models.items():
        here = _on(model, torch.device(device)).eval()

        def run(x: torch.Tensor, model: nn.Module = here) -> None:
            with torch.inference_mode():
                model(x)

        runners[name] = run
    return runners


def _ort_runners(files: Mapping[str, str | Path], threads: int) -> dict[str, Callable]:
    runners = {}
    for name, path in files.items():
        session = ort_session(path, threads)
        input_name = session.get_inputs()[0].name

        def run(x: torch.Tensor, session=session, input_name: str = input_name) -> None:
            session.run(None, {input_name: x.numpy()})  # a view of the tensor's memory, no copy

        runners[name] = run
    return runners


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` if its tensors are float32 on ``device``, else a float32 copy there."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == device.type and (not t.is_floating_point() or t.dtype == torch.float32) for t in tensors):
        return model
    return copy.deepcopy(model).to(device).float()


def _time_cell(
    runners: Mapping[str, Callable],
    batch: int,
    input_shape: Sequence[int],
    runs: int,
    warmup: int,
    budget: float | None,
    cuda: bool,
    notes: list[str],
    label: str,
) -> dict[str, Timing]:
    """One (backend, batch size) cell: ``warmup`` untimed rounds (at least 2: the first run of a model
    allocates and plans, the second gives the cost of a round to plan with), then ``runs`` timed
    rounds, one run of every model per round in rotating order; fewer when ``budget`` (seconds)
    would be exceeded."""
    started = time.perf_counter()
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(batch))
    if cuda:
        x = x.cuda()
    names = list(runners)

    def one_round(offset: int) -> dict[str, float]:
        took = {}
        for i in range(len(names)):
            name = names[(i + offset) % len(names)]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runners[name](x)
            if cuda:
                torch.cuda.synchronize()
            took[name] = time.perf_counter() - t0
        return took

    one_round(0)  # the first run of a model allocates and plans: always untimed
    round_s = sum(one_round(1).values())  # warm-up round 2: the cost of a round, to plan with
    warmups = 2
    while warmups < warmup and (budget is None or time.perf_counter() - started + round_s < 0.2 * budget):
        one_round(warmups)
        warmups += 1
    if warmups < warmup:
        notes.append(f"{label}: {warmups} of {warmup} warm-up rounds (budget)")
    planned = runs
    if budget is not None:
        left = budget - (time.perf_counter() - started)
        planned = min(runs, max(MIN_RUNS if left > 0 else 1, int(left / max(round_s, 1e-9))))
        if planned < runs:
            notes.append(
                f"{label}: {planned} of {runs} runs, to stay within the budget ({budget:.1f} s for this cell; "
                f"a round of {len(names)} model(s) takes {1000 * round_s:.0f} ms)"
            )
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(planned):
        for name, took in one_round(r).items():
            times[name].append(took)
    return {name: _timing(t) for name, t in times.items()}


def _figure(value: float) -> float:
    return float(f"{value:.5g}")  # 5 significant digits: sub-microsecond noise is not information


def _timing(seconds: list[float]) -> Timing:
    ms = sorted(1000.0 * s for s in seconds)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
    return Timing(median_ms=statistics.median(ms), p90_ms=p90, runs=len(ms))
