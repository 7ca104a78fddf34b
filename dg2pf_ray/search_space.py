"""The Tune search space over DG2PF's schedule hyperparameters, as a plain, validated document.

A search space file (YAML or JSON) maps DG2PFConfig fields to one distribution each::

    lr: {loguniform: [1.0e-4, 3.0e-3]}
    pruning_epochs: {randint: [3, 11]}      # upper bound exclusive
    recovery: {choice: [frozen, feedback]}
    finetune: {choice: [sgd, overparam]}     # the fine-tuning method
    schedule: {choice: [linear, cubic]}      # the sparsity schedule
    kd_alpha: {uniform: [0.5, 0.9]}
    kd_temperature: {grid: [2, 4, 6]}        # every value, crossed with the samples
    finetune_lr: 0.001                       # a constant
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.errors import ConfigError

DEFAULT_SPACE: dict[str, Any] = {
    "pruning_epochs": {"randint": [3, 11]},
    # Around the default preset's 1e-3 (AdamW): on Fashion-MNIST at 98% (shufflenet_v2_x0_5, docs/fidelity.md)
    # 3e-4 let the cubic schedule's global ranking empty conv5 (53% against 86%), the paper's 1e-5 ended at
    # chance; nothing below 5e-4 is searched.
    "lr": {"loguniform": [5e-4, 3e-3]},
    "kd_temperature": {"choice": [2.0, 4.0, 6.0]},
    # Down to 0 (no teacher): the teacher's worth differs by sparsity and network (docs/fidelity-history.md).
    "kd_alpha": {"uniform": [0.0, 0.9]},
    # Feedback re-ranking came within 1.3 points of frozen masks at 98% (seed 0): worth a trial, not a default.
    "recovery": {"choice": ["frozen", "feedback"]},
    "finetune_lr": {"loguniform": [1e-4, 1e-2]},
    "finetune": {"choice": ["sgd", "overparam"]},
    # Not searched: the schedule and the layer guard stay the job's own (its preset's for its granularity:
    # cubic and no layer caps for unstructured pruning, where the linear schedule lost 5.8 points and the
    # former density floor 7.1 at 98%; linear with the guard for channel and N:M pruning, as measured).
}

_DISTRIBUTIONS: dict[str, Callable[[list], Any]] = {
    "uniform": lambda a: tune.uniform(*a),
    "loguniform": lambda a: tune.loguniform(*a),
    "randint": lambda a: tune.randint(*a),
    "choice": lambda a: tune.choice(a),
    "grid": lambda a: tune.grid_search(a),
}
_ARITY = {"uniform": 2, "loguniform": 2, "randint": 2}
MAX_VALUES = 256  # entries of one choice or grid
# Trials of one search: the grid's combinations times the samples. Ray Tune expands a grid eagerly,
# so a large one ties up the driver for minutes before the first trial; 1,024 is far beyond a real search.
MAX_TRIALS = 1024
_MAX_BOUND = 1e15  # beyond every option's range, and exact as a float
_REPR = reprlib.Repr()  # Python 3.11's takes no arguments
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 4, 8, 8, 80, 80
_TUNABLE = {f.name for f in dataclasses.fields(DG2PFConfig)} - {"sparsity", "device", "seed"}


def load_space(path: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    """The search space: the built-in one (None), a job's ``tune.search_space`` document, or a YAML/JSON file."""
    if path is None:
        return dict(DEFAULT_SPACE)
    if isinstance(path, dict):
        if not path:
            raise ConfigError(
                "tune.search_space must name at least one option, or be left out for the built-in space",
                field="search_space",
            )
        return path
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read search space {path}: {exc}", field="search_space") from exc
    if not isinstance(document, dict) or not document:
        raise ConfigError(
            f"search space {path} must be a non-empty mapping of option -> distribution", field="search_space"
        )
    return document


def build_space(
    document: dict[str, Any], base: DG2PFConfig, samples: int = 1, check: Callable[[DG2PFConfig], None] | None = None
) -> dict[str, Any]:
    """Validate ``document`` and turn it into Tune's param_space (values as Tune domains).

    Every value a distribution can produce must be a valid config: the bounds and each choice are
    checked against DG2PFConfig here (and against ``check``, the caller's own rules, which raises
    ConfigError), so a bad space fails before any trial starts. ``samples``: Tune's num_samples;
    the search may run at most MAX_TRIALS trials (the grid's combinations times the samples).
    """
    if not isinstance(document, dict) or not document:
        raise ConfigError("search space must be a non-empty mapping of option -> distribution", field="search_space")
    # The shape and the size first (cheap): a grid too large is refused before any value is checked.
    parsed: dict[str, tuple[str | None, Any]] = {}
    trials = samples
    for name, spec in document.items():
        if name not in _TUNABLE:
            raise ConfigError(
                f"search space: {_show(name)} is not a tunable option; choose from {sorted(_TUNABLE)}",
                field="search_space",
            )
        if not isinstance(spec, dict):
            parsed[name] = (None, spec)  # a constant
            continue
        if len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
            raise ConfigError(
                f"search space: {name} must be one of {sorted(_DISTRIBUTIONS)} with its arguments, got {_show(spec)}",
                field="search_space",
            )
        kind, args = next(iter(spec.items()))
        _check_arguments(name, kind, args)
        if kind == "grid":
            trials *= len(args)
        parsed[name] = (kind, args)
    if trials > MAX_TRIALS:
        grids = [f"{len(a)} values of {n}" for n, (k, a) in parsed.items() if k == "grid"]
        raise ConfigError(
            f"search space: {' x '.join([*grids, f'{samples} samples'])} would be {trials:,} trials; "
            f"at most {MAX_TRIALS:,} are allowed (fewer grid values or samples)",
            field="search_space",
        )
    space: dict[str, Any] = {}
    for name, (kind, args) in parsed.items():
        if kind is None:
            _check(base, name, args, check)
            space[name] = args
            continue
        for value in _candidates(kind, args):
            _check(base, name, value, check)
        try:
            space[name] = _DISTRIBUTIONS[kind](args)
        except Exception as exc:  # Tune's own checks: whatever it refuses is the user's input, not a crash
            raise ConfigError(
                f"search space: {name}.{kind} {_show(args)} is refused by Ray Tune: {_clip(str(exc))}",
                field="search_space",
            ) from exc
    return space


def _check_arguments(name: str, kind: str, args: Any) -> None:
    """The arguments of one distribution: two numbers low < high (ints for randint, low > 0 for
    loguniform), or a list of at most MAX_VALUES values for choice and grid."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"search space: {name}.{kind} {why}, got {_show(args)}", field="search_space")

    if not isinstance(args, list) or not args:
        raise bad(f"needs a list of {_ARITY.get(kind, 'one or more')} values")
    if kind not in _ARITY:
        if len(args) > MAX_VALUES:
            raise bad(f"takes at most {MAX_VALUES} values (got {len(args):,})")
        return
    if len(args) != _ARITY[kind]:
        raise bad(f"needs a list of {_ARITY[kind]} values")
    low, high = args
    integral = kind == "randint"
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, int if integral else (int, float)):
            raise bad(f"needs two {'integers' if integral else 'numbers'} [low, high]")
        if abs(bound) > _MAX_BOUND or (isinstance(bound, float) and not math.isfinite(bound)):
            raise bad(f"needs finite bounds within +-{_MAX_BOUND:g}")
    if not low < high:
        raise bad("needs low < high" + (" (the upper bound is exclusive)" if integral else ""))
    if kind == "loguniform" and low <= 0:
        raise bad("needs a lower bound > 0 (a logarithm is taken)")


def _candidates(kind: str, args: list) -> list:
    """Values that stand for all a distribution can produce: every entry of a list; the ends of a
    range, as floats where Tune samples floats (an integer option cannot take a uniform)."""
    if kind == "randint":
        return [args[0], args[1] - 1]  # Tune's upper bound is exclusive
    if kind in _ARITY:
        return [float(args[0]), float(args[1])]
    return args


def trial_config(base: DG2PFConfig, overrides: dict[str, Any]) -> DG2PFConfig:
    """A trial's config: ``base`` with the sampled values. Every trial keeps the same number of
    epochs after pruning (``base.max_epochs - base.pruning_epochs``), whatever its pruning_epochs."""
    values = {**base.to_dict(), **overrides}
    values["max_epochs"] = values["pruning_epochs"] + (base.max_epochs - base.pruning_epochs)
    return DG2PFConfig.from_dict(values)


def _check(base: DG2PFConfig, name: str, value: Any, check: Callable[[DG2PFConfig], None] | None = None) -> None:
    try:
        config = trial_config(base, {name: value})
        if check is not None:
            check(config)
    except ConfigError as exc:
        raise ConfigError(
            f"search space: {name}={_show(value)} is not a valid value: {_clip(str(exc))}", field="search_space"
        ) from exc
    except Exception as exc:  # a value of a type the option cannot hold: the user's input, not a crash
        raise ConfigError(
            f"search space: {name}={_show(value)} is not a valid value ({type(exc).__name__}: {_clip(str(exc))})",
            field="search_space",
        ) from exc


def _show(value: Any) -> str:
    # A value quoted in a message: bounded in length and depth, whatever the user sent.
    return _REPR.repr(value)


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
