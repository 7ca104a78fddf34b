"""Fixtures for the service tests: a fresh PostgreSQL database on the real server; the light client alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

PG_SERVER = os.environ.get("DG2PF_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    import psycopg2

    server = make_url(PG_SERVER)
    connect = dict(host=server.host, port=server.port or 5432, user=server.username, password=server.password, dbname=server.database)
    try:
        admin = psycopg2.connect(**connect, connect_timeout=3)
    except psycopg2.OperationalError as e:
        pytest.fail(f"no PostgreSQL at {server.render_as_string(hide_password=True)} (scripts/test.sh starts it; or set DG2PF_TEST_POSTGRES): {e}")
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    name = f"dg2pf_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def light_client_bin(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv (no system site packages) holding only ``pip install clients/``
    (dg2pf-client and what it depends on, from the package index): as a user without torch has it."""
    root = tmp_path_factory.mktemp("light-client")
    clients = Path(__file__).resolve().parents[2] / "clients"
    src = root / "src"  # a copy: the build leaves build/ and *.egg-info beside the sources
    shutil.copytree(clients, src, ignore=shutil.ignore_patterns("__pycache__", "build", "dist", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    pip = subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", str(src)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return root / "venv" / "bin"
