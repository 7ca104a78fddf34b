"""Serving settings -> the Serve deployment's options (no cluster needed)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace as dataclasses_replace

import pytest
import torch
from pydantic import ValidationError

from dg2pf_core.io.inference import InferenceModel
from dg2pf_service.serving.app import deployment_for
from dg2pf_service.serving.backends import backend_for, load_served_model
from dg2pf_service.serving.options import ServeOptions
from dg2pf_service.serving.registry import ModelRegistry, RegisteredModel
from dg2pf_service.settings import Settings


def test_settings_become_replica_options_with_token_digests_only(tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        api_tokens=["t1", "t2"],
        serve_replicas=2,
        serve_max_replicas=6,
        serve_gpus_per_replica=0.5,
        serve_cpus_per_replica=2,
        serve_max_models_per_replica=3,
    )
    options = ServeOptions.from_settings(settings)
    assert options.backend == "torch"
    assert ServeOptions.from_settings(Settings(data_dir=tmp_path, serve_backend="onnxruntime")).backend == "onnxruntime"
    assert options.token_digests == tuple(hashlib.sha256(t.encode()).hexdigest() for t in ("t1", "t2"))
    assert "t1" not in repr(options.to_dict())
    assert ServeOptions.from_dict(options.to_dict()) == options
    assert options.autoscaling and options.reserved_cpus == 12 and options.reserved_gpus == 3
    assert options.serving_dir == str(tmp_path / "serving" / "models")


def test_deployment_scales_fixed_or_autoscaled_with_its_resources():
    fixed = deployment_for(ServeOptions(serving_dir="/s", replicas=3, cpus_per_replica=0.5))
    assert fixed.num_replicas == 3 and fixed.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0}
    auto = deployment_for(
        ServeOptions(serving_dir="/s", replicas=1, max_replicas=4, gpus_per_replica=1, max_ongoing_requests=64)
    )
    scaling = auto._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert auto.ray_actor_options["num_gpus"] == 1 and auto.max_ongoing_requests == 64


def test_inconsistent_serving_settings_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="serve_max_replicas"):
        Settings(data_dir=tmp_path, serve_replicas=3, serve_max_replicas=2)
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, serve_max_batch_size=0)


def test_registry_files_follow_the_wanted_set_and_refuse_bad_ids(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    a, b = "a" * 32, "b" * 32
    registry.sync({a: "/out/a", b: "/out/b"})
    assert registry.ids() == {a, b} and registry.get(a) == RegisteredModel(a, "/out/a")
    registry.sync({b: "/out/b2"})
    assert registry.ids() == {b} and registry.get(b).output_dir == "/out/b2" and registry.get(a) is None
    assert registry.get("../../etc/passwd") is None
    with pytest.raises(ValueError):
        registry.put(RegisteredModel("../x", "/out"))
    assert not list((tmp_path / "models").glob(".tmp-*"))  # atomic writes leave nothing behind


@pytest.mark.slow
def test_onnxruntime_service_serves_a_job_without_model_onnx_with_pytorch_and_says_why(
    digits_example, tmp_path, caplog
):
    """A job whose ONNX export failed stays servable on an onnxruntime service: by PyTorch, with the
    job's recorded reason logged, and ``backend`` saying which engine answered."""
    import json

    out = tmp_path / "out"
    shutil.copytree(digits_example, out)  # a real job output with no model.onnx
    metrics = json.loads((out / "metrics.json").read_text())
    reason = "the ONNX exporter could not convert digits_cnn: RuntimeError: unsupported op"
    (out / "metrics.json").write_text(json.dumps({**metrics, "onnx": {"written": False, "reason": reason}}))
    model_id = "c" * 32
    assert backend_for("torch", out) == ("torch", None)
    assert backend_for("onnxruntime", out) == ("torch", f"the job's ONNX export failed: {reason}")
    with caplog.at_level(logging.WARNING, logger="dg2pf.serving"):
        served = load_served_model(model_id, out, "onnxruntime", "cpu", threads=1)
    assert served.backend == "torch"
    assert any(
        model_id in r.getMessage() and reason in r.getMessage() and "DG2PF_SERVE_BACKEND=onnxruntime" in r.getMessage()
        for r in caplog.records
    )
    x = torch.randn(3, *served.input_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(served.logits(x), InferenceModel.load(out).logits(x))


class _FakeServe:
    """Serve's REST API as the supervisor sees it: one dg2pf application deployed with ``args``."""

    def __init__(self, args: dict | None, status: str = "RUNNING") -> None:
        self.args, self.status, self.puts = args, status, []

    def __call__(self, method: str, body: dict | None = None) -> dict:
        if method == "PUT":
            self.puts.append(body)
            self.args, self.status = body["applications"][0]["args"], "DEPLOYING"
            return {}
        if method == "GET":
            if self.args is None:
                return {"applications": {}}
            return {
                "applications": {
                    "dg2pf": {
                        "status": self.status,
                        "message": "",
                        "deployed_app_config": {"name": "dg2pf", "args": self.args},
                    }
                }
            }
        return {}


def test_an_application_running_other_options_is_redeployed_and_reported_as_it_runs(tmp_path):
    """An API restarted with another DG2PF_SERVE_BACKEND (Serve kept running): until Serve has the new
    replicas up, GET /models reports the backend that answers, as deploying; then the configured one."""
    from dg2pf_service.serving.supervisor import ServingSupervisor

    before = ServeOptions(serving_dir=str(tmp_path / "models"), backend="torch")
    now = dataclasses_replace(before, backend="onnxruntime")
    serve = _FakeServe(json.loads(json.dumps(before.to_dict())))  # as Serve hands the args back: JSON
    supervisor = ServingSupervisor(
        now, wanted=lambda: {"a" * 32: str(tmp_path / "out")}, dashboard_url=lambda: "http://ray"
    )
    supervisor._request = serve

    status = supervisor.model_status()
    assert (status.status, status.backend) == ("deploying", "torch")
    assert "DG2PF_SERVE_BACKEND=torch" in status.message and "onnxruntime" in status.message
    supervisor.reconcile()
    assert len(serve.puts) == 1 and serve.puts[0]["applications"][0]["args"]["backend"] == "onnxruntime"
    serve.status = "RUNNING"
    status = supervisor.model_status()
    assert (status.status, status.backend, status.message) == ("ready", "onnxruntime", None)
    supervisor.reconcile()  # the same options: nothing to do
    assert len(serve.puts) == 1

    same = ServingSupervisor(before, wanted=lambda: {"a" * 32: "/out"}, dashboard_url=lambda: "http://ray")
    same._request = _FakeServe(json.loads(json.dumps(before.to_dict())))
    same.reconcile()
    assert same._request.puts == [] and same.model_status().backend == "torch"
