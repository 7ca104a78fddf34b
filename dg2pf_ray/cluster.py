"""Finding the Ray cluster, and refusing work it can never place."""

from __future__ import annotations

import logging
import os
import sys

import ray

from dg2pf_core.errors import DG2PFError


class ClusterError(DG2PFError):
    field = "resources"


def connect(address: str | None = None, quiet: bool = False) -> str:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``); without one, start a local Ray.

    ``quiet`` hides this driver's INFO lines from Ray (its start); Ray Train's own (worker-group set-up,
    a line per report of every worker) are ``train_logging`` 's. Returns a short description for logs.
    Idempotent within a process.
    """
    if ray.is_initialized():
        return "ray already initialised in this process"
    address = address or os.environ.get("RAY_ADDRESS") or None
    logs = {"logging_level": logging.WARNING} if quiet else {}
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        # The workers' lines the driver prints: no colour codes in a log file or a pipe.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # Worker processes import dg2pf from the same installation as the driver; nothing is shipped.
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    try:
        if address:
            # No runtime_env here: inside a Ray Job the job's own runtime env applies, and Ray
            # refuses a driver env that differs from it.
            ray.init(address=address, log_to_driver=True, **logs)
            return f"joined Ray cluster at {address}"
        # The dashboard stays on: Ray Train's placement-group cleaner needs its state API, without
        # which a trial stopped early by Tune leaks its workers' CPUs and later trials never start.
        # address="local": always a fresh instance, never silently joining another cluster that
        # happens to run on this machine.
        ray.init(address="local", runtime_env=runtime_env, log_to_driver=True, **logs)
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc}", field="ray_address") from exc
    return "started a local Ray instance"


def check_capacity(workers: int, use_gpu: bool, cpus_per_worker: float = 1.0) -> None:
    """Fail fast when the cluster can never place ``workers`` training workers (instead of hanging)."""
    if workers < 1:
        raise ClusterError(f"workers must be >= 1, got {workers}", field="num_workers")
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if workers * cpus_per_worker > cpus:
        raise ClusterError(
            f"{workers} workers need {workers * cpus_per_worker:g} CPUs but the Ray cluster has {cpus:g}; "
            f"use --workers {max(int(cpus // cpus_per_worker), 1)} or add nodes",
            field="num_workers",
        )
    if use_gpu and workers > gpus:
        raise ClusterError(
            f"{workers} GPU workers need {workers} GPUs but the Ray cluster has {gpus:g}; "
            "use fewer workers, drop --gpu, or add GPU nodes",
            field="use_gpu",
        )
