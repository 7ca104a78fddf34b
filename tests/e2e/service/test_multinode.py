"""The service against an existing multi-node Ray cluster (not its embedded head).

Two Ray nodes run as separate processes on this machine: a head (``ray start --head``, 2 CPUs) and
a second node that joins it by address (``ray start --address ... --block``, 1 CPU). The service is
started with ``DG2PF_RAY_ADDRESS``/``DG2PF_RAY_DASHBOARD_URL`` pointing at them, as in a compose or
KubeRay deployment. A 2-worker DDP job with ``placement: spread`` runs one worker per node; then the
second node is killed (SIGKILL of every process it runs, as in a machine failure) mid-job.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from service_process import ServiceProcess

from dg2pf_client import Client
from dg2pf_service.cluster import (
    ClusterInfo,
    auth_headers,
    node_env,
    node_ports,
    ray_cli,
    start_embedded,
    stop_embedded,
)
from dg2pf_service.processes import descendants, kill_processes

pytestmark = pytest.mark.slow
TOKEN = "multinode-token"


def _nodes(info: ClusterInfo) -> list[dict]:
    """Alive nodes, from the dashboard's state API (with the cluster's token)."""
    r = httpx.get(f"{info.dashboard_url}/api/v0/nodes", params={"limit": 100}, headers=auth_headers(), timeout=10)
    r.raise_for_status()
    return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


class SecondNode:
    """``ray start --address HEAD --block``: a Ray node that lives as long as this process tree."""

    def __init__(self, head: ClusterInfo, num_cpus: int, log: Path) -> None:
        env = {**node_env(), "RAY_AUTH_MODE": "token"}
        cmd = [
            ray_cli(),
            "start",
            f"--address={head.gcs_address}",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            "--block",
            *[f"--{k}={v}" for k, v in node_ports().items()],
        ]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self) -> None:
        """Every process of the node at once (raylet, agents, the Ray workers it runs)."""
        if self.proc.poll() is None:
            kill_processes(descendants({self.proc.pid}), grace_seconds=0)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    with pytest.MonkeyPatch.context() as env:
        # Ray's node health checks (defaults: every 3 s, dead after 5 misses) at 1 s x 3, so the lost
        # node is noticed in seconds; the recovery path is the same.
        env.setenv("RAY_health_check_period_ms", "1000")
        env.setenv("RAY_health_check_failure_threshold", "3")
        head = start_embedded(root / "head", num_cpus=2)  # a plain `ray start --head`, as an operator would run
    second = SecondNode(head, num_cpus=1, log=root / "second-node.log")
    try:
        deadline = time.time() + 120
        while len(_nodes(head)) < 2:
            assert second.proc.poll() is None, (
                f"the second node exited: {(root / 'second-node.log').read_text()[-2000:]}"
            )
            assert time.time() < deadline, "the second node did not join the head in 120 s"
            time.sleep(1)
        yield head, second, root
    finally:
        second.kill()
        stop_embedded(head)


@pytest.fixture(scope="module")
def service(cluster, digits_example):
    head, _, root = cluster
    svc = ServiceProcess(
        root / "state",
        DG2PF_RAY_ADDRESS=head.gcs_address,
        DG2PF_RAY_DASHBOARD_URL=head.dashboard_url,
        DG2PF_API_TOKENS=TOKEN,
        DG2PF_DATA_ROOTS="",
        DG2PF_WORKER_START_TIMEOUT_S="6",
        # as for an autoscaling cluster whose GPU group is at 0 nodes
        DG2PF_CLUSTER_MAX_GPUS="1",
    )
    svc.start()
    yield svc
    svc.kill()  # the service started no Ray of its own: the cluster fixture stops the nodes


def _job(ckpt: str, epochs: int = 6, **resources) -> dict:
    return {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": ckpt},
        "dataset": {"spec": "digits"},
        "sparsity": 0.9,
        "schedule": {"pruning_epochs": 3, "max_epochs": epochs, "patience": epochs},
        "resources": resources,
    }


def test_job_spans_two_nodes_and_survives_losing_one(cluster, service, digits_example):
    head, second, _ = cluster
    node_ids = {n["node_id"]: n["is_head_node"] for n in _nodes(head)}
    head_id = next(i for i, is_head in node_ids.items() if is_head)
    with Client(service.url, token=TOKEN) as client:
        assert client.health()["checks"]["ray"] == "ok"
        assert not (service.data_dir / "ray-state").exists(), (
            "the service must use the given cluster, not start its own"
        )
        ckpt = client.upload_checkpoint(digits_example / "model.safetensors").id
        # Long enough that the node dies mid-training even when the progress the test polls lags the
        # workers (a CI run on 2 loaded cores saw all 6 epochs of a shorter job end before the kill).
        job = client.submit(_job(ckpt, epochs=16, num_workers=2, placement="spread"))

        # 1. Both workers run, one on each node (the progress record names each rank's node).
        deadline = time.time() + 240
        while True:
            current = client.get(job.id)
            assert current.state in ("queued", "running"), f"{current.state}: {current.error}"
            latest = current.latest_metrics or {}
            if latest.get("epoch", 0) >= 1:
                break
            assert time.time() < deadline, "no epoch finished in 240 s"
            time.sleep(0.5)
        assert latest["world_size"] == 2 and len(set(latest["nodes"])) == 2, latest
        assert set(latest["nodes"]) == set(node_ids), (latest["nodes"], node_ids)

        # 2. The second node dies mid-job.
        killed_at_epoch = latest["epoch"]
        second.kill()
        final = client.wait(job.id, timeout=420)  # raises TimeoutError if the job hangs

    # 3. Never lost: the record is still there with a terminal state and its history.
    with Client(service.url, token=TOKEN) as client:
        assert client.get(job.id).state == final.state
        assert job.id in [j.id for j in client.list().items]
    progress = [
        json.loads(line) for line in (service.data_dir / "jobs" / job.id / "progress.jsonl").read_text().splitlines()
    ]
    # Either outcome the issue allows is checked; with `spread` and 2 CPUs left on the head, Ray Train
    # restarts both workers there from the last checkpoint, which is what this cluster is sized for.
    assert final.state == "succeeded", f"expected recovery on the head's 2 CPUs; got {final.state}: {final.error}"
    assert abs(final.best_metrics["sparsity_prunable"] - 0.9) < 1e-3 and final.best_metrics["world_size"] == 2
    assert [h["epoch"] for h in final.history] == list(range(len(final.history)))
    resumed = [r for r in progress if r["restarts"] >= 1]
    assert resumed, "the job finished without a restart: the node was lost after the work ended?"
    assert resumed[0]["epoch"] > 0 and all(r["nodes"] == [head_id, head_id] for r in resumed), resumed
    assert killed_at_epoch < progress[-1]["epoch"]


def test_work_the_cluster_cannot_place_fails_clearly_instead_of_waiting(cluster, service, digits_example):
    """A GPU job on a cluster declared able to grow to 1 GPU (DG2PF_CLUSTER_MAX_GPUS) is accepted and
    dispatched; no GPU node ever comes, so Ray Train's placement attempts time out and the job fails
    with a message that says why and what to do."""
    head, _, _ = cluster
    assert all(n["resources_total"].get("GPU", 0) == 0 for n in _nodes(head))
    with Client(service.url, token=TOKEN) as client:
        ckpt = client.upload_checkpoint(digits_example / "model.safetensors").id
        job = client.submit(_job(ckpt, num_workers=1, use_gpu=True))
        final = client.wait(job.id, timeout=300)
        assert final.state == "failed" and final.error.type == "RunFailed", final.error
        message = final.error.message
        assert "could not place the 1 workers (1 CPU and 1 GPU each)" in message and "0 GPUs" in message, message
        assert "DG2PF_WORKER_START_TIMEOUT_S" in message
        assert client.get(job.id).state == "failed"
