"""What every benchmark records beside its figures: the machine, the software, the command.

The bench scripts import this as a sibling module (``python bench/<name>.py`` puts ``bench/`` on
``sys.path``). Results go to ``bench/results/<name>.json`` (git-ignored) and a Markdown table to stdout.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dg2pf_core.io.latency import cpu_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    return cpu_name()


def _busy_cpu_seconds() -> float:
    """CPU time spent busy by the whole machine since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Contention:
    """How much CPU other processes took while a benchmark ran (these machines are shared).

    ``other_share`` is the other processes' CPU time over the run's wall time x cores: 0 on a quiet
    machine; 0.5 on 2 cores means another process kept one core busy throughout.
    """

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()

    def result(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        busy, own = _busy_cpu_seconds() - self.busy0, _own_cpu_seconds() - self.own0
        other = max(busy - own, 0.0)
        return {
            "wall_s": wall,
            "own_cpu_s": own,
            "other_cpu_s": other,
            "other_share": other / (wall * (os.cpu_count() or 1)),
            "loadavg_1min_end": os.getloadavg()[0],
        }


class ProcessTreeContention(Contention):
    """``Contention`` for runs that start processes the driver never waits for (Ray's raylet, GCS,
    train workers): a background thread samples the CPU time of every descendant of this process
    from ``/proc/<pid>/stat`` every ``interval`` seconds, and those count as our own CPU time.

    A descendant that lives and dies between two samples, or the CPU a process spends after its
    last sample, is missed and so counted as *other* processes' time: the share errs high
    (toward "shared"), never toward "quiet".
    """

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self._tick = os.sysconf("SC_CLK_TCK")
        self._me = os.getpid()
        self._start: dict[int, float] = self._tree_cpu()  # CPU already spent before the run
        self._last: dict[int, float] = dict(self._start)
        self._stop = threading.Event()
        self._interval = interval
        super().__init__()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree_cpu(self) -> dict[int, float]:
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # after "(comm)": state ppid ... utime stime (fields 14-15 of proc(5)). Not cutime/cstime:
            # a reaped child's time would then count twice (its last sample + its parent's cutime).
            pid = int(entry)
            parent[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / self._tick
        mine: dict[int, float] = {}
        for pid in cpu:
            p, hops = pid, 0
            while p not in (0, 1) and hops < 64:
                if p == self._me:
                    mine[pid] = cpu[pid]
                    break
                p, hops = parent.get(p, 0), hops + 1
        return mine

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._last.update(self._tree_cpu())

    def _own_seconds(self) -> float:
        self._last.update(self._tree_cpu())
        return sum(v - self._start.get(pid, 0.0) for pid, v in self._last.items())

    def result(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self.t0
        busy = _busy_cpu_seconds() - self.busy0
        own = self._own_seconds()
        other = max(busy - own, 0.0)
        return {
            "wall_s": wall,
            "own_cpu_s": own,
            "other_cpu_s": other,
            "other_share": other / (wall * (os.cpu_count() or 1)),
            "loadavg_1min_end": os.getloadavg()[0],
            "own_processes_seen": len(self._last),
        }


def contention_line(c: dict[str, float]) -> str:
    # A few percent is the machine's own background (kernel threads, services) and our start-up.
    note = "quiet" if c["other_share"] < 0.10 else "SHARED: other processes competed for the CPU, figures are noisier"
    return (
        f"- other processes used {c['other_cpu_s']:.1f} CPU-s during these {c['wall_s']:.0f} s "
        f"({100 * c['other_share']:.0f}% of the machine): {note}"
    )


def environment(device: torch.device | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": str(device) if device is not None else "cpu",
    }
    if device is not None and device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def environment_lines(env: dict[str, Any]) -> str:
    lines = [
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, {env['torch_threads']} intra-op threads "
        f"({env['torch_interop_threads']} inter-op), Python {env['python']}",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} logical cores)",
        f"- device: {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else ""),
        f"- date (UTC): {env['date_utc']}",
    ]
    return "\n".join(lines)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def update_docs(docs: Path, name: str, heading: str, block: str) -> None:
    """Put ``block`` between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``docs``, or append
    it under ``heading`` when the markers are not there yet."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = docs.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + block + "\n" + end + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{begin}\n{block}\n{end}\n"
    docs.write_text(text)
