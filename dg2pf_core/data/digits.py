"""``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 images, no download).

Small enough to train a pruning run in seconds on a CPU, which makes it the dataset for demos,
smoke tests and CI. All images are preprocessed once into one in-memory tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T

from dg2pf_contract.job import AUTO
from dg2pf_core.data.registry import DataSplits, register_dataset
from dg2pf_core.data.request import DataRequest
from dg2pf_core.data.splits import hold_out
from dg2pf_core.data.transforms import ConvertMode, augment_padding, augmentation
from dg2pf_core.errors import DatasetError

NATIVE_SIZE = 8
# The train/test split is part of the dataset's definition, not of a run: a fixed seed keeps the
# test set the same whatever request.seed is, so results stay comparable across runs.
TEST_SPLIT_SEED = 20240607
TEST_FRACTION = 0.2  # 360 of 1797 images
# Mean and std of all 1797 * 64 pixels after scaling 0..16 to [0, 1], computed once with
# load_digits() (0.305260, 0.376049). Hard-coded so that serving needs no dataset at hand.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


def _to_model_input(pixels: torch.Tensor, request: DataRequest) -> torch.Tensor:
    """``[N, 8, 8]`` in [0, 1] -> ``[N, 1, S, S]`` normalised: the one path every image takes.

    Channels are replicated per item (``_with_channels``), so a 3-channel request at 224 pixels
    does not triple the memory of the preprocessed array.
    """
    x = pixels.to(torch.float32).unsqueeze(1)
    if request.image_size != NATIVE_SIZE:
        x = F.interpolate(x, size=(request.image_size, request.image_size), mode="bilinear", align_corners=False)
    return (x - DIGITS_MEAN) / DIGITS_STD


def _with_channels(image: torch.Tensor, in_channels: int) -> torch.Tensor:
    return image.expand(in_channels, -1, -1) if in_channels != image.shape[0] else image


class DigitsEvalTransform:
    """A user's digit image -> the tensor the model saw for the dataset's images.

    The image is area-averaged down to 8x8 first, because that is how the dataset itself was made
    (counts of 4x4 blocks of a 32x32 bitmap); it then takes the same upscaling path as the data.
    """

    def __init__(self, request: DataRequest) -> None:
        self.request = request

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        # ConvertMode, not convert("L"): 16-bit and transparent images come out as in other datasets
        gray = ConvertMode(1)(image).resize((NATIVE_SIZE, NATIVE_SIZE), PIL.Image.BOX)
        pixels = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
        # The dataset has light strokes on a dark ground; a photo or scan of ink on paper is the
        # reverse, and a mostly-light image can only be that.
        if pixels.mean() > 0.5:
            pixels = 1.0 - pixels
        image = _to_model_input(pixels.unsqueeze(0), self.request)[0]
        return _with_channels(image, self.request.in_channels).contiguous()

    def __repr__(self) -> str:
        r = self.request
        return f"DigitsEvalTransform(image_size={r.image_size}, in_channels={r.in_channels})"


# Preprocess every image once when the result is at most this big; above it (large image sizes:
# 1797 images at 2048 px would be 30 GB), each item is preprocessed when read, from its 8x8 pixels,
# by the same ``_to_model_input`` (identical values either way).
EAGER_BYTES = 256 * 1024**2


class _DigitImages(Dataset):
    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        in_channels: int,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        lazy: DataRequest | None = None,
    ) -> None:
        self.images = images  # [N, 1, S, S] preprocessed; with ``lazy``: [N, 8, 8] in [0, 1]
        self.labels = labels
        self.in_channels = in_channels
        self.augment = augment  # applied to the one-channel image, before the channels are copied
        self.lazy = lazy

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.lazy is not None:
            image = _to_model_input(image.unsqueeze(0), self.lazy)[0]
        if self.augment is not None:
            image = self.augment(image)
        return _with_channels(image, self.in_channels), int(self.labels[index])


def _train_augmentation(request: DataRequest) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``request.augment`` on the preprocessed ``[1, S, S]`` tensors; padding is the empty ground."""
    policy = request.augment if request.augment not in (None, AUTO) else "none"
    steps = augmentation(
        policy, request.image_size, augment_padding(request.image_size), fill=-DIGITS_MEAN / DIGITS_STD
    )
    return T.Compose(steps) if steps else None


@register_dataset(
    "digits",
    needs_path=False,
    help="scikit-learn's 1797 handwritten 8x8 digits, bundled offline; 10 classes",
    eval_transform=DigitsEvalTransform,
    default_augment="none",  # see load_digits
)
def load_digits(path: str | None, request: DataRequest) -> DataSplits:
    # Imported here: scikit-learn takes a second to import, and serving a model needs only the
    # eval transform above, not the dataset.
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    try:
        bunch = sklearn_load_digits()
    except OSError as exc:  # a broken scikit-learn install
        raise DatasetError(f"scikit-learn's bundled digits could not be read: {exc}") from exc
    labels = np.asarray(bunch.target, dtype=np.int64)
    indices = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        indices, test_size=TEST_FRACTION, stratify=labels, random_state=TEST_SPLIT_SEED
    )
    native = torch.from_numpy(bunch.images / 16.0)
    lazy = request if len(labels) * request.image_size**2 * 4 > EAGER_BYTES else None
    images = native if lazy is not None else _to_model_input(native, request)
    targets = torch.from_numpy(labels)

    # No augmentation by default (policy "none"): at 8x8 native resolution a crop or flip changes
    # the digit, and an augmentation-free train view keeps the demo runs fast and reproducible.
    train_all = _DigitImages(images[train_idx], targets[train_idx], request.in_channels, lazy=lazy)
    augmented = _DigitImages(
        images[train_idx], targets[train_idx], request.in_channels, _train_augmentation(request), lazy
    )
    train, val = hold_out(augmented, train_all, request.val_fraction, request.seed, targets[train_idx].tolist())
    test = _DigitImages(images[test_idx], targets[test_idx], request.in_channels, lazy=lazy)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        eval_transform=DigitsEvalTransform(request),
        description=f"digits: {len(train)} train / {len(val)} val / {len(test)} test, 10 classes",
    )


def write_test_digit_images(out_dir: str | os.PathLike, count: int = 8, scale: int = 4) -> list[tuple[str, int]]:
    """Write ``count`` images of the held-out test split as PNG files, dark ink on white paper.

    Each 8x8 digit is drawn at ``8 * scale`` pixels (nearest neighbour), so ``DigitsEvalTransform``'s
    box downscale and ink inversion recover the dataset's pixels up to 8-bit rounding: what a user
    sending a scanned digit to the served model does. Returns ``(path, true label)`` pairs.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    _, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=TEST_SPLIT_SEED
    )
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for n, i in enumerate(test_idx[:count]):
        ink = np.round(bunch.images[i] / 16.0 * 255.0).astype(np.uint8)
        image = PIL.Image.fromarray(255 - ink, mode="L").resize((NATIVE_SIZE * scale,) * 2, PIL.Image.NEAREST)
        path = os.path.join(os.fspath(out_dir), f"digit{n:02d}_label{labels[i]}.png")
        image.save(path)
        written.append((path, int(labels[i])))
    return written
