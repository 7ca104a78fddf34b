"""Channel jobs pruned to a latency budget (latency_budget_ms): the run measures a latency table once,
prunes to the budget by it, keeps it for a resume, and states the budget, the prediction and the
measurement; what cannot be reached is refused with the numbers before any training."""

from __future__ import annotations

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
    assert LatencyTable.from_json(json.loads(state.latency_table)).to_json() == table.to_json()
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
        ({"latency_threads": 0}, r"latency_threads: must be in \[1, 1024\]"),
    ],
)
def test_bad_latency_options_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        DG2PFConfig(**{**CFG, "latency_budget_ms": 5.0, **change})
