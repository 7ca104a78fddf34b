"""The DG2PF run configuration: the contract's options (dg2pf_contract.options) and their checks."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from dg2pf_contract.options import (
    AMP_MODES,
    BN_AFTER_PRUNING,
    BOUNDS,
    CHANCE_BASELINE,
    CHANNEL,
    FINETUNE_MODES,
    GRADUAL_MASKS,
    GRANULARITY_DEFAULTS,
    KD_LOSSES,
    LATENCY_BACKENDS,
    LATENCY_BUDGET_BOUNDS,
    MAX_PATTERN_LENGTH,
    MAX_PATTERNS,
    PRECISIONS,
    PRESETS,
    RECOVERY_MODES,
    SCOPES,
    TOP1_DROP_BOUNDS,
    Options,
)
from dg2pf_core.errors import ConfigError

if typing.TYPE_CHECKING:
    from dg2pf_contract.job import JobSpec
from dg2pf_core.algorithm.masks import Selection
from dg2pf_core.algorithm.nm import NM, parse_granularity
from dg2pf_core.algorithm.patterns import compile_pattern
from dg2pf_core.algorithm.schedule import schedule_names


@dataclass
class DG2PFConfig(Options):
    """Hyperparameters of one DG2PF run: the contract's ``Options`` with their checks and the helpers the
    core needs."""

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ConfigError(f"preset: must be one of {list(PRESETS)}, got {self.preset!r}", field="preset")
        for name, value in self.preset_values().items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def preset_values(self) -> dict[str, Any]:
        """What the preset gives the fields it lists, for this config's granularity."""
        values = dict(PRESETS[self.preset])
        if self.preset == "default" and isinstance(self.granularity, str):
            kind = CHANNEL if self.granularity == CHANNEL else ("N:M" if ":" in self.granularity else None)
            values.update(GRANULARITY_DEFAULTS.get(kind, {}))
        return values

    def preset_departures(self) -> dict[str, Any]:
        """The fields its preset lists that this config sets otherwise (what a job changed)."""
        return {k: getattr(self, k) for k, v in self.preset_values().items() if getattr(self, k) != v}

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}: {why}", field=name)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, f"must be a finite number, got {value}")
        for name in ("include", "exclude", "sp_blocks"):
            patterns = getattr(self, name)
            if (
                not isinstance(patterns, list)
                or len(patterns) > MAX_PATTERNS
                or any(not isinstance(p, str) or len(p) > MAX_PATTERN_LENGTH for p in patterns)
            ):
                raise bad(
                    name,
                    f"must be a list of at most {MAX_PATTERNS} regular expressions of at most "
                    f"{MAX_PATTERN_LENGTH} characters",
                )
        for name, bounds in BOUNDS.items():
            value = getattr(self, name)
            integral = name in _INTEGRAL
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (integral and not isinstance(value, int))
            ):
                raise bad(name, f"must be {'an integer' if integral else 'a number'}, got {value!r}")
            if not bounds.contains(value):
                raise bad(name, f"must be in {bounds.text()}, got {value}")
        # Before the sparsity rules: with a MACs target, sparsity is unset, and what is wrong is the target
        # (a granularity that is no name at all is named as such first).
        if self.target_macs_ratio is not None:
            parse_granularity(self.granularity)
            ratio = self.target_macs_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
                raise bad(
                    "target_macs_ratio",
                    f"must be a number strictly between 0 and 1 (0.5: half the multiply-accumulates), got {ratio!r}",
                )
            if self.granularity != CHANNEL:
                raise bad(
                    "target_macs_ratio",
                    f"only applies to granularity 'channel' (got {self.granularity!r}): unstructured "
                    "and N:M masks do not remove compute on dense kernels; use sparsity",
                )
        if self.latency_backend not in LATENCY_BACKENDS:
            raise bad("latency_backend", f"must be one of {list(LATENCY_BACKENDS)}, got {self.latency_backend!r}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "int8" and self.max_quantization_drop != 0.5:
            raise bad(
                "max_quantization_drop",
                f"applies to precision int8 (got {self.max_quantization_drop!r} with precision {self.precision!r}); "
                "add precision int8 or leave it out",
            )
        if self.latency_budget_ms is not None:
            parse_granularity(self.granularity)
            budget = self.latency_budget_ms
            if (
                isinstance(budget, bool)
                or not isinstance(budget, (int, float))
                or not LATENCY_BUDGET_BOUNDS.contains(budget)
            ):
                raise bad(
                    "latency_budget_ms",
                    f"must be a number of milliseconds in {LATENCY_BUDGET_BOUNDS.text()}, got {budget!r}",
                )
            if self.granularity != CHANNEL:
                raise bad(
                    "latency_budget_ms",
                    f"only applies to granularity 'channel' (got {self.granularity!r}): unstructured and N:M "
                    "masks do not make dense kernels faster",
                )
            if self.target_macs_ratio is not None:
                raise bad("latency_budget_ms", "give latency_budget_ms or target_macs_ratio, not both")
            if self.sparsity != 0.0:
                raise bad(
                    "sparsity",
                    f"give sparsity or latency_budget_ms, not both (latency_budget_ms {budget} decides the "
                    f"channels; got sparsity {self.sparsity})",
                )
        if self.max_top1_drop is not None:
            parse_granularity(self.granularity)
            drop = self.max_top1_drop
            if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not TOP1_DROP_BOUNDS.contains(drop):
                raise bad("max_top1_drop", f"must be points of top-1 in {TOP1_DROP_BOUNDS.text()}, got {drop!r}")
            if self.granularity != CHANNEL:
                raise bad(
                    "max_top1_drop",
                    f"only applies to granularity 'channel' (got {self.granularity!r}): it searches for the "
                    "fastest network, and unstructured and N:M masks do not make dense kernels faster",
                )
            for other in ("latency_budget_ms", "target_macs_ratio"):
                if getattr(self, other) is not None:
                    raise bad("max_top1_drop", f"give max_top1_drop or {other}, not both")
            if self.sparsity != 0.0:
                raise bad(
                    "sparsity",
                    f"give sparsity or max_top1_drop, not both (max_top1_drop {drop} decides the channels; got "
                    f"sparsity {self.sparsity})",
                )
            if self.precision == "int8" and self.latency_backend != "onnxruntime":
                raise bad(
                    "latency_backend",
                    "precision int8 with max_top1_drop compares int8 and fp32 networks by latency, and the int8 "
                    f"model runs on ONNX Runtime only: use latency_backend 'onnxruntime' (got "
                    f"{self.latency_backend!r})",
                )
        if self.latency_budget_ms is None and self.max_top1_drop is None:
            for name, default in (
                ("latency_backend", "onnxruntime"),
                ("latency_threads", 1),
                ("latency_batch_size", 1),
            ):
                if getattr(self, name) != default:
                    raise bad(
                        name,
                        f"applies to a job with latency_budget_ms or max_top1_drop (got {getattr(self, name)!r}); "
                        "the latency every job measures after training uses --threads and batch sizes 1 and 32",
                    )
        if isinstance(self.latency_table, str) and any(ord(c) < 32 or ord(c) == 127 for c in self.latency_table):
            raise bad("latency_table", "must not hold control characters")
        if self.latency_table is not None and (
            not isinstance(self.latency_table, str)
            or not self.latency_table
            or (self.latency_budget_ms is None and self.max_top1_drop is None)
        ):
            raise bad(
                "latency_table",
                "is a latency table file (`dg2pf latency-table`) for a job with latency_budget_ms or max_top1_drop"
                if isinstance(self.latency_table, str) and self.latency_table
                else f"must be a file path, got {self.latency_table!r}",
            )
        if self.target_macs_ratio is not None and self.sparsity != 0.0:
            raise bad(
                "sparsity",
                f"give sparsity or target_macs_ratio, not both (target_macs_ratio {self.target_macs_ratio} "
                f"decides the channel fraction; got sparsity {self.sparsity})",
            )
        if (
            self.target_macs_ratio is None
            and self.latency_budget_ms is None
            and self.max_top1_drop is None
            and (
                isinstance(self.sparsity, bool)
                or not isinstance(self.sparsity, (int, float))
                or not 0.0 < self.sparsity < 1.0
            )
        ):
            raise bad(
                "sparsity",
                "is required: a fraction strictly between 0 and 1 (e.g. 0.9 for 90%); or give target_macs_ratio, "
                "latency_budget_ms or max_top1_drop with granularity 'channel'"
                if self.sparsity == 0.0 and not isinstance(self.sparsity, bool)
                else f"must be strictly between 0 and 1 (e.g. 0.9 for 90%), got {self.sparsity}",
            )
        if self.schedule not in schedule_names():
            raise bad("schedule", f"must be one of {schedule_names()}, got {self.schedule!r}")
        if self.recovery not in RECOVERY_MODES:
            raise bad("recovery", f"must be one of {list(RECOVERY_MODES)}, got {self.recovery!r}")
        if self.scope not in SCOPES:
            raise bad("scope", f"must be 'global' or 'layerwise', got {self.scope!r}")
        if self.bn_after_pruning not in BN_AFTER_PRUNING:
            raise bad("bn_after_pruning", f"must be one of {list(BN_AFTER_PRUNING)}, got {self.bn_after_pruning!r}")
        if self.gradual_masks not in GRADUAL_MASKS:
            raise bad("gradual_masks", f"must be one of {list(GRADUAL_MASKS)}, got {self.gradual_masks!r}")
        nm = parse_granularity(self.granularity)
        if nm is not None and abs(self.sparsity - nm.sparsity) > 1e-9:
            raise bad(
                "granularity",
                f"{nm} prunes exactly {nm.m - nm.n} of every {nm.m} weights ({nm.sparsity!r} of each "
                f"group): set sparsity to {nm.sparsity!r} (got {self.sparsity})",
            )
        if self.granularity == CHANNEL and self.scope != "global":
            raise bad("scope", "granularity 'channel' ranks all channel groups together: leave scope 'global'")
        if nm is not None and self.scope != "global":
            raise bad(
                "scope",
                f"{self.scope!r} does not apply to granularity {nm}, which ranks all tensors' groups together "
                f"and prunes every tensor to exactly {nm.sparsity!r} at the end: leave scope 'global'",
            )
        if nm is None and self.scope == "global" and self.sparsity > self.max_layer_sparsity:
            raise bad(
                "max_layer_sparsity",
                f"{self.max_layer_sparsity} is below the target sparsity {self.sparsity}: no layer may be pruned "
                "beyond it, so the target cannot be met; raise it (1.0 turns the cap off)",
            )
        if self.chance_baseline not in CHANCE_BASELINE:
            raise bad("chance_baseline", f"must be one of {list(CHANCE_BASELINE)}, got {self.chance_baseline!r}")
        if self.kd_loss not in KD_LOSSES:
            raise bad("kd_loss", f"must be one of {list(KD_LOSSES)}, got {self.kd_loss!r}")
        if self.rerank_every_steps and (
            self.gradual_masks != "simulated" or nm is not None or self.granularity == CHANNEL
        ):
            raise bad(
                "rerank_every_steps",
                "re-ranking inside a pruning epoch applies to unstructured simulated pruning "
                "(gradual_masks 'simulated'); set it to 0",
            )
        if self.max_epochs < self.pruning_epochs:
            raise bad("max_epochs", f"must be >= pruning_epochs ({self.pruning_epochs}), got {self.max_epochs}")
        if self.finetune not in FINETUNE_MODES:
            raise bad("finetune", f"must be one of {list(FINETUNE_MODES)}, got {self.finetune!r}")
        for pattern in self.sp_blocks:
            compile_pattern(pattern, "sp_blocks")
        if self.amp not in AMP_MODES:
            raise bad("amp", f"must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        # Compiles the patterns: a bad regex is reported here, not mid-run.
        self.selection()

    @classmethod
    def from_spec(cls, spec: JobSpec) -> DG2PFConfig:
        """The configuration a job spec asks for (raises ConfigError on inconsistent values)."""
        return cls(sparsity=spec.sparsity or 0.0, **spec.schedule.model_dump())

    def layer_cap(self, target: float) -> float:
        """The most any one tensor may be pruned while the network's target is ``target``."""
        return min(self.max_layer_sparsity, 1.0 - self.layer_density_floor * (1.0 - target))

    @property
    def channel(self) -> bool:
        """Whether whole channels are pruned (``granularity="channel"``)."""
        return self.granularity == CHANNEL

    def nm(self) -> NM | None:
        """The N:M pattern, or None for unstructured pruning."""
        return parse_granularity(self.granularity)

    def selection(self) -> Selection:
        return Selection(self.keep_classifier_dense, tuple(self.include), tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DG2PFConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(known)}", field=unknown[0])
        return cls(**values)


def _integral_fields() -> frozenset[str]:
    hints = typing.get_type_hints(DG2PFConfig)
    return frozenset(
        n
        for n, h in hints.items()
        if h is int or (typing.get_args(h) and int in typing.get_args(h) and float not in typing.get_args(h))
    )


_INTEGRAL = _integral_fields()  # the fields that hold whole numbers (``validate``)
