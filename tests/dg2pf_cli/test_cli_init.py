"""`dg2pf init`: seeded random weights for a registry architecture, a file every `--checkpoint` reads;
bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import pytest
import torch

from dg2pf_core.io.checkpoints import read_state_dict
from dg2pf_core.job import load_checkpoint_model
from dg2pf_core.models import build_model


def dg2pf(*args: str) -> subprocess.CompletedProcess:
    from dg2pf_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the command sets the process's threads, as in a real run


def init(out, arch="digits_cnn", classes="10", *extra: str) -> subprocess.CompletedProcess:
    return dg2pf("init", "--arch", arch, "--num-classes", classes, "--out", str(out), *extra)


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_weights(tmp_path):
    first, again, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert init(first, "digits_cnn", "10", "--seed", "7").returncode == 0
    # the thread count does not change the weights
    assert init(again, "digits_cnn", "10", "--seed", "7", "--threads", "1").returncode == 0
    assert init(other, "digits_cnn", "10", "--seed", "8").returncode == 0
    assert first.read_bytes() == again.read_bytes()
    a, c = read_state_dict(first), read_state_dict(other)
    assert a.keys() == c.keys()
    assert all(not torch.equal(a[k], c[k]) for k, v in a.items() if k.endswith(".weight") and v.dim() > 1)


def test_the_file_is_the_architectures_state_dict_read_like_any_checkpoint(tmp_path):
    out = tmp_path / "sq.safetensors"
    result = init(out, "torchvision/squeezenet1_1", "7", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.startswith(f"wrote {out} (torchvision/squeezenet1_1, 7 classes, ") and "seed 3" in result.stdout
    )
    assert out.read_bytes()[:8] != b"PK\x03\x04" and not out.read_bytes().startswith(
        b"\x80"
    )  # not a pickle or torch.save zip
    state = read_state_dict(out)
    expected = build_model("torchvision/squeezenet1_1", 7).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    _, model, _ = load_checkpoint_model("torchvision/squeezenet1_1", 7, out)  # the check every command runs
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    import safetensors

    with safetensors.safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["dg2pf_init"]) == {
            "arch": "torchvision/squeezenet1_1",
            "num_classes": 7,
            "seed": 3,
        }


@pytest.mark.slow
def test_prune_takes_the_file(tmp_path):
    ckpt = tmp_path / "digits.safetensors"
    assert init(ckpt).returncode == 0
    out = tmp_path / "pruned"
    result = dg2pf(
        "prune",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(ckpt),
        "--dataset",
        "digits",
        "--sparsity",
        "0.5",
        "--out",
        str(out),
        "--pruning-epochs",
        "1",
        "--max-epochs",
        "1",
        "--quiet",
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert abs(json.loads((out / "metrics.json").read_text())["sparsity_prunable"] - 0.5) <= 0.001


@pytest.mark.parametrize(
    "arch, classes, extra, needle",
    [
        ("digts_cnn", "10", (), "unknown architecture 'digts_cnn'; did you mean: digits_cnn?"),
        ("digits_cnn", "1", (), "--num-classes must be in [2, 100,000]"),
        ("digits_cnn", "100001", (), "--num-classes must be in [2, 100,000]"),
        ("digits_cnn", "10", ("--seed", "-1"), "--seed must be in [0, 4294967295]"),
        ("digits_cnn", "10", ("--threads", "0"), "--threads must be in [1, 1024]"),
        ("digits_cnn", "10", ("--threads", "999999"), "--threads must be in [1, 1024]"),
    ],
)
def test_bad_options_are_refused_in_one_line_and_nothing_is_written(tmp_path, arch, classes, extra, needle):
    out = tmp_path / "m.safetensors"
    result = init(out, arch, classes, *extra)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dg2pf: error: ") and needle in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_output_must_be_a_new_safetensors_file_unless_forced(tmp_path):
    existing = tmp_path / "m.safetensors"
    existing.write_bytes(b"keep me")
    for out, needle in [
        (existing, "already exists; choose a new name, or --force"),
        (tmp_path / "m.pt", "name the file .safetensors"),
        (tmp_path, "is a directory"),
        (existing / "x.safetensors", "is a file, not a directory"),
        (tmp_path / ("a" * 300 + ".safetensors"), "cannot be written: File name too long"),
    ]:
        result = init(out)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert existing.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    result = init(existing, "digits_cnn", "10", "--force")
    assert result.returncode == 0, result.stderr
    assert read_state_dict(existing).keys() == build_model("digits_cnn", 10).state_dict().keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


@pytest.mark.parametrize("where", ["/proc", "/sys"])
def test_a_folder_that_cannot_take_the_file_is_one_line(where):
    # /proc takes no new files, /sys refuses them: the writer's own error, named, exit 2, no traceback
    result = init(f"{where}/dg2pf-init-test.safetensors")
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"dg2pf: error: --out {where}/dg2pf-init-test.safetensors")
