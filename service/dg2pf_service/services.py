"""The service's composition root: settings, store, cluster, executor and scheduler, built once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from alembic.util.exc import CommandError as AlembicError
from sqlalchemy.exc import SQLAlchemyError

from dg2pf_contract.job import JobSpec
from dg2pf_core.errors import DG2PFError

from .cluster import Cluster, ray_state_dir
from .executor import RayJobsExecutor, output_dir
from .runner import JobFile
from .scheduler import Scheduler
from .serving.deploy import Deployments
from .serving.options import ServeOptions
from .serving.supervisor import ServingSupervisor
from .settings import Settings
from .store.db import DatabaseURLError, make_engine, make_sessionmaker, redact_url
from .store.migrate import upgrade
from .store.repo import JobStore
from .tracking import MlflowTracking
from .uploads import clean_partial_uploads

log = logging.getLogger("dg2pf.service")


@dataclass
class Services:
    settings: Settings
    store: JobStore
    cluster: Cluster
    executor: RayJobsExecutor
    scheduler: Scheduler
    serving: ServingSupervisor
    deployments: Deployments
    tracking: MlflowTracking | None = None  # DG2PF_MLFLOW_TRACKING_URI

    def capacity(self) -> tuple[float, float]:
        """CPUs and GPUs jobs can count on: the cluster's (or what it can scale up to, when set), less
        what serving replicas may hold."""
        r, s = self.cluster.resources(), self.settings
        cpu = max(float(r.get("CPU", 0.0)), s.cluster_max_cpus or 0.0)
        gpu = max(float(r.get("GPU", 0.0)), s.cluster_max_gpus or 0.0)
        if self.store.list_deployments():
            cpu -= self.serving.options.reserved_cpus
            gpu -= self.serving.options.reserved_gpus
        return max(cpu, 0.0), max(gpu, 0.0)

    def on_succeeded(self, row) -> None:
        """Deploy a job that asked for it (``serve: true``) as soon as it succeeds."""
        if row.spec["spec"].get("serve"):
            self.deployments.deploy(row.id)

    def public_serve_url(self) -> str:
        return self.settings.serve_public_url or self.serving.url


def cluster_for(settings: Settings) -> Cluster:
    """The configured cluster (``ray_address``), or the embedded head of this data directory."""
    state_dir = ray_state_dir(settings.data_dir)
    if settings.ray_address:
        host = urlparse(f"//{settings.ray_address.removeprefix('ray://')}").hostname or "127.0.0.1"
        dashboard = settings.ray_dashboard_url or f"http://{host}:8265"
        return Cluster(state_dir, settings.ray_address, dashboard)
    return Cluster(state_dir)


class StartupError(DG2PFError):
    """A setting the service cannot start with; the message names the variable and the cause."""


def _cause(exc: BaseException) -> str:
    """What went wrong, in one line: the driver's own message under SQLAlchemy's, an OSError's text and file."""
    inner = getattr(exc, "orig", None) or exc
    if isinstance(inner, OSError) and inner.strerror:
        return f"{inner.strerror}" + (f": {inner.filename}" if inner.filename else "")
    text = " ".join(str(inner).split())
    return text[:300] or type(inner).__name__


def _open_store(settings: Settings) -> JobStore:
    """The job store, its schema upgraded; ``StartupError`` naming the setting when the database cannot be used."""
    setting = "DG2PF_DATABASE_URL" if settings.database_url else "DG2PF_DATA_DIR (its default SQLite database)"
    shown = redact_url(settings.db_url)  # parsable or not, the password hidden
    try:
        upgrade(settings.db_url)
        return JobStore(make_sessionmaker(make_engine(settings.db_url)))
    except DatabaseURLError as exc:
        raise StartupError(f"{setting}: {exc}", field="database_url") from None
    except ImportError as exc:  # a backend whose driver is not installed (mysql://, ...)
        raise StartupError(
            f"{setting} ({shown}): no driver for this database is installed ({exc.name or exc}); dg2pf "
            "stores jobs in SQLite or PostgreSQL (postgresql+psycopg2://...)",
            field="database_url",
        ) from None
    except (OSError, SQLAlchemyError, AlembicError) as exc:
        raise StartupError(
            f"{setting} ({shown}): cannot open the database: {_cause(exc)}", field="database_url"
        ) from None


def build(settings: Settings) -> Services:
    """Every part of the service, each checked as it is made: a setting it cannot start with raises
    ``StartupError`` naming the variable, before the Ray cluster is started."""
    for d in (settings.data_dir, settings.checkpoints_dir, settings.jobs_dir):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"DG2PF_DATA_DIR ({settings.data_dir}): cannot create {d}: {_cause(exc)}", field="data_dir"
            ) from None
    for path in clean_partial_uploads(settings):
        log.info("removed %s: an upload or pinned checkpoint a stopped process left unfinished", path)
    store = _open_store(settings)
    cluster = cluster_for(settings)
    try:
        cluster.start()
    except DG2PFError as exc:
        setting = "DG2PF_RAY_ADDRESS" if settings.ray_address else "the embedded Ray head (DG2PF_DATA_DIR)"
        raise StartupError(f"{setting}: {exc.message}", field="ray_address") from None
    executor = RayJobsExecutor(cluster)
    storage = settings.storage_uri or str(settings.data_dir / "ray")

    def make_order(spec_doc: dict) -> JobFile:
        resolved = spec_doc["resolved"]
        return JobFile(
            spec=JobSpec.model_validate(spec_doc["spec"]),
            checkpoint=resolved["checkpoint"],
            teacher=resolved.get("teacher"),
            data_roots=[str(r) for r in settings.data_roots],
            storage_path=storage,
            worker_start_timeout_s=settings.worker_start_timeout_s,
            cluster_may_grow=settings.cluster_max_cpus is not None or settings.cluster_max_gpus is not None,
        )

    serving = ServingSupervisor(
        ServeOptions.from_settings(settings),
        wanted=lambda: {d.model_id: d.output_dir for d in store.list_deployments()},
        dashboard_url=lambda: cluster.dashboard_url,
    )
    deployments = Deployments(store, serving, lambda row: output_dir(Path(row.artifacts_dir)))
    services = Services(settings, store, cluster, executor, None, serving, deployments)  # type: ignore[arg-type]
    services.scheduler = Scheduler(
        store,
        executor,
        cluster,
        services.capacity,
        make_order,
        jobs_dir=settings.jobs_dir,
        on_succeeded=services.on_succeeded,
        max_restarts=settings.job_max_restarts,
        cluster_lost_timeout_s=settings.cluster_lost_timeout_s,
    )
    if settings.mlflow_tracking_uri:
        services.tracking = MlflowTracking(
            settings.mlflow_tracking_uri, store, settings.mlflow_experiment, settings.mlflow_artifact_location
        )
    return services


__all__ = ["DG2PFError", "Services", "StartupError", "build"]
