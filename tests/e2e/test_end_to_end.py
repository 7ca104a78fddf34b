"""DG2PF on real data (scikit-learn's handwritten digits), through the CLI: the algorithm must matter."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runs import assert_drawn_png, dg2pf
from torch.utils.data import DataLoader

from dg2pf_core.algorithm.masks import apply_masks_, magnitude_masks, select_prunable
from dg2pf_core.io.checkpoints import read_state_dict
from dg2pf_core.io.metrics import evaluate
from dg2pf_core.job import load_data, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned(digits_example, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "digits90"
    result = dg2pf(
        "prune",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(digits_example / "model.safetensors"),
        "--dataset",
        "digits",
        "--sparsity",
        "0.9",
        "--warn-layer-sparsity",
        "0.9",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    m = json.loads((out / "metrics.json").read_text())
    # Global ranking prunes the wide layers beyond the 90% average: the low threshold makes it warn.
    assert m["max_layer_sparsity"] == max(m["layer_sparsity"].values()) > 0.9
    # the default guard only keeps tensors and classes from emptying (no layer cap): none is at 100%
    assert m["layer_cap"] == 1.0 and m["max_layer_sparsity"] < 1.0 and m["preset"] == "default"
    assert m["preset_departures"] == {} and isinstance(m["bn_settled_channels"], int)
    assert len(m["warnings"]) == 1 and "beyond 90%" in m["warnings"][0]
    assert "warning: " in result.stderr and "most pruned layer" in result.stdout
    return out, m


def test_pretrained_example_reaches_95_percent(digits_example):
    metrics = json.loads((digits_example / "metrics.json").read_text())
    assert metrics["test_top1"] >= 95.0


def test_dg2pf_90_percent_keeps_accuracy(pruned):
    out, m = pruned
    assert abs(m["sparsity_prunable"] - 0.9) <= 0.001
    assert m["test_top1"] >= m["baseline_test_top1"] - 2.0
    required = {
        "target_sparsity",
        "sparsity_prunable",
        "sparsity_total",
        "params_total",
        "params_nonzero",
        "flops_dense",
        "flops_sparse",
        "baseline_test_top1",
        "test_top1",
        "val_top1",
        "epochs",
        "world_size",
        "history",
    }
    assert required <= m.keys() and m["world_size"] == 1
    assert m["flops_sparse"] < 0.2 * m["flops_dense"]
    for rec in m["history"]:
        assert {"phase", "epoch", "sparsity", "train_loss", "val_top1", "lr", "seconds"} <= rec.keys()
    assert [r["phase"] for r in m["history"]][:2] == ["baseline", "gradual_pruning"]


def test_output_has_the_input_keys_and_shapes_with_pruned_zeros(pruned, digits_example):
    out, m = pruned
    before, after = read_state_dict(digits_example / "model.safetensors"), read_state_dict(out / "model.safetensors")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    zeros = sum(int((after[k] == 0).sum()) for k in after if k.endswith("weight") and after[k].dim() > 1)
    assert zeros >= round(0.9 * m["params_prunable"])


def test_one_shot_magnitude_pruning_is_far_worse(pruned, digits_example):
    _, m = pruned
    spec, model = load_model("digits_cnn", 10, digits_example / "model.safetensors")
    params = select_prunable(model).params
    apply_masks_(params, magnitude_masks(params, 0.9))
    splits, _ = load_data("digits", spec, 10, None, 0.1, 0)
    one_shot = evaluate(model, DataLoader(splits.test, batch_size=256), torch.device("cpu")).top1
    assert one_shot <= m["test_top1"] - 10.0, (one_shot, m["test_top1"])


def test_evaluate_command_agrees_with_the_job(pruned):
    out, m = pruned
    result = dg2pf(
        "evaluate",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(out / "model.safetensors"),
        "--dataset",
        "digits",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["top1"] == pytest.approx(m["test_top1"])
    assert r["sparsity_prunable"] == pytest.approx(0.9, abs=1e-4)  # round(0.9 * N) / N


def test_the_job_draws_its_training_curves_and_per_layer_sparsity(pruned):
    out, m = pruned
    for name in ("training.png", "layers.png"):
        assert_drawn_png(out / name)


def test_the_job_writes_model_onnx_as_accurate_as_the_job_and_measures_latency(pruned):
    import onnxruntime as ort

    out, m = pruned
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "model.compact.safetensors",
        "model.onnx",
        "metrics.json",
        "training.png",
        "layers.png",
    }
    assert m["onnx"]["written"] is True and m["onnx"]["max_abs_diff"] <= m["onnx"]["tolerance"]
    spec, _ = load_model("digits_cnn", 10, out / "model.safetensors")
    test = load_data("digits", spec, 10, None, 0.1, 0)[0].test
    images, labels = torch.stack([x for x, _ in test]), torch.tensor([int(y) for _, y in test])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    assert top1 == pytest.approx(m["test_top1"], abs=100.0 / len(labels) + 1e-9)  # one image at most, on a near tie
    latency = m["latency"]
    assert (
        latency["threads"] >= 1
        and latency["runs"] == 30
        and latency["macs_ratio"] == pytest.approx(m["flops_sparse"] / m["flops_dense"])
    )
    for backend in ("torch", "onnxruntime"):
        for batch in ("1", "32"):
            row = latency["backends"][backend][batch]
            assert row["dense_ms"] > 0 and row["pruned_ms"] > 0 and row["speedup"] > 0 and 1 <= row["runs"] <= 30


@pytest.mark.parametrize("finetune", ["sgd", "overparam"])
def test_95_percent_in_both_fine_tuning_modes(digits_example, tmp_path, finetune):
    out = tmp_path / finetune
    result = dg2pf(
        "prune",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(digits_example / "model.safetensors"),
        "--dataset",
        "digits",
        "--sparsity",
        "0.95",
        "--pruning-epochs",
        "4",
        "--max-epochs",
        "14",
        "--patience",
        "1",
        "--finetune",
        finetune,
        "--overparam-expansion",
        "2",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["finetune"] == finetune
    assert abs(m["sparsity_prunable"] - 0.95) <= 0.001
    assert "finetuning" in [r["phase"] for r in m["history"]]
    before, after = read_state_dict(digits_example / "model.safetensors"), read_state_dict(out / "model.safetensors")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert m["test_top1"] >= 85.0, m["test_top1"]
