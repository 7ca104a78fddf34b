"""Preprocessing recipes shared by the loaders, and the dataset view that applies them.

Two recipes, as in the paper's experiments: CIFAR-style (pad-and-crop + flip on small images) and
ImageNet-style (random resized crop + flip; resize + center crop to evaluate), and a third for
grayscale small images (MNIST, Fashion-MNIST: pad-and-crop, no flip). Each returns the
training transform and the eval transform; the eval transform is also what serving applies to a
user's image, so it starts by converting any PIL mode (RGBA, P, L, 16-bit, ...) to the one the model
wants (``ConvertMode``).

The training transform follows ``DataRequest.augment`` (``augmentation``), the recipe's own policy
when the request names none; the eval transform never depends on it.

Everything here is a class or a torchvision transform, not a lambda, so the transforms pickle
(DataLoader workers, shipping a model's preprocessing to a serving process).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from dg2pf_contract.job import AUTO
from dg2pf_core.data.imagecheck import large_images_expected
from dg2pf_core.data.request import DataRequest

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

    def fit(values: tuple[float, ...]) -> tuple[float, ...]:
        if len(values) == in_channels:  # RGB for RGB, or an architecture's own single-channel figure
            return tuple(values)
        return (sum(w * v for w, v in zip(_LUMA, values)),)

    return fit(mean), fit(std)


class ConvertMode:
    """PIL image -> 8-bit ``"RGB"`` or ``"L"``, whatever mode it came in.

    PIL's own ``convert`` is right for most modes and wrong for these, handled here:

    * 16-bit integer ("I;16", "I;16B", "I;16L", "I;16N", what 16-bit PNGs and TIFFs open as):
      0..65535 scaled to 0..255 (65535 -> 255, 32768 -> 128). PIL clips at 255 instead, which
      turns all but the darkest pixels white.
    * "I" (32-bit signed integer) says nothing about the range its values were meant in: 8-bit
      pixels widened by ``convert("I")`` and saved as TIFF, 32-bit integer TIFFs and signed 16-bit
      TIFFs all open as "I". So, as for "F", the smallest common range that holds the image's
      maximum is taken: [0, 255] when it is at most 255, else [0, 65535], else [0, 2**32 - 1].
      Negative values become 0. One exception: an "I" image read from a PNG is 16-bit (PNG holds
      nothing wider; older Pillow releases open 16-bit gray PNGs as "I"), however dark it is.
    * "F" (32-bit float): likewise the smallest of [0, 1] (normalised intensities, what
      numpy/OpenCV pipelines write), [0, 255] (8-bit values as floats, what PIL's own
      ``convert("F")`` gives) and [0, 65535] (16-bit counts) that holds the image's maximum;
      larger values become 255. NaN -> 0.

      Both take a fixed range chosen by the maximum, never the image's own min/max, so brightness
      is not stretched per image: a dim 8-bit photo stays dim.
    * transparency (RGBA, LA, PA, RGBa, La, or a palette/colour marked transparent in
      ``info["transparency"]``): composited over white before the alpha is dropped. Dropping it
      alone exposes whatever colour the transparent pixels happen to store (often black), and
      transparent images (logos, product shots, scans) are made to be seen on a white page.

    Everything else ("1", "P" without transparency, "CMYK", "YCbCr", "LAB", "HSV", "RGBX") goes
    through PIL's conversion to RGB. Then RGB -> L by ITU-R 601-2 luma and L -> RGB by copying the
    gray into all three channels, as PIL does.
    """

    def __init__(self, in_channels: int) -> None:
        self.mode = "RGB" if in_channels == 3 else "L"

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        if image.mode == self.mode and "transparency" not in image.info:
            return image
        image = to_8bit(image)
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_INTEGER_RANGES = (255.0, 65535.0, 2.0**32 - 1)  # for "I": 8-bit, 16-bit, 32-bit counts
_FLOAT_RANGES = (1.0, 255.0, 65535.0)  # for "F": normalised, 8-bit, 16-bit
_ALPHA_COLOUR = ("RGBA", "RGBa", "PA")  # composited in RGB
_ALPHA_GRAY = ("LA", "La")  # composited in L
_WHITE = 255


def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as an 8-bit ``"L"`` or ``"RGB"`` image, by ``ConvertMode``'s rules."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or (mode == "I" and image.format == "PNG"):
        return _scaled(np.asarray(image), 65535.0)
    if mode in ("I", "F"):
        values = np.asarray(image)
        finite = values[np.isfinite(values)]
        peak = float(finite.max()) if finite.size else 0.0
        ranges = _INTEGER_RANGES if mode == "I" else _FLOAT_RANGES
        return _scaled(values, next((r for r in ranges if peak <= r), ranges[-1]))
    transparent = "transparency" in image.info
    if mode in _ALPHA_GRAY or (transparent and mode in ("1", "L")):
        return _over_white(image.convert("LA"))
    if mode in _ALPHA_COLOUR or (transparent and mode in ("P", "RGB")):
        return _over_white(image.convert("RGBA"))
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def _scaled(values: np.ndarray, full_scale: float) -> PIL.Image.Image:
    """``values`` in [0, full_scale] -> 8-bit gray, rounded; outside the range clipped."""
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=full_scale, neginf=0.0)
    x = np.clip(x, 0.0, full_scale) * (255.0 / full_scale)
    return PIL.Image.fromarray(np.rint(x).astype(np.uint8))


def _over_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """An "LA" or "RGBA" image composited over white, without its alpha."""
    colour_mode = image.mode[:-1]
    colour, alpha = image.convert(colour_mode), image.getchannel("A")
    white = PIL.Image.new(colour_mode, image.size, (_WHITE,) * len(colour_mode))
    return PIL.Image.composite(colour, white, alpha)


def augment_padding(size: int, per: int = 8) -> int:
    """Pixels of padding for the ``cifar`` and ``shift`` policies at ``size``: ``size / per``
    rounded, at least 1. ``per=8`` is CIFAR training's 4 px at 32; the MNIST-style recipe uses
    ``per=14`` (2 px at 28)."""
    return max(1, round(size / per))


def augmentation(policy: str, size: int, padding: int, fill: float = 0) -> list[Transform]:
    """The random steps of an augmentation policy (``registry.AUGMENT_POLICIES``) for an image
    (PIL or tensor) already ``size`` x ``size``; ``fill``: the value padding adds.

    ``imagenet``: RandomResizedCrop (8% to 100% of the area) + horizontal flip; ``cifar``: pad
    ``padding`` pixels + random crop back to ``size`` (a shift of at most ``padding``) + horizontal
    flip; ``shift``: the same without the flip; ``none``: nothing.
    """
    if policy == "imagenet":
        return [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    shift = [T.RandomCrop(size, padding=padding, fill=fill)]
    if policy == "cifar":
        return shift + [T.RandomHorizontalFlip()]
    if policy == "shift":
        return shift
    if policy == "none":
        return []
    raise ValueError(f"unknown augment policy {policy!r}")  # the registry refuses it before any loader


def _recipe(
    request: DataRequest, default: str, convert: Transform, resize: list, suffix: list, padding: int
) -> tuple[Transform, Transform]:
    """``(train, eval)``: eval is ``convert, *resize, *suffix``; train inserts the augmentation of
    ``request.augment`` (``default`` when it names none) before the suffix, so a ``cifar`` or
    ``shift`` training image is the eval image shifted by at most ``padding`` pixels."""
    evaluate = T.Compose([convert, *resize, *suffix])
    policy = request.augment if request.augment not in (None, AUTO) else default
    if policy == "none":
        return evaluate, evaluate
    # RandomResizedCrop samples from the image as it came, not from a resized copy of it (ImageNet's way).
    geometry = [] if policy == "imagenet" else resize
    return T.Compose([convert, *geometry, *augmentation(policy, request.image_size, padding), *suffix]), evaluate


def cifar_transforms(request: DataRequest) -> tuple[Transform, Transform]:
    """CIFAR-10 recipe: RandomCrop(32, padding=4) + horizontal flip (policy ``cifar``, unless
    ``request.augment`` names another); eval only normalises.

    Other sizes resize first and scale the padding with the image (4 pixels per 32).
    """
    size = request.image_size
    mean, std = channel_stats(CIFAR10_MEAN, CIFAR10_STD, request.in_channels)
    # Resize((s, s)) is a no-op on images already s x s, and brings a user's image at serving time
    # to the size the model saw.
    resize = [T.Resize((size, size))]
    suffix = [T.ToTensor(), T.Normalize(mean, std)]
    return _recipe(request, "cifar", ConvertMode(request.in_channels), resize, suffix, augment_padding(size))


class RepeatChannels:
    """``[1, H, W]`` -> ``[channels, H, W]``: a grayscale image for a model that wants RGB."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.channels, 1, 1)

    def __repr__(self) -> str:
        return f"RepeatChannels({self.channels})"


def grayscale_shift_transforms(request: DataRequest, mean: float, std: float) -> tuple[Transform, Transform]:
    """Grayscale small-image recipe (MNIST, Fashion-MNIST): pad 2 px per 28 + random crop back to
    size, no flip (policy ``shift``: digits and most garments are not mirror images of themselves;
    ``request.augment`` may name another, ``cifar`` with the same padding); eval only normalises.
    ``mean`` and ``std`` are the dataset's gray-level statistics.

    Every image is made gray first, also for a 3-channel model, which gets the gray copied into
    all three channels: the model never saw colour, so a user's colour picture must not show it any.
    """
    size = request.image_size
    resize = [T.Resize((size, size))]  # a no-op on images already size x size
    suffix = [T.ToTensor(), T.Normalize((mean,), (std,))]
    if request.in_channels != 1:
        suffix.append(RepeatChannels(request.in_channels))
    return _recipe(request, "shift", ConvertMode(1), resize, suffix, augment_padding(size, per=14))


DEFAULT_CROP_PCT = 224 / 256  # ImageNet's evaluation: resize the short side to size / 0.875, crop the centre
MAX_ASPECT = 4  # the resized image's long side is at most this many times the target size


class FitAndCrop:
    """Evaluation geometry for folders of images of any size, memory bounded for any aspect ratio.

    An image larger than the target on its short side by the crop margin (``size / crop_pct``) is
    resized so that its short side is ``size / crop_pct`` and its centre ``size`` x ``size`` is cut out
    (ImageNet's evaluation; timm's ``crop_pct``); the long side is capped at ``MAX_ASPECT`` x ``size``
    (the rest of the crop window is zero padding), so a 1 x 16,000 image costs what a 4:1 one does. An
    image at or below that size (a folder of 32 x 32 images evaluated at 32) is resized to
    ``size`` x ``size`` whole: no border is cut off where the user's own pipeline sees it all."""

    def __init__(self, size: int, crop_pct: float = DEFAULT_CROP_PCT, interpolation: str | None = None) -> None:
        self.size, self.crop_pct = size, crop_pct
        self.short = max(size, int(size / crop_pct))
        mode = T.InterpolationMode(interpolation or "bilinear")
        self.crop = T.Compose(
            [
                T.Resize(self.short, interpolation=mode, max_size=max(self.short + 1, MAX_ASPECT * size)),
                T.CenterCrop(size),
            ]
        )
        self.whole = T.Resize((size, size), interpolation=mode)

    def __call__(self, image):
        width, height = T.functional.get_image_size(image)
        return self.crop(image) if min(width, height) > self.short else self.whole(image)

    def __repr__(self) -> str:
        return f"FitAndCrop(size={self.size}, crop_pct={self.crop_pct:g})"


def imagenet_transforms(request: DataRequest) -> tuple[Transform, Transform]:
    """ImageNet recipe: RandomResizedCrop + flip (policy ``imagenet``, unless ``request.augment``
    names another: ``cifar`` and ``shift`` pad-and-crop the eval image, 4 px per 32); eval
    ``FitAndCrop`` (the centre ``crop_pct`` of an image larger than the target, a small one whole)."""
    size = request.image_size
    mean, std = channel_stats(request.mean or IMAGENET_MEAN, request.std or IMAGENET_STD, request.in_channels)
    crop = request.crop_pct if request.crop_pct is not None else DEFAULT_CROP_PCT
    resize = [FitAndCrop(size, crop, request.interpolation)]
    suffix = [T.ToTensor(), T.Normalize(mean, std)]
    return _recipe(request, "imagenet", ConvertMode(request.in_channels), resize, suffix, augment_padding(size))


class ArrayImages(Dataset):
    """In-memory ``uint8`` images (``[N, H, W]`` gray or ``[N, H, W, 3]`` RGB) as ``(PIL image, label)``;
    a ``TransformedView`` adds the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[PIL.Image.Image, int]:
        return PIL.Image.fromarray(self.images[index]), int(self.labels[index])


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
        # Cropping a large image (RandomResizedCrop near full scale) warns like opening it does.
        with large_images_expected():
            image, label = self.base[index]
            return self.transform(image), int(label)
