"""A job run end to end in this process: ``prune_to_dir`` runs the preflight, trains (``run``: DG2PF on
the prepared job) with the run's state kept in a state directory, and writes the results all at once."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from dg2pf_contract.artifacts import StateDir, write_text_atomic
from dg2pf_contract.results import Metrics
from dg2pf_core.algorithm.loop import DG2PFResult, Progress, Reporter, run_dg2pf
from dg2pf_core.algorithm.state import TrainingState
from dg2pf_core.data.loaders import Loaders
from dg2pf_core.errors import ConfigError, InputModelMismatch, OutputError, TrainingDiverged
from dg2pf_core.io.export import OutputDir
from dg2pf_core.job.preflight import prepare
from dg2pf_core.job.results import result_metrics
from dg2pf_core.job.rundir import lock_state_dir
from dg2pf_core.job.spec import PreparedJob, PruneJob
from dg2pf_core.job.write import write_results


def run(
    prepared: PreparedJob,
    *,
    loaders: Loaders | None = None,
    progress: Progress | None = None,
    reporter: Reporter | None = None,
    resume: TrainingState | None = None,
) -> DG2PFResult:
    return run_dg2pf(
        prepared.model,
        loaders or prepared.local_loaders(),
        prepared.job.config,
        teacher=prepared.teacher,
        reporter=reporter,
        progress=progress,
        resume=resume,
        device=prepared.device,
        input_shape=prepared.input_shape,
        latency_table=prepared.latency_table,
    )


def prune_to_dir(
    job: PruneJob,
    out: str | Path,
    *,
    progress: Progress | None = None,
    on_prepared: Callable[[PreparedJob], None] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    keep_state: bool = False,
) -> Metrics:
    """Run ``job`` in this process and write ``out/model.safetensors`` (dense, in the input
    checkpoint's dtypes), ``out/model.compact.safetensors`` (bitmask + nonzero values) and
    ``out/metrics.json``.

    Nothing is written to ``out`` until the run succeeds, and then all at once (temp dir + rename).
    With ``state_dir``, the job and every epoch's full training state are kept there while the run
    trains (created only once the preflight passed); ``resume`` continues from the state found
    there; the directory is removed after success unless ``keep_state``. If writing ``out`` fails
    after training, ``OutputError`` says where the state waits.
    """
    output = OutputDir(out)  # refuses a non-empty destination before any work
    started = time.perf_counter()
    prepared = prepare(job, out=out)
    if on_prepared is not None:
        on_prepared(prepared)
    state = None
    reporter = None
    lock = None
    saved: list[int] = []
    if state_dir is not None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_state_dir(state_dir, out)
        if resume and StateDir(state_dir).training_state.is_file():
            state = TrainingState.load(state_dir)
        # Atomic: rewritten on every resume, and a full disk must not empty the job a resume needs.
        write_text_atomic(
            StateDir(state_dir).job, json.dumps({"job": job.to_dict(), "out": os.path.abspath(out)}, indent=1)
        )

        def reporter(record, s) -> None:
            s.save(state_dir)
            saved.append(record.epoch)

    try:
        result = run(prepared, progress=progress, reporter=reporter, resume=state)
    except (TrainingDiverged, ConfigError, InputModelMismatch):
        if state_dir is not None and not keep_state:
            # Resuming would diverge again / fail on the same options / refuse the same input model: start over instead.
            shutil.rmtree(state_dir, ignore_errors=True)
        raise
    except BaseException as exc:
        if saved:
            exc.state_kept = state_dir  # type: ignore[attr-defined] - where a front end says to --resume from
        raise
    finally:
        if lock is not None:
            lock.close()
    metrics = result_metrics(prepared, result, world_size=1, wall_seconds=time.perf_counter() - started)
    try:
        with output.staging() as tmp:
            metrics = write_results(tmp, prepared, result, metrics)
    except OSError as exc:
        kept = (
            (
                f"; the trained state is kept in {state_dir}: fix the cause, then continue with "
                f"`dg2pf prune --resume {state_dir}`"
            )
            if state_dir is not None
            else ""
        )
        raise OutputError(f"training finished but {out} could not be written ({exc.strerror or exc}){kept}") from exc
    except BaseException as exc:  # Ctrl-C, SIGTERM while the results were written: the trained state stays
        if saved:
            exc.state_kept = state_dir  # type: ignore[attr-defined] - a resume writes the results, no retraining
        raise
    if state_dir is not None and not keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return metrics
