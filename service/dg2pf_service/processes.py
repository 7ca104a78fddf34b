"""Processes on this machine: the table of them, a process tree, and killing a set of them.

A job's processes are found by its job directory in their command lines (the runner is started as
``python -m dg2pf_service.runner JOB_DIR``; its data-loader workers inherit that command line), so
the service can make sure none outlives the job, whatever ended it. Only this machine's processes
are seen: on a multi-node cluster Ray itself stops a job's processes on other nodes (a job's Ray
Train workers are actors owned by its runner and die with it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_table() -> dict[int, tuple[int, str]]:
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
    table = process_table() if table is None else table
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return sorted(found)


def kill_processes(pids: list[int], grace_seconds: float = 10.0) -> None:
    """SIGTERM ``pids`` (SIGKILL at once when ``grace_seconds`` is 0), then SIGKILL what is left."""
    for sig_ in (15, 9) if grace_seconds > 0 else (9,):
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


RUNNER = "dg2pf_service.runner"


def job_processes(job_dir: str | Path) -> list[int]:
    """Pids of this machine's runner processes of ``job_dir`` (a command line naming the runner
    module and the directory) and all their descendants (data-loader workers)."""
    mark = str(job_dir).rstrip("/")
    table = process_table()
    own = os.getpid()
    roots = {pid for pid, (_, cmd) in table.items() if pid != own and RUNNER in cmd and _names(cmd, mark)}
    return [p for p in descendants(roots, table) if p != own] if roots else []


def _names(cmd: str, mark: str) -> bool:
    at = cmd.find(mark)
    while at >= 0:
        end = at + len(mark)
        if end == len(cmd) or cmd[end] in " /'\"":
            return True
        at = cmd.find(mark, end)
    return False


def kill_job_processes(job_dir: str | Path, grace_seconds: float = 3.0) -> list[int]:
    """Stop every process of the job on this machine (SIGTERM, SIGKILL after ``grace_seconds``);
    returns the pids that were found."""
    pids = job_processes(job_dir)
    if pids:
        kill_processes(pids, grace_seconds)
    return pids
