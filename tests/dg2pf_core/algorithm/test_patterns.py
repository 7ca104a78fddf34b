"""User name patterns (include / exclude / sp_blocks) run on RE2: no pattern can freeze the caller."""

from __future__ import annotations

import pytest
from torch import nn

from dg2pf_core import DG2PFConfig
from dg2pf_core.algorithm.distillation import similarity_blocks
from dg2pf_core.algorithm.masks import Selection, select_prunable
from dg2pf_core.errors import ConfigError

# Exponential for a backtracking engine on a name without "=": seconds at 30 characters, minutes
# or more beyond (the break-test froze the API 11 s with the first at submit).
CATASTROPHIC = ["(.?.?)*=", "(.*.*.*)*=", r"(\w|\w)*=", r"(\w+\w+)+="]
LONG = "x" * 5000  # a module name; its weight is "<LONG>.weight"


def _model() -> nn.Module:
    model = nn.Module()
    model.add_module(LONG, nn.Linear(2, 2))
    model.add_module("keep=", nn.Linear(2, 2))
    model.add_module("fc", nn.Linear(2, 2))
    return model


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_patterns_select_what_they_should_against_long_names(pattern):
    model = _model()
    config = DG2PFConfig(sparsity=0.5, include=[pattern])  # validated (compiled) at once
    assert select_prunable(model, config.selection()).names() == ["keep=.weight"]
    everything_but = Selection(exclude=(pattern,))
    assert select_prunable(model, everything_but).names() == [f"{LONG}.weight", "fc.weight"]
    assert similarity_blocks(model, [pattern]) == ["keep="]  # sp_blocks: the whole module name


def test_include_and_exclude_keep_re_search_semantics():
    model = _model()
    assert select_prunable(model, Selection(include=("ee",))).names() == ["keep=.weight"]  # anywhere in the name
    assert select_prunable(model, Selection(include=(r"^fc\.",))).names() == ["fc.weight"]
    assert select_prunable(model, Selection(include=(r"(?i)FC\.weight$",))).names() == ["fc.weight"]
    assert similarity_blocks(model, ["f"]) == []  # sp_blocks match whole names, as before
    assert similarity_blocks(model, ["f."]) == ["fc"]


@pytest.mark.parametrize("field", ["include", "exclude", "sp_blocks"])
@pytest.mark.parametrize(
    "pattern, why",
    [(r"(conv)\1", "backreferences"), (r"conv(?=1)", "lookarounds"), (r"(?<!x)fc", "lookarounds"), ("(", "missing")],
)
def test_patterns_re2_cannot_take_are_refused_naming_the_field(field, pattern, why):
    with pytest.raises(ConfigError, match=why) as caught:
        DG2PFConfig(sparsity=0.5, **{field: [pattern]})
    assert caught.value.field == field
    assert f"{field}: invalid name pattern" in caught.value.message and "RE2" in caught.value.message


def test_a_pattern_that_is_not_a_string_is_refused():
    with pytest.raises(ConfigError) as caught:
        Selection(exclude=(5,))  # type: ignore[arg-type]
    assert caught.value.field == "exclude"
