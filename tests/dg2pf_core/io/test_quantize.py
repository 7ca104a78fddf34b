"""precision int8: ONNX Runtime's static quantization of model.onnx, checked against the fp32 model, not trusted."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from dg2pf_core.io.onnx_export import export_onnx
from dg2pf_core.io.quantize import CALIBRATION_IMAGES, METHODS, cpu_has_vnni, onnx_top1, quantize_int8
from tests.support.cli_runs import dg2pf


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(8, 4)).eval()


def test_a_model_that_keeps_its_accuracy_is_written_as_int8_with_every_calibration_recorded(tmp_path):
    model = _small_cnn()
    x = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the fp32 model gets right: any int8 loss shows
    assert export_onnx(model, (3, 8, 8), tmp_path / "m.onnx").written
    report = quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", [x[:64]], _batches(x, y), max_drop=5.0)
    assert report.written and report.reason is None
    assert report.val_top1_fp32 == 100.0 and report.val_top1_int8 >= 95.0
    assert [c["method"] for c in report.candidates] == list(METHODS)
    assert report.method in METHODS and report.calibration_images == 64 <= CALIBRATION_IMAGES
    assert report.reduce_range == (cpu_has_vnni() is False)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format: ONNX Runtime runs integer kernels
    assert onnx_top1(tmp_path / "m.int8.onnx", _batches(x, y)) == report.val_top1_int8


def test_a_model_int8_cannot_represent_keeps_fp32_and_says_why_with_both_figures(tmp_path):
    # Two classes whose weights differ by 1e-4 of their size: the fp32 model always picks class 1; int8
    # rounds both rows to the same integers, the logits tie and class 0 wins.
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.ones(16), torch.ones(16) * (1 + 1e-4)]))
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    y = torch.ones(64, dtype=torch.long)
    assert export_onnx(model, (1, 4, 4), tmp_path / "m.onnx").written
    report = quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", [x], _batches(x, y), max_drop=0.5)
    assert not report.written and not (tmp_path / "m.int8.onnx").exists()
    assert report.val_top1_fp32 == 100.0 and report.val_top1_int8 < 99.5
    assert f"{report.val_top1_int8:.2f}" in report.reason and "100.00" in report.reason
    assert "max_quantization_drop 0.5" in report.reason and "fp32 model is kept" in report.reason


def test_no_calibration_images_writes_nothing_and_says_so(tmp_path):
    model = _small_cnn()
    assert export_onnx(model, (3, 8, 8), tmp_path / "m.onnx").written
    report = quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", [], [], max_drop=0.5)
    assert not report.written and "no training images" in report.reason


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["unstructured", "channel", "2:4"])
def test_a_job_with_precision_int8_writes_the_checked_int8_model_and_times_it(digits_example, tmp_path, granularity):
    target = ["--target-macs-ratio", "0.5"] if granularity == "channel" else ["--sparsity", "0.5"]
    if granularity == "2:4":  # the first convolution has one input channel: no groups of 4
        target += ["--exclude", r"^features\.0\.weight$"]
    out, checkpoint = tmp_path / "out", str(digits_example / "model.safetensors")
    r = dg2pf(
        "prune", "--arch", "digits_cnn", "--num-classes", "10", "--checkpoint", checkpoint,
        "--dataset", "digits", "--granularity", granularity, *target, "--precision", "int8",
        # one of the digits' 144 validation images is 0.69 points: the default 0.5 would tolerate no flip at all
        "--max-quantization-drop", "1.0",
        "--pruning-epochs", "1", "--max-epochs", "2", "--threads", "1", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    q = m["quantization"]
    assert q["written"], q["reason"]  # the reason said, should a run ever keep fp32
    assert (out / "model.int8.onnx").is_file() and q["file"] == "model.int8.onnx"
    assert q["val_top1_fp32"] - q["val_top1_int8"] <= q["max_drop"] == 1.0 and q["test_top1_int8"] > 90
    assert q["bytes_int8"] < q["bytes_fp32"]
    for cell in m["latency"]["backends"]["onnxruntime"].values():  # int8 timed beside dense and fp32 pruned
        assert cell["int8_ms"] > 0 and cell["int8_speedup"] == pytest.approx(cell["dense_ms"] / cell["int8_ms"], 1e-3)
    assert "model.int8.onnx" in r.stdout
    if granularity == "channel":  # served: the onnxruntime backend answers with the int8 model, as evaluated
        from torch.utils.data import DataLoader

        from dg2pf_core.io.metrics import evaluate
        from dg2pf_core.io.onnx_backend import load_onnx_model
        from dg2pf_core.job import load_data
        from dg2pf_core.models import get_arch

        served = load_onnx_model(out, threads=1)
        assert (served.backend, served.precision) == ("onnxruntime", "int8")
        splits, _ = load_data("digits", get_arch("digits_cnn"), 10, None, 0.1, 0)
        top1 = evaluate(served.model, DataLoader(splits.test, batch_size=64), torch.device("cpu")).top1
        assert top1 == pytest.approx(q["test_top1_int8"])
        # another file put in its place (not the size the job wrote): the fp32 model.onnx is served instead
        with (out / "model.int8.onnx").open("ab") as fh:
            fh.write(b"\0")
        assert load_onnx_model(out, threads=1).precision == "fp32"


def test_an_unknown_precision_or_a_drop_without_int8_is_refused_before_anything_runs(digits_example, tmp_path):
    checkpoint = str(digits_example / "model.safetensors")
    r = dg2pf(
        "prune", "--arch", "digits_cnn", "--num-classes", "10", "--checkpoint", checkpoint,
        "--dataset", "digits", "--sparsity", "0.5", "--precision", "int4", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert r.returncode == 2 and "precision" in r.stderr and "int8" in r.stderr
    assert not (tmp_path / "out").exists()
    r = dg2pf(
        "prune", "--arch", "digits_cnn", "--num-classes", "10", "--checkpoint", checkpoint,
        "--dataset", "digits", "--sparsity", "0.5", "--max-quantization-drop", "3", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert r.returncode == 2 and "max_quantization_drop" in r.stderr and "applies to precision int8" in r.stderr


@pytest.mark.slow
def test_dg2pf_quantize_makes_int8_of_an_existing_checkpoint_and_says_when_it_is_not_kept(
    digits_example, tmp_path, monkeypatch
):
    from dg2pf_contract.results import Quantization
    from dg2pf_core.io import quantize

    args = ["quantize", "--arch", "digits_cnn", "--num-classes", "10", "--dataset", "digits", "--threads", "1"]
    args += ["--checkpoint", str(digits_example / "model.safetensors")]
    r = dg2pf(*args, "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    q = Quantization.model_validate_json((tmp_path / "q" / "quantization.json").read_text())
    assert q.written and (tmp_path / "q" / "model.int8.onnx").is_file() and (tmp_path / "q" / "model.onnx").is_file()
    assert q.val_top1_fp32 - q.val_top1_int8 <= 0.5 and q.test_top1_int8 > 90
    # refused before anything is loaded: a folder in use, a tolerance out of range
    assert dg2pf(*args, "--out", str(tmp_path / "q")).returncode == 2
    r = dg2pf(*args, "--out", str(tmp_path / "q2"), "--max-quantization-drop", "-1")
    assert r.returncode == 2 and "max-quantization-drop" in r.stderr and not (tmp_path / "q2").exists()
    # an int8 model that lost too much: exit 1, the reason said, fp32 and the report written, no int8 file
    real = quantize.quantize_int8

    def lossy(*a, **k):
        report = real(*a, **k)
        Path(a[1]).unlink(missing_ok=True)
        report.written, report.reason = False, "int8 validation top-1 90.00 is 9.31 points under fp32's 99.31"
        return report

    monkeypatch.setattr(quantize, "quantize_int8", lossy)
    r = dg2pf(*args, "--out", str(tmp_path / "q3"))
    assert r.returncode == 1 and "not kept: int8 validation top-1 90.00" in r.stderr
    assert sorted(p.name for p in (tmp_path / "q3").iterdir()) == ["model.onnx", "quantization.json"]
