"""What survives what, and stopping the embedded cluster on purpose.

- The API process holds a shared lock on ``DATA_DIR/api.lock`` while it runs (released by the kernel
  however it ends). Stopping the API (Ctrl-C, SIGTERM, SIGKILL of its process group) leaves the
  embedded Ray head and every job running; ``dg2pf serve`` started again re-attaches to them.
- ``dg2pf cluster stop`` (``stop_cluster``) stops the embedded head on purpose: it refuses while an
  API holds the data directory, cancels the running jobs (recorded as ``cancelled``, their processes
  stopped), then stops only this data directory's head (other Ray instances on the machine are left
  alone, unlike ``ray stop``). Queued jobs stay queued and run when the service starts again.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dg2pf_core.errors import DG2PFError

from .cluster import RAY_STATE, ClusterInfo, dashboard_up, head_pids, head_record, ray_state_dir, stop_embedded
from .processes import kill_job_processes
from .settings import Settings

LOCK = "api.lock"


class DataDirInUse(DG2PFError):
    field = "data_dir"


class DataDirHold:
    """The running API's hold on its data directory (``DATA_DIR/api.lock``, holder pids inside).

    Exclusive for an API with an embedded head: a second API on the same data directory would restart
    a lost head too and resubmit the same jobs (two heads, jobs killed by each other). Shared for an
    API on an external cluster, where several may run (job resubmissions are compare-and-set in the
    database, so only one of them resubmits a job). Raises ``DataDirInUse`` when it cannot be taken.
    """

    def __init__(self, data_dir: Path, exclusive: bool = True) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LOCK
        self._fh = open(self.path, "a+")  # noqa: SIM115 - held for the process's lifetime
        try:
            fcntl.flock(self._fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            pids = [p for p in self._fh.read().split() if p.isdigit() and Path(f"/proc/{p}").exists()]
            self._fh.close()
            raise DataDirInUse(
                f"another dg2pf API (pid {', '.join(pids) or '?'}) is using {data_dir} with its embedded "
                "Ray head; stop it first, or give this one its own DG2PF_DATA_DIR"
            ) from None
        if exclusive:
            self._fh.seek(0)
            self._fh.truncate()
        self._fh.write(f"{os.getpid()}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


def api_holders(data_dir: Path) -> list[int] | None:
    """None when no API holds ``data_dir``; else the pids that recorded a hold (some may be stale)."""
    path = data_dir / LOCK
    if not path.exists():
        return None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pids = [int(p) for p in fh.read().split() if p.isdigit()]
            return [p for p in pids if Path(f"/proc/{p}").exists()] or pids
        fh.seek(0)
        fh.truncate()  # nobody holds it: forget the pids of APIs that have ended
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def check_data_dir(settings: Settings) -> None:
    """``settings.data_dir`` is a service's data directory (so status and stop never create one)."""
    d = settings.data_dir
    if not d.is_dir() or not any((d / name).exists() for name in (RAY_STATE, "dg2pf.db", "jobs", LOCK)):
        raise DG2PFError(
            f"{d} is not a dg2pf service's data directory (no ray-state/, jobs/ or dg2pf.db there); give "
            "the service's DG2PF_DATA_DIR with --data-dir",
            field="data_dir",
        )


def embedded_head(settings: Settings) -> ClusterInfo | None:
    """The embedded head this data directory started (alive or not), from its record."""
    record = head_record(settings.data_dir)
    if not record.exists():
        return None
    return ClusterInfo(**json.loads(record.read_text()))


@dataclass
class ClusterReport:
    head: ClusterInfo | None
    answers: bool
    processes: int
    api_pids: list[int] | None
    data_dir: Path = Path(".")
    running_jobs: list[str] = field(default_factory=list)
    queued_jobs: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.head is None:
            return [
                f"data directory {self.data_dir}: no embedded Ray head recorded",
                f"jobs: {len(self.running_jobs)} running, {len(self.queued_jobs)} queued",
            ]
        state = "answers" if self.answers else ("does not answer" if self.processes else "is not running")
        out = [
            f"data directory {self.data_dir}",
            f"embedded Ray head (GCS {self.head.gcs_address}, dashboard {self.head.dashboard_url}) {state}; "
            f"{self.processes} process(es)",
        ]
        out.append(f"API: running (pid {', '.join(map(str, self.api_pids))})" if self.api_pids else "API: not running")
        out.append(f"jobs: {len(self.running_jobs)} running, {len(self.queued_jobs)} queued")
        return out


def _store(settings: Settings):
    from .store.db import make_engine, make_sessionmaker
    from .store.migrate import upgrade
    from .store.repo import JobStore

    upgrade(settings.db_url)
    return JobStore(make_sessionmaker(make_engine(settings.db_url)))


def cluster_report(settings: Settings, store=None) -> ClusterReport:
    check_data_dir(settings)
    head = embedded_head(settings)
    store = store or _store(settings)
    return ClusterReport(
        head=head,
        answers=head is not None and dashboard_up(head.dashboard_url),
        processes=len(head_pids(head.gcs_address.rsplit(":", 1)[1])) if head else 0,
        api_pids=api_holders(settings.data_dir),
        data_dir=settings.data_dir,
        running_jobs=[r.id for r in store.active_jobs()],
        queued_jobs=[r.id for r in store.queued_in_order()],
    )


def stop_cluster(settings: Settings) -> list[str]:
    """Stop the embedded head on purpose; running jobs are cancelled first. Returns what was done,
    a line each. Raises ``DataDirInUse`` while an API holds the data directory."""
    if settings.ray_address:
        raise DG2PFError(
            f"this service uses the external Ray cluster at {settings.ray_address}; stop that cluster with "
            "the tools that started it (ray stop, KubeRay, docker compose)",
            field="ray_address",
        )
    check_data_dir(settings)
    holders = api_holders(settings.data_dir)
    if holders is not None:
        raise DataDirInUse(
            f"the dg2pf API (pid {', '.join(map(str, holders)) or '?'}) is using {settings.data_dir}: stop it "
            "first (Ctrl-C or SIGTERM), then run `dg2pf cluster stop` again"
        )
    store = _store(settings)
    head = embedded_head(settings)
    done: list[str] = []
    if head is not None and dashboard_up(head.dashboard_url):
        from .cluster import Cluster
        from .executor import RayJobsExecutor

        executor = RayJobsExecutor(Cluster.attached(ray_state_dir(settings.data_dir), head))
    else:
        executor = None
    now = datetime.now(UTC)
    for row in store.active_jobs():
        if executor is not None and row.ray_submission_id:
            executor.stop(row.ray_submission_id)
        store.transition(
            row.id,
            {"running"},
            "cancelled",
            finished_at=now,
            error_type="ClusterStopped",
            error_message="cancelled: the embedded Ray cluster was stopped with `dg2pf cluster stop`",
        )
        kill_job_processes(Path(row.artifacts_dir))
        done.append(f"cancelled running job {row.id}")
    if head is not None:
        processes = len(head_pids(head.gcs_address.rsplit(":", 1)[1]))
        stop_embedded(head)
        head_record(settings.data_dir).unlink(missing_ok=True)
        done.append(
            f"stopped the embedded Ray head (GCS {head.gcs_address}, {processes} processes)"
            if processes
            else f"the embedded Ray head (GCS {head.gcs_address}) was not running; its record is removed"
        )
    else:
        done.append(f"no embedded Ray head recorded in {settings.data_dir}")
    queued = store.queued_in_order()
    if queued:
        done.append(f"{len(queued)} queued job(s) stay queued: they run when `dg2pf serve` starts again")
    return done


def shutdown_message(services) -> str:
    """What the API leaves running as it stops, and how to stop that too."""
    cluster = services.cluster
    try:
        running = len(services.store.active_jobs())
        queued = len(services.store.queued_in_order())
    except Exception:  # noqa: BLE001 - the database may be what failed
        running = queued = -1
    jobs = f"{running} running and {queued} queued job(s)" if running >= 0 else "its jobs"
    if not cluster.embedded:
        return (
            f"dg2pf API stopped. The Ray cluster at {cluster.dashboard_url} keeps {jobs}; "
            "start the API again to follow them."
        )
    return (
        f"dg2pf API stopped. The embedded Ray head (dashboard {cluster.dashboard_url}) keeps running with {jobs}: "
        f"`dg2pf serve` with the same DG2PF_DATA_DIR ({services.settings.data_dir}) re-attaches to them; "
        "`dg2pf cluster stop` stops the head (running jobs are cancelled)."
    )
