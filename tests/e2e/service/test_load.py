"""Many submissions at once: a busy store answers 503 with Retry-After, never a 500 or a dropped
connection, and every accepted job is stored exactly once, on SQLite and on PostgreSQL.

The load runs against a real service (uvicorn, an embedded Ray head, the real database) whose scheduler
never ticks after start-up, so the jobs stay queued and none of them runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import Counter
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from service_process import ServiceProcess
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from dg2pf_service.api.app import create_app
from dg2pf_service.settings import Settings
from dg2pf_service.store import JobStore, db, make_engine, make_sessionmaker, upgrade

SUBMISSIONS, IN_FLIGHT = 200, 50


def spec(checkpoint: str, i: int) -> dict:
    return {
        "name": f"load-{i}",
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": checkpoint},
        "dataset": {"spec": "digits"},
        "sparsity": 0.5,
    }


def _bare_app(store) -> TestClient:
    # The app without its lifespan (no Ray, no database): the routes meet the store given.
    app = create_app()
    app.state.services = SimpleNamespace(settings=Settings(api_tokens=[]), store=store)
    return TestClient(app, raise_server_exceptions=False)


def _assert_busy(r: httpx.Response) -> dict:
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers.get("connection") != "close"  # the client may send its next request on the same connection
    error = r.json()["error"]
    assert set(error) == {"type", "field", "message"} and error["type"] == "store_busy", error
    assert "try again" in error["message"]
    return error


def _raising(exc: Exception):
    def raise_it(*args, **kwargs):
        raise exc

    return raise_it


def test_a_locked_sqlite_database_answers_503_with_retry_after():
    locked = OperationalError("INSERT INTO jobs ...", {}, sqlite3.OperationalError("database is locked"))
    client = _bare_app(SimpleNamespace(list_jobs=_raising(locked), get_job=_raising(locked)))
    _assert_busy(client.get("/jobs"))
    _assert_busy(client.get(f"/jobs/{'0' * 32}"))


def test_an_exhausted_connection_pool_answers_503_with_retry_after():
    exhausted = PoolTimeout("QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00")
    _assert_busy(_bare_app(SimpleNamespace(list_jobs=_raising(exhausted))).get("/jobs"))


def test_an_exhausted_postgresql_pool_answers_503_with_retry_after(pg_url):
    upgrade(pg_url)
    engine = make_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    client = _bare_app(JobStore(make_sessionmaker(engine)))
    assert client.get("/jobs").status_code == 200
    with engine.connect():  # the pool's only connection, held
        _assert_busy(client.get("/jobs"))
    assert client.get("/jobs").status_code == 200
    engine.dispose()


def test_other_database_errors_stay_500():
    # A missing table is a broken deployment, not a busy one: retrying would not help.
    broken = OperationalError("SELECT ...", {}, sqlite3.OperationalError("no such table: jobs"))
    r = _bare_app(SimpleNamespace(list_jobs=_raising(broken))).get("/jobs")
    assert r.status_code == 500 and "retry-after" not in r.headers and r.json()["error"]["type"] == "internal"


def test_a_500_tells_the_client_not_to_reuse_the_connection():
    # uvicorn closes the connection after an unexpected exception; a client that sent its next request
    # on it would see that request dropped.
    client = _bare_app(SimpleNamespace(list_jobs=_raising(RuntimeError("a bug"))))
    r = client.get("/jobs")
    assert r.status_code == 500 and r.headers["connection"] == "close" and r.json()["error"]["type"] == "internal"


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch):
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 400)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    return sessions, JobStore(sessions)


def _in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_a_write_the_database_cannot_take_in_time_is_busy_not_a_bug(sqlite_store, tmp_path):
    sessions, store = sqlite_store
    # Another process writing: SQLite's own lock, past the busy timeout.
    other = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(OperationalError) as locked:
        store.create_job({}, "a", 0.5, tmp_path)
    assert "database is locked" in db.busy_reason(locked.value)
    other.execute("ROLLBACK")
    # A write of this process that does not finish: the next one waits its turn, then gives up.
    writing, finish = threading.Event(), threading.Event()

    def stuck_writer() -> None:
        with db.write_session(sessions):
            writing.set()
            finish.wait(10)

    holder = _in_thread(stuck_writer)
    assert writing.wait(10)
    started = time.monotonic()
    with pytest.raises(db.StoreBusy) as busy:
        store.create_job({}, "b", 0.5, tmp_path)
    assert 0.35 < time.monotonic() - started < 5 and "no write committed" in db.busy_reason(busy.value)
    finish.set()
    holder.join(10)
    assert store.create_job({}, "c", 0.5, tmp_path).name == "c"
    assert [row.name for row in store.list_jobs()[0]] == ["c"]  # the refused writes left nothing behind


def test_a_write_waits_its_turn_as_long_as_the_writes_before_it_commit(sqlite_store, tmp_path):
    sessions, store = sqlite_store
    writing = threading.Event()

    def busy_writer() -> None:  # holds the turn for 1.5 s (well past the 0.4 s timeout), committing all along
        with db.write_session(sessions):
            writing.set()
            for i in range(10):
                time.sleep(0.15)
                store.create_job({}, f"before-{i}", 0.5, tmp_path)

    holder = _in_thread(busy_writer)
    assert writing.wait(10)
    started = time.monotonic()
    assert store.create_job({}, "after", 0.5, tmp_path).name == "after"
    assert time.monotonic() - started > 1.0
    holder.join(10)
    assert [row.name for row in store.queued_in_order()] == [*(f"before-{i}" for i in range(10)), "after"]


async def _hammer(url: str, checkpoint: str) -> tuple[Counter, list[str], list[httpx.Response], list[str], float]:
    """``SUBMISSIONS`` POST /jobs, ``IN_FLIGHT`` at a time over kept-alive connections: the count of each
    status, the ids of the accepted jobs, the 503 answers, the transport errors (dropped connections), and
    the seconds it all took."""
    statuses: Counter = Counter()
    accepted: list[str] = []
    refused: list[httpx.Response] = []
    dropped: list[str] = []
    gate = asyncio.Semaphore(IN_FLIGHT)
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120.0)) as client:

        async def one(i: int) -> None:
            async with gate:
                try:
                    r = await client.post("/jobs", json=spec(checkpoint, i))
                except httpx.TransportError as exc:
                    dropped.append(f"{type(exc).__name__}: {exc}")
                    return
            statuses[r.status_code] += 1
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            elif r.status_code >= 500:
                refused.append(r)

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(SUBMISSIONS)))
    return statuses, accepted, refused, dropped, time.monotonic() - started


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request, tmp_path_factory):
    # No scheduler tick after start-up (the first one finds an empty queue): the jobs stay queued.
    env = {"DG2PF_POLL_SECONDS": "3600", "DG2PF_SERVE_POLL_SECONDS": "3600"}
    if request.param == "postgresql":
        env["DG2PF_DATABASE_URL"] = request.getfixturevalue("pg_url")
    svc = ServiceProcess(tmp_path_factory.mktemp(f"load-{request.param}") / "state", **env).start()
    yield svc
    svc.stop()


@pytest.mark.slow
def test_concurrent_submissions_are_each_stored_once_or_refused_with_503(service, digits_example):
    with (digits_example / "model.safetensors").open("rb") as fh:
        r = httpx.post(f"{service.url}/checkpoints", files={"file": ("model.safetensors", fh)}, timeout=60)
    assert r.status_code == 201, r.text
    statuses, accepted, refused, dropped, seconds = asyncio.run(_hammer(service.url, r.json()["id"]))
    print(
        f"\n{SUBMISSIONS} submissions, {IN_FLIGHT} in flight: {dict(statuses)} in {seconds:.1f} s, "
        f"{len(dropped)} dropped"
    )
    assert dropped == [], (dropped[:5], str(service.log_path))
    assert sum(statuses.values()) == SUBMISSIONS and set(statuses) <= {202, 503}, (
        statuses,
        [r.text for r in refused][:3],
    )
    for busy in refused:
        _assert_busy(busy)
    assert len(set(accepted)) == len(accepted)
    listed = httpx.get(f"{service.url}/jobs", params={"limit": 500}, timeout=60).json()
    ids = [item["id"] for item in listed["items"]]
    assert listed["total"] == len(ids) == len(accepted)  # nothing lost, nothing stored twice
    assert sorted(ids) == sorted(accepted)
    assert {item["state"] for item in listed["items"]} == {"queued"}
