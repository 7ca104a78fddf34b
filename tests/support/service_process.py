"""A real dg2pf service process (uvicorn on a free port, embedded Ray head) for the API tests.

The API runs in a process group of its own, as a terminal or a service manager starts it, so tests
can stop it the way the world does: ``signal_group`` sends Ctrl-C (SIGINT), SIGTERM or SIGKILL to
the whole group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dg2pf_service.cluster import free_port, head_record


class ServiceProcess:
    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir, self.env = data_dir, env
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"service-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> ServiceProcess:
        env = {**os.environ, "DG2PF_DATA_DIR": str(self.data_dir), "DG2PF_POLL_SECONDS": "0.3", **self.env}
        env.pop("RAY_ADDRESS", None)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dg2pf_service", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"service did not come up in {timeout} s")

    def signal_group(self, sig: int, timeout: float = 60) -> int:
        """Send ``sig`` to the API's whole process group (as Ctrl-C or a service manager does); wait for
        the API to exit and return its exit status."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the API process dies without any clean-up, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def head(self):
        from dg2pf_service.cluster import ClusterInfo

        record = head_record(self.data_dir)
        return ClusterInfo(**json.loads(record.read_text())) if record.exists() else None

    def stop(self) -> None:
        self.kill()
        head = self.head()
        if head is not None:
            from dg2pf_service.cluster import stop_embedded

            stop_embedded(head, grace_seconds=1.0)  # the API was killed: nothing waits for a clean exit
