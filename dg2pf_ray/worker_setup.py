"""What every worker process of a Ray instance dg2pf starts itself runs first (``worker_process_setup_hook``).

Free of torch and dg2pf_core: Ray's own actors (Train's controller, its placement-group cleaner) run it too.
"""

from __future__ import annotations

import os

import ray


def know_own_cluster() -> None:
    """``RAY_ADDRESS`` = the worker's own cluster.

    Ray Train's placement-group cleaner (a detached actor; Ray 2.60) asks Ray's state API about the
    controller without an address. Without ``RAY_ADDRESS`` that API looks for the cluster in
    ``/tmp/ray/ray_current_cluster``, which only ``ray start`` writes, never ``ray.init()``: on a
    local instance it found no cluster, or another one, and the cleaner's thread died with a
    30-line traceback in the run's output, no longer watching for a crashed controller whose
    placement group it exists to free.
    """
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
