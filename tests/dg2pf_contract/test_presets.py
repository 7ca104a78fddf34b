"""Presets (default | paper) reach the job the same way from the library, the CLI and the service's JobSpec."""

import pytest

from dg2pf_contract.options import PRESET_FIELDS, PRESETS
from dg2pf_core import DG2PFConfig


def test_the_cli_takes_a_preset_and_a_value_given_with_it_wins():
    from dg2pf_cli.main import _job_from, build_parser

    def _config_from(args):
        return _job_from(args)[1].config

    parser = build_parser()
    base = [
        "prune",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        "c",
        "--dataset",
        "digits",
        "--sparsity",
        "0.9",
        "--out",
        "o",
    ]
    paper = _config_from(parser.parse_args([*base, "--preset", "paper"]))
    assert {k: getattr(paper, k) for k in PRESET_FIELDS} == PRESETS["paper"]
    mine = _config_from(parser.parse_args([*base, "--preset", "paper", "--lr", "0.0003"]))
    assert mine.lr == 3e-4 and mine.kd_loss == "authors" and mine.preset_departures() == {"lr": 3e-4}
    default = _config_from(parser.parse_args(base))
    assert default.preset == "default" and {k: getattr(default, k) for k in PRESET_FIELDS} == PRESETS["default"]
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--preset", "fast"])
    help_text = parser._subparsers._group_actions[0].choices["prune"].format_help()
    assert "the preset's: default" in help_text and "{default,paper}" in help_text


def test_the_job_spec_takes_a_preset_lists_it_in_the_openapi_and_refuses_an_unknown_one():
    from pydantic import ValidationError

    from dg2pf_contract import job as spec
    from dg2pf_core.job import PruneJob

    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "c"},
        "dataset": {"spec": "digits"},
        "sparsity": 0.9,
    }
    assert DG2PFConfig.from_spec(spec.JobSpec(**doc)) == DG2PFConfig(sparsity=0.9)
    paper = DG2PFConfig.from_spec(spec.JobSpec(**doc, schedule={"preset": "paper"}))
    assert paper == DG2PFConfig(sparsity=0.9, preset="paper") and paper.lr == PRESETS["paper"]["lr"]
    mine = PruneJob.from_spec(spec.JobSpec(**doc, schedule={"preset": "paper", "kd_loss": "standard"}), "/c").config
    assert mine.kd_loss == "standard" and mine.lr == PRESETS["paper"]["lr"]
    schema = spec.ScheduleSpec.model_json_schema()["properties"]
    assert schema["preset"]["enum"] == list(PRESETS) and schema["preset"]["default"] == "default"
    for name in PRESET_FIELDS:  # unset (null) takes the preset's value, and the OpenAPI says which
        assert schema[name]["default"] is None and all(p in schema[name]["description"] for p in PRESETS)
    for bad in ({"preset": "fast"}, {"kd_loss": "hinton"}):
        with pytest.raises(ValidationError) as info:
            spec.JobSpec(**doc, schedule=bad)
        assert info.value.errors()[0]["loc"][:2] == ("schedule", next(iter(bad)))


def test_the_default_preset_keeps_each_granularity_on_what_it_was_measured_with():
    """Unstructured: the cubic schedule and the emptying guard alone (docs/fidelity.md); channel and N:M
    pruning keep the linear schedule (channel pruning its layer guard) their published figures come from;
    a value given wins, and the paper preset is the same for every granularity."""
    assert (DG2PFConfig(sparsity=0.9).schedule, DG2PFConfig(sparsity=0.9).layer_cap(0.9)) == ("cubic", 1.0)
    channel = DG2PFConfig(granularity="channel", target_macs_ratio=0.5, channel_multiple=1)
    assert (channel.schedule, channel.max_layer_sparsity, channel.layer_density_floor) == ("linear", 0.99, 0.6)
    assert channel.preset_departures() == {}
    assert DG2PFConfig(sparsity=0.5, granularity="2:4").schedule == "linear"
    assert DG2PFConfig(granularity="channel", target_macs_ratio=0.5, schedule="cubic").schedule == "cubic"
    paper = DG2PFConfig(granularity="channel", target_macs_ratio=0.5, preset="paper")
    assert {k: getattr(paper, k) for k in PRESET_FIELDS} == PRESETS["paper"]
