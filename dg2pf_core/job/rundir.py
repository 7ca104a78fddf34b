"""A run's state directory (``OUT.dg2pf-run`` beside ``OUT``): where it is, the lock that lets one run
train in it at a time, and the job an interrupted run left there for ``dg2pf prune --resume``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dg2pf_contract.artifacts import StateDir
from dg2pf_core.errors import ConfigError
from dg2pf_core.job.spec import PruneJob


def state_dir_for(out: str | Path) -> Path:
    """Where ``dg2pf prune`` keeps a run's state while it trains: ``OUT.dg2pf-run`` beside ``OUT``."""
    absolute = Path(os.path.abspath(os.path.expanduser(out)))
    if not absolute.name:
        raise ConfigError(f"output {out} is the root directory; give a new directory for the results", field="out")
    return absolute.with_name(absolute.name + ".dg2pf-run")


def lock_state_dir(state_dir: Path, out: str | Path):
    """One run trains in a state directory at a time (two `dg2pf prune` with the same --out)."""
    import fcntl

    fh = open(StateDir(state_dir).lock, "a+")  # noqa: SIM115 - closed when the run ends
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ConfigError(
            f"another dg2pf run is training for --out {out} (its state is in {state_dir}); wait for it "
            "or choose another --out",
            field="out",
        ) from None
    return fh


def read_state_dir(state_dir: str | Path) -> tuple[PruneJob, Path]:
    """The job and output path an interrupted run left in ``state_dir`` (``dg2pf prune --resume``)."""
    path = StateDir(state_dir).job
    if not path.is_file():
        raise ConfigError(
            f"{state_dir} is not a dg2pf run's state directory (no {StateDir.JOB}); give the OUT.dg2pf-run "
            "directory an interrupted `dg2pf prune` named",
            field="resume",
        )
    try:
        doc = json.loads(path.read_text())
        return PruneJob.from_dict(doc["job"]), Path(doc["out"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); the state directory is damaged", field="resume") from exc
