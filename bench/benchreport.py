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

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
