"""Channel jobs pruned to a latency budget (latency_budget_ms): the run measures a latency table once,
prunes to the budget by it, keeps it for a resume, and states the budget, the prediction and the
measurement; what cannot be reached is refused with the numbers before any training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dg2pf_core import DG2PFConfig, TrainingState, run_dg2pf
from dg2pf_core.algorithm import latency_target
from dg2pf_core.algorithm.latency_table import LatencyTable, layer_ops
from dg2pf_core.errors import ConfigError
from dg2pf_core.models import build_model

SHAPE = (1, 8, 8)
CFG = dict(
    granularity="channel",
    sparsity=0.0,
    pruning_epochs=2,
    max_epochs=4,
    patience=1,
    batch_size=16,
    bn_recalibration_batches=0,
    channel_multiple=4,
    latency_backend="torch",
    latency_batch_size=8,
)


PLAIN = {"latency_backend": "onnxruntime", "latency_batch_size": 1}  # the latency options' defaults


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("digits_cnn", 4)


class Saved:
    def __init__(self, directory) -> None:
        self.directory = directory

    def __call__(self, record, state) -> None:
        state.save(self.directory / f"epoch{record.epoch}")


@pytest.fixture(scope="module")
def table() -> LatencyTable:
    """The table a run on this machine measures (once for the module: measuring takes seconds)."""
    cfg = DG2PFConfig(**{**CFG, "latency_budget_ms": 1e6})
    model = _model()
    from dg2pf_core.algorithm.channels import ChannelPlan

    plan = ChannelPlan.build(model, SHAPE)
    target = latency_target.LatencyTarget.prepare(model, SHAPE, plan, dict(model.named_parameters()), cfg)
    return target.table


def test_a_latency_budget_is_met_by_the_table_and_stated_with_the_measurement(tiny_loaders, table, tmp_path):
    budget = 0.6 * table.dense_ms()
    cfg = DG2PFConfig(**{**CFG, "latency_budget_ms": budget})
    result = run_dg2pf(_model(), tiny_loaders, cfg, input_shape=SHAPE, latency_table=table, reporter=Saved(tmp_path))
    x = result.latency
    assert x is not None and x.budget_ms == budget
    assert x.predicted_ms <= budget  # by the table, which the run pruned by
    widths = {n: (o.in_channels, o.out_channels) for n, o in layer_ops(result.model, SHAPE).items()}
    assert x.predicted_ms == pytest.approx(table.predict(widths))
    assert (
        x.measured_ms is not None and x.measured_ms > 0 and x.error == pytest.approx(x.predicted_ms / x.measured_ms - 1)
    )
    assert x.met == (x.measured_ms <= budget)
    assert (x.backend, x.threads, x.batch_size) == ("torch", 1, 8)
    assert 0 < result.channels.channels_pruned < result.channels.channels_total
    # the state carries the table: a resumed run prunes by the same one, to the same weights
    state = TrainingState.load(tmp_path / "epoch1")
    assert LatencyTable.from_json(json.loads(state.latency_target)["table"]).to_json() == table.to_json()
    again = run_dg2pf(_model(), tiny_loaders, cfg, input_shape=SHAPE, resume=state)
    a, b = result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tighter_budget_removes_more_channels(tiny_loaders, table):
    pruned = []
    for share in (0.8, 0.5):
        cfg = DG2PFConfig(**{**CFG, "latency_budget_ms": share * table.dense_ms(), "max_epochs": 2})
        pruned.append(
            run_dg2pf(_model(), tiny_loaders, cfg, input_shape=SHAPE, latency_table=table).channels.channels_pruned
        )
    assert pruned[0] < pruned[1]


def test_an_unreachable_budget_is_refused_with_the_numbers_before_training(tiny_loaders, table):
    cfg = DG2PFConfig(**{**CFG, "latency_budget_ms": table.dense_ms() * 1e-4})
    records = []
    with pytest.raises(
        ConfigError, match=r"latency_budget_ms .* cannot be reached: the dense network measured .* ms"
    ) as e:
        run_dg2pf(
            _model(), tiny_loaders, cfg, input_shape=SHAPE, latency_table=table, reporter=lambda r, s: records.append(r)
        )
    assert e.value.field == "latency_budget_ms" and "predicted at" in str(e.value)
    assert records == []  # not even the baseline


def test_a_table_measured_for_another_setting_is_refused(tiny_loaders, table):
    cfg = DG2PFConfig(**{**CFG, "latency_budget_ms": 0.5 * table.dense_ms(), "latency_batch_size": 1})
    with pytest.raises(
        ConfigError, match="latency_table: measured for another setting .*batch_size: 1 here, 8 in the table"
    ):
        run_dg2pf(_model(), tiny_loaders, cfg, input_shape=SHAPE, latency_table=table)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"granularity": "unstructured"}, "latency_budget_ms: only applies to granularity 'channel'"),
        ({"sparsity": 0.5}, "give sparsity or latency_budget_ms, not both"),
        ({"target_macs_ratio": 0.5}, "give latency_budget_ms or target_macs_ratio, not both"),
        ({"latency_budget_ms": 0.0}, r"latency_budget_ms: must be a number of milliseconds in \(0, "),
        ({"latency_budget_ms": float("nan")}, "latency_budget_ms: must be a finite number"),
        ({"latency_backend": "tensorrt"}, "latency_backend: must be one of"),
        ({"latency_threads": 0}, r"latency_threads: must be in \[1, 256\]"),
    ],
)
def test_bad_latency_options_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        DG2PFConfig(**{**CFG, "latency_budget_ms": 5.0, **change})


def test_a_run_that_measures_its_own_table_calibrates_the_aim_end_to_end(tiny_loaders):
    cfg = DG2PFConfig(**{**CFG, "latency_budget_ms": 1e6, "max_epochs": 2})
    # the budget from this machine's own dense figure, found by a first (unpruned) preparation
    from dg2pf_core.algorithm.channels import ChannelPlan

    model = _model()
    plan = ChannelPlan.build(model, SHAPE)
    dense = latency_target.LatencyTarget.prepare(model, SHAPE, plan, dict(model.named_parameters()), cfg).table
    assert dense.dense_measured_ms > 0
    budget = 0.6 * dense.dense_measured_ms
    result = run_dg2pf(_model(), tiny_loaders, DG2PFConfig(**{**CFG, "latency_budget_ms": budget}), input_shape=SHAPE)
    x = result.latency
    rounds = x.calibration
    assert 1 <= len(rounds) <= latency_target.CALIBRATION_ROUNDS
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rounds)
    assert rounds[0]["aim_ms"] == budget  # the first round aims at the budget itself
    under = [r for r in rounds if r["measured_ms"] <= budget]
    if under:  # the aim kept is the round measured closest under the budget
        assert x.aim_ms == max(under, key=lambda r: r["measured_ms"])["aim_ms"]
    else:  # none under: the tightest tried
        assert x.aim_ms == min(r["aim_ms"] for r in rounds)


def test_a_table_file_outside_the_data_roots_is_refused_without_saying_whether_it_exists(tmp_path, table):
    inside, outside = tmp_path / "roots", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    table.write(outside / "t.json")
    for path in (outside / "t.json", outside / "missing.json", inside / ".." / "elsewhere" / "t.json"):
        with pytest.raises(ConfigError, match="is outside the allowed roots") as e:
            LatencyTable.read(path, roots=[str(inside)])
        assert e.value.field == "latency_table"
    (inside / "link.json").symlink_to(outside / "t.json")
    with pytest.raises(ConfigError, match="outside the allowed roots"):
        LatencyTable.read(inside / "link.json", roots=[str(inside)])
    table.write(inside / "t.json")
    assert LatencyTable.read(inside / "t.json", roots=[str(inside)]).to_json() == table.to_json()


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"latency_budget_ms": None, "sparsity": 0.5, "latency_table": "t.json", **PLAIN},
            "latency_table: is a latency table",
        ),
        ({"latency_budget_ms": None, "sparsity": 0.5}, "latency_backend: applies to a job with latency_budget_ms"),
        ({"latency_budget_ms": None, "sparsity": 0.5, **PLAIN, "latency_threads": 4}, "latency_threads: applies to"),
        ({"latency_table": "/data/t\n.json"}, "latency_table: must not hold control characters"),
        ({"latency_table": ""}, "latency_table: must be a file path"),
        ({"latency_table": 5}, "latency_table: must be a file path"),
    ],
)
def test_a_latency_table_option_without_a_budget_or_not_a_path_is_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        DG2PFConfig(**{**CFG, "latency_budget_ms": 5.0, **change})


def test_a_table_of_another_network_is_refused_naming_the_first_layer_that_differs(tiny_loaders, table):
    import copy as copy_

    other = copy_.deepcopy(table)
    name = next(iter(other.layers))
    entry = other.layers[name]
    entry.op = dataclasses.replace(entry.op, input_size=(99, 99))  # the same names, another input size
    cfg = DG2PFConfig(**{**CFG, "latency_budget_ms": 0.5 * table.dense_ms()})
    with pytest.raises(ConfigError, match=f"latency_table: its layers are not this model's .*{name}") as e:
        run_dg2pf(_model(), tiny_loaders, cfg, input_shape=SHAPE, latency_table=other)
    assert e.value.field == "latency_table"
