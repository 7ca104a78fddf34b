"""DG2PF, its ablations, and the peers that are DG2PF configurations with ingredients removed.

Each method is one ``DG2PFConfig``: defaults except for the fields named below, plus the cell's
budget (``pruning_epochs=P``, ``max_epochs=E``, ``patience``) and seed. On digits it is run by
``dg2pf_core.run_dg2pf`` over the harness's fixed split; on a job-path dataset (fashion-mnist) it
is run as a user's job is: a ``PruneJob`` with the dataset spec, ``dg2pf_core.job.prepare`` (the
registry, the real transforms, the checkpoint read as any user's), then ``dg2pf_core.job.run``. The
one departure: the prepared training split is cut to the cell's subset (``data.train_subset``, the
indices every peer of the seed trains on).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dg2pf_core import DG2PFConfig, run_dg2pf
from dg2pf_core import job as product

from .data import DataSettings, loaders, train_subset
from .methods import Budget, Cell, MethodUnavailable, Outcome, register_method

# One-shot pruning + fine-tuning and gradual magnitude pruning as their authors define them: hard
# masks, no teacher, one global ranking with no per-layer cap.
_PLAIN = {"gradual_masks": "hard", "kd_alpha": 0.0, "max_layer_sparsity": 1.0, "layer_density_floor": 0.0}

_DEFAULTS = DG2PFConfig(sparsity=0.9)  # the sparsity is per cell; the rest are the defaults

VARIANTS: dict[str, tuple[dict, str]] = {
    "dg2pf": ({}, f"DG2PFConfig defaults: {_DEFAULTS.schedule} schedule, {_DEFAULTS.gradual_masks} masks, "
                  f"{_DEFAULTS.recovery} recovery, KD, layer cap min({_DEFAULTS.max_layer_sparsity}, "
                  f"1 - {_DEFAULTS.layer_density_floor} x (1 - target)), {_DEFAULTS.finetune} fine-tune"),
    "dg2pf-no-kd": ({"kd_alpha": 0.0}, "dg2pf with kd_alpha=0: cross-entropy only, no teacher"),
    "dg2pf-hard-masks": ({"gradual_masks": "hard"}, "dg2pf with gradual_masks='hard': pruned weights zeroed for good at each step"),
    "dg2pf-feedback": ({"recovery": "feedback"}, "dg2pf with recovery='feedback': masked weights receive the gradient (dense update)"),
    "dg2pf-cubic": ({"schedule": "cubic"}, "dg2pf with the cubic (Zhu & Gupta) sparsity schedule instead of linear"),
    "dg2pf-overparam": ({"finetune": "overparam"}, "dg2pf with finetune='overparam': linear over-parameterization + SP distillation"),
    "dg2pf-no-cap": ({"max_layer_sparsity": 1.0, "layer_density_floor": 0.0}, "dg2pf with no per-layer cap: plain global ranking, as the paper has it"),
    "oneshot-ft": (
        {"pruning_epochs": 1, **_PLAIN},
        "DG2PFConfig(pruning_epochs=1, gradual_masks='hard', kd_alpha=0, max_layer_sparsity=1.0): one global "
        "magnitude cut to the target, then the rest of the budget fine-tuning (AdamW, then SGD)",
    ),
    "gmp-cubic": (
        {"schedule": "cubic", **_PLAIN},
        "DG2PFConfig(schedule='cubic', gradual_masks='hard', kd_alpha=0, max_layer_sparsity=1.0): Zhu & Gupta "
        "gradual magnitude pruning, one step per epoch, then fine-tuning",
    ),
}


# Investigations of the defaults on the hard settings (docs/fidelity.md, "Findings"): not in the default
# grid, run with --methods.
INVESTIGATIONS: dict[str, tuple[dict, str]] = {
    "dg2pf-bn-recal": ({"bn_recalibration_batches": 8}, "dg2pf with BatchNorm statistics re-estimated on 8 batches before each validation"),
    "dg2pf-no-bn-recal": ({"bn_recalibration_batches": 0}, "dg2pf validated with BatchNorm's running averages as training left them (the default before 2026-12-01)"),
    "dg2pf-cap0.99": ({"max_layer_sparsity": 0.99, "layer_density_floor": 0.0}, "dg2pf with max_layer_sparsity=0.99 and no density floor"),
    "dg2pf-cap0.98": ({"max_layer_sparsity": 0.98, "layer_density_floor": 0.0}, "dg2pf with max_layer_sparsity=0.98"),
    "dg2pf-cap0.97": ({"max_layer_sparsity": 0.97, "layer_density_floor": 0.0}, "dg2pf with max_layer_sparsity=0.97"),
    "dg2pf-cap0.96": ({"max_layer_sparsity": 0.96, "layer_density_floor": 0.0}, "dg2pf with max_layer_sparsity=0.96"),
    "dg2pf-floor0.4": ({"max_layer_sparsity": 0.99, "layer_density_floor": 0.4}, "dg2pf with layer_density_floor=0.4 (cap 0.98 at 95%, 0.96 at 90%, 0.88 at 70%)"),
    # Fashion-MNIST component search (docs/fidelity.md, runs 1-3): which part of dg2pf falls short?
    "dg2pf-cubic-no-cap": ({"schedule": "cubic", "max_layer_sparsity": 1.0, "layer_density_floor": 0.0},
                           "dg2pf-cubic without the per-layer cap (plain global ranking)"),
    "dg2pf-cubic-no-kd": ({"schedule": "cubic", "kd_alpha": 0.0}, "dg2pf-cubic with kd_alpha=0: cross-entropy only, no teacher"),
    "dg2pf-p10": ({"pruning_epochs": 10}, "dg2pf with 10 pruning epochs (the linear schedule's last step smaller) in the same epoch budget"),
    "dg2pf-frozen-bn": ({"bn_after_pruning": "frozen"}, "dg2pf with bn_after_pruning='frozen': BatchNorm trains in eval mode (re-estimated statistics) after the last ranking"),
    "dg2pf-t2": ({"kd_temperature": 2.0}, "dg2pf with kd_temperature=2 (sharper soft targets: less weight on the teacher's small logits)"),
    "dg2pf-alpha0.5": ({"kd_alpha": 0.5}, "dg2pf with kd_alpha=0.5 (distillation and cross-entropy weighted equally)"),
}


def config_for(method: str, sparsity: float, seed: int, budget: Budget, overrides: dict) -> DG2PFConfig:
    """``method``'s configuration (its ``overrides`` over the defaults) at a cell's budget and seed."""
    known = {f.name for f in dataclasses.fields(DG2PFConfig)}
    missing = sorted(set(overrides) - known)
    if missing:
        raise MethodUnavailable(
            f"this dg2pf_core's DG2PFConfig has no field(s) {missing}, which method {method!r} needs; "
            "update dg2pf_core and re-run (finished cells are kept)"
        )
    values = {
        "sparsity": sparsity,
        "pruning_epochs": budget.pruning_epochs,
        "max_epochs": budget.epochs,
        "patience": budget.patience,
        "batch_size": budget.batch_size,
        "seed": seed,
        "device": "cpu",
        **overrides,
    }
    return DG2PFConfig(**values)


def make_config(cell: Cell, overrides: dict) -> DG2PFConfig:
    return config_for(cell.method, cell.sparsity, cell.seed, cell.budget, overrides)


def prepare_job(model: str, checkpoint: Path, data: DataSettings, config: DG2PFConfig) -> tuple[product.PruneJob, product.PreparedJob]:
    """A user's job on ``data`` (``PruneJob`` -> ``prepare``), its training split cut to the cell's
    subset (``train_subset`` with the config's seed)."""
    job = product.PruneJob(
        arch=f"torchvision/{model}", num_classes=10, checkpoint=str(checkpoint), dataset=data.spec(),
        config=config, image_size=data.image_size, val_fraction=data.job_val_fraction,
    )
    prepared = product.prepare(job, dry=False)
    prepared.splits.train = train_subset(prepared.splits.train, data.train_subset, config.seed)
    return job, prepared


def _run_job(cell: Cell, config: DG2PFConfig):
    """The product's path: ``PruneJob`` -> ``prepare`` -> ``run`` (see the module docstring)."""
    job, prepared = prepare_job(cell.model, cell.dense.path, cell.data, config)
    return product.run(prepared), {"job": job.to_dict(), "data": prepared.splits.description,
                                   "augment": prepared.splits.augment, "train_images": len(prepared.splits.train)}


def _run(cell: Cell, overrides: dict) -> Outcome:
    config = make_config(cell, overrides)
    if cell.data.job_path:
        result, job_notes = _run_job(cell, config)
    else:
        batches = loaders(cell.split, cell.data, batch_size=config.batch_size, seed=cell.seed)
        result, job_notes = run_dg2pf(cell.dense.build(), batches, config, device=torch.device("cpu")), {}
    notes = {
        **job_notes,
        "config": config.to_dict(),
        "best_epoch": result.best_epoch,
        "history": result.history,
        "extra": {k: v for k, v in result.extra.items() if isinstance(v, (int, float, str, bool, list, dict))},
    }
    return Outcome(epochs=result.epochs, model=result.model, notes=notes)


def _register(name: str, overrides: dict, description: str, in_grid: bool) -> None:
    register_method(name, description, in_grid=in_grid)(lambda cell: _run(cell, overrides))


for _name, (_overrides, _description) in VARIANTS.items():
    _register(_name, _overrides, _description, True)
for _name, (_overrides, _description) in INVESTIGATIONS.items():
    _register(_name, _overrides, _description, False)
