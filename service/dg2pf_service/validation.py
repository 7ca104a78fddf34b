"""Checking a submitted job against the world before anything is created.

Each check raises ``InvalidJob`` naming the spec field and the reason; the API turns it into a 4xx.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dg2pf_contract.job import JobSpec, ScheduleSpec
from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.data import parse_spec
from dg2pf_core.data.registry import needs_path
from dg2pf_core.data.roots import check_tree, under
from dg2pf_core.errors import ConfigError, DG2PFError
from dg2pf_core.job import PruneJob, check_static
from dg2pf_ray.cluster import TRIAL_DRIVER_CPU

from .pinning import pin_checkpoint
from .settings import Settings
from .store.repo import JobStore

_SCHEDULE_FIELDS = frozenset(ScheduleSpec.model_fields)


class InvalidJob(DG2PFError):
    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message, field=field)
        self.status = status


def resolve_checkpoint(ref: str, field: str, settings: Settings, store: JobStore) -> str:
    """A checkpoint id from POST /checkpoints, or a file under ``DG2PF_DATA_ROOTS``, pinned: the file is
    copied into the checkpoint store (registered like an upload) and the job reads that copy, so
    replacing or relinking the original later cannot change what the job reads."""
    row = store.get_checkpoint(ref)
    if row is not None:
        return row.path
    if "/" not in ref and "." not in ref:
        raise InvalidJob(field, f"unknown checkpoint id {ref!r}; upload it with POST /checkpoints first", status=404)
    try:
        return pin_checkpoint(Path(ref), settings, store)
    except DG2PFError as exc:
        raise InvalidJob(field, exc.message) from exc


def check_dataset(spec: str, settings: Settings) -> None:
    try:
        name, path = parse_spec(spec)
        wants_path = needs_path(name)
    except DG2PFError as exc:
        raise InvalidJob("dataset.spec", exc.message) from exc
    if wants_path and path is None:
        raise InvalidJob("dataset.spec", f"dataset {name!r} needs a path under DG2PF_DATA_ROOTS: use {name}:PATH")
    if not wants_path and path is not None:
        raise InvalidJob("dataset.spec", f"dataset {name!r} takes no path: use {name!r}")
    if path is None:
        return
    p = Path(path)
    roots = [str(r) for r in settings.data_roots]
    if not p.is_absolute() or not under(os.path.realpath(p), [os.path.realpath(r) for r in roots]):
        raise InvalidJob(
            "dataset.spec", f"dataset path {path!r} is outside DG2PF_DATA_ROOTS ({', '.join(roots) or 'none set'})"
        )
    if not p.exists():
        raise InvalidJob("dataset.spec", f"dataset path {path!r} does not exist")
    try:
        check_tree(str(p), roots)  # every file under it: no link out of the roots, no hard link
    except DG2PFError as exc:
        raise InvalidJob("dataset.spec", exc.message) from exc


def check_latency_table(path: str, settings: Settings) -> None:
    """A latency table file the job brought: an absolute path inside DG2PF_DATA_ROOTS, and a table
    (read and checked here; the job reads it again, confined, before training)."""
    from dg2pf_core.algorithm.latency_table import LatencyTable

    roots = [str(r) for r in settings.data_roots]
    if not roots:
        raise InvalidJob(
            "schedule.latency_table", "this service reads no files of a job's naming (DG2PF_DATA_ROOTS is not set)"
        )
    if not Path(path).is_absolute():
        raise InvalidJob("schedule.latency_table", f"{path!r} must be an absolute path inside DG2PF_DATA_ROOTS")
    try:
        LatencyTable.read(path, roots)
    except DG2PFError as exc:
        raise InvalidJob("schedule.latency_table", exc.message) from exc


def _amp_refusal(config: DG2PFConfig, use_gpu: bool) -> str | None:
    if config.amp != "none" and not use_gpu:
        return (
            f"amp {config.amp!r} needs a GPU (mixed precision runs under CUDA autocast only): "
            "set resources.use_gpu: true, or amp: none"
        )
    return None


def validate_job(
    spec: JobSpec, settings: Settings, store: JobStore, capacity: Callable[[], tuple[float, float]]
) -> tuple[str, str | None]:
    """All checks; returns (checkpoint path, teacher path). ``capacity`` is asked last (it asks Ray):
    what the request alone shows wrong is refused even while the cluster does not answer."""
    try:
        config = DG2PFConfig.from_spec(spec)
    except DG2PFError as exc:
        raise InvalidJob(
            f"schedule.{exc.field}" if exc.field and exc.field != "sparsity" else "sparsity", exc.message
        ) from exc
    refusal = _amp_refusal(config, spec.resources.use_gpu)
    if refusal:
        raise InvalidJob("schedule.amp", refusal)
    if config.precision == "int8" and spec.serve and settings.serve_backend != "onnxruntime":
        # the int8 model runs on ONNX Runtime: deployed on torch it would be the fp32 model, silently
        raise InvalidJob(
            "serve",
            f"precision int8 with serve: true needs the onnxruntime serving backend (model.int8.onnx runs on ONNX "
            f"Runtime); this service serves with {settings.serve_backend!r} (DG2PF_SERVE_BACKEND): leave serve "
            "false and download model.int8.onnx, or run the service with DG2PF_SERVE_BACKEND=onnxruntime",
        )
    if config.max_top1_drop is not None and spec.tune is not None and spec.tune.search_space:
        raise InvalidJob(
            "tune.search_space",
            "max_top1_drop searches latency budgets itself: leave the search space out (tune.samples sets how "
            "many budgets)",
        )
    if spec.tune is not None and spec.tune.search_space:  # cheap: before any checkpoint is pinned
        from dg2pf_ray.search_space import build_space

        try:
            # The service's own rules hold for every value the space can give a trial, too.
            def service_rules(trial: DG2PFConfig) -> None:
                refusal = _amp_refusal(trial, spec.resources.use_gpu)
                if refusal:
                    raise ConfigError(refusal, field="amp")

            build_space(spec.tune.search_space, config, samples=spec.tune.samples, check=service_rules)
        except DG2PFError as exc:
            raise InvalidJob("tune.search_space", exc.message) from exc
    checkpoint = resolve_checkpoint(spec.model.checkpoint, "model.checkpoint", settings, store)
    teacher = resolve_checkpoint(spec.teacher, "teacher", settings, store) if spec.teacher else None
    for field, ref, path in (
        ("model.checkpoint", spec.model.checkpoint, checkpoint),
        ("teacher", spec.teacher, teacher),
    ):
        if path is not None and (spec.model.arch == "hf") != Path(path).is_dir():
            raise InvalidJob(
                field,
                f"arch hf takes a Hugging Face model directory, and {ref!r} is a weights file: upload the directory "
                "(dg2pf upload DIR zips it) or name the directory under DG2PF_DATA_ROOTS"
                if spec.model.arch == "hf"
                else f"{ref!r} is a Hugging Face model directory: its arch is hf",
            )
    check_dataset(spec.dataset.spec, settings)
    if config.latency_table is not None:
        check_latency_table(config.latency_table, settings)
    # What the preflight can check here (the checkpoints by content, finite, fitting the architecture;
    # fp16 compact values); the data and the dry run are checked by the job's runner before training.
    try:
        check_static(
            PruneJob.from_spec(spec, checkpoint, teacher, [str(r) for r in settings.data_roots]),
            meta=True,
            max_params=settings.max_model_params,
        )
    except DG2PFError as exc:
        teacher_file = teacher is not None and teacher in exc.message
        where = {
            "arch": "model.arch",
            "num_classes": "model.num_classes",
            "compact_values": "compact_values",
            "sparsity": "sparsity",
            "checkpoint_key": "teacher" if teacher_file else "model.checkpoint_key",
        }.get(exc.field or "", "teacher" if teacher_file else "model.checkpoint")
        if exc.field in _SCHEDULE_FIELDS:  # a schedule option that does not fit this model (N:M, include/exclude)
            where = f"schedule.{exc.field}"
        # The client named the checkpoints; where the store keeps them is none of its business.
        message = exc.message.replace(checkpoint, spec.model.checkpoint)
        if where == "model.checkpoint_key":  # the spec's field, not the command line's option
            message = message.replace(" (JobSpec: model.checkpoint_key)", "").replace(
                "--checkpoint-key ", "model.checkpoint_key "
            )
        if teacher is not None and spec.teacher is not None:
            message = message.replace(teacher, spec.teacher)
        raise InvalidJob(where, message) from exc
    try:
        cpus, gpus = capacity()
    except Exception as exc:  # noqa: BLE001 - Ray does not answer (restarting, unreachable)
        raise InvalidJob(
            "resources",
            f"the Ray cluster does not answer now ({type(exc).__name__}), so this job's resources "
            "cannot be checked; nothing was created: submit it again shortly (GET /readyz says when Ray is back)",
            status=503,
        ) from exc
    workers = spec.resources.num_workers
    if spec.resources.use_gpu and workers > gpus:
        raise InvalidJob(
            "resources.num_workers",
            f"{workers} GPU workers cannot be placed: the Ray cluster has {gpus:g} GPUs for jobs "
            "(those held by serving replicas excluded; "
            "DG2PF_CLUSTER_MAX_GPUS declares what an autoscaling cluster can grow to)",
        )
    searched = spec.tune is not None or spec.schedule.max_top1_drop is not None  # trials on Ray Tune
    driver = TRIAL_DRIVER_CPU if searched else 0.0  # a Tune trial's driver, beside its workers
    if workers + driver > cpus:
        raise InvalidJob(
            "resources.num_workers",
            f"{workers} workers{' and a trial driver' if driver else ''} cannot be placed: the Ray cluster has "
            f"{cpus:g} CPUs for jobs "
            "(those held by serving replicas excluded; "
            "DG2PF_CLUSTER_MAX_CPUS declares what an autoscaling cluster can grow to)",
        )
    return checkpoint, teacher
