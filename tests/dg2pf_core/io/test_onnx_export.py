"""model.onnx: exported models compute PyTorch's logits on ONNX Runtime, and a model that cannot be
exported costs the job its ONNX file, never its result."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx_runs import onnx_logits
from torch import nn

from dg2pf_core import DG2PFConfig, PruneJob
from dg2pf_core.algorithm.masks import apply_masks_, magnitude_masks, select_prunable
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.io.onnx_export import ATOL, OPSET, export_onnx
from dg2pf_core.models import build_model
from dg2pf_core.models.registry import _REGISTRY, ArchSpec


def assert_same_logits(model: nn.Module, path, input_shape, batch: int = 5) -> None:
    """On a batch of a size neither the export (2) nor its own check (3) used: the batch axis is dynamic."""
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        expected = model.eval()(x)
    got = onnx_logits(path, x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL * max(1.0, float(expected.abs().max()))


def trained_looking(model: nn.Module) -> nn.Module:
    """Non-default BatchNorm statistics, as a trained model has (the defaults 0/1 would hide a wrong fold)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def test_digits_cnn_exports_with_a_dynamic_batch_and_pinned_opset(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(build_model("digits_cnn", 10))
    report = export_onnx(model, (1, 16, 16), tmp_path / "model.onnx")
    assert report.written and report.reason is None
    assert report.max_abs_diff is not None and report.max_abs_diff <= report.tolerance
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    assert_same_logits(model, tmp_path / "model.onnx", (1, 16, 16))
    assert_same_logits(model, tmp_path / "model.onnx", (1, 16, 16), batch=1)
    assert report.to_dict() == {
        "written": True,
        "file": "model.onnx",
        "opset": OPSET,
        "max_abs_diff": report.max_abs_diff,
        "tolerance": report.tolerance,
        "check_batch": 3,
        "seconds": round(report.seconds, 2),
    }


@pytest.mark.slow
def test_a_pruned_torchvision_model_at_a_small_input_keeps_its_logits(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(build_model("torchvision/resnet18", 10))
    params = select_prunable(model).params
    apply_masks_(params, magnitude_masks(params, 0.9))
    zeros = sum(int((p == 0).sum()) for p in params.values())
    report = export_onnx(model, (3, 32, 32), tmp_path / "model.onnx")
    assert report.written, report.reason
    assert_same_logits(model, tmp_path / "model.onnx", (3, 32, 32))
    # the export did not touch the model: still pruned, still the same tensors
    assert sum(int((p == 0).sum()) for p in select_prunable(model).params.values()) == zeros


@pytest.mark.slow
def test_an_fp16_model_is_exported_in_float32(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(build_model("digits_cnn", 10)).half()
    report = export_onnx(model, (1, 16, 16), tmp_path / "model.onnx")
    assert report.written, report.reason
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert next(model.parameters()).dtype == torch.float16  # the caller's model is left as it was
    assert_same_logits(model.float(), tmp_path / "model.onnx", (1, 16, 16))


class DataDependentBranch(nn.Module):
    """A Python `if` on a tensor's value: torch.export cannot trace it (a genuine exporter refusal)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3))
        if h.sum() > 0:
            h = h * 1.0
        return self.fc(h)


class RandomOutput(nn.Module):
    """Exports fine, but ONNX Runtime's random numbers are not PyTorch's: the check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)[:, :4]
        return self.fc(h + torch.rand_like(h))


def test_a_model_the_exporter_refuses_is_reported_not_raised(tmp_path):
    report = export_onnx(DataDependentBranch(), (1, 16, 16), tmp_path / "model.onnx", what="the unexportable net")
    assert not report.written
    assert "could not convert the unexportable net" in report.reason and "data-dependent" in report.reason
    assert "\n" not in report.reason and len(report.reason) < 500  # one line a user can read
    assert "forward" in report.reason  # where in the model's code
    assert list(tmp_path.iterdir()) == []  # no file, no partial left behind
    assert report.to_dict() == {"written": False, "reason": report.reason}


def test_an_export_that_computes_something_else_is_not_kept(tmp_path):
    report = export_onnx(RandomOutput(), (1, 8, 8), tmp_path / "model.onnx")
    assert not report.written and "differ from PyTorch's" in report.reason
    assert report.max_abs_diff > report.tolerance
    assert list(tmp_path.iterdir()) == []


def _job(tmp_path, arch: str, model: nn.Module) -> PruneJob:
    ckpt = tmp_path / "ckpt.safetensors"
    save_state_dict(model.state_dict(), ckpt)
    config = DG2PFConfig(sparsity=0.5, pruning_epochs=1, max_epochs=2, patience=1, batch_size=64)
    return PruneJob(arch, 10, str(ckpt), "digits", config)


@pytest.mark.slow
def test_a_job_writes_model_onnx_that_computes_what_is_served(tmp_path):
    from dg2pf_core.io.inference import InferenceModel
    from dg2pf_core.job import prune_to_dir

    torch.manual_seed(0)
    out = tmp_path / "out"
    metrics = prune_to_dir(_job(tmp_path, "digits_cnn", build_model("digits_cnn", 10)), out)
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "model.compact.safetensors",
        "model.onnx",
        "metrics.json",
        "training.png",
        "layers.png",
    }
    written = json.loads((out / "metrics.json").read_text())
    assert written["onnx"]["written"] is True and written["onnx"]["opset"] == OPSET
    assert written["onnx"] == metrics.to_document()["onnx"] and written["latency"]["backends"].keys() == {
        "torch",
        "onnxruntime",
    }
    served = InferenceModel.load(out)
    x = torch.randn(4, *served.input_shape, generator=torch.Generator().manual_seed(1))
    expected = served.logits(x)
    assert np.abs(onnx_logits(out / "model.onnx", x).numpy() - expected.numpy()).max() <= ATOL * max(
        1.0, float(expected.abs().max())
    )


def test_a_job_whose_model_cannot_be_exported_still_succeeds(tmp_path, monkeypatch):
    from dg2pf_core.job import prune_to_dir

    monkeypatch.setitem(
        _REGISTRY, "test/unexportable", ArchSpec("test/unexportable", DataDependentBranch, 16, 1, "test only")
    )
    torch.manual_seed(0)
    out = tmp_path / "out"
    metrics = prune_to_dir(_job(tmp_path, "test/unexportable", DataDependentBranch()), out)
    assert not (out / "model.onnx").exists() and (out / "model.safetensors").is_file()
    onnx_section = json.loads((out / "metrics.json").read_text())["onnx"]
    assert onnx_section["written"] is False and "could not convert test/unexportable" in onnx_section["reason"]
    latency = metrics.latency
    assert set(latency.backends) == {"torch"}  # PyTorch still measured, dense vs pruned
    assert latency.backends["torch"]["1"].speedup > 0
    assert any(n.startswith("onnxruntime: not measured") for n in latency.notes)
