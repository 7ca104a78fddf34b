"""One way to run a job, for the service's runner and for ``dg2pf prune`` / ``dg2pf tune`` alike: in this
process, on Ray Train's DDP workers, or as a Ray Tune search whose trials run on Ray Train."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dg2pf_contract.job import JobSpec
from dg2pf_contract.options import OBJECTIVE_SAMPLES
from dg2pf_contract.results import Metrics
from dg2pf_core.algorithm.loop import Progress
from dg2pf_core.job import PreparedJob, PruneJob, prune_to_dir


@dataclass(frozen=True)
class Engine:
    """Where a job runs. ``workers`` None: in this process (single-process, resumable from a state
    directory); N: Ray Train with N DDP workers, or N workers per trial when ``tune_samples`` is set."""

    workers: int | None = None
    use_gpu: bool = False
    placement: str = "pack"
    tune_samples: int | None = None  # a Ray Tune search of this many configurations
    objective: bool = False  # max_top1_drop: the search over latency budgets (dg2pf_ray/fastest.py)
    search_space: dict[str, Any] | str | None = (
        None  # option -> distribution (a document or its file); None: the default
    )
    max_concurrent: int | None = None
    grace_period: int = 2
    address: str | None = None
    storage_path: str | None = None
    run_name: str | None = None
    max_failures: int = 2
    cluster_may_grow: bool = False
    verbose: bool = False
    ray_logs: bool = True
    progress_path: str | None = None  # Ray Train: rank 0 appends a JSON line per epoch

    @classmethod
    def of(cls, spec: JobSpec, **how: Any) -> Engine:
        """What a spec's resources and tune section ask for: this process unless it asks for several
        workers, a GPU or a search. ``how``: the other fields (storage, run name, logs, ...)."""
        r = spec.resources
        objective = spec.schedule.max_top1_drop is not None
        on_ray = r.num_workers > 1 or r.use_gpu or spec.tune is not None or objective
        return cls(
            workers=r.num_workers if on_ray else None,
            use_gpu=r.use_gpu,
            placement=r.placement,
            tune_samples=spec.tune.samples if spec.tune else (OBJECTIVE_SAMPLES if objective else None),
            objective=objective,
            search_space=spec.tune.search_space if spec.tune else None,
            **how,
        )

    @property
    def in_process(self) -> bool:
        return self.workers is None

    def needs(self) -> tuple[float, float]:
        """(CPUs, GPUs) the job holds while it runs (one CPU for a run in its own process)."""
        workers = self.workers or 1
        return float(workers), float(workers) if self.use_gpu else 0.0

    def with_overrides(self, **changes: Any) -> Engine:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def execute(
    job: PruneJob,
    out: str | Path,
    engine: Engine,
    *,
    progress: Progress | None = None,
    on_prepared: Callable[[PreparedJob], None] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
) -> Metrics:
    """Run ``job`` as ``engine`` says and write its artifacts into ``out``; returns its metrics.
    ``progress``, ``on_prepared``, ``state_dir`` and ``resume`` apply to a run in this process (a Ray
    Train run resumes from its own checkpoints, under the same storage and run name)."""
    if engine.tune_samples is not None or job.config.max_top1_drop is not None:
        from .fastest import fastest_within
        from .tune import TuneOptions, tune_job

        search = fastest_within if job.config.max_top1_drop is not None else tune_job
        return search(
            job,
            out,
            TuneOptions(
                samples=engine.tune_samples or OBJECTIVE_SAMPLES,
                search_space=engine.search_space,
                workers_per_trial=engine.workers or 1,
                use_gpu=engine.use_gpu,
                placement=engine.placement,
                cluster_may_grow=engine.cluster_may_grow,
                address=engine.address,
                storage_path=engine.storage_path,
                max_concurrent=engine.max_concurrent,
                grace_period=engine.grace_period,
                run_name=engine.run_name,
                verbose=engine.verbose,
                ray_logs=engine.ray_logs,
            ),
        )
    if engine.workers is not None:
        from .train import RayOptions, prune_on_ray

        return prune_on_ray(
            job,
            out,
            RayOptions(
                workers=engine.workers,
                use_gpu=engine.use_gpu,
                address=engine.address,
                storage_path=engine.storage_path,
                max_failures=engine.max_failures,
                placement=engine.placement,
                cluster_may_grow=engine.cluster_may_grow,
                run_name=engine.run_name,
                verbose=engine.verbose,
                ray_logs=engine.ray_logs,
                progress_path=engine.progress_path,
            ),
        )
    return prune_to_dir(job, out, progress=progress, on_prepared=on_prepared, state_dir=state_dir, resume=resume)
