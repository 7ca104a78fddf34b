"""MLflow tracking (``DG2PF_MLFLOW_TRACKING_URI``): every job is a run of the ``dg2pf`` experiment.

A thread of the API process follows the store, as any replica may: for each job that has started
it opens a run (tags ``dg2pf.job_id``, ``dg2pf.state``; the job's name as the run name), logs the job
spec as params (flattened, dotted keys), every epoch record as metrics with ``step`` = epoch
(``val_top1``, ``val_top5``, ``train_loss``, ``sparsity``, ``lr``, ``recovered``, ``seconds``) as the
records arrive, and when the job ends its numeric results (``test_top1``, ``best_val_top1``, ``baseline_test_top1``,
``sparsity_prunable``, parameter and MAC counts, measured speed-ups), its artifacts (metrics.json,
history.json, the plots, model.onnx and the .safetensors files) and the run's end: FINISHED
(succeeded), FAILED (with the error as tags) or KILLED (cancelled).

A run is found again by its ``dg2pf.job_id`` tag, so an API restart continues the runs it had
(records already logged are counted from the metric history, never sent twice) and jobs that ended
while no API ran are logged when one starts. MLflow being slow or down never touches a job: the
failure is a warning in the service log and the job is tried again on the next pass.

Needs the ``mlflow-skinny`` package (``pip install 'dg2pf[mlflow]'``); any MLflow tracking URI works
(``sqlite:///path/mlflow.db``, ``http://mlflow:5000``, ``databricks``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from dg2pf_contract.artifacts import Artifacts

from .conditions import Conditions
from .executor import output_dir
from .store.models import TERMINAL_STATES
from .store.repo import JobStore

log = logging.getLogger("dg2pf.tracking")

EXPERIMENT = "dg2pf"
JOB_TAG = "dg2pf.job_id"
RECORD_METRICS = ("val_top1", "val_top5", "train_loss", "sparsity", "lr", "recovered", "seconds")
# The job's results, once, at step 0; the best epoch's validation top-1 as best_val_top1 (val_top1 is per epoch).
# Read from the job's status summary (``best_metrics``, named as in metrics.json); flops_*: the MACs' former
# names, logged beside macs_* for one release.
RESULT_METRICS = (
    "test_top1",
    "test_top5",
    "baseline_test_top1",
    "sparsity_prunable",
    "sparsity_total",
    "params_nonzero",
    "params_total",
    "macs_sparse",
    "macs_dense",
    "flops_sparse",
    "flops_dense",
    "best_epoch",
    "epochs",
    "wall_seconds",
    "max_layer_sparsity",
    "channel_sparsity",
    "macs_ratio",
)
ARTIFACTS = (
    Artifacts.METRICS,
    Artifacts.HISTORY,
    *Artifacts.PLOTS,
    Artifacts.TRIALS,
    Artifacts.ONNX,
    Artifacts.MODEL,
    Artifacts.COMPACT,
)
END_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
RECENT_JOBS = 100  # each pass looks at the newest jobs and the running ones
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
WARN_EVERY_S = 300.0  # while MLflow keeps failing, one warning this often


class TrackingUnavailable(RuntimeError):
    """``DG2PF_MLFLOW_TRACKING_URI`` is set but MLflow is not installed."""


def flatten(doc: Any, prefix: str = "") -> dict[str, str]:
    """``{"schedule": {"lr": 0.01}}`` -> ``{"schedule.lr": "0.01"}``; lists and None as JSON text."""
    if isinstance(doc, dict):
        out: dict[str, str] = {}
        for key, value in doc.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return {prefix.rstrip("."): text[:MAX_PARAM_CHARS]}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


class MlflowTracking:
    def __init__(
        self, tracking_uri: str, store: JobStore, experiment: str = EXPERIMENT, artifact_location: str | None = None
    ) -> None:
        # MLflow's HTTP defaults (7 retries with back-off, 120 s timeouts) held one call for about 4 minutes
        # against an unreachable server: a pass gives up in seconds and the next one tries again. An
        # operator's own values win.
        for name, value in (
            ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
            ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
        ):
            os.environ.setdefault(name, value)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackingUnavailable(
                "DG2PF_MLFLOW_TRACKING_URI is set but MLflow is not installed: pip install "
                "'dg2pf[mlflow]' (mlflow-skinny), or unset it"
            ) from exc
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._failing_since: float | None = None
        self._last_warning = 0.0
        self._conditions = Conditions(log)
        # Only for an experiment the service creates (Settings gives a local store one under data_dir).
        self.store, self.experiment_name, self.artifact_location = store, experiment, artifact_location
        self._experiment_id: str | None = None
        self._open: dict[str, tuple[str, int, str]] = {}  # job id -> (run id, epoch records logged, state tagged)
        self._done: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the loop ---
    def start(self, poll_seconds: float) -> None:
        def loop() -> None:
            while not self._stop.wait(poll_seconds):
                self.tick()

        self._thread = threading.Thread(target=loop, name="dg2pf-mlflow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # Not waiting out a call to a slow MLflow: the thread is a daemon, and what ends while no
            # API runs is logged by the next one.
            self._thread.join(timeout=2)

    def tick(self) -> None:
        try:
            # Ids and states only: a job's row (its history) is read when it has something to log.
            running = {r.id: r for r in self.store.active_jobs()}
            jobs = dict(self.store.recent_states(RECENT_JOBS)) | {i: r.state for i, r in running.items()}
        except Exception as exc:  # noqa: BLE001 - the store may be briefly unreachable; next pass
            self._conditions.failed("store", "MLflow tracking could not read the jobs", exc)
            return
        self._conditions.ok("store", "MLflow tracking reading the jobs")
        for job_id, state in jobs.items():
            if job_id in self._done or state == "queued":
                continue
            try:
                row = running.get(job_id) or self.store.get_job(job_id)
            except Exception as exc:  # noqa: BLE001 - as above
                self._conditions.failed("store", "MLflow tracking could not read the jobs", exc)
                return
            if row is None or row.started_at is None:  # cancelled while queued: it never ran, nothing to track
                self._done.add(job_id)
                continue
            try:
                self._sync(row)
            except Exception as exc:  # noqa: BLE001 - MLflow down or slow: the job is untouched, retried next pass
                self._failed(job_id, exc)
                return  # the other jobs would most likely fail the same way: next pass
        self._failing_since = None

    def _failed(self, job_id: str, exc: Exception) -> None:
        """One warning when MLflow starts failing, then one every WARN_EVERY_S while it goes on."""
        now = time.monotonic()
        if self._failing_since is None or now - self._last_warning >= WARN_EVERY_S:
            since = "" if self._failing_since is None else f" (failing for {now - self._failing_since:.0f} s)"
            log.warning(
                "MLflow tracking (DG2PF_MLFLOW_TRACKING_URI) failed for job %s%s; the jobs are not affected and "
                "are logged once it answers: %s",
                job_id,
                since,
                " ".join(str(exc).split())[:300],
            )
            self._last_warning = now
        self._failing_since = self._failing_since or now

    # --- one job ---
    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            self._experiment_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
            )
        return self._experiment_id

    def _sync(self, row) -> None:
        run_id, logged, tagged = self._open.get(row.id) or self._find_or_create(row)
        if run_id is None:  # an earlier process logged this job to its end
            self._done.add(row.id)
            return
        records = row.history or []
        metrics = self._record_metrics(records[logged:])
        if metrics:
            self._log_metrics(run_id, metrics)
        if row.state != tagged:
            self.client.set_tag(run_id, "dg2pf.state", row.state)
        self._open[row.id] = (run_id, max(logged, len(records)), row.state)
        if row.state in TERMINAL_STATES:
            self._finish(row, run_id)
            self._open.pop(row.id, None)
            self._done.add(row.id)

    def _find_or_create(self, row) -> tuple[str | None, int, str]:
        experiment = self._experiment()
        found = self.client.search_runs([experiment], filter_string=f"tags.`{JOB_TAG}` = '{row.id}'", max_results=1)
        if found:
            run = found[0]
            if run.info.status != "RUNNING":
                return None, 0, ""
            return run.info.run_id, len(self.client.get_metric_history(run.info.run_id, "val_top1")), ""
        run = self.client.create_run(
            experiment, run_name=row.name or row.id[:8], tags={JOB_TAG: row.id, "dg2pf.state": row.state}
        )
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(row.spec.get("spec", {})).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id, 0, row.state

    @staticmethod
    def _record_metrics(records: list[dict]) -> list[tuple[str, float, int]]:
        out = []
        for r in records:
            for key in RECORD_METRICS:
                value = _number(r.get(key))
                if value is not None:
                    out.append((key, value, int(r.get("epoch", 0))))
        return out

    def _log_metrics(self, run_id: str, metrics: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value, step in metrics]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def _finish(self, row, run_id: str) -> None:
        best = row.best_metrics or {}
        results = [(key, v, 0) for key in RESULT_METRICS if (v := _number(best.get(key))) is not None]
        if (v := _number(best.get("val_top1"))) is not None and row.state == "succeeded":
            results.append(("best_val_top1", v, 0))
        speedup = (best.get("latency") or {}).get("speedup") or {}
        results += [
            (f"speedup_{backend}_batch{n}", v, 0)
            for backend, by in speedup.items()
            for n, x in by.items()
            if (v := _number(x)) is not None
        ]
        if results:
            self._log_metrics(run_id, results)
        out = output_dir(Path(row.artifacts_dir))
        for name in ARTIFACTS:
            if (out / name).is_file():
                self.client.log_artifact(run_id, str(out / name))
        if row.error_type:
            self.client.set_tag(run_id, "dg2pf.error_type", row.error_type)
            self.client.set_tag(run_id, "dg2pf.error", (row.error_message or "")[:5000])
        self.client.set_terminated(run_id, END_STATUS[row.state])
