"""DG2PF — Distilled Gradual Pruning with Pruned Fine-tuning, as a pure PyTorch library.

Entry points: ``run_dg2pf`` (the loop on your own model and loaders), ``PruneJob`` + ``prune_to_dir``
(a whole job from a checkpoint and a dataset spec), ``magnitude_masks`` and ``nm_masks`` (the pruning
rules, unstructured and N:M).
"""

from .config import DG2PFConfig
from .errors import CheckpointError, ConfigError, DatasetError, DG2PFError, ResumeError, UnknownArchitectureError
from .job import PreparedJob, PruneJob, prepare, prune_to_dir
from .loop import DG2PFResult, run_dg2pf
from .masks import Selection, apply_masks_, magnitude_masks, select_prunable
from .nm import nm_masks
from .schedule import sparsity_targets
from .state import EpochRecord, TrainingState

__all__ = [
    "CheckpointError", "ConfigError", "DatasetError", "DG2PFConfig", "DG2PFError", "DG2PFResult",
    "EpochRecord", "PreparedJob", "PruneJob", "ResumeError", "Selection", "TrainingState",
    "UnknownArchitectureError", "apply_masks_", "magnitude_masks", "nm_masks", "prepare", "prune_to_dir",
    "run_dg2pf", "select_prunable", "sparsity_targets",
]
__version__ = "0.1.0"
