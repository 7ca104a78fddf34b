"""JobStore: every read and write of jobs and checkpoints goes through these few typed methods.

Each method is one short transaction whose first statement is its write, so SQLite never has to
upgrade a read lock (the cause of spurious "database is locked") and PostgreSQL re-checks the
WHERE clause of a contended UPDATE against the committed row; on SQLite the writes of one process
take turns (``db.write_session``). Rows come back detached but fully loaded; change them through the
store, not by setting attributes.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dg2pf_service.store.db import write_session
from dg2pf_service.store.models import (
    CheckpointFormat,
    CheckpointRow,
    DeploymentRow,
    JobPhase,
    JobRow,
    JobState,
    utcnow,
)


class JobNotFoundError(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


# Fields set by the store itself. `state` is left out on purpose: an unconditional state write is
# how a late "succeeded" would overwrite a "cancelled", so state changes go through transition().
_READ_ONLY = {
    "id": "the id is assigned at creation",
    "queue_seq": "the queue position is assigned at creation",
    "created_at": "created_at is set at creation",
    "updated_at": "updated_at is set on every write",
    "state": "change state with transition(), which checks the current state atomically",
}
_UPDATABLE = frozenset(attr.key for attr in JobRow.__mapper__.column_attrs) - _READ_ONLY.keys()
_JSON_FIELDS = frozenset({"spec", "latest_metrics", "best_metrics", "history", "restart_log"})
_STATES = frozenset(s.value for s in JobState)
_PHASES = frozenset(p.value for p in JobPhase)
_FORMATS = frozenset(f.value for f in CheckpointFormat)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A lost queue_seq race costs one retry; needing this many means something else is wrong.
_CREATE_ATTEMPTS = 8
# PostgreSQL: job inserts take this transaction-level advisory lock first, so concurrent submissions
# (threads, API replicas) number the queue one after another instead of colliding and retrying (a
# retry storm under 4 concurrent submitters exhausted the attempts in CI). Any fixed 64-bit key.
_QUEUE_LOCK_KEY = 0x6467327066_7173  # "dg2pf" "qs"


def _json_value(field: str, value: Any) -> Any:
    """``value`` with NaN/inf replaced by None, after checking it is JSON at all.

    JSON has no NaN and PostgreSQL refuses it, yet a diverged run reports a NaN loss; storing null
    keeps the job's progress recordable instead of failing every update from then on.
    """

    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    cleaned = finite(value)
    try:
        json.dumps(cleaned, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"job field {field!r} must be JSON-serialisable (dicts with str keys, lists, str, numbers, bool, None): {e}"
        ) from None
    return cleaned


def _check_state(state: str, what: str) -> str:
    if state not in _STATES:
        raise ValueError(f"{what} {state!r} is not a job state; valid: {', '.join(JobState)}")
    return str(state)


def _check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    for key in fields:
        if key in _READ_ONLY:
            raise ValueError(f"job field {key!r} cannot be updated: {_READ_ONLY[key]}")
        if key not in _UPDATABLE:
            raise ValueError(f"unknown job field {key!r}; updatable fields: {', '.join(sorted(_UPDATABLE))}")
    if "phase" in fields and fields["phase"] not in _PHASES:
        raise ValueError(f"phase {fields['phase']!r} is not a job phase; valid: {', '.join(JobPhase)}")
    fields = {k: (_json_value(k, v) if k in _JSON_FIELDS else v) for k, v in fields.items()}
    for key, value in fields.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(
                f"job field {key!r} got naive datetime {value.isoformat()}; "
                "pass a timezone-aware one, e.g. datetime.now(UTC)"
            )
    return {k: (str(v) if k == "phase" else v) for k, v in fields.items()}


class JobStore:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(
        self, spec: dict[str, Any], name: str | None, target_sparsity: float, artifacts_root: Path
    ) -> JobRow:
        """A new queued job at the back of the FIFO; its artifacts go to ``artifacts_root/<id>``."""
        if not isinstance(spec, dict):
            raise TypeError(f"spec must be a dict (e.g. JobSpec.model_dump(mode='json')), got {type(spec).__name__}")
        spec = _json_value("spec", spec)
        if not 0.0 <= target_sparsity < 1.0:  # 0: decided during the run (a job's target_macs_ratio)
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        root = Path(artifacts_root).expanduser().resolve()
        # max+1 evaluated inside the INSERT: on SQLite the statement holds the write lock; on
        # PostgreSQL the advisory lock serialises the inserts (each sees the previous one committed),
        # and should two writers still compute the same number (a writer that does not take the
        # lock), the unique constraint turns the loser into an IntegrityError, retried here.
        next_seq = select(func.coalesce(func.max(JobRow.queue_seq), 0) + 1).scalar_subquery()
        last_error: IntegrityError | None = None
        for _ in range(_CREATE_ATTEMPTS):
            job_id = uuid.uuid4().hex
            now = utcnow()
            stmt = (
                insert(JobRow)
                .values(
                    id=job_id,
                    name=name,
                    state=JobState.QUEUED.value,
                    phase=JobPhase.PENDING.value,
                    spec=spec,
                    target_sparsity=float(target_sparsity),
                    artifacts_dir=str(root / job_id),
                    created_at=now,
                    updated_at=now,
                    queue_seq=next_seq,
                )
                .returning(JobRow)
            )
            try:
                with write_session(self._sessions) as session:
                    if session.get_bind().dialect.name == "postgresql":
                        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _QUEUE_LOCK_KEY})
                    return session.scalars(stmt).one()
            except IntegrityError as e:
                last_error = e
        raise RuntimeError(f"could not assign a queue position after {_CREATE_ATTEMPTS} attempts: {last_error}")

    def get_job(self, job_id: str) -> JobRow | None:
        with self._sessions() as session:
            return session.get(JobRow, job_id)

    def list_jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[JobRow], int]:
        """One page of jobs, newest first, and the number of jobs matching ``state`` in all."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, got limit={limit}, offset={offset}")
        where = [] if state is None else [JobRow.state == _check_state(state, "state filter")]
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(JobRow).where(*where)) or 0
            rows = session.scalars(
                select(JobRow).where(*where).order_by(JobRow.queue_seq.desc()).limit(limit).offset(offset)
            ).all()
        return list(rows), total

    def recent_states(self, limit: int) -> list[tuple[str, str]]:
        """``(id, state)`` of the ``limit`` newest jobs: what a follower of many jobs reads each pass
        without loading their histories."""
        with self._sessions() as session:
            return [
                (i, s)
                for i, s in session.execute(
                    select(JobRow.id, JobRow.state).order_by(JobRow.queue_seq.desc()).limit(limit)
                ).all()
            ]

    def queued_in_order(self) -> list[JobRow]:
        """Queued jobs, first submitted first."""
        return self._in_state(JobState.QUEUED)

    def active_jobs(self) -> list[JobRow]:
        """Running jobs, in submission order."""
        return self._in_state(JobState.RUNNING)

    def _in_state(self, state: JobState) -> list[JobRow]:
        with self._sessions() as session:
            return list(
                session.scalars(select(JobRow).where(JobRow.state == state.value).order_by(JobRow.queue_seq)).all()
            )

    def update_job(self, job_id: str, **fields: Any) -> JobRow:
        """Set progress fields (phase, epoch, metrics, ...) whatever the state; refuses unknown fields."""
        values = _check_fields(fields)
        stmt = update(JobRow).where(JobRow.id == job_id).values(**values, updated_at=utcnow()).returning(JobRow)
        with write_session(self._sessions) as session:
            row = session.scalars(stmt, execution_options={"synchronize_session": False}).one_or_none()
        if row is None:
            raise JobNotFoundError(job_id)
        return row

    def transition(
        self,
        job_id: str,
        from_states: Iterable[str],
        to_state: str,
        *,
        expect_submission: str | None = None,
        **fields: Any,
    ) -> JobRow | None:
        """Move the job to ``to_state`` (setting ``fields`` too) only if it is in ``from_states`` now
        (and, with ``expect_submission``, still has that Ray submission id).

        A compare-and-set in one UPDATE: of two racing transitions out of the same state exactly
        one wins (two schedulers resubmitting one lost job: only one of them does). Returns the
        updated row, or None when the job was in another state (the caller lost the race or the job
        already finished). Raises JobNotFoundError for an unknown id.
        """
        sources = sorted({_check_state(s, "from state") for s in from_states})
        if not sources:
            raise ValueError("from_states is empty: name the states the job may be leaving")
        values = _check_fields(fields)
        where = [JobRow.id == job_id, JobRow.state.in_(sources)]
        if expect_submission is not None:
            where.append(JobRow.ray_submission_id == expect_submission)
        stmt = (
            update(JobRow)
            .where(*where)
            .values(**values, state=_check_state(to_state, "to_state"), updated_at=utcnow())
            .returning(JobRow)
        )
        with write_session(self._sessions) as session:
            row = session.scalars(stmt, execution_options={"synchronize_session": False}).one_or_none()
        if row is None and self.get_job(job_id) is None:
            raise JobNotFoundError(job_id)
        return row

    def ping(self) -> None:
        """Raise if the database does not answer (for readiness checks)."""
        with self._sessions() as session:
            session.execute(select(1))

    # -- checkpoints --------------------------------------------------------------------------

    def add_checkpoint(self, sha256: str, bytes: int, path: str, format: str) -> CheckpointRow:  # noqa: A002 (column names)
        """Record an uploaded checkpoint; the same content (sha256) returns the existing row."""
        digest = sha256.lower()
        if not _SHA256.fullmatch(digest):
            raise ValueError(f"sha256 must be 64 hex characters, got {sha256!r}")
        if format not in _FORMATS:
            raise ValueError(f"checkpoint format {format!r} is not supported; valid: {', '.join(CheckpointFormat)}")
        if bytes < 0:
            raise ValueError(f"checkpoint size must be >= 0 bytes, got {bytes}")
        checkpoint_id = digest[:32]
        existing = self.get_checkpoint(checkpoint_id)
        if existing is not None:
            return existing
        row = CheckpointRow(
            id=checkpoint_id, sha256=digest, bytes=int(bytes), path=str(path), format=str(format), created_at=utcnow()
        )
        return self._insert_or_existing(row, lambda: self.get_checkpoint(checkpoint_id))

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointRow | None:
        with self._sessions() as session:
            return session.get(CheckpointRow, checkpoint_id)

    # -- deployments --------------------------------------------------------------------------

    def add_deployment(self, model_id: str, output_dir: str) -> DeploymentRow:
        """Record ``model_id`` as deployed; deploying it again returns the existing row."""
        existing = self.get_deployment(model_id)
        if existing is not None:
            return existing
        row = DeploymentRow(model_id=model_id, output_dir=str(output_dir), created_at=utcnow())
        return self._insert_or_existing(row, lambda: self.get_deployment(model_id))

    def get_deployment(self, model_id: str) -> DeploymentRow | None:
        with self._sessions() as session:
            return session.get(DeploymentRow, model_id)

    def list_deployments(self) -> list[DeploymentRow]:
        with self._sessions() as session:
            return list(
                session.scalars(select(DeploymentRow).order_by(DeploymentRow.created_at, DeploymentRow.model_id))
            )

    def remove_deployment(self, model_id: str) -> bool:
        """True when a deployment was removed."""
        with write_session(self._sessions) as session:
            return session.execute(delete(DeploymentRow).where(DeploymentRow.model_id == model_id)).rowcount > 0

    def _insert_or_existing(self, row: Any, existing: Any) -> Any:
        """Insert ``row``; if another writer committed the same key between our read and our insert,
        return theirs (``existing()``), so concurrent identical requests all succeed."""
        try:
            with write_session(self._sessions) as session:
                session.add(row)
            return row
        except IntegrityError:
            found = existing()
            if found is None:
                raise
            return found
