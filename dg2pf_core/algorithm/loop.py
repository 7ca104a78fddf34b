"""The DG2PF loop: distilled gradual pruning (Algorithm 1), then pruned fine-tuning (Algorithm 2).

Read top to bottom, ``run_dg2pf`` is the paper's pseudo-code:

1. ``baseline``: evaluate the dense input model.
2. ``gradual_pruning``: for each of ``pruning_epochs`` targets (linear in (0, s]), rank all prunable
   weights by magnitude, then train one epoch with simulated pruning and self-distillation from the
   frozen unpruned model (AdamW). After the last one the mask becomes final (hard). The ranking is
   global but no layer goes beyond ``max_layer_sparsity`` (what it keeps is pruned elsewhere), so no
   layer collapses. Before every validation of a pruned network, BatchNorm statistics are
   re-estimated on ``bn_recalibration_batches`` training batches of that network (``batchnorm``):
   the running averages lag behind a sparse network whose few weights move fast, and an evaluation
   with them can read 10% where the network scores 70% (docs/fidelity.md). With
   ``bn_after_pruning="frozen"`` BatchNorm trains in eval mode from the last ranking on, on the
   statistics re-estimated before each validation.
   With ``granularity="N:M"`` the same global ranking prunes at most M-N of every group of M
   consecutive weights (``nm``), ending with exactly N kept in each. With ``granularity="channel"``
   the ranking is over groups of coupled output channels (``channels``: root-mean-square magnitude,
   the same caps), simulated pruning zeroes and restores whole channels, and after the last pruning
   epoch the pruned channels are physically removed: distillation and fine-tuning continue on the
   smaller dense network.
3. ``distillation``: same loss and optimiser with the final mask, while validation top-1 improves.
4. ``finetuning``: cross-entropy only, SGD with momentum, from the best weights so far, while
   validation top-1 improves. With ``finetune="overparam"`` every pruned layer is first expanded into
   a chain of linear layers (``overparam``) and the loss adds similarity-preserving distillation from
   the dense teacher; the chains collapse back into the original layers at the end.

The result is the best model by validation top-1 among epochs at the final sparsity. After every
epoch a reporter receives the epoch's record and the full ``TrainingState``; passing a state back as
``resume`` continues the run from there.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dg2pf_contract.results import ChannelSummary, LatencyObjective
from dg2pf_core.algorithm import distributed, overparam
from dg2pf_core.algorithm.batchnorm import freeze_batchnorm, recalibrate_batchnorm, settle_constant_channels, settled
from dg2pf_core.algorithm.channels import ChannelPlan, Structure, apply_structure, remove_channels
from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.algorithm.distillation import FeatureTaps, kd_loss, similarity_blocks, similarity_loss
from dg2pf_core.algorithm.latency_table import LatencyTable
from dg2pf_core.algorithm.latency_target import LatencyTarget
from dg2pf_core.algorithm.masks import (
    EmptyingGuard,
    Masks,
    apply_masks_,
    classifier_weight,
    magnitude_masks,
    mask_sparsity,
    recovered,
    select_prunable,
)
from dg2pf_core.algorithm.nm import check_divisible, nm_masks
from dg2pf_core.algorithm.schedule import sparsity_targets
from dg2pf_core.algorithm.simulated import _backup, _restore, hard_step, simulated_step
from dg2pf_core.algorithm.state import EpochRecord, TrainingState, fingerprint
from dg2pf_core.data.loaders import Loaders
from dg2pf_core.errors import ConfigError, InputModelMismatch, ResumeError, TrainingDiverged
from dg2pf_core.io.metrics import Accuracy, autocast_context, evaluate


class Reporter(Protocol):
    """Called after every epoch. ``state`` references live tensors: save it before returning."""

    def __call__(self, record: EpochRecord, state: TrainingState) -> None: ...


class Progress(Protocol):
    def start_epoch(self, phase: str, epoch: int, sparsity: float, batches: int) -> None: ...
    def batch(self, loss: float) -> None: ...
    def end_epoch(self, record: EpochRecord) -> None: ...


class _NoProgress:
    def start_epoch(self, phase: str, epoch: int, sparsity: float, batches: int) -> None:
        pass

    def batch(self, loss: float) -> None:
        pass

    def end_epoch(self, record: EpochRecord) -> None:
        pass


@dataclass
class DG2PFResult:
    model: nn.Module  # best weights, pruned entries exactly 0
    masks: Masks
    history: list[dict]
    best_epoch: int
    best_val_top1: float
    baseline_val_top1: float
    baseline_test_top1: float | None
    test: Accuracy | None
    epochs: int
    warnings: list[str] = field(default_factory=list)  # what the run found the user should know (metrics.json)
    # Channel granularity: what was removed, against the input model, and the Structure that removes it
    # from the input model's architecture (None: no channel was removed).
    channels: ChannelSummary | None = None
    structure: Structure | None = None
    latency: LatencyObjective | None = None  # latency_budget_ms: the budget, predicted and measured


def _refuse_at_chance(state, run, config) -> list[str]:
    """The chance-level warnings of the baseline; ``InputModelMismatch`` instead with ``chance_baseline='refuse'``."""
    notes = chance_warnings(state.baseline["val_top1"], run.num_classes())
    if notes and config.chance_baseline == "refuse":
        refusal = notes[0].split("; set chance_baseline to 'refuse'")[0]
        raise InputModelMismatch(f"{refusal} (chance_baseline is 'refuse': nothing was trained)")
    return notes


def chance_warnings(val_top1: float, num_classes: int | None) -> list[str]:
    """A warning when the input model's validation top-1 is within 5 points of chance (1 / classes)."""
    if not num_classes or num_classes < 2:
        return []
    chance = 100.0 / num_classes
    if val_top1 > chance + 5.0:
        return []
    return [
        f"the input model scores {val_top1:.2f}% on the validation split, near chance ({chance:.2f}% for {num_classes} "
        "classes): it does not fit this data (another dataset, another class order or preprocessing?), and pruning it "
        "cannot make a useful model; set chance_baseline to 'refuse' to stop such a job before training"
    ]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _Run:
    """The pieces one run needs, built once; the phases below are written against it."""

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        loaders: Loaders,
        config: DG2PFConfig,
        device: torch.device,
        progress: Progress,
        reporter: Reporter | None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.model, self.teacher, self.loaders, self.cfg = model, teacher, loaders, config
        self.device, self.progress, self.reporter = device, progress, reporter
        self.params = select_prunable(_unwrap(model), config.selection()).params
        self.all_params = [p for p in model.parameters() if p.requires_grad]
        classifier = classifier_weight(_unwrap(model))
        self.guard = EmptyingGuard(
            config.min_weights_per_tensor,
            config.min_weights_per_class,
            classifier if classifier in self.params else None,
        )
        # The input model's size, counted before anything is removed or expanded (a resumed run is
        # handed the input model too): not the teacher's, which may be another checkpoint.
        self.params_dense = sum(p.numel() for p in _unwrap(model).parameters())
        fraction = config.sparsity
        self.plan: ChannelPlan | None = None  # channel granularity: the groups of the input model
        # kept widths rounded to this (channel_multiple, or a smaller one a MACs target needs)
        self.multiple = config.channel_multiple
        self.ranked_at = 0.0  # channel granularity: the fraction the last ranking used (before rounding)
        if config.channel:
            self.input_shape = tuple(input_shape or next(iter(loaders.val()))[0].shape[1:])
            self.plan = ChannelPlan.build(_unwrap(model), self.input_shape, config.selection())
            self.params = dict(_unwrap(model).named_parameters())  # a group touches biases and BatchNorms too
            self.macs_dense = self.plan.dense_macs(self.params)
            # The parameters channel removal can shrink: every tensor some group touches.
            self.params_prunable = sum(
                self.params[n].numel() for n in {i.param for g in self.plan.groups for i in g.items}
            )
            if config.latency_budget_ms is not None:  # the schedule runs over the latency to remove (LatencyTarget)
                fraction = 1.0
            elif config.target_macs_ratio is None and config.channel_multiple > 1:  # the multiple the fraction allows
                _, self.multiple = self.plan.fit_count(
                    self.params, config.sparsity, config.layer_cap, config.channel_multiple
                )
            if config.target_macs_ratio is not None:
                fraction, _, self.multiple = self.plan.fit_macs(
                    self.params, config.target_macs_ratio, config.layer_cap, config.channel_multiple
                )
        self.latency: LatencyTarget | None = None  # latency_budget_ms (set by use_latency)
        self.targets = sparsity_targets(config.schedule, fraction, config.pruning_epochs)
        self.channels_pruned = 0
        self.selected: dict[str, torch.Tensor] = {}  # channel granularity: the last ranking's pruned channels
        self.nm = config.nm()
        if self.nm is not None:
            check_divisible(self.params, self.nm)  # before any epoch: prepare checked it already for jobs
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" and device.type == "cuda" else None
        self.optimizer: torch.optim.Optimizer = self.adamw()
        self.taps: tuple[FeatureTaps, FeatureTaps] | None = None  # (student, teacher) while over-parameterized

    # --- the pruning rule ---
    def rank(self, target: float, last: bool = False) -> Masks:
        """The masks of the smallest-magnitude weights at ``target``: one global ranking, under the
        layer caps (unstructured), at most M-N per group (N:M), or of whole channel groups (channel;
        with ``target_macs_ratio`` the last ranking meets the MACs ratio with the weights as they are)."""
        if self.nm is not None:
            return nm_masks(self.params, target, self.nm)
        if self.plan is not None and self.latency is not None:  # target: the fraction of the latency to remove
            allocation = self.latency.select(self.params, target)
            self.selected, self.channels_pruned = allocation.pruned, allocation.channels_pruned
            self.ranked_at = self.channels_pruned / self.plan.channels
            return self.plan.masks(self.params, self.selected)
        if self.plan is not None:
            if last and self.cfg.target_macs_ratio is not None:
                target, _ = self.plan.fraction_for_macs(
                    self.params, self.cfg.target_macs_ratio, self.cfg.layer_cap, self.multiple
                )
            else:  # the channel fraction the schedule asks for, after the widths are rounded to the multiple
                target = self.plan.fraction_for_count(self.params, target, self.cfg.layer_cap, self.multiple)
            self.ranked_at = target  # the layer collapse guard applied was layer_cap(ranked_at)
            self.selected = self.plan.select(self.params, target, self.cfg.layer_cap(target), self.multiple)
            self.channels_pruned = sum(int(v.sum()) for v in self.selected.values())
            return self.plan.masks(self.params, self.selected)
        keep = self.guard.kept(self.params) if self.guard.active else None
        return magnitude_masks(self.params, target, self.cfg.scope, self.cfg.layer_cap(target), keep)

    def num_classes(self) -> int | None:
        """The classifier's outputs (its last Conv/Linear layer's), for the chance level."""
        name = classifier_weight(_unwrap(self.model))
        return int(dict(_unwrap(self.model).named_parameters())[name].shape[0]) if name else None

    def sparsity(self, masks: Masks) -> float:
        """What an epoch record calls its sparsity: of the prunable weights, or of the channels."""
        if self.plan is not None:
            return self.channels_pruned / self.plan.channels
        return mask_sparsity(masks)

    def use_latency(self, state: TrainingState, table: LatencyTable | None) -> None:
        """latency_budget_ms: the latency table (the state's when resumed, else ``table``, else measured
        here) and the channel multiple the budget is reachable with; on the input model, before any
        channel is removed."""
        self.latency = LatencyTarget.prepare(
            _unwrap(self.model),
            self.input_shape,
            self.plan,
            self.params,
            self.cfg,
            state.latency_target,
            table,  # type: ignore[arg-type]
        )
        state.latency_target = self.latency.to_json()
        self.multiple = self.latency.multiple

    # --- channel granularity: the physical removal ---
    def remove(self, state: TrainingState) -> None:
        """Remove the selected channels (their weights already zero): the model becomes the smaller
        dense network; parameters, optimiser (a fresh AdamW: the old state's shapes are gone) and DDP
        are rebuilt around it, and the state records the structure for resuming."""
        stage = self.plan.pruned_channels(self.selected)  # type: ignore[union-attr]
        remove_channels(_unwrap(self.model), self.input_shape, stage)
        state.structure = Structure(self.input_shape).then(stage).to_json()  # type: ignore[arg-type]
        state.channels_pruned = self.channels_pruned
        self.rebuilt()

    def rebuilt(self) -> None:
        module = _unwrap(self.model)
        module.to(self.device)
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            ddp = self.model
            self.model = nn.parallel.DistributedDataParallel(
                module, device_ids=ddp.device_ids, output_device=ddp.output_device
            )
        self.params = dict(module.named_parameters())
        self.all_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.adamw()

    # --- optimisers ---
    def adamw(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.all_params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def sgd(self) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.SGD(
            self.all_params, lr=c.finetune_lr, momentum=c.finetune_momentum, weight_decay=c.finetune_weight_decay
        )

    # --- losses ---
    def distilled_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cfg.kd_alpha == 0.0:  # no distillation: the teacher's forward pass would be wasted
            return self.ce_loss(inputs, targets)
        with torch.no_grad(), autocast_context(self.device, self.cfg.amp):
            teacher_logits = self.teacher(inputs)
        with autocast_context(self.device, self.cfg.amp):
            student_logits = self.model(inputs)
        return kd_loss(
            student_logits, teacher_logits, targets, self.cfg.kd_temperature, self.cfg.kd_alpha, self.cfg.kd_loss
        )

    def ce_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device, self.cfg.amp):
            logits = self.model(inputs)
        return F.cross_entropy(logits.float(), targets)

    def similarity_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus similarity-preserving distillation of the tapped blocks' features."""
        student, teacher = self.taps  # type: ignore[misc]
        with torch.no_grad(), autocast_context(self.device, self.cfg.amp):
            self.teacher(inputs)
        loss = self.ce_loss(inputs, targets)
        sp = sum(similarity_loss(student.outputs[n], teacher.outputs[n]) for n in student.outputs)
        return loss + self.cfg.sp_weight * sp

    # --- linear over-parameterization (finetune="overparam") ---
    def expand(self, masks: Masks) -> None:
        """Pruned layers -> chains (the mask applied inside them), the optimiser's parameter list and
        DDP rebuilt around the new module, feature taps on student and teacher."""
        module = _unwrap(self.model)
        if self.plan is not None:  # the compact network: every selected layer expanded, nothing masked
            masks = {
                n: torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                for n, p in select_prunable(module, self.cfg.selection()).params.items()
            }
        overparam.expand(module, masks, self.cfg.overparam_expansion, seed=self.cfg.seed)
        module.to(self.device)
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            ddp = self.model
            self.model = nn.parallel.DistributedDataParallel(
                module, device_ids=ddp.device_ids, output_device=ddp.output_device
            )
        self.all_params = [p for p in self.model.parameters() if p.requires_grad]
        blocks = similarity_blocks(module, self.cfg.sp_blocks)
        self.taps = (FeatureTaps(module, blocks), FeatureTaps(self.teacher, blocks))

    def collapse(self) -> None:
        module = _unwrap(self.model)
        overparam.collapse(module)
        self.params = (
            dict(module.named_parameters())
            if self.plan is not None
            else select_prunable(module, self.cfg.selection()).params
        )
        if self.taps is not None:
            for taps in self.taps:
                taps.remove()
            self.taps = None

    # --- one epoch ---
    def train_epoch(
        self,
        state: TrainingState,
        masks: Masks,
        *,
        simulated: bool,
        distill: bool,
        sparsity: float,
        rerank: Callable[[], Masks] | None = None,
        recoveries: list[int] | None = None,
    ) -> tuple[float, Masks]:
        """One epoch; returns its mean loss and the mask it ended with. ``rerank`` (simulated pruning
        with ``rerank_every_steps``): called every that many optimiser steps for a new mask, whose
        recovered weights (against the mask before it) are appended to ``recoveries``."""
        self.model.train()
        if self.cfg.bn_after_pruning == "frozen" and state.phase in ("distillation", "finetuning"):
            freeze_batchnorm(_unwrap(self.model))  # the statistics of the last re-estimate (validate)
        self.progress.start_epoch(state.phase, state.epoch + 1, sparsity, self.loaders.train_batches())
        loss_fn = self.distilled_loss if distill else (self.similarity_loss if self.taps else self.ce_loss)
        # Over-parameterized layers apply the mask in their forward pass: no per-step masking.
        step_masks = {} if self.taps else masks
        every = self.cfg.rerank_every_steps if rerank is not None else 0
        total, batches = 0.0, 0
        for inputs, targets in self.loaders.train(state.epoch):
            if every and batches and batches % every == 0:
                new = distributed.sync_masks(rerank())
                if recoveries is not None:
                    recoveries.append(recovered(masks, new))
                masks = new
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            compute = lambda: loss_fn(inputs, targets)  # noqa: E731
            common = {"clip_params": self.all_params, "clip_norm": self.cfg.grad_clip, "scaler": self.scaler}
            if simulated:
                loss = simulated_step(compute, self.optimizer, self.params, masks, recovery=self.cfg.recovery, **common)
            else:
                loss = hard_step(compute, self.optimizer, self.params, step_masks, **common)
            value = float(loss)
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"training loss became {value} in epoch {state.epoch + 1} ({state.phase}): the run diverged; start "
                    f"again with a lower {'finetune_lr' if state.phase == 'finetuning' else 'lr'} (now "
                    f"{self.cfg.finetune_lr if state.phase == 'finetuning' else self.cfg.lr:g})"
                )
            total += value
            batches += 1
            self.progress.batch(value)
        return distributed.mean_across_ranks(total / max(batches, 1), self.device), masks

    def evaluate(self, loader) -> Accuracy:
        # The unwrapped module: DDP's forward runs collectives, and ranks may hold unequal shards.
        module = _unwrap(self.model)
        distributed.sync_buffers(module)
        return evaluate(module, loader, self.device, self.cfg.amp)

    def validate(self, state: TrainingState, masks: Masks | None = None) -> Accuracy:
        """Validation top-1 of the network (with ``masks``: as pruned by them; weights restored after),
        its BatchNorm statistics first re-estimated for it (``recalibrate``)."""
        masks = masks or {}
        backup = _backup(self.params, masks)
        apply_masks_(self.params, masks)
        try:
            self.recalibrate(state)
            module = _unwrap(self.model)
            if self.cfg.bn_after_pruning == "frozen" and state.phase in ("distillation", "finetuning"):
                settle_constant_channels(module)  # training runs BatchNorm in eval mode too: settled for good
            with settled(module):  # as the written network will be (batchnorm.py); training never sees it
                return self.evaluate(self.loaders.val())
        finally:
            _restore(self.params, masks, backup)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def recalibrate(self, state: TrainingState) -> None:
        """BatchNorm statistics of the network as it is now, from ``bn_recalibration_batches``
        training batches (0: off); every rank then holds rank 0's."""
        if self.cfg.bn_recalibration_batches <= 0:
            return
        module = _unwrap(self.model)
        # Its batches' augmentation draws random numbers: on a fork of the generators, so re-estimation
        # changes what validation measures, never what training sees afterwards.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            recalibrate_batchnorm(
                module, self.loaders.train(state.epoch), self.device, self.cfg.bn_recalibration_batches
            )
        distributed.sync_buffers(module)

    # --- bookkeeping ---
    def finish_epoch(self, state: TrainingState, masks: Masks, record: EpochRecord) -> None:
        state.masks = masks
        distributed.sync_buffers(_unwrap(self.model))  # the saved state is rank 0's on every rank
        state.model = _unwrap(self.model).state_dict()
        state.optimizer_kind = "sgd" if isinstance(self.optimizer, torch.optim.SGD) else "adamw"
        state.optimizer = self.optimizer.state_dict()
        record.restarts = state.restarts
        state.history.append(record.to_dict())
        state.rng_cpu = torch.get_rng_state()
        state.rng_cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        # The state first: whatever happens while the epoch is announced (Ctrl-C), it is kept.
        if self.reporter is not None:
            self.reporter(record, state)
        self.progress.end_epoch(record)

    def consider_best(self, state: TrainingState, val: Accuracy) -> bool:
        """Track the best epoch at the final sparsity; ``stale`` counts epochs without improvement."""
        if state.best_val_top1 is None or val.top1 > state.best_val_top1:
            state.best_val_top1, state.best_epoch = val.top1, state.epoch
            # Always in the input model's keys and shapes (chains collapsed), whatever the phase.
            state.best_model = overparam.collapsed_state_dict(_unwrap(self.model))
            state.stale = 0
            return True
        state.stale += 1
        return False

    def restore(self, state: TrainingState) -> Masks:
        masks = {k: v.to(self.device) for k, v in state.masks.items()}
        if state.structure:  # channels were removed: the saved model is the smaller network
            structure = Structure.from_json(state.structure, source="the training checkpoint")
            apply_structure(_unwrap(self.model), structure)
            self.channels_pruned = state.channels_pruned
            self.rebuilt()
        if state.phase == "finetuning" and self.cfg.finetune == "overparam":
            self.expand(masks)  # the saved model is the over-parameterized one
        _unwrap(self.model).load_state_dict(state.model)
        if state.optimizer_kind == "sgd":
            self.optimizer = self.sgd()
        if state.optimizer:
            self.optimizer.load_state_dict(state.optimizer)
        if state.rng_cpu is not None:
            torch.set_rng_state(state.rng_cpu)
        if state.rng_cuda and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state.rng_cuda)
        return masks


def state_stage(state: TrainingState) -> dict[str, list[int]] | None:
    """The channels this run removed (root -> indices), once it has removed them."""
    return Structure.from_json(state.structure).stages[0] if state.structure else None


def run_dg2pf(
    model: nn.Module,
    loaders: Loaders,
    config: DG2PFConfig,
    *,
    teacher: nn.Module | None = None,
    reporter: Reporter | None = None,
    progress: Progress | None = None,
    resume: TrainingState | None = None,
    device: torch.device | None = None,
    input_shape: tuple[int, ...] | None = None,
    latency_table: LatencyTable | None = None,
) -> DG2PFResult:
    """Prune ``model`` (pre-trained, dense) to ``config.sparsity`` with DG2PF.

    ``teacher`` defaults to a frozen copy of ``model`` as passed in (self-distillation), so when
    resuming pass the same input model and teacher as the original run. ``input_shape`` (C, H, W):
    what channel granularity traces the model with (default: a validation batch's). ``latency_table``:
    with ``latency_budget_ms``, a table measured beforehand for this machine (default: measured here).
    """
    if config.max_top1_drop is not None:
        raise ConfigError(
            "max_top1_drop is a search over latency budgets, one DG2PF run per budget: run it as a job "
            "(dg2pf prune, POST /jobs), which runs the search on Ray Tune (dg2pf_ray/fastest.py)",
            field="max_top1_drop",
        )
    device = device or resolve_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device)
    teacher = copy.deepcopy(_unwrap(model)) if teacher is None else teacher
    teacher.to(device).eval().requires_grad_(False)
    teacher_id = fingerprint(teacher.state_dict())

    run = _Run(model, teacher, loaders, config, device, progress or _NoProgress(), reporter, input_shape)
    masks: Masks = {}
    if resume is None:
        state = TrainingState(teacher_fingerprint=teacher_id, config=config.to_dict())
    else:
        state = resume
    if run.plan is not None and config.latency_budget_ms is not None:
        run.use_latency(state, latency_table)  # before restore: on the input model, whatever was removed since
    if resume is not None:
        if state.teacher_fingerprint != teacher_id:
            raise ResumeError(
                "the training checkpoint was made with a different input model/teacher; "
                "resume with the original checkpoint"
            )
        masks = run.restore(state)
        state.restarts += 1  # the history shows where a run was resumed

    # 1. Baseline: the dense input model.
    if state.phase == "baseline":
        t0 = time.perf_counter()
        val = run.evaluate(loaders.val())  # the input model as given: no recalibration
        test_loader = loaders.test()
        test = run.evaluate(test_loader) if test_loader is not None else None
        state.baseline = {
            "val_top1": val.top1,
            "val_top5": val.top5,
            "test_top1": test.top1 if test else None,
            "test_top5": test.top5 if test else None,
        }
        _refuse_at_chance(state, run, config)  # before the baseline is reported (saved): nothing to resume
        state.phase = "gradual_pruning"
        run.finish_epoch(
            state,
            masks,
            EpochRecord(
                phase="baseline",
                epoch=0,
                sparsity=0.0,
                train_loss=None,
                val_top1=val.top1,
                val_top5=val.top5,
                lr=None,
                seconds=time.perf_counter() - t0,
            ),
        )
    notes = _refuse_at_chance(state, run, config)  # again for a run resumed with chance_baseline changed to 'refuse'

    # 2. Distilled gradual pruning with simulated pruning (Algorithm 1, i <= s_e).
    while state.phase == "gradual_pruning":
        t0 = time.perf_counter()
        target = run.targets[state.epoch]
        previous = masks
        last = state.epoch + 1 == config.pruning_epochs
        masks = distributed.sync_masks(run.rank(target, last))
        recoveries = [recovered(previous, masks)]
        simulated = config.gradual_masks == "simulated"
        if not simulated:
            apply_masks_(run.params, masks)  # hard gradual masks (ablation): pruned weights are gone for good
        rerank = (lambda: run.rank(target, last)) if simulated and config.rerank_every_steps else None  # noqa: E731
        loss, masks = run.train_epoch(
            state, masks, simulated=simulated, distill=True, sparsity=target, rerank=rerank, recoveries=recoveries
        )
        state.epoch += 1
        sparsity, changed = run.sparsity(masks), sum(recoveries)
        if last:
            apply_masks_(run.params, masks)  # the mask is final from here on
            if run.plan is not None:
                run.remove(state)  # ... and the pruned channels are gone: nothing left to mask
                masks = {}
            val = run.validate(state)
            best = run.consider_best(state, val)
            state.phase = "distillation"
        else:
            val, best = run.validate(state, masks), False
        record = EpochRecord(
            phase="gradual_pruning",
            epoch=state.epoch,
            sparsity=sparsity,
            train_loss=loss,
            val_top1=val.top1,
            val_top5=val.top5,
            lr=run.lr(),
            seconds=time.perf_counter() - t0,
            is_best=best,
            recovered=changed,
            rankings=len(recoveries),
            recovered_per_ranking=recoveries,
        )
        run.finish_epoch(state, masks, record)

    # 3. Distilled training with the final mask while validation top-1 improves (Algorithm 1, i > s_e).
    while state.phase == "distillation":
        if state.stale >= config.patience or state.epoch >= config.max_epochs:
            # 4. Pruned fine-tuning starts from the best weights so far, with a fresh SGD optimiser.
            _unwrap(run.model).load_state_dict(state.best_model)
            if config.finetune == "overparam":
                run.expand(masks)
            run.optimizer = run.sgd()
            state.phase, state.stale = "finetuning", 0
            break
        t0 = time.perf_counter()
        loss, _ = run.train_epoch(state, masks, simulated=False, distill=True, sparsity=run.sparsity(masks))
        state.epoch += 1
        val = run.validate(state)
        best = run.consider_best(state, val)
        run.finish_epoch(
            state,
            masks,
            EpochRecord(
                phase="distillation",
                epoch=state.epoch,
                sparsity=run.sparsity(masks),
                train_loss=loss,
                val_top1=val.top1,
                val_top5=val.top5,
                lr=run.lr(),
                seconds=time.perf_counter() - t0,
                is_best=best,
            ),
        )

    # 4. Pruned fine-tuning: cross-entropy, SGD, while validation top-1 improves (Algorithm 2).
    while state.phase == "finetuning":
        if state.stale >= config.patience or state.epoch >= config.max_epochs:
            state.phase = "done"
            break
        t0 = time.perf_counter()
        loss, _ = run.train_epoch(state, masks, simulated=False, distill=False, sparsity=run.sparsity(masks))
        state.epoch += 1
        val = run.validate(state)
        best = run.consider_best(state, val)
        run.finish_epoch(
            state,
            masks,
            EpochRecord(
                phase="finetuning",
                epoch=state.epoch,
                sparsity=run.sparsity(masks),
                train_loss=loss,
                val_top1=val.top1,
                val_top5=val.top5,
                lr=run.lr(),
                seconds=time.perf_counter() - t0,
                is_best=best,
            ),
        )

    # The result: the best epoch at the final sparsity, in the input model's architecture.
    if run.taps is not None:
        run.collapse()
    _unwrap(run.model).load_state_dict(state.best_model)
    apply_masks_(run.params, masks)
    settle_constant_channels(_unwrap(run.model))  # as its validation measured it
    test_loader = loaders.test()
    test = run.evaluate(test_loader) if test_loader is not None else None
    channels = (
        None
        if run.plan is None
        else ChannelSummary(
            channels_total=run.plan.channels,
            channels_pruned=run.channels_pruned,
            macs_dense=run.macs_dense,
            skipped_groups=list(run.plan.skipped),
            params_dense=run.params_dense,
            params_prunable=run.params_prunable,
            channel_multiple=run.multiple,
            # the guard the last ranking applied (before widths were rounded up; resumed after it: estimated)
            layer_cap=run.cfg.layer_cap(run.ranked_at or run.channels_pruned / run.plan.channels),
            layer_channels={
                g.root: len((state_stage(state) or {}).get(g.root, [])) / g.channels for g in run.plan.groups
            },
        )
    )
    return DG2PFResult(
        model=_unwrap(run.model),
        masks=masks,
        history=list(state.history),
        best_epoch=int(state.best_epoch or 0),
        best_val_top1=float(state.best_val_top1 or 0.0),
        baseline_val_top1=float(state.baseline["val_top1"]),
        baseline_test_top1=state.baseline.get("test_top1"),
        test=test,
        epochs=state.epoch,
        warnings=notes,
        channels=channels,
        structure=Structure.from_json(state.structure) if run.plan is not None and state.structure else None,
        latency=None if run.latency is None else run.latency.summary(_unwrap(run.model), run.input_shape),
    )
