"""Shared fixtures: tiny models and data for fast property tests, the real digits example for e2e, a fresh
PostgreSQL database for the store and service tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny import TinyNet, tiny_data

from dg2pf_core.data.loaders import LocalLoaders

PG_SERVER = os.environ.get("DG2PF_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_loaders() -> LocalLoaders:
    return LocalLoaders(
        tiny_data(96, seed=0), tiny_data(32, seed=1), tiny_data(32, seed=2), batch_size=16, eval_batch_size=64, seed=0
    )


@pytest.fixture(scope="session")
def digits_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pre-trained digits example (trained once per test session, 10-20 s on 2 cores)."""
    from dg2pf_core.job.example import write_example

    out = tmp_path_factory.mktemp("example") / "digits"
    write_example("digits", out)
    return out


@pytest.fixture(scope="session", autouse=True)
def _image_check_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Image-check caches of the tests' datasets go to a temporary folder, not the user's ~/.cache
    (set in the environment, so the service and runner processes the tests start use it too)."""
    os.environ["DG2PF_CACHE_DIR"] = str(tmp_path_factory.mktemp("dg2pf-cache"))


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    import psycopg2
    from sqlalchemy.engine import make_url

    server = make_url(PG_SERVER)
    connect = dict(
        host=server.host,
        port=server.port or 5432,
        user=server.username,
        password=server.password,
        dbname=server.database,
    )
    try:
        admin = psycopg2.connect(**connect, connect_timeout=3)
    except psycopg2.OperationalError as e:
        pytest.fail(
            f"no PostgreSQL at {server.render_as_string(hide_password=True)} "
            f"(scripts/test.sh starts it; or set DG2PF_TEST_POSTGRES): {e}"
        )
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
