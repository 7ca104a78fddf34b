"""DG2PF on Ray Train with 2 CPU (gloo) DDP workers: equal masks, global metrics, capacity checks.

Restarts from a checkpoint after a lost worker, and workers on two Ray nodes, are proven through the
service on a real two-node cluster: tests/e2e/service/test_multinode.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch
from torch.utils.data import DataLoader

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.io.checkpoints import read_state_dict
from dg2pf_core.io.metrics import evaluate
from dg2pf_core.job import load_data, load_model
from dg2pf_ray.cluster import ClusterError, connect
from dg2pf_ray.train import RayOptions, prune_on_ray

pytestmark = pytest.mark.slow


def job_for(example: Path, **cfg) -> PruneJob:
    config = DG2PFConfig(**{"sparsity": 0.9, "pruning_epochs": 3, "max_epochs": 6, "patience": 2, **cfg})
    return PruneJob("digits_cnn", 10, str(example / "model.safetensors"), "digits", config)


def worker_logs_since(t0: float) -> str:
    """What the Ray workers of this session wrote to their stdout/stderr log files since ``t0``."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "".join(
        p.read_text(errors="replace")
        for p in sorted(logs.glob("worker-*"))
        if p.suffix in (".out", ".err") and p.stat().st_mtime >= t0
    )


@pytest.fixture(scope="module")
def local_ray():
    ray.shutdown()
    connect(None)
    yield
    ray.shutdown()


def test_two_workers_equal_masks_global_metrics_target_sparsity(local_ray, digits_example, tmp_path):
    # Over-parameterized fine-tuning: its chains and DDP (rebuilt around them) on 2 workers; the
    # default SGD fine-tuning runs on Ray Train through the service (tests/e2e/service).
    out = tmp_path / "out"
    # max_epochs leaves room after distillation (patience 1 stops it, but it can improve for several epochs)
    job = job_for(
        digits_example, pruning_epochs=2, max_epochs=10, patience=1, finetune="overparam", overparam_expansion=2
    )
    t0 = time.time()
    # as `dg2pf prune --workers 2` runs without --verbose: rank 0's epoch lines, none of Ray Train's own
    m = prune_on_ray(
        job, out, RayOptions(workers=2, storage_path=str(tmp_path / "store"), verbose=True, ray_logs=False)
    )
    logs = worker_logs_since(t0)
    assert "epoch   1 gradual_pruning" in logs and "Reporting training result" not in logs
    assert "Wrapping provided model in DistributedDataParallel" not in logs
    assert m.world_size == 2 and m.distributed.backend == "gloo"
    assert abs(m.sparsity_prunable - 0.9) <= 0.001
    by_epoch = m.distributed.mask_checksums
    assert len(by_epoch) >= 2
    for epoch, sums in by_epoch:
        assert len(sums) == 2 and sums[0] == sums[1], f"masks differ across ranks at epoch {epoch}"
    # test top-1 is over the whole split (both shards), not rank 0's half: recompute in-process
    spec, model = load_model("digits_cnn", 10, out / "model.safetensors")
    splits, _ = load_data("digits", spec, 10, None, 0.1, 0)
    whole = evaluate(model, DataLoader(splits.test, batch_size=512), torch.device("cpu"))
    assert m.test_top1 == pytest.approx(whole.top1)
    assert (out / "model.safetensors").exists()
    # rank 0 writes model.onnx and measures latency like a local job; the driver copies it out
    assert (out / "model.onnx").is_file() and m.onnx.written is True
    assert set(m.latency.backends) == {"torch", "onnxruntime"}
    compact, dense = read_state_dict(out / "model.compact.safetensors"), read_state_dict(out / "model.safetensors")
    assert compact.keys() == dense.keys() and all(torch.equal(compact[k], v) for k, v in dense.items())
    assert m.history[-1].restarts == 0 and m.ray_run is not None and m.driver_wall_seconds > 0
    assert "finetuning" in [r.phase for r in m.history]
    before = read_state_dict(digits_example / "model.safetensors")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in dense.items()}


def test_channel_pruning_removes_channels_under_ddp(local_ray, digits_example, tmp_path):
    # After the last pruning epoch both ranks remove the same channels and DDP is rebuilt around the
    # smaller network; the written model reloads from its structure to the whole split's top-1.
    out = tmp_path / "out"
    config = DG2PFConfig(granularity="channel", target_macs_ratio=0.5, pruning_epochs=2, max_epochs=3, patience=1)
    job = PruneJob("digits_cnn", 10, str(digits_example / "model.safetensors"), "digits", config)
    t0 = time.time()
    m = prune_on_ray(job, out, RayOptions(workers=2, storage_path=str(tmp_path / "store"), verbose=False))
    assert "Reporting training result" in worker_logs_since(t0)  # Ray's own lines by default (the service's logs)
    assert m.world_size == 2 and m.channels_pruned > 0
    assert abs(m.macs_sparse / m.macs_dense - 0.5) <= 0.025
    for epoch, sums in m.distributed.mask_checksums:
        assert sums[0] == sums[1], f"channel masks differ across ranks at epoch {epoch}"
    spec, model = load_model("digits_cnn", 10, out / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == m.params_total < m.params_dense
    splits, _ = load_data("digits", spec, 10, None, 0.1, 0)
    assert evaluate(model, DataLoader(splits.test, batch_size=512), torch.device("cpu")).top1 == pytest.approx(
        m.test_top1
    )


def test_more_workers_than_the_cluster_has_fails_fast(local_ray, digits_example, tmp_path):
    started = time.time()
    with pytest.raises(ClusterError, match="CPUs"):
        prune_on_ray(
            job_for(digits_example), tmp_path / "out", RayOptions(workers=16, storage_path=str(tmp_path / "s"))
        )
    assert time.time() - started < 30
    assert not (tmp_path / "out").exists()


def test_a_configuration_error_on_the_workers_fails_once_without_retries(local_ray, digits_example, tmp_path):
    # batch_size 2 over 2 workers: 1 image per BatchNorm step. Only the workers' own preflight (their
    # dry run, on their device, with their share of the batch) can see it; every rank reports the
    # refusal as the run's result, so Ray Train does not retry it (max_failures=2 would, for an error).
    from dg2pf_ray.train import RunFailed

    with pytest.raises(
        RunFailed, match=r"a worker refused the job: batch_size 2 over 2 workers .*BatchNorm.*--batch-size 4"
    ):
        prune_on_ray(
            job_for(digits_example, batch_size=2),
            tmp_path / "out",
            RayOptions(workers=2, storage_path=str(tmp_path / "store"), verbose=False),
        )
    assert not (tmp_path / "out").exists()
