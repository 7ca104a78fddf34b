"""Python client of the dg2pf service: httpx and pydantic only (no torch, no Ray).

The names below are imported on first use, so ``dg2pf --help`` and ``dg2pf --version`` start without
loading httpx and pydantic at all.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"  # clients/pyproject.toml reads it; the same as the full package's (a test checks)

_WHERE = {
    "Client": "dg2pf_client.client",
    **dict.fromkeys(
        (
            "ApiError",
            "Conflict",
            "Forbidden",
            "InvalidRequest",
            "NotFound",
            "NotTheService",
            "ServiceUnreachable",
            "TooLarge",
            "Unauthorized",
            "WaitTimeout",
        ),
        "dg2pf_client.errors",
    ),
    # the contract: the job going in, the answers coming back
    "JobSpec": "dg2pf_contract.job",
    **dict.fromkeys(
        ("Artifact", "CheckpointOut", "JobList", "JobOut", "JobSubmitted", "ModelList", "ModelOut"),
        "dg2pf_contract.api",
    ),
}
__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from dg2pf_contract.api import Artifact, CheckpointOut, JobList, JobOut, JobSubmitted, ModelList, ModelOut
    from dg2pf_contract.job import JobSpec

    from .client import Client
    from .errors import (
        ApiError,
        Conflict,
        Forbidden,
        InvalidRequest,
        NotFound,
        NotTheService,
        ServiceUnreachable,
        TooLarge,
        Unauthorized,
        WaitTimeout,
    )


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
