"""DG2PF on Ray Train: one TorchTrainer run, DDP workers, a checkpoint per epoch, restarts on failure.

The per-worker function is short on purpose: it builds the job with dg2pf_core, wraps the model
with DDP, hands the loop sharded loaders, and turns the loop's per-epoch reporter into
``ray.train.report`` calls. Everything else (masks, phases, resume) is dg2pf_core's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError, WorkerGroupError

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import DistributedRun, Metrics, RayRun
from dg2pf_core.algorithm.loop import run_dg2pf
from dg2pf_core.algorithm.masks import masks_checksum
from dg2pf_core.algorithm.state import EpochRecord, TrainingState, append_record
from dg2pf_core.errors import DG2PFError
from dg2pf_core.io.export import OutputDir
from dg2pf_core.job import OutputError, PruneJob, prepare, result_metrics, write_results

from .cluster import ClusterError, check_capacity, connect

# A final checkpoint holds the run's Artifacts: every REQUIRED one and the OPTIONAL ones it has (model.onnx
# when the model exports to ONNX and matches PyTorch, see metrics.json's onnx; the plots unless drawing them
# failed: a warning in the worker's log, and `dg2pf plot` draws them again).
REFUSED_FILE = "refused.json"  # the checkpoint of a run whose workers refused the job (a bad input)


@dataclass(frozen=True)
class RayOptions:
    workers: int = 1
    use_gpu: bool = False
    address: str | None = None
    storage_path: str | None = (
        None  # local dir, shared filesystem or object-store URI; None: RunStorage's temporary one
    )
    max_failures: int = 2
    placement: str = "pack"  # "pack" | "spread": Ray's placement-group strategy for the workers
    cluster_may_grow: bool = False  # an autoscaling cluster: wait for nodes instead of refusing the run
    run_name: str | None = None
    verbose: bool = True  # rank 0 prints a line per epoch
    ray_logs: bool = True  # Ray's own INFO lines (False: warnings and errors only; see cluster.connect)
    progress_path: str | None = None  # rank 0 appends one JSON line per epoch (shared filesystem)


class RunFailed(DG2PFError):
    field = "run"


def _gather(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def epochs_at_target(epoch: int, pruning_epochs: int) -> int:
    """Epochs completed at the final sparsity (0 while still pruning): the time axis on which
    early stopping may compare trials, since only then are they all equally sparse."""
    return max(0, epoch - pruning_epochs + 1)


def _quiet_report_lines() -> None:
    """Ray Train's "Reporting training result N: ..." line per worker and epoch is logged under the file's
    path, not a ``ray.train`` logger name (Ray 2.60, execution/context.py), so its LoggingConfig does not
    reach it: that logger alone is held to warnings."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines show, nothing else changes
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker (one DDP rank)."""
    if not config.get("ray_logs", True):
        _quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job = PruneJob.from_dict(config["job"])
    job.config.device = str(ray.train.torch.get_device())
    # The worker's own preflight (its device, its share of the batch). A bad input is reported by
    # every rank alike, as the run's result, instead of raised: Ray Train would retry a raised error,
    # and a configuration error fails the same way every time.
    try:
        prepared, refusal = prepare(job, world_size=world), None
    except DG2PFError as exc:
        prepared, refusal = None, {"type": type(exc).__name__, "message": exc.message, "field": exc.field}
    refusals = [r for r in _gather(refusal) if r is not None]
    if refusals:
        # The driver reads the run's result from its last checkpoint: the refusal travels as one.
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / REFUSED_FILE).write_text(json.dumps(refusals[0]))
                ray.train.report(
                    {"final": True, "refused": refusals[0]},
                    checkpoint=Checkpoint.from_directory(tmp),
                    checkpoint_dir_name="refused",
                )
        else:
            ray.train.report({"final": True, "refused": refusals[0]}, checkpoint=None)
        return
    started = time.perf_counter()
    nodes = _gather(ray.get_runtime_context().get_node_id())

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            if all((Path(d) / f).is_file() for f in Artifacts.REQUIRED):
                # The run had ended (this is a re-run after its driver was lost): report the result again.
                done = Metrics.read(Artifacts(d).metrics)
                final = {
                    "final": True,
                    "epoch": done.epochs,
                    "val_top1": done.val_top1,
                    "test_top1": done.test_top1,
                    "sparsity": done.sparsity_prunable,
                    "epochs_at_target": epochs_at_target(done.epochs, job.config.pruning_epochs) + 1,
                }
                if rank == 0:
                    with tempfile.TemporaryDirectory() as tmp:
                        copy_final(Path(d), Path(tmp))
                        ray.train.report(
                            final, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name="final_again"
                        )
                else:
                    ray.train.report(final, checkpoint=None)
                return
            resume = TrainingState.load(d)
    teacher = prepared.teacher if prepared.teacher is not None else copy.deepcopy(prepared.model)
    model = ray.train.torch.prepare_model(prepared.model)  # to device + DDP
    checksums: list[list] = []

    def report(record: EpochRecord, state: TrainingState) -> None:
        sums = _gather(masks_checksum(state.masks)) if state.masks else []
        if sums:
            checksums.append([record.epoch, sums])
        metrics = {
            **record.to_dict(),
            "mask_checksums": sums,
            "world_size": world,
            "epochs_at_target": epochs_at_target(record.epoch, job.config.pruning_epochs),
        }
        if rank == 0:
            if config.get("progress_path"):
                append_record(config["progress_path"], {**record.to_dict(), "world_size": world, "nodes": nodes})
            if config.get("verbose", True):
                # To the process's own stdout: Ray Train's patched print() would send a line on sys.stdout
                # to its logger (stderr) as well, and the driver would show every epoch twice.
                print(
                    f"epoch {record.epoch:>3} {record.phase:<15} sparsity {record.sparsity:6.2%} "
                    f"val top-1 {record.val_top1:6.2f}%{' *best' if record.is_best else ''}"
                    f"{f' (restarts: {record.restarts})' if record.restarts else ''}",
                    flush=True,
                    file=sys.__stdout__,
                )
            with tempfile.TemporaryDirectory() as tmp:
                state.save(tmp)
                ray.train.report(
                    metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch_{record.epoch:04d}"
                )
        else:
            ray.train.report(metrics, checkpoint=None)

    result = run_dg2pf(
        model,
        prepared.sharded_loaders(rank, world),
        job.config,
        teacher=teacher,
        reporter=report,
        resume=resume,
        device=prepared.device,
        input_shape=prepared.input_shape,
        latency_table=prepared.latency_table,
    )
    metrics = result_metrics(prepared, result, world_size=world, wall_seconds=time.perf_counter() - started)
    metrics.distributed = DistributedRun(backend=dist.get_backend(), worker_nodes=nodes, mask_checksums=checksums)
    # The last report carries the result: the best epoch's validation top-1 (what Tune ranks) and
    # the artifacts, so the driver (possibly on another node) reads them from storage.
    final = {
        "final": True,
        "epoch": result.epochs,
        "val_top1": result.best_val_top1,
        "test_top1": metrics.test_top1,
        "sparsity": metrics.sparsity_prunable,
        "epochs_at_target": epochs_at_target(result.epochs, job.config.pruning_epochs) + 1,
    }
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            write_results(Path(tmp), prepared, result, metrics)
            ray.train.report(final, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name="final")
    else:
        ray.train.report(final, checkpoint=None)


def copy_final(source: Path, dest: Path) -> None:
    """A final checkpoint's artifacts: every one of ``Artifacts.REQUIRED``, and the ``Artifacts.OPTIONAL`` it has."""
    for f in (*Artifacts.REQUIRED, *(o for o in Artifacts.OPTIONAL if (source / o).is_file())):
        shutil.copy2(source / f, dest / f)


class RunStorage:
    """Where Ray Train and Tune write a run's checkpoints: ``given`` as it is (the caller's: a shared
    filesystem or an object store, kept), else a temporary folder beside ``out``
    (``.OUT.ray-XXXX``, on the results' filesystem; the current directory only holds it when ``out``
    is there) removed when the run ends, unless ``keep()`` was called (the results could not be
    copied out of it)."""

    def __init__(self, given: str | None, out: Path) -> None:
        self.temporary = not given
        if given:
            self.path = given
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix=f".{out.name}.ray-", dir=out.parent)
        self._kept = False

    @property
    def recorded(self) -> str | None:
        """The storage path for metrics.json: None for a temporary one (removed)."""
        return None if self.temporary else self.path

    def keep(self) -> str:
        self._kept = True
        return self.path

    def __enter__(self) -> RunStorage:
        return self

    def __exit__(self, *exc) -> None:
        if self.temporary and not self._kept:
            shutil.rmtree(self.path, ignore_errors=True)


def make_trainer(job: PruneJob, options: RayOptions, callbacks: list | None = None) -> TorchTrainer:
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "job": job.to_dict(),
            "verbose": options.verbose,
            "ray_logs": options.ray_logs,
            "progress_path": options.progress_path,
        },
        scaling_config=ScalingConfig(
            num_workers=options.workers, use_gpu=options.use_gpu, placement_strategy=options.placement.upper()
        ),
        run_config=RunConfig(
            name=options.run_name or f"dg2pf-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=options.storage_path,  # RunStorage's, always given
            # A finite controller limit: workers that can never start end the run instead of retrying forever.
            failure_config=FailureConfig(max_failures=options.max_failures, controller_failure_limit=3),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
            callbacks=callbacks,
            # Ray Train's INFO lines on the console (worker set-up, "Reporting training result" per worker and
            # epoch) only with ray_logs; its log files under the Ray session keep everything.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if options.ray_logs else "WARNING"),
        ),
    )


def _explain(exc: Exception, options: RayOptions) -> str:
    """What went wrong, in words a user can act on, from Ray Train's nested errors."""
    if isinstance(exc, ControllerError) and isinstance(exc.controller_failure, WorkerGroupStartupTimeoutError):
        total = ray.cluster_resources()
        need = f"1 CPU{' and 1 GPU' if options.use_gpu else ''} each"
        return (
            f"Ray could not place the {options.workers} workers ({need}) in time, on any attempt: the cluster now has "
            f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs in all. A node may have been lost, an "
            "autoscaler may not have started one in time, or other work holds the resources: add nodes or resubmit "
            "with fewer workers (DG2PF_WORKER_START_TIMEOUT_S / RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S sets how long "
            "each attempt waits)"
        )
    if isinstance(exc, ControllerError):
        return _error_line(exc.controller_failure)
    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        rank, error = min(exc.worker_failures.items())
        return f"worker {rank}: {_error_line(error)}"
    return _error_line(exc)


def _error_line(exc: BaseException) -> str:
    """The last line that names an error, from a (possibly remote) traceback's text."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and ("Error" in line or "error" in line):
            return line[:500]
    return text.splitlines()[0][:500] if text else type(exc).__name__


def prune_on_ray(job: PruneJob, out: str | Path, options: RayOptions) -> Metrics:
    """Run ``job`` with ``options.workers`` DDP workers on Ray; write ``out/`` like ``prune_to_dir``."""
    output = OutputDir(out)
    started = time.perf_counter()
    # Every input error surfaces here, in seconds, before any Ray work; the dry run is the workers'
    # (on their devices, with their share of the batch).
    prepare(job, out=out, dry=False)
    connect(options.address, quiet=not options.ray_logs)
    if not options.cluster_may_grow:
        check_capacity(options.workers, options.use_gpu)
    with RunStorage(options.storage_path, output.path) as storage:
        return _fit(job, out, output, dataclasses.replace(options, storage_path=storage.path), storage, started)


def _fit(
    job: PruneJob, out: str | Path, output: OutputDir, options: RayOptions, storage: RunStorage, started: float
) -> Metrics:
    trainer = make_trainer(job, options)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        # Worker failures are retried max_failures times; a worker group that cannot start, 3 times.
        retried = f" after {options.max_failures} restart(s)" if isinstance(exc, WorkerGroupError) else ""
        raise RunFailed(f"training failed{retried}: {_explain(exc, options)}") from exc
    if result.error is not None:
        raise RunFailed(f"training failed: {_explain(result.error, options)}")
    if result.checkpoint is None:
        raise RunFailed("training finished without a final checkpoint")
    with result.checkpoint.as_directory() as final:
        if (Path(final) / REFUSED_FILE).is_file():
            refused = json.loads((Path(final) / REFUSED_FILE).read_text())
            raise RunFailed(f"a worker refused the job: {refused['message']}", field=refused.get("field") or "run")
    try:
        with result.checkpoint.as_directory() as final, output.staging() as tmp:
            missing = [f for f in Artifacts.REQUIRED if not (Path(final) / f).exists()]
            if missing:
                raise RunFailed(f"the final checkpoint at {result.checkpoint.path} lacks {missing}")
            copy_final(Path(final), tmp)
            files = Artifacts(tmp)
            metrics = Metrics.read(files.metrics)
            metrics.driver_wall_seconds = time.perf_counter() - started
            metrics.ray_run = RayRun(storage_path=storage.recorded, name=trainer.run_config.name)
            metrics.write(files.metrics)
    except OSError as exc:
        # Nothing trained is lost: the model and its metrics stay in Ray Train's final checkpoint.
        storage.keep()
        raise OutputError(
            f"training finished but {out} could not be written ({exc.strerror or exc}); the trained model "
            f"and metrics are kept in Ray Train's final checkpoint at {result.checkpoint.path}: copy "
            f"{', '.join(Artifacts.REQUIRED)} from there"
        ) from exc
    return metrics


__all__ = ["ClusterError", "RayOptions", "RunFailed", "prune_on_ray", "train_worker"]
