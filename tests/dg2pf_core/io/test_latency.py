"""Measured latency: what a report holds (never how fast anything is: no timed assertions), the
thread settings it states, the bounded cost, and `dg2pf latency`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from tiny import TinyNet
from torch import nn

from dg2pf_contract.results import Latency
from dg2pf_core.algorithm.masks import apply_masks_, magnitude_masks, select_prunable
from dg2pf_core.io.compact import save_compact
from dg2pf_core.io.latency import MIN_RUNS, compare, measure_latency
from dg2pf_core.io.onnx_export import export_onnx

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def dense_and_pruned(tmp_path_factory):
    torch.manual_seed(0)
    dense = TinyNet().eval()
    pruned = TinyNet().eval()
    pruned.load_state_dict(dense.state_dict())
    params = select_prunable(pruned).params
    apply_masks_(params, magnitude_masks(params, 0.9))
    folder = tmp_path_factory.mktemp("onnx")
    files = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        assert export_onnx(model, SHAPE, folder / f"{name}.onnx").written
        files[name] = folder / f"{name}.onnx"
    return {"dense": dense, "pruned": pruned}, files


@pytest.mark.slow
def test_every_backend_and_batch_size_has_medians_runs_and_threads(dense_and_pruned):
    models, files = dense_and_pruned
    before = torch.get_num_threads()
    models["dense"].train()
    report = measure_latency(models, SHAPE, onnx=files, batch_sizes=(1, 4), runs=7, warmup=2, threads=1)
    assert torch.get_num_threads() == before  # set for the measurement, then put back
    assert models["dense"].training and not models["pruned"].training  # timed in eval mode, modes put back
    models["dense"].eval()
    assert report.threads == 1 and report.runs == 7 and report.notes == []
    assert set(report.timings) == {"torch", "onnxruntime"}
    for by_batch in report.timings.values():
        assert set(by_batch) == {1, 4}
        for cells in by_batch.values():
            assert set(cells) == {"dense", "pruned"}
            for t in cells.values():
                assert t.runs == 7 and 0 < t.median_ms <= t.p90_ms
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["threads"] == 1 and doc["device"] == "cpu" and doc["cpu"]
    assert doc["backends"]["onnxruntime"]["4"]["pruned"]["runs"] == 7


def test_a_single_model_and_the_default_thread_count(dense_and_pruned):
    models, files = dense_and_pruned
    report = measure_latency(models["pruned"], SHAPE, onnx=files["pruned"], batch_sizes=(2,), runs=3, warmup=0)
    assert report.threads == torch.get_num_threads()
    assert set(report.timings["torch"][2]) == set(report.timings["onnxruntime"][2]) == {"model"}
    assert report.timings["torch"][2]["model"].runs == 3  # warm-up 0 still runs its 2 untimed rounds, none timed


def test_compare_gives_dense_pruned_and_their_ratio(dense_and_pruned):
    models, files = dense_and_pruned
    report = measure_latency(models, SHAPE, onnx=files, batch_sizes=(1,), runs=5, warmup=2)
    rows = compare(report)
    for backend in ("torch", "onnxruntime"):
        row = rows[backend]["1"]
        assert row.keys() == {"dense_ms", "pruned_ms", "dense_p90_ms", "pruned_p90_ms", "runs", "speedup"}
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["pruned_ms"], rel=1e-3)
    compact = Latency(backends=rows, macs_ratio=0.1, threads=1).speedups()
    assert compact == {"speedup": {b: {"1": rows[b]["1"]["speedup"]} for b in rows}, "macs_ratio": 0.1, "threads": 1}


class Sleepy(nn.Module):
    """20 ms per forward pass whatever the machine: a model whose cost the budget must bound."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x.flatten(1)


def test_the_budget_cuts_runs_and_says_so():
    report = measure_latency(Sleepy(), SHAPE, batch_sizes=(1, 2), runs=30, warmup=5, budget_s=0.6)
    cells = [c["model"] for c in report.timings["torch"].values()]
    assert len(cells) == 2
    for t in cells:
        assert 1 <= t.runs < 30  # never the 30 asked for: 30 rounds of 20 ms are over each cell's 0.3 s
    assert len([n for n in report.notes if "of 30 runs" in n]) == 2  # each cut is stated, with its count
    assert report.to_dict()["budget_s"] == 0.6


def test_runs_never_go_below_the_minimum_while_budget_is_left():
    report = measure_latency(Sleepy(), SHAPE, batch_sizes=(1,), runs=30, warmup=2, budget_s=0.1)
    assert report.timings["torch"][1]["model"].runs in (1, MIN_RUNS)


# --- dg2pf latency ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_example(digits_example, tmp_path_factory) -> Path:
    """The digits example with 90% of its weights zeroed by magnitude, as a compact artifact."""
    from dg2pf_core.job import load_model

    _, model = load_model("digits_cnn", 10, digits_example / "model.safetensors")
    params = select_prunable(model).params
    apply_masks_(params, magnitude_masks(params, 0.9))
    path = tmp_path_factory.mktemp("pruned") / "model.compact.safetensors"
    save_compact(model.state_dict(), path)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from dg2pf_cli.main import main

    code = main(["latency", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_cli_prints_a_table_against_the_dense_model(capsys, digits_example, pruned_example):
    code, out, err = run_cli(
        capsys,
        "--arch",
        "digits_cnn",
        "--checkpoint",
        str(pruned_example),
        "--dense-checkpoint",
        str(digits_example / "model.safetensors"),
        "--batch-sizes",
        "1,8",
        "--runs",
        "5",
        "--threads",
        "1",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert "digits_cnn (10 classes), inputs 1 x 16 x 16, 1 thread(s)" in lines[0]  # classes read from the checkpoint
    assert "MACs nonzero / dense 0.1" in lines[0]
    assert lines[1].split() == [
        "backend",
        "batch",
        "median",
        "ms",
        "p90",
        "ms",
        "runs",
        "dense",
        "median",
        "ms",
        "vs",
        "dense",
    ]
    rows = [line.split() for line in lines[2:6]]
    assert [(r[0], r[1]) for r in rows] == [("torch", "1"), ("torch", "8"), ("onnxruntime", "1"), ("onnxruntime", "8")]
    assert all(r[4] == "5" and r[-1].endswith("x") for r in rows)


def test_cli_json_parses(capsys, digits_example):
    code, out, err = run_cli(
        capsys,
        "--arch",
        "digits_cnn",
        "--checkpoint",
        str(digits_example / "model.safetensors"),
        "--num-classes",
        "10",
        "--batch-sizes",
        "2",
        "--runs",
        "3",
        "--backends",
        "torch",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["num_classes"] == 10 and doc["input_shape"] == [1, 16, 16] and doc["threads"] >= 1
    assert doc["backends"]["torch"]["2"]["model"]["runs"] == 3 and "onnxruntime" not in doc["backends"]
    assert doc["macs_ratio"] == pytest.approx(1.0)  # the dense example: every weight nonzero


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--checkpoint", "/nonexistent/model.safetensors"], "does not exist"),
        (["--batch-sizes", "1,zero"], "--batch-sizes"),
        (["--runs", "0"], "--runs"),
        (["--image-size", "4"], "--image-size"),
        (["--num-classes", "7"], "does not fit digits_cnn with num_classes=7"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, needle):
    ckpt = tmp_path / "model.safetensors"
    from dg2pf_core.io.checkpoint_save import save_state_dict
    from dg2pf_core.models import build_model

    save_state_dict(build_model("digits_cnn", 10).state_dict(), ckpt)
    args = ["--arch", "digits_cnn", "--checkpoint", str(ckpt), *argv]
    if "--checkpoint" in argv:
        args = ["--arch", "digits_cnn", *argv]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("dg2pf: error: ") and needle in err
