"""The entrypoint of one job on Ray (a Ray Job): ``python -m dg2pf_service.runner JOB_DIR``.

It reads ``JOB_DIR/job.json`` (written by the executor), runs the job with the engine adapters and
leaves everything the service needs in ``JOB_DIR``: ``progress.jsonl`` (a line per epoch, as it
happens), ``output/`` (model.safetensors, model.onnx, metrics.json, history.json, training.png, layers.png,
trials.csv for tune jobs) and, on failure, ``error.json`` ({type, message}). The API process may be down meanwhile; it reads these
files when it comes back.

A job may be run again after its Ray work was lost (a head restart, a lost node, a killed runner):
the new run resumes instead of starting over. A single-process job saves its full training state
after every epoch in ``JOB_DIR/state/`` and continues from it; a Ray Train job resumes from its last
Ray Train checkpoint (same run name and storage); a run whose output is already complete ends at
once. The runner's lifeline (``lifeline``) stops it when its Ray supervisor or cluster is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

from dg2pf_core.errors import DG2PFError
from dg2pf_core.job import PruneJob, prune_to_dir
from dg2pf_core.state import EpochRecord, append_record

from .lifeline import start_lifeline

PROGRESS = "progress.jsonl"
OUTPUT = "output"
ERROR = "error.json"
JOB = "job.json"
STATE = "state"  # the last epoch's TrainingState of a single-process job
# The job's own cluster, set by the service (``RayJobsExecutor._cluster_env``). Ray's job supervisor sets
# RAY_ADDRESS itself, by "auto" discovery: on a host with several Ray clusters that can be another one.
CLUSTER_ADDRESS_ENV = "DG2PF_RAY_ADDRESS"


class _ProgressFile:
    """The loop's Progress protocol, writing one JSON line per finished epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start_epoch(self, phase: str, epoch: int, sparsity: float, batches: int) -> None:
        pass

    def batch(self, loss: float) -> None:
        pass

    def end_epoch(self, record: EpochRecord) -> None:
        append_record(self.path, {**record.to_dict(), "world_size": 1})


def run(job_dir: Path) -> None:
    order = json.loads((job_dir / JOB).read_text())
    job = PruneJob.from_dict(order["prune_job"])
    out = job_dir / OUTPUT
    progress = job_dir / PROGRESS
    if (out / "metrics.json").is_file():
        # A previous run wrote the output (renamed into place whole) and was lost before it ended.
        metrics = json.loads((out / "metrics.json").read_text())
        (out / "history.json").write_text(json.dumps(metrics.get("history", []), indent=1))
        return
    (job_dir / ERROR).unlink(missing_ok=True)  # from an earlier run of this job
    for partial in job_dir.glob(f".{OUTPUT}.partial-*"):  # staging left by a run killed while writing
        shutil.rmtree(partial, ignore_errors=True)
    # Absent from job.json files written before these options existed (jobs running across an upgrade).
    placement = {"placement": order.get("placement", "pack"), "cluster_may_grow": order.get("cluster_may_grow", False)}
    if order.get("tune"):
        from dg2pf_ray.tune import TuneOptions, tune_job

        tune = order["tune"]
        space_file = None
        if tune.get("search_space"):
            space_file = job_dir / "search_space.json"
            space_file.write_text(json.dumps(tune["search_space"]))
        metrics = tune_job(job, out, TuneOptions(samples=tune["samples"], search_space=str(space_file) if space_file else None,
                                                 workers_per_trial=order["workers"], use_gpu=order["use_gpu"], **placement,
                                                 storage_path=order["storage_path"], run_name=f"job-{job_dir.name}"))
    elif order["workers"] > 1 or order["use_gpu"]:
        from dg2pf_ray.train import RayOptions, prune_on_ray

        metrics = prune_on_ray(job, out, RayOptions(workers=order["workers"], use_gpu=order["use_gpu"], **placement,
                                                    storage_path=order["storage_path"], run_name=f"job-{job_dir.name}",
                                                    progress_path=str(progress), verbose=False))
    else:
        import torch

        # The job holds one CPU (entrypoint_num_cpus=1): one thread, not one per core of the node,
        # so jobs side by side do not make OpenMP spin.
        torch.set_num_threads(1)
        # The state directory outlives a lost run (resubmitted, it resumes) and goes once the output is written.
        metrics = prune_to_dir(job, out, progress=_ProgressFile(progress), state_dir=job_dir / STATE, resume=True)
    (out / "history.json").write_text(json.dumps(metrics.get("history", []), indent=1))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job_dir = Path(args[0])
    own = os.environ.get(CLUSTER_ADDRESS_ENV)
    if own:  # the service's cluster, not the one Ray's supervisor discovered: for ray.init, Train, Tune, the lifeline
        if os.environ.get("RAY_ADDRESS") not in (None, own):
            print(f"dg2pf runner: Ray handed this job RAY_ADDRESS={os.environ['RAY_ADDRESS']}; using the service's "
                  f"cluster at {own}", file=sys.stderr, flush=True)
        os.environ["RAY_ADDRESS"] = own
    start_lifeline()
    try:
        run(job_dir)
    except DG2PFError as exc:
        (job_dir / ERROR).write_text(json.dumps({"type": type(exc).__name__, "message": exc.message, "field": exc.field}))
        print(f"dg2pf job failed: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - recorded for the user, then re-raised as a failure
        (job_dir / ERROR).write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)[:2000]}))
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
