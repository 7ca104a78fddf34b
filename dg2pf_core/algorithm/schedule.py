"""Sparsity schedules: the target sparsity of each pruning epoch.

A schedule maps ``(final sparsity, pruning epochs)`` to one target per pruning epoch, the last one
always equal to the final sparsity.
"""

from __future__ import annotations

from collections.abc import Callable

from dg2pf_core.errors import ConfigError

ScheduleFn = Callable[[float, int], list[float]]
_SCHEDULES: dict[str, ScheduleFn] = {}


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    def wrap(fn: ScheduleFn) -> ScheduleFn:
        _SCHEDULES[name] = fn
        return fn

    return wrap


@register_schedule("linear")
def linear_schedule(sparsity: float, epochs: int) -> list[float]:
    """DG2PF: ``epochs`` targets spaced linearly in (0, sparsity]."""
    return [sparsity * (i + 1) / epochs for i in range(epochs)]


@register_schedule("cubic")
def cubic_schedule(sparsity: float, epochs: int) -> list[float]:
    """Gradual magnitude pruning (Zhu & Gupta, 2017): s_t = s (1 - (1 - t/n)^3), fast early, slow late."""
    return [sparsity * (1.0 - (1.0 - (i + 1) / epochs) ** 3) for i in range(epochs)]


def schedule_names() -> list[str]:
    return sorted(_SCHEDULES)


def sparsity_targets(name: str, sparsity: float, epochs: int) -> list[float]:
    if name not in _SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {schedule_names()}", field="schedule")
    if epochs < 1:
        raise ConfigError(f"pruning_epochs must be >= 1, got {epochs}", field="pruning_epochs")
    targets = _SCHEDULES[name](sparsity, epochs)
    targets[-1] = sparsity  # exact, whatever the float arithmetic did
    return targets
