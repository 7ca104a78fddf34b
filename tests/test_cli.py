"""Bad input exits 2 with one clear line, and nothing is written."""

from __future__ import annotations

import contextlib
import io

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dg2pf_core.checkpoints import save_state_dict
from dg2pf_core.models import build_model


def dg2pf(*args: str) -> subprocess.CompletedProcess:
    """Runs the CLI in-process (importing torch per call would dominate the test time)."""
    from dg2pf_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_console_entry_point_reports_errors_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dg2pf_cli", "evaluate", "--arch", "digits_cnn", "--num-classes", "10",
                             "--checkpoint", str(tmp_path / "missing.pt"), "--dataset", "digits"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("dg2pf: error:") and "missing.pt" in result.stderr


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    torch.manual_seed(0)
    save_state_dict(build_model("digits_cnn", 10).state_dict(), path)
    return path


def prune_args(ckpt: Path, out: Path, **over: str) -> list[str]:
    base = {"--arch": "digits_cnn", "--num-classes": "10", "--checkpoint": str(ckpt), "--dataset": "digits", "--sparsity": "0.9", "--out": str(out)}
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
    out = tmp_path / "out"
    assert_refused(dg2pf(*prune_args(untrained_ckpt, out, **{"--sparsity": value})), out, "sparsity", "between 0 and 1")


def test_unknown_arch_suggests_close_names(tmp_path, untrained_ckpt):
    out = tmp_path / "out"
    assert_refused(dg2pf(*prune_args(untrained_ckpt, out, **{"--arch": "digit_cnn"})), out, "unknown architecture", "digits_cnn")


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
    assert_refused(dg2pf(*prune_args(untrained_ckpt, out, **{"--dataset": f"imagefolder:{tmp_path / 'none'}"})), out, "does not exist")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert_refused(dg2pf(*prune_args(untrained_ckpt, out, **{"--dataset": f"imagefolder:{tmp_path / 'empty'}"})), out, "train")
    assert_refused(dg2pf(*prune_args(untrained_ckpt, out, **{"--dataset": "mnist"})), out, "unknown dataset")


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
    from dg2pf_core.state import EpochRecord

    bars = EpochBars()  # stderr is captured, not a terminal: one plain line per epoch
    bars.end_epoch(EpochRecord("gradual_pruning", 2, 0.5, 0.1, 90.0, 99.0, 0.01, 1.0, recovered=12))
    bars.end_epoch(EpochRecord("gradual_pruning", 3, 0.6, 0.1, 90.0, 99.0, 0.01, 1.0, recovered=0))
    lines = capsys.readouterr().err.splitlines()
    assert "12 weights recovered" in lines[0] and "recovered" not in lines[1]


@pytest.mark.parametrize("over, extra, needles", [
    ({}, ["--granularity", "channel", "--target-macs-ratio", "0.5"], ["give sparsity or target_macs_ratio, not both"]),
    ({"--sparsity": None}, ["--target-macs-ratio", "0.5"], ["only applies to granularity 'channel'"]),
    ({"--sparsity": None}, [], ["--sparsity", "--target-macs-ratio"]),
    ({"--sparsity": None}, ["--granularity", "channel", "--target-macs-ratio", "0.1", "--max-layer-sparsity", "0.5"],
     ["target_macs_ratio 0.1 cannot be reached"]),
    ({"--sparsity": None}, ["--granularity", "channel", "--target-macs-ratio", "1"], ["strictly between 0 and 1"]),
])
def test_channel_options_are_refused_before_training(untrained_ckpt, tmp_path, over, extra, needles):
    out = tmp_path / "out"
    args = prune_args(untrained_ckpt, out, **{k: v for k, v in over.items() if v is not None})
    if over.get("--sparsity", "") is None:
        i = args.index("--sparsity")
        del args[i:i + 2]
    assert_refused(dg2pf(*args, *extra), out, *needles)
