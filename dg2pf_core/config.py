"""The DG2PF run configuration: every knob of the algorithm, as plain values."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError
from .masks import Selection
from .nm import CHANNEL, NM, parse_granularity
from .patterns import compile_pattern
from .schedule import schedule_names
from .simulated import RECOVERY_MODES

Amp = Literal["none", "bf16", "fp16"]
FINETUNE_MODES = ("sgd", "overparam")
GRADUAL_MASKS = ("simulated", "hard")
BN_AFTER_PRUNING = ("batch", "frozen")
KD_LOSSES = ("standard", "authors")
CHANCE_BASELINE = ("warn", "refuse")


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric option; one table serves ``validate`` and the service's JobSpec
    (where it becomes the OpenAPI's minimum/maximum)."""

    low: float
    high: float
    low_open: bool = False  # low itself is excluded
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def text(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# Upper bounds lie well beyond any real run: values past them are typos or attacks (a seed torch
# cannot take, a batch of a billion images, a million epochs), refused before anything is built.
BOUNDS: dict[str, Bounds] = {
    "pruning_epochs": Bounds(1, 10_000), "max_epochs": Bounds(1, 100_000), "patience": Bounds(1, 100_000),
    "batch_size": Bounds(1, 65_536), "eval_batch_size": Bounds(1, 65_536), "seed": Bounds(0, 2**32 - 1),
    "bn_recalibration_batches": Bounds(0, 100_000), "overparam_expansion": Bounds(1, 64), "channel_multiple": Bounds(1, 1024), "loader_workers": Bounds(0, 256),
    "max_layer_sparsity": Bounds(0, 1, low_open=True), "warn_layer_sparsity": Bounds(0, 1, low_open=True),
    "layer_density_floor": Bounds(0, 1, high_open=True),
    "lr": Bounds(0, 100, low_open=True), "finetune_lr": Bounds(0, 100, low_open=True),
    "kd_temperature": Bounds(0.01, 1000), "kd_alpha": Bounds(0, 1),
    "weight_decay": Bounds(0, 100), "finetune_weight_decay": Bounds(0, 100), "grad_clip": Bounds(0, 1e6),
    "finetune_momentum": Bounds(0, 1, high_open=True), "sp_weight": Bounds(0, 1e9),
    "min_weights_per_tensor": Bounds(0, 1_000_000), "min_weights_per_class": Bounds(0, 1_000_000),
    "rerank_every_steps": Bounds(0, 10_000_000),
}
MAX_PATTERNS, MAX_PATTERN_LENGTH = 256, 1000  # include / exclude / sp_blocks


# Named configurations. A field a preset names defaults to None in DG2PFConfig and takes the preset's
# value unless the job sets it; every other field has one default for all presets. Both presets list
# the same fields, so a config's values never depend on which preset a field was left to.
#   "paper": DG2PF as its paper writes it (Algorithm 1 and 2; ../shared/reference/dg2pf.md) with the
#     authors' hyperparameters (their public code: AdamW lr 1e-5 without weight decay, the loss
#     (alpha KL + (1 - alpha) CE) T^2 at T=4, alpha=0.75, gradient norm clipped to 0.5), a linear
#     schedule, one global magnitude ranking per pruning epoch, masked weights updated with the gradient
#     taken at the pruned point (Algorithm 1 restores them before the optimiser step), and no layer
#     guard beyond the emptying guard (below).
#   "default": the best configuration measured (docs/fidelity.md).
PRESET_FIELDS = ("schedule", "recovery", "rerank_every_steps", "max_layer_sparsity", "layer_density_floor",
                 "lr", "weight_decay", "kd_loss", "kd_temperature", "kd_alpha", "grad_clip")
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "schedule": "cubic", "recovery": "frozen", "rerank_every_steps": 0,
        "max_layer_sparsity": 1.0, "layer_density_floor": 0.0,
        "lr": 1e-3, "weight_decay": 1e-4, "kd_loss": "standard", "kd_temperature": 4.0, "kd_alpha": 0.75, "grad_clip": 0.5,
    },
    "paper": {
        "schedule": "linear", "recovery": "feedback", "rerank_every_steps": 0,
        "max_layer_sparsity": 1.0, "layer_density_floor": 0.0,
        "lr": 1e-5, "weight_decay": 0.0, "kd_loss": "authors", "kd_temperature": 4.0, "kd_alpha": 0.75, "grad_clip": 0.5,
    },
}
assert all(set(values) == set(PRESET_FIELDS) for values in PRESETS.values())
# The default preset's values where another granularity was measured with other ones: channel and N:M
# pruning keep the linear schedule (and channel pruning the layer guard) their figures in docs/benchmarks.md
# and docs/fidelity-history.md come from; the cubic schedule and the emptying guard alone were measured on
# unstructured pruning only (docs/fidelity.md).
GRANULARITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "channel": {"schedule": "linear", "max_layer_sparsity": 0.99, "layer_density_floor": 0.6},
    "N:M": {"schedule": "linear"},
}


@dataclass
class DG2PFConfig:
    """Hyperparameters of one DG2PF run. ``preset`` names a configuration (``PRESETS``): the fields it
    lists are None here and take the preset's values unless given."""

    # Fraction of the prunable weights to remove (of the prunable channels with granularity "channel").
    # 0 (unset) only with target_macs_ratio, which then decides it.
    sparsity: float = 0.0
    preset: str = "default"  # "default" (the best measured) or "paper" (the paper's algorithm as written)
    # --- gradual pruning (Algorithm 1) ---
    pruning_epochs: int = 10
    schedule: str | None = None  # "linear" (DG2PF) or "cubic" (gradual magnitude pruning)
    # Simulated pruning: "feedback" (masked weights restored before the optimiser step and updated with
    # the gradient taken at the pruned point, so a weight pruned by mistake can grow back: dynamic pruning
    # with feedback, Lin et al. 2020) or "frozen" (masked weights keep their values until the next ranking).
    recovery: str | None = None
    # Rank again every this many optimiser steps inside a pruning epoch, at the epoch's target (0: once per
    # pruning epoch, as Algorithm 1). Each ranking's recovered weights are counted in the epoch's record.
    rerank_every_steps: int | None = None
    gradual_masks: str = "simulated"  # "simulated" (DG2PF: weights put back after each step) or "hard" (zeroed for good)
    scope: str = "global"  # "global" ranking or "layerwise"
    # "unstructured" (DG2PF) or "N:M" ("2:4": at most N of every M consecutive weights along a row kept,
    # dg2pf_core/nm.py). N:M needs sparsity (M-N)/M and the global scope; the layer caps below do not
    # apply to it (no tensor goes beyond (M-N)/M: every group is capped by construction).
    # "channel": whole output channels with everything coupled to them (Torch-Pruning's dependency
    # graph, dg2pf_core/channels.py); sparsity is then the fraction of prunable channels, unless
    # target_macs_ratio is given, and the pruned channels are physically removed after the last
    # pruning epoch.
    granularity: str = "unstructured"
    # Channel granularity only: the multiply-accumulates the pruned network may keep, as a fraction of
    # the dense network's (0.5: half the compute); converted to a channel fraction (replacing sparsity)
    # before training and met exactly at the last pruning epoch. None: use sparsity.
    target_macs_ratio: float | None = None
    # Channel granularity only: every pruned layer keeps a multiple of this many channels (the kept
    # width rounded up; target_macs_ratio is still met, by pruning more elsewhere). CPU convolution
    # kernels work in blocks of channels (ONNX Runtime's NCHWc: 16 with AVX-512, 8 with AVX2), GPUs'
    # tensor cores in multiples of 8: resnet50 at 224x224, MACs 0.5, ONNX Runtime on AVX-512 ran in
    # 0.501x of the dense latency with 16, 0.636x with 1 (docs/benchmarks.md section 11). 1: off.
    channel_multiple: int = 16
    # The emptying guard (unstructured): every ranking keeps the this-many largest weights of each
    # prunable tensor and of each classifier row (one row per class), so no layer and no class is cut off;
    # the global target is still met exactly. 0 turns each off.
    min_weights_per_tensor: int = 1
    min_weights_per_class: int = 1
    # Layer caps (optional): a global ranking prunes no tensor beyond max_layer_sparsity, nor beyond
    # 1 - layer_density_floor * (1 - s) at a target s (every tensor keeps at least that fraction of the
    # network's average density); what a capped tensor keeps is pruned from the others instead, so the
    # global target is still met exactly. 1.0 / 0: off. Channel granularity: caps every group (one
    # channel always kept).
    max_layer_sparsity: float | None = None
    layer_density_floor: float | None = None
    warn_layer_sparsity: float = 0.98  # the result warns about layers pruned beyond this fraction
    # Before every validation of a pruned network, re-estimate BatchNorm statistics on this many training
    # batches (0: off, the running averages as training left them). docs/fidelity.md (Fashion-MNIST,
    # shufflenet_v2_x0_5 at 98%): with the running averages validation read 10% where the network
    # scored 68-72% after re-estimation, so early stopping kept the wrong epochs.
    bn_recalibration_batches: int = 32
    # After the last ranking: "batch" (BatchNorm normalises each training batch by its own statistics,
    # as in ordinary training) or "frozen" (BatchNorm layers train in eval mode, normalising by the
    # statistics last re-estimated for the final mask, as the served network will; with
    # bn_recalibration_batches=0, by the running averages the last pruning epoch left). docs/fidelity.md
    # (Fashion-MNIST, shufflenet_v2_x0_5 at 98%): a network scoring 46-68% with batch statistics scored
    # 10-18% with any population statistics; trained with them frozen, the two agreed, but accuracy
    # did not follow (run 3: 86.52% vs 87.14% at 95%, one of three seeds diverged at 98%): off by default.
    bn_after_pruning: str = "batch"
    # The input model scoring near chance on the validation split (at most chance + 5 points: it does not fit
    # the data: another dataset, another class order, other preprocessing): "warn" (the job goes on, and says
    # so in metrics.json) or "refuse" (the job stops after the baseline, before any training).
    chance_baseline: str = "warn"
    keep_classifier_dense: bool = False
    include: list[str] = field(default_factory=list)  # regexes over parameter names
    exclude: list[str] = field(default_factory=list)
    lr: float | None = None  # AdamW, gradual pruning and distillation
    weight_decay: float | None = None
    # "standard": alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE (Hinton et al.; KL:CE 48:1 at T=4,
    # alpha=0.75); "authors": (alpha KL + (1 - alpha) CE) T^2, the authors' code (3:1).
    kd_loss: str | None = None
    kd_temperature: float | None = None
    kd_alpha: float | None = None
    grad_clip: float | None = None  # gradient norm clipping in every training phase (0: off)
    # --- stopping ---
    patience: int = 4  # epochs without validation top-1 improvement before a phase ends
    max_epochs: int = 60  # total training epochs, all phases together
    # --- pruned fine-tuning (Algorithm 2) ---
    finetune_lr: float = 1e-3  # SGD
    finetune_momentum: float = 0.9
    finetune_weight_decay: float = 0.0
    finetune: str = "sgd"  # "sgd" (Algorithm 2) or "overparam" (linear over-parameterization + SP distillation)
    overparam_expansion: int = 4  # hidden width of each expanded layer, in multiples of its input width
    sp_weight: float = 3000.0  # weight of the similarity-preserving loss (Tung & Mori's CIFAR setting)
    sp_blocks: list[str] = field(default_factory=list)  # regexes over module names; default: top-level blocks
    # --- data and execution ---
    batch_size: int = 64
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    amp: str = "none"  # "none", "bf16" or "fp16" (CUDA only)
    loader_workers: int = 0

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
            if (not isinstance(patterns, list) or len(patterns) > MAX_PATTERNS
                    or any(not isinstance(p, str) or len(p) > MAX_PATTERN_LENGTH for p in patterns)):
                raise bad(name, f"must be a list of at most {MAX_PATTERNS} regular expressions of at most "
                                f"{MAX_PATTERN_LENGTH} characters")
        for name, bounds in BOUNDS.items():
            value = getattr(self, name)
            integral = name in _INTEGRAL
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (integral and not isinstance(value, int)):
                raise bad(name, f"must be {'an integer' if integral else 'a number'}, got {value!r}")
            if not bounds.contains(value):
                raise bad(name, f"must be in {bounds.text()}, got {value}")
        # Before the sparsity rules: with a MACs target, sparsity is unset, and what is wrong is the target
        # (a granularity that is no name at all is named as such first).
        if self.target_macs_ratio is not None:
            parse_granularity(self.granularity)
            ratio = self.target_macs_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
                raise bad("target_macs_ratio", f"must be a number strictly between 0 and 1 (0.5: half the multiply-accumulates), "
                                               f"got {ratio!r}")
            if self.granularity != CHANNEL:
                raise bad("target_macs_ratio", f"only applies to granularity 'channel' (got {self.granularity!r}): unstructured "
                                               "and N:M masks do not remove compute on dense kernels; use sparsity")
        if self.target_macs_ratio is not None and self.sparsity != 0.0:
            raise bad("sparsity", f"give sparsity or target_macs_ratio, not both (target_macs_ratio {self.target_macs_ratio} "
                                  f"decides the channel fraction; got sparsity {self.sparsity})")
        if self.target_macs_ratio is None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                               or not 0.0 < self.sparsity < 1.0):
            raise bad("sparsity", f"must be strictly between 0 and 1 (e.g. 0.9 for 90%), got {self.sparsity}"
                      + ("; or give target_macs_ratio with granularity 'channel'" if self.sparsity == 0.0 else ""))
        if self.schedule not in schedule_names():
            raise bad("schedule", f"must be one of {schedule_names()}, got {self.schedule!r}")
        if self.recovery not in RECOVERY_MODES:
            raise bad("recovery", f"must be one of {list(RECOVERY_MODES)}, got {self.recovery!r}")
        if self.scope not in ("global", "layerwise"):
            raise bad("scope", f"must be 'global' or 'layerwise', got {self.scope!r}")
        if self.bn_after_pruning not in BN_AFTER_PRUNING:
            raise bad("bn_after_pruning", f"must be one of {list(BN_AFTER_PRUNING)}, got {self.bn_after_pruning!r}")
        if self.gradual_masks not in GRADUAL_MASKS:
            raise bad("gradual_masks", f"must be one of {list(GRADUAL_MASKS)}, got {self.gradual_masks!r}")
        nm = parse_granularity(self.granularity)
        if nm is not None and abs(self.sparsity - nm.sparsity) > 1e-9:
            raise bad("granularity", f"{nm} prunes exactly {nm.m - nm.n} of every {nm.m} weights ({nm.sparsity!r} of each "
                                     f"group): set sparsity to {nm.sparsity!r} (got {self.sparsity})")
        if self.granularity == CHANNEL and self.scope != "global":
            raise bad("scope", "granularity 'channel' ranks all channel groups together: leave scope 'global'")
        if nm is not None and self.scope != "global":
            raise bad("scope", f"{self.scope!r} does not apply to granularity {nm}, which ranks all tensors' groups together "
                               f"and prunes every tensor to exactly {nm.sparsity!r} at the end: leave scope 'global'")
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
        if self.rerank_every_steps and (self.gradual_masks != "simulated" or nm is not None or self.granularity == CHANNEL):
            raise bad("rerank_every_steps", "re-ranking inside a pruning epoch applies to unstructured simulated pruning "
                                            "(gradual_masks 'simulated'); set it to 0")
        if self.max_epochs < self.pruning_epochs:
            raise bad("max_epochs", f"must be >= pruning_epochs ({self.pruning_epochs}), got {self.max_epochs}")
        if self.finetune not in FINETUNE_MODES:
            raise bad("finetune", f"must be one of {list(FINETUNE_MODES)}, got {self.finetune!r}")
        for pattern in self.sp_blocks:
            compile_pattern(pattern, "sp_blocks")
        if self.amp not in ("none", "bf16", "fp16"):
            raise bad("amp", f"must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        # Compiles the patterns: a bad regex is reported here, not mid-run.
        self.selection()

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
    def from_dict(cls, values: dict[str, Any]) -> "DG2PFConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(known)}", field=unknown[0])
        return cls(**values)


def _integral_fields() -> frozenset[str]:
    hints = typing.get_type_hints(DG2PFConfig)
    return frozenset(n for n, h in hints.items() if h is int or (typing.get_args(h) and int in typing.get_args(h)
                                                                  and float not in typing.get_args(h)))


_INTEGRAL = _integral_fields()  # the fields that hold whole numbers (``validate``)
