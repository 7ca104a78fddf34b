"""A pruning job end to end: validate every input, run DG2PF, write the artifacts; one module per phase.

``spec`` says what a job is (``PruneJob``, and ``PreparedJob`` once loaded); ``model`` and ``data`` load
its checkpoint(s) and dataset; ``preflight`` (``prepare``) is the one preflight: everything that can
fail because of the user's input or this machine (options, device and AMP mode, output location,
checkpoints, data, a dry forward + backward pass) is checked before any training starts, so a bad job
fails in seconds with a message, never after an hour of work. ``prune`` (``prune_to_dir``) runs it and
keeps the run's state (the last epoch's ``TrainingState`` and the job) in a state directory
(``rundir``) while it trains, so a run interrupted or unable to write its results is continued with
``resume=True`` (``dg2pf prune --resume DIR``), not lost; ``results`` builds its metrics document and
``write`` its artifacts. ``evaluation`` scores a checkpoint on a dataset split (``dg2pf evaluate``);
``example`` trains the example models a demo prunes.

This package re-exports the names the front ends (CLI, Ray adapters, service) import; code inside
dg2pf_core imports from the submodule.
"""

from dg2pf_core.errors import OutputError
from dg2pf_core.job.data import load_data
from dg2pf_core.job.model import checkpoint_num_classes, load_checkpoint_model, load_model
from dg2pf_core.job.preflight import check_static, prepare
from dg2pf_core.job.prune import prune_to_dir, run
from dg2pf_core.job.results import result_metrics
from dg2pf_core.job.rundir import read_state_dir, state_dir_for
from dg2pf_core.job.spec import PreparedJob, PruneJob
from dg2pf_core.job.write import write_results

__all__ = [
    "OutputError",
    "PreparedJob",
    "PruneJob",
    "check_static",
    "checkpoint_num_classes",
    "load_checkpoint_model",
    "load_data",
    "load_model",
    "prepare",
    "prune_to_dir",
    "read_state_dir",
    "result_metrics",
    "run",
    "state_dir_for",
    "write_results",
]
