"""Finding the Ray cluster, and refusing work it can never place."""

from __future__ import annotations

import logging
import os
import re
import sys

import ray

from dg2pf_core.errors import DG2PFError

# A Tune trial's driver only waits on its TorchTrainer, whose workers hold the CPUs; Tune needs a
# non-empty request for it, which counts against the cluster beside the workers.
TRIAL_DRIVER_CPU = 0.01


class ClusterError(DG2PFError):
    field = "resources"


def connect(address: str | None = None, quiet: bool = False) -> str:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``); without one, start a local Ray.

    ``quiet`` hides this driver's INFO lines from Ray (its start) and the workers' lines in KNOWN_NOISE;
    Ray Train's own (worker-group set-up, a line per report of every worker) are ``train_logging`` 's.
    A local Ray's workers get ``RAY_ADDRESS`` (``worker_setup``). Returns a short description for logs.
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
    runtime_env = {
        "env_vars": {"PYTHONUNBUFFERED": "1"},
        "worker_process_setup_hook": "dg2pf_ray.worker_setup.know_own_cluster",
    }
    try:
        if address:
            # No runtime_env here: inside a Ray Job the job's own runtime env applies, and Ray
            # refuses a driver env that differs from it.
            ray.init(address=address, log_to_driver=True, **logs)
        else:
            # The dashboard stays on: Ray Train's placement-group cleaner needs its state API, without
            # which a trial stopped early by Tune leaks its workers' CPUs and later trials never start.
            # address="local": always a fresh instance, never silently joining another cluster that
            # happens to run on this machine.
            ray.init(address="local", runtime_env=runtime_env, log_to_driver=True, **logs)
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc}", field="ray_address") from exc
    if quiet:
        _drop_known_noise()
    return f"joined Ray cluster at {address}" if address else "started a local Ray instance"


# Lines Ray's own processes write on every successful run that ask nothing of the user (Ray 2.60):
# Ray Train's controller creates its PreemptionWatcher actor in a way core_worker.cc logs at ERROR level
# (ray-project/ray#53727), and its placement-group cleaner warns while the state API is slow to answer.
KNOWN_NOISE = re.compile(
    r"has constructor arguments in the object store and max_restarts > 0"
    r"|Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable"
)


def _drop_known_noise() -> None:
    """The workers' lines this driver prints, less KNOWN_NOISE: every other line, a failing worker's
    traceback included, still shows (the log files under the Ray session keep everything). The filter
    wraps the printer Ray registers with its stream dispatcher (private API): on another Ray layout
    nothing changes and the lines show."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    printer = dict(dispatcher.handlers).get(_PRINTER)
    if printer is None or getattr(printer, "drops_known_noise", False):
        return

    def filtered(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not KNOWN_NOISE.search(line)]
        if lines:
            printer({**data, "lines": lines})

    filtered.drops_known_noise = True  # type: ignore[attr-defined]
    dispatcher.remove_handler(_PRINTER)  # ray.shutdown() removes it by this name, as it removes Ray's own
    dispatcher.add_handler(_PRINTER, filtered)


_PRINTER = "ray_print_logs"  # the name ray._private.worker registers its printer of the workers' lines under


def check_capacity(workers: int, use_gpu: bool, cpus_per_worker: float = 1.0, extra_cpus: float = 0.0) -> None:
    """Fail fast when the cluster can never place ``workers`` training workers (instead of hanging);
    ``extra_cpus``: what else the run holds beside them (a Tune trial's driver)."""
    if workers < 1:
        raise ClusterError(f"workers must be >= 1, got {workers}", field="num_workers")
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if workers * cpus_per_worker + extra_cpus > cpus:
        extra = f" (+ {extra_cpus:g} for the trial's driver)" if extra_cpus else ""
        fits = max(int((cpus - extra_cpus) // cpus_per_worker), 1)
        raise ClusterError(
            f"{workers} workers need {workers * cpus_per_worker:g} CPUs{extra} but the Ray cluster has {cpus:g}; "
            f"use --workers {fits} (resources.num_workers) or add nodes",
            field="num_workers",
        )
    if use_gpu and workers > gpus:
        raise ClusterError(
            f"{workers} GPU workers need {workers} GPUs but the Ray cluster has {gpus:g}; "
            "use fewer workers, drop --gpu, or add GPU nodes",
            field="use_gpu",
        )
