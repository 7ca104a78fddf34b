"""Bring a database to the newest schema; run at every start-up, from any number of processes."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from dg2pf_service.store.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Any fixed 64-bit number works; it only has to be the same in every replica of the service.
_PG_MIGRATION_LOCK = 0x6467327066  # "dg2pf" in ASCII


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for the packaged migrations, with no alembic.ini needed."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # The connection travels in attributes rather than as sqlalchemy.url: no password in the
    # config, no '%' interpolation surprises, and the caller's lock/transaction is reused.
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations found in {MIGRATIONS_DIR}"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str | Engine) -> None:
    """Run ``alembic upgrade head`` against ``url`` (a no-op when already at head).

    Concurrent callers are serialised: on PostgreSQL by a transaction-scoped advisory lock, on
    SQLite by taking the write lock (BEGIN IMMEDIATE) before reading the schema version. The whole
    upgrade is one transaction on both, so a failed migration leaves the schema as it was.
    """
    engine = make_engine(url) if isinstance(url, str) else url
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            elif conn.dialect.name == "sqlite":
                # pysqlite only opens transactions before DML; DDL would otherwise autocommit
                # statement by statement and two processes could both see "no schema yet".
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            command.upgrade(alembic_config(conn), "head")
            conn.commit()
    finally:
        if isinstance(url, str):
            engine.dispose()
