"""Bad input to `dg2pf prune` fails before any training: exit 2, one line, no traceback, nothing
written (no output directory, no run state, so no epoch ran); late failures keep the trained state.

Every input is small and built by the test: folders of a few real digit images, tiny checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dg2pf_cli.main import main
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.io.checkpoints import read_state_dict
from dg2pf_core.job import state_dir_for
from dg2pf_core.models import build_model

FAST = ["--pruning-epochs", "2", "--max-epochs", "3", "--patience", "1", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """imagefolder: two classes of real 8x8 digit images (0 and 1), 24 train and 8 test each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("folder") / "digits01"
    for split, (lo, hi) in {"train": (0, 24), "test": (24, 32)}.items():
        for label in (0, 1):
            d = root / split / f"class{label}"
            d.mkdir(parents=True)
            images = digits.images[digits.target == label][lo:hi]
            for i, img in enumerate(images):
                Image.fromarray((img * 16).clip(0, 255).astype(np.uint8), "L").save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_state_dict(build_model("digits_cnn", 2).state_dict(), path)
    return path


def prune_args(
    ckpt: Path, dataset: str, out: Path, *extra: str, arch: str = "digits_cnn", classes: int = 2
) -> list[str]:
    return [
        "prune",
        "--arch",
        arch,
        "--num-classes",
        str(classes),
        "--checkpoint",
        str(ckpt),
        "--dataset",
        dataset,
        "--sparsity",
        "0.5",
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def refused(capsys, argv: list[str], *needles: str, out: Path | None = None) -> str:
    """Runs the CLI; asserts exit 2, one line on stderr naming every needle, no traceback, nothing written."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    if out is not None:
        assert not out.exists(), "an output directory was created"
        assert not state_dir_for(out).exists(), "training started (a run state was written)"
    return err


@pytest.mark.slow
def test_hidden_macos_files_are_ignored_and_the_run_succeeds(folder, ckpt2, tmp_path, capsys):
    junk = tmp_path / "junk"
    import shutil

    shutil.copytree(folder, junk)
    for cls in (junk / "train").iterdir():
        (cls / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # AppleDouble resource fork
        (cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    (junk / "train" / ".ipynb_checkpoints").mkdir()
    out = tmp_path / "out"
    assert main(prune_args(ckpt2, f"imagefolder:{junk}", out)) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").exists() and not state_dir_for(out).exists()


@pytest.mark.slow
def test_a_truncated_image_is_named_before_training_and_can_be_skipped(folder, ckpt2, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    victim = bad / "train" / "class1" / "3.png"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    refused(capsys, prune_args(ckpt2, f"imagefolder:{bad}", out), "3.png", "--skip-bad-images", out=out)
    assert main(prune_args(ckpt2, f"imagefolder:{bad}", out, "--skip-bad-images")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and any("3.png" in f for f in metrics["skipped_image_files"])


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--device", "gpu"], ["device 'gpu'", "cuda"]),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["device 'cuda"]),
        (
            ["--amp", "fp16"] if not torch.cuda.is_available() else ["--amp", "fp16", "--device", "cpu"],
            ["amp 'fp16'", "CUDA"],
        ),
        (["--batch-size", "1"], ["batch_size 1", "BatchNorm", "--batch-size 2"]),
        (["--image-size", "40", "--batch-size", "8"], ["cannot run on 40x40"]),
    ],
)
def test_machine_and_model_misfits_are_refused_before_training(folder, ckpt2, tmp_path, capsys, extra, needles):
    out = tmp_path / "out"
    arch, ckpt = "digits_cnn", ckpt2
    if "--batch-size" in extra or "--image-size" in extra:
        # a BatchNorm model, and one whose input size is fixed (a ViT takes 224 only)
        arch = "torchvision/resnet18" if "--batch-size" in extra and "1" in extra else "torchvision/vit_b_32"
        ckpt = tmp_path / "arch.safetensors"
        save_state_dict(build_model(arch, 2).state_dict(), ckpt)
    refused(capsys, prune_args(ckpt, f"imagefolder:{folder}", out, *extra, arch=arch), *needles, out=out)


def test_an_output_path_under_a_file_is_refused_before_training(folder, ckpt2, tmp_path, capsys):
    (tmp_path / "results.txt").write_text("notes")
    out = tmp_path / "results.txt" / "pruned"
    refused(capsys, prune_args(ckpt2, f"imagefolder:{folder}", out), "results.txt", "is a file")
    assert (tmp_path / "results.txt").read_text() == "notes"
    refused(capsys, prune_args(ckpt2, f"imagefolder:{folder}", tmp_path / "results.txt"), "is a file")


def test_a_checkpoint_with_nan_is_refused_by_prune_and_evaluate(folder, tmp_path, capsys):
    state = build_model("digits_cnn", 2).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_state_dict(state, bad)
    out = tmp_path / "out"
    refused(capsys, prune_args(bad, f"imagefolder:{folder}", out), name, "NaN", out=out)
    refused(
        capsys,
        [
            "evaluate",
            "--arch",
            "digits_cnn",
            "--num-classes",
            "2",
            "--checkpoint",
            str(bad),
            "--dataset",
            f"imagefolder:{folder}",
        ],
        name,
    )


@pytest.mark.parametrize(
    "content, needles",
    [
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1234\n",
            ["Git LFS", "git lfs pull"],
        ),
        (b"<!DOCTYPE html><html><head><title>Download</title></head><body>sign in</body></html>", ["HTML"]),
    ],
)
def test_files_that_are_not_checkpoints_are_named_for_what_they_are(folder, tmp_path, capsys, content, needles):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    refused(
        capsys, prune_args(path, f"imagefolder:{folder}", tmp_path / "out"), str(path), *needles, out=tmp_path / "out"
    )


@pytest.mark.slow
def test_a_safetensors_file_named_bin_loads_and_fp16_stays_fp16(folder, tmp_path, capsys):
    state = {
        k: (v.half() if v.is_floating_point() else v) for k, v in build_model("digits_cnn", 2).state_dict().items()
    }
    path = tmp_path / "model.bin"
    save_state_dict(state, path)
    out = tmp_path / "out"
    assert main(prune_args(path, f"imagefolder:{folder}", out)) == 0, capsys.readouterr().err
    pruned = read_state_dict(out / "model.safetensors")
    assert {k: v.dtype for k, v in pruned.items()} == {k: v.dtype for k, v in state.items()}
    assert json.loads((out / "metrics.json").read_text())["dtype"] == "float16"


def test_googlenet_and_inception_prune_on_their_main_logits_or_are_refused_by_input_size(folder, tmp_path, capsys):
    from dg2pf_core.algorithm.config import DG2PFConfig
    from dg2pf_core.job import PruneJob, prepare

    for arch, size, ok in (("torchvision/googlenet", 32, True), ("torchvision/inception_v3", 32, False)):
        ckpt = tmp_path / f"{arch.split('/')[1]}.safetensors"
        state = build_model(arch, 2).state_dict()
        # a checkpoint with its auxiliary heads, as torchvision's training-mode models save them
        state.update({"aux1.fc2.weight" if "google" in arch else "AuxLogits.fc.weight": torch.zeros(2, 8)})
        save_state_dict(state, ckpt)
        job = PruneJob(
            arch, 2, str(ckpt), f"imagefolder:{folder}", DG2PFConfig(sparsity=0.5, batch_size=4), image_size=size
        )
        if ok:
            assert prepare(job).model.training is not None  # the dry forward + backward passed
        else:
            refused(
                capsys,
                prune_args(ckpt, f"imagefolder:{folder}", tmp_path / "o", "--image-size", str(size), arch=arch),
                "cannot run on 32x32",
            )


def test_relative_paths_become_absolute_before_anything_leaves_the_process(folder, ckpt2, tmp_path, monkeypatch):
    from dg2pf_core.algorithm.config import DG2PFConfig
    from dg2pf_core.job import PruneJob

    monkeypatch.chdir(ckpt2.parent.parent)
    job = PruneJob(
        "digits_cnn",
        2,
        f"{ckpt2.parent.name}/{ckpt2.name}",
        f"imagefolder:{os.path.relpath(folder)}",
        DG2PFConfig(sparsity=0.5),
    )
    monkeypatch.chdir(tmp_path)
    again = PruneJob.from_dict(job.to_dict())
    assert Path(again.checkpoint) == ckpt2 and again.dataset == f"imagefolder:{folder}"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from dg2pf_cli.main import main; sys.exit(main(sys.argv[1:]))", *args]


@pytest.mark.slow
def test_a_write_failure_after_training_keeps_the_state_and_resume_finishes(folder, ckpt2, tmp_path, capsys):
    from dg2pf_core.algorithm.config import DG2PFConfig
    from dg2pf_core.errors import DG2PFError
    from dg2pf_core.job import PruneJob, prune_to_dir

    out = tmp_path / "out"
    state_dir = state_dir_for(out)
    job = PruneJob(
        "digits_cnn",
        2,
        str(ckpt2),
        f"imagefolder:{folder}",
        DG2PFConfig(sparsity=0.5, pruning_epochs=2, max_epochs=3, patience=1),
    )
    # After the preflight, something takes the output's place (a file): writing the results fails late.
    with pytest.raises(DG2PFError) as info:
        prune_to_dir(job, out, state_dir=state_dir, on_prepared=lambda _: out.write_text("in the way"))
    assert f"--resume {state_dir}" in info.value.message and (state_dir / "train_state.pt").is_file()
    out.unlink()
    assert main(["prune", "--resume", str(state_dir), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and not state_dir.exists()


@pytest.mark.slow
def test_ctrl_c_keeps_the_state_and_resume_gives_the_uninterrupted_result(folder, ckpt2, tmp_path):
    args = prune_args(ckpt2, f"imagefolder:{folder}", tmp_path / "out", "--threads", "1")
    args[args.index("--max-epochs") + 1] = "8"
    args[args.index("--pruning-epochs") + 1] = "4"
    state_dir = state_dir_for(tmp_path / "out")
    # A terminal's foreground job has Ctrl-C's default disposition; a CI started in the background
    # (`cmd &`) passes SIGINT ignored down to every child, so the test gives it back explicitly.
    proc = subprocess.Popen(
        _cli(*args),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (state_dir / "train_state.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"--resume {state_dir}" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    resumed = subprocess.run(
        _cli("prune", "--resume", str(state_dir), "--quiet", "--threads", "1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    reference = args.copy()
    reference[reference.index("--out") + 1] = str(tmp_path / "reference")
    assert subprocess.run(_cli(*reference), capture_output=True, timeout=300).returncode == 0
    a, b = (
        read_state_dict(tmp_path / "out" / "model.safetensors"),
        read_state_dict(tmp_path / "reference" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--image-size", "100000"], ["--image-size: must be in [8, 2048]"]),
        (["--image-size", "0"], ["--image-size: must be in [8, 2048]"]),
        (["--seed", str(10**24)], ["seed"]),
        (["--include", "no_such_layer"], ["no_such_layer"]),
        (["--workers", "0"], ["--workers must be >= 1"]),
        (["--sparsity=nan"], ["sparsity"]),
        (["--batch-size", "x"], ["invalid int value", "--help"]),
        (["--granularity", "2-4"], ["granularity", "'2:4'"]),
        (["--granularity", "1:4"], ["granularity", "set sparsity to 0.75"]),
    ],
)
def test_out_of_range_values_are_refused_before_anything_is_built(folder, ckpt2, tmp_path, capsys, extra, needles):
    out = tmp_path / "out"
    argv = prune_args(ckpt2, f"imagefolder:{folder}", out, *extra)
    if "--sparsity=nan" in extra:
        argv.remove("--sparsity")
        argv.remove("0.5")
    if "--batch-size" in extra:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
        return
    refused(capsys, argv, *needles, out=out)


@pytest.mark.slow
def test_a_granularity_a_tensor_cannot_take_is_refused_before_training_and_exclude_fixes_it(
    folder, ckpt2, tmp_path, capsys
):
    out = tmp_path / "out"
    # digits_cnn's first convolution has 1 input channel: not whole groups of 4
    refused(
        capsys,
        prune_args(ckpt2, f"imagefolder:{folder}", out, "--granularity", "2:4"),
        "granularity 2:4",
        "features.0.weight (32x1x3x3: 1 input channel)",
        r"--exclude '^features\.0\.weight$'",
        out=out,
    )
    assert (
        main(
            prune_args(
                ckpt2, f"imagefolder:{folder}", out, "--granularity", "2:4", "--exclude", r"^features\.0\.weight$"
            )
        )
        == 0
    ), capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["granularity"] == "2:4" and metrics["nm_violations"] == 0 and metrics["sparsity_prunable"] == 0.5
    assert "features.0.weight" not in metrics["layer_sparsity"]


def test_a_huge_class_count_is_refused_without_building_the_classifier(folder, ckpt2, tmp_path, capsys):
    started = time.time()
    refused(
        capsys, prune_args(ckpt2, f"imagefolder:{folder}", tmp_path / "out", classes=10**9), "--num-classes", "100,000"
    )
    assert time.time() - started < 20


def test_a_finite_checkpoint_that_gives_nan_in_eval_mode_is_refused_by_prune_and_evaluate(folder, tmp_path, capsys):
    state = build_model("digits_cnn", 2).state_dict()
    var = next(k for k in state if k.endswith("running_var"))
    state[var] = -torch.ones_like(state[var])  # finite, but sqrt(-1) in eval-mode BatchNorm
    bad = tmp_path / "negvar.safetensors"
    save_state_dict(state, bad)
    out = tmp_path / "out"
    refused(capsys, prune_args(bad, f"imagefolder:{folder}", out), "non-finite logits in eval mode", out=out)
    refused(
        capsys,
        [
            "evaluate",
            "--arch",
            "digits_cnn",
            "--num-classes",
            "2",
            "--checkpoint",
            str(bad),
            "--dataset",
            f"imagefolder:{folder}",
        ],
        "non-finite logits in eval mode",
    )


@pytest.mark.slow
def test_evaluate_refuses_an_input_size_the_model_cannot_take(folder, tmp_path, capsys):
    ckpt = tmp_path / "vit.safetensors"
    save_state_dict(build_model("torchvision/vit_b_32", 2).state_dict(), ckpt)
    refused(
        capsys,
        [
            "evaluate",
            "--arch",
            "torchvision/vit_b_32",
            "--num-classes",
            "2",
            "--checkpoint",
            str(ckpt),
            "--dataset",
            f"imagefolder:{folder}",
            "--image-size",
            "32",
        ],
        "cannot run on 32x32",
    )


@pytest.mark.slow
def test_output_locations_the_results_cannot_be_renamed_into_are_refused_and_links_are_followed(
    folder, ckpt2, tmp_path, capsys, monkeypatch
):
    refused(capsys, prune_args(ckpt2, f"imagefolder:{folder}", Path("/")), "root directory")
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    refused(capsys, prune_args(ckpt2, f"imagefolder:{folder}", Path(".")), "current directory")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    refused(
        capsys, prune_args(ckpt2, f"imagefolder:{folder}", tmp_path / "dangling"), "symbolic link", "does not exist"
    )
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert main(prune_args(ckpt2, f"imagefolder:{folder}", tmp_path / "link")) == 0, capsys.readouterr().err
    assert (target / "model.safetensors").is_file() and (tmp_path / "link").is_symlink()


def test_a_second_run_for_the_same_output_is_refused_while_the_first_trains(folder, ckpt2, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    state_dir = state_dir_for(out)
    state_dir.mkdir()
    with open(state_dir / ".lock", "a+") as held:  # the first run's hold
        fcntl.flock(held, fcntl.LOCK_EX)
        refused(capsys, prune_args(ckpt2, f"imagefolder:{folder}", out), "another dg2pf run is training")
    assert not out.exists() and not (state_dir / "train_state.pt").exists()


class _StopAt:
    """A progress listener that raises ``error`` at the end of epoch ``epoch`` (what the loop itself
    raises when the loss diverges, or a Ctrl-C arriving then)."""

    def __init__(self, epoch: int, error: BaseException) -> None:
        self.epoch, self.error = epoch, error

    def start_epoch(self, *args) -> None:
        pass

    def batch(self, loss: float) -> None:
        pass

    def end_epoch(self, record) -> None:
        if record.epoch >= self.epoch:
            raise self.error


@pytest.mark.slow
def test_a_diverged_run_leaves_no_state_to_resume_so_starting_again_is_not_blocked(folder, ckpt2, tmp_path, capsys):
    from dg2pf_core.algorithm.config import DG2PFConfig
    from dg2pf_core.errors import TrainingDiverged
    from dg2pf_core.job import PruneJob, prune_to_dir

    out = tmp_path / "out"
    job = PruneJob("digits_cnn", 2, str(ckpt2), f"imagefolder:{folder}", DG2PFConfig(sparsity=0.5, pruning_epochs=3))
    with pytest.raises(TrainingDiverged):
        prune_to_dir(
            job, out, progress=_StopAt(1, TrainingDiverged("training loss became nan")), state_dir=state_dir_for(out)
        )
    assert not state_dir_for(out).exists() and not out.exists()  # resuming would diverge again
    assert main(prune_args(ckpt2, f"imagefolder:{folder}", out)) == 0


def test_resume_from_a_damaged_state_says_so_in_one_line(folder, ckpt2, tmp_path, capsys):
    out = tmp_path / "out"
    state_dir = state_dir_for(out)
    from dg2pf_core.algorithm.config import DG2PFConfig
    from dg2pf_core.job import PruneJob, prune_to_dir

    job = PruneJob("digits_cnn", 2, str(ckpt2), f"imagefolder:{folder}", DG2PFConfig(sparsity=0.5, pruning_epochs=3))
    with pytest.raises(KeyboardInterrupt):
        prune_to_dir(job, out, progress=_StopAt(1, KeyboardInterrupt()), state_dir=state_dir)
    state = state_dir / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    err = refused(capsys, ["prune", "--resume", str(state_dir), "--quiet"], "truncated or corrupt", "start it again")
    assert "--resume" not in err


def test_a_latency_batch_too_large_is_refused_before_the_data_loads(monkeypatch, tmp_path):
    from dg2pf_core import DG2PFConfig, PruneJob
    from dg2pf_core.errors import ConfigError
    from dg2pf_core.io.export import write_model
    from dg2pf_core.job import preflight

    def no_data(*_a, **_k):
        raise AssertionError("the data was loaded before the latency batch was checked")

    monkeypatch.setattr(preflight, "load_data", no_data)
    config = DG2PFConfig(granularity="channel", latency_budget_ms=1.0, latency_batch_size=4096)
    write_model(build_model("cifar/resnet18", 10), tmp_path / "m.safetensors")
    job = PruneJob("cifar/resnet18", 10, str(tmp_path / "m.safetensors"), "digits", config, image_size=147)
    with pytest.raises(ConfigError, match="latency_batch_size 4096 at 147x147") as e:
        preflight.prepare(job, dry=True)
    assert e.value.field == "latency_batch_size"
