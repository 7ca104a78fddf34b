"""The durable records: one row per job and one per uploaded checkpoint.

The schema is owned by the Alembic migrations in ``migrations/versions``; these classes must
describe the same tables (a test compares them), and a change here needs a new migration.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Integer, MetaData, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobPhase(enum.StrEnum):
    PENDING = "pending"
    BASELINE = "baseline"
    GRADUAL_PRUNING = "gradual_pruning"
    DISTILLATION = "distillation"
    FINETUNING = "finetuning"
    DONE = "done"


class CheckpointFormat(enum.StrEnum):
    SAFETENSORS = "safetensors"
    TORCH = "torch"
    HF = "hf"  # a Hugging Face model directory (config.json, model.safetensors, preprocessor_config.json)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the backend stores.

    SQLite has no time zones and hands back naive values; PostgreSQL converts to the session's
    zone. Normalising here means callers can compare and serialise timestamps without caring.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given; pass a timezone-aware value (e.g. datetime.now(UTC))"
            )
        value = value.astimezone(UTC)
        # SQLite would silently drop the offset anyway; store plain UTC so the text sorts correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Deterministic constraint names, so later migrations can refer to (and drop) them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.QUEUED.value)
    phase: Mapped[str] = mapped_column(String(32), default=JobPhase.PENDING.value)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    current_sparsity: Mapped[float] = mapped_column(Float, default=0.0)
    target_sparsity: Mapped[float] = mapped_column(Float)
    # none_as_null: "no metrics yet" is SQL NULL, so `IS NULL` finds it (plain JSON stores 'null').
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    best_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=lambda: [])
    error_type: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    ray_submission_id: Mapped[str | None] = mapped_column(String(128), index=True)
    # Resubmissions after the job's Ray work was lost (head restarted, node lost, runner killed), and
    # one {at, epoch, reason} record per loss.
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    restart_log: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    artifacts_dir: Mapped[str] = mapped_column(String(1024))
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Submission order for the FIFO queue. Unique, so two racing submissions cannot share a slot:
    # the loser of a race gets an IntegrityError and JobStore.create_job retries.
    queue_seq: Mapped[int] = mapped_column(Integer, unique=True)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def __repr__(self) -> str:
        return f"JobRow(id={self.id!r}, state={self.state!r}, phase={self.phase!r}, epoch={self.epoch})"


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(1024))
    format: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"CheckpointRow(id={self.id!r}, format={self.format!r}, bytes={self.bytes})"


class DeploymentRow(Base):
    """A job's pruned model deployed on Ray Serve; the model id is the job id."""

    __tablename__ = "deployments"
    model_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    output_dir: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
