"""A per-layer latency model of a channel-pruned network: a lookup table measured on this machine.

Channel pruning changes each Conv/Linear layer's input and output widths. The table holds, for every
such layer of the input model, its latency measured **alone** (one Conv or Gemm, random weights, the
layer's own kernel, stride, padding, groups and input size, at the job's batch size) on a grid of
(input width, output width) points: widths of 1/8, 1/4, 1/2, 3/4 and all of its channels, rounded up to
``channel_multiple`` (HALP, NeurIPS 2022, and NetAdapt, ECCV 2018, use such tables; HALP's is also
per layer and width). Layers of the same shape are measured once. A width between grid points is
interpolated (bilinearly); below the smallest point the smallest point's figure is used, so the table
never predicts a network faster than it was measured to be. Each layer's grid is made monotone
(a running maximum over both widths): fewer channels never cost more, whatever the timer's noise.

The whole network costs more than its layers alone (activations, BatchNorm, additions, pooling), and
that cost shrinks with the widths too: the prediction is ``scale * sum(layer latencies)``, ``scale``
the dense network measured end to end over its layers' sum (``offset`` is kept at 0: a line fitted
through the dense network and a half-width one extrapolated to -44% errors on cifar/resnet18, the
proportional model to -7..+12%). The table records how far it predicts a half-width network it
measured (``notes``), and a job states the error on its own final network (``latency_objective``),
never assumed.

A table is valid for one machine, backend, thread count, batch size, input shape and architecture
(``Machine``); ``LatencyTable.check`` refuses one measured elsewhere. ``dg2pf latency-table`` writes one
for a machine a job will not run on (the serving machine), and a job can be given it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dg2pf_core.errors import ConfigError, DatasetError
from dg2pf_core.io.onnx_export import ort_session

TABLE_FORMAT = "dg2pf-latency-table/1"
BACKENDS = ("onnxruntime", "torch")
GRID_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
MAX_TABLE_BYTES = 16 << 20
MAX_GRID = 16  # widths per dimension a table may hold (it measures len(GRID_FRACTIONS))
MAX_LAYERS = 100_000
LAYER_RUNS, LAYER_WARMUP = 15, 3  # per grid point: the median of this many timed runs
NETWORK_RUNS, NETWORK_WARMUP = 20, 3


@dataclass(frozen=True)
class Machine:
    """Where and how a table was measured: a table answers for this and nothing else."""

    cpu: str
    backend: str
    threads: int
    batch_size: int
    input_shape: tuple[int, ...]
    arch: str
    versions: str  # the backend's version (ONNX Runtime or PyTorch)

    def differences(self, other: Machine, ignore: tuple[str, ...] = ()) -> list[str]:
        return [
            f"{k}: {getattr(self, k)!r} here, {getattr(other, k)!r} in the table"
            for k in asdict(self)
            if k not in ignore and getattr(self, k) != getattr(other, k)
        ]


@dataclass(frozen=True)
class LayerOp:
    """One Conv/Linear layer as the table measures it."""

    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    input_size: tuple[int, ...]  # spatial (conv) or leading (linear, beyond the batch) sizes

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups == self.in_channels and self.groups > 1

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class LayerEntry:
    """A layer's measured grid: ``ms[i][j]`` at input width ``in_widths[i]`` and output width
    ``out_widths[j]`` (a depthwise layer: one width, ``in_widths == out_widths``, ``ms[i][i]`` used)."""

    op: LayerOp
    in_widths: list[int]
    out_widths: list[int]
    ms: list[list[float]]

    def at(self, in_w: float, out_w: float) -> float:
        if self.op.depthwise:
            in_w = out_w
        i0, i1, a = _bracket(self.in_widths, in_w)
        j0, j1, b = _bracket(self.out_widths, out_w)
        if self.op.depthwise:
            return self.ms[i0][i0] * (1 - a) + self.ms[i1][i1] * a
        m = self.ms
        return (m[i0][j0] * (1 - a) + m[i1][j0] * a) * (1 - b) + (m[i0][j1] * (1 - a) + m[i1][j1] * a) * b


@dataclass
class LatencyTable:
    machine: Machine
    layers: dict[str, LayerEntry]  # Conv/Linear weight name -> its grid
    offset_ms: float = 0.0
    scale: float = 1.0
    dense_measured_ms: float = 0.0
    half_measured_ms: float = 0.0
    build_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def layer_sum(self, widths: Mapping[str, tuple[float, float]]) -> float:
        """The layers' latencies summed at ``widths`` (weight name -> (in, out)); a layer not named
        keeps its full widths."""
        total = 0.0
        for name, entry in self.layers.items():
            in_w, out_w = widths.get(name, (entry.op.in_channels, entry.op.out_channels))
            total += entry.at(in_w, out_w)
        return total

    def predict(self, widths: Mapping[str, tuple[float, float]]) -> float:
        """The whole network's predicted latency (ms) at ``widths``."""
        return self.offset_ms + self.scale * self.layer_sum(widths)

    def dense_ms(self) -> float:
        return self.predict({})

    def check(self, machine: Machine) -> None:
        """``ConfigError`` (field ``latency_table``) unless this table was measured for ``machine``'s setting:
        the same network, input shape, backend, threads and batch size. The CPU and the backend's version
        may differ: a table is brought from the machine the model will serve on."""
        diff = machine.differences(self.machine, ignore=("cpu", "versions"))
        if diff:
            raise ConfigError(
                f"latency_table: measured for another setting ({'; '.join(diff)}): build one for this job's "
                "with `dg2pf latency-table`, or leave latency_table out to have the job measure one here",
                field="latency_table",
            )

    # --- files ---
    def to_json(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "machine": asdict(self.machine),
            "offset_ms": self.offset_ms,
            "scale": self.scale,
            "dense_measured_ms": self.dense_measured_ms,
            "half_measured_ms": self.half_measured_ms,
            "build_seconds": round(self.build_seconds, 2),
            "notes": list(self.notes),
            "layers": {
                name: {"op": asdict(e.op), "in_widths": e.in_widths, "out_widths": e.out_widths, "ms": e.ms}
                for name, e in self.layers.items()
            },
        }

    def write(self, path: str | Path) -> None:
        from dg2pf_contract.artifacts import write_text_atomic  # noqa: PLC0415

        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, doc: object) -> LatencyTable:
        """A table from its JSON document; ``ConfigError`` (field ``latency_table``) naming what is wrong."""

        def bad(why: str) -> ConfigError:
            return ConfigError(f"latency_table: {why}", field="latency_table")

        if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
            raise bad(
                f"not a dg2pf latency table (expected format {TABLE_FORMAT!r}; write one with `dg2pf latency-table`)"
            )
        try:
            m = doc["machine"]
            machine = Machine(
                _text(m["cpu"]),
                _text(m["backend"]),
                _count(m["threads"]),
                _count(m["batch_size"]),
                tuple(_count(x) for x in _list(m["input_shape"])),
                _text(m["arch"]),
                _text(m["versions"]),
            )
            layers = {}
            for name, e in doc["layers"].items():
                o = e["op"]
                op = LayerOp(
                    _text(o["kind"]),
                    _whole(o["in_channels"]),
                    _whole(o["out_channels"]),
                    *(tuple(_whole(x) for x in _list(o[k])) for k in ("kernel", "stride", "padding", "dilation")),
                    _whole(o["groups"]),
                    tuple(_whole(x) for x in _list(o["input_size"])),
                )
                entry = LayerEntry(
                    op, [_whole(w) for w in _list(e["in_widths"])], [_whole(w) for w in _list(e["out_widths"])], e["ms"]
                )
                why = (
                    _op_problem(op)
                    or _grid_problem(entry.in_widths, op.in_channels)
                    or _grid_problem(entry.out_widths, op.out_channels)
                )
                if why:
                    raise bad(f"layer {name!r}: {why}")
                if (
                    not entry.in_widths
                    or not entry.out_widths
                    or (op.depthwise and entry.in_widths != entry.out_widths)
                    or len(entry.ms) != len(entry.in_widths)
                    or any(len(row) != len(entry.out_widths) for row in entry.ms)
                    or any(
                        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                        for r in entry.ms
                        for v in r
                    )
                ):
                    raise bad(f"layer {name!r}: its grid is not a list of finite, non-negative figures per width")
                if _monotone(entry.ms, op.depthwise) != [list(map(float, r)) for r in entry.ms]:
                    raise bad(f"layer {name!r}: its figures fall as a width grows (a table is monotone)")
                layers[str(name)] = entry
            table = cls(
                machine,
                layers,
                float(doc["offset_ms"]),
                float(doc["scale"]),
                float(doc.get("dense_measured_ms", 0.0)),
                float(doc.get("half_measured_ms", 0.0)),
                float(doc.get("build_seconds", 0.0)),
                [_text(n, 1000) for n in _list(doc.get("notes", []))[:100]],
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise bad(f"malformed ({type(e).__name__}: {e})") from None
        if len(table.layers) > MAX_LAYERS:
            raise bad(f"{len(table.layers):,} layers; a table holds at most {MAX_LAYERS:,}")
        if not math.isfinite(table.scale) or table.scale <= 0 or table.offset_ms != 0.0:
            raise bad("its scale must be a finite positive number and its offset 0 (this version's model)")
        for key in ("dense_measured_ms", "half_measured_ms", "build_seconds"):
            value = getattr(table, key)
            if not math.isfinite(value) or value < 0:
                raise bad(f"{key} must be a finite, non-negative number, got {value}")
        if table.dense_measured_ms <= 0:
            raise bad("dense_measured_ms must be above 0: the dense network's measurement the table is scaled by")
        total = table.layer_sum({})
        if not math.isfinite(total) or total <= 0:
            raise bad("its figures sum to no finite positive latency")
        if not math.isclose(table.scale * total, table.dense_measured_ms, rel_tol=1e-6):
            raise bad(
                f"its scale times its layers' sum ({table.scale * total:.6g} ms) is not its dense measurement "
                f"({table.dense_measured_ms:.6g} ms): a table is scaled to the network it measured"
            )
        return table

    @classmethod
    def read(cls, path: str | Path, roots: Sequence[str] = ()) -> LatencyTable:
        """A table file; with ``roots`` (a service's data roots), only one that lies inside them. The file
        is opened without blocking and must be a regular file once open (a FIFO swapped in after a check
        cannot hang the reader), inside the roots as opened, and not a second name of another file."""
        from dg2pf_core.data.roots import confined_open  # noqa: PLC0415

        def bad(why: str) -> ConfigError:
            return ConfigError(f"latency_table: {why}", field="latency_table")

        text = str(path)
        if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise bad("the path must not be empty nor hold control characters")
        try:
            with confined_open(path, roots) as fh:
                if os.fstat(fh.fileno()).st_size > MAX_TABLE_BYTES:
                    raise bad(f"{path} is larger than {MAX_TABLE_BYTES >> 20} MiB")
                raw = fh.read(MAX_TABLE_BYTES + 1)
            if len(raw) > MAX_TABLE_BYTES:
                raise bad(f"{path} is larger than {MAX_TABLE_BYTES >> 20} MiB")
            doc = json.loads(raw.decode("utf-8"))
        except DatasetError as e:
            raise bad(e.message) from None
        except OSError as e:
            raise bad(f"cannot read {path} ({e.strerror or e})") from None
        except ValueError as e:  # not UTF-8, not JSON, an integer of 5000 digits
            raise bad(f"cannot read {path} ({type(e).__name__}: {str(e)[:200]})") from None
        except RecursionError:  # nesting deeper than the interpreter's stack
            raise bad(f"{path} is JSON nested too deeply") from None
        return cls.from_json(doc)


def _list(value: object) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return list(value)


def _whole(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a whole number, got {value!r}"[:100])
    return value


def _count(value: object) -> int:
    n = _whole(value)
    if n < 1:
        raise ValueError(f"expected at least 1, got {n}")
    return n


def _text(value: object, limit: int = 200) -> str:
    if not isinstance(value, str) or len(value) > limit or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"expected a line of text of at most {limit} characters, got {str(value)[:40]!r}")
    return value


def _op_problem(op: LayerOp) -> str | None:
    if op.kind not in ("conv", "linear"):
        return f"kind must be 'conv' or 'linear', got {op.kind!r}"
    if op.in_channels < 1 or op.out_channels < 1 or op.groups < 1:
        return "channels and groups must be at least 1"
    if any(v < 1 for v in (*op.kernel, *op.stride, *op.dilation, *op.input_size)) or any(p < 0 for p in op.padding):
        return "kernel, stride, dilation and input sizes must be at least 1, padding at least 0"
    if op.kind == "conv" and (len(op.kernel) != 2 or len(op.input_size) != 2):
        return "a conv layer has a 2-d kernel and a 2-d input"
    return None


def _grid_problem(widths: list[int], channels: int) -> str | None:
    """Widths must ascend strictly within [1, channels], end at ``channels``, at most MAX_GRID points."""
    if not widths or len(widths) > MAX_GRID:
        return f"a grid of 1 to {MAX_GRID} widths per dimension, got {len(widths)}"
    if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1 or widths[-1] != channels:
        return f"widths must ascend strictly from at least 1 to the layer's {channels} channels, got {widths}"
    return None


def _bracket(widths: Sequence[int], w: float) -> tuple[int, int, float]:
    """Indices of the grid points either side of ``w`` and the weight of the upper one (clamped)."""
    if w <= widths[0]:
        return 0, 0, 0.0
    if w >= widths[-1]:
        n = len(widths) - 1
        return n, n, 0.0
    for i in range(1, len(widths)):
        if w <= widths[i]:
            lo, hi = widths[i - 1], widths[i]
            return i - 1, i, (w - lo) / (hi - lo)
    raise AssertionError("unreachable")


def grid(channels: int, multiple: int) -> list[int]:
    """The widths a layer of ``channels`` is measured at: fractions of it rounded up to ``multiple``."""
    m = max(1, multiple)
    return sorted({min(channels, max(1, -(-math.ceil(f * channels) // m) * m)) for f in GRID_FRACTIONS})


# --- the layers of a model ------------------------------------------------------------------------


@torch.no_grad()
def layer_ops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerOp]:
    """Every Conv2d/Linear layer's shape as a forward pass at ``input_shape`` (C, H, W) sees it, by weight name."""
    ops: dict[str, LayerOp] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0]
        name = f"{names[module]}.weight"
        if isinstance(module, nn.Conv2d):
            ops[name] = LayerOp(
                "conv",
                module.in_channels,
                module.out_channels,
                tuple(module.kernel_size),
                tuple(module.stride),
                tuple(module.padding) if not isinstance(module.padding, str) else (0, 0),
                tuple(module.dilation),
                module.groups,
                tuple(x.shape[2:]),
            )
        elif isinstance(module, nn.Linear):
            ops[name] = LayerOp(
                "linear", module.in_features, module.out_features, (), (), (), (), 1, tuple(x.shape[1:-1])
            )

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.zeros(())).device
    try:
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return ops


# --- timing ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def measuring(threads: int) -> Iterator[None]:
    """Around every measurement: torch's intra-op threads set to ``threads`` (put back after), and the
    global random state untouched (building layers draws weights: a run's training must not depend on
    whether its table was measured here or brought)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(previous)


def _median_ms(run: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    took = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        took.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(took)


def _torch_layer(op: LayerOp, in_w: int, out_w: int) -> nn.Module:
    if op.kind == "linear":
        return nn.Linear(in_w, out_w)
    groups = in_w if op.depthwise else op.groups
    return nn.Conv2d(in_w, out_w, op.kernel, op.stride, op.padding, op.dilation, groups=groups)


def _onnx_layer(op: LayerOp, in_w: int, out_w: int, batch: int) -> bytes:
    """A one-node ONNX model (Conv or Gemm/MatMul) of the layer at these widths, random weights."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(0)
    if op.kind == "conv":
        groups = in_w if op.depthwise else op.groups
        w = rng.standard_normal((out_w, in_w // groups, *op.kernel), dtype=np.float32)
        node = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            kernel_shape=list(op.kernel),
            strides=list(op.stride),
            pads=list(op.padding) * 2,
            dilations=list(op.dilation),
            group=groups,
        )
        x_shape = [batch, in_w, *op.input_size]
    else:
        w = rng.standard_normal((in_w, out_w), dtype=np.float32)
        x_shape = [batch, *op.input_size, in_w]
        node = helper.make_node("MatMul", ["x", "w"], ["m"])
    b = rng.standard_normal((out_w,), dtype=np.float32)
    nodes = [node] if op.kind == "conv" else [node, helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString()


def measure_layer(op: LayerOp, in_w: int, out_w: int, backend: str, threads: int, batch: int) -> float:
    """One layer's median latency (ms) alone at these widths."""
    with measuring(threads):
        return _measure_layer(op, in_w, out_w, backend, threads, batch)


def _measure_layer(op: LayerOp, in_w: int, out_w: int, backend: str, threads: int, batch: int) -> float:
    if op.kind == "conv":
        shape = (batch, in_w, *op.input_size)
    else:
        shape = (batch, *op.input_size, in_w)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if backend == "torch":
        layer = _torch_layer(op, in_w, out_w).eval()

        def run() -> object:
            with torch.inference_mode():
                return layer(x)

    else:
        session = ort_session(_onnx_layer(op, in_w, out_w, batch), threads)
        feed = {"x": x.numpy()}

        def run() -> object:
            return session.run(None, feed)

    return _median_ms(run, LAYER_RUNS, LAYER_WARMUP)


MAX_BATCH_BYTES = 1 << 30  # one input batch the latency measurements time
MAX_ACTIVATION_BYTES = 8 << 30  # every layer's output at that batch, summed: a bound on what timing holds


def activation_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """Bytes of float32 outputs of every leaf module for one input, from shapes alone (a forward pass on
    the meta device: nothing allocated): what a forward pass may hold at once, per image, at most. None
    when the model cannot run on the meta device."""
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += 4 * output.numel()

    try:
        probe = copy.deepcopy(model).float().eval().to("meta")
        for m in probe.modules():
            if not list(m.children()):
                m.register_forward_hook(count)
        with torch.no_grad():
            probe(torch.zeros((1, *input_shape), device="meta"))
    except Exception:  # noqa: BLE001 - an operation without a meta kernel: the input-size bound still holds
        return None
    return total


def check_batch_bytes(
    batch: int, input_shape: tuple[int, ...], option: str, field: str, model: nn.Module | None = None
) -> None:
    """ConfigError (naming ``option``) when one float32 input batch to time is over ``MAX_BATCH_BYTES``,
    or (given the model) its activations at that batch over ``MAX_ACTIVATION_BYTES``: refused before
    anything is measured."""
    hw = "x".join(map(str, input_shape[1:]))
    size = 4 * batch * math.prod(input_shape)
    if size > MAX_BATCH_BYTES:
        raise ConfigError(
            f"{option} {batch} at {hw} is a {size / 2**30:.2f} GiB input to time; at most "
            f"{MAX_BATCH_BYTES / 2**30:g} GiB (a smaller {option})",
            field=field,
        )
    per_image = activation_bytes(model, input_shape) if model is not None else None
    if per_image is not None:
        held = batch * per_image
        if held > MAX_ACTIVATION_BYTES:
            raise ConfigError(
                f"{option} {batch} at {hw}: the network's layer outputs come to {held / 2**30:.2f} GiB at that "
                f"batch; at most {MAX_ACTIVATION_BYTES / 2**30:g} GiB are timed (a smaller {option})",
                field=field,
            )


def measure_network(model: nn.Module, input_shape: tuple[int, ...], backend: str, threads: int, batch: int) -> float:
    """The whole network's median latency (ms) at ``batch``, as the table's backend runs it with ``threads``."""
    with measuring(threads):
        return _measure_network(model, input_shape, backend, threads, batch)


def _measure_network(model: nn.Module, input_shape: tuple[int, ...], backend: str, threads: int, batch: int) -> float:
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(model).float().cpu().eval()
    if backend == "torch":

        def run() -> object:
            with torch.inference_mode():
                return model(x)

    else:
        import io  # noqa: PLC0415

        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17)
        session = ort_session(buffer.getvalue(), threads)
        feed = {"x": x.numpy()}

        def run() -> object:
            return session.run(None, feed)

    return _median_ms(run, NETWORK_RUNS, NETWORK_WARMUP)


def measure_onnx_file(path: str | Path, input_shape: tuple[int, ...], threads: int, batch: int) -> float:
    """An ONNX file's median latency (ms) at ``batch`` on ONNX Runtime with ``threads``, measured like
    ``measure_network``'s onnxruntime rows (a precision int8 model: it has no PyTorch form)."""
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0)).numpy()
    with measuring(threads):
        session = ort_session(Path(path), threads)
        feed = {session.get_inputs()[0].name: x}
        return _median_ms(lambda: session.run(None, feed), NETWORK_RUNS, NETWORK_WARMUP)


def backend_version(backend: str) -> str:
    if backend == "torch":
        return f"torch {torch.__version__}"
    import onnxruntime  # noqa: PLC0415

    return f"onnxruntime {onnxruntime.__version__}"


def machine_here(arch: str, backend: str, threads: int, batch: int, input_shape: tuple[int, ...]) -> Machine:
    from dg2pf_core.io.latency import cpu_name  # noqa: PLC0415

    if backend not in BACKENDS:
        raise ConfigError(f"latency_backend: must be one of {list(BACKENDS)}, got {backend!r}", field="latency_backend")
    return Machine(
        f"{cpu_name()} ({platform.machine()})",
        backend,
        int(threads),
        int(batch),
        tuple(input_shape),
        arch,
        backend_version(backend),
    )


def build_table(
    model: nn.Module,
    input_shape: tuple[int, ...],
    machine: Machine,
    multiple: int = 1,
    *,
    half: Callable[[nn.Module], nn.Module] | None = None,
    layers: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measure ``model``'s layers (all Conv2d/Linear, or the weight names ``layers``) on ``machine``'s
    backend, threads and batch size, and the dense network end to end (the scale); ``half(model)`` (a
    copy with every prunable group at about half width), measured too, checks the prediction."""
    started = time.perf_counter()
    backend, threads, batch = machine.backend, machine.threads, machine.batch_size
    ops = layer_ops(model, input_shape)
    if layers is not None:
        wanted = set(layers)
        ops = {n: op for n, op in ops.items() if n in wanted}
    with measuring(threads):
        measured: dict[tuple[str, int, int], float] = {}
        entries: dict[str, LayerEntry] = {}
        for i, (name, op) in enumerate(ops.items()):
            if progress is not None:
                progress(f"latency table: layer {i + 1} of {len(ops)} ({name})")
            if op.kind == "conv" and op.groups > 1 and not op.depthwise:
                # A grouped convolution's widths must stay multiples of its groups, and channel pruning
                # leaves such layers' groups dense (channels.py): its full widths alone.
                outs, ins = [op.out_channels], [op.in_channels]
            else:
                outs = grid(op.out_channels, multiple)
                ins = outs if op.depthwise else grid(op.in_channels, multiple)
            ms = []
            for in_w in ins:
                row = []
                for out_w in outs:
                    if op.depthwise and in_w != out_w:
                        row.append(0.0)
                        continue
                    key = (op.key(), in_w, out_w)
                    if key not in measured:
                        measured[key] = measure_layer(op, in_w, out_w, backend, threads, batch)
                    row.append(measured[key])
                ms.append(row)
            entries[name] = LayerEntry(op, ins, outs, _monotone(ms, op.depthwise))
        table = LatencyTable(machine, entries)
        table.dense_measured_ms = measure_network(model, input_shape, backend, threads, batch)
        dense_sum = table.layer_sum({})
        table.scale = table.dense_measured_ms / dense_sum if dense_sum > 0 else 1.0
        if half is not None:
            smaller = half(copy.deepcopy(model))
            table.half_measured_ms = measure_network(smaller, input_shape, backend, threads, batch)
            half_ops = layer_ops(smaller, input_shape)
            predicted = table.predict({n: (o.in_channels, o.out_channels) for n, o in half_ops.items() if n in ops})
            table.notes.append(
                f"check: a network with every group at about half width measured {table.half_measured_ms:.4g} ms, "
                f"predicted {predicted:.4g} ms ({100 * (predicted / table.half_measured_ms - 1):+.1f}%)"
            )
        table.notes.append(f"{len(measured)} layer shapes measured for {len(ops)} layers")
    table.build_seconds = time.perf_counter() - started
    return table


def _monotone(ms: list[list[float]], depthwise: bool) -> list[list[float]]:
    """A running maximum over both widths (the grids ascend): fewer channels never cost more."""
    out = [list(map(float, row)) for row in ms]
    if depthwise:
        best = 0.0
        for i in range(len(out)):
            best = max(best, out[i][i])
            out[i][i] = best
        return out
    for i in range(len(out)):
        for j in range(len(out[i])):
            up = out[i - 1][j] if i else 0.0
            left = out[i][j - 1] if j else 0.0
            out[i][j] = max(out[i][j], up, left)
    return out
