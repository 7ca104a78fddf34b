"""Reconciling the job store with Ray, and dispatching queued jobs first in, first out.

One ``tick`` does it all. It runs in a background thread of the API process every ``poll_seconds``
and once at start-up, which is how a restarted API re-attaches to jobs that kept running on Ray.

- The cluster first: an embedded head that is gone is started again (``Cluster.ensure``); while an
  external cluster does not answer nothing is decided, and after ``cluster_lost_timeout_s`` its
  running jobs fail (a job never stays "running" for ever).
- A running job whose Ray work is gone (the Ray job no longer exists, or its runner ended without a
  result: killed, or its node lost) is resubmitted and resumes from its last epoch, up to
  ``max_restarts`` times; then it fails with what happened each time.
- A queued job whose order cannot be built or submitted fails with the reason; the queue moves on.
- No process of a job outlives it: runners of jobs that ended are killed (``processes``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from dg2pf_contract.results import Metrics
from dg2pf_core.errors import DG2PFError

from .cluster import Cluster
from .conditions import Conditions, reason_of
from .executor import UNREADABLE, RayJobsExecutor, SubmissionExists, needs_of, read_error, read_metrics, read_progress
from .processes import RUNNER, kill_job_processes, process_table
from .runner import ERROR, NO_SPACE, NO_SPACE_EXIT, JobFile, no_space_message
from .store.models import TERMINAL_STATES
from .store.repo import JobStore

log = logging.getLogger("dg2pf.scheduler")


def _now() -> datetime:
    return datetime.now(UTC)


def progress_fields(records: list[dict], target: float, pruning_epochs: int) -> dict:
    """Job status fields from the epoch records the run has written so far."""
    if not records:
        return {"phase": "baseline"}
    last = records[-1]
    # A restarted run (lost worker or node) repeats the epochs after its last checkpoint: the latest
    # attempt at each epoch is the one that counts.
    records = sorted({r["epoch"]: r for r in records}.values(), key=lambda r: r["epoch"])
    best = [r for r in records if r.get("is_best")]
    fields = {
        "phase": last["phase"] if last["phase"] != "baseline" else "gradual_pruning",
        "epoch": int(last["epoch"]),
        "current_sparsity": float(last["sparsity"]),
        "latest_metrics": last,
        "best_metrics": best[-1] if best else None,
        "history": records,
        "eta_seconds": None,
    }
    trained = [r for r in records if r["epoch"] > 0]
    if fields["phase"] == "gradual_pruning" and trained:
        # Known only while pruning: the remaining pruning epochs; later phases end on early stopping.
        mean = sum(r["seconds"] for r in trained) / len(trained)
        fields["eta_seconds"] = max(0, pruning_epochs - int(last["epoch"])) * mean
    return fields


# A running job whose state the service cannot read this many ticks in a row fails (never "running" for ever).
MAX_RECONCILE_ERRORS = 30
SWEEP_EVERY_S = 5.0


class Scheduler:
    def __init__(
        self,
        store: JobStore,
        executor: RayJobsExecutor,
        cluster: Cluster,
        capacity: Callable[[], tuple[float, float]],
        make_order: Callable[[dict], JobFile],
        *,
        jobs_dir: Path,
        on_succeeded: Callable[[object], None] | None = None,
        max_restarts: int = 2,
        cluster_lost_timeout_s: float = 600.0,
    ) -> None:
        self.store, self.executor, self.cluster, self.capacity, self.make_order = (
            store,
            executor,
            cluster,
            capacity,
            make_order,
        )
        self.jobs_dir, self.on_succeeded = Path(jobs_dir), on_succeeded
        self.max_restarts, self.cluster_lost_timeout_s = max_restarts, cluster_lost_timeout_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: dict[str, int] = {}
        self._conditions = Conditions(log)
        self._unreachable_since: float | None = None
        self._last_sweep = 0.0
        self._pending_stops: set[str] = set()

    # --- one pass ---
    def tick(self) -> None:
        with self._lock:
            if self._cluster_answers():
                self._retry_stops()
                for row in self.store.active_jobs():
                    try:
                        self._reconcile(row)
                        self._errors.pop(row.id, None)
                        self._conditions.ok(f"job {row.id}", f"reconciling job {row.id}")
                    except Exception as exc:  # noqa: BLE001 - one bad job must not stop the others
                        self._conditions.failed(f"job {row.id}", f"reconciling job {row.id} failed", exc)
                        self._reconcile_failed(row, exc)
                self._dispatch()
            if time.monotonic() - self._last_sweep >= SWEEP_EVERY_S:
                self._last_sweep = time.monotonic()
                try:
                    self.sweep()
                    self._conditions.ok("sweep", "sweeping the processes of ended jobs")
                except Exception as exc:  # noqa: BLE001 - the next sweep may succeed
                    self._conditions.failed("sweep", "sweeping the processes of ended jobs failed", exc)

    def stop_ray_job(self, submission_id: str | None) -> None:
        """Stop a cancelled job's Ray job now if Ray answers, else on a later tick (its processes on
        this machine are stopped by the sweep meanwhile)."""
        if not submission_id:
            return
        try:
            self.executor.stop(submission_id)
        except Exception as exc:  # noqa: BLE001 - Ray unreachable (a head being restarted): retried
            log.warning("could not stop Ray job %s now (%s); retrying on the next ticks", submission_id, reason_of(exc))
            self._pending_stops.add(submission_id)

    def _retry_stops(self) -> None:
        for submission_id in list(self._pending_stops):
            try:
                self.executor.stop(submission_id)
                self._pending_stops.discard(submission_id)
            except Exception:  # noqa: BLE001 - still unreachable: next tick
                return

    def _cluster_answers(self) -> bool:
        before = self.cluster.restarts
        try:
            up = self.cluster.ensure()
            self._conditions.ok("cluster", "the Ray cluster")
        except Exception as exc:  # noqa: BLE001 - a head that cannot start now may start on the next tick
            self._conditions.failed("cluster", "the Ray cluster does not answer and could not be started", exc)
            up = False
        if self.cluster.restarts != before:
            log.warning(
                "the embedded Ray head was gone: started a new one (dashboard %s); its jobs are resubmitted",
                self.cluster.dashboard_url,
            )
        if up:
            self._unreachable_since = None
            return True
        now = time.monotonic()
        self._unreachable_since = self._unreachable_since or now
        if now - self._unreachable_since >= self.cluster_lost_timeout_s:
            message = (
                f"the Ray cluster at {self.cluster.dashboard_url} "
                f"has not answered for {self.cluster_lost_timeout_s:g} s "
                "(DG2PF_CLUSTER_LOST_TIMEOUT_S); the job's work is lost: resubmit it once the cluster is back"
            )
            for row in self.store.active_jobs():
                self._fail(row, "LostJob", message)
        return False

    def _reconcile(self, row) -> None:
        job_dir = Path(row.artifacts_dir)
        schedule = row.spec["spec"].get("schedule") or {}
        records = read_progress(job_dir)
        fields = progress_fields(records, row.target_sparsity, int(schedule.get("pruning_epochs", 10)))
        status = self.executor.status(row.ray_submission_id) if row.ray_submission_id else None
        if status is None:
            what = f"the Ray job {row.ray_submission_id}" if row.ray_submission_id else "its Ray job"
            self._lost(row, fields, f"{what} no longer exists (the Ray head was restarted or lost)")
        elif status == "SUCCEEDED":
            self._succeed(row, fields)
        elif status == "FAILED":
            self._failed(row, fields)
        elif status == "STOPPED":
            self.store.transition(row.id, {"running"}, "cancelled", finished_at=_now(), **fields)
            kill_job_processes(job_dir)
        else:
            self.store.update_job(row.id, **fields)

    def _failed(self, row, fields: dict) -> None:
        """The runner ended with an error: fail the job with the runner's error.json, or, without a
        readable one, with what its exit status says; a runner that did not end by itself was lost."""
        job_dir = Path(row.artifacts_dir)
        err = read_error(job_dir)
        if err is not None and err["type"] != UNREADABLE:
            self._fail(row, err["type"], err["message"], **fields)
            return
        code = self.executor.exit_code(row.ray_submission_id)
        if code == NO_SPACE_EXIT:  # the disk was too full for error.json as well
            unrecorded = (
                err["message"] if err is not None else f"its error record {job_dir / ERROR} could not be written"
            )
            self._fail(row, NO_SPACE, f"{no_space_message(job_dir)} ({unrecorded})", **fields)
            return
        tail = self.executor.logs_tail(row.ray_submission_id, lines=3).strip().replace("\n", " | ")
        tail = f"; last log lines: {tail[-300:]}" if tail else ""
        if err is not None:
            status = f" (runner exit status {code})" if code is not None else ""
            self._fail(row, err["type"], f"{err['message']}{status}{tail}", **fields)
            return
        # No error.json: the runner did not end by itself (killed, out of memory, its node lost).
        self._lost(
            row, fields, f"its runner ended without a result (killed, out of memory, or its node was lost){tail}"
        )

    def _succeed(self, row, fields: dict) -> None:
        metrics = read_metrics(Path(row.artifacts_dir))
        fields.update(
            phase="done",
            eta_seconds=0.0,
            best_metrics=_summary(metrics) if metrics is not None else fields.get("best_metrics"),
        )
        if metrics is not None and metrics.history:
            fields["history"] = [record.to_dict() for record in metrics.history]
        done = self.store.transition(row.id, {"running"}, "succeeded", finished_at=_now(), **fields)
        if done is not None and self.on_succeeded is not None:
            self.on_succeeded(done)

    def _lost(self, row, fields: dict, reason: str) -> None:
        """The job's Ray work is gone: resubmit it (it resumes from its last epoch), or fail it once
        it has been restarted ``max_restarts`` times. A job whose output is complete succeeded."""
        job_dir = Path(row.artifacts_dir)
        # The old runner, if it still runs here, must not write beside the new one.
        kill_job_processes(job_dir, grace_seconds=1.0)
        if read_metrics(job_dir) is not None:  # renamed into place whole: the run had finished
            self._succeed(row, fields)
            return
        log_ = [
            *(row.restart_log or []),
            {"at": _now().isoformat(), "epoch": int(fields.get("epoch") or 0), "reason": reason},
        ]
        if row.restarts >= self.max_restarts:
            steps = "; ".join(f"({i}) at epoch {e['epoch']}: {e['reason']}" for i, e in enumerate(log_, 1))
            self._fail(
                row,
                "LostJob",
                f"the job's Ray work was lost {len(log_)} times, and DG2PF_JOB_MAX_RESTARTS={self.max_restarts} "
                f"allows {self.max_restarts} restart(s): {steps}",
                restart_log=log_,
                **fields,
            )
            return
        attempt = row.restarts + 1
        # Claim the restart first (compare-and-set on the lost submission): should two schedulers see
        # the same loss, only one resubmits.
        claimed = self.store.transition(
            row.id,
            {"running"},
            "running",
            expect_submission=row.ray_submission_id,
            ray_submission_id=f"dg2pf-{row.id}-r{attempt}",
            restarts=attempt,
            restart_log=log_,
            **fields,
        )
        if claimed is None:
            return  # cancelled meanwhile, or another scheduler took it
        log.warning("job %s: %s; resubmitting it (restart %d of %d)", row.id, reason, attempt, self.max_restarts)
        try:
            submission = self._submit(row, attempt)
        except _JobRefused as exc:
            self._fail(row, exc.type, f"{reason}; resubmitting it failed: {exc.message}", restart_log=log_, **fields)
            return
        if self.store.get_job(row.id).state != "running":
            self.stop_ray_job(submission)  # cancelled while we were submitting

    def _submit(self, row, attempt: int = 0) -> str:
        """Build the job's order and submit it; ``_JobRefused`` when the job itself is the problem."""
        try:
            order = self.make_order(row.spec)
        except Exception as exc:  # noqa: BLE001 - whatever the spec does wrong, this job fails, not the queue
            raise _JobRefused(type(exc).__name__, reason_of(exc)) from exc
        try:
            return self.executor.submit(row.id, Path(row.artifacts_dir), order, attempt=attempt)
        except SubmissionExists as exc:
            return exc.args[0]  # an earlier API process submitted it and died before recording it
        except DG2PFError as exc:
            raise _JobRefused(type(exc).__name__, exc.message) from exc
        except Exception as exc:
            if self.cluster.answers():  # the cluster is fine: Ray refused this job
                raise _JobRefused(type(exc).__name__, f"Ray refused the job: {reason_of(exc)}") from exc
            raise  # the cluster went away: try again on a later tick

    def _fail(self, row, error_type: str, message: str, **fields) -> None:
        failed = self.store.transition(
            row.id,
            {"running", "queued"},
            "failed",
            finished_at=_now(),
            error_type=error_type,
            error_message=message,
            **fields,
        )
        if failed is not None and error_type == NO_SPACE:  # the operator's problem, not the job's: once per job
            log.error("job %s failed: %s", row.id, message)
        kill_job_processes(Path(row.artifacts_dir), grace_seconds=1.0)

    def _reconcile_failed(self, row, exc: Exception) -> None:
        self._errors[row.id] = self._errors.get(row.id, 0) + 1
        if self._errors[row.id] >= MAX_RECONCILE_ERRORS:
            self._errors.pop(row.id, None)
            self._fail(
                row,
                "ServiceError",
                f"the service could not follow this job {MAX_RECONCILE_ERRORS} times in a row: {reason_of(exc)}",
            )

    def _dispatch(self) -> None:
        try:
            total_cpu, total_gpu = self.capacity()
            self._conditions.ok("capacity", "reading the cluster's resources")
        except Exception as exc:  # noqa: BLE001 - the cluster went away between ticks
            self._conditions.failed("capacity", "cannot read the cluster's resources; dispatching on a later tick", exc)
            return
        used_cpu = used_gpu = 0.0
        for row in self.store.active_jobs():
            try:
                c, g = needs_of(row.spec)
            except Exception:  # noqa: BLE001 - a spec stored by an older version: count what it can hold at least
                c, g = 1.0, 0.0
            used_cpu, used_gpu = used_cpu + c, used_gpu + g
        for row in self.store.queued_in_order():
            try:
                c, g = needs_of(row.spec)
            except Exception as exc:  # noqa: BLE001 - a malformed stored spec
                self._fail(row, type(exc).__name__, f"the stored job spec is unusable: {reason_of(exc)}")
                continue
            if used_cpu + c > total_cpu or used_gpu + g > total_gpu:
                break  # first in, first out: nobody overtakes the head of the queue
            try:
                submission = self._submit(row)
            except _JobRefused as exc:
                self._fail(row, exc.type, exc.message)
                continue
            except Exception as exc:  # noqa: BLE001 - the cluster is gone: the job stays queued
                self._conditions.failed("dispatch", f"submitting job {row.id} failed; it stays queued", exc)
                return
            self._conditions.ok("dispatch", "submitting queued jobs")
            if (
                self.store.transition(
                    row.id, {"queued"}, "running", started_at=_now(), ray_submission_id=submission, phase="baseline"
                )
                is None
            ):
                self.stop_ray_job(submission)  # cancelled while we were submitting
                continue
            used_cpu, used_gpu = used_cpu + c, used_gpu + g

    def sweep(self) -> list[str]:
        """Kill this machine's runner processes of jobs that have ended (or are unknown); returns their ids."""
        root = str(self.jobs_dir.resolve())
        found: set[str] = set()
        for _, cmd in process_table().values():
            if RUNNER not in cmd or root not in cmd:
                continue
            rest = cmd.split(root, 1)[1].lstrip("/")
            job_id = rest.split("/", 1)[0].split(" ", 1)[0].strip("'\"")
            if job_id:
                found.add(job_id)
        ended = []
        for job_id in found:
            row = self.store.get_job(job_id)
            if row is None or row.state in TERMINAL_STATES:
                kill_job_processes(self.jobs_dir / job_id)
                ended.append(job_id)
        return ended

    # --- background loop ---
    def start(self, poll_seconds: float) -> None:
        def loop() -> None:
            while not self._stop.wait(poll_seconds):
                try:
                    self.tick()
                    self._conditions.ok("tick", "scheduler tick")
                except Exception as exc:  # noqa: BLE001 - keep polling; the next tick may succeed
                    self._conditions.failed("tick", "scheduler tick failed", exc)

        self._thread = threading.Thread(target=loop, name="dg2pf-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


class _JobRefused(Exception):
    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type, self.message = type_, message


def _summary(m: Metrics) -> dict:
    """A finished job's ``best_metrics``: the headline figures of its metrics.json, under their names there
    (MACs under their former flops_* names too, for one release, as metrics.json has them)."""
    return {
        "val_top1": m.val_top1,
        "test_top1": m.test_top1,
        "test_top5": m.test_top5,
        "baseline_test_top1": m.baseline_test_top1,
        "sparsity_prunable": m.sparsity_prunable,
        "sparsity_total": m.sparsity_total,
        "params_total": m.params_total,
        "params_nonzero": m.params_nonzero,
        "macs_dense": m.macs_dense,
        "macs_sparse": m.macs_sparse,
        "flops_dense": m.macs_dense,
        "flops_sparse": m.macs_sparse,
        "best_epoch": m.best_epoch,
        "epochs": m.epochs,
        "world_size": m.world_size,
        "max_layer_sparsity": m.max_layer_sparsity,
        "layer_cap": m.layer_cap,
        "layer_sparsity": m.layer_sparsity,
        "preset": m.preset,
        "preset_departures": m.preset_departures,
        "crop_pct": m.crop_pct,
        "warnings": m.warnings,
        # Measured speed beside the MACs ratio (the figures per batch size are in metrics.json).
        "latency": m.latency.speedups() if m.latency is not None else None,
        # latency_budget_ms / max_top1_drop jobs: the budget, the prediction, the measurement; the choice and why
        "latency_objective": (
            m.latency_objective.model_dump(include={"budget_ms", "predicted_ms", "measured_ms", "met", "backend"})
            if m.latency_objective is not None
            else None
        ),
        "objective": (
            {
                "max_top1_drop": m.objective.max_top1_drop,
                "met": m.objective.met,
                "chosen_trial": m.objective.chosen_trial,
                "reason": m.objective.reason,
                "trials": len(m.objective.points),
            }
            if m.objective is not None
            else None
        ),
    }
