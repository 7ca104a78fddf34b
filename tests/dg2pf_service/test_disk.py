"""A full disk: jobs that run out of space say so, keep what they had, and never leave half a file.

The disk filling up is simulated deterministically where the service writes and reads a job's files
(``OSError(ENOSPC)`` from the writer, the runner's exit status the scheduler reads), and, where this
machine lets an unprivileged user mount a small tmpfs in a user namespace, for real on a 2 MiB disk.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dg2pf_contract.artifacts import write_text_atomic
from dg2pf_service import runner
from dg2pf_service.executor import UNREADABLE, NoSpace, RayJobsExecutor, read_error, read_progress
from dg2pf_service.runner import ERROR, NO_SPACE, NO_SPACE_EXIT, STATE

FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, FULL)


def _job_dir(tmp_path: Path, with_state: bool = True) -> Path:
    job_dir = tmp_path / "jobs" / ("a" * 32)
    (job_dir / STATE).mkdir(parents=True)
    (job_dir / runner.JOB).write_text(json.dumps({"storage_path": str(tmp_path / "ray")}))
    if with_state:
        (job_dir / STATE / "train_state.pt").write_bytes(b"the last good epoch")
    return job_dir


def _run_failing_with(monkeypatch, job_dir: Path, exc: BaseException) -> int:
    def run(_):
        raise exc

    monkeypatch.setattr(runner, "run", run)
    monkeypatch.setattr(runner, "start_lifeline", lambda: None)
    monkeypatch.delenv(runner.CLUSTER_ADDRESS_ENV, raising=False)
    return runner.main([str(job_dir)])


# --- writing ------------------------------------------------------------------------------------


def test_an_atomic_write_that_fails_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "doc.json"
    write_text_atomic(path, '{"good": 1}')
    monkeypatch.setattr(os, "fsync", _disk_full)  # the data written, then the disk says it is full
    with pytest.raises(OSError) as caught:
        write_text_atomic(path, '{"good": 2, "padding": "' + "x" * 100_000 + '"}')
    assert caught.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_a_job_that_runs_out_of_space_says_so_and_keeps_its_last_epoch(tmp_path, monkeypatch, capsys):
    job_dir = _job_dir(tmp_path)
    partial = job_dir / STATE / "train_state.tmp"  # what the failed save of the next epoch left
    partial.write_bytes(b"half a state")
    written = str(partial)
    code = _run_failing_with(monkeypatch, job_dir, OSError(errno.ENOSPC, FULL, written))
    assert code == NO_SPACE_EXIT
    doc = json.loads((job_dir / ERROR).read_text())
    assert doc["type"] == NO_SPACE
    message = doc["message"]
    assert "no space left on device" in message and written in message and "DG2PF_DATA_DIR" in message
    assert "free now" in message and "Free space there" in message
    assert str(job_dir / STATE / "train_state.pt") in message  # what was kept, by name
    assert (job_dir / STATE / "train_state.pt").read_bytes() == b"the last good epoch"
    assert not partial.exists()  # freed for error.json
    err = capsys.readouterr().err
    assert err.count("no space left on device") == 1 and "Traceback" not in err


def test_a_wrapped_disk_full_error_is_named_too(tmp_path, monkeypatch):
    """Ray Train hands a worker's failure over as text; a DG2PFError (OutputError) carries the OSError as its cause."""
    job_dir = _job_dir(tmp_path, with_state=False)
    code = _run_failing_with(
        monkeypatch, job_dir, RuntimeError(f"worker 1 failed: OSError: [Errno 28] {FULL}: '/ckpt'")
    )
    assert code == NO_SPACE_EXIT and read_error(job_dir)["type"] == NO_SPACE

    from dg2pf_core.job import OutputError

    wrapped = OutputError("training finished but /out could not be written (No space left on device)")
    wrapped.__cause__ = OSError(errno.ENOSPC, FULL, str(tmp_path / "ray" / "ckpt"))
    code = _run_failing_with(monkeypatch, job_dir, wrapped)
    doc = read_error(job_dir)
    assert code == NO_SPACE_EXIT and doc["type"] == NO_SPACE
    assert "DG2PF_STORAGE_URI" in doc["message"] and "training finished but /out" in doc["message"]


def test_a_torch_save_on_a_full_disk_is_named_by_the_space_left(tmp_path, monkeypatch):
    """torch.save to a path says only "unexpected pos" when the disk is full: the disk itself is asked."""
    job_dir = _job_dir(tmp_path)
    free = {str(job_dir): 4096}
    monkeypatch.setattr(
        runner.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, free.get(str(p), 10**9))
    )
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert _run_failing_with(monkeypatch, job_dir, torch_says) == NO_SPACE_EXIT
    doc = read_error(job_dir)
    assert doc["type"] == NO_SPACE and "DG2PF_DATA_DIR" in doc["message"] and "4.0 KiB free now" in doc["message"]
    assert "RuntimeError: [enforce fail at inline_container.cc:672]" in doc["message"]
    from dg2pf_core.errors import ConfigError

    assert _run_failing_with(monkeypatch, job_dir, ConfigError("sparsity must be below 1", field="sparsity")) == 1
    assert read_error(job_dir)["type"] == "ConfigError"  # an error that says why stays what it is
    free.clear()  # the same error with space left is not a full disk
    assert _run_failing_with(monkeypatch, job_dir, torch_says) == 1 and read_error(job_dir)["type"] == "RuntimeError"


def test_other_failures_keep_their_type_and_exit_status_one(tmp_path, monkeypatch):
    job_dir = _job_dir(tmp_path)
    assert _run_failing_with(monkeypatch, job_dir, ValueError("bad value")) == 1
    assert read_error(job_dir) == {"type": "ValueError", "message": "bad value", "field": None}


def test_when_error_json_cannot_be_written_it_is_absent_and_the_exit_status_says_no_space(
    tmp_path, monkeypatch, capsys
):
    job_dir = _job_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", _disk_full)
    assert (
        _run_failing_with(monkeypatch, job_dir, OSError(errno.ENOSPC, FULL, str(job_dir / "progress.jsonl")))
        == NO_SPACE_EXIT
    )
    assert not (job_dir / ERROR).exists()
    assert not [p for p in job_dir.iterdir() if p.name.startswith(f".{ERROR}")]
    assert f"{job_dir / ERROR} could not be written" in capsys.readouterr().err
    # Another failure whose record the full disk refuses exits as a disk-full failure as well.
    assert _run_failing_with(monkeypatch, job_dir, ValueError("bad value")) == NO_SPACE_EXIT


def test_a_progress_line_cut_short_by_a_full_disk_is_removed(tmp_path, monkeypatch):
    from dg2pf_core.algorithm.state import EpochRecord

    path = tmp_path / "progress.jsonl"
    progress = runner._ProgressFile(path)
    record = EpochRecord(
        phase="gradual_pruning",
        epoch=1,
        sparsity=0.5,
        train_loss=1.0,
        val_top1=50.0,
        val_top5=90.0,
        lr=1e-3,
        seconds=1.0,
    )
    progress.end_epoch(record)
    before = path.read_bytes()

    def half_then_full(p, rec):
        with open(p, "a") as fh:
            fh.write(json.dumps(rec)[:20])
        raise OSError(errno.ENOSPC, FULL, str(p))

    monkeypatch.setattr(runner, "append_record", half_then_full)
    with pytest.raises(OSError):
        progress.end_epoch(record)
    assert path.read_bytes() == before


# --- reading ------------------------------------------------------------------------------------


def test_progress_after_a_damaged_line_is_still_read(tmp_path):
    (tmp_path / "progress.jsonl").write_text('{"epoch": 1}\n{"epo\n{"epoch": 2}\n{"epoch": 3')
    assert read_progress(tmp_path) == [{"epoch": 1}, {"epoch": 2}]


@pytest.mark.parametrize(
    "text, what", [("", "is empty"), ('{"type": "NoSp', "is not valid JSON"), ("[1, 2]", "not an error record")]
)
def test_a_damaged_error_json_is_read_as_a_clear_error_naming_the_file(tmp_path, text, what):
    (tmp_path / ERROR).write_text(text)
    doc = read_error(tmp_path)
    assert doc["type"] == UNREADABLE and str(tmp_path / ERROR) in doc["message"] and what in doc["message"]
    assert read_error(tmp_path / "elsewhere") is None


def test_submitting_on_a_full_disk_is_refused_as_no_space_and_keeps_job_json(tmp_path, monkeypatch):
    from dg2pf_contract.job import JobSpec

    job_dir = _job_dir(tmp_path)
    before = (job_dir / runner.JOB).read_text()
    executor = RayJobsExecutor(cluster=None)
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "c"},
            "dataset": {"spec": "digits"},
            "sparsity": 0.5,
        }
    )
    order = runner.JobFile(spec=spec, checkpoint=str(tmp_path / "c.safetensors"), storage_path=str(tmp_path / "ray"))
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(NoSpace, match="no space left on device writing .*job.json.*DG2PF_DATA_DIR"):
        executor.submit("a" * 32, job_dir, order, attempt=1)
    assert (job_dir / runner.JOB).read_text() == before
    assert NoSpace.__name__ == NO_SPACE  # the type the scheduler records for the job it refuses


# --- the scheduler ------------------------------------------------------------------------------


class _EndedRunner:
    """The executor as the scheduler sees a Ray job whose runner has exited with ``code``."""

    def __init__(self, code: int | None) -> None:
        self.code = code

    def status(self, submission_id):
        return "FAILED"

    def exit_code(self, submission_id):
        return self.code

    def logs_tail(self, submission_id, lines=20):
        return "dg2pf job failed: something"


def _scheduler_with_a_running_job(tmp_path, code: int | None):
    from dg2pf_service.scheduler import Scheduler
    from dg2pf_service.store.db import make_engine, make_sessionmaker
    from dg2pf_service.store.migrate import upgrade
    from dg2pf_service.store.repo import JobStore

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    store = JobStore(make_sessionmaker(make_engine(url)))
    row = store.create_job({"spec": {}, "resolved": {}}, "full-disk", 0.9, tmp_path / "jobs")
    row = store.transition(row.id, {"queued"}, "running", ray_submission_id=f"dg2pf-{row.id}")
    Path(row.artifacts_dir).mkdir(parents=True, exist_ok=True)
    scheduler = Scheduler(
        store,
        executor=_EndedRunner(code),
        cluster=None,
        capacity=lambda: (0, 0),
        make_order=None,
        jobs_dir=tmp_path / "jobs",
        max_restarts=0,
    )
    return scheduler, store, row


@pytest.mark.parametrize("error_json", [None, ""], ids=["absent", "empty"])
def test_the_scheduler_names_no_space_from_the_exit_status_when_error_json_is_missing_or_empty(
    tmp_path, error_json, caplog
):
    scheduler, store, row = _scheduler_with_a_running_job(tmp_path, NO_SPACE_EXIT)
    job_dir = Path(row.artifacts_dir)
    if error_json is not None:
        (job_dir / ERROR).write_text(error_json)
    with caplog.at_level(logging.DEBUG, logger="dg2pf.scheduler"):
        for _ in range(5):  # ticks: the job fails on the first, later ones no longer see it
            for active in store.active_jobs():
                scheduler._reconcile(active)
    logged = [r for r in caplog.records if r.name == "dg2pf.scheduler"]
    assert len(logged) == 1 and "no space left on device" in logged[0].getMessage() and not logged[0].exc_info
    done = store.get_job(row.id)
    assert done.state == "failed" and done.error_type == NO_SPACE
    assert "no space left on device" in done.error_message and "DG2PF_DATA_DIR" in done.error_message
    assert str(job_dir / ERROR) in done.error_message and "JSONDecodeError" not in done.error_message


def test_the_scheduler_fails_a_job_with_an_empty_error_json_naming_the_file(tmp_path):
    scheduler, store, row = _scheduler_with_a_running_job(tmp_path, 1)
    (Path(row.artifacts_dir) / ERROR).write_text("")
    scheduler._reconcile(row)
    done = store.get_job(row.id)
    assert done.state == "failed" and done.error_type == UNREADABLE
    assert f"{Path(row.artifacts_dir) / ERROR} is empty" in done.error_message and "exit status 1" in done.error_message


def test_the_scheduler_passes_the_runners_no_space_record_on(tmp_path):
    scheduler, store, row = _scheduler_with_a_running_job(tmp_path, NO_SPACE_EXIT)
    job_dir = Path(row.artifacts_dir)
    write_text_atomic(
        job_dir / ERROR, json.dumps({"type": NO_SPACE, "message": "no space left on device writing X", "field": None})
    )
    scheduler._reconcile(row)
    done = store.get_job(row.id)
    assert (done.state, done.error_type, done.error_message) == (
        "failed",
        NO_SPACE,
        "no space left on device writing X",
    )


# --- a real full disk ---------------------------------------------------------------------------


def _can_mount_a_small_disk() -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    try:
        return (
            subprocess.run(
                ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                check=False,
                capture_output=True,
                timeout=20,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


# The runner trains on a 3 MiB tmpfs (mounted in a user namespace: no root) until its first epoch's state
# is saved; then the disk is filled and the run goes on until a write fails. What it left is copied out.
_SCRIPT = r"""
set -u
mount -t tmpfs -o size=3m tmpfs "$DISK"
mkdir -p "$DISK/job" && cp "$ORDER" "$DISK/job/job.json"
"$PY" -m dg2pf_service.runner "$DISK/job" 2>"$OUT/stderr" &
pid=$!
for _ in $(seq 1 1200); do
  [ -f "$DISK/job/state/train_state.pt" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
dd if=/dev/zero of="$DISK/fill" bs=16k 2>/dev/null
wait $pid; echo $? > "$OUT/status"
cp -a "$DISK/job" "$OUT/job"
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not _can_mount_a_small_disk(),
    reason="this machine does not let an unprivileged user mount a tmpfs "
    "in a user namespace (unshare -Urm); the unit tests above cover it",
)
def test_a_job_on_a_disk_that_fills_up_fails_as_no_space_and_keeps_its_state(tmp_path, digits_example):
    from dg2pf_contract.job import JobSpec
    from dg2pf_core.algorithm.state import TrainingState

    checkpoint = str(digits_example / "model.safetensors")
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": checkpoint},
            "dataset": {"spec": "digits"},
            "sparsity": 0.9,
            "schedule": {"pruning_epochs": 4, "max_epochs": 8, "patience": 4},
        }
    )
    order = tmp_path / "job.json"
    order.write_text(
        runner.JobFile(spec=spec, checkpoint=checkpoint, storage_path=str(tmp_path / "ray")).model_dump_json()
    )
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", runner.CLUSTER_ADDRESS_ENV)}
    env.update(DISK=str(disk), ORDER=str(order), OUT=str(out), PY=sys.executable, OMP_NUM_THREADS="1")
    started = time.monotonic()
    subprocess.run(["unshare", "-Urm", "sh", "-c", _SCRIPT], env=env, check=True, timeout=600)
    stderr = (out / "stderr").read_text()
    assert int((out / "status").read_text()) == NO_SPACE_EXIT, stderr[-3000:]
    job_dir = out / "job"
    doc = read_error(job_dir)
    if doc is not None:  # room for it once the failed save's temp file was removed
        assert doc["type"] == NO_SPACE and "no space left on device" in doc["message"], doc
        assert "DG2PF_DATA_DIR" in doc["message"]
    assert not [p for p in job_dir.rglob("*") if p.name.startswith(f".{ERROR}")]
    assert stderr.count("dg2pf job failed: no space left on device") == 1, stderr[-3000:]
    state = TrainingState.load(job_dir / STATE)  # the last epoch saved before the disk filled, intact
    records = read_progress(job_dir)
    assert records and len(records) == len((job_dir / "progress.jsonl").read_text().splitlines())
    assert state.epoch <= records[-1]["epoch"]
    assert not (job_dir / "output").exists()
    print(
        f"real full disk: {time.monotonic() - started:.0f} s, error.json {'written' if doc else 'absent'}, state at "
        f"epoch {state.epoch}, {len(records)} progress lines; error: {doc['message'] if doc else stderr[-500:]}"
    )
