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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from dg2pf_core.config import DG2PFConfig
from dg2pf_core.errors import ConfigError

DEFAULT_SPACE: dict[str, Any] = {
    "pruning_epochs": {"randint": [3, 11]},
    "lr": {"loguniform": [1e-4, 3e-3]},
    "kd_temperature": {"choice": [2.0, 4.0, 6.0]},
    "kd_alpha": {"uniform": [0.5, 0.9]},
    "recovery": {"choice": ["frozen", "feedback"]},
    "finetune_lr": {"loguniform": [1e-4, 1e-2]},
    "finetune": {"choice": ["sgd", "overparam"]},
    # Linear is DG2PF's; cubic did better on compact models at 90-95% with few pruning epochs
    # (docs/fidelity.md: mobilenet_v2 at 90%, 98.80% vs 97.87% test top-1 over 3 seeds).
    "schedule": {"choice": ["linear", "cubic"]},
}

_DISTRIBUTIONS: dict[str, Callable[[list], Any]] = {
    "uniform": lambda a: tune.uniform(*a),
    "loguniform": lambda a: tune.loguniform(*a),
    "randint": lambda a: tune.randint(*a),
    "choice": lambda a: tune.choice(a),
    "grid": lambda a: tune.grid_search(a),
}
_ARITY = {"uniform": 2, "loguniform": 2, "randint": 2}
_TUNABLE = {f.name for f in dataclasses.fields(DG2PFConfig)} - {"sparsity", "device", "seed"}


def load_space(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return dict(DEFAULT_SPACE)
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read search space {path}: {exc}", field="search_space") from exc
    if not isinstance(document, dict) or not document:
        raise ConfigError(f"search space {path} must be a non-empty mapping of option -> distribution", field="search_space")
    return document


def build_space(document: dict[str, Any], base: DG2PFConfig) -> dict[str, Any]:
    """Validate ``document`` and turn it into Tune's param_space (values as Tune domains).

    Every value a distribution can produce must be a valid config: the bounds and each choice are
    checked against DG2PFConfig here, so a bad space fails before any trial starts.
    """
    space: dict[str, Any] = {}
    for name, spec in document.items():
        if name not in _TUNABLE:
            raise ConfigError(f"search space: {name!r} is not a tunable option; choose from {sorted(_TUNABLE)}", field="search_space")
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
                raise ConfigError(f"search space: {name} must be one of {sorted(_DISTRIBUTIONS)} with its arguments, got {spec!r}", field="search_space")
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args or (kind in _ARITY and len(args) != _ARITY[kind]):
                raise ConfigError(f"search space: {name}.{kind} needs a list of {_ARITY.get(kind, 'one or more')} values, got {args!r}", field="search_space")
            candidates = args if kind not in ("randint",) else [args[0], args[1] - 1]
            for value in candidates:
                _check(base, name, value)
            space[name] = _DISTRIBUTIONS[kind](args)
        else:
            _check(base, name, spec)
            space[name] = spec
    return space


def trial_config(base: DG2PFConfig, overrides: dict[str, Any]) -> DG2PFConfig:
    """A trial's config: ``base`` with the sampled values. Every trial keeps the same number of
    epochs after pruning (``base.max_epochs - base.pruning_epochs``), whatever its pruning_epochs."""
    values = {**base.to_dict(), **overrides}
    values["max_epochs"] = values["pruning_epochs"] + (base.max_epochs - base.pruning_epochs)
    return DG2PFConfig.from_dict(values)


def _check(base: DG2PFConfig, name: str, value: Any) -> None:
    try:
        trial_config(base, {name: value})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"search space: {name}={value!r} is not a valid value: {exc}", field="search_space") from exc
