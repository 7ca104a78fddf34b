"""``dg2pf demo``: the whole user path on the embedded default, end to end.

Start the service (local Ray head, SQLite, local artifact directory), pre-train the digits example,
upload it, submit a 90% job through the Python client, follow it, print the result, then send real
digit images to the pruned model served on Ray Serve and print its predictions; shut down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dg2pf_client import Client
from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import Metrics
from dg2pf_core.data.digits import write_test_digit_images
from dg2pf_core.job.example import write_example
from dg2pf_service.cluster import free_port, head_record

from .summary import latency_rows


def run_demo(out: Path, sparsity: float = 0.9) -> int:
    out = out.resolve()
    data_dir = out / "service"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_port = free_port()
    env = {
        **os.environ,
        "DG2PF_DATA_DIR": str(data_dir),
        "DG2PF_POLL_SECONDS": "0.5",
        "DG2PF_SERVE_PORT": str(serve_port),
    }
    env.pop("RAY_ADDRESS", None)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "service.log").open("ab")
    print(f"== 1/6 starting the service at {url} (log: {out / 'service.log'})", flush=True)
    service = subprocess.Popen(
        [sys.executable, "-m", "dg2pf_service", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 180
        while True:
            if service.poll() is not None:
                print(
                    f"dg2pf: error: the service exited ({service.returncode}); see {out / 'service.log'}",
                    file=sys.stderr,
                )
                return 1
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                print("dg2pf: error: the service did not become ready in 180 s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"   API {url}  (OpenAPI docs: {url}/docs)", flush=True)

        example = out / "example"
        print("== 2/6 pre-training digits_cnn on scikit-learn's handwritten digits", flush=True)
        dense = Artifacts(example)
        if not dense.model.exists():
            metrics = write_example("digits", example)
            print(f"   dense test top-1 {metrics.test_top1:.2f}%", flush=True)

        with Client(url) as client:
            print("== 3/6 uploading the checkpoint", flush=True)
            ckpt = client.upload_checkpoint(dense.model)
            print(f"   checkpoint {ckpt.id} ({ckpt.bytes} bytes)", flush=True)
            print(f"== 4/6 submitting a {sparsity:.0%} DG2PF job", flush=True)
            job = client.submit(
                {
                    "name": "demo",
                    "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": ckpt.id},
                    "dataset": {"spec": "digits"},
                    "sparsity": sparsity,
                    "serve": True,
                }
            )

            def show(j) -> None:
                val = (j.latest_metrics or {}).get("val_top1")
                eta = f"  eta {j.eta_seconds:.0f} s" if j.eta_seconds else ""
                print(
                    f"   {j.state:<9} {j.phase:<15} epoch {j.epoch:>3}  sparsity {j.current_sparsity:6.2%}"
                    f"{f'  val top-1 {val:.2f}%' if val is not None else ''}{eta}",
                    flush=True,
                )

            final = client.wait(job.id, timeout=1800, on_update=show)
            if final.state != "succeeded":
                print(f"dg2pf: error: job {final.state}: {final.error}", file=sys.stderr)
                return 1
            files = client.download(final.id, out / "pruned")
            _print_result(final.id, Metrics.read(Artifacts(out / "pruned").metrics), files)

            print("== 6/6 the pruned model on Ray Serve: predictions for real digit images", flush=True)
            model = client.wait_model(final.id, timeout=300)
            print(f"   POST {model.url}", flush=True)
            images = write_test_digit_images(out / "digits", count=8)
            preds = client.predict(model.id, images=[p for p, _ in images], top_k=2)["predictions"]
            correct = 0
            for (path, label), top in zip(images, preds):
                correct += top[0]["index"] == label
                ranked = ", ".join(f"{p['label']} ({p['probability']:.1%})" for p in top)
                print(f"   {Path(path).name:<22} true {label}  predicted {ranked}", flush=True)
            print(f"   {correct}/{len(images)} correct", flush=True)
        return 0
    finally:
        print("== shutting down the service and its Ray head", flush=True)
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                service.kill()
        record = head_record(data_dir)
        if record.exists():
            from dg2pf_service.cluster import ClusterInfo, stop_embedded

            stop_embedded(ClusterInfo(**json.loads(record.read_text())))


def _print_result(job_id: str, m: Metrics, files: list[Path]) -> None:
    print("== 5/6 result", flush=True)
    rows = [
        ("job", job_id),
        ("target sparsity", f"{m.target_sparsity:.2%}"),
        ("sparsity (prunable weights)", f"{m.sparsity_prunable:.4%}"),
        ("parameters nonzero / total", f"{m.params_nonzero:,} / {m.params_total:,}"),
        ("MACs sparse / dense", f"{m.macs_sparse / max(m.macs_dense, 1):.3f}x"),
        (
            "test top-1 dense -> pruned",
            f"{m.baseline_test_top1:.2f}% -> {m.test_top1:.2f}% ({m.test_top1 - m.baseline_test_top1:+.2f})",
        ),
        ("epoch kept", f"{m.best_epoch} of {m.epochs} (val top-1 {m.val_top1:.2f}%)"),
        *latency_rows(m),  # measured, dense vs pruned: ~1.0x, unstructured sparsity runs on dense kernels
        ("artifacts in", str(files[0].parent) if files else "-"),
        *((f"  {p.name}", _size(p.stat().st_size)) for p in sorted(files)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} bytes"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"
