"""Preprocessing recipes shared by the loaders, and the dataset view that applies them.

Two recipes, as in the paper's experiments: CIFAR-style (pad-and-crop + flip on small images) and
ImageNet-style (random resized crop + flip; resize + center crop to evaluate). Each returns the
training transform and the eval transform; the eval transform is also what serving applies to a
user's image, so it starts by converting any PIL mode (RGBA, P, L, ...) to the one the model wants.

Everything here is a class or a torchvision transform, not a lambda, so the transforms pickle
(DataLoader workers, shipping a model's preprocessing to a serving process).
"""

from __future__ import annotations

from typing import Callable

import PIL.Image
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from dg2pf_core.data.registry import DataRequest

Transform = Callable[[PIL.Image.Image], torch.Tensor]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
# The exact per-pixel std of the CIFAR-10 training set; the popular (0.2023, 0.1994, 0.2010) is a
# long-propagated miscalculation.
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma weights: what PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


def channel_stats(
    mean: tuple[float, float, float], std: tuple[float, float, float], in_channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """RGB normalisation constants, or their grayscale counterpart for 1-channel models.

    The luma-weighted std is exact only for perfectly correlated channels; natural images come
    close enough that inputs still end up roughly unit-variance, which is all normalising needs.
    """
    if in_channels == 3:
        return tuple(mean), tuple(std)
    return (sum(w * m for w, m in zip(_LUMA, mean)),), (sum(w * s for w, s in zip(_LUMA, std)),)


class ConvertMode:
    """PIL image -> PIL image in ``"RGB"`` or ``"L"``, whatever mode it came in."""

    def __init__(self, in_channels: int) -> None:
        self.mode = "RGB" if in_channels == 3 else "L"

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def cifar_transforms(request: DataRequest) -> tuple[Transform, Transform]:
    """CIFAR-10 recipe: RandomCrop(32, padding=4) + horizontal flip; eval only normalises.

    Other sizes resize first and scale the padding with the image (4 pixels per 32).
    """
    size = request.image_size
    mean, std = channel_stats(CIFAR10_MEAN, CIFAR10_STD, request.in_channels)
    # Resize((s, s)) is a no-op on images already s x s, and brings a user's image at serving time
    # to the size the model saw.
    prefix = [ConvertMode(request.in_channels), T.Resize((size, size))]
    suffix = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose(
        prefix
        + [T.RandomCrop(size, padding=max(1, round(size / 8))), T.RandomHorizontalFlip()]
        + suffix
    )
    return train, T.Compose(prefix + suffix)


def imagenet_transforms(request: DataRequest) -> tuple[Transform, Transform]:
    """ImageNet recipe: RandomResizedCrop + flip; eval Resize(size * 256/224) + CenterCrop."""
    size = request.image_size
    mean, std = channel_stats(IMAGENET_MEAN, IMAGENET_STD, request.in_channels)
    convert = ConvertMode(request.in_channels)
    suffix = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([convert, T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + suffix)
    evaluate = T.Compose([convert, T.Resize(int(size * 256 / 224)), T.CenterCrop(size)] + suffix)
    return train, evaluate


class TransformedView(Dataset):
    """``base`` items ``(PIL image, label)`` seen through ``transform``.

    Lets one set of images serve as both the augmented training view and the eval-transform
    validation view without reading the file list twice.
    """

    def __init__(self, base: Dataset, transform: Transform) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), int(label)
