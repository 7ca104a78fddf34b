"""Engines and sessions for the job store: a SQLite file by default, PostgreSQL for several replicas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 5000


class DatabaseURLError(ValueError):
    pass


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the executor writes; busy_timeout makes a second writer wait for
    # the lock instead of failing at once with "database is locked".
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine for ``url``, tuned for the backend (extra kwargs go to ``create_engine``).

    SQLite: WAL journal, foreign keys, a 5 s busy timeout, usable from several threads, and the
    file's directory is created. PostgreSQL: connections are checked before use, so a restarted
    database costs one retry rather than an error per pooled connection.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise DatabaseURLError(
            f"cannot parse database URL {url!r} ({e}); expected e.g. sqlite:////var/lib/dg2pf/dg2pf.db "
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
