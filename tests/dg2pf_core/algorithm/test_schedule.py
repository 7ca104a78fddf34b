import pytest

from dg2pf_core.algorithm.schedule import sparsity_targets
from dg2pf_core.errors import ConfigError


def test_linear_schedule_is_evenly_spaced_up_to_the_target():
    assert sparsity_targets("linear", 0.9, 5) == pytest.approx([0.18, 0.36, 0.54, 0.72, 0.9])
    assert sparsity_targets("linear", 0.9, 5)[-1] == 0.9
    assert sparsity_targets("linear", 0.5, 1) == [0.5]


def test_cubic_schedule_follows_zhu_and_gupta():
    s, n = 0.9, 4
    targets = sparsity_targets("cubic", s, n)
    assert targets == pytest.approx([s * (1 - (1 - t / n) ** 3) for t in range(1, n + 1)])
    assert targets[-1] == s
    steps = [b - a for a, b in zip([0.0, *targets], targets)]
    assert steps == sorted(steps, reverse=True)  # prunes fast early, slowly late


def test_bad_schedule_inputs():
    with pytest.raises(ConfigError, match="unknown schedule"):
        sparsity_targets("exponential", 0.9, 3)
    with pytest.raises(ConfigError, match="pruning_epochs"):
        sparsity_targets("linear", 0.9, 0)
