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
    assert {"pruning_epochs", "lr", "kd_temperature", "kd_alpha", "recovery", "finetune_lr", "finetune", "schedule"} <= space.keys()


@pytest.mark.parametrize(
    "document, needle",
    [({"sparsity": {"uniform": [0.5, 0.9]}}, "not a tunable option"),
     ({"recovery": {"choice": ["frozen", "magic"]}}, "recovery"),
     ({"finetune": {"choice": ["sgd", "adam"]}}, "finetune"),
     ({"lr": {"loguniform": [-1, 0.1]}}, "lr"),
     ({"lr": {"normal": [0, 1]}}, "one of"),
     ({"kd_alpha": {"uniform": [0.5]}}, "needs a list of 2")],
)
def test_bad_search_spaces_fail_before_any_trial(document, needle):
    with pytest.raises(ConfigError, match=needle):
        build_space(document, BASE)


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
        m = tune_job(job, out, TuneOptions(samples=1, search_space=str(space), storage_path=str(tmp_path / "store"), grace_period=1))
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
    assert m["tune"]["best_trial"] == best["trial_id"]
    assert m["val_top1"] == pytest.approx(float(best["val_top1"]))
    assert abs(m["sparsity_prunable"] - 0.9) <= 0.001
    assert (out / "model.safetensors").exists()
    assert json.loads((out / "metrics.json").read_text())["tune"]["trials"][0]["trial_id"]
