"""The service end to end over real HTTP: uvicorn, an embedded Ray head, PostgreSQL or SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_process import ServiceProcess

from dg2pf_client import Client, Conflict, Forbidden, InvalidRequest, NotFound, TooLarge, Unauthorized
from dg2pf_core.io.checkpoint_save import save_state_dict

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"
FAST = {"pruning_epochs": 2, "max_epochs": 4, "patience": 2}


def spec(checkpoint: str, **over) -> dict:
    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": checkpoint},
        "dataset": {"spec": "digits"},
        "sparsity": 0.9,
        "schedule": dict(FAST),
    }
    doc.update(over)
    return doc


@pytest.fixture(scope="module")
def service(tmp_path_factory, pg_url):
    root = tmp_path_factory.mktemp("svc")
    (root / "data").mkdir()
    svc = ServiceProcess(
        root / "state",
        DG2PF_DATABASE_URL=pg_url,
        DG2PF_API_TOKENS=f"{TOKEN},another",
        DG2PF_DATA_ROOTS=str(root / "data"),
        DG2PF_MAX_UPLOAD_BYTES=str(2_000_000),
        DG2PF_MAX_MODEL_PARAMS=str(400_000_000),
        DG2PF_MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        DG2PF_MLFLOW_POLL_SECONDS="0.5",
    )
    svc.mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service):
    with Client(service.url, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def ckpt(client, digits_example) -> str:
    return client.upload_checkpoint(digits_example / "model.safetensors").id


def test_auth(service, client):
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    with pytest.raises(Unauthorized):
        Client(service.url).list()
    with pytest.raises(Forbidden):
        Client(service.url, token="wrong").list()
    assert client.health()["checks"] == {"database": "ok", "ray": "ok"}


def test_upload_same_content_same_id_and_size_limit(service, client, digits_example, tmp_path):
    a = client.upload_checkpoint(digits_example / "model.safetensors")
    b = client.upload_checkpoint(digits_example / "model.safetensors")
    assert a.id == b.id and a.sha256 == b.sha256 and a.bytes == (digits_example / "model.safetensors").stat().st_size
    before = sorted(p.name for p in (service.data_dir / "checkpoints").iterdir())
    big = tmp_path / "big.safetensors"
    save_state_dict({"w": __import__("torch").zeros(1_000_000)}, big)  # 4 MB > the 2 MB limit
    with pytest.raises(TooLarge):
        client.upload_checkpoint(big)
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(b"\x80\x04\x95garbage-pickle")
    with pytest.raises(InvalidRequest, match="file"):
        client.upload_checkpoint(pickled)
    assert sorted(p.name for p in (service.data_dir / "checkpoints").iterdir()) == before


def test_full_lifecycle(service, client, ckpt, tmp_path):
    r = httpx.post(
        f"{service.url}/jobs", json=spec(ckpt, name="lifecycle"), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert r.status_code == 202 and r.headers["location"] == f"/jobs/{r.json()['id']}"
    assert r.json()["state"] == "queued"
    job_id = r.json()["id"]
    # Followed live over GET /jobs/{id}/events (server-sent events) while client.wait polls.
    streamed: list[tuple[float, object]] = []

    def follow() -> None:
        with Client(service.url, token=TOKEN) as c:
            streamed.extend((time.time(), e) for e in c.events(job_id))

    follower = threading.Thread(target=follow)
    follower.start()
    seen: list[tuple[str, str]] = []
    job = client.wait(job_id, timeout=300, on_update=lambda j: seen.append((j.state, j.phase)))
    assert job.state == "succeeded", job.error
    follower.join(30)
    assert not follower.is_alive(), "the event stream did not end with the job"
    _check_events(service, job, streamed)
    _check_mlflow(service, job)
    assert job.phase == "done" and abs(job.best_metrics["sparsity_prunable"] - 0.9) < 1e-3
    assert job.best_metrics["test_top1"] >= job.best_metrics["baseline_test_top1"] - 5
    # per-layer sparsity in the status, no layer emptied (the default guard); warnings always a list
    layers = job.best_metrics["layer_sparsity"]
    assert job.best_metrics["layer_cap"] == 1.0 and job.best_metrics["preset"] == "default"
    assert len(layers) >= 3 and job.best_metrics["max_layer_sparsity"] == max(layers.values()) < 1.0
    assert isinstance(job.best_metrics["warnings"], list)
    # measured speed beside the MACs ratio: dense vs pruned, per backend and batch size (the runner's 1 thread)
    latency = job.best_metrics["latency"]
    assert latency["threads"] == 1 and latency["macs_ratio"] == pytest.approx(
        job.best_metrics["flops_sparse"] / job.best_metrics["flops_dense"]
    )
    assert set(latency["speedup"]) == {"torch", "onnxruntime"} and all(
        x > 0 for by in latency["speedup"].values() for x in by.values()
    )
    assert [h["epoch"] for h in job.history] == list(range(len(job.history)))
    assert ("running", "gradual_pruning") in seen or ("running", "baseline") in seen
    files = {p.name for p in client.download(job.id, tmp_path / "dl")}
    assert {"model.safetensors", "model.onnx", "metrics.json", "history.json"} <= files
    assert json.loads((tmp_path / "dl" / "metrics.json").read_text())["target_sparsity"] == 0.9
    assert client.list(state="succeeded").total >= 1


def _mlflow_run(service, job_id: str, status: str):
    """The job's MLflow run once the service has logged it to ``status`` (it follows the store every 0.5 s)."""
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=service.mlflow_uri)
    deadline = time.time() + 60
    while True:
        experiment = mlflow.get_experiment_by_name("dg2pf")
        runs = mlflow.search_runs([experiment.experiment_id], f"tags.`dg2pf.job_id` = '{job_id}'") if experiment else []
        if runs and runs[0].info.status == status:
            return mlflow, runs[0]
        assert time.time() < deadline, f"job {job_id} not logged to MLflow as {status}: {runs}"
        time.sleep(0.5)


def _check_mlflow(service, job) -> None:
    """The succeeded job as an MLflow run: its spec as params, each epoch's metrics at its step, the
    results, the artifacts, FINISHED."""
    mlflow, run = _mlflow_run(service, job.id, "FINISHED")
    assert run.info.run_name == "lifecycle" and run.data.tags["dg2pf.state"] == "succeeded"
    assert run.data.params["sparsity"] == "0.9" and run.data.params["model.arch"] == "digits_cnn"
    assert run.data.params["schedule.pruning_epochs"] == str(FAST["pruning_epochs"])
    history = mlflow.get_metric_history(run.info.run_id, "val_top1")
    assert sorted((m.step, m.value) for m in history) == [(h["epoch"], h["val_top1"]) for h in job.history]  # once each
    assert run.data.metrics["test_top1"] == pytest.approx(job.best_metrics["test_top1"])
    assert run.data.metrics["best_val_top1"] == pytest.approx(job.best_metrics["val_top1"])
    assert run.data.metrics["sparsity_prunable"] == pytest.approx(job.best_metrics["sparsity_prunable"])
    assert "speedup_onnxruntime_batch1" in run.data.metrics
    assert str(service.data_dir / "mlflow-artifacts") in run.info.artifact_uri  # not ./mlruns of its cwd
    logged = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.json", "training.png", "layers.png", "model.safetensors", "model.onnx"} <= logged


def _check_events(service, job, streamed) -> None:
    """The stream of a finished job: each epoch record once and in order, live, states without
    repeats ending with the final one; a Last-Event-ID resumes with exactly what came after it."""
    events = [e for _, e in streamed]
    assert events[0].kind == "state" and events[-1].kind == "state" and events[-1].job.state == "succeeded"
    # each record once, in order (live ones are the run's progress records: the final history's, plus world_size)
    assert [(e.record["epoch"], e.record["val_top1"]) for e in events if e.kind == "epoch"] == [
        (h["epoch"], h["val_top1"]) for h in job.history
    ]
    states = [(e.job.state, e.job.phase) for e in events if e.kind == "state"]
    assert all(a != b for a, b in zip(states, states[1:])) and ("running", "gradual_pruning") in states, states
    assert len({e.id for e in events}) == len(events)
    # live: records arrived while the job ran, not all at its end
    finished = job.finished_at.timestamp()
    assert any(t < finished for t, e in streamed if e.kind == "epoch"), "no epoch arrived before the job finished"
    # resume after the third epoch record: the rest of the records, then nothing twice
    cut = [i for i, e in enumerate(events) if e.kind == "epoch"][2]
    with Client(service.url, token=TOKEN) as c:
        resumed = list(c.events(job.id, last_event_id=events[cut].id))
    assert [e.record["epoch"] for e in resumed if e.kind == "epoch"] == [
        e.record["epoch"] for e in events[cut + 1 :] if e.kind == "epoch"
    ]
    assert resumed[-1].job.state == "succeeded"
    with Client(service.url, token=TOKEN) as c:  # a finished job's stream from its last event: nothing more
        assert [e.kind for e in c.events(job.id, last_event_id=events[-1].id)] == []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream("GET", f"{service.url}/jobs/{job.id}/events", headers=auth) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert "retry: 2000" in r.read().decode()  # a browser's EventSource reconnects after 2 s
    for bad in ("yesterday", "3:running:sleeping", "99999999999:running:baseline"):
        r = httpx.get(f"{service.url}/jobs/{job.id}/events", headers={**auth, "Last-Event-ID": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "Last-Event-ID", r.text
    assert httpx.get(f"{service.url}/jobs/{'f' * 32}/events", headers=auth).status_code == 404
    assert httpx.get(f"{service.url}/jobs/{job.id}/events").status_code == 401


BAD = [
    (lambda c: spec(c, sparsity=1.5), 422, "sparsity"),
    (lambda c: spec(c, sparsity=0), 422, "sparsity"),
    (lambda c: {**spec(c), "model": {"arch": "digit_cnn", "num_classes": 10, "checkpoint": c}}, 422, "model.arch"),
    (
        lambda c: {**spec(c), "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "0" * 32}},
        404,
        "model.checkpoint",
    ),
    (
        lambda c: {**spec(c), "model": {"arch": "digits_cnn", "num_classes": 7, "checkpoint": c}},
        422,
        "model.checkpoint",
    ),
    (lambda c: {**spec(c), "dataset": {"spec": "imagefolder:/etc"}}, 422, "dataset.spec"),
    (lambda c: {**spec(c), "dataset": {"spec": "cifar10:/nonexistent/x"}}, 422, "dataset.spec"),
    (lambda c: {**spec(c), "resources": {"num_workers": 0}}, 422, "resources.num_workers"),
    (lambda c: {**spec(c), "resources": {"num_workers": 64}}, 422, "resources.num_workers"),
    (lambda c: {**spec(c), "resources": {"num_workers": 2, "placement": "diagonal"}}, 422, "resources.placement"),
    (lambda c: {**spec(c), "bogus": 1}, 422, "bogus"),
    (lambda c: {**spec(c), "schedule": {"recovery": "magic"}}, 422, "schedule.recovery"),
    (lambda c: {**spec(c), "schedule": {"finetune": "adam"}}, 422, "schedule.finetune"),
    (lambda c: {**spec(c), "schedule": {"max_layer_sparsity": 0.8}}, 422, "schedule.max_layer_sparsity"),
    (lambda c: {**spec(c), "schedule": {"amp": "fp16"}}, 422, "schedule.amp"),
    (lambda c: {**spec(c), "dataset": {"spec": "cifar10"}}, 422, "dataset.spec"),
    (lambda c: {**spec(c), "dataset": {"spec": "digits", "augment": "randaugment"}}, 422, "dataset.augment"),
    (lambda c: {**spec(c), "dataset": {"spec": "imagefolder:/data/x\u0000y"}}, 422, "dataset.spec"),
    (
        lambda c: {**spec(c), "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "/a/b\u0000.pt"}},
        422,
        "model.checkpoint",
    ),
    (lambda c: {**spec(c), "teacher": "/x\u0000"}, 422, "teacher"),
    (
        lambda c: {**spec(c), "model": {"arch": "digits_cnn", "num_classes": 2**40, "checkpoint": c}},
        422,
        "model.num_classes",
    ),
    (lambda c: {**spec(c), "schedule": {"batch_size": 10**9}}, 422, "schedule.batch_size"),
    (lambda c: {**spec(c), "schedule": {"max_epochs": 10**12}}, 422, "schedule.max_epochs"),
    (lambda c: {**spec(c), "schedule": {"seed": 2**63}}, 422, "schedule.seed"),
    (lambda c: {**spec(c), "compact_values": "fp8"}, 422, "compact_values"),
    (lambda c: {**spec(c), "schedule": {"granularity": "2x4"}}, 422, "schedule.granularity"),
    (lambda c: {**spec(c), "schedule": {"granularity": "2:4"}}, 422, "schedule.granularity"),  # sparsity 0.9, not 0.5
    # digits_cnn's first convolution has 1 input channel: no whole groups of 4 (checked at submit)
    (lambda c: {**spec(c, sparsity=0.5), "schedule": {"granularity": "2:4"}}, 422, "schedule.granularity"),
    # channel granularity: the MACs target only with it, instead of sparsity, reachable under the guard (at submit)
    (
        lambda c: {**spec(c, sparsity=None), "schedule": {**FAST, "target_macs_ratio": 0.5}},
        422,
        "schedule.target_macs_ratio",
    ),
    # ... named as channel-only with N:M too, not as N:M's sparsity rule
    (
        lambda c: {**spec(c, sparsity=None), "schedule": {**FAST, "granularity": "2:4", "target_macs_ratio": 0.5}},
        422,
        "schedule.target_macs_ratio",
    ),
    (lambda c: {**spec(c), "schedule": {**FAST, "granularity": "channel", "target_macs_ratio": 0.5}}, 422, "sparsity"),
    (
        lambda c: {**spec(c, sparsity=None), "schedule": {**FAST, "granularity": "channel", "target_macs_ratio": 1.5}},
        422,
        "schedule.target_macs_ratio",
    ),
    (
        lambda c: {
            **spec(c, sparsity=None),
            "schedule": {**FAST, "granularity": "channel", "target_macs_ratio": 0.1, "max_layer_sparsity": 0.5},
        },
        422,
        "schedule.target_macs_ratio",
    ),
    (lambda c: spec(c, sparsity=None), 422, "sparsity"),
    (
        lambda c: {**spec(c), "schedule": {**FAST, "granularity": "channel", "scope": "layerwise"}},
        422,
        "schedule.scope",
    ),
    (lambda c: {**spec(c, sparsity=0.99), "schedule": {**FAST, "granularity": "channel"}}, 422, "sparsity"),
    # refused by name: tracing swin_t alone would take minutes and GBs at submit
    (
        lambda c: {
            **spec(c),
            "model": {"arch": "torchvision/swin_t", "num_classes": 10, "checkpoint": c},
            "schedule": {**FAST, "granularity": "channel"},
        },
        422,
        "schedule.granularity",
    ),
    # control characters in what the CLI prints: NUL, an ANSI escape, CR/LF, DEL, a C1 control
    (lambda c: spec(c, name="a\u0000b"), 422, "name"),
    (lambda c: spec(c, name="\u001b[2J\u001b[31mowned"), 422, "name"),
    (lambda c: spec(c, name="ok\r\nstate: succeeded"), 422, "name"),
    (lambda c: spec(c, name="del\u007f"), 422, "name"),
    (lambda c: spec(c, name="csi\u009b31m"), 422, "name"),
    (
        lambda c: {**spec(c), "model": {"arch": "digits_cnn\u001b[0m", "num_classes": 10, "checkpoint": c}},
        422,
        "model.arch",
    ),
    (lambda c: {**spec(c), "dataset": {"spec": "imagefolder:/data/x\ny"}}, 422, "dataset.spec"),
    (lambda c: {**spec(c), "teacher": "/x\u001b"}, 422, "teacher"),
    (lambda c: spec(c, sparsity=5e-324), 422, "sparsity"),
    (lambda c: spec(c, sparsity=0.0009), 422, "sparsity"),
    # user regular expressions: RE2 takes no backreference (and no pattern can freeze the API)
    (lambda c: {**spec(c), "schedule": {**FAST, "include": ["(conv)\\1"]}}, 422, "schedule.include"),
    (lambda c: {**spec(c), "schedule": {**FAST, "exclude": ["fc(?=2)"]}}, 422, "schedule.exclude"),
    (
        lambda c: {**spec(c), "schedule": {**FAST, "include": ["(.*.*.*)*="]}},
        422,
        "schedule.include",
    ),  # matches nothing
    # search spaces: every kind that was a 500 or accepted
    (
        lambda c: {**spec(c), "tune": {"search_space": {"weight_decay": {"loguniform": [0, 0.1]}}}},
        422,
        "tune.search_space",
    ),
    (
        lambda c: {**spec(c), "tune": {"search_space": {"pruning_epochs": {"randint": ["1", "3"]}}}},
        422,
        "tune.search_space",
    ),
    (lambda c: {**spec(c), "tune": {"search_space": {"lr": {"uniform": [0.01, 0.001]}}}}, 422, "tune.search_space"),
    (
        lambda c: {**spec(c), "tune": {"search_space": {"pruning_epochs": {"randint": [5, 5]}}}},
        422,
        "tune.search_space",
    ),
    (
        lambda c: {**spec(c), "tune": {"samples": 256, "search_space": {"kd_alpha": {"grid": [0.5] * 100_000}}}},
        422,
        "tune.search_space",
    ),
    (
        lambda c: {
            **spec(c),
            "tune": {
                "samples": 256,
                "search_space": {
                    n: {"grid": [v] * 50}
                    for n, v in [
                        ("lr", 1e-3),
                        ("kd_alpha", 0.5),
                        ("kd_temperature", 4.0),
                        ("weight_decay", 0.0),
                        ("grad_clip", 0.5),
                        ("finetune_lr", 1e-3),
                        ("sp_weight", 1.0),
                        ("finetune_momentum", 0.9),
                    ]
                },
            },
        },
        422,
        "tune.search_space",
    ),
    (lambda c: {**spec(c), "tune": {"search_space": {"amp": {"choice": ["none", "bf16"]}}}}, 422, "tune.search_space"),
]


@pytest.mark.parametrize("make, status, field", BAD)
def test_bad_input_is_refused_and_nothing_is_created(service, client, ckpt, make, status, field):
    total = client.list().total
    r = httpx.post(f"{service.url}/jobs", json=make(ckpt), headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"]
    assert client.list().total == total


def test_malformed_json_and_unknown_job(service, client):
    r = httpx.post(
        f"{service.url}/jobs",
        content=b"{not json",
        headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_json"
    with pytest.raises(NotFound):
        client.get("f" * 32)
    with pytest.raises(NotFound):
        client.cancel("f" * 32)


def test_cancel_during_pruning_stops_the_work_and_keeps_artifacts(service, client, ckpt):
    job_id = client.submit(spec(ckpt, schedule={"pruning_epochs": 12, "max_epochs": 20})).id
    deadline = time.time() + 240
    while time.time() < deadline:
        job = client.get(job_id)
        if job.phase == "gradual_pruning" and job.epoch >= 1:
            break
        time.sleep(0.3)
    assert job.phase == "gradual_pruning", job
    cancelled = client.cancel(job_id)
    assert cancelled.state == "cancelled"
    time.sleep(3)
    job = client.get(job_id)
    assert job.state == "cancelled" and job.epoch < 12
    names = {a.name for a in client.artifacts(job_id)}
    assert "progress.jsonl" in names  # what was written so far is kept
    progress_lines = len((service.data_dir / "jobs" / job_id / "progress.jsonl").read_text().splitlines())
    time.sleep(3)
    assert (
        len((service.data_dir / "jobs" / job_id / "progress.jsonl").read_text().splitlines()) == progress_lines
    )  # stopped
    with pytest.raises(Conflict):
        client.cancel(job_id)
    mlflow, run = _mlflow_run(service, job_id, "KILLED")  # the epochs it ran, then its end
    assert len(mlflow.get_metric_history(run.info.run_id, "val_top1")) == len(client.get(job_id).history) >= 2


def test_concurrent_submissions_queue_fifo(service, client, ckpt):
    tiny = spec(ckpt, schedule={"pruning_epochs": 1, "max_epochs": 1})
    ids: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        with Client(service.url, token=TOKEN) as c:
            job_id = c.submit(tiny).id
        with lock:
            ids.append(job_id)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 20
    # The cluster has 2 CPUs and each job holds 1: never more than 2 run at once, the rest wait (the
    # first-in-first-out order itself is tested on the store, tests/dg2pf_service/test_store.py). Once 4
    # have succeeded (2 rounds of 2: queued jobs did start as others finished) the rest are cancelled:
    # 16 more identical tiny jobs would add minutes and no evidence.
    peak_running, saw_queued = 0, False
    deadline = time.time() + 600
    while time.time() < deadline:
        states = [client.get(i).state for i in ids]
        peak_running = max(peak_running, states.count("running"))
        saw_queued |= "queued" in states
        if states.count("succeeded") >= 4:
            break
        assert "failed" not in states
        time.sleep(1)
    for job_id in ids:
        if client.get(job_id).state in ("queued", "running"):
            try:
                client.cancel(job_id)
            except Conflict:  # it ended between the two calls
                pass
    jobs = {i: client.get(i) for i in ids}
    assert sum(j.state == "succeeded" for j in jobs.values()) >= 4
    assert all(j.state in ("succeeded", "cancelled") for j in jobs.values())
    assert peak_running <= 2 and saw_queued


def test_cli_submit_wait_status_jobs_download(service, ckpt, tmp_path, capsys):
    from dg2pf_cli.main import main

    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"name: from-cli\nmodel: {{arch: digits_cnn, num_classes: 10, checkpoint: {ckpt}}}\n"
        "dataset: {spec: digits}\nsparsity: 0.8\nschedule: {pruning_epochs: 1, max_epochs: 2}\n"
    )
    conn = ["--url", service.url, "--token", TOKEN]
    assert main(["submit", str(job_file), "--wait", *conn]) == 0
    job_id = capsys.readouterr().out.split("submitted ")[1].split()[0]
    assert main(["status", job_id, "--json", *conn]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "succeeded"
    epochs = [str(h["epoch"]) for h in status["history"]]
    assert main(["status", job_id, "--follow", *conn]) == 0  # a finished job: its epochs, its final state, its result
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[: len(epochs)] if line.startswith("  epoch ")] == epochs
    assert lines[len(epochs)].startswith(job_id) and "succeeded" in lines[len(epochs)]
    assert lines[len(epochs) + 1].startswith("  test top-1")
    assert main(["status", job_id, "--follow", "--json", *conn]) == 0
    assert [json.loads(line)["kind"] for line in capsys.readouterr().out.splitlines()] == ["epoch"] * len(epochs) + [
        "state"
    ]
    assert main(["jobs", "--state", "succeeded", *conn]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["download", job_id, "--out", str(tmp_path / "dl"), *conn]) == 0
    assert (tmp_path / "dl" / "model.safetensors").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(job_file.read_text().replace("sparsity: 0.8", "sparsity: 2"))
    assert main(["submit", str(bad), *conn]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["status", "0" * 32, *conn]) == 2


def test_one_job_file_runs_through_dg2pf_prune_and_post_jobs(service, client, digits_example, tmp_path, capsys):
    """The JobSpec is one type: the same YAML file (its checkpoint a path under the service's data root)
    runs locally with `dg2pf prune JOB` and on the service with POST /jobs (`dg2pf submit JOB`), and both
    results record the same job."""
    from dg2pf_cli.main import main
    from dg2pf_contract.job import JobSpec
    from dg2pf_contract.results import Metrics

    checkpoint = Path(service.env["DG2PF_DATA_ROOTS"]) / "same-file.safetensors"
    checkpoint.write_bytes((digits_example / "model.safetensors").read_bytes())
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"name: one-file\nmodel: {{arch: digits_cnn, num_classes: 10, checkpoint: {checkpoint}}}\n"
        "dataset: {spec: digits}\nsparsity: 0.75\nschedule: {pruning_epochs: 1, max_epochs: 2, seed: 3}\n"
    )
    JobSpec.read(job_file)  # the file is a JobSpec as it is
    assert main(["prune", str(job_file), "--out", str(tmp_path / "local"), "--quiet", "--threads", "1"]) == 0
    local = Metrics.read(tmp_path / "local" / "metrics.json")
    assert main(["submit", str(job_file), "--wait", "--url", service.url, "--token", TOKEN]) == 0
    job_id = capsys.readouterr().out.split("submitted ")[1].split()[0]
    job = client.get(job_id)
    assert job.state == "succeeded" and job.name == "one-file"
    assert job.spec == JobSpec.read(job_file).model_dump(mode="json")  # stored as the same JobSpec
    client.download(job_id, tmp_path / "remote")
    remote = Metrics.read(tmp_path / "remote" / "metrics.json")
    for m in (local, remote):
        assert m.target_sparsity == 0.75 and m.config["seed"] == 3 and m.config["pruning_epochs"] == 1
    assert local.config == remote.config


def test_the_light_client_alone_in_a_fresh_venv_drives_the_service(
    service, ckpt, digits_example, light_client_bin, tmp_path
):
    listed = subprocess.run(
        [str(light_client_bin / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "dg2pf-client" in installed and not installed & {"torch", "torchvision", "ray", "numpy", "dg2pf"}, installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"DG2PF_URL": service.url, "DG2PF_TOKEN": TOKEN}

    def dg2pf(*args: str, **over: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(light_client_bin / "dg2pf"), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env | over,
            timeout=600,
        )

    up = dg2pf("upload", str(digits_example / "model.safetensors"))
    assert up.returncode == 0 and up.stdout.split()[0] == ckpt, up.stderr  # the same content: the same id
    (tmp_path / "job.json").write_text(
        json.dumps(spec(ckpt, name="light", sparsity=0.8, schedule={"pruning_epochs": 1, "max_epochs": 2}))
    )
    listing = dg2pf("jobs")
    assert listing.returncode == 0 and listing.stdout.rstrip().endswith(")"), listing.stderr
    sub = dg2pf("submit", "job.json", "--wait")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = sub.stdout.split("submitted ")[1].split()[0]
    updates = [line for line in sub.stdout.splitlines() if line.startswith(job_id)]
    assert len(updates) >= 2 and "succeeded" in updates[-1], sub.stdout  # one line per change, not the job object
    assert job_id in dg2pf("jobs", "--state", "succeeded").stdout
    assert json.loads(dg2pf("status", job_id, "--json").stdout)["state"] == "succeeded"
    assert dg2pf("download", job_id, "--out", "dl").returncode == 0
    assert {"model.safetensors", "metrics.json"} <= {p.name for p in (tmp_path / "dl").iterdir()}
    (tmp_path / "bad.json").write_text(json.dumps(spec(ckpt, sparsity=2)))
    for result, needle in (
        (dg2pf("submit", "bad.json"), "(sparsity)"),
        (dg2pf("cancel", job_id), "already succeeded"),
        (dg2pf("jobs", DG2PF_TOKEN="wrong"), "token"),
        (dg2pf("prune", "--arch", "x"), "full dg2pf package"),
    ):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    probe = (
        "import sys\nfrom dg2pf_client import Client\n"
        f"with Client({service.url!r}, token={TOKEN!r}) as c:\n    print(c.get({job_id!r}).state)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'numpy'}))"
    )
    out = subprocess.run(
        [str(light_client_bin / "python"), "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.stdout.split() == ["succeeded", "[]"], out.stderr


def test_cancel_during_finetuning(service, client, ckpt):
    # patience 4: fine-tuning lasts at least 4 epochs, a window of several seconds to cancel in
    job_id = client.submit(spec(ckpt, schedule={"pruning_epochs": 1, "max_epochs": 40, "patience": 4})).id
    deadline = time.time() + 300
    job = client.get(job_id)
    while time.time() < deadline and not (
        job.phase == "finetuning" or job.state != "running" and job.state != "queued"
    ):
        time.sleep(0.1)
        job = client.get(job_id)
    assert job.phase == "finetuning" and job.state == "running", job
    assert client.cancel(job_id).state == "cancelled"
    time.sleep(3)
    job = client.get(job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    assert {h["phase"] for h in job.history} >= {"gradual_pruning", "distillation", "finetuning"}


def test_inputs_the_preflight_refuses_fail_the_job_with_its_message_and_the_queue_goes_on(
    service, client, ckpt, tmp_path
):
    """What only the job's runner can check (every image decoded, a dry forward + backward pass) fails
    the job with the preflight's one line, before any epoch; the next job runs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = service.data_dir.parent / "data" / "digits-folder"
    for label in range(10):
        d = root / "train" / str(label)
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(digits.images[digits.target == label][:6]):
            Image.fromarray((img * 16).astype(np.uint8), "L").save(d / f"{i}.png")
    broken = root / "train" / "7" / "2.png"
    broken.write_bytes(broken.read_bytes()[:40])
    bad_images = client.submit({**spec(ckpt), "dataset": {"spec": f"imagefolder:{root}"}}).id
    bn_batch_1 = client.submit({**spec(ckpt), "schedule": {**FAST, "batch_size": 1}}).id
    good = client.submit(spec(ckpt, schedule={"pruning_epochs": 1, "max_epochs": 1})).id
    a, b = client.wait(bad_images, timeout=300), client.wait(bn_batch_1, timeout=300)
    assert a.state == "failed" and "2.png" in a.error.message and "skip_bad_images" in a.error.message, a.error
    assert b.state == "failed" and "BatchNorm" in b.error.message and "batch_size" in b.error.message, b.error
    assert a.history == [] and b.history == []  # refused before any epoch
    assert client.wait(good, timeout=300).state == "succeeded"
    skipped = client.wait(
        client.submit(
            {
                **spec(ckpt, schedule={"pruning_epochs": 1, "max_epochs": 1}),
                "dataset": {"spec": f"imagefolder:{root}", "skip_bad_images": True},
            }
        ).id,
        timeout=300,
    )
    assert skipped.state == "succeeded", skipped.error


def test_a_checkpoint_with_nan_is_refused_at_upload(client, tmp_path):
    from dg2pf_core.models import build_model

    state = build_model("digits_cnn", 10).state_dict()
    name = next(k for k, v in state.items() if v.dim() > 1)
    state[name] = state[name].clone()
    state[name][0] = float("inf")
    path = tmp_path / "inf.safetensors"
    save_state_dict(state, path)
    with pytest.raises(InvalidRequest, match=name):
        client.upload_checkpoint(path)


def test_a_checkpoint_with_raw_and_ema_weights_is_refused_on_checkpoint_key_until_chosen(
    service, client, digits_example, tmp_path
):
    import torch

    from dg2pf_core.io.checkpoints import read_state_dict

    state = read_state_dict(digits_example / "model.safetensors")
    path = tmp_path / "ema.pt"
    torch.save({"state_dict": state, "state_dict_ema": {k: v.clone() for k, v in state.items()}}, path)
    ckpt = client.upload_checkpoint(path).id  # uploads take either set
    headers = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{service.url}/jobs", json=spec(ckpt), headers=headers)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "model.checkpoint_key" and "'state_dict_ema'" in error["message"]
    assert "model.checkpoint_key state_dict_ema" in error["message"] and "--checkpoint-key" not in error["message"]
    r = httpx.post(
        f"{service.url}/jobs",
        json={**spec(ckpt), "model": {**spec(ckpt)["model"], "checkpoint_key": "state_dict_ema"}},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    client.cancel(r.json()["id"])  # not needed further: the module's later tests expect an idle queue


def test_huge_query_numbers_are_refused_not_500(service):
    for query in ("offset=" + "9" * 30, "limit=" + "9" * 30, "offset=-1", "state=exploded"):
        r = httpx.get(f"{service.url}/jobs?{query}", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 422 and "error" in r.json(), (query, r.text)


def test_paths_cannot_escape_the_data_roots_and_checkpoints_are_pinned(service, client, ckpt, digits_example, tmp_path):
    import os
    import shutil

    root = service.data_dir.parent / "data"
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(digits_example / "model.safetensors", outside / "model.safetensors")
    os.symlink(outside / "model.safetensors", root / "linked.safetensors")
    os.link(outside / "model.safetensors", root / "hardlinked.safetensors")
    (root / "ds-with-link" / "train").mkdir(parents=True)
    os.symlink(outside, root / "ds-with-link" / "train" / "0")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        (
            {
                **spec(ckpt),
                "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": str(root / "linked.safetensors")},
            },
            "model.checkpoint",
            "not a file under DG2PF_DATA_ROOTS",
        ),
        (
            {
                **spec(ckpt),
                "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": str(root / "hardlinked.safetensors")},
            },
            "model.checkpoint",
            "hard link",
        ),
        (
            {
                **spec(ckpt),
                "model": {
                    "arch": "digits_cnn",
                    "num_classes": 10,
                    "checkpoint": str(service.data_dir / "checkpoints" / f"{ckpt}.safetensors"),
                },
            },
            "model.checkpoint",
            "not a file under DG2PF_DATA_ROOTS",
        ),
        ({**spec(ckpt), "dataset": {"spec": f"imagefolder:{root / 'ds-with-link'}"}}, "dataset.spec", "symbolic link"),
    ]
    total = client.list().total
    for body, field, needle in cases:
        r = httpx.post(f"{service.url}/jobs", json=body, headers=headers)
        assert (
            r.status_code == 422 and r.json()["error"]["field"] == field and needle in r.json()["error"]["message"]
        ), r.text
    assert client.list().total == total
    # A checkpoint under the roots is copied into the store when the job is submitted: replacing the
    # original afterwards (here by a link to another file) does not change what the job reads.
    own = root / "own.safetensors"
    shutil.copy(digits_example / "model.safetensors", own)
    job_id = client.submit(
        {
            **spec(ckpt, schedule={"pruning_epochs": 1, "max_epochs": 1}),
            "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": str(own)},
        }
    ).id
    own.unlink()
    os.symlink(outside / "model.safetensors", own)
    job = client.wait(job_id, timeout=300)
    assert job.state == "succeeded", job.error
    order = json.loads((service.data_dir / "jobs" / job_id / "job.json").read_text())
    assert Path(order["checkpoint"]).parent == service.data_dir / "checkpoints"


def test_a_hugging_face_directory_by_path_is_checked_file_by_file_and_refused_before_a_job_exists(
    service, client, ckpt, tmp_path
):
    import os
    import shutil

    from hf_dirs import hf_dir

    root = service.data_dir.parent / "data"
    outside = hf_dir(tmp_path, "vit")
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def case(name: str, change) -> Path:
        d = root / f"hf-{name}"
        shutil.copytree(outside, d)
        change(d)
        return d

    def remote(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))

    def linked(d: Path) -> None:
        (d / "model.safetensors").unlink()
        os.symlink(outside / "model.safetensors", d / "model.safetensors")

    cases = [
        (case("remote", remote), "never runs a model's remote code"),
        (case("linked", linked), "not a file under DG2PF_DATA_ROOTS"),
        (case("no-weights", lambda d: (d / "model.safetensors").unlink()), "holds no model.safetensors"),
        (case("bin", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin")), "pickled"),
        (str(ckpt), "takes a Hugging Face model directory"),  # an uploaded weights file's id
    ]
    total = client.list().total
    for d, needle in cases:
        body = {**spec(ckpt), "model": {"arch": "hf", "num_classes": 10, "checkpoint": str(d)}}
        r = httpx.post(f"{service.url}/jobs", json=body, headers=headers)
        error = r.json()["error"]
        assert r.status_code == 422 and error["field"] == "model.checkpoint" and needle in error["message"], r.text
        assert str(service.data_dir) not in error["message"]  # where the store keeps copies is not the client's
    assert client.list().total == total

    # A good directory by path: its three files copied into the store, addressed by their content (what an
    # upload of the same files gets), the rest of the folder never read.
    good = case("good", lambda d: (d / "training_args.bin").write_bytes(b"a pickle never opened"))
    store = service.data_dir / "checkpoints"
    before = {p.name for p in store.iterdir()}
    body = {**spec(ckpt, schedule={"pruning_epochs": 1, "max_epochs": 1}), "sparsity": 0.5}
    job_id = client.submit({**body, "model": {"arch": "hf", "num_classes": 10, "checkpoint": str(good)}}).id
    client.cancel(job_id)
    (pinned,) = [store / n for n in {p.name for p in store.iterdir()} - before]
    assert sorted(p.name for p in pinned.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert client.upload_checkpoint(outside).id == pinned.name


def _zip(path: Path, members: dict[str, bytes], compression=None) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", compression or zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_a_zipped_model_directory_that_is_wrong_or_hostile_is_refused_and_nothing_is_stored(service, client, tmp_path):
    import zipfile

    from hf_dirs import hf_dir

    d = hf_dir(tmp_path, "vit")
    files = {n: (d / n).read_bytes() for n in ("config.json", "model.safetensors", "preprocessor_config.json")}
    config = json.loads(files["config.json"])
    corrupt = _zip(tmp_path / "corrupt.zip", files, zipfile.ZIP_DEFLATED)
    data = bytearray(corrupt.read_bytes())
    at = data.find(b"model.safetensors") + 200  # inside the deflated weights
    data[at : at + 8] = b"\xff" * 8
    corrupt.write_bytes(bytes(data))
    import io

    import safetensors.torch
    import torch

    buffer = io.BytesIO()  # the weights as torch.save writes them, under the safetensors file's name
    torch.save(safetensors.torch.load(files["model.safetensors"]), buffer)
    torch_saved = buffer.getvalue()
    bomb = tmp_path / "bomb.zip"  # 30 MB of zeros deflate to tens of kB; this service takes 8 MB uncompressed
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", files["config.json"])
        with z.open("model.safetensors", "w", force_zip64=True) as w:
            for _ in range(30):
                w.write(bytes(1 << 20))
    cases = [
        (
            _zip(tmp_path / "two.zip", {f"a/{k}": v for k, v in files.items()} | {"b/config.json": b"{}"}),
            422,
            "more than one folder",
        ),
        (
            _zip(
                tmp_path / "remote.zip",
                {**files, "config.json": json.dumps({**config, "auto_map": {"x": "y.Z"}}).encode()},
            ),
            422,
            "remote code",
        ),
        (_zip(tmp_path / "noweights.zip", {"config.json": files["config.json"]}), 422, "holds no model.safetensors"),
        (
            _zip(tmp_path / "badweights.zip", {**files, "model.safetensors": b"not a safetensors file at all"}),
            422,
            "model.safetensors",
        ),
        (corrupt, 422, "cannot be read"),
        (_zip(tmp_path / "proc.zip", {**files, "preprocessor_config.json": b'{"resample": [1]}'}), 422, "resample"),
        (
            _zip(tmp_path / "torchzip.zip", {**files, "model.safetensors": torch_saved}),
            422,
            "not a safetensors",
        ),
        (bomb, 413, "DG2PF_MAX_UNCOMPRESSED_BYTES"),
    ]
    before = sorted(p.name for p in (service.data_dir / "checkpoints").iterdir())
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path, status, needle in cases:
        with path.open("rb") as fh:
            r = httpx.post(f"{service.url}/checkpoints", files={"file": (path.name, fh)}, headers=headers, timeout=120)
        assert r.status_code == status and needle in r.json()["error"]["message"], (path.name, r.text)
    assert sorted(p.name for p in (service.data_dir / "checkpoints").iterdir()) == before
    # Path-like names inside the zip are never used: only each model file's own name is.
    ok = _zip(tmp_path / "paths.zip", {f"../../evil/{k}": v for k, v in files.items()} | {"../../evil/run.sh": b"x"})
    stored = Path(client.upload_checkpoint(ok).id)
    assert not (service.data_dir.parent / "evil").exists() and not (tmp_path.parent / "evil").exists()
    assert sorted(p.name for p in (service.data_dir / "checkpoints" / stored.name).iterdir()) == sorted(files)


def test_a_huge_architecture_is_refused_before_it_is_built(service, client, ckpt):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for arch, needle in (
        ("torchvision/vit_h_14", "over this service's limit of 400,000,000"),
        ("torchvision/vit_l_16", "does not fit"),
    ):  # under the limit: checked on the meta device
        r = httpx.post(
            f"{service.url}/jobs",
            json={**spec(ckpt), "model": {"arch": arch, "num_classes": 10, "checkpoint": ckpt}},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 422 and needle in r.json()["error"]["message"], r.text


def test_latency_objectives_through_post_jobs_the_fastest_within_a_drop_and_an_unreachable_budget(
    service, client, ckpt, tmp_path
):
    """A max_top1_drop job is a search on the service's Ray cluster: it succeeds with its choice and the
    front among the artifacts; a latency budget no network can meet fails the job naming the numbers."""
    channel = {**FAST, "granularity": "channel", "latency_backend": "torch"}
    doc = spec(ckpt, sparsity=None, schedule={**channel, "max_top1_drop": 2.0}, tune={"samples": 2})
    job = client.wait(client.submit(doc).id)
    assert job.state == "succeeded", job.error
    objective = job.best_metrics["objective"]
    # 2 budgets, or 1 where this machine measured the tightest out of reach before any trial (said in skipped)
    assert objective["trials"] in (1, 2) and objective["max_top1_drop"] == 2.0 and objective["reason"]
    client.download(job.id, tmp_path / "out")
    front = json.loads((tmp_path / "out" / "pareto.json").read_text())
    skipped = json.loads((tmp_path / "out" / "metrics.json").read_text())["objective"]["skipped"]
    assert len(front) + len(skipped) == 2 and all("cannot be reached" in s for s in skipped)
    assert [p["trial_id"] for p in front if p["chosen"]] == [objective["chosen_trial"]]
    failed = client.wait(client.submit(spec(ckpt, sparsity=None, schedule={**channel, "latency_budget_ms": 1e-6})).id)
    assert failed.state == "failed"
    assert "latency_budget_ms 1e-06 cannot be reached" in failed.error.message
    assert "the dense network measured" in failed.error.message
