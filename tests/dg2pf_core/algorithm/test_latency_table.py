"""The per-layer latency table: grids rounded to the channel multiple and monotone in width (whatever the
timer's noise), interpolation between grid points, one file format that round-trips, a table refused
for another machine/setting, and malformed files refused as ConfigError (field latency_table)."""

import copy
import dataclasses
import json
import math

import pytest
import torch

from dg2pf_core.algorithm import latency_table
from dg2pf_core.algorithm.channels import ChannelPlan, remove_channels
from dg2pf_core.algorithm.latency_table import (
    MAX_TABLE_BYTES,
    LatencyTable,
    LayerEntry,
    LayerOp,
    _monotone,
    build_table,
    grid,
    layer_ops,
    machine_here,
    measure_network,
)
from dg2pf_core.errors import ConfigError
from dg2pf_core.models import build_model

DIGITS = ("digits_cnn", (1, 8, 8))
MOBILENET = ("torchvision/mobilenet_v2", (3, 32, 32))  # has depthwise convolutions


@pytest.fixture(scope="module", autouse=True)
def _quick_timing():
    """A few timed runs per grid point: these tests check the table's structure, never its figures."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("LAYER_RUNS", 3), ("LAYER_WARMUP", 1), ("NETWORK_RUNS", 3), ("NETWORK_WARMUP", 1)):
            mp.setattr(latency_table, name, value)
        yield


def _build(arch: str, shape: tuple[int, ...], multiple: int, backend: str = "torch", **kw) -> LatencyTable:
    torch.manual_seed(0)
    model = build_model(arch, 10)
    return build_table(model, shape, machine_here(arch, backend, 1, 1, shape), multiple, **kw)


_TABLES: dict[tuple, LatencyTable] = {}


def _table(arch: str, shape: tuple[int, ...], multiple: int) -> LatencyTable:
    """Built once per module (a copy each time: tests may edit it)."""
    key = (arch, shape, multiple)
    if key not in _TABLES:
        _TABLES[key] = _build(arch, shape, multiple)
    return copy.deepcopy(_TABLES[key])


def _assert_monotone(entry: LayerEntry, name: str) -> None:
    ms = entry.ms
    if entry.op.depthwise:
        diagonal = [ms[i][i] for i in range(len(entry.in_widths))]
        assert diagonal == sorted(diagonal), name
        return
    for i, row in enumerate(ms):
        assert row == sorted(row), f"{name}: along out_widths at in width {entry.in_widths[i]}"
    for j in range(len(entry.out_widths)):
        column = [row[j] for row in ms]
        assert column == sorted(column), f"{name}: along in_widths at out width {entry.out_widths[j]}"


def _samples(channels: int, n: int = 9) -> list[int]:
    return sorted({max(1, round(channels * k / (n - 1))) for k in range(n)})


@pytest.mark.parametrize("arch,shape,multiple", [(*DIGITS, 1), (*DIGITS, 8), (*MOBILENET, 8)])
def test_grids_are_rounded_to_the_multiple_and_end_at_the_full_width(arch, shape, multiple):
    table = _table(arch, shape, multiple)
    assert table.layers.keys() == layer_ops(build_model(arch, 10), shape).keys()  # every Conv/Linear layer
    for name, e in table.layers.items():
        for widths, channels in ((e.in_widths, e.op.in_channels), (e.out_widths, e.op.out_channels)):
            assert widths == sorted(set(widths)), name  # strictly ascending
            assert widths[-1] == channels, name
            assert all(1 <= w <= channels and (w % multiple == 0 or w == channels) for w in widths), (name, widths)
        if e.op.depthwise:
            assert e.in_widths == e.out_widths, name
        assert len(e.ms) == len(e.in_widths) and all(len(r) == len(e.out_widths) for r in e.ms), name
    if arch == MOBILENET[0]:
        assert any(e.op.depthwise for e in table.layers.values())


def test_the_grid_is_fractions_of_the_width_rounded_up_to_the_multiple():
    assert grid(64, 1) == [8, 16, 32, 48, 64]
    assert grid(64, 16) == [16, 32, 48, 64]
    assert grid(10, 8) == [8, 10]  # the full width, not a multiple, closes it
    assert grid(3, 8) == [3]  # narrower than the multiple: the layer's own width only
    assert grid(1, 1) == [1]
    assert grid(7, 1) == [1, 2, 4, 6, 7]


@pytest.mark.parametrize("arch,shape,multiple", [(*DIGITS, 1), (*DIGITS, 8), (*MOBILENET, 8)])
def test_a_built_table_is_monotone_in_width(arch, shape, multiple):
    """Fewer channels never cost more: on the grid (running maximum) and between its points."""
    table = _table(arch, shape, multiple)
    for name, e in table.layers.items():
        _assert_monotone(e, name)
        ins, outs = _samples(e.op.in_channels), _samples(e.op.out_channels)
        if e.op.depthwise:
            along = [e.at(w, w) for w in outs]
            assert along == sorted(along), name
            continue
        for i in ins:
            row = [e.at(i, o) for o in outs]
            assert all(a <= b + 1e-12 for a, b in zip(row, row[1:])), name
        for o in outs:
            column = [e.at(i, o) for i in ins]
            assert all(a <= b + 1e-12 for a, b in zip(column, column[1:])), name
    # and so the network's prediction: every layer at half width costs no more than dense
    half = {n: (max(1, e.op.in_channels // 2), max(1, e.op.out_channels // 2)) for n, e in table.layers.items()}
    assert 0 < table.predict(half) <= table.dense_ms()


def test_the_running_maximum_smooths_timer_noise():
    assert _monotone([[3.0, 1.0], [2.0, 5.0]], depthwise=False) == [[3.0, 3.0], [3.0, 5.0]]
    assert _monotone([[2.0, 9.0], [0.5, 1.0]], depthwise=False) == [[2.0, 9.0], [2.0, 9.0]]
    # depthwise: one width, along the diagonal; the unused cells stay as they are
    assert _monotone([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 6.0]], depthwise=True) == [
        [4.0, 0.0, 0.0],
        [0.0, 4.0, 0.0],
        [0.0, 0.0, 6.0],
    ]


def test_widths_between_grid_points_interpolate_and_below_the_grid_clamp():
    op = LayerOp("conv", 16, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    entry = LayerEntry(op, [8, 16], [16, 32], [[1.0, 2.0], [3.0, 5.0]])
    assert entry.at(16, 32) == 5.0 and entry.at(8, 16) == 1.0  # the grid points themselves
    assert entry.at(12, 16) == pytest.approx(2.0)
    assert entry.at(16, 24) == pytest.approx(4.0)
    assert entry.at(12, 24) == pytest.approx((1.5 + 4.0) / 2)  # bilinear
    assert entry.at(1, 1) == 1.0  # never faster than measured
    dw = LayerOp("conv", 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 32, (8, 8))
    assert dw.depthwise
    entry = LayerEntry(dw, [16, 32], [16, 32], [[2.0, 0.0], [0.0, 4.0]])
    assert entry.at(32, 24) == pytest.approx(3.0)  # one width: the output's
    assert entry.at(16, 32) == 4.0


def test_layer_ops_reads_each_layer_as_the_forward_pass_sees_it():
    ops = layer_ops(build_model(*DIGITS[:1], 10), DIGITS[1])
    assert list(ops) == ["features.0.weight", "features.3.weight", "features.7.weight", "classifier.weight"]
    assert ops["features.3.weight"] == LayerOp("conv", 32, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    assert ops["features.7.weight"].input_size == (4, 4)  # after the max pool
    assert ops["classifier.weight"] == LayerOp("linear", 128, 10, (), (), (), (), 1, ())
    dw = layer_ops(build_model(MOBILENET[0], 10), MOBILENET[1])["features.1.conv.0.0.weight"]
    assert dw.depthwise and dw.groups == dw.in_channels == dw.out_channels == 32


def test_the_dense_prediction_is_the_measured_network_and_a_half_width_one_is_checked():
    torch.manual_seed(0)
    model = build_model(DIGITS[0], 10)
    plan = ChannelPlan.build(model, DIGITS[1])
    params = dict(model.named_parameters())

    def half(m: torch.nn.Module) -> torch.nn.Module:
        remove_channels(m, DIGITS[1], plan.pruned_channels(plan.select(params, 0.5, 0.5)))
        return m

    table = build_table(model, DIGITS[1], machine_here(DIGITS[0], "torch", 1, 1, DIGITS[1]), 8, half=half)
    assert table.dense_measured_ms > 0 and table.half_measured_ms > 0 and table.offset_ms == 0
    assert table.dense_ms() == pytest.approx(table.dense_measured_ms, rel=1e-9)  # scale: measured over the sum
    assert any(n.startswith("check: a network with every group at about half width") for n in table.notes)
    assert model.features[3].out_channels == 64  # measuring the half network left the model itself whole


def test_a_table_of_some_layers_measures_only_those():
    table = _build(*DIGITS, 8, layers=["features.3.weight", "classifier.weight"])
    assert list(table.layers) == ["features.3.weight", "classifier.weight"]
    assert table.predict({"features.0.weight": (1, 1)}) == table.dense_ms()  # a layer it lacks costs nothing


def test_a_table_round_trips_through_its_file(tmp_path):
    table = _table(*MOBILENET, 8)
    path = tmp_path / "table.json"
    table.write(path)
    again = LatencyTable.read(path)
    assert again.machine == table.machine
    assert again.to_json() == table.to_json()
    again.check(table.machine)  # measured for this setting: accepted
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        widths = {
            n: (
                int(torch.randint(1, e.op.in_channels + 1, (), generator=g)),
                int(torch.randint(1, e.op.out_channels + 1, (), generator=g)),
            )
            for n, e in table.layers.items()
        }
        assert again.predict(widths) == table.predict(widths)
    assert again.dense_ms() == table.dense_ms()


@pytest.mark.parametrize(
    "field,value",
    [
        ("backend", "onnxruntime"),
        ("threads", 2),
        ("batch_size", 8),
        ("input_shape", (1, 16, 16)),
        ("arch", "cifar/resnet18"),
    ],
)
def test_check_refuses_a_table_measured_for_another_setting(field, value):
    table = _table(*DIGITS, 8)
    here = dataclasses.replace(table.machine, **{field: value})
    with pytest.raises(ConfigError, match=f"latency_table: measured for another setting \\({field}: ") as e:
        table.check(here)
    assert e.value.field == "latency_table"
    assert repr(value) in str(e.value) and repr(getattr(table.machine, field)) in str(e.value)
    assert str(e.value).count(" here, ") == 1  # only the difference is named


def test_check_accepts_a_table_from_another_machine_with_the_same_setting():
    # The table is brought from where the model will serve: another CPU, another backend version.
    table = _table(*DIGITS, 8)
    table.check(dataclasses.replace(table.machine, cpu="another CPU (aarch64)", versions="torch 0.0"))


def test_check_accepts_the_setting_it_was_measured_for():
    table = _table(*DIGITS, 8)
    table.check(machine_here(DIGITS[0], "torch", 1, 1, [1, 8, 8]))  # the same setting, the shape as a list


def test_an_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="latency_backend") as e:
        machine_here(DIGITS[0], "tensorrt", 1, 1, DIGITS[1])
    assert e.value.field == "latency_backend"


def _first(doc: dict, name: str = "features.3.weight") -> dict:
    return doc["layers"][name]


def _set_depthwise(doc: dict) -> None:  # a depthwise op whose in and out grids differ
    _first(doc)["op"]["groups"] = _first(doc)["op"]["in_channels"]


MALFORMED = {
    "wrong format": lambda d: d.update(format="dg2pf-latency-table/0"),
    "no format": lambda d: d.pop("format"),
    "a negative figure": lambda d: _first(d)["ms"][-1].__setitem__(-1, -1.0),
    "a NaN figure": lambda d: _first(d)["ms"][0].__setitem__(0, math.nan),
    "an infinite figure": lambda d: _first(d)["ms"][0].__setitem__(0, math.inf),
    "a figure as text": lambda d: _first(d)["ms"][0].__setitem__(0, "1.0"),
    "a figure too large for a float": lambda d: _first(d)["ms"][0].__setitem__(0, 10**400),
    "a ragged row": lambda d: _first(d)["ms"][0].pop(),
    "a missing row": lambda d: _first(d)["ms"].pop(),
    "a grid that is not a list": lambda d: _first(d).update(ms=None),
    "no widths": lambda d: _first(d).update(in_widths=[]),
    "a width as a word": lambda d: _first(d)["in_widths"].__setitem__(0, "eight"),
    "a depthwise layer with two grids": _set_depthwise,
    "a missing machine": lambda d: d.pop("machine"),
    "a missing machine field": lambda d: d["machine"].pop("threads"),
    "infinite threads": lambda d: d["machine"].update(threads=math.inf),
    "a missing op field": lambda d: _first(d)["op"].pop("kernel"),
    "a missing grid": lambda d: _first(d).pop("ms"),
    "a missing scale": lambda d: d.pop("scale"),
    "a zero scale": lambda d: d.update(scale=0.0),
    "a NaN scale": lambda d: d.update(scale=math.nan),
    "a scale as a word": lambda d: d.update(scale="one"),
    "layers as a list": lambda d: d.update(layers=list(d["layers"].values())),
    "a layer as a number": lambda d: d["layers"].update({"features.3.weight": 3}),
    # values that passed once and broke later (a NaN written to metrics.json as null, a wrong interpolation)
    "a NaN dense measurement": lambda d: d.update(dense_measured_ms=math.nan),
    "an infinite build time": lambda d: d.update(build_seconds=math.inf),
    "no dense measurement": lambda d: d.update(dense_measured_ms=0.0),
    "a negative offset": lambda d: d.update(offset_ms=-100.0),
    "figures that sum past a float": lambda d: [
        r.__setitem__(i, 1e308) for e in d["layers"].values() for r in e["ms"] for i in range(len(r))
    ],
    "widths out of order": lambda d: _first(d).update(out_widths=list(reversed(_first(d)["out_widths"]))),
    "a zero width": lambda d: _first(d)["in_widths"].__setitem__(0, 0),
    "widths not ending at the layer's channels": lambda d: _first(d)["in_widths"].__setitem__(-1, 10_000),
    "an unknown kind": lambda d: _first(d)["op"].update(kind="weird"),
    "a negative input size": lambda d: _first(d)["op"].update(input_size=[-5, -5]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_table_is_refused_as_a_config_error(tmp_path, case):
    doc = _table(*DIGITS, 8).to_json()
    MALFORMED[case](doc)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(doc), encoding="utf-8")  # NaN and Infinity as Python's json writes them
    with pytest.raises(ConfigError, match="^latency_table: ") as e:
        LatencyTable.read(path)
    assert e.value.field == "latency_table"
    with pytest.raises(ConfigError, match="^latency_table: "):
        LatencyTable.from_json(doc)


def test_a_document_that_is_not_an_object_is_refused():
    for doc in ([], "dg2pf-latency-table/1", None, 3):
        with pytest.raises(ConfigError, match="^latency_table: not a dg2pf latency table"):
            LatencyTable.from_json(doc)


FILES = {
    "not JSON": lambda p: p.write_text('{"format": "dg2pf-latency-table/1", ', encoding="utf-8"),
    "not UTF-8": lambda p: p.write_bytes(b'{"format": "\xff\xfe"}'),
    "JSON nested too deeply": lambda p: p.write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8"),
    "empty": lambda p: p.write_bytes(b""),
    "over the size limit": lambda p: _sparse(p, MAX_TABLE_BYTES + 1),
    "a directory": lambda p: p.mkdir(),
    "missing": lambda p: None,
}


def _sparse(path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.write(b'{"format": "dg2pf-latency-table/1", "notes": ["')
        fh.truncate(size)  # a hole: nothing written (or read) past the start


@pytest.mark.parametrize("case", list(FILES))
def test_an_unreadable_table_file_is_refused_as_a_config_error(tmp_path, case):
    path = tmp_path / "table.json"
    FILES[case](path)
    with pytest.raises(ConfigError, match="^latency_table: ") as e:
        LatencyTable.read(path)
    assert e.value.field == "latency_table"
    if case == "over the size limit":
        assert "larger than 16 MiB" in str(e.value)


def test_an_onnxruntime_table_is_monotone_and_answers_for_onnxruntime_only():
    table = _build(*DIGITS, 8, backend="onnxruntime")
    assert table.machine.backend == "onnxruntime" and table.machine.versions.startswith("onnxruntime ")
    for name, e in table.layers.items():
        _assert_monotone(e, name)
    assert table.dense_measured_ms > 0 and table.dense_ms() == pytest.approx(table.dense_measured_ms, rel=1e-9)
    with pytest.raises(ConfigError, match="backend: 'torch' here, 'onnxruntime' in the table"):
        table.check(machine_here(DIGITS[0], "torch", 1, 1, DIGITS[1]))


def test_a_grouped_convolution_is_measured_at_its_full_widths_only():
    # ResNeXt/RegNet: widths of a grouped (not depthwise) conv must stay multiples of its groups, and
    # channel pruning leaves its groups dense; measuring it at a grid of widths crashed the table once.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1), torch.nn.Conv2d(64, 64, 3, groups=32), torch.nn.Flatten())
    table = build_table(model, (3, 8, 8), machine_here("grouped", "torch", 1, 1, (3, 8, 8)), 16)
    grouped = table.layers["1.weight"]
    assert (grouped.in_widths, grouped.out_widths) == ([64], [64])
    assert table.layers["0.weight"].out_widths == [16, 32, 48, 64]


def test_measuring_uses_the_asked_threads_and_leaves_threads_and_random_state_as_they_were():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    before = torch.get_num_threads()
    model = build_model(DIGITS[0], 10)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    measure_network(Probe(), (1, 4, 4), "torch", 1, 1)
    # building layers draws random weights: inside a forked random state, the caller's stream moves not
    build_table(model, DIGITS[1], machine_here(DIGITS[0], "torch", 1, 1, DIGITS[1]), 8)
    assert torch.equal(torch.rand(3), expected)
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_a_batch_whose_layer_outputs_would_not_fit_is_refused_from_shapes_alone():
    from torch import nn

    from dg2pf_core.algorithm.latency_table import MAX_ACTIVATION_BYTES, activation_bytes, check_batch_bytes

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    per_image = 4 * (8 * 16 * 16 + 8 * 16 * 16 + 8 * 16 * 16 + 10)  # conv, relu, flatten, linear outputs
    assert activation_bytes(model, (3, 16, 16)) == per_image
    assert next(model.parameters()).device.type == "cpu"  # measured on a copy, on the meta device
    fits = MAX_ACTIVATION_BYTES // per_image
    check_batch_bytes(fits, (3, 16, 16), "--batch-size", "batch_size", model)
    with pytest.raises(ConfigError, match=r"layer outputs come to .* GiB at that batch") as e:
        check_batch_bytes(fits + 1, (3, 16, 16), "--batch-size", "batch_size", model)
    assert e.value.field == "batch_size"
