"""Finding and stopping a job's processes, and the runner's lifeline, with real processes (no Ray)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from dg2pf_service.lifeline import Lifeline, _stat, supervising_ancestors
from dg2pf_service.processes import job_processes, kill_job_processes

# A stand-in runner: its command line names the runner module and the job directory, as Ray's
# entrypoint does; it starts a child (a data-loader worker), then sleeps.
FAKE_RUNNER = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
)


def start_fake_runner(job_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_RUNNER, "-m", "dg2pf_service.runner", str(job_dir)])
    deadline = time.time() + 10
    while len(job_processes(job_dir)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    return proc


def test_a_jobs_processes_are_found_by_its_directory_and_all_stopped(tmp_path):
    job_dir = tmp_path / "jobs" / "abc123"
    other = start_fake_runner(tmp_path / "jobs" / "abc1234")  # a directory name with the same prefix
    proc = start_fake_runner(job_dir)
    try:
        found = job_processes(job_dir)
        assert proc.pid in found and len(found) == 2  # the runner and its child, nothing else
        assert other.pid not in found
        assert kill_job_processes(job_dir, grace_seconds=1) == found
        proc.wait(timeout=10)
        assert job_processes(job_dir) == []
        assert other.poll() is None  # the other job's runner is untouched
    finally:
        kill_job_processes(tmp_path / "jobs" / "abc1234", grace_seconds=0)
        other.wait(timeout=10)


def test_the_lifeline_fires_within_seconds_of_its_supervisors_death():
    parent = subprocess.Popen(["sleep", "60"])
    fired: list[str] = []
    done = threading.Event()
    line = Lifeline(None, poll_s=0.1, on_lost=lambda reason: (fired.append(reason), done.set()))
    started = _stat(parent.pid)
    assert started is not None
    line.ancestors = [(parent.pid, started[1])]
    line.start()
    time.sleep(0.5)
    assert not fired  # alive: nothing happens
    parent.kill()
    parent.wait()
    assert done.wait(5), "the lifeline did not notice its supervisor's death"
    assert f"process {parent.pid} is gone" in fired[0]


def test_the_lifeline_fires_when_the_gcs_refuses_connections():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    done = threading.Event()
    fired: list[str] = []
    line = Lifeline(f"127.0.0.1:{port}", poll_s=0.1, gcs_grace_s=0.5, on_lost=lambda r: (fired.append(r), done.set()))
    line.ancestors = []
    line.start()
    assert done.wait(5)
    assert "refused connections" in fired[0]


def test_a_process_under_a_ray_job_supervisor_finds_it_and_one_run_by_hand_does_not(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(
        "import os\nfrom dg2pf_service.lifeline import supervising_ancestors\n"
        "print(supervising_ancestors(), os.getppid(), sep='|')\n"
    )
    parent = tmp_path / "parent.py"
    parent.write_text(f"import subprocess\nsubprocess.run([{sys.executable!r}, {str(child)!r}])\n")
    # `exec -a` gives the parent the command line a Ray job supervisor actor has (ray::JobSupervisor).
    out = subprocess.run(
        ["bash", "-c", f"exec -a ray::JobSupervisor {sys.executable} {parent}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    chain, ppid = out.stdout.strip().split("|")
    assert chain.startswith(f"[({ppid}, "), out
    assert supervising_ancestors() == []  # pytest is not a Ray job: no lifeline


def test_a_heads_processes_are_found_by_its_whole_port_number():
    from dg2pf_service.cluster import head_pids

    procs = [
        subprocess.Popen(["bash", "-c", f'exec -a "{title}" sleep 60'])
        for title in (
            "/x/ray/gcs_server --gcs_server_port=3896 --node-ip-address=127.0.0.1",
            "/x/ray/raylet --gcs-address=127.0.0.1:3896 --node_manager_port=1",
            "/x/ray/raylet --gcs-address=127.0.0.1:38967",  # another Ray whose port starts the same
            "/x/ray/gcs_server --gcs_server_port=13896",
        )
    ]
    try:
        time.sleep(0.3)
        found = head_pids("3896")
        assert procs[0].pid in found and procs[1].pid in found
        assert procs[2].pid not in found and procs[3].pid not in found
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_lost_job_whose_output_is_complete_succeeds_instead_of_being_resubmitted(tmp_path):
    import json

    from tiny import metrics_document

    from dg2pf_service.scheduler import Scheduler
    from dg2pf_service.store.db import make_engine, make_sessionmaker
    from dg2pf_service.store.migrate import upgrade
    from dg2pf_service.store.repo import JobStore

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    store = JobStore(make_sessionmaker(make_engine(url)))
    row = store.create_job({"spec": {}, "resolved": {}}, "done-before-loss", 0.9, tmp_path / "jobs")
    row = store.transition(row.id, {"queued"}, "running", ray_submission_id=f"dg2pf-{row.id}")
    out = Path(row.artifacts_dir) / "output"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(metrics_document(test_top1=97.5)))
    # No restarts left and no Ray needed: the rule reads only the job's directory and the store.
    scheduler = Scheduler(
        store,
        executor=None,
        cluster=None,
        capacity=lambda: (0, 0),
        make_order=None,
        jobs_dir=tmp_path / "jobs",
        max_restarts=0,
    )
    scheduler._lost(row, {"phase": "finetuning"}, "the Ray job no longer exists")
    done = store.get_job(row.id)
    assert done.state == "succeeded" and done.best_metrics["test_top1"] == 97.5 and done.restarts == 0
