"""The Ray cluster the service runs jobs on: found by address, or started next to the service.

Jobs must outlive the API process, so the embedded default is a Ray head started as its own
process (``ray start --head``), not a Ray tied to the API's lifetime. Ray 2.60 clusters demand a
token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``): the service sends
it to the Jobs API and enables token mode for its own driver connection, never disabling auth.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dg2pf_core.errors import DG2PFError


SERVICE_SECRETS = ("DG2PF_API_TOKENS", "DG2PF_DATABASE_URL")


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
NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                   "metrics-export-port", "runtime-env-agent-port")


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


def _dashboard_up(url: str) -> bool:
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
    proc = subprocess.run([ray_cli(), "get-auth-token", "--generate"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or auth_token() is None:
        raise ClusterUnavailable(f"could not create a Ray auth token (ray get-auth-token --generate): {proc.stderr.strip()[-300:]}")


def start_embedded(state_dir: Path, num_cpus: int | None = None) -> ClusterInfo:
    """Reuse the head this data directory started before (if alive), else start one."""
    ensure_auth_token()
    record = state_dir / "ray-head.json"
    if record.exists():
        info = ClusterInfo(**json.loads(record.read_text()))
        if _dashboard_up(info.dashboard_url):
            return info
    ports = node_ports(("port", "dashboard-port", "ray-client-server-port"))
    gcs_port, dash_port = ports["port"], ports["dashboard-port"]
    cmd = [ray_cli(), "start", "--head", "--dashboard-host=127.0.0.1",
           "--disable-usage-stats", "--include-dashboard=true", *[f"--{k}={v}" for k, v in ports.items()]]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=node_env())
    if proc.returncode != 0:
        raise ClusterUnavailable(f"could not start a local Ray head: {proc.stderr.strip()[-1500:]}")
    info = ClusterInfo(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", True)
    deadline = time.time() + 60
    while not _dashboard_up(info.dashboard_url):
        if time.time() > deadline:
            raise ClusterUnavailable(f"the local Ray dashboard at {info.dashboard_url} did not come up")
        time.sleep(0.5)
    state_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(info.__dict__))
    return info


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    table: dict[int, tuple[int, str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            table[int(proc.name)] = (int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]), cmd)
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """``roots`` and every process below them."""
    table = _process_table() if table is None else table
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return sorted(found)


def _head_pids(port: str) -> list[int]:
    """The head's daemons (their command lines name its GCS port) and all their descendants
    (Ray workers: Serve replicas, job supervisors and drivers), which would otherwise linger."""
    table = _process_table()
    roots = {pid for pid, (_, cmd) in table.items()
             if "ray" in cmd and (f":{port}" in cmd or f"--port={port}" in cmd or f"gcs_server_port={port}" in cmd)}
    return descendants(roots, table)


def stop_embedded(info: ClusterInfo, grace_seconds: float = 10.0) -> None:
    """Stop only the head this service started (matched by its GCS port), not other Ray instances:
    SIGTERM, then SIGKILL for whatever is still alive after ``grace_seconds``."""
    # Found once: after SIGTERM the workers are re-parented to init and no longer look like ours.
    port = info.gcs_address.rsplit(":", 1)[1]
    kill_processes(_head_pids(port), grace_seconds)
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


def kill_processes(pids: list[int], grace_seconds: float = 10.0) -> None:
    """SIGTERM ``pids`` (SIGKILL at once when ``grace_seconds`` is 0), then SIGKILL what is left."""
    for sig_ in ((15, 9) if grace_seconds > 0 else (9,)):
        for pid in pids:
            try:
                os.kill(pid, sig_)
            except OSError:
                pass
        deadline = time.time() + (grace_seconds if sig_ == 15 else 2.0)
        while pids and time.time() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
            time.sleep(0.2)
        if not pids:
            return


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.lower()
    except OSError:
        return "gone"
    return ""


def connect_driver(info: ClusterInfo) -> None:
    """Connect this process to the cluster (to read its resources)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=info.gcs_address, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as exc:
        raise ClusterUnavailable(f"cannot reach Ray at {info.gcs_address}: {exc}") from exc


def total_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
