"""What survives what: the API's process group stopped every way it is stopped in the world, the
embedded Ray head lost with and without the API, cancels in every phase, `dg2pf cluster stop`.

One service data directory (SQLite, the embedded head) is shared by the tests in order; the API is
started in a process group of its own and stopped by signals to that group. Every test ends by
checking that no process of its jobs is left (a scan of /proc for the job directory).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from service_process import ServiceProcess

from dg2pf_client import Client
from dg2pf_core.io.checkpoints import read_state_dict
from dg2pf_service.cluster import dashboard_up, head_pids
from dg2pf_service.processes import job_processes, kill_processes, process_table

pytestmark = pytest.mark.slow
MAX_RESTARTS = 1


def spec(checkpoint: str, **schedule) -> dict:
    return {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": checkpoint},
        "dataset": {"spec": "digits"},
        "sparsity": 0.9,
        "schedule": {"pruning_epochs": 3, "max_epochs": 8, "patience": 2, **schedule},
    }


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    service = ServiceProcess(root / "state", DG2PF_JOB_MAX_RESTARTS=str(MAX_RESTARTS)).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def ckpt(svc, digits_example) -> str:
    with Client(svc.url) as c:
        return c.upload_checkpoint(digits_example / "model.safetensors").id


def job_dir(svc: ServiceProcess, job_id: str) -> Path:
    return svc.data_dir / "jobs" / job_id


def wait_for(predicate, timeout: float = 240, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_no_process_left(svc: ServiceProcess, *job_ids: str, timeout: float = 30) -> None:
    """No process on this machine names any of the jobs' directories (runner, shell, loader workers)."""
    dirs = [job_dir(svc, j) for j in job_ids]
    left = {}

    def none_left() -> bool:
        left.clear()
        left.update({str(d): job_processes(d) for d in dirs if job_processes(d)})
        return not left

    deadline = time.time() + timeout
    while time.time() < deadline and not none_left():
        time.sleep(0.5)
    assert not left, f"processes of ended jobs still run: {left}"


def ready(svc: ServiceProcess) -> bool:
    """/readyz: the database and Ray's Jobs API answer (503 while the head is being replaced)."""
    import httpx

    return httpx.get(f"{svc.url}/readyz", timeout=10).status_code == 200


def embedded_head_pids(svc: ServiceProcess) -> list[int]:
    return head_pids(svc.head().gcs_address.rsplit(":", 1)[1])


def head_daemon_pids(svc: ServiceProcess) -> set[int]:
    """The head's own daemons (GCS, raylet, dashboard, agents, monitors): the processes that name its
    GCS port, without Ray's workers, which Ray starts and reaps by itself. A worker names the port too
    while it starts (``.../default_worker.py --gcs-address=...``) and is renamed ``ray::...`` after, so
    one caught starting in a snapshot would look like a daemon that went away."""
    port = svc.head().gcs_address.rsplit(":", 1)[1]
    table = process_table()
    return {pid for pid in head_pids(port) if pid in table and _is_head_daemon(port, table[pid][1])}


def _is_head_daemon(port: str, cmd: str) -> bool:
    names_port = f":{port} " in f"{cmd} " or f"={port} " in f"{cmd} "
    program = " ".join(
        cmd.split()[:2]
    )  # the interpreter and its script (the raylet's flags name the worker script too)
    return names_port and not cmd.startswith("ray::") and "_worker.py" not in program


def log_text(svc: ServiceProcess) -> str:
    return svc.log_path.read_text(errors="replace")


def test_infinite_or_nan_schedule_values_are_refused_at_submit(svc, ckpt):
    import httpx

    for value in ("Infinity", "-Infinity", "NaN"):
        body = json.dumps(spec(ckpt)).replace('"pruning_epochs": 3', f'"pruning_epochs": 3, "lr": {value}')
        r = httpx.post(f"{svc.url}/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "schedule.lr"
    with Client(svc.url) as c:
        assert c.list().total == 0


def test_a_job_whose_order_cannot_be_built_fails_and_the_queue_moves_on(svc, ckpt):
    from dg2pf_service.settings import Settings
    from dg2pf_service.store.db import make_engine, make_sessionmaker
    from dg2pf_service.store.repo import JobStore

    # A job stored by an older version that let a negative lr through (lr=None now means "the preset's"): its
    # order cannot be built. It is written straight into the service's database, ahead of a good job.
    store = JobStore(make_sessionmaker(make_engine(Settings(data_dir=svc.data_dir).db_url)))
    bad_spec = spec(ckpt)
    bad_spec["schedule"]["lr"] = -1.0
    with Client(svc.url) as c:
        good_doc = c.get(c.submit(spec(ckpt, pruning_epochs=1, max_epochs=2)).id)
    bad = store.create_job(
        {"spec": bad_spec, "resolved": {"checkpoint": store.get_checkpoint(ckpt).path, "teacher": None}},
        "bad",
        0.9,
        svc.data_dir / "jobs",
    )
    with Client(svc.url) as c:
        after = c.submit(spec(ckpt, pruning_epochs=1, max_epochs=2)).id
        failed = c.wait(bad.id, timeout=60)
        assert failed.state == "failed" and "lr" in failed.error.message, failed.error
        assert c.wait(good_doc.id, timeout=240).state == "succeeded"
        assert c.wait(after, timeout=240).state == "succeeded"
    assert_no_process_left(svc, bad.id, good_doc.id, after)


def test_an_unrelated_ray_head_on_the_host_started_and_killed_mid_job_leaves_the_job_alone(svc, ckpt, tmp_path):
    """Another Ray head (a neighbour's `ray start --head`, in Ray's default temp directory, so the host's
    "current cluster" is now it) started after the service's and killed while a job runs: the job was
    handed the service's own cluster, not the neighbour's, and ends without losing an attempt."""
    import subprocess

    from dg2pf_service.cluster import node_env, node_ports, ray_cli, ray_temp_dir

    ports = node_ports(("port", "dashboard-port", "ray-client-server-port"))
    foreign_port = ports["port"]
    with Client(svc.url) as c:
        job_id = c.submit(spec(ckpt, pruning_epochs=4, max_epochs=10, patience=2)).id
        wait_for(lambda: c.get(job_id).state == "running", what="the job running")
    started = subprocess.run(
        [
            ray_cli(),
            "start",
            "--head",
            "--disable-usage-stats",
            "--include-dashboard=false",
            *[f"--{k}={v}" for k, v in ports.items() if k != "dashboard-port"],
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=node_env(),
        start_new_session=True,
    )
    assert started.returncode == 0, started.stderr
    try:
        with Client(svc.url) as c:
            epoch = c.get(job_id).epoch
            wait_for(lambda: c.get(job_id).epoch > epoch or c.get(job_id).state != "running", what="another epoch")
    finally:
        kill_processes(head_pids(str(foreign_port)), grace_seconds=0)  # the neighbour's head dies, as in the report
    with Client(svc.url) as c:
        job = c.wait(job_id, timeout=300)
    assert job.state == "succeeded", job.error
    assert job.restarts == 0 and job.restart_log == []
    assert [h["epoch"] for h in job.history] == list(range(len(job.history)))
    # The job's driver ran against the service's own head (Ray's discovery looks in the head's own temp
    # directory; the runner names the service's cluster explicitly), never the neighbour's port
    logs = ray_temp_dir(svc.data_dir / "ray-state").glob(f"session_*/logs/job-driver-dg2pf-{job_id}*.log")
    driver_log = "".join(p.read_text(errors="replace") for p in logs)
    assert "Running entrypoint" in driver_log and f":{foreign_port}" not in driver_log, driver_log[-2000:]
    our_port = svc.head().gcs_address.rsplit(":", 1)[1]
    for line in driver_log.splitlines():
        if "RAY_ADDRESS" in line:
            assert line.split("RAY_ADDRESS", 1)[1].split(";")[0].rstrip().endswith(f":{our_port}"), line
    assert_no_process_left(svc, job_id)


def test_stopping_the_api_process_group_leaves_the_job_running(svc, ckpt):
    """Ctrl-C, SIGTERM and SIGKILL of the API's whole process group, one after another during one
    job: the embedded head and the job go on; each restarted API re-attaches; the job succeeds with
    a continuous history and no restart (its Ray work was never lost)."""
    head_before = head_daemon_pids(svc)
    commands = process_table()
    assert {"gcs_server", "raylet"} <= {
        name for pid in head_before for name in ("gcs_server", "raylet") if name in commands[pid][1]
    }, head_before
    with Client(svc.url) as c:
        job_id = c.submit(spec(ckpt, pruning_epochs=6, max_epochs=12, patience=2)).id
    # A follower of the job's event stream the whole time: it resumes after each stop with its last id.
    followed: list = []

    def follow() -> None:
        with Client(svc.url) as c:
            followed.extend(c.events(job_id, reconnect_for=180))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    epoch = 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        with Client(svc.url) as c:
            epoch = wait_for(
                lambda: (j := c.get(job_id)).state == "running" and j.epoch > epoch and j.epoch,
                what=f"an epoch after {epoch}",
            )
        log_before = len(log_text(svc))
        code = svc.signal_group(sig)
        log = log_text(svc)[log_before:]
        assert "Traceback" not in log and "Cancel" not in log, log  # the open stream ended by itself
        if sig != signal.SIGKILL:
            assert code == 0, log
            assert "keeps running with 1 running" in log and "dg2pf cluster stop" in log, log
        assert head_daemon_pids(svc) >= head_before  # the embedded head was not touched
        assert job_processes(job_dir(svc, job_id)), "the job's runner died with the API"
        svc.start()
    with Client(svc.url) as c:
        job = c.wait(job_id, timeout=300)
    assert job.state == "succeeded", job.error
    assert abs(job.best_metrics["sparsity_prunable"] - 0.9) < 1e-3
    assert [h["epoch"] for h in job.history] == list(range(len(job.history)))
    assert job.restarts == 0 and job.restart_log == []
    follower.join(60)
    assert followed and followed[-1].job.state == "succeeded"
    assert [e.record["epoch"] for e in followed if e.kind == "epoch"] == [h["epoch"] for h in job.history]  # once each
    assert_no_process_left(svc, job_id)


def test_head_lost_while_the_api_is_down_the_runner_stops_and_the_job_resumes(svc, ckpt):
    """The API's group is SIGKILLed, then the embedded head's daemons die (as when a service manager
    stops everything the API started, in the old layout): the job's runner, in a session of its own,
    notices within seconds and stops (no orphan). The restarted API starts a new head and resubmits
    the job, which resumes from its last epoch."""
    with Client(svc.url) as c:
        job_id = c.submit(spec(ckpt, pruning_epochs=4, max_epochs=10, patience=2)).id
        wait_for(lambda: c.get(job_id).epoch >= 2, what="epoch 2")
    svc.signal_group(signal.SIGKILL)
    runner = job_processes(job_dir(svc, job_id))
    assert runner
    kill_processes([p for p in embedded_head_pids(svc) if p not in runner], grace_seconds=0)
    started = time.time()
    wait_for(lambda: not job_processes(job_dir(svc, job_id)), timeout=60, what="the orphaned runner to stop")
    assert time.time() - started < 30
    svc.start()
    with Client(svc.url) as c:
        job = c.wait(job_id, timeout=300)
    assert job.state == "succeeded", job.error
    assert job.restarts == 1 and "no longer exists" in job.restart_log[0].reason
    assert [h["epoch"] for h in job.history] == list(range(len(job.history)))
    assert any(h["restarts"] == 1 for h in job.history)  # resumed, not started over
    assert_no_process_left(svc, job_id)


def test_head_killed_with_the_api_alive_is_replaced_and_the_job_resumes_bit_exactly(svc, ckpt, tmp_path):
    """Every process of the embedded head SIGKILLed mid-job (the API lives on): the service starts a
    new head and resubmits the job; it resumes from its last epoch and ends with the same weights as
    an uninterrupted run of the same job."""
    with Client(svc.url) as c:
        job_id = c.submit(spec(ckpt, pruning_epochs=4, max_epochs=10, patience=2)).id
        wait_for(lambda: c.get(job_id).epoch >= 2, what="epoch 2")
        old_head = svc.head()
        kill_processes(embedded_head_pids(svc), grace_seconds=0)
        job = c.wait(job_id, timeout=300)
        assert c.health()["checks"]["ray"] == "ok"
    assert job.state == "succeeded", job.error
    assert job.restarts == 1 and job.restart_log[0].epoch >= 2
    assert svc.head().gcs_address != old_head.gcs_address and not dashboard_up(old_head.dashboard_url)
    assert [h["epoch"] for h in job.history] == list(range(len(job.history)))
    assert_no_process_left(svc, job_id)

    from dg2pf_core.job import prune_to_dir
    from dg2pf_service.runner import JobFile

    order = json.loads((job_dir(svc, job_id) / "job.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner trains
    try:
        prune_to_dir(JobFile.model_validate(order).prune_job(), tmp_path / "uninterrupted")
    finally:
        torch.set_num_threads(threads)
    resumed = read_state_dict(job_dir(svc, job_id) / "output" / "model.safetensors")
    reference = read_state_dict(tmp_path / "uninterrupted" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_head_lost_more_often_than_the_limit_fails_the_job_naming_each_loss(svc, ckpt):
    with Client(svc.url) as c:
        job_id = c.submit(spec(ckpt, pruning_epochs=8, max_epochs=16, patience=2)).id
        wait_for(lambda: c.get(job_id).epoch >= 1, what="epoch 1")
        kill_processes(embedded_head_pids(svc), grace_seconds=0)
        wait_for(lambda: (j := c.get(job_id)).restarts == 1 and j.state == "running", what="the first restart")
        resumed_at = c.get(job_id).epoch
        wait_for(lambda: c.get(job_id).epoch > resumed_at, what="an epoch after the restart")
        kill_processes(embedded_head_pids(svc), grace_seconds=0)
        job = c.wait(job_id, timeout=240)
    assert job.state == "failed" and job.error.type == "LostJob", job
    assert (
        f"lost {MAX_RESTARTS + 1} times" in job.error.message
        and f"DG2PF_JOB_MAX_RESTARTS={MAX_RESTARTS}" in job.error.message
    )
    assert job.error.message.count("no longer exists") == MAX_RESTARTS + 1
    assert_no_process_left(svc, job_id)


def _heads_of(svc: ServiceProcess) -> list[int]:
    """GCS server processes started for this service's data directory (read from their environment)."""
    mark = f"DG2PF_DATA_DIR={svc.data_dir}".encode()
    found = []
    for pid, (_, cmd) in process_table().items():
        if "gcs_server" in cmd:
            try:
                if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(pid)
            except OSError:
                pass
    return found


def test_a_second_api_on_the_same_data_directory_is_refused(svc):
    second = ServiceProcess(svc.data_dir)
    with pytest.raises(RuntimeError, match="exited with 2"):
        second.start(timeout=120)
    assert "another dg2pf API" in second.log_path.read_text() and len(_heads_of(svc)) == 1


def test_cancel_while_the_head_is_being_replaced_cancels_for_good(svc, ckpt):
    with Client(svc.url) as c:
        job_id = c.submit(spec(ckpt, pruning_epochs=10, max_epochs=20)).id
        wait_for(lambda: c.get(job_id).epoch >= 1, what="epoch 1")
        kill_processes(embedded_head_pids(svc), grace_seconds=0)
        job = c.cancel(job_id)  # Ray does not answer now
        assert job.state == "cancelled"
        wait_for(lambda: ready(svc), timeout=120, what="the new head")
        time.sleep(3)
        job = c.get(job_id)
    assert job.state == "cancelled" and job.restarts == 0
    assert_no_process_left(svc, job_id)


def test_an_api_killed_while_it_replaces_the_head_leaves_no_second_head(svc, ckpt):
    before = _heads_of(svc)
    assert len(before) == 1
    kill_processes(embedded_head_pids(svc), grace_seconds=0)
    wait_for(lambda: [p for p in _heads_of(svc) if p not in before], timeout=120, what="a new head starting")
    svc.signal_group(signal.SIGKILL)  # the API dies while the new head is still starting
    svc.start()
    wait_for(lambda: ready(svc), timeout=120, what="the head")
    time.sleep(2)
    assert len(_heads_of(svc)) == 1, _heads_of(svc)


def _ray_train_processes() -> list[int]:
    return [p for p, (_, cmd) in process_table().items() if "RayTrainWorker" in cmd or "TrainController" in cmd]


def test_cancel_in_every_phase_leaves_no_process(svc, ckpt):
    cancelled = []
    # Ray Train processes of other clusters on this host (several may run on one machine) are not this job's
    others = set(_ray_train_processes())
    with Client(svc.url) as c:
        # queued: two running jobs hold both CPUs, a third waits
        blockers = [c.submit(spec(ckpt, pruning_epochs=10, max_epochs=20)).id for _ in range(2)]
        queued = c.submit(spec(ckpt)).id
        wait_for(lambda: all(c.get(b).state == "running" for b in blockers), what="two running jobs")
        assert c.get(queued).state == "queued"
        assert c.cancel(queued).state == "cancelled"
        # baseline / gradual pruning: the two blockers, at their first epochs
        wait_for(lambda: c.get(blockers[0]).epoch >= 1, what="a pruning epoch")
        for b in blockers:
            assert c.cancel(b).state == "cancelled"
        cancelled += [queued, *blockers]
        # distillation, then fine-tuning
        for phase in ("distillation", "finetuning"):
            job_id = c.submit(spec(ckpt, pruning_epochs=1, max_epochs=40, patience=3)).id
            job = wait_for(lambda: (j := c.get(job_id)).phase == phase and j, what=phase)
            assert job.state == "running"
            assert c.cancel(job_id).state == "cancelled"
            cancelled.append(job_id)
        # a Ray Train job (2 DDP workers): its workers are Ray actors and go with their runner
        ddp = c.submit({**spec(ckpt, pruning_epochs=10, max_epochs=20), "resources": {"num_workers": 2}}).id
        wait_for(lambda: c.get(ddp).epoch >= 1, what="a DDP epoch")
        assert set(_ray_train_processes()) - others
        assert c.cancel(ddp).state == "cancelled"
        cancelled.append(ddp)
        assert {c.get(j).state for j in cancelled} == {"cancelled"}
    assert_no_process_left(svc, *cancelled)
    wait_for(lambda: not set(_ray_train_processes()) - others, timeout=60, what="the DDP workers to stop")
    assert not job_processes(job_dir(svc, queued)) and not (job_dir(svc, queued) / "progress.jsonl").exists()


def test_cluster_stop_is_refused_while_the_api_runs_then_cancels_running_jobs(svc, ckpt, capsys, tmp_path):
    from dg2pf_cli.main import main

    nowhere = tmp_path / "not-a-data-dir"
    assert main(["cluster", "status", "--data-dir", str(nowhere)]) == 2
    assert "not a dg2pf service's data directory" in capsys.readouterr().err and not nowhere.exists()

    with Client(svc.url) as c:
        job_id = c.submit(spec(ckpt, pruning_epochs=10, max_epochs=20)).id
        wait_for(lambda: c.get(job_id).epoch >= 1, what="epoch 1")
    assert main(["cluster", "stop", "--data-dir", str(svc.data_dir)]) == 2
    assert "stop it first" in capsys.readouterr().err
    assert svc.signal_group(signal.SIGTERM) == 0
    head = embedded_head_pids(svc)
    assert main(["cluster", "status", "--data-dir", str(svc.data_dir)]) == 0
    assert "1 running" in capsys.readouterr().out
    assert main(["cluster", "stop", "--data-dir", str(svc.data_dir)]) == 0
    out = capsys.readouterr().out
    assert f"cancelled running job {job_id}" in out and "stopped the embedded Ray head" in out and "processes)" in out
    assert not [
        p
        for p in head
        if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split(")")[-1][:3]
    ]
    assert_no_process_left(svc, job_id)
    svc.start()  # the job stays cancelled; the service starts a new head for new work
    with Client(svc.url) as c:
        job = c.get(job_id)
    assert job.state == "cancelled" and job.error.type == "ClusterStopped"
