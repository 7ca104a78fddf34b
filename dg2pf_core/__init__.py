"""DG2PF — Distilled Gradual Pruning with Pruned Fine-tuning, as a pure PyTorch library.

Entry points: ``run_dg2pf`` (the loop on your own model and loaders), ``PruneJob`` + ``prune_to_dir``
(a whole job from a checkpoint and a dataset spec), ``magnitude_masks`` and ``nm_masks`` (the pruning
rules, unstructured and N:M).

The code is grouped by concept: ``algorithm`` (the method: masks, schedule, the loop), ``io`` (files in
and out: checkpoints, the compact format, ONNX, plots, latency, metrics), ``job`` (a pruning job end
to end, phase by phase), ``data`` and ``models`` (the registries of datasets and architectures).
"""

from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.algorithm.loop import DG2PFResult, run_dg2pf
from dg2pf_core.algorithm.masks import Selection, apply_masks_, magnitude_masks, select_prunable
from dg2pf_core.algorithm.nm import nm_masks
from dg2pf_core.algorithm.schedule import sparsity_targets
from dg2pf_core.algorithm.state import EpochRecord, TrainingState
from dg2pf_core.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    DG2PFError,
    ResumeError,
    UnknownArchitectureError,
)
from dg2pf_core.job.preflight import prepare
from dg2pf_core.job.prune import prune_to_dir
from dg2pf_core.job.spec import PreparedJob, PruneJob

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DG2PFConfig",
    "DG2PFError",
    "DG2PFResult",
    "EpochRecord",
    "PreparedJob",
    "PruneJob",
    "ResumeError",
    "Selection",
    "TrainingState",
    "UnknownArchitectureError",
    "apply_masks_",
    "magnitude_masks",
    "nm_masks",
    "prepare",
    "prune_to_dir",
    "run_dg2pf",
    "select_prunable",
    "sparsity_targets",
]
__version__ = "0.1.0"
