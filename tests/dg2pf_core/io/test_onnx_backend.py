"""A job's model.onnx served on ONNX Runtime answers like the PyTorch model, through the same
InferenceModel (inputs, images, top-k, labels, errors), and a job without one says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dg2pf_contract.artifacts import Artifacts
from dg2pf_core.data import DataRequest, load_dataset
from dg2pf_core.data.digits import write_test_digit_images
from dg2pf_core.errors import CheckpointError, InputError
from dg2pf_core.io.inference import InferenceModel
from dg2pf_core.io.onnx_backend import OnnxUnavailable, OrtModule, load_onnx_model
from dg2pf_core.io.onnx_export import ATOL, export_onnx
from dg2pf_core.job import load_model


@pytest.fixture(scope="module")
def job_dir(digits_example: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished job's output with its model.onnx, made as a job makes it (``write_results``: the
    weights as read back, exported by ``export_onnx`` and kept only if ONNX Runtime matches PyTorch).
    A channel-pruned job's model.onnx is served over HTTP in tests/e2e/service/test_serving.py."""
    out = tmp_path_factory.mktemp("onnx-backend") / "out"
    shutil.copytree(digits_example, out)
    _, model = load_model("digits_cnn", 10, out / "model.safetensors")
    report = export_onnx(model, (1, 16, 16), out / Artifacts.ONNX, what="digits_cnn")
    assert report.written, report.reason
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({**metrics, "onnx": report.to_dict()}))
    return out


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    splits = load_dataset("digits", DataRequest(image_size=16, in_channels=1))
    return torch.stack([splits.test[i][0] for i in range(16)])


def _within_export_tolerance(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return float((got - expected).abs().max()) <= ATOL * max(1.0, float(expected.abs().max()))


def test_onnxruntime_answers_like_pytorch_through_the_same_inference_model(job_dir, digits, tmp_path):
    reference = InferenceModel.load(job_dir)
    served = load_onnx_model(job_dir, threads=1)
    assert (reference.backend, served.backend) == ("torch", "onnxruntime")
    assert isinstance(served.model, OrtModule) and not list(served.model.parameters())  # no PyTorch weights loaded
    assert (served.input_shape, served.num_classes, served.class_names) == (
        reference.input_shape,
        10,
        reference.class_names,
    )
    images = [Path(p).read_bytes() for p, _ in write_test_digit_images(tmp_path, count=3)]
    for batch in (digits, digits[:1], torch.stack([served.image_input(b) for b in images])):  # any batch size
        expected, got = reference.logits(batch), served.logits(batch)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert _within_export_tolerance(got, expected), (got - expected).abs().max()
        assert [[p.index for p in row] for row in served.top_k(got, 3)] == [
            [p.index for p in row] for row in reference.top_k(expected, 3)
        ]
    # Same preprocessing code: an image decodes to the same tensor, a bad input gets the same error.
    assert torch.equal(served.image_input(images[0]), reference.image_input(images[0]))
    messages = []
    for model in (reference, served):
        with pytest.raises(InputError) as caught:
            model.tensor_inputs(torch.zeros(2, 3, 16, 16).tolist())
        messages.append(caught.value.message)
    assert messages[0] == messages[1] and "1 x 16 x 16" in messages[0]


def test_a_job_without_model_onnx_names_the_export_failure(job_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(job_dir, out)
    (out / Artifacts.ONNX).unlink()
    with pytest.raises(OnnxUnavailable, match="no longer in"):
        load_onnx_model(out, threads=1)
    # What a job whose export failed records (OnnxReport.to_dict), and a job from before ONNX export.
    metrics = json.loads((out / "metrics.json").read_text())
    reason = "the ONNX exporter could not convert digits_cnn: RuntimeError: unsupported op"
    (out / "metrics.json").write_text(json.dumps({**metrics, "onnx": {"written": False, "reason": reason}}))
    with pytest.raises(OnnxUnavailable) as caught:
        load_onnx_model(out, threads=1)
    assert str(out) in caught.value.message and reason in caught.value.message
    del metrics["onnx"]
    (out / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(OnnxUnavailable, match="before dg2pf exported ONNX"):
        load_onnx_model(out, threads=1)
    # A file ONNX Runtime cannot read, and a directory that is no job's output.
    (out / Artifacts.ONNX).write_bytes((job_dir / Artifacts.ONNX).read_bytes()[:100])
    with pytest.raises(OnnxUnavailable, match="ONNX Runtime cannot load"):
        load_onnx_model(out, threads=1)
    with pytest.raises(CheckpointError, match="no readable metrics.json"):
        load_onnx_model(tmp_path / "nowhere", threads=1)
