"""The Ray cluster the service runs jobs on: found by address, or started next to the service.

Jobs must outlive the API process, so the embedded default is a Ray head started as its own
process (``ray start --head``) in a session of its own: Ctrl-C, SIGTERM or SIGKILL sent to the API's
process group does not reach it, and a restarted API re-attaches to it. ``dg2pf cluster stop``
stops it on purpose. Should the head itself die, ``Cluster.ensure`` starts a new one and the
scheduler resubmits the jobs it lost.

The API process talks to Ray only over HTTP (the dashboard's Jobs, State and Serve APIs) and is
never a Ray driver: a Ray driver exits 60 s after its GCS is gone, which would take the API down
with a lost head. Ray 2.60 clusters demand a token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``): the service sends it with every request, never disabling auth.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dg2pf_core.errors import DG2PFError

from .processes import descendants, kill_processes, process_table

SERVICE_SECRETS = ("DG2PF_API_TOKENS", "DG2PF_DATABASE_URL")
# Under a service's data directory: the embedded head's state folder, and in it the head's record (its ports).
RAY_STATE = "ray-state"
HEAD_RECORD = "ray-head.json"


def ray_state_dir(data_dir: Path) -> Path:
    return data_dir / RAY_STATE


def head_record(data_dir: Path) -> Path:
    """Where a data directory's embedded head is recorded."""
    return ray_state_dir(data_dir) / HEAD_RECORD


def ray_cli() -> str:
    """The ``ray`` command of this installation (next to the running interpreter)."""
    return str(Path(sys.executable).parent / "ray")


def node_env() -> dict[str, str]:
    """The environment for a Ray node this process starts: every process of the node inherits it,
    so the service's secrets are left out."""
    return {k: v for k, v in os.environ.items() if k not in SERVICE_SECRETS}


class ClusterUnavailable(DG2PFError):
    field = "ray"


@dataclass(frozen=True)
class ClusterInfo:
    gcs_address: str
    dashboard_url: str
    embedded: bool


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all are held open until every one is chosen (one at a time, the
    kernel may hand out the same port twice, and Ray refuses a node whose components share a port)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# Every listening port of a Ray node, set explicitly: a second Ray on the machine (another service, a
# test cluster, a second node) otherwise takes the same default agent ports and that node's job agent
# never comes up.
NODE_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def node_ports(extra: tuple[str, ...] = ()) -> dict[str, int]:
    """``ray start`` flag name -> a distinct free port, for every port of a node (and ``extra``)."""
    names = NODE_PORT_FLAGS + extra
    return dict(zip(names, free_ports(len(names))))


def auth_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_up(url: str) -> bool:
    """The dashboard answers and its job agent is registered (job submission would otherwise fail)."""
    import httpx

    try:
        version = httpx.get(f"{url}/api/version", headers=auth_headers(), timeout=2)
        jobs = httpx.get(f"{url}/api/jobs/", headers=auth_headers(), timeout=5)
        return version.status_code < 500 and jobs.status_code < 500
    except httpx.HTTPError:
        return False


def ensure_auth_token() -> None:
    """Make sure a Ray token exists: Ray's own ``ray get-auth-token --generate`` writes
    ``~/.ray/auth_token`` (only when none exists) on a machine that never ran a token-auth cluster."""
    if auth_token() is not None:
        return
    proc = subprocess.run([ray_cli(), "get-auth-token", "--generate"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or auth_token() is None:
        raise ClusterUnavailable(
            f"could not create a Ray auth token (ray get-auth-token --generate): {proc.stderr.strip()[-300:]}"
        )


STARTUP_S = 60.0  # how long a starting head's dashboard is given to answer


def ray_temp_dir(state_dir: Path) -> Path:
    """The embedded head's own Ray temp directory (short: Ray's sockets live under it, and a Unix socket
    path holds at most 107 bytes). Ray records "the current cluster" there, and its job supervisor finds
    the address it hands each job ("auto" discovery) there: in the default /tmp/ray, shared by every Ray
    on the machine, a job could be given another head's address (the one started last)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"dg2pf-ray-{digest}"


def _wait_for_dashboard(info: ClusterInfo, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not dashboard_up(info.dashboard_url):
        if time.time() > deadline:
            return False
        time.sleep(0.5)
    return True


def start_embedded(state_dir: Path, num_cpus: int | None = None, *, replace_unresponsive: bool = False) -> ClusterInfo:
    """Reuse the head this data directory started before (if alive), else start one.

    The head's record (``state_dir/ray-head.json``, its ports) is written *before* ``ray start`` runs,
    so a head is never left without one (an API killed while the head starts): a recorded head whose
    GCS process runs but whose dashboard does not answer yet is waited for (``STARTUP_S``), unless
    ``replace_unresponsive``; one that is gone is cleared away (its leftover processes stopped) and a
    new head started.
    """
    ensure_auth_token()
    record = state_dir / HEAD_RECORD
    if record.exists():
        try:
            info = ClusterInfo(**json.loads(record.read_text()))
        except (ValueError, TypeError):
            info = None
        if info is not None:
            if dashboard_up(info.dashboard_url):
                return info
            if not replace_unresponsive and gcs_process_alive(info) and _wait_for_dashboard(info, STARTUP_S):
                return info
            stop_embedded(info, grace_seconds=2.0)  # whatever is left of it
        record.unlink(missing_ok=True)
    ports = node_ports(("port", "dashboard-port", "ray-client-server-port"))
    gcs_port, dash_port = ports["port"], ports["dashboard-port"]
    info = ClusterInfo(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", True)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(info.__dict__))
    os.replace(tmp, record)
    cmd = [
        ray_cli(),
        "start",
        "--head",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={ray_temp_dir(state_dir)}",
        "--disable-usage-stats",
        "--include-dashboard=true",
        *[f"--{k}={v}" for k, v in ports.items()],
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # A session of its own: signals to the API's process group (Ctrl-C, a service manager's stop)
    # leave the head and its jobs running.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=node_env(), start_new_session=True)
    if proc.returncode != 0:
        stop_embedded(info, grace_seconds=2.0)
        record.unlink(missing_ok=True)
        raise ClusterUnavailable(f"could not start a local Ray head: {proc.stderr.strip()[-1500:]}")
    if not _wait_for_dashboard(info, STARTUP_S):
        stop_embedded(info, grace_seconds=2.0)
        record.unlink(missing_ok=True)
        raise ClusterUnavailable(f"the local Ray dashboard at {info.dashboard_url} did not come up in {STARTUP_S:g} s")
    return info


def head_pids(port: str) -> list[int]:
    """The head's daemons (their command lines name its GCS port) and all their descendants
    (Ray workers: Serve replicas, job supervisors and drivers), which would otherwise linger."""
    # The port as a whole number (":6379" must not match ":63790"): an address "host:PORT", or one of
    # the flags Ray's daemons get it with.
    named = re.compile(rf"(?:[\w.\]-]:|--port=|gcs_server_port=|--gcs-port=){re.escape(str(port))}(?!\d)")
    table = process_table()
    roots = {pid for pid, (_, cmd) in table.items() if "ray" in cmd and named.search(cmd)}
    return descendants(roots, table)


def stop_embedded(info: ClusterInfo, grace_seconds: float = 10.0) -> None:
    """Stop only the head this service started (matched by its GCS port), not other Ray instances:
    SIGTERM, then SIGKILL for whatever is still alive after ``grace_seconds``."""
    # Found once: after SIGTERM the workers are re-parented to init and no longer look like ours.
    port = info.gcs_address.rsplit(":", 1)[1]
    kill_processes(head_pids(port), grace_seconds)
    forget_current_cluster(port)


def forget_current_cluster(port: str) -> None:
    """Do what ``ray stop`` does for the head on ``port``: remove Ray's record of the last started
    cluster (``<ray temp dir>/ray_current_cluster``) when it names that head. Ray processes that look
    up "the current cluster" without an address (Ray Train's placement-group cleaner does, through the
    state API) would otherwise keep trying to reach the dead head, even from another Ray instance."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        if path.read_text().strip().rsplit(":", 1)[-1] == port:
            path.unlink()
    except OSError:
        pass


def gcs_process_alive(info: ClusterInfo) -> bool:
    """The head's GCS server process still runs on this machine (an embedded head)."""
    port = info.gcs_address.rsplit(":", 1)[1]
    return any("gcs_server" in cmd and f"gcs_server_port={port}" in cmd for _, cmd in process_table().values())


def cluster_resources(dashboard_url: str, timeout: float = 10.0) -> dict[str, float]:
    """Total resources of the cluster's alive nodes, from the dashboard's State API."""
    import httpx

    r = httpx.get(
        f"{dashboard_url.rstrip('/')}/api/v0/nodes",
        params={"detail": "true", "limit": 10000},
        headers=auth_headers(),
        timeout=timeout,
    )
    r.raise_for_status()
    total: dict[str, float] = {}
    for node in r.json()["data"]["result"]["result"]:
        if node.get("state") == "ALIVE":
            for key, value in (node.get("resources_total") or {}).items():
                total[key] = total.get(key, 0.0) + float(value)
    return total


class Cluster:
    """The cluster as the API sees it: where it is, whether it answers, what it has; an embedded head
    that is gone is started again by ``ensure``."""

    # An embedded head whose GCS process still runs but whose dashboard does not answer (a busy
    # machine) is given this long before it is replaced.
    UNRESPONSIVE_S = 60.0

    def __init__(self, state_dir: Path, address: str | None = None, dashboard_url: str | None = None) -> None:
        self.state_dir = state_dir
        self.embedded = address is None
        self.info = ClusterInfo(address, dashboard_url or "", False) if address else None  # type: ignore[arg-type]
        self.restarts = 0
        self._down_since: float | None = None

    @classmethod
    def attached(cls, state_dir: Path, info: ClusterInfo) -> Cluster:
        """The embedded head ``info`` as started earlier (read from its record)."""
        cluster = cls(state_dir)
        cluster.info = info
        return cluster

    @property
    def record(self) -> Path:
        return self.state_dir / HEAD_RECORD

    def start(self) -> ClusterInfo:
        """Attach to the embedded head this data directory started (if it answers), else start one."""
        if self.embedded:
            self.info = start_embedded(self.state_dir)
        return self.info

    @property
    def dashboard_url(self) -> str:
        return self.info.dashboard_url

    def answers(self) -> bool:
        return self.info is not None and dashboard_up(self.info.dashboard_url)

    def ensure(self) -> bool:
        """True when the cluster answers. An embedded head that does not is replaced by a new one
        (at once when its GCS process is gone, after ``UNRESPONSIVE_S`` when it only does not answer);
        ``restarts`` counts the replacements."""
        if self.answers():
            self._down_since = None
            return True
        if not self.embedded:
            return False
        now = time.monotonic()
        self._down_since = self._down_since or now
        if self.info is not None and gcs_process_alive(self.info) and now - self._down_since < self.UNRESPONSIVE_S:
            return False
        # start_embedded stops whatever is left of the recorded head first.
        self.info = start_embedded(self.state_dir, replace_unresponsive=True)
        self.restarts += 1
        self._down_since = None
        return True

    def resources(self) -> dict[str, float]:
        return cluster_resources(self.info.dashboard_url)
