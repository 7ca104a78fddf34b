"""A job runner's lifeline: the runner stops within seconds once what supervises it is gone.

Ray runs a job's entrypoint in a session of its own, so when the Ray job supervisor (an actor of the
head) or the whole head dies, nothing signals the runner: it would go on training as an orphan,
holding a CPU the scheduler counts as free and writing progress for a job already resubmitted. The
lifeline is a daemon thread that watches

- the runner's ancestors up to its Ray job supervisor (``ray::JobSupervisor``), by pid and start
  time (a recycled pid is not mistaken for the parent); and
- the Ray GCS the job belongs to (``RAY_ADDRESS``, set by Ray for every job driver): a GCS that
  refuses connections for ``gcs_grace_s`` means the cluster is gone;

and, when either is lost, kills the runner's whole process group (the runner, its data-loader
workers and the shell Ray started it with). Linux only (it reads ``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

SUPERVISOR_MARK = "JobSupervisor"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def supervising_ancestors(pid: int | None = None, max_depth: int = 4) -> list[tuple[int, int]]:
    """(pid, start time) of this process's ancestors up to and including its Ray job supervisor;
    empty when no supervisor is found within ``max_depth`` (not a Ray job: run by hand, in a test)."""
    chain: list[tuple[int, int]] = []
    current = os.getpid() if pid is None else pid
    for _ in range(max_depth):
        stat = _stat(current)
        if stat is None or stat[0] <= 1:
            break
        parent = stat[0]
        parent_stat = _stat(parent)
        if parent_stat is None:
            break
        chain.append((parent, parent_stat[1]))
        if SUPERVISOR_MARK in _cmdline(parent):
            return chain
        current = parent
    return []


def _alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == started


def _gcs_refuses(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return False
    except (OSError, ValueError):
        return True


class Lifeline(threading.Thread):
    def __init__(
        self, gcs_address: str | None = None, poll_s: float = 1.0, gcs_grace_s: float = 15.0, on_lost=None
    ) -> None:
        super().__init__(name="dg2pf-lifeline", daemon=True)
        self.ancestors = supervising_ancestors() if sys.platform.startswith("linux") else []
        self.gcs_address = gcs_address if gcs_address and ":" in gcs_address else None
        self.poll_s, self.gcs_grace_s = poll_s, gcs_grace_s
        self.on_lost = on_lost or _kill_own_group

    def lost(self) -> str | None:
        """Why the runner must stop now, or None."""
        for pid, started in self.ancestors:
            if not _alive(pid, started):
                return f"its supervising process {pid} is gone (Ray job supervisor or head lost)"
        return None

    def run(self) -> None:
        refused_since: float | None = None
        while True:
            reason = self.lost()
            if reason is None and self.gcs_address is not None:
                if _gcs_refuses(self.gcs_address):
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since >= self.gcs_grace_s:
                        reason = (
                            f"the Ray cluster's GCS at {self.gcs_address} has refused connections "
                            f"for {self.gcs_grace_s:g} s"
                        )
                else:
                    refused_since = None
            if reason is not None:
                self.on_lost(reason)
                return
            time.sleep(self.poll_s)


def _kill_own_group(reason: str) -> None:
    print(f"dg2pf runner: stopping: {reason}", file=sys.stderr, flush=True)
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(137)


def start_lifeline() -> Lifeline | None:
    """Start the lifeline when this process runs as a Ray job's entrypoint (Linux); None otherwise."""
    if not sys.platform.startswith("linux"):
        return None
    line = Lifeline(os.environ.get("RAY_ADDRESS"))
    if not line.ancestors:
        return None
    line.start()
    return line
