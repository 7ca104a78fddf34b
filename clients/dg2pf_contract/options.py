"""The algorithm's options: their names, defaults, ranges, choices and the named presets, as plain values.

dg2pf_core's ``DG2PFConfig`` is these options plus the checks and helpers that need the core; the
``JobSpec`` (``dg2pf_contract.job``) turns them into its ``schedule`` section, so the options are declared
once. What each option does: docs/algorithm.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Amp = Literal["none", "bf16", "fp16"]
FINETUNE_MODES = ("sgd", "overparam")
GRADUAL_MASKS = ("simulated", "hard")
BN_AFTER_PRUNING = ("batch", "frozen")
KD_LOSSES = ("standard", "authors")
SCOPES = ("global", "layerwise")
RECOVERY_MODES = ("frozen", "feedback")  # dg2pf_core/algorithm/simulated.py
AMP_MODES = ("none", "bf16", "fp16")
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
        def number(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        return f"{'(' if self.low_open else '['}{number(self.low)}, {number(self.high)}{')' if self.high_open else ']'}"


# Upper bounds lie well beyond any real run: values past them are typos or attacks (a seed torch
# cannot take, a batch of a billion images, a million epochs), refused before anything is built.
BOUNDS: dict[str, Bounds] = {
    "pruning_epochs": Bounds(1, 10_000),
    "max_epochs": Bounds(1, 100_000),
    "patience": Bounds(1, 100_000),
    "batch_size": Bounds(1, 65_536),
    "eval_batch_size": Bounds(1, 65_536),
    "seed": Bounds(0, 2**32 - 1),
    "bn_recalibration_batches": Bounds(0, 100_000),
    "overparam_expansion": Bounds(1, 64),
    "channel_multiple": Bounds(1, 1024),
    "loader_workers": Bounds(0, 256),
    "max_layer_sparsity": Bounds(0, 1, low_open=True),
    "warn_layer_sparsity": Bounds(0, 1, low_open=True),
    "layer_density_floor": Bounds(0, 1, high_open=True),
    "lr": Bounds(0, 100, low_open=True),
    "finetune_lr": Bounds(0, 100, low_open=True),
    "kd_temperature": Bounds(0.01, 1000),
    "kd_alpha": Bounds(0, 1),
    "weight_decay": Bounds(0, 100),
    "finetune_weight_decay": Bounds(0, 100),
    "grad_clip": Bounds(0, 1e6),
    "finetune_momentum": Bounds(0, 1, high_open=True),
    "sp_weight": Bounds(0, 1e9),
    "min_weights_per_tensor": Bounds(0, 1_000_000),
    "min_weights_per_class": Bounds(0, 1_000_000),
    "rerank_every_steps": Bounds(0, 10_000_000),
    "latency_threads": Bounds(1, 256),
    "latency_batch_size": Bounds(1, 4096),
    "max_quantization_drop": Bounds(0, 100),
}
# latency_budget_ms: above 0, at most a day (a typo or an attack beyond it).
LATENCY_BUDGET_BOUNDS = Bounds(0, 86_400_000, low_open=True)
LATENCY_BACKENDS = ("onnxruntime", "torch")
PRECISIONS = ("fp32", "int8")
# max_top1_drop: points of validation top-1, above 0, at most 100.
TOP1_DROP_BOUNDS = Bounds(0, 100, low_open=True)
OBJECTIVE_SAMPLES = 4  # latency budgets a max_top1_drop search tries unless its tune section says
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
PRESET_FIELDS = (
    "schedule",
    "recovery",
    "rerank_every_steps",
    "max_layer_sparsity",
    "layer_density_floor",
    "lr",
    "weight_decay",
    "kd_loss",
    "kd_temperature",
    "kd_alpha",
    "grad_clip",
)
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "schedule": "cubic",
        "recovery": "frozen",
        "rerank_every_steps": 0,
        "max_layer_sparsity": 1.0,
        "layer_density_floor": 0.0,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "kd_loss": "standard",
        "kd_temperature": 4.0,
        "kd_alpha": 0.75,
        "grad_clip": 0.5,
    },
    "paper": {
        "schedule": "linear",
        "recovery": "feedback",
        "rerank_every_steps": 0,
        "max_layer_sparsity": 1.0,
        "layer_density_floor": 0.0,
        "lr": 1e-5,
        "weight_decay": 0.0,
        "kd_loss": "authors",
        "kd_temperature": 4.0,
        "kd_alpha": 0.75,
        "grad_clip": 0.5,
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


# Granularity: "unstructured", "channel" or N:M such as "2:4" (dg2pf_core/algorithm/nm.py checks N < M and the
# sparsity).
CHANNEL = "channel"
GRANULARITY_PATTERN = r"^(unstructured|channel|[0-9]{1,2}:[0-9]{1,2})$"


@dataclass
class Options:
    """The options of one DG2PF run, with their defaults. ``preset`` names a configuration (``PRESETS``):
    the fields it lists are None here and take the preset's values unless given."""

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
    gradual_masks: str = (
        "simulated"  # "simulated" (DG2PF: weights put back after each step) or "hard" (zeroed for good)
    )
    scope: str = "global"  # "global" ranking or "layerwise"
    # "unstructured" (DG2PF) or "N:M" ("2:4": at most N of every M consecutive weights along a row kept,
    # dg2pf_core/algorithm/nm.py). N:M needs sparsity (M-N)/M and the global scope; the layer caps below do not
    # apply to it (no tensor goes beyond (M-N)/M: every group is capped by construction).
    # "channel": whole output channels with everything coupled to them (Torch-Pruning's dependency
    # graph, dg2pf_core/algorithm/channels.py); sparsity is then the fraction of prunable channels, unless
    # target_macs_ratio is given, and the pruned channels are physically removed after the last
    # pruning epoch.
    granularity: str = "unstructured"
    # Channel granularity only: the multiply-accumulates the pruned network may keep, as a fraction of
    # the dense network's (0.5: half the compute); converted to a channel fraction (replacing sparsity)
    # before training and met exactly at the last pruning epoch. None: use sparsity.
    target_macs_ratio: float | None = None
    # Channel granularity only: every pruned layer keeps a multiple of this many channels (the kept
    # width rounded up; target_macs_ratio is still met, by pruning more elsewhere), as CPU kernels and
    # tensor cores work in blocks of channels (measured: docs/benchmarks.md section 11). 1: off.
    channel_multiple: int = 16
    # Channel granularity only: the latency (ms) the pruned network may take on the machine the job runs
    # on, as latency_backend runs it (latency_threads threads, batch latency_batch_size, the job's input
    # size); replaces sparsity and target_macs_ratio. A per-layer latency table is measured before
    # training (dg2pf_core/algorithm/latency_table.py) and every ranking keeps, per layer, the channels
    # worth the most for the time they cost (dg2pf_core/algorithm/allocation.py); the final network is
    # measured end to end and metrics.json's latency_objective states both figures.
    latency_budget_ms: float | None = None
    latency_backend: str = "onnxruntime"  # "onnxruntime" or "torch" (eager, CPU)
    latency_threads: int = 1
    latency_batch_size: int = 1
    # A latency table file (`dg2pf latency-table`) measured where the model will serve, with the same
    # backend, threads, batch size and input size: the budget is then met by that machine's table (no
    # measurement here, so no end-to-end calibration either). A service reads it only under its data roots.
    latency_table: str | None = None
    # Channel granularity only: the fastest network (by the latency options above) whose validation top-1
    # is at most this many points under the input model's; replaces sparsity and the other targets. A
    # search on Ray Tune: a latency table is measured once, latency budgets from near-dense to near the
    # fastest the guard allows are calibrated on this machine, each runs as a trial (a latency_budget_ms
    # job), every trial's network is measured again one at a time, and the fastest within the drop is the
    # job's model; pareto.json holds every trial (dg2pf_ray/fastest.py).
    max_top1_drop: float | None = None
    # After pruning, "int8" also writes model.int8.onnx: static post-training quantization of model.onnx
    # by ONNX Runtime (QDQ, per-channel weights, activations calibrated on training images), kept only if
    # its validation top-1 is at most max_quantization_drop points under the fp32 model's; metrics.json's
    # quantization section says which, with both figures (dg2pf_core/io/quantize.py).
    precision: str = "fp32"
    max_quantization_drop: float = 0.5
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
    # batches (0: off, the running averages as training left them): stale averages misread a pruned
    # network's accuracy and early stopping kept the wrong epochs (docs/fidelity.md).
    bn_recalibration_batches: int = 32
    # After the last ranking: "batch" (BatchNorm normalises each training batch by its own statistics,
    # as in ordinary training) or "frozen" (BatchNorm layers train in eval mode, normalising by the
    # statistics last re-estimated for the final mask, as the served network will; with
    # bn_recalibration_batches=0, by the running averages the last pruning epoch left). Off by default:
    # it made training and serving agree but did not raise accuracy (docs/fidelity.md).
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
