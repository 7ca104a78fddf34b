"""Running a job as its own Ray Job (Jobs API): submit, stop, status, and what it left on disk.

A Ray Job is supervised by Ray, not by the API process, so jobs keep running while the API is
stopped or restarted; the job's directory (progress.jsonl, output/, error.json) is the record it
leaves behind for the service to read.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from dg2pf_contract.artifacts import JobDir, write_text_atomic
from dg2pf_contract.job import JobSpec
from dg2pf_contract.results import Metrics
from dg2pf_core.errors import DG2PFError
from dg2pf_ray.execute import Engine

from .cluster import Cluster, auth_headers
from .runner import CLUSTER_ADDRESS_ENV, ERROR, JOB, PROGRESS, JobFile, no_space_in, no_space_message

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def needs_of(doc: dict) -> tuple[float, float]:
    """(CPUs, GPUs) of a stored job document ({"spec": JobSpec dump, "resolved": paths}) while it runs."""
    return Engine.of(JobSpec.model_validate(doc["spec"])).needs()


class SubmissionExists(RuntimeError):
    """Ray already has a job with this submission id (submitted by an API that died before recording it)."""


class NoSpace(DG2PFError):
    """A disk the job writes to is full (``runner.no_space_message`` says which and what to do); its name is
    the job's error type, ``runner.NO_SPACE``."""


class RayJobsExecutor:
    def __init__(self, cluster: Cluster, python: str | None = None) -> None:
        self.cluster = cluster
        self.python = python or sys.executable
        self._client: JobSubmissionClient | None = None
        self._client_url: str | None = None

    @property
    def client(self) -> JobSubmissionClient:
        """A Jobs API client for the cluster's dashboard now (a restarted embedded head has a new one)."""
        url = self.cluster.dashboard_url
        if self._client is None or self._client_url != url:
            self._client, self._client_url = JobSubmissionClient(url, headers=auth_headers()), url
        return self._client

    def submit(self, job_id: str, job_dir: Path, order: JobFile, attempt: int = 0) -> str:
        """Submit the job's runner as a Ray Job; ``attempt`` > 0 for a resubmission after lost work
        (a fresh submission id: Ray keeps the ids of its finished jobs)."""
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            # Whole or not at all: a resubmission on a full disk must not leave an empty job.json behind.
            write_text_atomic(job_dir / JOB, order.model_dump_json(indent=1))
        except OSError as exc:
            full = no_space_in(exc)
            if full is None:
                raise
            raise NoSpace(no_space_message(job_dir, path=getattr(full, "filename", None))) from exc
        submission_id = f"dg2pf-{job_id}" if attempt == 0 else f"dg2pf-{job_id}-r{attempt}"
        try:
            self.client.submit_job(
                entrypoint=f"{shlex.quote(self.python)} -m dg2pf_service.runner {shlex.quote(str(job_dir))}",
                submission_id=submission_id,
                # An in-process job trains in the entrypoint itself; a Ray Train job's workers hold the CPUs.
                entrypoint_num_cpus=1 if order.engine(job_dir).in_process else 0,
                # Ray Train's controller reads its worker start timeout from the driver's environment: a job
                # whose workers cannot be placed (a node was lost) then fails over instead of waiting for ever.
                runtime_env={
                    "env_vars": {
                        "PYTHONUNBUFFERED": "1",
                        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{order.worker_start_timeout_s:g}",
                        **self._cluster_env(),
                    }
                },
                metadata={"dg2pf_job": job_id, "attempt": str(attempt)},
            )
        except RuntimeError as exc:
            if "already exists" in str(exc):
                raise SubmissionExists(submission_id) from exc
            raise
        return submission_id

    def _cluster_env(self) -> dict[str, str]:
        """The service's own cluster, named for the job: the runner connects to it (and Ray Train and Tune
        inside it, through RAY_ADDRESS) and its lifeline watches it, whatever other Ray runs on the host.
        A plain GCS address only (host:port): a Ray Client address (ray://) means nothing inside the cluster."""
        info = self.cluster.info
        address = info.gcs_address if info is not None else ""
        if not address or "://" in address or ":" not in address:
            return {}
        return {CLUSTER_ADDRESS_ENV: address}

    def status(self, submission_id: str) -> str | None:
        """PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED, or None when Ray has no such job."""
        try:
            status = self.client.get_job_status(submission_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return None
            raise
        return status.value if isinstance(status, JobStatus) else str(status)

    def stop(self, submission_id: str) -> None:
        try:
            self.client.stop_job(submission_id)
        except RuntimeError as exc:
            if "does not exist" not in str(exc):
                raise

    def exit_code(self, submission_id: str) -> int | None:
        """The exit status of the job's runner once it has ended (None while it runs or when Ray does not say)."""
        try:
            return self.client.get_job_info(submission_id).driver_exit_code
        except RuntimeError:
            return None

    def logs_tail(self, submission_id: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.client.get_job_logs(submission_id).splitlines()[-lines:])
        except RuntimeError:
            return ""


def read_progress(job_dir: Path) -> list[dict]:
    path = job_dir / PROGRESS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # The last line may be being written right now; one before it was cut short by a full disk
            # (its run failed there): the lines after it are still good.
            continue
    return records


UNREADABLE = "UnreadableError"  # read_error's type when error.json is there but is not a record


def read_error(job_dir: Path) -> dict | None:
    """The runner's ``error.json`` ({type, message, field}), None when there is none. A file that is not
    a record (empty, cut short: written by a runner before writes were atomic, or damaged) gives a
    record of type ``UNREADABLE`` naming the file, never a JSON error."""
    path = job_dir / ERROR
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("type"), str) and isinstance(doc.get("message"), str):
            return doc
        what = "not an error record"
    except ValueError:
        what = "empty" if not text.strip() else f"not valid JSON ({len(text):,} bytes, cut short?)"
    return {"type": UNREADABLE, "message": f"the job failed, and its error record {path} is {what}", "field": None}


def read_metrics(job_dir: Path) -> Metrics | None:
    """The job's ``metrics.json`` (renamed into place whole), None when the run has not finished.
    Raises ``MetricsError`` (a ``ValueError`` naming the file) when it is not a run's metrics."""
    path = JobDir(job_dir).output.metrics
    if not path.exists():
        return None
    return Metrics.read(path)


def output_dir(job_dir: Path) -> Path:
    return JobDir(job_dir).output.root
