"""InferenceModel: a finished job's model and preprocessing, as the serving replicas use them."""

from __future__ import annotations

import dataclasses
import io

import PIL.Image
import pytest
import torch

from dg2pf_core.data import DataRequest, eval_transform_for, load_dataset
from dg2pf_core.data.digits import write_test_digit_images
from dg2pf_core.errors import DatasetError, InputError
from dg2pf_core.io.inference import InferenceModel
from dg2pf_core.job import load_model


@pytest.fixture(scope="module")
def served(digits_example) -> InferenceModel:
    return InferenceModel.load(digits_example)


def test_load_matches_the_checkpoint_and_the_dataset(served, digits_example):
    _, reference = load_model("digits_cnn", 10, digits_example / "model.safetensors")
    x = torch.randn(3, *served.input_shape)
    assert torch.equal(served.logits(x), reference.eval()(x).detach())
    assert served.input_shape == (1, 16, 16) and served.num_classes == 10


def test_eval_transform_is_rebuilt_without_the_data(tmp_path):
    request = DataRequest(image_size=16, in_channels=1)
    splits = load_dataset("digits", request)
    image = PIL.Image.open(write_test_digit_images(tmp_path, count=1)[0][0])
    assert torch.equal(eval_transform_for("digits", request)(image), splits.eval_transform(image))
    # Datasets that need a path get their transform from the name alone: the path is not read.
    rgb = PIL.Image.new("RGBA", (40, 30), (200, 10, 10, 255))
    assert eval_transform_for("cifar10:/nowhere", DataRequest(32, 3))(rgb).shape == (3, 32, 32)
    assert eval_transform_for("imagefolder:/nowhere", DataRequest(64, 3))(rgb).shape == (3, 64, 64)
    with pytest.raises(DatasetError, match="unknown dataset"):
        eval_transform_for("svhn", request)


def test_images_are_preprocessed_like_the_dataset(served, tmp_path):
    splits = load_dataset("digits", DataRequest(image_size=16, in_channels=1))
    for k, (path, label) in enumerate(write_test_digit_images(tmp_path, count=4)):
        x = served.image_input(open(path, "rb").read())
        expected, expected_label = splits.test[k]
        assert label == expected_label and (x - expected).abs().max() < 0.02  # 8-bit rounding only


def test_top_k_is_sorted_labelled_and_capped(served):
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 2.0]])
    assert [p.label for p in served.top_k(logits, 2)[0]] == [None, None]  # the example records no class names
    served = dataclasses.replace(served, class_names=[str(d) for d in range(10)])
    top = served.top_k(logits, 3)[0]
    assert [p.index for p in top] == [1, 9, 2] and [p.label for p in top] == ["1", "9", "2"]
    assert top[0].probability == pytest.approx(float(torch.softmax(logits, 1)[0, 1]))
    assert len(served.top_k(logits, 50)[0]) == 10


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([], "non-empty list"),
        ("abc", "non-empty list"),
        ([[[1.0, 2.0], [3.0]]], "rectangular"),
        ([[["a"] * 16] * 16], "rectangular"),
        (torch.zeros(1, 3, 16, 16).tolist(), "1 x 16 x 16"),
        (torch.zeros(16, 16).tolist(), "1 x 16 x 16"),
        (torch.full((1, 1, 16, 16), float("nan")).tolist(), "NaN"),
    ],
)
def test_bad_tensor_inputs_are_named(served, inputs, message):
    with pytest.raises(InputError, match=message):
        served.tensor_inputs(inputs)


def test_bad_images_are_named(served):
    with pytest.raises(InputError, match="not a readable image"):
        served.image_input(b"definitely not an image")
    gif = io.BytesIO()
    PIL.Image.new("L", (8, 8)).save(gif, format="GIF")
    with pytest.raises(InputError, match="PNG or JPEG"):
        served.image_input(gif.getvalue())
    png = io.BytesIO()
    PIL.Image.frombytes("L", (64, 64), bytes(range(256)) * 16).save(png, format="PNG")
    with pytest.raises(InputError, match="could not be decoded"):
        served.image_input(png.getvalue()[: len(png.getvalue()) // 2])  # truncated: header fine, data cut
    big = io.BytesIO()
    PIL.Image.new("1", (5000, 5000)).save(big, format="PNG")
    with pytest.raises(InputError, match="at most"):
        served.image_input(big.getvalue())
