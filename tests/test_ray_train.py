"""DG2PF on Ray Train with 2 CPU (gloo) DDP workers: equal masks, global metrics, restarts, nodes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from torch.utils.data import DataLoader

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.checkpoints import read_state_dict
from dg2pf_core.job import load_data, load_model
from dg2pf_core.metrics import evaluate
from dg2pf_ray.cluster import ClusterError, connect
from dg2pf_ray.train import RayOptions, prune_on_ray

pytestmark = pytest.mark.slow


def job_for(example: Path, **cfg) -> PruneJob:
    config = DG2PFConfig(**{"sparsity": 0.9, "pruning_epochs": 3, "max_epochs": 6, "patience": 2, **cfg})
    return PruneJob("digits_cnn", 10, str(example / "model.safetensors"), "digits", config)


@pytest.fixture(scope="module")
def local_ray():
    ray.shutdown()
    connect(None)
    yield
    ray.shutdown()


def test_two_workers_equal_masks_global_metrics_target_sparsity(local_ray, digits_example, tmp_path):
    out = tmp_path / "out"
    m = prune_on_ray(job_for(digits_example), out, RayOptions(workers=2, storage_path=str(tmp_path / "store"), verbose=False))
    assert m["world_size"] == 2 and m["distributed"]["backend"] == "gloo"
    assert abs(m["sparsity_prunable"] - 0.9) <= 0.001
    by_epoch = m["distributed"]["mask_checksums"]
    assert len(by_epoch) >= 3
    for epoch, sums in by_epoch:
        assert len(sums) == 2 and sums[0] == sums[1], f"masks differ across ranks at epoch {epoch}"
    # test top-1 is over the whole split (both shards), not rank 0's half: recompute in-process
    spec, model = load_model("digits_cnn", 10, out / "model.safetensors")
    splits, _ = load_data("digits", spec, 10, None, 0.1, 0)
    whole = evaluate(model, DataLoader(splits.test, batch_size=512), torch.device("cpu"))
    assert m["test_top1"] == pytest.approx(whole.top1)
    assert (out / "model.safetensors").exists()
    compact, dense = read_state_dict(out / "model.compact.safetensors"), read_state_dict(out / "model.safetensors")
    assert compact.keys() == dense.keys() and all(torch.equal(compact[k], v) for k, v in dense.items())
    assert {"phase", "epoch", "val_top1", "restarts"} <= m["history"][-1].keys()


def _train_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::RayTrainWorker"):
                pids.append(int(proc.name))
    return pids


def test_killed_worker_restores_from_checkpoint_and_finishes(local_ray, digits_example, tmp_path):
    store = tmp_path / "store"
    out = tmp_path / "out"
    box: dict = {}
    job = job_for(digits_example, pruning_epochs=5, max_epochs=8)

    def run() -> None:
        try:
            box["metrics"] = prune_on_ray(job, out, RayOptions(workers=2, storage_path=str(store), run_name="kill", max_failures=2, verbose=False))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 240
    while not list(store.glob("kill/epoch_0002")) and time.time() < deadline and thread.is_alive():
        time.sleep(0.2)
    pids = _train_worker_pids()
    assert pids, "no Ray Train worker process found"
    os.kill(pids[-1], signal.SIGKILL)  # mid pruning phase: epochs 3..5 are still gradual pruning
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert "error" not in box, box.get("error")
    m = box["metrics"]
    assert abs(m["sparsity_prunable"] - 0.9) <= 0.001
    history = m["history"]
    epochs = [r["epoch"] for r in history]
    assert epochs == list(range(len(epochs))), epochs  # continuous: nothing lost, nothing repeated
    assert history[-1]["restarts"] >= 1  # the history shows the restart
    assert history[0]["restarts"] == 0


def test_more_workers_than_the_cluster_has_fails_fast(local_ray, digits_example, tmp_path):
    started = time.time()
    with pytest.raises(ClusterError, match="CPUs"):
        prune_on_ray(job_for(digits_example), tmp_path / "out", RayOptions(workers=16, storage_path=str(tmp_path / "s")))
    assert time.time() - started < 30
    assert not (tmp_path / "out").exists()


def test_workers_run_on_two_nodes(digits_example, tmp_path):
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        connect(cluster.address)
        m = prune_on_ray(job_for(digits_example, pruning_epochs=1, max_epochs=2), tmp_path / "out",
                         RayOptions(workers=2, storage_path=str(tmp_path / "store"), verbose=False))
        nodes = m["distributed"]["worker_nodes"]
        assert len(nodes) == 2 and nodes[0] != nodes[1]
    finally:
        ray.shutdown()
        cluster.shutdown()
