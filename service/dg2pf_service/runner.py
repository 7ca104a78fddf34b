"""The entrypoint of one job on Ray (a Ray Job): ``python -m dg2pf_service.runner JOB_DIR``.

It reads ``JOB_DIR/job.json`` (written by the executor), runs the job with the engine adapters and
leaves everything the service needs in ``JOB_DIR``: ``progress.jsonl`` (a line per epoch, as it
happens), ``output/`` (model.safetensors, metrics.json, history.json, trials.csv for tune jobs) and,
on failure, ``error.json`` ({type, message}). The API process may be down meanwhile; it reads these
files when it comes back.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from dg2pf_core.errors import DG2PFError
from dg2pf_core.job import PruneJob, prune_to_dir
from dg2pf_core.state import EpochRecord, append_record

PROGRESS = "progress.jsonl"
OUTPUT = "output"
ERROR = "error.json"
JOB = "job.json"


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
        metrics = prune_to_dir(job, out, progress=_ProgressFile(progress))
    (out / "history.json").write_text(json.dumps(metrics.get("history", []), indent=1))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job_dir = Path(args[0])
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
