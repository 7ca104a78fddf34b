"""The durable job store: SQLAlchemy models, Alembic migrations and the JobStore repository."""

from dg2pf_service.store.db import DatabaseURLError, make_engine, make_sessionmaker
from dg2pf_service.store.migrate import upgrade
from dg2pf_service.store.models import (
    TERMINAL_STATES,
    CheckpointFormat,
    CheckpointRow,
    DeploymentRow,
    JobPhase,
    JobRow,
    JobState,
)
from dg2pf_service.store.repo import JobNotFoundError, JobStore

__all__ = [
    "TERMINAL_STATES",
    "CheckpointFormat",
    "CheckpointRow",
    "DatabaseURLError",
    "DeploymentRow",
    "JobNotFoundError",
    "JobPhase",
    "JobRow",
    "JobState",
    "JobStore",
    "make_engine",
    "make_sessionmaker",
    "upgrade",
]
