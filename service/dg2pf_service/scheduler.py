"""Reconciling the job store with Ray, and dispatching queued jobs first in, first out.

One ``tick`` does both. It runs in a background thread of the API process every ``poll_seconds``
and once at start-up, which is how a restarted API re-attaches to jobs that kept running on Ray,
and how a job whose Ray work vanished is marked failed instead of staying "running" for ever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from dg2pf_core.errors import DG2PFError

from .executor import Order, RayJobsExecutor, needs_of, read_error, read_metrics, read_progress
from .store.repo import JobStore

log = logging.getLogger("dg2pf.scheduler")


def _now() -> datetime:
    return datetime.now(timezone.utc)


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


class Scheduler:
    def __init__(self, store: JobStore, executor: RayJobsExecutor, capacity: Callable[[], tuple[float, float]],
                 make_order: Callable[[dict], Order], on_succeeded: Callable[[object], None] | None = None) -> None:
        self.store, self.executor, self.capacity, self.make_order = store, executor, capacity, make_order
        self.on_succeeded = on_succeeded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one pass ---
    def tick(self) -> None:
        with self._lock:
            for row in self.store.active_jobs():
                try:
                    self._reconcile(row)
                except Exception:  # noqa: BLE001 - one bad job must not stop the others
                    log.exception("reconciling job %s failed", row.id)
            self._dispatch()

    def _reconcile(self, row) -> None:
        job_dir = Path(row.artifacts_dir)
        schedule = row.spec["spec"].get("schedule") or {}
        records = read_progress(job_dir)
        fields = progress_fields(records, row.target_sparsity, int(schedule.get("pruning_epochs", 10)))
        status = self.executor.status(row.ray_submission_id) if row.ray_submission_id else None
        if status is None:
            self.store.transition(row.id, {"running"}, "failed", finished_at=_now(), error_type="LostJob",
                                  error_message=f"the Ray job {row.ray_submission_id} no longer exists (was the Ray cluster restarted?)",
                                  **fields)
        elif status == "SUCCEEDED":
            metrics = read_metrics(job_dir) or {}
            fields.update(phase="done", eta_seconds=0.0, best_metrics=_summary(metrics) or fields.get("best_metrics"))
            if metrics.get("history"):
                fields["history"] = metrics["history"]
            done = self.store.transition(row.id, {"running"}, "succeeded", finished_at=_now(), **fields)
            if done is not None and self.on_succeeded is not None:
                self.on_succeeded(done)
        elif status == "FAILED":
            err = read_error(job_dir) or {"type": "RayJobFailed", "message": self.executor.logs_tail(row.ray_submission_id) or "the Ray job failed"}
            self.store.transition(row.id, {"running"}, "failed", finished_at=_now(), error_type=err["type"], error_message=err["message"], **fields)
        elif status == "STOPPED":
            self.store.transition(row.id, {"running"}, "cancelled", finished_at=_now(), **fields)
        else:
            self.store.update_job(row.id, **fields)

    def _dispatch(self) -> None:
        total_cpu, total_gpu = self.capacity()
        used_cpu = used_gpu = 0.0
        for row in self.store.active_jobs():
            c, g = needs_of(row.spec)
            used_cpu, used_gpu = used_cpu + c, used_gpu + g
        for row in self.store.queued_in_order():
            c, g = needs_of(row.spec)
            if used_cpu + c > total_cpu or used_gpu + g > total_gpu:
                break  # first in, first out: nobody overtakes the head of the queue
            try:
                order = self.make_order(row.spec)
                submission = self.executor.submit(row.id, Path(row.artifacts_dir), order)
            except DG2PFError as exc:
                self.store.transition(row.id, {"queued"}, "failed", finished_at=_now(), error_type=type(exc).__name__, error_message=exc.message)
                continue
            if self.store.transition(row.id, {"queued"}, "running", started_at=_now(), ray_submission_id=submission, phase="baseline") is None:
                self.executor.stop(submission)  # cancelled while we were submitting
                continue
            used_cpu, used_gpu = used_cpu + c, used_gpu + g

    # --- background loop ---
    def start(self, poll_seconds: float) -> None:
        def loop() -> None:
            while not self._stop.wait(poll_seconds):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - keep polling; the next tick may succeed
                    log.exception("scheduler tick failed")

        self._thread = threading.Thread(target=loop, name="dg2pf-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _summary(metrics: dict) -> dict | None:
    if not metrics:
        return None
    keys = ("val_top1", "test_top1", "test_top5", "baseline_test_top1", "sparsity_prunable", "sparsity_total",
            "params_total", "params_nonzero", "flops_dense", "flops_sparse", "best_epoch", "epochs", "world_size",
            "max_layer_sparsity", "layer_cap", "layer_sparsity", "warnings")
    return {k: metrics.get(k) for k in keys}
