"""Bad input exits 2 with one clear line, and nothing is written; what the commands show of a channel-pruned
model; Ctrl-C at any moment ends with one line and status 130."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runs import assert_drawn_png, dg2pf

from dg2pf_core import DG2PFError
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.io.checkpoints import read_state_dict
from dg2pf_core.models import build_model


@pytest.mark.slow
def test_console_entry_point_reports_errors_with_exit_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dg2pf_cli",
            "evaluate",
            "--arch",
            "digits_cnn",
            "--num-classes",
            "10",
            "--checkpoint",
            str(tmp_path / "missing.pt"),
            "--dataset",
            "digits",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("dg2pf: error:") and "missing.pt" in result.stderr


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    torch.manual_seed(0)
    save_state_dict(build_model("digits_cnn", 10).state_dict(), path)
    return path


def prune_args(ckpt: Path, out: Path, **over: str) -> list[str]:
    base = {
        "--arch": "digits_cnn",
        "--num-classes": "10",
        "--checkpoint": str(ckpt),
        "--dataset": "digits",
        "--sparsity": "0.9",
        "--out": str(out),
    }
    base.update(over)
    return ["prune", *[x for kv in base.items() for x in kv], "--pruning-epochs", "1", "--max-epochs", "1", "--quiet"]


def assert_refused(result: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    assert lines[0].startswith("dg2pf: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_sparsity_outside_0_1(tmp_path, untrained_ckpt, value):
    # The flags fill a JobSpec: the CLI refuses what POST /jobs refuses, with the same message.
    out = tmp_path / "out"
    assert_refused(dg2pf(*prune_args(untrained_ckpt, out, **{"--sparsity": value})), out, "sparsity", "between 0 and 1")


def test_an_input_model_at_chance_refused_on_request_leaves_nothing_to_resume(tmp_path, untrained_ckpt):
    out = tmp_path / "out"
    result = dg2pf(*prune_args(untrained_ckpt, out, **{"--chance-baseline": "refuse"}))
    assert_refused(result, out, "near chance", "chance_baseline is 'refuse': nothing was trained")
    assert "--resume" not in result.stderr and "set chance_baseline" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no OUT.dg2pf-run either: there is nothing to continue


def test_unknown_arch_suggests_close_names(tmp_path, untrained_ckpt):
    out = tmp_path / "out"
    assert_refused(
        dg2pf(*prune_args(untrained_ckpt, out, **{"--arch": "digit_cnn"})), out, "unknown architecture", "digits_cnn"
    )


def test_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = tmp_path / "evil.pt"
    with ckpt.open("wb") as f:
        pickle.dump({"w": Evil()}, f)
    out = tmp_path / "out"
    assert_refused(dg2pf(*prune_args(ckpt, out)), out, "pickled")
    assert not marker.exists()


def test_unreadable_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    out = tmp_path / "out"
    assert_refused(dg2pf(*prune_args(bad, out)), out, str(bad))
    assert_refused(dg2pf(*prune_args(tmp_path / "nope.pt", out)), out, "nope.pt")


def test_checkpoint_of_another_shape(tmp_path):
    ckpt = tmp_path / "five.safetensors"
    save_state_dict(build_model("digits_cnn", 5).state_dict(), ckpt)
    out = tmp_path / "out"
    assert_refused(dg2pf(*prune_args(ckpt, out)), out, "classifier.weight", "(5, 128)")


def test_missing_or_empty_dataset(tmp_path, untrained_ckpt):
    out = tmp_path / "out"
    assert_refused(
        dg2pf(*prune_args(untrained_ckpt, out, **{"--dataset": f"imagefolder:{tmp_path / 'none'}"})),
        out,
        "does not exist",
    )
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert_refused(
        dg2pf(*prune_args(untrained_ckpt, out, **{"--dataset": f"imagefolder:{tmp_path / 'empty'}"})), out, "train"
    )
    assert_refused(dg2pf(*prune_args(untrained_ckpt, out, **{"--dataset": "svhn"})), out, "unknown dataset")


def test_num_classes_not_matching_the_dataset(tmp_path):
    ckpt = tmp_path / "five.safetensors"
    save_state_dict(build_model("digits_cnn", 5).state_dict(), ckpt)
    out = tmp_path / "out"
    assert_refused(dg2pf(*prune_args(ckpt, out, **{"--num-classes": "5"})), out, "10 classes", "num_classes=5")


def test_non_empty_output_directory_is_not_touched(tmp_path, untrained_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = dg2pf(*prune_args(untrained_ckpt, out))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_every_config_knob_is_a_cli_option():
    import dataclasses

    from dg2pf_cli.main import build_parser
    from dg2pf_core import DG2PFConfig

    help_text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    for f in dataclasses.fields(DG2PFConfig):
        assert "--" + f.name.replace("_", "-") in help_text


def test_progress_lines_show_weight_recovery_in_pruning_epochs(capsys):
    from dg2pf_cli.progress import EpochBars
    from dg2pf_core.algorithm.state import EpochRecord

    bars = EpochBars()  # stderr is captured, not a terminal: one plain line per epoch
    epoch = dict(phase="gradual_pruning", train_loss=0.1, val_top1=90.0, val_top5=99.0, lr=0.01, seconds=1.0)
    bars.end_epoch(EpochRecord(**epoch, epoch=2, sparsity=0.5, recovered=12))
    bars.end_epoch(EpochRecord(**epoch, epoch=3, sparsity=0.6, recovered=0))
    lines = capsys.readouterr().err.splitlines()
    assert "12 weights recovered" in lines[0] and "recovered" not in lines[1]


@pytest.mark.parametrize(
    "over, extra, needles",
    [
        (
            {},
            ["--granularity", "channel", "--target-macs-ratio", "0.5"],
            ["give sparsity or target_macs_ratio, not both"],
        ),
        ({"--sparsity": None}, ["--target-macs-ratio", "0.5"], ["only applies to granularity 'channel'"]),
        ({"--sparsity": None}, [], ["--sparsity", "--target-macs-ratio"]),
        (
            {"--sparsity": None},
            ["--granularity", "channel", "--target-macs-ratio", "0.1", "--max-layer-sparsity", "0.5"],
            ["target_macs_ratio 0.1 cannot be reached"],
        ),
        ({"--sparsity": None}, ["--granularity", "channel", "--target-macs-ratio", "1"], ["strictly between 0 and 1"]),
        ({"--sparsity": "0.99"}, ["--granularity", "channel"], ["sparsity 0.99", "layer collapse guard"]),
        ({}, ["--granularity", "channel", "--image-size", "1024"], ["granularity 'channel'", "at most 512x512"]),
        ({"--arch": "torchvision/swin_t"}, ["--granularity", "channel"], ["not available for torchvision/swin_t"]),
    ],
)
def test_channel_options_are_refused_before_training(untrained_ckpt, tmp_path, over, extra, needles):
    out = tmp_path / "out"
    args = prune_args(untrained_ckpt, out, **{k: v for k, v in over.items() if v is not None})
    if over.get("--sparsity", "") is None:
        i = args.index("--sparsity")
        del args[i : i + 2]
    assert_refused(dg2pf(*args, *extra), out, *needles)


# --------------------------------------------------------------------- channel granularity: what the commands show


def _without_sparsity(args: list[str]) -> list[str]:
    i = args.index("--sparsity")
    return args[:i] + args[i + 2 :]


def _param_count(arch: str, path: Path) -> int:
    from dg2pf_core.job import load_checkpoint_model

    _, model, _ = load_checkpoint_model(arch, 10, path)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("sparsity", [None, "0.5"])
def test_a_macs_target_with_n_m_granularity_is_refused_as_channel_only(untrained_ckpt, tmp_path, sparsity):
    out = tmp_path / "out"
    args = prune_args(untrained_ckpt, out, **({"--sparsity": sparsity} if sparsity else {}))
    args = args if sparsity else _without_sparsity(args)
    assert_refused(
        dg2pf(*args, "--granularity", "2:4", "--target-macs-ratio", "0.5"),
        out,
        "target_macs_ratio",
        "only applies to granularity 'channel'",
    )


@pytest.fixture(scope="module")
def channel_job(untrained_ckpt, tmp_path_factory) -> tuple[Path, dict]:
    """digits_cnn with half its MACs removed by channel pruning (an untrained input: sizes, not accuracy)."""
    out = tmp_path_factory.mktemp("channel") / "half"
    args = [a for a in _without_sparsity(prune_args(untrained_ckpt, out)) if a != "--quiet"]  # its progress lines too
    result = dg2pf(*args, "--granularity", "channel", "--target-macs-ratio", "0.5", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "device: cpu (1 thread; --threads to change)" in result.stderr
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("cpus, load, threads", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 3.5, 1), (16, 3.4, 13)])
def test_the_default_thread_count_leaves_the_cores_other_work_uses(monkeypatch, cpus, load, threads):
    from dg2pf_cli.main import default_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    assert default_threads() == threads


@pytest.mark.slow
def test_channel_metrics_say_what_was_removed_against_the_input_model(channel_job, untrained_ckpt):
    from dg2pf_core.io.metrics import conv_linear_macs

    out, m = channel_job
    assert m["params_dense"] == _param_count("digits_cnn", untrained_ckpt)  # the model the job started from
    assert m["params_total"] == _param_count("digits_cnn", out / "model.safetensors") < m["params_dense"]
    assert m["flops_dense"] == conv_linear_macs(build_model("digits_cnn", 10), (1, 16, 16), torch.device("cpu"))[0]
    assert m["channels_pruned"] > 0
    assert m["sparsity_prunable"] == m["channel_sparsity"] == m["channels_pruned"] / m["channels_total"]
    assert (
        m["macs_ratio"] == pytest.approx(m["flops_sparse"] / m["flops_dense"]) and abs(m["macs_ratio"] - 0.5) <= 0.025
    )
    assert m["params_ratio"] == pytest.approx(m["params_total"] / m["params_dense"])
    # no field reads 0 for a network that lost half its compute
    assert (
        m["sparsity_total"] == pytest.approx(1 - m["params_nonzero"] / m["params_dense"]) and m["sparsity_total"] > 0.3
    )
    assert m["params_total"] - m["params_dense"] < 0 < m["params_prunable"] <= m["params_dense"]
    assert m["target_sparsity"] is None and m["config"]["target_macs_ratio"] == 0.5
    assert [w for w in m["warnings"] if "near chance" not in w] == []  # an untrained input model: only that one


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, fraction", [(["--sparsity", "0.3"], 0.3), (["--sparsity", "0.3", "--channel-multiple", "1"], 0.3)]
)
def test_a_channel_fraction_is_met_with_widths_rounded_and_no_layer_beyond_the_reported_cap(
    untrained_ckpt, tmp_path, extra, fraction
):
    out = tmp_path / "out"
    result = dg2pf(
        *_without_sparsity(prune_args(untrained_ckpt, out)), "--granularity", "channel", *extra, "--threads", "1"
    )
    assert result.returncode == 0, result.stderr
    m = json.loads((out / "metrics.json").read_text())
    # rounding kept widths up to a multiple puts channels back: the ranking goes further to make up for them
    assert (
        abs(m["channel_sparsity"] - fraction) <= 0.02 and [w for w in m["warnings"] if "near chance" not in w] == []
    ), m
    assert max(m["layer_sparsity"].values()) <= m["layer_cap"] + 1e-9  # the cap printed is the cap applied
    model = read_state_dict(out / "model.safetensors")
    widths = [v.shape[0] for k, v in model.items() if k.endswith(".weight") and v.dim() == 4]
    multiple = m["channel_multiple"]
    # digits_cnn's 32/64/128 channels in steps of 16 cannot come within 2% of 0.3: a smaller multiple is used
    assert multiple in ((16, 8, 4, 2) if "--channel-multiple" not in extra else (1,))
    assert all(w % multiple == 0 for w in widths), widths


@pytest.mark.slow
def test_a_channel_job_that_collapses_layers_warns(untrained_ckpt, tmp_path):
    out = tmp_path / "out"
    result = dg2pf(
        *_without_sparsity(prune_args(untrained_ckpt, out)),
        "--granularity",
        "channel",
        "--target-macs-ratio",
        "0.001",
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert max(m["layer_sparsity"].values()) > 0.98
    assert any("of their channels removed" in w and "layer collapse" in w for w in m["warnings"]), m["warnings"]
    assert "layer collapse" in result.stderr


@pytest.mark.slow
def test_a_channel_pruned_file_that_lost_its_structure_says_so(channel_job, tmp_path):
    out, _ = channel_job
    stripped = tmp_path / "resaved.safetensors"
    save_state_dict(read_state_dict(out / "model.safetensors"), stripped)  # another tool re-saving it: no metadata
    result = dg2pf(
        "evaluate", "--arch", "digits_cnn", "--num-classes", "10", "--checkpoint", str(stripped), "--dataset", "digits"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "carries no channel structure" in result.stderr and "narrower" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("dense", [True, False])
def test_latency_compares_a_channel_pruned_model_with_the_dense_one(channel_job, untrained_ckpt, dense):
    out, m = channel_job
    reference = ["--dense-checkpoint", str(untrained_ckpt)] if dense else []
    args = [
        "latency",
        "--arch",
        "digits_cnn",
        "--checkpoint",
        str(out / "model.safetensors"),
        *reference,
        "--backends",
        "torch",
        "--batch-sizes",
        "1",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    doc = json.loads(dg2pf(*args, "--json").stdout)
    assert doc["macs_ratio"] == pytest.approx(m["macs_ratio"])  # was 1.000x: the pruned model against itself
    assert doc["params_ratio"] == pytest.approx(m["params_nonzero"] / m["params_dense"])
    text = dg2pf(*args)
    assert text.returncode == 0, text.stderr
    header = text.stdout.splitlines()[0]
    assert f"MACs nonzero / dense {m['macs_ratio']:.3f}x" in header
    assert ("(vs the dense checkpoint)" if dense else "(vs digits_cnn's dense default") in header


@pytest.mark.slow
def test_evaluate_shows_the_channels_and_macs_of_a_channel_pruned_checkpoint(channel_job):
    out, m = channel_job
    args = [
        "evaluate",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(out / "model.safetensors"),
        "--dataset",
        "digits",
    ]
    r = json.loads(dg2pf(*args, "--json").stdout)
    assert r["channels_removed"] == m["channels_pruned"]
    assert (r["macs"], r["macs_reference"], r["params_reference"]) == (
        m["flops_sparse"],
        m["flops_dense"],
        m["params_dense"],
    )
    text = dg2pf(*args).stdout
    assert f"channels: {m['channels_pruned']:,} removed" in text
    assert f"MACs {m['flops_sparse']:,} / {m['flops_dense']:,} ({m['macs_ratio']:.3f}x)" in text
    assert "vs digits_cnn's dense default" in text


@pytest.mark.slow
def test_re_pruning_a_channel_pruned_checkpoint_counts_from_it_not_from_its_dense_teacher(
    channel_job, untrained_ckpt, tmp_path
):
    out, first = channel_job
    again = tmp_path / "again"
    result = dg2pf(
        *prune_args(out / "model.safetensors", again, **{"--sparsity": "0.2"}),
        "--granularity",
        "channel",
        "--teacher",
        str(untrained_ckpt),
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr
    m = json.loads((again / "metrics.json").read_text())
    assert (m["params_dense"], m["flops_dense"]) == (first["params_total"], first["flops_sparse"])
    assert m["params_total"] < m["params_dense"] and m["channels_pruned"] > 0


class _GroupedCNN(torch.nn.Module):
    """A grouped (not depthwise) convolution: Torch-Pruning groups it, dg2pf cannot map its channels."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.conv3 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.bn3 = torch.nn.BatchNorm2d(32)
        self.classifier = torch.nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.bn3(self.conv3(torch.nn.functional.max_pool2d(x, 2))))
        return self.classifier(x.mean((2, 3)))


@pytest.fixture(scope="module")
def grouped_job(tmp_path_factory) -> subprocess.CompletedProcess:
    """A channel job on a model with groups left dense, at a sparsity too mild to remove one channel."""
    from dg2pf_core.algorithm import channels
    from dg2pf_core.models.registry import register_arch

    try:
        register_arch("test/grouped_cnn", input_size=16, in_channels=1, description="tests: a grouped convolution")(
            _GroupedCNN
        )
    except ValueError:  # registered by an earlier module run
        pass
    root = tmp_path_factory.mktemp("grouped")
    torch.manual_seed(0)
    save_state_dict(_GroupedCNN(10).state_dict(), root / "in.safetensors")
    # Channel granularity runs on the architectures it is verified on; the smallest of those with a
    # grouped convolution (regnet_x_400mf, 5 M parameters) would take minutes here, so this one is added.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(channels, "CHANNEL_ARCHS", (*channels.CHANNEL_ARCHS, "test/grouped_cnn"))
        result = dg2pf(
            *prune_args(root / "in.safetensors", root / "out", **{"--arch": "test/grouped_cnn", "--sparsity": "0.01"}),
            "--granularity",
            "channel",
            "--threads",
            "1",
        )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_the_summary_names_the_groups_left_dense(grouped_job):
    row = next(line for line in grouped_job.stdout.splitlines() if line.startswith("groups left dense"))
    count, names = row.removeprefix("groups left dense").strip().split(": ", 1)
    assert count == "2"
    assert sorted(names.split("; ")) == [f"{n} (conv2 (Conv2d) has no channel mapping)" for n in ("conv1", "conv2")]


@pytest.mark.slow
def test_a_run_that_removed_no_channel_says_so(grouped_job):
    assert "none of 32 prunable" in grouped_job.stdout
    said = [line for line in grouped_job.stderr.splitlines() if "no channel was removed" in line]
    assert len(said) == 1 and "sparsity 0.01 of 32 prunable channels rounds to 0" in said[0]


# --- dg2pf plot: the pictures every job writes, drawn again for any run --------------------------


@pytest.mark.slow
def test_a_job_writes_its_plots_and_dg2pf_plot_draws_them_for_any_run(channel_job, tmp_path):
    out, m = channel_job
    for name in ("training.png", "layers.png"):
        assert_drawn_png(out / name)
    # A run directory holding only its metrics.json: the PNGs go next to it.
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(out / "metrics.json", run / "metrics.json")
    result = dg2pf("plot", str(run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {run / 'training.png'} and {run / 'layers.png'}"
    for name in ("training.png", "layers.png"):
        assert_drawn_png(run / name)
    # The first release's metrics.json (before recovered, restarts, latency, onnx, granularity, warnings, macs_*, ...,
    # its MACs named flops_*): drawn too.
    first = (
        "arch",
        "num_classes",
        "dataset",
        "image_size",
        "in_channels",
        "class_names",
        "target_sparsity",
        "sparsity_prunable",
        "sparsity_total",
        "params_total",
        "params_nonzero",
        "params_prunable",
        "flops_dense",
        "flops_sparse",
        "flops_unit",
        "baseline_val_top1",
        "baseline_test_top1",
        "val_top1",
        "test_top1",
        "test_top5",
        "best_epoch",
        "epochs",
        "final_phase",
        "world_size",
        "wall_seconds",
        "layer_sparsity",
        "config",
    )
    old = {k: m[k] for k in first}
    old["history"] = [
        {
            k: r[k]
            for k in ("phase", "epoch", "sparsity", "train_loss", "val_top1", "val_top5", "lr", "seconds", "is_best")
        }
        for r in m["history"]
    ]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(old))
    result = dg2pf("plot", str(tmp_path / "old" / "metrics.json"), "--out", str(tmp_path / "pictures" / "old"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "pictures" / "old").iterdir()) == ["layers.png", "training.png"]


@pytest.mark.slow
def test_the_plots_mark_the_phases_the_kept_epoch_the_recovered_weights_and_every_layer(channel_job):
    from dg2pf_contract.results import Metrics
    from dg2pf_core.io.plots import layers_figure, training_figure

    _, document = channel_job
    m = Metrics.model_validate(document)
    figure = training_figure(m)
    # top-1, sparsity, loss, and the weights each ranking recovered (its pruning epochs record them)
    assert [ax.get_ylabel() for ax in figure.axes][-1] == "weights recovered\nper ranking" and len(figure.axes) == 4
    marked = [t.get_text() for t in figure.legends[0].get_texts()]
    assert marked == ["baseline (unpruned)", "gradual pruning", f"kept (best) epoch {m.best_epoch}"]
    bars = layers_figure(m).axes[0].patches
    assert [round(b.get_width(), 6) for b in bars] == [round(v * 100, 6) for v in m.layer_sparsity.values()]


@pytest.mark.slow
def test_plot_refuses_bad_input_in_one_line_and_writes_nothing(channel_job, tmp_path):
    from dg2pf_service.cluster import free_port

    out, _ = channel_job
    empty, damaged, example, listed = (tmp_path / n for n in ("empty", "damaged", "example", "listed"))
    for folder in (empty, damaged, example, listed):
        folder.mkdir()
    (damaged / "metrics.json").write_text('{"history": [{"epoch": 0,')  # cut off mid-write
    (example / "metrics.json").write_text(json.dumps({"arch": "digits_cnn", "test_top1": 97.2}))  # dg2pf example's
    (listed / "metrics.json").write_text("[]")
    (tmp_path / "file").write_text("")
    nowhere = f"http://127.0.0.1:{free_port()}"
    cases = [
        ((str(tmp_path / "missing"),), "does not exist"),
        ((str(empty),), "holds no metrics.json"),
        ((str(damaged),), "is not valid JSON"),
        ((str(example),), "is not a dg2pf run's metrics.json: it has no num_classes, dataset, image_size and "),
        ((str(listed),), "holds a JSON list, not an object"),
        ((str(out), "--out", str(tmp_path / "file")), "is a file"),
        (("0" * 32, "--url", nowhere, "--out", str(empty)), f"cannot reach the dg2pf service at {nowhere}"),
    ]
    for args, needle in cases:
        result = dg2pf("plot", *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("dg2pf: error:") and needle in lines[0], (args, result.stderr)
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.slow
def test_plot_of_a_job_id_draws_from_the_services_metrics_and_the_job_lists_its_plots(channel_job, tmp_path):
    """The real API over HTTP (its routes and store; no scheduler or Ray: the job's output is in place)."""
    import threading
    from types import SimpleNamespace

    import httpx
    import uvicorn

    from dg2pf_service.api.app import create_app
    from dg2pf_service.cluster import free_port
    from dg2pf_service.settings import Settings
    from dg2pf_service.store.db import make_engine, make_sessionmaker
    from dg2pf_service.store.migrate import upgrade
    from dg2pf_service.store.repo import JobStore

    out, _ = channel_job
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    store = JobStore(make_sessionmaker(make_engine(url)))
    row = store.create_job({"spec": {}, "resolved": {}}, "plotted", 0.0, tmp_path / "jobs")
    shutil.copytree(out, Path(row.artifacts_dir) / "output")
    app = create_app()
    app.state.services = SimpleNamespace(settings=Settings(api_tokens=["plot-token"]), store=store)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer plot-token"}
        listed = httpx.get(f"{base}/jobs/{row.id}/artifacts", headers=auth).json()["artifacts"]
        assert {"training.png", "layers.png"} <= {a["name"] for a in listed}
        png = httpx.get(f"{base}/jobs/{row.id}/artifacts/layers.png", headers=auth)
        assert png.headers["content-type"] == "image/png" and png.content == (out / "layers.png").read_bytes()

        result = dg2pf("plot", row.id, "--url", base, "--token", "plot-token", "--out", str(tmp_path / "pictures"))
        assert result.returncode == 0, result.stderr
        for name in ("training.png", "layers.png"):
            assert_drawn_png(tmp_path / "pictures" / name)
        for args, needle in (
            ((row.id, "--token", "wrong"), "invalid bearer token"),
            (("f" * 32, "--token", "plot-token"), f"no job with id {'f' * 32!r}"),
        ):
            result = dg2pf("plot", *args, "--url", base, "--out", str(tmp_path / "refused"))
            assert result.returncode == 2 and result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
        assert not (tmp_path / "refused").exists()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _sigint_caught(pid: int) -> bool:
    try:
        return any(
            line.startswith("SigCgt:") and int(line.split()[1], 16) & (1 << (signal.SIGINT - 1))
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    except OSError:
        return False


def _loading(pid: int, package: str) -> bool:
    """True once the process has mapped a file of ``package`` (its shared libraries load with its import)."""
    try:
        return f"/{package}/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# "while loading data": the digits come through scikit-learn, whose import loads scipy's compiled modules;
# an interrupt inside one's initialisation surfaces as `ImportError: initialization failed` raised from it.
@pytest.mark.slow
@pytest.mark.parametrize("when", ["while importing", "while loading data", "later"])
def test_ctrl_c_at_any_moment_ends_with_one_line_and_status_130(untrained_ckpt, tmp_path, when):
    script = Path(sys.executable).parent / "dg2pf"  # the console script as installed, else the module
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dg2pf_cli"]
    args = [
        *prune_args(untrained_ckpt, tmp_path / "out"),
        "--pruning-epochs",
        "20",
        "--max-epochs",
        "40",
    ]  # long enough
    # SIGINT's default disposition back (a CI started in the background passes it ignored down).
    proc = subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Python's own start (before any dg2pf code runs) is over once it catches SIGINT and loads torch;
        # without /proc, a second in is in the imports on any machine.
        deadline = time.time() + (60 if Path("/proc/self/maps").exists() else 1)
        while (
            not (_sigint_caught(proc.pid) and _loading(proc.pid, "torch"))
            and time.time() < deadline
            and proc.poll() is None
        ):
            time.sleep(0.002)
        if when == "while loading data":
            deadline = time.time() + 60
            while not _loading(proc.pid, "scipy") and time.time() < deadline and proc.poll() is None:
                time.sleep(0.001)
        if when == "later":
            time.sleep(3.0)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dg2pf: interrupted"), err


def test_an_interrupt_a_library_wrapped_in_another_exception_still_ends_as_an_interrupt(
    untrained_ckpt, tmp_path, monkeypatch
):
    """Ctrl-C inside a compiled module's initialisation reaches us as ImportError raised from the
    KeyboardInterrupt (seen in CI: scipy's HiGHS wrapper, imported by scikit-learn while loading the digits)."""
    from dg2pf_client.interrupt import caused_by_interrupt
    from dg2pf_core.data import registry

    def wrapped(outer: type[BaseException], how: str) -> BaseException:
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as interrupt:
                if how == "from":
                    raise outer("initialization failed") from interrupt
                raise outer("cleanup failed")  # noqa: B904 - raised while handling it: __context__ is under test
        except BaseException as exc:  # noqa: BLE001 - the wrapped exception is the value under test
            return exc

    assert caused_by_interrupt(KeyboardInterrupt()) and caused_by_interrupt(wrapped(ImportError, "from"))
    assert caused_by_interrupt(wrapped(RuntimeError, "context"))
    try:  # raised from another error while handling the interrupt: the context still holds it
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cleanup failed") from ValueError("why")
    except RuntimeError as exc:
        assert caused_by_interrupt(exc)
    assert caused_by_interrupt(BaseExceptionGroup("workers", [ValueError("x"), KeyboardInterrupt()]))
    assert not caused_by_interrupt(ValueError("x")) and not caused_by_interrupt(None)
    looped = ValueError("a")
    looped.__context__ = RuntimeError("b")
    looped.__context__.__context__ = looped
    assert not caused_by_interrupt(looped)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the plug-in below is this test's own

    raised: list[BaseException] = []

    @registry.register_dataset(
        "interrupted",
        needs_path=False,
        help="raises what an interrupted import raises",
        eval_transform=lambda request: None,
    )
    def _interrupted(path, request):
        raise raised[-1]

    for exc in (wrapped(ImportError, "from"), wrapped(DG2PFError, "context")):  # the product's own error too
        raised.append(exc)
        out = tmp_path / f"out{len(raised)}"
        result = dg2pf(
            *prune_args(untrained_ckpt, out, **{"--dataset": "interrupted"}), "--threads", str(torch.get_num_threads())
        )
        assert result.returncode == 130, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("dg2pf: interrupted"), result.stderr
        assert not out.exists()


@pytest.mark.slow
def test_an_interrupt_a_library_swallowed_still_stops_the_run(untrained_ckpt, tmp_path):
    """Python drops a KeyboardInterrupt raised in some callbacks (importlib's module-lock callback prints
    "Exception ignored" and the import goes on; seen while scikit-learn loaded): the console script's
    handler notes the signal, and the run stops at the next point it checks, before training."""
    out = tmp_path / "out"
    code = (
        "import os, signal, sys, time\n"
        "from dg2pf_client import interrupt\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # a CI started in the background ignores it\n"
        "interrupt.install()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    pass  # swallowed, as a library might\n"
        "from dg2pf_cli.entry import run\n"
        f"sys.exit(run({[*prune_args(untrained_ckpt, out), '--threads', '1']!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dg2pf: interrupted"), result.stderr
    assert not out.exists()


def test_a_job_file_error_names_where_the_value_came_from(tmp_path, capsys):
    """The flags, --set and the file fill one JobSpec; a bad value is named as the user gave it."""
    from dg2pf_cli.main import main

    job = tmp_path / "job.yaml"
    job.write_text(
        "model: {arch: digits_cnn, num_classes: 10, checkpoint: c.safetensors}\n"
        "dataset: {spec: digits}\nsparsity: 0.5\nschedule: {lr: 500}\n"
    )
    out = ["--out", str(tmp_path / "out")]
    cases = [
        ([], f"dg2pf: error: job spec {job}: schedule.lr: must be in (0, 100], got 500"),
        (["--lr", "-1"], "dg2pf: error: --lr: must be in (0, 100], got -1.0"),
        (["--set", "schedule.lr=-2"], "dg2pf: error: --set schedule.lr: must be in (0, 100], got -2"),
        (["--lr", "0.001", "--set", "tune.samples=2"], "has a tune section: run it with `dg2pf tune`"),
    ]
    for extra, needle in cases:
        assert main(["prune", str(job), *out, *extra]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_latency_budget_job_refuses_the_unreachable_and_states_what_it_met(tmp_path, untrained_ckpt):
    def args(out: Path, budget: str) -> list[str]:
        flags = {
            "--arch": "digits_cnn",
            "--num-classes": "10",
            "--checkpoint": str(untrained_ckpt),
            "--dataset": "digits",
            "--granularity": "channel",
            "--latency-budget-ms": budget,
            "--latency-backend": "torch",
            # batch 32: a 0.4 ms batch-1 call of this tiny network measured up to 1.7x apart in two processes
            "--latency-batch-size": "32",
            "--out": str(out),
        }
        return ["prune", *[x for kv in flags.items() for x in kv], "--pruning-epochs", "1", "--max-epochs", "1"]

    out = tmp_path / "out"
    refused = dg2pf(*args(out, "1e-9"), "--quiet")  # measures the dense network: the budget below is 0.7x it
    assert_refused(refused, out, "latency_budget_ms 1e-09 cannot be reached", "the dense network measured", "predicted")
    dense_ms = float(refused.stderr.split("the dense network measured ")[1].split(" ms")[0])
    done = dg2pf(*args(out, f"{0.7 * dense_ms:.6g}"))
    assert done.returncode == 0, done.stderr
    assert "the table predicted" in done.stdout
    objective = json.loads((out / "metrics.json").read_text())["latency_objective"]
    assert objective["budget_ms"] == pytest.approx(0.7 * dense_ms, rel=1e-5)
    assert objective["predicted_ms"] <= objective["budget_ms"]
    assert objective["measured_ms"] > 0 and objective["backend"] == "torch"


def test_latency_table_writes_a_table_a_job_takes_and_one_for_another_setting_is_refused(tmp_path, untrained_ckpt):
    table = tmp_path / "table.json"
    made = dg2pf(
        "latency-table",
        "--arch",
        "digits_cnn",
        "--checkpoint",
        str(untrained_ckpt),
        "--backend",
        "torch",
        "--quiet",
        "--out",
        str(table),
    )
    assert made.returncode == 0, made.stderr
    doc = json.loads(table.read_text())
    assert doc["format"] == "dg2pf-latency-table/1" and doc["machine"]["backend"] == "torch"
    again = dg2pf("latency-table", "--arch", "digits_cnn", "--checkpoint", str(untrained_ckpt), "--out", str(table))
    assert again.returncode == 2 and "exists" in again.stderr and json.loads(table.read_text()) == doc
    out = tmp_path / "out"
    flags = ["--granularity", "channel", "--latency-table", str(table)]
    base = prune_args(untrained_ckpt, out)
    del base[base.index("--sparsity") : base.index("--sparsity") + 2]  # the budget decides the channels
    budget = f"{0.7 * doc['dense_measured_ms']:.6g}"
    wrong = dg2pf(*base, *flags, "--latency-budget-ms", budget, "--latency-backend", "onnxruntime")
    assert_refused(wrong, out, "latency_table: measured for another setting", "backend: 'onnxruntime' here, 'torch'")
    done = dg2pf(*base, *flags, "--latency-budget-ms", budget, "--latency-backend", "torch")
    assert done.returncode == 0, done.stderr
    objective = json.loads((out / "metrics.json").read_text())["latency_objective"]
    assert objective["predicted_ms"] <= float(budget) and objective["calibration"] == []  # the table as given


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--image-size", "0"], "--image-size must be in [8, 2048] pixels, got 0"),
        (["--batch-size", "4096", "--image-size", "300"], "GiB input to time; at most 1 GiB"),
        (["--out", "/proc/nowhere/t.json"], "is not a directory this user can write in"),
    ],
)
def test_latency_table_refuses_before_measuring_in_one_line(tmp_path, flags, needle):
    args = ["latency-table", "--arch", "digits_cnn", "--num-classes", "10", "--out", str(tmp_path / "t.json"), *flags]
    result = dg2pf(*args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr and list(tmp_path.iterdir()) == []


def test_ctrl_c_while_the_results_are_written_keeps_the_trained_state_and_resume_writes_them(
    digits_example, tmp_path, monkeypatch
):
    from dg2pf_core.job import prune

    real = prune.write_results
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prune, "write_results", interrupted_once)
    out = tmp_path / "out"
    args = ["prune", "--arch", "digits_cnn", "--num-classes", "10", "--dataset", "digits", "--sparsity", "0.5"]
    args += ["--checkpoint", str(digits_example / "model.safetensors"), "--pruning-epochs", "1", "--max-epochs", "2"]
    r = dg2pf(*args, "--out", str(out), "--quiet")
    assert r.returncode == 130 and not out.exists()
    (line,) = r.stderr.strip().splitlines()
    assert "interrupted; nothing was written" in line and "--resume" in line, line
    kept = line.rsplit("--resume ", 1)[1].rstrip("`")
    r = dg2pf("prune", "--resume", kept, "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2 and len(calls) == 2
