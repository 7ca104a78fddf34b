"""Container health checks with the standard library (python:3.11-slim has no curl or wget).

    python /app/deploy/docker/healthcheck.py head|worker|api|api-ready

head:      the GCS answers through the dashboard (/api/gcs_healthz on :8265) and this node's raylet
           answers through its dashboard agent (/api/local_raylet_healthz on :52365);
worker:    this node's raylet (/api/local_raylet_healthz);
api:       the API process is up (GET /healthz on DG2PF_PORT, default 8000);
api-ready: the API reaches its database and Ray (GET /readyz).

The Ray endpoints are the ones KubeRay's own probes use; Ray's dashboard serves them without the
cluster token even under RAY_AUTH_MODE=token. Exit status 0 = healthy, 1 = not.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

# No proxies: a container's HTTP(S)_PROXY must not route a health check elsewhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, ValueError):
        return 0, ""


def ray_ok(url: str) -> bool:
    status, body = get(url)
    return status == 200 and "success" in body


def check(role: str, host: str = "127.0.0.1") -> bool:
    dashboard = int(os.environ.get("RAY_DASHBOARD_PORT", "8265"))
    agent = int(os.environ.get("RAY_DASHBOARD_AGENT_LISTEN_PORT", "52365"))
    api = int(os.environ.get("DG2PF_PORT", "8000"))
    raylet = f"http://{host}:{agent}/api/local_raylet_healthz"
    if role == "head":
        return ray_ok(f"http://{host}:{dashboard}/api/gcs_healthz") and ray_ok(raylet)
    if role == "worker":
        return ray_ok(raylet)
    if role == "api":
        return get(f"http://{host}:{api}/healthz")[0] == 200
    if role == "api-ready":
        return get(f"http://{host}:{api}/readyz")[0] == 200
    raise SystemExit(f"usage: healthcheck.py head|worker|api|api-ready (got {role!r})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: healthcheck.py head|worker|api|api-ready")
    sys.exit(0 if check(sys.argv[1]) else 1)
