"""The entrypoint of one job on Ray (a Ray Job): ``python -m dg2pf_service.runner JOB_DIR``.

It reads ``JOB_DIR/job.json`` (written by the executor), runs the job with the engine adapters and
leaves everything the service needs in ``JOB_DIR``: ``progress.jsonl`` (a line per epoch, as it
happens), ``output/`` (model.safetensors, model.onnx, metrics.json, history.json, training.png, layers.png,
trials.csv for tune jobs) and, on failure, ``error.json`` ({type, message}). The API process may be down
meanwhile; it reads these
files when it comes back.

Every file the service reads is replaced whole (``write_text_atomic``, or staged and renamed), so a
full disk or a kill mid-write leaves the previous version or none, never half of one. A run that
fails for lack of disk space says so: ``error.json`` has type ``NoSpace`` and a message naming the
file, the setting whose disk is full (``DG2PF_DATA_DIR``) and what was kept; when even ``error.json``
cannot be written, the runner exits with status ``NO_SPACE_EXIT`` and the scheduler says it from that.

A job may be run again after its Ray work was lost (a head restart, a lost node, a killed runner):
the new run resumes instead of starting over. A single-process job saves its full training state
after every epoch in ``JOB_DIR/state/`` and continues from it; a Ray Train job resumes from its last
Ray Train checkpoint (same run name and storage); a run whose output is already complete ends at
once. The runner's lifeline (``lifeline``) stops it when its Ray supervisor or cluster is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

from pydantic import BaseModel

from dg2pf_contract.artifacts import Artifacts, JobDir, write_json, write_text_atomic
from dg2pf_contract.job import JobSpec
from dg2pf_contract.results import Metrics
from dg2pf_core.algorithm.state import EpochRecord, append_record
from dg2pf_core.errors import DG2PFError
from dg2pf_core.job import PruneJob
from dg2pf_ray.execute import Engine, execute

from .lifeline import start_lifeline

# The job directory's files (dg2pf_contract.artifacts.JobDir); STATE: the last epoch's TrainingState of a
# single-process job
PROGRESS, OUTPUT, ERROR, JOB, STATE = JobDir.PROGRESS, JobDir.OUTPUT, JobDir.ERROR, JobDir.ORDER, JobDir.STATE
# The job's own cluster, set by the service (``RayJobsExecutor._cluster_env``). Ray's job supervisor sets
# RAY_ADDRESS itself, by "auto" discovery: on a host with several Ray clusters that can be another one.
CLUSTER_ADDRESS_ENV = "DG2PF_RAY_ADDRESS"

NO_SPACE = "NoSpace"  # error.json's type when the run failed because a disk was full
# The runner's exit status when it failed for lack of disk space: what the scheduler goes by when
# the disk was too full for error.json as well (ENOSPC's number, so it reads as what it is).
NO_SPACE_EXIT = errno.ENOSPC
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Ray Train and Tune hand a worker's failure to the driver as text (the worker's traceback).
_NO_SPACE_TEXTS = tuple(os.strerror(e) for e in _NO_SPACE_ERRNOS)
# Below this much space left, a disk counts as full: torch.save to a path reports a full disk as
# "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", with no errno to go by.
FULL_BELOW_BYTES = 1 << 20


class _ProgressFile:
    """The loop's Progress protocol, writing one JSON line per finished epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start_epoch(self, phase: str, epoch: int, sparsity: float, batches: int) -> None:
        pass

    def batch(self, loss: float) -> None:
        pass

    def end_epoch(self, record: EpochRecord) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            append_record(self.path, {**record.to_dict(), "world_size": 1})
        except OSError:
            # Half a line (a full disk) would glue itself to the next run's first line: cut it off
            # (truncating needs no space), so the lines before stay readable.
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise


def no_space_in(exc: BaseException | None) -> BaseException | None:
    """The error in ``exc``'s chain (causes, contexts) saying that a disk is full, or None: the
    ``OSError`` itself (it names the file) when there is one, else the first error whose text says it."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for err in chain:
        if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
            return err
    return next((err for err in chain if any(text in str(err) for text in _NO_SPACE_TEXTS)), None)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _free(path: str | Path | None) -> int | None:
    try:
        return shutil.disk_usage(path).free if path else None
    except (OSError, TypeError):
        return None


def full_disk(job_dir: Path, storage_path: str | None = None) -> str | None:
    """The directory, of the job's and Ray Train's storage, whose disk has (almost) no space left, or None."""
    for where in (str(job_dir), storage_path):
        free = _free(where)
        if free is not None and free < FULL_BELOW_BYTES:
            return where
    return None


def no_space_message(job_dir: Path, *, path: str | None = None, storage_path: str | None = None) -> str:
    """What a job that ran out of disk space tells its user: the file it was writing (or a directory on
    the full disk), the setting whose disk is full, the space free now, what was kept, and what to do."""
    in_storage = bool(path and storage_path and str(path).startswith(str(storage_path)))
    setting, disk, what = (
        ("DG2PF_STORAGE_URI", storage_path, "Ray Train's checkpoints")
        if in_storage
        else ("DG2PF_DATA_DIR", str(job_dir), "this job's files")
    )
    free = _free(disk)
    free = f", {_size(free)} free now" if free is not None else ""
    state = JobDir(job_dir).state.training_state
    kept = f"; the training state of the last epoch saved is intact in {state}" if state.is_file() else ""
    where = f" writing {path}" if path and path != disk else ""
    return (
        f"no space left on device{where}: the disk of {setting} is full ({what}: {disk}{free}){kept}. "
        "Free space there, then submit the job again"
    )


def failure_record(job_dir: Path, exc: BaseException, storage_path: str | None = None) -> dict:
    """``error.json``'s document for a run that raised ``exc``: {type, message, field}."""
    full = no_space_in(exc)
    # An error that does not say why it happened, on a full disk; a DG2PFError says why (a refused input).
    disk = full_disk(job_dir, storage_path) if full is None and not isinstance(exc, DG2PFError) else None
    if full is not None or disk is not None:
        path = getattr(full, "filename", None) if full is not None else disk
        message = no_space_message(job_dir, path=path, storage_path=storage_path)
        if isinstance(exc, DG2PFError):
            message += f" ({exc.message})"
        elif full is None:  # the error itself does not say why: show it
            message += f" ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        return {"type": NO_SPACE, "message": message, "field": None}
    if isinstance(exc, DG2PFError):
        return {"type": type(exc).__name__, "message": exc.message, "field": exc.field}
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "field": None}


def record_failure(job_dir: Path, exc: BaseException) -> int:
    """Write ``error.json`` for a run that raised ``exc`` (whole, or not at all) and say it on stderr;
    returns the runner's exit status: ``NO_SPACE_EXIT`` when a disk is full, else 1."""
    doc = failure_record(job_dir, exc, _storage_path(job_dir))
    no_space = doc["type"] == NO_SPACE
    if no_space:
        # What a failed write left behind holds the space error.json needs (the state's temp file;
        # the output's staging directory is removed by OutputDir).
        for partial in (job_dir / STATE).glob("*.tmp"):
            partial.unlink(missing_ok=True)
    if no_space or isinstance(exc, DG2PFError):
        print(f"dg2pf job failed: {doc['message']}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(exc)
    try:
        write_text_atomic(job_dir / ERROR, json.dumps(doc))
    except OSError as write_error:
        no_space = no_space or no_space_in(write_error) is not None
        print(
            f"dg2pf runner: {job_dir / ERROR} could not be written ({write_error.strerror or write_error}); "
            f"exiting with status {NO_SPACE_EXIT if no_space else 1}",
            file=sys.stderr,
            flush=True,
        )
    return NO_SPACE_EXIT if no_space else 1


def _storage_path(job_dir: Path) -> str | None:
    try:
        return json.loads((job_dir / JOB).read_text()).get("storage_path")
    except (OSError, ValueError, AttributeError):
        return None


class JobFile(BaseModel):
    """``job.json``: the job as submitted (its JobSpec) and what the service resolved for it."""

    spec: JobSpec
    checkpoint: str  # the pinned checkpoint file (the spec's id or path, resolved)
    teacher: str | None = None
    data_roots: list[str] = []  # the folders the job's data must stay inside (DG2PF_DATA_ROOTS)
    storage_path: str  # Ray Train and Tune storage (DG2PF_STORAGE_URI)
    cluster_may_grow: bool = False  # an autoscaling cluster: wait for nodes instead of refusing the run
    worker_start_timeout_s: float = 60.0

    def prune_job(self) -> PruneJob:
        return PruneJob.from_spec(self.spec, self.checkpoint, self.teacher, self.data_roots)

    def engine(self, job_dir: Path) -> Engine:
        # The run name and storage stay the same across resubmissions: a Ray Train run resumes from its checkpoints.
        return Engine.of(
            self.spec,
            storage_path=self.storage_path,
            run_name=f"job-{job_dir.name}",
            cluster_may_grow=self.cluster_may_grow,
            progress_path=str(job_dir / PROGRESS),
        )


def run(job_dir: Path) -> None:
    order = JobFile.model_validate_json((job_dir / JOB).read_text())
    job, engine = order.prune_job(), order.engine(job_dir)
    out = job_dir / OUTPUT
    progress = job_dir / PROGRESS
    if Artifacts(out).metrics.is_file():
        # A previous run wrote the output (renamed into place whole) and was lost before it ended.
        _write_history(out, Metrics.read(Artifacts(out).metrics))
        return
    (job_dir / ERROR).unlink(missing_ok=True)  # from an earlier run of this job
    for partial in job_dir.glob(f".{OUTPUT}.partial-*"):  # staging left by a run killed while writing
        shutil.rmtree(partial, ignore_errors=True)
    if engine.in_process:
        import torch

        # The job holds one CPU (entrypoint_num_cpus=1): one thread, not one per core of the node,
        # so jobs side by side do not make OpenMP spin.
        torch.set_num_threads(1)
    # In this process, the state directory outlives a lost run (resubmitted, it resumes) and goes once the
    # output is written.
    metrics = execute(job, out, engine, progress=_ProgressFile(progress), state_dir=job_dir / STATE, resume=True)
    _write_history(out, metrics)


def _write_history(out: Path, metrics: Metrics) -> None:
    """``history.json`` beside the complete output: a copy of metrics.json's history, so a disk too full
    for it does not fail a job whose model and metrics are written."""
    files = Artifacts(out)
    try:
        write_json(files.history, [record.to_dict() for record in metrics.history], indent=1)
    except OSError as exc:
        print(
            f"dg2pf runner: {files.history} not written ({exc.strerror or exc}); {files.METRICS} holds the "
            "same history",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job_dir = Path(args[0])
    own = os.environ.get(CLUSTER_ADDRESS_ENV)
    if own:  # the service's cluster, not the one Ray's supervisor discovered: for ray.init, Train, Tune, the lifeline
        if os.environ.get("RAY_ADDRESS") not in (None, own):
            print(
                f"dg2pf runner: Ray handed this job RAY_ADDRESS={os.environ['RAY_ADDRESS']}; using the service's "
                f"cluster at {own}",
                file=sys.stderr,
                flush=True,
            )
        os.environ["RAY_ADDRESS"] = own
    start_lifeline()
    try:
        run(job_dir)
    except Exception as exc:  # noqa: BLE001 - recorded for the user; the exit status says it failed
        return record_failure(job_dir, exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
