"""Serving pruned models on Ray Serve, over real HTTP: a real service, embedded Ray head, Serve proxy.

One service (SQLite, bearer tokens) for the module: a digits job with ``serve: true`` is deployed
when it succeeds; the tests then query it as a user would, break it, and restart everything (the
restart switches the replicas to ``DG2PF_SERVE_BACKEND=onnxruntime``, so both backends answer the same
models over the same HTTP path).
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import httpx
import PIL.Image
import pytest
import torch
from service_process import ServiceProcess

from dg2pf_client import Client, Conflict, NotFound
from dg2pf_core.data import DataRequest, load_dataset
from dg2pf_core.data.digits import write_test_digit_images
from dg2pf_core.io.inference import InferenceModel
from dg2pf_core.io.onnx_export import ATOL
from dg2pf_core.job import load_model
from dg2pf_service.cluster import free_port

pytestmark = pytest.mark.slow
TOKEN = "serve-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _spec(checkpoint: str, **over) -> dict:
    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": checkpoint},
        "dataset": {"spec": "digits"},
        "sparsity": 0.9,
        "schedule": {"pruning_epochs": 2, "max_epochs": 4, "patience": 2},
    }
    doc.update(over)
    return doc


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    (root / "data").mkdir()
    svc = ServiceProcess(
        root / "state",
        DG2PF_DATA_ROOTS=str(root / "data"),
        DG2PF_API_TOKENS=TOKEN,
        DG2PF_SERVE_PORT=str(free_port()),
        DG2PF_SERVE_POLL_SECONDS="0.5",
        DG2PF_SERVE_MAX_INPUTS="16",
        DG2PF_SERVE_MAX_MODELS_PER_REPLICA="1",
        DG2PF_SERVE_MAX_REQUEST_BYTES=str(200_000),
    )
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service):
    with Client(service.url, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def served(client, digits_example) -> dict:
    """The job (serve: true) and its deployed model, once ready."""
    ckpt = client.upload_checkpoint(digits_example / "model.safetensors").id
    job = client.wait(
        client.submit(_spec(ckpt, serve=True, schedule={"pruning_epochs": 1, "max_epochs": 3, "patience": 2})).id,
        timeout=300,
    )
    assert job.state == "succeeded", job.error
    model = client.wait_model(job.id, timeout=240)
    return {"job": job, "model": model, "checkpoint": ckpt}


@pytest.fixture(scope="module")
def test_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    splits = load_dataset("digits", DataRequest(image_size=16, in_channels=1))
    xs, ys = zip(*(splits.test[i] for i in range(16)))
    return torch.stack(xs), torch.tensor(ys)


def _output_dir(service, job_id: str) -> Path:
    return service.data_dir / "jobs" / job_id / "output"


def test_serve_true_job_is_deployed_with_its_url(served, client):
    model = served["model"]
    assert model.status == "ready" and model.id == served["job"].id
    assert model.url.endswith(f"/models/{model.id}/predict")
    assert (
        model.arch == "digits_cnn"
        and model.input_shape == [1, 16, 16]
        and model.class_names == [str(d) for d in range(10)]
    )
    assert [m.id for m in client.models().items] == [model.id]


def test_served_logits_equal_the_pruned_checkpoint_in_process(served, client, service, test_inputs):
    xs, ys = test_inputs
    out = client.predict(served["model"].id, inputs=xs, top_k=3, logits=True)
    served_logits = torch.tensor(out["logits"])
    # Reference: the job's dense pruned checkpoint, loaded and run in this process.
    _, dense = load_model("digits_cnn", 10, _output_dir(service, served["job"].id) / "model.safetensors")
    with torch.no_grad():
        expected = dense.eval()(xs)
    assert served_logits.shape == expected.shape
    assert torch.allclose(served_logits, expected, atol=1e-5, rtol=0), (served_logits - expected).abs().max()
    preds = out["predictions"]
    assert len(preds) == len(xs) and all(len(p) == 3 for p in preds)
    for row, logit_row in zip(preds, expected):
        probs = [p["probability"] for p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert row[0]["index"] == int(logit_row.argmax()) and row[0]["label"] == str(row[0]["index"])
    accuracy = sum(row[0]["index"] == int(y) for row, y in zip(preds, ys)) / len(ys)
    assert accuracy >= 0.8


def test_image_uploads_raw_and_multipart(served, client, tmp_path, test_inputs):
    model_id = served["model"].id
    images = write_test_digit_images(tmp_path, count=6)
    out = client.predict(model_id, images=[p for p, _ in images], top_k=1)
    assert len(out["predictions"]) == 6
    tensor_top1 = [r[0]["index"] for r in client.predict(model_id, inputs=test_inputs[0][:6], top_k=1)["predictions"]]
    image_top1 = [r[0]["index"] for r in out["predictions"]]
    assert sum(a == b for a, b in zip(image_top1, tensor_top1)) >= 5  # same digits, 8-bit rounding aside
    # A raw JPEG body (RGB, large, light ink on dark) goes through the same eval transform.
    buf = io.BytesIO()
    PIL.Image.open(images[0][0]).convert("RGB").resize((64, 64)).save(buf, format="JPEG", quality=95)
    r = httpx.post(
        served["model"].url,
        content=buf.getvalue(),
        headers={**AUTH, "Content-Type": "image/jpeg"},
        params={"top_k": 10},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]) == 10


def test_two_models_take_turns_in_one_replica_beyond_the_lru_bound(served, client, service, test_inputs):
    """One model per replica at most (DG2PF_SERVE_MAX_MODELS_PER_REPLICA=1): alternating requests evict
    and reload, and every answer is still the right model's."""
    other = client.wait(
        client.submit(
            _spec(
                served["checkpoint"],
                sparsity=0.5,
                serve=True,
                schedule={"pruning_epochs": 1, "max_epochs": 2, "patience": 2},
            )
        ).id,
        timeout=300,
    )
    assert other.state == "succeeded", other.error
    client.wait_model(other.id, timeout=240)
    xs = test_inputs[0][:4]
    expected = {}
    for job_id in (served["job"].id, other.id):
        _, dense = load_model("digits_cnn", 10, _output_dir(service, job_id) / "model.safetensors")
        with torch.no_grad():
            expected[job_id] = dense.eval()(xs)
    assert not torch.allclose(expected[served["job"].id], expected[other.id])  # two different models
    for job_id in [served["job"].id, other.id] * 2:
        got = torch.tensor(client.predict(job_id, inputs=xs, logits=True)["logits"])
        assert torch.allclose(got, expected[job_id], atol=1e-5, rtol=0)
    assert {m.id for m in client.models().items} == {served["job"].id, other.id}
    client.undeploy(other.id)


def test_cli_models_and_predict(served, service, tmp_path, capsys):
    from dg2pf_cli.main import main

    model_id = served["model"].id
    common = ["--url", service.url, "--token", TOKEN]
    assert main(["models", *common]) == 0
    assert model_id in capsys.readouterr().out
    images = write_test_digit_images(tmp_path, count=2)
    assert main(["predict", model_id, *[p for p, _ in images], "--top-k", "2", *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(str(tmp_path)) and "%" in line for line in lines)
    assert main(["predict", model_id, str(tmp_path / "missing.png"), *common]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["predict", "0" * 32, images[0][0], *common]) == 2
    assert "no deployed model" in capsys.readouterr().err


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "kind",
    [
        "wrong_shape",
        "ragged",
        "not_json_object",
        "not_an_image",
        "gif",
        "too_large",
        "too_many",
        "unknown_model",
        "bad_top_k",
        "media_type",
        "no_token",
        "bad_token",
        "empty",
        "png_bomb",
        "jpeg_bomb",
        "deep_json",
    ],
)
def test_bad_requests_get_4xx_and_the_replica_keeps_serving(served, kind, test_inputs):
    url = served["model"].url
    headers = dict(AUTH)
    kw: dict = {}
    if kind == "wrong_shape":
        kw["json"] = {"inputs": torch.zeros(2, 3, 16, 16).tolist()}
        expect, message = 400, "1 x 16 x 16"
    elif kind == "ragged":
        kw["json"] = {"inputs": [[[1.0, 2.0], [3.0]]]}
        expect, message = 400, "rectangular"
    elif kind == "not_json_object":
        kw["json"] = [1, 2, 3]
        expect, message = 400, "inputs"
    elif kind == "not_an_image":
        kw["content"], headers["Content-Type"] = b"hello, not an image", "image/png"
        expect, message = 400, "not a readable image"
    elif kind == "gif":
        buf = io.BytesIO()
        PIL.Image.new("L", (8, 8)).save(buf, format="GIF")
        kw["content"], headers["Content-Type"] = buf.getvalue(), "application/octet-stream"
        expect, message = 400, "PNG or JPEG"
    elif kind == "too_large":
        kw["content"], headers["Content-Type"] = os.urandom(300_000), "image/png"
        expect, message = 413, "200000 bytes"
    elif kind == "too_many":
        kw["json"] = {"inputs": torch.zeros(17, 1, 16, 16).tolist()}
        expect, message = 413, "at most 16"
    elif kind == "unknown_model":
        url = url.replace(served["model"].id, "0" * 32)
        kw["json"] = {"inputs": test_inputs[0][:1].tolist()}
        expect, message = 404, "no deployed model"
    elif kind == "bad_top_k":
        kw["json"], kw["params"] = {"inputs": test_inputs[0][:1].tolist()}, {"top_k": 0}
        expect, message = 422, "top_k"
    elif kind == "media_type":
        kw["content"], headers["Content-Type"] = b"a,b", "text/csv"
        expect, message = 415, "text/csv"
    elif kind == "png_bomb":  # 141 bytes declaring 65535 x 65535 pixels: Pillow refuses to open it
        kw["content"], headers["Content-Type"] = _png_header(65535, 65535), "image/png"
        expect, message = 400, "too large"
    elif kind == "jpeg_bomb":
        kw["content"] = b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01\xff\xd9"
        headers["Content-Type"] = "image/jpeg"
        expect, message = 400, "at most"
    elif kind == "deep_json":  # 50,000 nested arrays (100 kB): Python's parser would recurse past its limit
        kw["content"], headers["Content-Type"] = (
            b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            "application/json",
        )
        expect, message = 400, "nests too deeply"
    elif kind == "no_token":
        headers.pop("Authorization")
        kw["json"] = {"inputs": test_inputs[0][:1].tolist()}
        expect, message = 401, "bearer"
    elif kind == "bad_token":
        headers["Authorization"] = "Bearer nope"
        kw["json"] = {"inputs": test_inputs[0][:1].tolist()}
        expect, message = 403, "invalid"
    else:
        kw["content"], headers["Content-Type"] = b"", "image/png"
        expect, message = 400, "empty body"
    r = httpx.post(url, headers=headers, timeout=30, **kw)
    assert r.status_code == expect, r.text
    assert message in r.json()["error"]["message"]
    ok = httpx.post(served["model"].url, headers=AUTH, json={"inputs": test_inputs[0][:2].tolist()}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2


def test_deploy_rules_undeploy_and_redeploy(served, client, service, test_inputs):
    model_id = served["model"].id
    with pytest.raises(NotFound):
        client.deploy("f" * 32)
    queued = client.submit(
        _spec(served["checkpoint"], schedule={"pruning_epochs": 1, "max_epochs": 30, "patience": 30})
    ).id
    with pytest.raises(Conflict, match="only succeeded jobs"):
        client.deploy(queued, wait=False)
    client.cancel(queued)

    client.undeploy(model_id)
    assert client.models().items == []
    # The last model gone, Serve is shut down through its REST API (DELETE /api/serve/applications/),
    # proxy included, so its CPUs go back to jobs. Until then the replica answers with the service's 404;
    # once the proxy has gone its port refuses connections. Either way the model is no longer served.
    deadline = time.time() + 120
    while True:
        try:
            r = httpx.post(served["model"].url, headers=AUTH, json={"inputs": test_inputs[0][:1].tolist()}, timeout=30)
        except httpx.ConnectError:
            break  # Serve's proxy is gone
        except httpx.TransportError:  # the proxy drops a request that reaches the application it is deleting
            assert time.time() < deadline, "Serve's proxy neither answered nor went away after the last undeploy"
            time.sleep(0.5)
            continue
        assert r.status_code == 404, r.text
        assert "no deployed model" in r.text or "not found" in r.text
        break
    with pytest.raises(NotFound):
        client.undeploy(model_id)

    model = client.deploy(model_id, timeout=240)
    assert model.status == "ready"
    assert len(client.predict(model_id, inputs=test_inputs[0][:2])["predictions"]) == 2


def _replica_pids(service) -> list[int]:
    """The Serve replicas of this test's cluster (its processes inherit the service's DG2PF_DATA_DIR)."""
    marker = f"DG2PF_DATA_DIR={service.data_dir}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                if b"ServeReplica:dg2pf:ModelServer" in cmd and marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_killed_replica_is_restarted_and_serves_again(served, client, service, test_inputs):
    model_id = served["model"].id
    client.wait_model(model_id, timeout=240)  # the previous test redeployed it
    body = {"inputs": test_inputs[0][:2].tolist()}
    assert httpx.post(served["model"].url, headers=AUTH, json=body, timeout=30).status_code == 200
    pids = _replica_pids(service)
    assert pids, "no Serve replica process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline, statuses = time.time() + 180, []
    while time.time() < deadline:
        try:
            r = httpx.post(served["model"].url, headers=AUTH, json=body, timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 200 and set(_replica_pids(service)) - set(pids):
                break
        except httpx.HTTPError as exc:
            statuses.append(type(exc).__name__)
        time.sleep(1)
    assert statuses and statuses[-1] == 200, statuses
    assert set(_replica_pids(service)) - set(pids), "Serve did not start a new replica"
    assert len(client.predict(model_id, inputs=test_inputs[0][:3])["predictions"]) == 3


@pytest.fixture(scope="module")
def channel_served(client, served):
    """A channel-pruned job (half the MACs: whole channels removed, smaller shapes) deployed with
    ``serve: true`` beside the first model."""
    spec = _spec(
        served["checkpoint"],
        serve=True,
        schedule={
            "granularity": "channel",
            "target_macs_ratio": 0.5,
            "pruning_epochs": 1,
            "max_epochs": 2,
            "patience": 1,
        },
    )
    del spec["sparsity"]  # target_macs_ratio decides it
    job = client.wait(client.submit(spec).id, timeout=300)
    assert job.state == "succeeded", job.error
    return client.wait_model(job.id, timeout=240)


def test_a_channel_pruned_job_is_served_with_its_in_process_logits(channel_served, client, service, test_inputs):
    xs = test_inputs[0]
    out_dir = _output_dir(service, channel_served.id)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["granularity"] == "channel" and metrics["params_total"] < metrics["params_dense"]
    assert channel_served.status == "ready" and channel_served.backend == "torch"
    reference = InferenceModel.load(out_dir)  # rebuilds the smaller structure from the safetensors metadata
    expected = reference.logits(xs)
    out = client.predict(channel_served.id, inputs=xs, top_k=3, logits=True)
    assert out["backend"] == "torch"
    assert torch.allclose(torch.tensor(out["logits"]), expected, atol=1e-5, rtol=0)
    for got, want in zip(out["predictions"], reference.top_k(expected, 3)):
        assert [(p["index"], p["label"]) for p in got] == [(p.index, p.label) for p in want]
        assert [p["probability"] for p in got] == pytest.approx([p.probability for p in want], abs=1e-6)


def test_an_api_restarted_with_another_backend_redeploys_and_reports_what_answers(served, service, test_inputs):
    """Only the API restarted, with another DG2PF_SERVE_BACKEND, while the Ray head and Serve's replicas
    keep running: the service redeploys the replicas with it, and GET /models never reports a backend
    other than the one answering (``deploying`` until the new replicas are up). Both ways."""
    model_id, xs = served["model"].id, test_inputs[0][:4]
    for backend in ("onnxruntime", "torch"):
        service.kill()  # the API process only
        service.env["DG2PF_SERVE_BACKEND"] = backend
        service.start()
        deadline, seen = time.time() + 240, []
        with Client(service.url, token=TOKEN) as client:
            while True:
                before = client.model(model_id)
                out = client.predict(model_id, inputs=xs)
                after = client.model(model_id)
                seen.append((before.status, before.backend, out["backend"]))
                if before.status == after.status == "ready" and before.backend == after.backend:
                    assert out["backend"] == before.backend, seen  # what GET /models says is what answered
                    if before.backend == backend:
                        break
                assert time.time() < deadline, f"not redeployed with {backend} in 240 s: {seen[-5:]}"
                time.sleep(0.5)
            models = client.models()
            listed = {m.id: m for m in models.items}[model_id]
            assert (listed.status, listed.backend) == ("ready", backend)
    assert httpx.get(f"{models.serve_url}/healthz", timeout=30).json() == {"status": "ok", "backend": "torch"}


def test_models_are_restored_after_the_service_and_cluster_restart_here_on_onnxruntime(
    served, channel_served, service, test_inputs
):
    """Restarted with DG2PF_SERVE_BACKEND=onnxruntime, the same models come back at the same URLs, now
    answered by ONNX Runtime from each job's model.onnx: the same top-1, logits within the tolerance of
    the job's export check."""
    xs = test_inputs[0]
    model_ids = [served["model"].id, channel_served.id]
    with Client(service.url, token=TOKEN) as client:
        by_torch = {model_id: client.predict(model_id, inputs=xs, logits=True) for model_id in model_ids}
    service.stop()  # API killed and the embedded Ray head (with Serve) stopped
    assert not _replica_pids(service)
    service.env["DG2PF_SERVE_BACKEND"] = "onnxruntime"
    service.start()
    with Client(service.url, token=TOKEN) as client:
        for model_id in model_ids:
            model = client.wait_model(model_id, timeout=240)
            assert model.status == "ready" and model.backend == "onnxruntime"
            out = client.predict(model_id, inputs=xs, logits=True)
            assert out["backend"] == "onnxruntime" and len(out["predictions"]) == len(xs)
            expected, got = torch.tensor(by_torch[model_id]["logits"]), torch.tensor(out["logits"])
            assert float((got - expected).abs().max()) <= ATOL * max(1.0, float(expected.abs().max()))
            assert [r[0]["index"] for r in out["predictions"]] == [
                r[0]["index"] for r in by_torch[model_id]["predictions"]
            ]
        serve_url = client.models().serve_url
    assert httpx.get(f"{serve_url}/healthz", timeout=30).json() == {"status": "ok", "backend": "onnxruntime"}


def test_an_int8_job_is_served_from_its_int8_model_on_onnxruntime(served, service, test_inputs):
    """precision int8 with serve: true (the service on DG2PF_SERVE_BACKEND=onnxruntime, as the test above
    left it): answers name the precision, and their logits are the job's own model.int8.onnx's."""
    from dg2pf_core.io.onnx_backend import load_onnx_model

    if service.env.get("DG2PF_SERVE_BACKEND") != "onnxruntime":  # run alone: switch as the test above does
        service.stop()
        service.env["DG2PF_SERVE_BACKEND"] = "onnxruntime"
        service.start()
    xs = test_inputs[0]
    schedule = {"granularity": "channel", "target_macs_ratio": 0.5, "pruning_epochs": 1, "max_epochs": 2}
    spec = _spec(served["checkpoint"], serve=True, schedule={**schedule, "patience": 1, "precision": "int8"})
    del spec["sparsity"]
    with Client(service.url, token=TOKEN) as client:
        job = client.wait(client.submit(spec).id, timeout=300)
        assert job.state == "succeeded", job.error
        assert client.wait_model(job.id, timeout=240).status == "ready"
        out = client.predict(job.id, inputs=xs, logits=True)
    assert (out["backend"], out["precision"]) == ("onnxruntime", "int8")
    local = load_onnx_model(_output_dir(service, job.id), threads=1)  # the job's own int8 file, run here
    assert local.precision == "int8"
    assert torch.allclose(torch.tensor(out["logits"]), local.logits(xs), atol=1e-5, rtol=0)


def test_a_timm_checkpoint_is_pruned_and_served_through_the_service(service, client, tmp_path):
    """A timm model by name (a random-initialised timm test network, in timm's own state_dict layout):
    uploaded, pruned, deployed, and its answers are the job's own pruned model's logits."""
    import safetensors.torch

    from dg2pf_core.models import build_model

    torch.manual_seed(0)
    model = build_model("timm/test_resnet", 10)
    path = tmp_path / "timm-test-resnet.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    ckpt = client.upload_checkpoint(path).id
    spec = _spec(ckpt, serve=True, schedule={"pruning_epochs": 1, "max_epochs": 1, "patience": 1})
    spec["model"]["arch"] = "timm/test_resnet"
    spec["dataset"]["image_size"] = 32
    spec["sparsity"] = 0.5
    job = client.wait(client.submit(spec).id, timeout=300)
    assert job.state == "succeeded", job.error
    assert client.wait_model(job.id, timeout=240).status == "ready"
    xs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = client.predict(job.id, inputs=xs.tolist(), logits=True)
    local = InferenceModel.load(_output_dir(service, job.id))  # the job's own pruned model, run here
    assert local.arch == "timm/test_resnet"
    with torch.no_grad():
        expected = local.model(xs)
    assert torch.allclose(torch.tensor(out["logits"]), expected, atol=ATOL, rtol=0)


def test_a_hugging_face_model_directory_is_uploaded_pruned_and_served(service, client, tmp_path):
    """A transformers ViT directory (config.json, model.safetensors, preprocessor_config.json as
    save_pretrained writes them, beside files dg2pf does not take): uploaded (the client zips it), pruned,
    deployed; its answers are the job's own model's logits, and the job's output, downloaded, is a
    directory transformers loads."""
    import transformers
    from hf_dirs import hf_dir

    d = hf_dir(tmp_path, "vit")
    (d / "training_args.bin").write_bytes(b"a pickle the service must never open")
    ckpt = client.upload_checkpoint(d)
    assert client.upload_checkpoint(d).id == ckpt.id  # the same files: the same id
    spec = _spec(ckpt.id, serve=True, schedule={"pruning_epochs": 1, "max_epochs": 1, "patience": 1})
    spec["model"]["arch"] = "hf"
    spec["sparsity"] = 0.5
    job = client.wait(client.submit(spec).id, timeout=300)
    assert job.state == "succeeded", job.error
    order = json.loads((service.data_dir / "jobs" / job.id / "job.json").read_text())
    pinned = Path(order["checkpoint"])  # the store's copy of the three files, not the user's folder
    assert pinned.parent == service.data_dir / "checkpoints" and pinned.is_dir()
    assert sorted(p.name for p in pinned.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert client.wait_model(job.id, timeout=240).status == "ready"
    xs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = client.predict(job.id, inputs=xs.tolist(), logits=True)
    output = _output_dir(service, job.id)
    local = InferenceModel.load(output)
    back = transformers.AutoModelForImageClassification.from_pretrained(str(output), local_files_only=True).eval()
    with torch.no_grad():
        expected = local.model(xs)
        torch.testing.assert_close(back(pixel_values=xs).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.tensor(out["logits"]), expected, atol=ATOL, rtol=0)
    downloaded = client.download(job.id, tmp_path / "download")
    assert {p.name for p in downloaded} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path / "download"), local_files_only=True)
    client.undeploy(job.id)
