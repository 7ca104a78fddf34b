"""Engines and sessions for the job store: a SQLite file by default, PostgreSQL for several replicas."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 5000
# The longest a write waits for its turn while the writes before it do commit: its answer (503 at
# worst) comes well within a client's timeout (dg2pf_client: 60 s).
SQLITE_WRITE_WAIT_MAX_S = 30.0
# What an API client waiting on a busy store is told to wait before trying again (Retry-After).
RETRY_AFTER_S = 1

# Messages and SQLSTATEs of a database that is busy rather than broken: asking again shortly succeeds.
_BUSY_MESSAGES = (
    "database is locked",
    "database table is locked",
    "database is busy",
    "too many clients",
    "too many connections",
)
_BUSY_SQLSTATES = frozenset(
    {
        "55P03",  # lock_not_available
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "53300",  # too_many_connections
        "57P03",  # cannot_connect_now (starting up or shutting down)
    }
)


class DatabaseURLError(ValueError):
    pass


def redact_url(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` in it hidden, parsable or not."""
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"^(?![A-Za-z][A-Za-z0-9+.-]*://)([^:/@\s]*:)[^@\s]*@", r"\1***@", text)  # no scheme: user:pw@host


class StoreBusy(RuntimeError):
    """A write could not have its turn at the database in time (``_Turns``): try again shortly."""


def busy_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is the store being busy or briefly unreachable (asking again shortly should succeed),
    or None for any other failure (a bug, a missing table: retrying would not help)."""
    if isinstance(exc, StoreBusy):
        return str(exc)
    if isinstance(exc, PoolTimeoutError):
        return "every database connection is in use"
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return "the connection to the database was lost"
    if isinstance(exc, OperationalError):
        text = " ".join(str(exc.orig).split())
        if getattr(exc.orig, "pgcode", None) in _BUSY_SQLSTATES or any(m in text.lower() for m in _BUSY_MESSAGES):
            return f"the database is busy ({text[:120]})"
    return None


class _Turns:
    """The writes of one SQLite file in this process, one at a time.

    SQLite takes one writer at a time. Left to its busy handler, the writers of one process poll for
    the lock (sleeping up to 100 ms between tries), and under a burst of submissions the unlucky ones
    starve past the busy timeout ("database is locked") while the others get through. Queued here
    instead, each gets the database as soon as the one before it commits, and waits while the writes
    before it commit: it gives up (``StoreBusy``) only when none has for ``SQLITE_BUSY_TIMEOUT_MS``
    (the database is stuck, e.g. another process holds its lock), or after ``SQLITE_WRITE_WAIT_MAX_S``.
    SQLite's busy timeout then covers the writers of other processes only.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._committed = 0.0  # time.monotonic() of the last write that committed

    @contextmanager
    def turn(self) -> Iterator[None]:
        patience, started = SQLITE_BUSY_TIMEOUT_MS / 1000, time.monotonic()
        while True:
            now = time.monotonic()
            deadline = min(max(started, self._committed) + patience, started + SQLITE_WRITE_WAIT_MAX_S)
            if now >= deadline:
                stuck = deadline < started + SQLITE_WRITE_WAIT_MAX_S
                raise StoreBusy(
                    f"no write committed for {patience:g} s"
                    if stuck
                    else f"a write waited {SQLITE_WRITE_WAIT_MAX_S:g} s for its turn"
                )
            if self._lock.acquire(timeout=deadline - now):
                break
        try:
            yield
            self._committed = time.monotonic()
        finally:
            self._lock.release()


_TURNS: dict[str, _Turns] = {}
_TURNS_GUARD = threading.Lock()


def _turns(engine: Engine | None) -> _Turns | None:
    database = engine.url.database if engine is not None and engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    key = os.path.realpath(Path(database).expanduser())
    with _TURNS_GUARD:
        return _TURNS.setdefault(key, _Turns())


@contextmanager
def write_session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session in a transaction that commits on exit, for a write.

    On a SQLite file the writes of this process take turns (``_Turns``); one that cannot have its
    turn raises ``StoreBusy`` (the API's 503).
    """
    turns = _turns(sessions.kw.get("bind"))
    with turns.turn() if turns is not None else nullcontext(), sessions.begin() as session:
        yield session


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # busy_timeout first: a second writer then waits for the lock instead of failing at once with
    # "database is locked". WAL lets the API read while the executor writes.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        _into_wal(cursor)
    finally:
        cursor.close()


def _into_wal(cursor: Any) -> None:
    """Put the database in WAL mode (persistent: a no-op once any connection has done it).

    Switching needs an exclusive lock, and SQLite answers "database is locked" at once, without
    calling the busy handler, when the connection asking already reads the file (a wait could
    deadlock). Several processes starting on a new file at once therefore ask again, until the
    busy timeout has passed.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() in ("wal", "memory"):
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine for ``url``, tuned for the backend (extra kwargs go to ``create_engine``).

    SQLite: WAL journal, foreign keys, a 5 s busy timeout, usable from several threads, and the
    file's directory is created. PostgreSQL: connections are checked before use, so a restarted
    database costs one retry rather than an error per pooled connection.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        raise DatabaseURLError(
            f"cannot parse database URL {redact_url(url)!r} ({redact_url(str(e))}); "
            "expected e.g. sqlite:////var/lib/dg2pf/dg2pf.db "
            "or postgresql+psycopg2://user:password@host:5432/dg2pf"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit, so rows can leave the store."""
    return sessionmaker(engine, expire_on_commit=False)
