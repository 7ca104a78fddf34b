"""Ray Tune over DG2PF: every trial a TorchTrainer run; failures isolated; early stopping only at the target."""

from __future__ import annotations

import csv
import json

import pytest
import ray

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.errors import ConfigError
from dg2pf_ray.cluster import connect
from dg2pf_ray.search_space import DEFAULT_SPACE, build_space, trial_config
from dg2pf_ray.train import epochs_at_target
from dg2pf_ray.tune import TuneOptions, tune_job

BASE = DG2PFConfig(sparsity=0.9, pruning_epochs=2, max_epochs=4, patience=2)


def test_default_space_is_valid_and_covers_the_schedule_knobs():
    space = build_space(DEFAULT_SPACE, BASE)
    assert {"pruning_epochs", "lr", "kd_temperature", "kd_alpha", "recovery", "finetune_lr", "finetune"} <= space.keys()
    # the schedule and the layer guard are the job's (its preset's for its granularity), never searched over
    assert not {"schedule", "layer_density_floor", "max_layer_sparsity"} & space.keys()


@pytest.mark.parametrize(
    "document, needle",
    [
        ({"sparsity": {"uniform": [0.5, 0.9]}}, "not a tunable option"),
        ({"recovery": {"choice": ["frozen", "magic"]}}, "recovery"),
        ({"finetune": {"choice": ["sgd", "adam"]}}, "finetune"),
        ({"lr": {"loguniform": [-1, 0.1]}}, "lr"),
        ({"lr": {"normal": [0, 1]}}, "one of"),
        ({"kd_alpha": {"uniform": [0.5]}}, "needs a list of 2"),
    ],
)
def test_bad_search_spaces_fail_before_any_trial(document, needle):
    with pytest.raises(ConfigError, match=needle):
        build_space(document, BASE)


# Each a kind the service once answered with a 500 or accepted: every one is a ConfigError on search_space.
_GRID8 = {
    n: {"grid": [v] * 50}
    for n, v in [
        ("lr", 1e-3),
        ("kd_alpha", 0.5),
        ("kd_temperature", 4.0),
        ("weight_decay", 0.0),
        ("grad_clip", 0.5),
        ("finetune_lr", 1e-3),
        ("sp_weight", 1.0),
        ("finetune_momentum", 0.9),
    ]
}


@pytest.mark.parametrize(
    "document, needle",
    [
        ({"weight_decay": {"loguniform": [0, 0.1]}}, "lower bound > 0"),
        ({"pruning_epochs": {"randint": ["1", "3"]}}, "two integers"),
        ({"pruning_epochs": {"randint": [1.5, 3]}}, "two integers"),
        ({"lr": {"uniform": ["0.1", 0.2]}}, "two numbers"),
        ({"lr": {"uniform": [True, 0.2]}}, "two numbers"),
        ({"lr": {"uniform": [0.01, 0.001]}}, "low < high"),
        ({"lr": {"loguniform": [0.01, 0.001]}}, "low < high"),
        ({"pruning_epochs": {"randint": [5, 5]}}, "low < high"),
        ({"pruning_epochs": {"randint": [9, 3]}}, "low < high"),
        ({"lr": {"uniform": [float("nan"), 0.1]}}, "finite"),
        ({"lr": {"uniform": [0, 10**400]}}, "finite"),
        ({"batch_size": {"uniform": [32, 64]}}, "integer"),  # Tune samples floats; batch_size takes integers
        ({"kd_alpha": {"choice": [0.5] * 257}}, "at most 256 values"),
        ({"kd_alpha": {"grid": [0.5] * 100_000}}, "at most 256 values"),
        ({"kd_alpha": {"choice": [0.5, 1.5]}}, "kd_alpha=1.5"),  # every choice is checked, not only the first
        ({"kd_alpha": {"grid": [0.5, "high"]}}, "kd_alpha='high'"),
        ({"lr": {"choice": [[[[[[[1e-3]]]]]]]}}, "must be a number"),
        ({"granularity": {"choice": [5]}}, "granularity=5"),
        ({"include": {"choice": [["conv"], ["(a)\\1"]]}}, "invalid name pattern"),
        ({"lr": 500}, r"lr=500 .*must be in"),  # a constant, checked like any value
        ({7: 1}, "not a tunable option"),
    ],
)
def test_malformed_distributions_are_config_errors(document, needle):
    with pytest.raises(ConfigError, match=needle) as caught:
        build_space(document, BASE, samples=4)
    assert caught.value.field == "search_space"


def test_the_number_of_trials_is_bounded_without_expanding_the_grid():
    from dg2pf_ray.search_space import MAX_TRIALS

    with pytest.raises(ConfigError, match=r"would be 10,000,000,000,000,000 trials; at most 1,024"):
        build_space(_GRID8, BASE, samples=256)  # 50^8 x 256: refused at once, the product never built
    with pytest.raises(
        ConfigError, match=r"200 values of kd_alpha x 4 values of kd_temperature x 256 samples would be 204,800"
    ):
        build_space(
            {"kd_alpha": {"grid": [0.5] * 200}, "kd_temperature": {"grid": [2.0, 4.0, 6.0, 8.0]}}, BASE, samples=256
        )
    assert MAX_TRIALS == 1024
    space = build_space(
        {"kd_alpha": {"grid": [0.5, 0.6, 0.7, 0.8]}, "kd_temperature": {"grid": [2.0, 4.0]}}, BASE, samples=128
    )
    assert set(space) == {"kd_alpha", "kd_temperature"}  # 4 x 2 x 128 = 1,024: just allowed


def test_the_callers_rules_hold_for_every_value_of_the_space():
    # The service refuses amp without a GPU in a schedule; a search space must not smuggle it in.
    def cpu_only(config: DG2PFConfig) -> None:
        if config.amp != "none":
            raise ConfigError(f"amp {config.amp!r} needs a GPU", field="amp")

    with pytest.raises(ConfigError, match="amp='bf16' is not a valid value: amp 'bf16' needs a GPU"):
        build_space({"amp": {"choice": ["none", "bf16"]}}, BASE, check=cpu_only)
    assert "amp" in build_space({"amp": {"choice": ["none"]}}, BASE, check=cpu_only)
    assert "amp" in build_space({"amp": {"choice": ["none", "bf16"]}}, BASE)  # no rule: the core allows it


def test_every_trial_keeps_the_same_post_pruning_budget():
    assert trial_config(BASE, {"pruning_epochs": 7}).max_epochs == 9
    assert trial_config(BASE, {"pruning_epochs": 1}).max_epochs == 3


def test_early_stopping_clock_is_zero_until_the_final_sparsity():
    assert [epochs_at_target(e, 3) for e in range(6)] == [0, 0, 0, 1, 2, 3]


@pytest.mark.slow
def test_three_trials_one_failing_best_by_validation(digits_example, tmp_path):
    ray.shutdown()
    connect(None)
    try:
        space = tmp_path / "space.yaml"
        # lr=100 (the largest valid) with weight_decay=10 diverges (AdamW's decoupled decay multiplies the
        # weights by 1 - 1000 per step: NaN loss) in its first epoch: that trial must fail alone (the others
        # only decay by 1-3% per step); pruning_epochs differ per trial.
        space.write_text("lr: {grid: [0.001, 0.003, 100.0]}\nweight_decay: 10.0\npruning_epochs: {choice: [1, 3]}\n")
        job = PruneJob("digits_cnn", 10, str(digits_example / "model.safetensors"), "digits", BASE)
        out = tmp_path / "out"
        m = tune_job(
            job,
            out,
            TuneOptions(samples=1, search_space=str(space), storage_path=str(tmp_path / "store"), grace_period=1),
        )
    finally:
        ray.shutdown()
    with (out / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    by_lr = {float(r["config.lr"]): r for r in rows}
    assert by_lr[100.0]["status"] == "failed" and "nan" in by_lr[100.0]["error"].lower()
    ok = [r for r in rows if r["status"] == "completed"]
    assert ok, rows
    for r in rows:
        if r["status"] == "stopped_early":  # never judged before reaching the final sparsity
            assert int(r["epochs"]) >= int(r["config.pruning_epochs"])
    best = max(ok, key=lambda r: float(r["val_top1"]))
    assert m.tune.best_trial == best["trial_id"]
    assert m.val_top1 == pytest.approx(float(best["val_top1"]))
    assert abs(m.sparsity_prunable - 0.9) <= 0.001
    assert (out / "model.safetensors").exists()
    assert (out / "model.onnx").is_file() and m.onnx.written is True  # the best trial's, copied with its model
    assert json.loads((out / "metrics.json").read_text())["tune"]["trials"][0]["trial_id"]
