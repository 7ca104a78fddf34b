"""Serving: batch-1 predict requests against a model on Ray Serve vs the same model in-process.

The script starts a real service (``python -m dg2pf_service``, as the tests do) in a fresh temp data
dir with its own embedded Ray head (``RAY_TMPDIR`` private) and Serve's HTTP proxy on a free port,
uploads the digits example (``dg2pf example digits``, or ``--example DIR``), runs a 90% job with
``serve: true`` (``pruning_epochs 2, max_epochs 4``) and waits until the model is ready. Serving
settings are the service's defaults unless given: one replica with 1 CPU, ``max_batch_size 32``,
``batch_wait_ms`` as set by ``--batch-wait-ms`` (default: the service default).

1. **In-process forward**: the same pruned model loaded by ``InferenceModel.load`` (the class the
   replicas use) in this process, ``torch.set_num_threads(1)`` as in a 1-CPU replica, batch of 1
   digit: median and p99 of ``model.logits(x)`` over 500 calls after 50 warm-up calls.
2. **HTTP**: for each concurrency C in (1, 16, 64), C asyncio workers in this process, sharing one
   ``httpx.AsyncClient`` (keep-alive), each sending ``POST /models/{id}/predict`` with a JSON batch of
   one real test digit (``{"inputs": [[C x H x W]]}``, ``top_k=5``, the ``serve_multiplexed_model_id``
   header) back to back for ``--seconds`` (default 15) after 2 s of warm-up at the same C.
   Recorded: requests/s, latency p50/p99 (request sent -> response parsed), errors.
   Also at C=1: ``GET /healthz`` on the Serve proxy (proxy + replica round trip without a model).
   And the floor of Ray Serve itself on this machine: this script joins the cluster as a driver and
   deploys a no-op app (``/noop``: reads the request body, returns {"ok": true}; no FastAPI, no access
   log, 0 CPUs), then sends it the same POSTs at C = 1, 16, 64.
3. Overhead = p50(HTTP, C=1) - p50(in-process forward); batching gain = req/s(C=64) / req/s(C=1).

The load generator shares the 2 cores with the proxy and the replica; its own CPU is part of the
figures (as it would be for a client on the same host). It runs at nice 15, the niceness Ray gives
its workers (the proxy and the replicas): at nice 0 it would win every contended time slice.

    .venv/bin/python bench/bench_serve.py [--quick] [--example DIR] [--seconds S] [--batch-wait-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from benchreport import contention_line, environment, environment_lines, table, write_result

from dg2pf_contract.artifacts import Artifacts, JobDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from bench_service import ServiceContention, make_example, pct  # noqa: E402
from service_process import ServiceProcess  # noqa: E402


def in_process(output_dir: Path, x: torch.Tensor, calls: int = 500) -> dict:
    from dg2pf_core.io.inference import InferenceModel

    torch.set_num_threads(1)
    model = InferenceModel.load(output_dir)
    for _ in range(50):
        model.logits(x)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        model.logits(x)
        times.append(time.perf_counter() - t)
    return {"p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3, "calls": calls}


async def load(
    url: str, concurrency: int, seconds: float, *, body: dict | None, headers: dict, warmup: float = 2.0
) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        latencies: list[float] = []
        errors: list[str] = []
        phase = {"record": False}

        async def worker(stop_at: float) -> None:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    if body is None:
                        r = await client.get(url, headers=headers)
                    else:
                        r = await client.post(url, json=body, headers=headers, params={"top_k": 5})
                    r.json()  # parsed, as a client would
                    ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                if phase["record"]:
                    if ok:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors.append(str(getattr(r, "status_code", r))[:80])

        await asyncio.gather(*(worker(time.perf_counter() + warmup) for _ in range(concurrency)))
        phase["record"] = True
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "rps": len(latencies) / wall,
        "p50_ms": pct(latencies, 0.5) * 1e3 if latencies else None,
        "p99_ms": pct(latencies, 0.99) * 1e3 if latencies else None,
        "seconds": wall,
    }


def deploy_noop(data_dir: Path, port: int) -> None:
    """A no-op Serve app on the service's cluster: what any Serve request costs here."""
    import json

    from dg2pf_service.cluster import head_record

    os.environ["RAY_AUTH_MODE"] = "token"
    import ray
    from ray import serve

    info = json.loads(head_record(data_dir).read_text())
    ray.init(address=info["gcs_address"], log_to_driver=False, logging_level="WARNING")

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=128)
    class Noop:
        async def __call__(self, request):
            await request.body()
            return {"ok": True}

    serve.run(
        Noop.bind(),
        name="noop",
        route_prefix="/noop",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s per level")
    parser.add_argument("--example", type=Path)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--batch-wait-ms", type=float)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    seconds = 5.0 if args.quick else args.seconds

    from dg2pf_client import Client
    from dg2pf_core.data import DataRequest, load_dataset
    from dg2pf_service.cluster import free_port

    root = Path(tempfile.mkdtemp(prefix="dg2pf-bench-serve-"))
    example = args.example or make_example(root)
    serve_port = free_port()
    # Short: Ray's unix socket paths under it must stay within 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    env = {"DG2PF_SERVE_PORT": str(serve_port), "RAY_TMPDIR": str(ray_tmp)}
    if args.batch_wait_ms is not None:
        env["DG2PF_SERVE_BATCH_WAIT_MS"] = str(args.batch_wait_ms)
    service = ServiceProcess(root / "state", **env)
    results: dict = {"settings": {k: v for k, v in env.items() if k != "RAY_TMPDIR"}, "seconds_per_level": seconds}
    try:
        service.start()
        with Client(service.url) as client:
            ckpt = client.upload_checkpoint(Artifacts(example).model).id
            spec = {
                "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": ckpt},
                "dataset": {"spec": "digits"},
                "sparsity": 0.9,
                "schedule": {"pruning_epochs": 2, "max_epochs": 4, "patience": 2},
                "serve": True,
            }
            job = client.wait(client.submit(spec).id, timeout=600)
            assert job.state == "succeeded", job.error
            t = time.perf_counter()
            model = client.wait_model(job.id, timeout=600)
            results["deploy_to_ready_s"] = time.perf_counter() - t
        x = load_dataset("digits", DataRequest(image_size=16, in_channels=1)).test[0][0].unsqueeze(0)
        output_dir = JobDir(service.data_dir / "jobs" / job.id).output.root
        contention = ServiceContention(str(ray_tmp))
        results["in_process"] = in_process(output_dir, x)
        # Ray starts its workers (the proxy and replicas among them) at nice 15; a load generator at
        # nice 0 would starve them whenever it has work, which at high concurrency is always.
        results["load_generator_nice"] = os.nice(15 - os.nice(0))
        headers = {"serve_multiplexed_model_id": model.id}
        body = {"inputs": x.tolist()}
        base = model.url.split("/models/")[0]
        results["healthz_c1"] = asyncio.run(load(f"{base}/healthz", 1, seconds, body=None, headers={}))
        deploy_noop(service.data_dir, serve_port)
        results["noop"] = [asyncio.run(load(f"{base}/noop", c, seconds, body=body, headers={})) for c in (1, 16, 64)]
        results["noop_c1"] = results["noop"][0]
        results["http"] = [asyncio.run(load(model.url, c, seconds, body=body, headers=headers)) for c in (1, 16, 64)]
        results["contention"] = contention.result()
    finally:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # before the head goes: a driver whose GCS vanishes terminates the process
        service.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(ray_tmp, ignore_errors=True)

    ip, http = results["in_process"], {r["concurrency"]: r for r in results["http"]}
    results["overhead_p50_ms_c1"] = http[1]["p50_ms"] - ip["p50_ms"]
    results["rps_ratio_c64_c1"] = http[64]["rps"] / http[1]["rps"]
    results["environment"] = environment()
    path = write_result("bench_serve", results)

    print(environment_lines(results["environment"]))
    print(contention_line(results["contention"]))
    print(f"deploy -> ready: {results['deploy_to_ready_s']:.1f} s; {seconds:.0f} s per level\n")
    rows = [["in-process forward (1 thread)", "-", "-", f"{ip['p50_ms']:.3f}", f"{ip['p99_ms']:.3f}", "-"]]
    for n in results["noop"]:
        rows.append(
            [
                "POST no-op Serve app (the floor)",
                n["concurrency"],
                f"{n['rps']:.0f}",
                f"{n['p50_ms']:.2f}",
                f"{n['p99_ms']:.2f}",
                n["errors"],
            ]
        )
    h = results["healthz_c1"]
    rows.append(
        ["GET /healthz of the dg2pf app", 1, f"{h['rps']:.0f}", f"{h['p50_ms']:.2f}", f"{h['p99_ms']:.2f}", h["errors"]]
    )
    for c in (1, 16, 64):
        r = http[c]
        rows.append(
            ["POST predict, batch 1", c, f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", r["errors"]]
        )
    print(table(["what", "concurrency", "req/s", "p50 ms", "p99 ms", "errors"], rows))
    print(
        f"\np50 overhead over in-process forward at concurrency 1: {results['overhead_p50_ms_c1']:.2f} ms "
        "(goal <= 5 ms); "
        f"a no-op Serve request alone: {results['noop_c1']['p50_ms']:.2f} ms"
    )
    print(f"throughput concurrency 64 / concurrency 1: {results['rps_ratio_c64_c1']:.2f}x (goal >= 3x)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
