"""The job store on both backends it supports: a SQLite file and PostgreSQL.

PostgreSQL comes from DG2PF_TEST_POSTGRES (default: trust auth as postgres on 127.0.0.1:5432); a
fresh database is created for this module and dropped afterwards. scripts/test.sh makes sure the server
runs; without one those cases fail.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from dg2pf_service.store import JobNotFoundError, JobState, JobStore, make_engine, make_sessionmaker, upgrade
from dg2pf_service.store.migrate import current_revision, head_revision
from dg2pf_service.store.models import Base

SHA = "ab" * 32
T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database (no schema yet) on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'dg2pf.db'}"
    url: str = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[JobStore]:
    upgrade(db_url)
    engine = make_engine(db_url)
    yield JobStore(make_sessionmaker(engine))
    engine.dispose()


def new_job(store: JobStore, tmp_path: Path, name: str | None = None, **spec: Any) -> str:
    return store.create_job({"sparsity": 0.5, **spec}, name, 0.5, tmp_path / "jobs").id


def in_threads(fns: list[Callable[[], T]]) -> list[T]:
    """Run the callables at the same moment, one thread each, and return their results in order."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


# -- migrations -------------------------------------------------------------------------------


def test_ping_answers_once_migrated(store: JobStore) -> None:
    store.ping()


def test_migrations_create_the_schema_and_are_idempotent(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # every start-up runs it; the second must be a no-op, not an error
    engine = make_engine(db_url)
    try:
        insp = inspect(engine)
        assert {"jobs", "checkpoints", "alembic_version"} <= set(insp.get_table_names())
        assert {ix["name"] for ix in insp.get_indexes("jobs")} >= {"ix_jobs_state", "ix_jobs_ray_submission_id"}
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_models_describe_exactly_what_the_migrations_create(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations disagree (write a new migration): {diff}"


def test_concurrent_start_ups_migrate_once(db_url: str) -> None:
    in_threads([lambda: upgrade(db_url) for _ in range(3)])
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_sqlite_database_is_in_wal_mode_in_a_created_directory(tmp_path: Path) -> None:
    db_file = tmp_path / "not" / "yet" / "there" / "dg2pf.db"
    upgrade(f"sqlite:///{db_file}")
    assert db_file.is_file()
    # journal_mode=WAL is persistent, so a plain connection without our pragmas sees it too.
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- jobs -------------------------------------------------------------------------------------


def test_queued_jobs_come_out_first_in_first_out(store: JobStore, tmp_path: Path) -> None:
    ids = [new_job(store, tmp_path, name=f"job{i}") for i in range(5)]
    assert store.transition(ids[1], {JobState.QUEUED}, JobState.RUNNING) is not None

    queued = store.queued_in_order()
    assert [j.id for j in queued] == [ids[0], ids[2], ids[3], ids[4]]
    assert [j.queue_seq for j in queued] == sorted(j.queue_seq for j in queued)
    assert [j.id for j in store.active_jobs()] == [ids[1]]


def test_new_jobs_start_queued_with_their_own_artifacts_dir(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job({"sparsity": 0.9}, "resnet", 0.9, tmp_path / "jobs")
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert (job.state, job.phase, job.epoch, job.current_sparsity) == ("queued", "pending", 0, 0.0)
    assert job.target_sparsity == 0.9 and job.name == "resnet"
    assert job.history == [] and job.latest_metrics is None and job.best_metrics is None
    assert Path(job.artifacts_dir) == (tmp_path / "jobs" / job.id).resolve()


def test_concurrent_submissions_get_distinct_queue_positions(store: JobStore, tmp_path: Path) -> None:
    def submit() -> list[int]:
        return [store.create_job({"n": i}, None, 0.5, tmp_path).queue_seq for i in range(10)]

    # 8 writers at once: with retries alone (no lock) on PostgreSQL, a writer could lose 8 races in a row.
    seqs = [s for batch in in_threads([submit] * 8) for s in batch]
    assert len(set(seqs)) == 80
    assert [j.queue_seq for j in store.queued_in_order()] == sorted(seqs)


def test_transition_is_a_compare_and_set(store: JobStore, tmp_path: Path) -> None:
    for _ in range(10):
        job_id = new_job(store, tmp_path)
        assert store.transition(job_id, {"queued"}, "running") is not None
        results = in_threads(
            [
                lambda: store.transition(job_id, {"running"}, "cancelled"),
                lambda: store.transition(job_id, {"running"}, "succeeded", phase="done"),
            ]
        )
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, f"both or neither transition won: {results}"
        final = store.get_job(job_id)
        assert final is not None and final.state == winners[0].state

    # The case the compare-and-set exists for: a late "succeeded" must not overwrite "cancelled".
    job_id = new_job(store, tmp_path)
    store.transition(job_id, {"queued"}, "running")
    assert store.transition(job_id, {"queued", "running"}, "cancelled") is not None
    assert store.transition(job_id, {"running"}, "succeeded", phase="done") is None
    final = store.get_job(job_id)
    assert final is not None and (final.state, final.phase) == ("cancelled", "pending")


def test_transition_rejects_bad_input(store: JobStore, tmp_path: Path) -> None:
    job_id = new_job(store, tmp_path)
    with pytest.raises(JobNotFoundError, match="no job with id"):
        store.transition("0" * 32, {"queued"}, "running")
    with pytest.raises(ValueError, match="'finished' is not a job state"):
        store.transition(job_id, {"queued"}, "finished")
    with pytest.raises(ValueError, match="from_states is empty"):
        store.transition(job_id, set(), "running")
    job = store.get_job(job_id)
    assert job is not None and job.state == "queued"


def test_list_jobs_filters_pages_and_counts(store: JobStore, tmp_path: Path) -> None:
    ids = [new_job(store, tmp_path) for _ in range(7)]
    for job_id in ids[:3]:
        store.transition(job_id, {"queued"}, "running")
    newest_first = list(reversed(ids))

    page, total = store.list_jobs(limit=3, offset=0)
    assert total == 7 and [j.id for j in page] == newest_first[:3]
    pages = [store.list_jobs(limit=3, offset=o)[0] for o in (0, 3, 6)]
    assert [j.id for p in pages for j in p] == newest_first
    assert store.list_jobs(limit=3, offset=9) == ([], 7)

    running, total = store.list_jobs(state="running", limit=2, offset=0)
    assert total == 3 and [j.id for j in running] == [ids[2], ids[1]]
    assert store.list_jobs(state="failed", limit=10, offset=0) == ([], 0)
    with pytest.raises(ValueError, match="valid: queued, running"):
        store.list_jobs(state="done", limit=10, offset=0)


def test_update_job_refuses_unknown_and_store_owned_fields(store: JobStore, tmp_path: Path) -> None:
    job_id = new_job(store, tmp_path)
    with pytest.raises(ValueError, match="unknown job field 'epoch_count'"):
        store.update_job(job_id, epoch=3, epoch_count=3)
    with pytest.raises(ValueError, match="transition"):
        store.update_job(job_id, state="succeeded")
    with pytest.raises(ValueError, match="'queue_seq' cannot be updated"):
        store.update_job(job_id, queue_seq=0)
    with pytest.raises(ValueError, match="not a job phase"):
        store.update_job(job_id, phase="warmup")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        store.update_job(job_id, latest_metrics={"when": datetime.now(UTC)})
    with pytest.raises(JobNotFoundError):
        store.update_job("f" * 32, epoch=1)

    job = store.get_job(job_id)
    assert job is not None and (job.state, job.epoch, job.latest_metrics) == ("queued", 0, None)
    updated = store.update_job(job_id, epoch=3, phase="gradual_pruning", current_sparsity=0.25, eta_seconds=12.5)
    assert (updated.epoch, updated.phase, updated.current_sparsity, updated.eta_seconds) == (
        3,
        "gradual_pruning",
        0.25,
        12.5,
    )


def test_json_fields_round_trip(store: JobStore, db_url: str, tmp_path: Path) -> None:
    spec = {
        "model": {"arch": "cifar/resnet18", "num_classes": 10},
        "schedule": {"epochs": [1, 2, 3]},
        "serve": False,
        "teacher": None,
    }
    job_id = store.create_job(spec, "rt", 0.8, tmp_path).id
    history = [
        {"epoch": 0, "phase": "baseline", "sparsity": 0.0, "val": {"top1": 0.91, "loss": 0.3}},
        {"epoch": 1, "phase": "gradual_pruning", "sparsity": 0.4, "val": {"top1": 0.9}, "note": "µ-step ✓"},
    ]
    store.update_job(job_id, history=history, latest_metrics=history[-1]["val"], best_metrics={"top1": 0.91})

    # A second engine reads what was committed, not anything cached in the first.
    engine = make_engine(db_url)
    try:
        job = JobStore(make_sessionmaker(engine)).get_job(job_id)
    finally:
        engine.dispose()
    assert job is not None  # and every attribute below is readable with its session closed
    assert job.spec == spec and job.history == history
    assert job.latest_metrics == {"top1": 0.9} and job.best_metrics == {"top1": 0.91}

    # JSON (and PostgreSQL) has no NaN; a diverged run's loss is stored as null, not refused.
    store.update_job(job_id, latest_metrics={"loss": float("nan"), "top1": 0.1}, history=[{"loss": float("inf")}])
    job = store.get_job(job_id)
    assert job is not None and job.latest_metrics == {"loss": None, "top1": 0.1} and job.history == [{"loss": None}]

    store.update_job(job_id, latest_metrics=None)
    job = store.get_job(job_id)
    assert job is not None and job.latest_metrics is None


def test_timestamps_are_timezone_aware_utc(store: JobStore, tmp_path: Path) -> None:
    job = store.create_job({}, None, 0.5, tmp_path)
    assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)
    started = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).astimezone()  # local zone in, UTC out
    running = store.transition(job.id, {"queued"}, "running", started_at=started)
    assert running is not None

    reread = store.get_job(job.id)
    assert reread is not None
    for stamp in (reread.created_at, reread.updated_at, reread.started_at):
        assert stamp is not None and stamp.utcoffset() == timedelta(0)
    assert reread.started_at == started
    assert reread.updated_at >= reread.created_at
    assert reread.finished_at is None
    with pytest.raises(ValueError, match="naive datetime"):
        store.update_job(job.id, finished_at=datetime(2030, 1, 1))


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoints_are_deduplicated_by_content(store: JobStore) -> None:
    first = store.add_checkpoint(SHA, 5 * 1024**3, "/data/checkpoints/a.safetensors", "safetensors")
    again = store.add_checkpoint(SHA.upper(), 5 * 1024**3, "/data/checkpoints/b.safetensors", "safetensors")
    assert first.id == again.id == SHA[:32]
    assert again.path == "/data/checkpoints/a.safetensors"  # the first upload's file stays the one used

    got = store.get_checkpoint(SHA[:32])
    assert got is not None and (got.sha256, got.bytes, got.format) == (SHA, 5 * 1024**3, "safetensors")
    assert got.created_at.utcoffset() == timedelta(0)
    assert store.get_checkpoint("0" * 32) is None

    racing = in_threads([lambda i=i: store.add_checkpoint("cd" * 32, 10, f"/c/{i}.pt", "torch") for i in range(3)])
    assert len({r.id for r in racing}) == 1 and len({r.path for r in racing}) == 1


def test_add_checkpoint_rejects_bad_input(store: JobStore) -> None:
    with pytest.raises(ValueError, match="64 hex characters"):
        store.add_checkpoint("abc", 1, "/x", "torch")
    with pytest.raises(ValueError, match="valid: safetensors, torch"):
        store.add_checkpoint(SHA, 1, "/x", "onnx")


def test_deployments_are_idempotent_listed_in_order_and_removable(store: JobStore) -> None:
    a, b = "a" * 32, "b" * 32
    first = store.add_deployment(b, "/data/jobs/b/output")
    assert store.add_deployment(b, "/elsewhere").output_dir == "/data/jobs/b/output"  # deploying twice: same row
    store.add_deployment(a, "/data/jobs/a/output")
    assert [d.model_id for d in store.list_deployments()] == [b, a]  # oldest first
    assert store.get_deployment(b).created_at == first.created_at
    assert in_threads([lambda: store.add_deployment("c" * 32, "/x")] * 4)[0].model_id == "c" * 32
    assert store.remove_deployment(b) is True and store.remove_deployment(b) is False
    assert store.get_deployment(b) is None and {d.model_id for d in store.list_deployments()} == {a, "c" * 32}


def test_services_starting_together_on_a_new_sqlite_file_all_come_up(tmp_path: Path) -> None:
    # Switching a new file to WAL needs an exclusive lock, and SQLite refuses it at once (no busy
    # wait) to a connection that already reads: start-ups racing on one new file failed now and then
    # with "database is locked" (9 rounds in 100 before the fix). 40 rounds of 3 at once, each a new file.
    for round_ in range(40):
        url = f"sqlite:///{tmp_path / f'db{round_}.sqlite'}"
        in_threads([lambda: upgrade(url) for _ in range(3)])
        with sqlite3.connect(tmp_path / f"db{round_}.sqlite") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
