"""The dg2pf service over real HTTP: POST /jobs latency, queued -> running latency, end-to-end vs the CLI.

The script starts a real service process (``python -m dg2pf_service --port P``, as
``tests/support/service_process.py`` does) in a fresh temp data dir: SQLite store (the default), its
own embedded Ray head, ``DG2PF_POLL_SECONDS=0.2`` (the scheduler's tick: reconcile + dispatch).
``RAY_TMPDIR`` points at a private directory, so the head cannot be confused with another Ray on
this machine and its processes (which ``ray start`` detaches from us) can be counted as ours in the
CPU-contention figure. The digits example model (``dg2pf example digits``, or ``--example DIR``) is
uploaded once with ``POST /checkpoints``; every job refers to it by id.

1. **POST /jobs latency.** Two untimed POSTs, then one client alone (10 POSTs one after another;
   ``--quick``: 5) as the reference, then the burst: 20 client threads, each with its own
   ``httpx.Client``, released together by a barrier, each submit ``--jobs-per-client`` (5) valid
   jobs one after another (spec as in 3); the latency of each POST (request to 202) is recorded.
   Right after the burst every job is cancelled (``POST /jobs/{id}/cancel``, not in the figures),
   so none trains. The scheduler keeps ticking meanwhile and dispatches to Ray whatever fits
   (2 CPUs: at most 2 jobs at a time); how many it did is reported.
2. **queued -> running on a warm, idle cluster.** After one tiny job (``pruning_epochs 1,
   max_epochs 1``) has run to ``succeeded`` (warm-up), submit the same tiny job and poll
   ``GET /jobs/{id}`` every 50 ms from the 202 response until it shows ``running``; then wait for it
   to succeed and for its Ray driver to exit before the next repeat (5 repeats; ``--quick``: 2).
   "running" is set by the scheduler when it has submitted the job to Ray (Jobs API), i.e. before
   the job's driver process starts. Also reported: the server's own ``started_at - created_at``.
3. **End-to-end: service vs CLI.** ``digits_cnn`` on ``digits``, sparsity 0.9, ``pruning_epochs 3,
   max_epochs 6, patience 100`` (exactly 6 training epochs; checked): submit -> ``succeeded``
   through the service (client polls every 0.1 s) against the wall time of the same job run as
   ``dg2pf prune ... --pruning-epochs 3 --max-epochs 6 --patience 100 --quiet`` in a subprocess,
   once with torch's default threads and once with ``OMP_NUM_THREADS=1``, which is what Ray gives
   the service's job driver (``entrypoint_num_cpus=1``), so that the service's own overhead can be
   told apart from the thread count. Interleaved (service, cli, cli1, service, ...; ``--repeats``
   rounds, default 2; ``--quick``: 1), medians and the ratios service / cli. Per service run the
   time splits into dispatch (202 -> Ray job ``start_time``), the job supervisor (-> the driver
   process's start, from /proc), the driver (-> Ray job ``end_time``) and detection (-> the client
   sees ``succeeded``); training s = the loop's own per-epoch seconds. Finally, fresh interpreters
   time the CLI's and the driver's imports.

After ``ServiceProcess.stop()`` the script SIGKILLs whatever is left of its Ray head (processes whose
command line names its private RAY_TMPDIR), a safety net: before ``stop_embedded`` escalated to
SIGKILL, gcs_server/raylet/monitor survived its SIGTERM.

    .venv/bin/python bench/bench_service.py [--quick] [--example DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
from benchreport import (
    Contention,
    _busy_cpu_seconds,
    contention_line,
    environment,
    environment_lines,
    median,
    table,
    write_result,
)

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import Metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from service_process import ServiceProcess  # noqa: E402  (the tests' way of starting a real service)

POLL_SECONDS = 0.2  # DG2PF_POLL_SECONDS of the service under test
EPOCHS = 6
TERMINAL = {"succeeded", "failed", "cancelled"}


def job_spec(
    checkpoint: str, pruning_epochs: int, max_epochs: int, patience: int = 100, name: str | None = None
) -> dict:
    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": checkpoint},
        "dataset": {"spec": "digits"},
        "sparsity": 0.9,
        "schedule": {"pruning_epochs": pruning_epochs, "max_epochs": max_epochs, "patience": patience},
    }
    if name:
        doc["name"] = name
    return doc


# --- CPU used by other processes: ours are this process's descendants and the Ray head's ----------


class ServiceContention(Contention):
    """``Contention`` where "own" CPU is that of this process's descendants (the service, the CLI
    runs) and of every process whose command line names ``marker`` (the private RAY_TMPDIR: the
    detached Ray head's daemons) plus their descendants (Ray workers, job supervisors, job drivers).
    Sampled from /proc every ``interval`` s; CPU of a process that lives and dies between two
    samples is missed and counted as *other* processes' time, so the share errs toward "shared"."""

    def __init__(self, marker: str, interval: float = 0.2) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._me, self._marker = os.getpid(), marker.encode()
        self._start = self._tree_cpu()
        self._last = dict(self._start)
        self._stop = threading.Event()
        self._interval = interval
        super().__init__()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree_cpu(self) -> dict[int, float]:
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        roots = {self._me}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            pid = int(entry)
            parent[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
            if self._marker in cmd:
                roots.add(pid)
        mine: dict[int, float] = {}
        for pid in cpu:
            p, hops = pid, 0
            while p not in (0, 1) and hops < 64:
                if p in roots:
                    mine[pid] = cpu[pid]
                    break
                p, hops = parent.get(p, 0), hops + 1
        return mine

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._last.update(self._tree_cpu())

    def result(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self.t0
        self._last.update(self._tree_cpu())
        own = sum(v - self._start.get(pid, 0.0) for pid, v in self._last.items())
        busy = _busy_cpu_seconds() - self.busy0
        other = max(busy - own, 0.0)
        return {
            "wall_s": wall,
            "own_cpu_s": own,
            "other_cpu_s": other,
            "other_share": other / (wall * (os.cpu_count() or 1)),
            "loadavg_1min_end": os.getloadavg()[0],
            "own_processes_seen": len(self._last),
        }


# --- helpers ---------------------------------------------------------------------------------------


def make_example(root: Path) -> Path:
    out = root / "ex"
    dg2pf = Path(sys.executable).with_name("dg2pf")
    subprocess.run([str(dg2pf), "example", "digits", "--out", str(out), "--quiet"], check=True)
    return out


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def runner_pids(job_dir: Path) -> list[int]:
    """PIDs of the Ray job driver (``python -m dg2pf_service.runner JOB_DIR``) of one job."""
    needle = f"dg2pf_service.runner\0{job_dir}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def any_runner(data_dir: Path) -> bool:
    needle = f"dg2pf_service.runner\0{data_dir}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        return True
            except OSError:
                pass
    return False


def driver_env(pid: int) -> dict:
    """What the job driver runs with: OMP_NUM_THREADS from its environment, its thread count."""
    out: dict = {}
    try:
        env = dict(
            kv.split("=", 1)
            for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            if "=" in kv
        )
        out["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS")
        out["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES")
    except OSError:
        pass
    return out


def proc_start_wall(pid: int) -> float | None:
    """Wall-clock start of a process (boot time + its start tick; 10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, StopIteration, ValueError):
        return None
    return btime + start_ticks / os.sysconf("SC_CLK_TCK")


def marked_pids(marker: str) -> list[int]:
    needle, pids = marker.encode(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def kill_leftovers(marker: str, grace: float = 15.0) -> int:
    """SIGKILL what is left of our Ray head after ``ServiceProcess.stop()`` (a safety net: Ray's
    gcs_server/raylet/monitor may survive SIGTERM). Only processes whose command line names our
    private RAY_TMPDIR, i.e. ones this script started."""
    import signal

    deadline = time.time() + grace
    while marked_pids(marker) and time.time() < deadline:
        time.sleep(0.5)
    left = marked_pids(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(left)


def wait_idle(data_dir: Path, timeout: float = 120) -> float:
    """Until no job driver of this service is alive; returns the seconds waited."""
    t0 = time.perf_counter()
    while any_runner(data_dir):
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"a job driver of {data_dir} is still alive after {timeout} s")
        time.sleep(0.1)
    return time.perf_counter() - t0


class RayJobs:
    """Ray's own record of a job (start_time/end_time), through the head's job API."""

    def __init__(self, data_dir: Path) -> None:
        self.client = None
        try:
            from ray.job_submission import JobSubmissionClient

            from dg2pf_service.cluster import auth_headers, head_record

            head = json.loads(head_record(data_dir).read_text())
            self.client = JobSubmissionClient(head["dashboard_url"], headers=auth_headers())
        except Exception as exc:  # noqa: BLE001 - the breakdown is optional
            print(f"(no Ray job info: {exc})", file=sys.stderr)

    def times(self, job_id: str) -> dict | None:
        if self.client is None:
            return None
        try:
            info = self.client.get_job_info(f"dg2pf-{job_id}")
        except Exception as exc:  # noqa: BLE001
            print(f"(no Ray job info for {job_id}: {exc})", file=sys.stderr)
            return None
        return {
            "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "start_time_s": info.start_time / 1000 if info.start_time else None,
            "end_time_s": info.end_time / 1000 if info.end_time else None,
            "driver_exit_code": getattr(info, "driver_exit_code", None),
        }


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def poll_until(
    http: httpx.Client, job_id: str, states: set[str], every: float, timeout: float, on_poll=None
) -> tuple[dict, float]:
    """GET /jobs/{id} every ``every`` s until its state is in ``states``; (job, perf_counter then)."""
    deadline = time.perf_counter() + timeout
    while True:
        job = http.get(f"/jobs/{job_id}").raise_for_status().json()
        now = time.perf_counter()
        if on_poll is not None:
            on_poll(job, now)
        if job["state"] in states:
            return job, now
        if job["state"] in TERMINAL:
            raise SystemExit(f"job {job_id} ended {job['state']} (waiting for {states}): {job.get('error')}")
        if now > deadline:
            raise SystemExit(f"job {job_id} still {job['state']} after {timeout} s")
        time.sleep(max(0.0, every - (time.perf_counter() - now)))


# --- the three measurements --------------------------------------------------------------------------


def post_burst(url: str, spec: dict, clients: int, per_client: int, marker: str) -> dict:
    barrier = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    ids: list[list[str]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def worker(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            http.get("/healthz")  # connection open before the clock starts
            barrier.wait()
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = http.post("/jobs", json=spec)
                latencies[k].append(time.perf_counter() - t0)
                if r.status_code != 202:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    ids[k].append(r.json()["id"])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    cont = ServiceContention(marker)
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    contention = cont.result()
    if errors:
        raise SystemExit(f"{len(errors)} POST /jobs failed, first: {errors[0]}")

    # Cancel everything right away (not timed); note which ones the scheduler had sent to Ray.
    all_ids = [i for per in ids for i in per]
    was_running = cancelled = 0
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as http:
        for job_id in all_ids:
            r = http.post(f"/jobs/{job_id}/cancel")
            if r.status_code == 200:
                cancelled += 1
                if r.json().get("started_at"):
                    was_running += 1
            elif r.status_code != 409:  # 409: it had already ended (cannot happen this fast, but harmless)
                raise SystemExit(f"cancel {job_id}: {r.status_code} {r.text[:200]}")
    cancel_s = time.perf_counter() - t0
    flat = [x for per in latencies for x in per]
    return {
        "clients": clients,
        "jobs_per_client": per_client,
        "requests": len(flat),
        "wall_s": wall,
        "requests_per_s": len(flat) / wall,
        "p50_ms": 1000 * pct(flat, 0.50),
        "p90_ms": 1000 * pct(flat, 0.90),
        "p99_ms": 1000 * pct(flat, 0.99),
        "max_ms": 1000 * max(flat),
        "min_ms": 1000 * min(flat),
        "mean_ms": 1000 * statistics.fmean(flat),
        "latencies_ms": [1000 * x for x in flat],
        "cancelled": cancelled,
        "dispatched_to_ray_before_cancel": was_running,
        "cancel_all_s": cancel_s,
        "contention": contention,
    }


def queued_to_running(http: httpx.Client, spec: dict, data_dir: Path, marker: str) -> dict:
    cont = ServiceContention(marker)
    r = http.post("/jobs", json=spec)
    t_202 = time.perf_counter()
    r.raise_for_status()
    job_id = r.json()["id"]
    polls = 0

    def count(job: dict, now: float) -> None:
        nonlocal polls
        polls += 1

    job, t_running = poll_until(http, job_id, {"running", "succeeded"}, every=0.05, timeout=60, on_poll=count)
    if job["state"] != "running":
        raise SystemExit(f"tiny job {job_id} was never seen running (first seen {job['state']}); poll faster")
    server_s = ts(job["started_at"]) - ts(job["created_at"])
    done, t_done = poll_until(http, job_id, {"succeeded"}, every=0.1, timeout=300)
    idle_wait = wait_idle(data_dir)
    contention = cont.result()  # over the whole repeat: a ~0.2 s window is too short for /proc's 10 ms ticks
    return {
        "job_id": job_id,
        "queued_to_running_s": t_running - t_202,
        "server_started_minus_created_s": server_s,
        "polls": polls,
        "submit_to_succeeded_s": t_done - t_202,
        "driver_exit_wait_s": idle_wait,
        "contention": contention,
    }


def service_run(http: httpx.Client, spec: dict, data_dir: Path, ray_jobs: RayJobs, marker: str) -> dict:
    cont = ServiceContention(marker)
    marks: dict[str, float] = {}
    driver: dict = {}
    t0 = time.perf_counter()
    r = http.post("/jobs", json=spec)
    t_202 = time.perf_counter()
    wall_202 = time.time()
    r.raise_for_status()
    job_id = r.json()["id"]
    job_dir = data_dir / "jobs" / job_id

    def watch(job: dict, now: float) -> None:
        if job["state"] == "running":
            marks.setdefault("running", now)
            if not driver:
                pids = runner_pids(job_dir)
                if pids:
                    driver.update(driver_env(pids[0]), pid=pids[0], start_wall=proc_start_wall(pids[0]))
        if job["history"]:
            marks.setdefault("first_progress", now)

    job, t_done = poll_until(http, job_id, {"succeeded"}, every=0.1, timeout=900, on_poll=watch)
    wall_done = time.time()
    contention = cont.result()
    ray = ray_jobs.times(job_id)
    wait_idle(data_dir)
    history = job["history"]
    epochs = [h for h in history if h["epoch"] >= 1]
    n_epochs = (job.get("best_metrics") or {}).get("epochs")
    if len(epochs) != EPOCHS or n_epochs not in (None, EPOCHS):
        raise SystemExit(
            f"service job {job_id}: expected {EPOCHS} training epochs, got {len(epochs)} (metrics: {n_epochs})"
        )
    train_s = sum(h["seconds"] for h in epochs)
    out = {
        "variant": "service",
        "job_id": job_id,
        "wall_s": t_done - t0,
        "post_s": t_202 - t0,
        "train_s": train_s,
        "non_train_s": (t_done - t0) - train_s,
        "baseline_eval_s": next((h["seconds"] for h in history if h["epoch"] == 0), None),
        "seen_running_s": marks.get("running", t_done) - t_202,
        "seen_first_progress_s": marks.get("first_progress", t_done) - t_202,
        "server_started_minus_created_s": ts(job["started_at"]) - ts(job["created_at"]),
        "server_finished_minus_created_s": ts(job["finished_at"]) - ts(job["created_at"]),
        "driver": driver,
        "ray_job": ray,
        "test_top1": (job.get("best_metrics") or {}).get("test_top1"),
        "sparsity_prunable": (job.get("best_metrics") or {}).get("sparsity_prunable"),
        "contention": contention,
    }
    if ray and ray.get("start_time_s") and ray.get("end_time_s"):
        out["dispatch_s"] = ray["start_time_s"] - wall_202  # 202 -> Ray accepted the job (scheduler tick + submit)
        out["ray_job_s"] = (
            ray["end_time_s"] - ray["start_time_s"]
        )  # supervisor + driver: python/torch import, data, training, writes
        out["detect_s"] = (
            wall_done - ray["end_time_s"]
        )  # Ray job end -> client sees succeeded (scheduler tick + client poll)
        out["ray_job_non_train_s"] = out["ray_job_s"] - train_s
        if driver.get("start_wall"):
            out["supervisor_s"] = driver["start_wall"] - ray["start_time_s"]  # Ray job start -> driver process exists
            out["driver_s"] = ray["end_time_s"] - driver["start_wall"]  # the driver process's life (approx.)
            out["driver_non_train_s"] = out["driver_s"] - train_s
    return out


def cli_run(checkpoint: Path, out: Path, marker: str, one_thread: bool = False) -> dict:
    cmd = [
        str(Path(sys.executable).with_name("dg2pf")),
        "prune",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "digits",
        "--sparsity",
        "0.9",
        "--out",
        str(out),
        "--pruning-epochs",
        "3",
        "--max-epochs",
        str(EPOCHS),
        "--patience",
        "100",
        "--quiet",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"  # as Ray sets it for the service's 1-CPU job driver
    cont = ServiceContention(marker)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    contention = cont.result()
    if proc.returncode != 0:
        raise SystemExit(f"dg2pf prune failed ({proc.returncode}): {proc.stderr[-2000:]}")
    m = Metrics.read(Artifacts(out).metrics)
    epochs = [h for h in m.history if h.epoch >= 1]
    if len(epochs) != EPOCHS or m.epochs != EPOCHS:
        raise SystemExit(f"CLI: expected {EPOCHS} training epochs, got {len(epochs)} (metrics: {m.epochs})")
    train_s = sum(h.seconds for h in epochs)
    return {
        "variant": "cli1" if one_thread else "cli",
        "wall_s": wall,
        "train_s": train_s,
        "non_train_s": wall - train_s,
        "baseline_eval_s": next((h.seconds for h in m.history if h.epoch == 0), None),
        "test_top1": m.test_top1,
        "sparsity_prunable": m.sparsity_prunable,
        "command": " ".join(cmd),
        "contention": contention,
    }


IMPORTS = {
    "bare": "pass",
    "cli": "import dg2pf_cli.main, dg2pf_core.job",  # what `dg2pf prune` imports (torch included)
    # the job driver (its progress writer imports dg2pf_ray.train)
    "driver": "import dg2pf_service.runner, dg2pf_ray.train",
}


def import_probe(repeats: int) -> dict:
    """Wall and CPU time (user + sys, from wait4) of a fresh interpreter doing only the imports of
    the CLI / the job driver; one untimed round first (page cache). CPU time is the steadier figure
    on a shared machine."""
    wall: dict[str, list[float]] = {k: [] for k in IMPORTS}
    cpu: dict[str, list[float]] = {k: [] for k in IMPORTS}
    for i in range(repeats + 1):
        for name, code in IMPORTS.items():
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", code])
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"import probe {code!r} failed ({proc.returncode})")
            if i > 0:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(usage.ru_utime + usage.ru_stime)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "median_s": {k: median(v) for k, v in wall.items()},
        "median_cpu_s": {k: median(v) for k, v in cpu.items()},
    }


def sequential_posts(http: httpx.Client, spec: dict, n: int) -> dict:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = http.post("/jobs", json=spec)
        lat.append(time.perf_counter() - t0)
        http.post(f"/jobs/{r.raise_for_status().json()['id']}/cancel").raise_for_status()
    return {
        "requests": n,
        "p50_ms": 1000 * pct(lat, 0.5),
        "max_ms": 1000 * max(lat),
        "min_ms": 1000 * min(lat),
        "latencies_ms": [1000 * x for x in lat],
    }


# --- main ----------------------------------------------------------------------------------------------


VARIANTS = ("service", "cli", "cli1")
LABELS = {
    "service": "service (submit -> succeeded)",
    "cli": "CLI `dg2pf prune` (torch default threads)",
    "cli1": "CLI `dg2pf prune`, OMP_NUM_THREADS=1 (as the job driver)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats: 2 jobs per client, 2 queued->running, 1 round of the end-to-end variants",
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--jobs-per-client", type=int, default=None, help="POSTs per client thread (default 5; --quick 2)"
    )
    parser.add_argument(
        "--dispatch-repeats", type=int, default=None, help="queued->running repeats (default 5; --quick 2)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="rounds of service, cli, cli1 (default 2; --quick 1)")
    parser.add_argument("--example", type=Path, default=None, help="a `dg2pf example digits` output dir to reuse")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data dir, service log, CLI outputs)")
    args = parser.parse_args()
    per_client = args.jobs_per_client or (2 if args.quick else 5)
    dispatch_repeats = args.dispatch_repeats or (2 if args.quick else 5)
    rounds = args.repeats or (1 if args.quick else 2)
    sequential_n = 5 if args.quick else 10

    # Short paths: Ray's unix sockets live under RAY_TMPDIR.
    tmp = Path(tempfile.mkdtemp(prefix="bsv-", dir="/tmp"))
    ray_tmp = tmp / "r"
    ray_tmp.mkdir()
    marker = str(ray_tmp)
    example = args.example
    example_made = example is None
    if example is None:
        t0 = time.perf_counter()
        example = make_example(tmp)
        print(f"(made the pre-trained example in {time.perf_counter() - t0:.0f} s: {example})", file=sys.stderr)
    checkpoint = Artifacts(example).model
    if not checkpoint.exists():
        parser.error(f"{checkpoint} does not exist; pass the --out dir of `dg2pf example digits`")

    overall = ServiceContention(marker)
    svc = ServiceProcess(tmp / "data", DG2PF_POLL_SECONDS=str(POLL_SECONDS), RAY_TMPDIR=str(ray_tmp))
    try:
        t0 = time.perf_counter()
        svc.start(timeout=300)
        start_s = time.perf_counter() - t0
        print(
            f"(service up in {start_s:.1f} s at {svc.url}; log {tmp / f'service-{svc.port}.log'})",
            file=sys.stderr,
            flush=True,
        )
        data_dir = svc.data_dir
        http = httpx.Client(base_url=svc.url, timeout=120)
        with checkpoint.open("rb") as fh:
            ckpt = (
                http.post("/checkpoints", files={"file": (Artifacts.MODEL, fh, "application/octet-stream")})
                .raise_for_status()
                .json()["id"]
            )
        full = job_spec(ckpt, 3, EPOCHS)
        tiny = job_spec(ckpt, 1, 1)

        # 1. POST /jobs: 2 untimed, then one client alone (reference), then the concurrent burst.
        for _ in range(2):
            jid = http.post("/jobs", json=full).raise_for_status().json()["id"]
            http.post(f"/jobs/{jid}/cancel")
        sequential = sequential_posts(http, full, sequential_n)
        burst = post_burst(svc.url, full, args.clients, per_client, marker)
        print(
            f"(POST /jobs: one client p50 {sequential['p50_ms']:.0f} ms; "
            f"{args.clients} clients p50 {burst['p50_ms']:.0f} ms, "
            f"p99 {burst['p99_ms']:.0f} ms, {burst['requests_per_s']:.1f} req/s; "
            f"{burst['dispatched_to_ray_before_cancel']} dispatched before cancel)",
            file=sys.stderr,
            flush=True,
        )
        idle_after_burst = wait_idle(data_dir)

        # 2. warm-up tiny job, then queued -> running on the idle cluster.
        t0 = time.perf_counter()
        warm_id = http.post("/jobs", json=tiny).raise_for_status().json()["id"]
        poll_until(http, warm_id, {"succeeded"}, every=0.1, timeout=600)
        warm_s = time.perf_counter() - t0
        wait_idle(data_dir)
        print(f"(warm-up tiny job succeeded in {warm_s:.1f} s)", file=sys.stderr, flush=True)
        dispatch = []
        for i in range(dispatch_repeats):
            d = queued_to_running(http, tiny, data_dir, marker)
            dispatch.append(d)
            print(
                f"(queued->running #{i}: {1000 * d['queued_to_running_s']:.0f} ms; "
                f"tiny job end-to-end {d['submit_to_succeeded_s']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

        # 3. service vs CLI, interleaved.
        ray_jobs = RayJobs(data_dir)
        runs = []
        for i in range(rounds):
            for variant in VARIANTS:
                if variant == "service":
                    r = service_run(http, full, data_dir, ray_jobs, marker)
                else:
                    r = cli_run(checkpoint, tmp / f"{variant}-{i}", marker, one_thread=variant == "cli1")
                r["repeat"] = i
                runs.append(r)
                print(
                    f"({variant} #{i}: {r['wall_s']:.1f} s, training {r['train_s']:.1f} s, "
                    f"other processes {100 * r['contention']['other_share']:.0f}%)",
                    file=sys.stderr,
                    flush=True,
                )
        http.close()
    finally:
        svc.stop()
        killed = kill_leftovers(marker)
        if killed:
            print(f"({killed} Ray head process(es) outlived ServiceProcess.stop(); killed)", file=sys.stderr)
    imports = import_probe(1 if args.quick else 3)
    env = environment()
    env["contention"] = overall.result()
    import ray

    env["ray"] = ray.__version__
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"(kept {tmp})", file=sys.stderr)

    # --- report ---
    q2r = [d["queued_to_running_s"] for d in dispatch]
    srv_q2r = [d["server_started_minus_created_s"] for d in dispatch]
    tiny_e2e = [d["submit_to_succeeded_s"] for d in dispatch]
    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    med = {v: {k: median([r[k] for r in by[v]]) for k in ("wall_s", "train_s", "non_train_s")} for v in VARIANTS}
    ratio = med["service"]["wall_s"] / med["cli"]["wall_s"]
    ratio1 = med["service"]["wall_s"] / med["cli1"]["wall_s"]
    pair_ratios = [s["wall_s"] / c["wall_s"] for s, c in zip(by["service"], by["cli"])]
    pair_ratios1 = [s["wall_s"] / c["wall_s"] for s, c in zip(by["service"], by["cli1"])]
    part_keys = (
        "dispatch_s",
        "supervisor_s",
        "driver_s",
        "driver_non_train_s",
        "ray_job_s",
        "ray_job_non_train_s",
        "detect_s",
        "seen_first_progress_s",
    )
    svc_parts = {
        k: median([r[k] for r in by["service"] if k in r]) for k in part_keys if any(k in r for r in by["service"])
    }
    worst = max(
        [
            burst["contention"]["other_share"],
            *(d["contention"]["other_share"] for d in dispatch),
            *(r["contention"]["other_share"] for r in runs),
        ]
    )
    driver_threads = next((r["driver"].get("OMP_NUM_THREADS") for r in by["service"] if r["driver"]), None)
    imp, imp_cpu = imports["median_s"], imports["median_cpu_s"]

    print("### bench_service: the dg2pf service over HTTP (SQLite, embedded Ray head), digits_cnn on digits")
    print()
    print(environment_lines(env))
    print(
        f"- Ray {ray.__version__}; service: `python -m dg2pf_service` with DG2PF_POLL_SECONDS={POLL_SECONDS}, "
        "SQLite in a fresh "
        f"temp data dir, its own embedded Ray head (up in {start_s:.1f} s, until /healthz answered; polled every 0.5 s)"
    )
    print(
        "- the job driver (Ray job entrypoint, entrypoint_num_cpus=1) "
        f"runs with OMP_NUM_THREADS={driver_threads} (set by Ray); "
        f"the CLI with torch's default ({env['torch_threads']} threads) and, as a third variant, with OMP_NUM_THREADS=1"
    )
    print(contention_line(env["contention"]) + " (CPU of the service, its Ray head and the CLI runs counts as ours)")
    print(f"- worst single measurement: other processes {100 * worst:.0f}% of the machine")
    print()
    print(
        f"#### 1. POST /jobs: one client alone, then {burst['clients']} concurrent clients "
        f"x {burst['jobs_per_client']} jobs"
    )
    print()
    print(
        table(
            ["clients", "requests", "p50 ms", "p90 ms", "p99 ms", "max ms", "min ms", "requests/s", "other processes"],
            [
                [
                    1,
                    sequential["requests"],
                    f"{sequential['p50_ms']:.0f}",
                    "-",
                    "-",
                    f"{sequential['max_ms']:.0f}",
                    f"{sequential['min_ms']:.0f}",
                    f"{1000 / sequential['p50_ms']:.1f} (1/p50)",
                    "-",
                ],
                [
                    burst["clients"],
                    burst["requests"],
                    f"{burst['p50_ms']:.0f}",
                    f"{burst['p90_ms']:.0f}",
                    f"{burst['p99_ms']:.0f}",
                    f"{burst['max_ms']:.0f}",
                    f"{burst['min_ms']:.0f}",
                    f"{burst['requests_per_s']:.1f}",
                    f"{100 * burst['contention']['other_share']:.0f}%",
                ],
            ],
        )
    )
    print()
    print(
        f"Each client thread has its own `httpx.Client` (connection opened before the start); all start together "
        f"(burst {burst['wall_s']:.2f} s). All jobs were cancelled right after "
        f"(not timed; {burst['cancel_all_s']:.1f} s for "
        f"{burst['cancelled']} cancels from one client); the scheduler had dispatched "
        f"{burst['dispatched_to_ray_before_cancel']} "
        f"of the burst's jobs to Ray by then."
    )
    print()
    print(
        "#### 2. queued -> running on a warm, idle cluster "
        f"(DG2PF_POLL_SECONDS={POLL_SECONDS}, client polls every 50 ms)"
    )
    print()
    print(
        table(
            [
                "repeat",
                "202 -> first GET showing running, ms",
                "server: started_at - created_at, ms",
                "tiny job 202 -> succeeded, s",
            ],
            [
                [
                    i,
                    f"{1000 * d['queued_to_running_s']:.0f}",
                    f"{1000 * d['server_started_minus_created_s']:.0f}",
                    f"{d['submit_to_succeeded_s']:.1f}",
                ]
                for i, d in enumerate(dispatch)
            ]
            + [
                [
                    "**median**",
                    f"**{1000 * median(q2r):.0f}**",
                    f"**{1000 * median(srv_q2r):.0f}**",
                    f"**{median(tiny_e2e):.1f}**",
                ]
            ],
        )
    )
    print()
    print(
        f"Warm-up: one tiny job (pruning_epochs 1, max_epochs 1) ran to succeeded first ({warm_s:.1f} s from submit). "
        f"\"running\" = the scheduler has submitted the job to Ray's Jobs API, before the job's driver process starts."
    )
    print()
    print(f"#### 3. end to end, {EPOCHS} epochs (pruning_epochs 3, max_epochs 6, patience 100): service vs CLI")
    print()
    print(
        table(
            [
                "variant",
                "median end-to-end s",
                "median training s",
                "median rest s",
                "runs: end-to-end s",
                "runs: training s",
            ],
            [
                [
                    LABELS[v],
                    f"{med[v]['wall_s']:.1f}",
                    f"{med[v]['train_s']:.1f}",
                    f"{med[v]['non_train_s']:.1f}",
                    " / ".join(f"{r['wall_s']:.1f}" for r in by[v]),
                    " / ".join(f"{r['train_s']:.1f}" for r in by[v]),
                ]
                for v in VARIANTS
            ],
        )
    )
    print()
    rows = [
        ["**ratio of medians, service / CLI**", f"**{ratio:.2f}x**"],
        ["per-round ratios, service / CLI", " / ".join(f"{x:.2f}x" for x in pair_ratios)],
        ["ratio of medians, service / CLI with OMP_NUM_THREADS=1", f"{ratio1:.2f}x"],
        ["per-round ratios, service / CLI with OMP_NUM_THREADS=1", " / ".join(f"{x:.2f}x" for x in pair_ratios1)],
        ["service minus CLI (1 thread): end-to-end", f"{med['service']['wall_s'] - med['cli1']['wall_s']:+.1f} s"],
        [
            "service minus CLI (1 thread): training epochs only",
            f"{med['service']['train_s'] - med['cli1']['train_s']:+.1f} s",
        ],
        [
            "service minus CLI (1 thread): outside the epochs",
            f"{med['service']['non_train_s'] - med['cli1']['non_train_s']:+.1f} s",
        ],
    ]
    if "dispatch_s" in svc_parts:
        rows.append(
            ["service: 202 -> Ray job start_time (scheduler tick + Ray submit)", f"{svc_parts['dispatch_s']:.2f} s"]
        )
    if "supervisor_s" in svc_parts:
        rows += [
            [
                "service: Ray job start_time -> driver process started (job supervisor actor)",
                f"{svc_parts['supervisor_s']:.2f} s",
            ],
            ["service: driver process start -> Ray job end_time", f"{svc_parts['driver_s']:.1f} s"],
            [
                "  of which outside the training epochs (imports, data, baseline/test eval, artifacts, exit)",
                f"{svc_parts['driver_non_train_s']:.1f} s",
            ],
        ]
    elif "ray_job_s" in svc_parts:
        rows.append(["service: Ray job start_time -> end_time", f"{svc_parts['ray_job_s']:.1f} s"])
    if "detect_s" in svc_parts:
        rows.append(
            [
                "service: Ray job end_time -> client sees succeeded (scheduler tick + 0.1 s client poll)",
                f"{svc_parts['detect_s']:.2f} s",
            ]
        )
    rows += [
        [f"fresh python: `{IMPORTS['bare']}`, wall / CPU", f"{imp['bare']:.2f} s / {imp_cpu['bare']:.2f} s"],
        [
            f"fresh python: `{IMPORTS['cli']}` (the CLI's imports), wall / CPU",
            f"{imp['cli']:.1f} s / {imp_cpu['cli']:.1f} s",
        ],
        [
            f"fresh python: `{IMPORTS['driver']}` (the driver's imports), wall / CPU",
            f"{imp['driver']:.1f} s / {imp_cpu['driver']:.1f} s",
        ],
    ]
    print(table(["", "value"], rows))
    print()
    print(
        "Training s = sum of the loop's per-epoch `seconds` (epochs 1-6); rest = end-to-end minus training "
        "(process start, python + torch import, data and model loading, baseline + test evaluation, artifacts; "
        "for the service also dispatch, the Ray job supervisor and completion polling). Import times: "
        f"median of {len(imports['wall_s']['bare'])} fresh interpreters each (after one untimed round), "
        "measured after the "
        "service was stopped; CPU = user + sys of the child."
    )
    print()
    print(
        table(
            [
                "round",
                "variant",
                "end-to-end s",
                "training s",
                "rest s",
                "baseline eval s",
                "test top-1",
                "other processes",
            ],
            [
                [
                    r["repeat"],
                    r["variant"],
                    f"{r['wall_s']:.1f}",
                    f"{r['train_s']:.1f}",
                    f"{r['non_train_s']:.1f}",
                    f"{r['baseline_eval_s']:.2f}" if r["baseline_eval_s"] is not None else "-",
                    f"{r['test_top1']:.4f}" if r["test_top1"] is not None else "-",
                    f"{100 * r['contention']['other_share']:.0f}%",
                ]
                for r in runs
            ],
        )
    )

    path = write_result(
        "bench_service",
        {
            "benchmark": "bench_service",
            "environment": env,
            "config": {
                "poll_seconds": POLL_SECONDS,
                "store": "sqlite",
                "clients": args.clients,
                "jobs_per_client": per_client,
                "sequential_posts": sequential_n,
                "dispatch_repeats": dispatch_repeats,
                "rounds": rounds,
                "order": list(VARIANTS),
                "spec": full,
                "tiny_spec": tiny,
                "example": str(example),
                "example_made_by_script": example_made,
            },
            "service_start_s": start_s,
            "post_jobs_sequential": sequential,
            "post_jobs": burst,
            "idle_wait_after_burst_s": idle_after_burst,
            "warmup_tiny_job_s": warm_s,
            "queued_to_running": {
                "runs": dispatch,
                "median_s": median(q2r),
                "median_server_s": median(srv_q2r),
                "median_tiny_e2e_s": median(tiny_e2e),
            },
            "end_to_end": {
                "runs": runs,
                "medians": med,
                "ratio_service_over_cli": ratio,
                "ratio_service_over_cli_1thread": ratio1,
                "round_ratios": pair_ratios,
                "round_ratios_1thread": pair_ratios1,
                "service_parts_median": svc_parts,
                "driver_omp_num_threads": driver_threads,
            },
            "imports": imports,
        },
    )
    print()
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
