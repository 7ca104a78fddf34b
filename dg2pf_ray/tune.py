"""Ray Tune over DG2PF's schedule hyperparameters; every trial is a full Ray Train (TorchTrainer) run.

Early stopping (ASHA) uses ``epochs_at_target`` — epochs completed at the final sparsity — as its
time axis, so a trial is only ever compared with others that are equally sparse: while a trial is
still in its pruning phase its time is 0 and no rung can judge it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import Metrics, TuneSummary
from dg2pf_core.io.export import OutputDir
from dg2pf_core.job import PruneJob, prepare

from .cluster import TRIAL_DRIVER_CPU, check_capacity, connect
from .search_space import build_space, load_space, trial_config
from .train import RayOptions, RunFailed, RunStorage, copy_final, make_trainer

RANK_METRIC = "val_top1"
TIME_ATTR = "epochs_at_target"
DRIVER_CPU = TRIAL_DRIVER_CPU


@dataclass(frozen=True)
class TuneOptions:
    samples: int = 4
    search_space: str | dict | None = None  # a YAML/JSON file or a job's document; default: DEFAULT_SPACE
    workers_per_trial: int = 1
    use_gpu: bool = False
    placement: str = "pack"  # of each trial's workers: "pack" | "spread"
    cluster_may_grow: bool = False  # an autoscaling cluster: wait for nodes instead of refusing the run
    address: str | None = None
    storage_path: str | None = None  # as RayOptions': None is a temporary folder beside out, removed at the end
    max_concurrent: int | None = None  # default: as many as the cluster's CPUs (or GPUs) allow
    grace_period: int = 2  # epochs at the final sparsity before ASHA may stop a trial
    run_name: str | None = None
    verbose: bool = False
    ray_logs: bool = True  # Ray's own INFO lines (False: warnings and errors only; see cluster.connect)


def _trial(config: dict[str, Any], *, base_job: dict, options: dict, name: str) -> None:
    """One Tune trial: a TorchTrainer run whose reports flow to Tune through TuneReportCallback."""
    base = PruneJob.from_dict(base_job)
    job = dataclasses.replace(base, config=trial_config(base.config, config))
    trial_id = tune.get_context().get_trial_id()
    run = RayOptions(
        workers=options["workers_per_trial"],
        use_gpu=options["use_gpu"],
        placement=options["placement"],
        storage_path=options["storage_path"],
        max_failures=0,
        run_name=f"{name}-{trial_id}",
        verbose=options["verbose"],
        ray_logs=options["ray_logs"],
    )
    make_trainer(job, run, callbacks=[TuneReportCallback()]).fit()


def _status(result) -> str:
    if result.error is not None or (result.metrics or {}).get("refused"):
        return "failed"
    return "completed" if (result.metrics or {}).get("final") else "stopped_early"


def tune_job(job: PruneJob, out: str | Path, options: TuneOptions) -> Metrics:
    """Search ``options.samples`` configs; write the best model, metrics.json and trials.csv to ``out``."""
    output = OutputDir(out)
    started = time.perf_counter()
    prepare(job, out=out, dry=False)  # the dry run is each trial's workers'
    if options.samples < 1:
        raise RunFailed(f"samples must be >= 1, got {options.samples}", field="samples")
    document = load_space(options.search_space)
    space = build_space(document, job.config, samples=options.samples)
    connect(options.address, quiet=not options.ray_logs)
    if not options.cluster_may_grow:
        check_capacity(options.workers_per_trial, options.use_gpu, extra_cpus=DRIVER_CPU)
    concurrent = concurrency(options)
    name = options.run_name or f"dg2pf-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    with RunStorage(options.storage_path, output.path) as storage, _tune_output(options.ray_logs):
        grid = _fit(job, options, space, concurrent, name, storage.path)
        return _write_result(grid, job, output, options, document, storage.recorded, name, started)


@contextlib.contextmanager
def _tune_output(ray_logs: bool):
    """Without Ray's own logs, none of Tune's console output either: its new output engine prints an
    experiment table and "View detailed results here: <storage>" whatever RunConfig's verbose says
    (Ray 2.60, tune/experimental/output.py); its legacy engine honours verbose=0."""
    if ray_logs or "RAY_AIR_NEW_OUTPUT" in os.environ:
        yield
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


def trainable(job: PruneJob, options: TuneOptions, name: str, storage: str):
    """The Tune trainable of a search: each trial a TorchTrainer run of ``job`` with the trial's values."""
    return tune.with_resources(
        partial(
            _trial,
            base_job=job.to_dict(),
            name=name,
            options={
                "workers_per_trial": options.workers_per_trial,
                "use_gpu": options.use_gpu,
                "placement": options.placement,
                "storage_path": storage,
                "verbose": options.verbose,
                "ray_logs": options.ray_logs,
            },
        ),
        {"cpu": DRIVER_CPU},  # the trial driver only waits on its TorchTrainer, whose workers hold the CPUs
    )


def concurrency(options: TuneOptions) -> int:
    """Trials at once: as given, else as many as the cluster's CPUs (or GPUs) hold with their drivers."""
    resources = ray.cluster_resources()
    capacity = resources.get("GPU", 0) if options.use_gpu else resources.get("CPU", 1)
    return options.max_concurrent or max(1, int(capacity // (options.workers_per_trial + DRIVER_CPU)))


def _fit(job: PruneJob, options: TuneOptions, space: dict, concurrent: int, name: str, storage: str):
    post_pruning = job.config.max_epochs - job.config.pruning_epochs
    trainable_ = trainable(job, options, name, storage)
    experiment = f"{storage.rstrip('/')}/{name}"
    if options.run_name and tune.Tuner.can_restore(experiment):
        # The same named run again (the service resubmits a job whose Ray work was lost): finished trials
        # keep their results, unfinished and errored ones resume from their last checkpoints.
        grid = tune.Tuner.restore(
            experiment, trainable_, param_space=space, resume_unfinished=True, resume_errored=True
        ).fit()
    else:
        grid = _new_tuner(trainable_, space, options, concurrent, name, storage, post_pruning).fit()
    return grid


def _new_tuner(
    trainable, space: dict, options: TuneOptions, concurrent: int, name: str, storage: str, post_pruning: int
):
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=options.samples,
            max_concurrent_trials=concurrent,
            scheduler=ASHAScheduler(
                time_attr=TIME_ATTR,
                metric=RANK_METRIC,
                mode="max",
                grace_period=max(1, options.grace_period),
                max_t=post_pruning + 3,
            ),
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
    )


def _write_result(
    grid,
    job: PruneJob,
    output: OutputDir,
    options: TuneOptions,
    document: dict,
    storage: str | None,
    name: str,
    started: float,
) -> Metrics:
    rows = []
    for result in grid:
        m, status = result.metrics or {}, _status(result)
        at_target = status != "failed" and m.get("epochs_at_target", 0) > 0
        rows.append(
            {
                "trial_id": m.get("trial_id") or Path(result.path).name,
                "status": status,
                **{f"config.{k}": v for k, v in sorted(result.config.items())},
                # figures only where they describe a model at the final sparsity
                "val_top1": m.get("val_top1") if at_target else None,
                "test_top1": m.get("test_top1") if status == "completed" else None,
                "sparsity": m.get("sparsity") if at_target else None,
                "epochs": m.get("epoch"),
                "wall_seconds": m.get("time_total_s"),
                "error": (
                    str(result.error).strip().splitlines()[-1][:300]
                    if result.error is not None
                    else (m.get("refused") or {}).get("message")
                ),
                "_checkpoint": m.get("checkpoint_path") if status == "completed" else None,
            }
        )
    done = [r for r in rows if r["status"] == "completed" and r["_checkpoint"]]
    if not done:
        failures = "; ".join(f"{r['trial_id']}: {r['status']} {r['error'] or ''}" for r in rows)
        raise RunFailed(f"no trial completed ({failures})")
    best = max(done, key=lambda r: r["val_top1"])

    with Checkpoint(best["_checkpoint"]).as_directory() as final, output.staging() as tmp:
        copy_final(Path(final), tmp)
        table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        files = Artifacts(tmp)
        with files.trials.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        metrics = Metrics.read(files.metrics)
        metrics.tune = TuneSummary(
            best_trial=best["trial_id"],
            best_config=trial_config(
                job.config, {k[7:]: v for k, v in best.items() if k.startswith("config.")}
            ).to_dict(),
            search_space=document,
            samples=options.samples,
            scheduler=f"ASHA on {TIME_ATTR} (grace {max(1, options.grace_period)}), ranked by {RANK_METRIC}",
            trials=table,
            storage_path=storage,
            name=name,
            wall_seconds=time.perf_counter() - started,
        )
        metrics.write(files.metrics)
    return metrics
