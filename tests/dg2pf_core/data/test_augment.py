"""Training augmentation by policy (``DataRequest.augment``): what each policy does to an image, the
default each dataset picks, and that evaluation and serving preprocess alike whatever the policy."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms as T

from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.data import AUGMENT_POLICIES, DataRequest, augment_for, dataset_names, eval_transform_for, load_dataset
from dg2pf_core.data.registry import needs_path
from dg2pf_core.data.transforms import (
    augment_padding,
    cifar_transforms,
    grayscale_shift_transforms,
    imagenet_transforms,
)
from dg2pf_core.errors import DatasetError
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.job import PruneJob
from dg2pf_core.models import build_model

# (recipe, image_size, in_channels, source image side, padding of the cifar/shift policies)
RECIPES = {
    "cifar10": (cifar_transforms, 32, 3, 32, 4),
    "imagefolder": (imagenet_transforms, 32, 3, 40, 4),
    "mnist": (lambda r: grayscale_shift_transforms(r, 0.1307, 0.3081), 28, 1, 28, 2),
}


def noise_image(side: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    """Random pixels: no two shifts or flips of it look alike."""
    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode=mode)


def shift_of(x: torch.Tensor, e: torch.Tensor, padding: int, fill: torch.Tensor) -> tuple[int, int] | None:
    """``(dy, dx)`` with ``x[:, i, j] == e[:, i + dy, j + dx]`` (``fill`` outside ``e``), |dy|, |dx| <= padding."""
    size = e.shape[-1]
    for dy in range(-padding, padding + 1):
        for dx in range(-padding, padding + 1):
            expected = fill.view(-1, 1, 1).expand_as(e).clone()
            ys, xs = slice(max(0, -dy), min(size, size - dy)), slice(max(0, -dx), min(size, size - dx))
            expected[:, ys, xs] = e[:, ys.start + dy : ys.stop + dy, xs.start + dx : xs.stop + dx]
            if torch.allclose(x, expected, atol=1e-6):
                return dy, dx
    return None


def recipe(name: str, augment: str | None):
    build, size, channels, side, padding = RECIPES[name]
    train, evaluate = build(DataRequest(size, channels, augment=augment))
    return train, evaluate, noise_image(side, "RGB" if channels == 3 else "L"), padding


def normalised_range(evaluate, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, what black and white become: every output value lies between them."""
    black = evaluate(PIL.Image.new("RGB", (side, side), (0, 0, 0)))[:, 0, 0]
    white = evaluate(PIL.Image.new("RGB", (side, side), (255, 255, 255)))[:, 0, 0]
    return black, white


# ----------------------------------------------------------------------------- the policies


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_every_policy_gives_the_model_its_shape_and_values_in_range(name, policy):
    train, evaluate, image, _ = recipe(name, policy)
    _, size, channels, side, _ = RECIPES[name]
    torch.manual_seed(0)
    black, white = normalised_range(evaluate, side)
    for _ in range(10):
        x = train(image)
        assert x.shape == (channels, size, size) and x.dtype == torch.float32
        assert ((x >= black.view(-1, 1, 1) - 1e-5) & (x <= white.view(-1, 1, 1) + 1e-5)).all()


@pytest.mark.parametrize("name", RECIPES)
def test_shift_is_a_pure_shift_of_the_eval_image_by_at_most_the_padding_and_never_flips(name):
    train, evaluate, image, padding = recipe(name, "shift")
    e = evaluate(image)
    fill, _ = normalised_range(evaluate, RECIPES[name][3])
    torch.manual_seed(0)
    shifts = [shift_of(train(image), e, padding, fill) for _ in range(20)]
    assert None not in shifts  # every one a shift, none mirrored
    assert len(set(shifts)) > 1  # and it does move the image


@pytest.mark.parametrize("name", RECIPES)
def test_cifar_is_a_shift_and_sometimes_a_mirror_of_the_eval_image(name):
    train, evaluate, image, padding = recipe(name, "cifar")
    e = evaluate(image)
    fill, _ = normalised_range(evaluate, RECIPES[name][3])
    torch.manual_seed(0)
    flipped = 0
    for _ in range(20):
        x = train(image)
        if shift_of(x, e, padding, fill) is None:
            assert shift_of(x.flip(-1), e, padding, fill) is not None
            flipped += 1
    assert 0 < flipped < 20


@pytest.mark.parametrize("name", RECIPES)
def test_none_trains_on_the_eval_transform(name):
    train, evaluate, image, _ = recipe(name, "none")
    assert train is evaluate
    assert torch.equal(train(image), evaluate(image))


@pytest.mark.parametrize("name", RECIPES)
def test_imagenet_is_random_resized_crop_and_flip(name):
    train, _, _, _ = recipe(name, "imagenet")
    kinds = [type(t) for t in train.transforms]
    assert T.RandomResizedCrop in kinds and T.RandomHorizontalFlip in kinds and T.RandomCrop not in kinds


def test_padding_scales_with_the_image():
    assert augment_padding(32) == 4 and augment_padding(64) == 8 and augment_padding(8) == 1
    assert augment_padding(28, per=14) == 2 and augment_padding(4) == 1  # at least a pixel


# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    "spec, size, expected",
    [
        ("imagefolder:/x", 32, "cifar"),  # RandomResizedCrop down to 8% would leave a 9 px crop of a 32 px image
        ("imagefolder:/x", 95, "cifar"),
        ("imagefolder:/x", 96, "imagenet"),
        ("imagefolder:/x", 224, "imagenet"),
        ("cifar10:/x", 32, "cifar"),
        ("cifar10:/x", 224, "cifar"),
        ("mnist:/x", 28, "shift"),
        ("fashion-mnist:/x", 28, "shift"),
        ("digits", 16, "none"),  # 8x8 digits: a shift or flip changes the digit (and the demo stays fast)
    ],
)
def test_default_policy_by_dataset_and_size(spec, size, expected):
    assert augment_for(spec, DataRequest(size, 3)) == expected
    assert augment_for(spec, DataRequest(size, 3, augment="auto")) == expected
    for policy in AUGMENT_POLICIES:  # the option overrides every default
        assert augment_for(spec, DataRequest(size, 3, augment=policy)) == policy


@pytest.mark.parametrize("bad", ["randaugment", "CIFAR", "", 3])
def test_an_unknown_policy_is_refused_naming_the_valid_ones(bad, tmp_path):
    request = DataRequest(32, 3, augment=bad)
    for call in (
        lambda: load_dataset("digits", request),
        lambda: eval_transform_for("cifar10:/x", request),
        lambda: augment_for("digits", request),
    ):
        with pytest.raises(DatasetError) as info:
            call()
        assert info.value.field == "augment"
        assert all(name in info.value.message for name in ("auto", *AUGMENT_POLICIES))


# ----------------------------------------------------------------------------- eval and serving unchanged


@pytest.mark.parametrize("name", sorted(dataset_names()))
def test_the_eval_transform_is_the_same_whatever_the_policy(name):
    spec = f"{name}:/nowhere" if needs_path(name) else name
    for size, channels in ((32, 3), (28, 1)):
        reference = eval_transform_for(spec, DataRequest(size, channels))
        image = noise_image(40)
        for policy in ("auto", *AUGMENT_POLICIES):
            other = eval_transform_for(spec, DataRequest(size, channels, augment=policy))
            assert repr(other) == repr(reference)
            assert torch.equal(other(image), reference(image))


@pytest.fixture(scope="module")
def small_imagefolder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for n in range(5):
            noise_image(40, seed=10 * n + len(label) + ord(label)).save(root / "train" / label / f"{n}.png")
    return root


def test_imagefolder_at_32_px_trains_with_cifar_crops_not_random_resized_crops(small_imagefolder):
    splits = load_dataset(f"imagefolder:{small_imagefolder}", DataRequest(32, 3, val_fraction=0.2))
    assert splits.augment == "cifar"
    kinds = [type(t) for t in splits.train.dataset.transform.transforms]
    assert T.RandomResizedCrop not in kinds and T.RandomCrop in kinds
    # a training image is the same image as evaluated, shifted by at most 4 px (or mirrored)
    index = splits.train.indices[0]
    image, _ = splits.train.dataset.base[index]
    e = splits.eval_transform(image)
    fill = splits.eval_transform(PIL.Image.new("RGB", (40, 40)))[:, 0, 0]
    torch.manual_seed(0)
    x, _ = splits.train[0]
    assert shift_of(x, e, 4, fill) is not None or shift_of(x.flip(-1), e, 4, fill) is not None
    large = load_dataset(f"imagefolder:{small_imagefolder}", DataRequest(96, 3, val_fraction=0.2))
    assert large.augment == "imagenet"


@pytest.mark.parametrize("spec", ["digits", "imagefolder"])
def test_a_loaded_dataset_evaluates_and_serves_alike_whatever_the_policy(spec, small_imagefolder):
    spec = f"imagefolder:{small_imagefolder}" if spec == "imagefolder" else spec
    image = noise_image(40)
    loads = {p: load_dataset(spec, DataRequest(32, 3, val_fraction=0.2, augment=p)) for p in AUGMENT_POLICIES}
    reference = loads["none"]
    for policy, splits in loads.items():
        assert splits.augment == policy
        assert torch.equal(splits.eval_transform(image), reference.eval_transform(image))
        for split in ("val", "test"):
            if getattr(reference, split) is not None:
                assert torch.equal(getattr(splits, split)[0][0], getattr(reference, split)[0][0])


def test_digits_trains_unaugmented_by_default_and_shifts_when_asked():
    plain = load_dataset("digits", DataRequest(16, 1))
    assert plain.augment == "none"
    assert torch.equal(plain.train[0][0], plain.train[0][0])  # no randomness
    shifted = load_dataset("digits", DataRequest(16, 1, augment="shift"))
    background = plain.train[0][0].min().reshape(1)  # the empty ground, normalised
    torch.manual_seed(0)
    moves = set()
    for i in range(10):
        move = shift_of(shifted.train[i][0], plain.train[i][0], augment_padding(16), background)
        assert move is not None
        moves.add(move)
    assert len(moves) > 1


# ----------------------------------------------------------------------------- the job, the CLI, the spec


def test_the_job_carries_the_policy_through_its_records():
    job = PruneJob("digits_cnn", 10, "/x/model.safetensors", "digits", DG2PFConfig(sparsity=0.5), augment="shift")
    assert PruneJob.from_dict(json.loads(json.dumps(job.to_dict()))).augment == "shift"
    old = {k: v for k, v in job.to_dict().items() if k != "augment"}  # a state file written before the option
    assert PruneJob.from_dict(old).augment is None


def test_the_job_spec_offers_the_policies_and_hands_them_to_the_job():
    from pydantic import ValidationError

    from dg2pf_contract import job as spec_module
    from dg2pf_core.job import PruneJob

    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "c"},
        "dataset": {"spec": "digits"},
        "sparsity": 0.5,
    }
    schema = spec_module.DatasetSpec.model_json_schema()["properties"]["augment"]
    assert schema["enum"] == ["auto", *AUGMENT_POLICIES] and schema["default"] == "auto"
    assert PruneJob.from_spec(spec_module.JobSpec(**doc), "/c").augment is None
    for policy in AUGMENT_POLICIES:
        job = PruneJob.from_spec(spec_module.JobSpec(**{**doc, "dataset": {"spec": "digits", "augment": policy}}), "/c")
        assert job.augment == policy
    with pytest.raises(ValidationError) as info:
        spec_module.JobSpec(**{**doc, "dataset": {"spec": "digits", "augment": "randaugment"}})
    assert info.value.errors()[0]["loc"] == ("dataset", "augment")


def test_the_job_spec_and_the_library_share_the_image_size_bounds():
    from pydantic import ValidationError

    from dg2pf_contract.job import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, JobSpec
    from dg2pf_core.job import PruneJob

    doc = {"model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "c"}, "sparsity": 0.5}
    for size in (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE):  # what `dg2pf prune --image-size` takes, the API takes
        assert (
            PruneJob.from_spec(JobSpec(**doc, dataset={"spec": "digits", "image_size": size}), "/c").image_size == size
        )
    for size in (MIN_IMAGE_SIZE - 1, MAX_IMAGE_SIZE + 1):
        with pytest.raises(ValidationError) as info:
            JobSpec(**doc, dataset={"spec": "digits", "image_size": size})
        assert info.value.errors()[0]["loc"] == ("dataset", "image_size")


def dg2pf(*args: str) -> subprocess.CompletedProcess:
    from dg2pf_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    torch.manual_seed(0)
    save_state_dict(build_model("digits_cnn", 10).state_dict(), path)
    return path


def prune_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
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
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, needle",
    [(["--augment", "randaugment"], "--augment"), (["--resume", "somewhere", "--augment", "cifar"], "--augment")],
)
def test_the_cli_refuses_a_bad_policy_in_one_line(untrained_ckpt, tmp_path, extra, needle):
    out = tmp_path / "out"
    args = prune_args(untrained_ckpt, out, *extra)
    if "--resume" in extra:
        args = ["prune", *extra]
    result = dg2pf(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_metrics_record_the_policy_trained_with(untrained_ckpt, tmp_path):
    result = dg2pf(*prune_args(untrained_ckpt, tmp_path / "shift", "--augment", "shift"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "shift" / "metrics.json").read_text())["augment"] == "shift"
    result = dg2pf(*prune_args(untrained_ckpt, tmp_path / "auto"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["augment"] == "none"  # digits' default
