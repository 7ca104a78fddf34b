"""max_top1_drop: the budgets a search tries, the choice it makes, and one whole search on Ray Tune."""

from __future__ import annotations

import json

import pytest
import ray

from dg2pf_contract.results import Metrics, ParetoPoint
from dg2pf_core import DG2PFConfig, PruneJob, run_dg2pf
from dg2pf_core.errors import ConfigError
from dg2pf_ray.cluster import connect
from dg2pf_ray.fastest import (
    ABOVE_FASTEST,
    HIGHEST_SHARE,
    budgets,
    check_resolution,
    choose,
    fastest_within,
    fp32_chosen_reason,
)
from dg2pf_ray.tune import TuneOptions


def test_budgets_run_from_near_dense_down_to_just_above_the_fastest_allowed():
    got = budgets(10.0, 2.0, 4)
    assert got[0] == pytest.approx(HIGHEST_SHARE * 10.0) and got[-1] == pytest.approx(ABOVE_FASTEST * 2.0)
    assert all(a > b for a, b in zip(got, got[1:]))
    ratios = [b / a for a, b in zip(got, got[1:])]
    assert ratios == pytest.approx([ratios[0]] * 3)  # geometric
    assert len(budgets(10.0, 2.0, 1)) == 1 and 2.2 < budgets(10.0, 2.0, 1)[0] < 8.5
    # a guard that allows little: the fastest budget never above the slowest
    assert budgets(10.0, 9.5, 3) == pytest.approx([8.5, 8.5, 8.5])


def _point(
    i: str, ms: float | None, top1: float | None, status: str = "completed", int8: tuple | None = None
) -> ParetoPoint:
    q8 = dict(int8_measured_ms=int8[0], int8_val_top1=int8[1]) if int8 else {}
    return ParetoPoint(trial_id=i, status=status, budget_ms=1.0, aim_ms=1.0, measured_ms=ms, val_top1=top1, **q8)


def test_the_choice_is_the_fastest_within_the_drop_else_the_most_accurate_said_so():
    points = [_point("a", 5.0, 99.0), _point("b", 3.0, 98.5), _point("c", 2.0, 96.0), _point("d", 1.0, None, "failed")]
    chosen, precision, met, why = choose(points, floor=98.0)
    assert chosen.trial_id == "b" and precision == "fp32" and met and "fastest of the 2 trial(s) within the drop" in why
    chosen, precision, met, why = choose(points, floor=99.5)
    assert chosen.trial_id == "a" and not met and "no trial kept val top-1 >= 99.50" in why
    assert choose([_point("d", None, None, "failed")], 90.0)[0] is None


def test_with_int8_each_trial_offers_two_models_and_the_floor_decides_the_precision():
    # a: int8 keeps the floor and is the fastest of all; b: int8 fell under the floor, its fp32 is kept
    a = _point("a", 5.0, 99.0, int8=(1.5, 98.4))
    b = _point("b", 3.0, 98.5, int8=(1.0, 97.0))
    chosen, precision, met, why = choose([a, b], floor=98.0)
    assert (chosen.trial_id, precision, met) == ("a", "int8", True)
    assert "3 models (each trial's fp32 and int8) within the drop: trial a int8, 1.5 ms" in why
    chosen, precision, met, _ = choose([a, b], floor=98.45)  # a's int8 now under: b's fp32 is the fastest left
    assert (chosen.trial_id, precision, met) == ("b", "fp32", True)
    chosen, precision, met, why = choose([a, b], floor=99.5)  # none keeps it: the most accurate model, said so
    assert (chosen.trial_id, precision, met) == ("a", "fp32", False) and "trial a fp32, 99.00" in why
    # an int8 model without its figures (not kept by the trial) is not a candidate
    assert choose([_point("c", 4.0, 99.0)], 98.0)[1] == "fp32"
    # within the floor but slower than its own fp32 network (int8 overhead on a tiny one): fp32, said so
    slow = _point("s", 5.0, 95.0, int8=(6.0, 94.9))
    assert choose([slow], floor=94.0)[:3] == (slow, "fp32", True)
    assert "its int8 model measured 6 ms, slower than the fp32 network's 5 ms" in fp32_chosen_reason(slow, 94.0)
    assert "validation top-1 97.00 is under the max_top1_drop floor 98.00" in fp32_chosen_reason(b, 98.0)


def test_max_top1_drop_options_are_checked_and_a_single_run_refuses_it(tiny_loaders):
    with pytest.raises(ConfigError, match="max_top1_drop: only applies to granularity 'channel'"):
        DG2PFConfig(max_top1_drop=1.0)
    with pytest.raises(ConfigError, match="give max_top1_drop or latency_budget_ms, not both"):
        DG2PFConfig(granularity="channel", max_top1_drop=1.0, latency_budget_ms=2.0)
    with pytest.raises(ConfigError, match="give sparsity or max_top1_drop, not both"):
        DG2PFConfig(granularity="channel", max_top1_drop=1.0, sparsity=0.5)
    with pytest.raises(ConfigError, match="int8 model runs on ONNX Runtime only") as e:
        DG2PFConfig(granularity="channel", max_top1_drop=1.0, precision="int8", latency_backend="torch")
    assert e.value.field == "latency_backend"
    DG2PFConfig(granularity="channel", max_top1_drop=1.0, precision="int8")  # onnxruntime, the default
    with pytest.raises(ConfigError, match=r"max_top1_drop: must be points of top-1 in \(0, 100\]"):
        DG2PFConfig(granularity="channel", max_top1_drop=0.0)
    from tiny import TinyNet

    with pytest.raises(ConfigError, match="max_top1_drop is a search over latency budgets") as e:
        run_dg2pf(TinyNet(), tiny_loaders, DG2PFConfig(granularity="channel", max_top1_drop=1.0, channel_multiple=1))
    assert e.value.field == "max_top1_drop"


def test_a_drop_finer_than_one_validation_image_is_refused_before_any_work(digits_example, tmp_path):
    check_resolution(1.0, 100)  # one image is exactly one point: allowed
    with pytest.raises(ConfigError, match="allow at least 0.695") as e:
        check_resolution(0.694, 144)
    check_resolution(0.695, 144)  # the figure suggested is itself allowed
    with pytest.raises(ConfigError, match=r"less than one validation image \(100 images: 1 points each\)") as e:
        check_resolution(0.5, 100)
    assert e.value.field == "max_top1_drop"
    # the job's own split decides: digits holds out 10% of its training images for validation (~130)
    job = PruneJob(
        "digits_cnn",
        10,
        str(digits_example / "model.safetensors"),
        "digits",
        DG2PFConfig(granularity="channel", max_top1_drop=0.1, latency_batch_size=1),
    )
    with pytest.raises(ConfigError, match="less than one validation image"):
        fastest_within(job, tmp_path / "out", TuneOptions(samples=2, storage_path=str(tmp_path / "store")))
    assert not ray.is_initialized()  # refused before connecting to a cluster


@pytest.mark.slow
def test_a_search_returns_the_fastest_model_within_the_drop_int8_included_and_its_front(digits_example, tmp_path):
    ray.shutdown()
    connect(None)
    try:
        config = DG2PFConfig(
            granularity="channel",
            max_top1_drop=1.0,
            pruning_epochs=2,
            max_epochs=4,
            patience=2,
            precision="int8",  # precision is one more dimension of the search
        )
        job = PruneJob("digits_cnn", 10, str(digits_example / "model.safetensors"), "digits", config)
        out = tmp_path / "out"
        m = fastest_within(job, out, TuneOptions(samples=3, storage_path=str(tmp_path / "store")))
    finally:
        ray.shutdown()
    assert Metrics.read(out / "metrics.json").objective == m.objective
    o = m.objective
    front = [ParetoPoint.model_validate(p) for p in json.loads((out / "pareto.json").read_text())]
    # 3 budgets tried, less those measured out of reach before any trial (each said, with its figures)
    assert front == o.points and len(front) + len(o.skipped) == 3 and front and (out / "pareto.png").stat().st_size > 0
    assert all("cannot be reached" in s and "measured" in s for s in o.skipped)
    assert [p.budget_ms for p in front] == pytest.approx(o.budgets_ms)
    assert sum(p.chosen for p in front) == 1
    chosen = next(p for p in front if p.chosen)
    assert o.chosen_trial == chosen.trial_id and o.floor_val_top1 == pytest.approx(o.baseline_val_top1 - 1.0)
    assert chosen.chosen_precision == o.chosen_precision
    done = [p for p in front if p.status == "completed"]
    assert all(p.measured_ms and p.measured_ms > 0 for p in done)  # every completed trial measured (timings: bench/)
    # every model of every trial: its fp32 network, and its int8 model where the trial kept one
    models = [(p.measured_ms, p.val_top1, p, "fp32") for p in done]
    models += [(p.int8_measured_ms, p.int8_val_top1, p, "int8") for p in done if p.int8_measured_ms is not None]
    assert any(k == "int8" for *_, k in models)  # the digits network keeps int8 within 0.5 points
    within = [x for x in models if x[1] >= o.floor_val_top1]
    assert o.met == bool(within)
    picked = next(x for x in models if x[2] is chosen and x[3] == o.chosen_precision)
    if within:  # the fastest model within the drop, by the driver's own measurement
        assert picked[0] == min(x[0] for x in within)
    else:
        assert picked[1] == max(x[1] for x in models) and o.reason in m.warnings
    assert m.val_top1 == pytest.approx(chosen.val_top1)  # the job's network is the chosen trial's
    assert m.latency_objective is not None and m.latency_objective.backend == "onnxruntime"
    # what is served is what was chosen: the int8 file only when the int8 model was
    q = m.quantization
    assert q is not None and q.written == (o.chosen_precision == "int8") == (out / "model.int8.onnx").is_file()
    if o.chosen_precision == "int8":
        assert q.val_top1_int8 == pytest.approx(chosen.int8_val_top1)
