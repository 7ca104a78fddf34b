"""Datasets by name: a spec string ("digits", "cifar10:/data/c10") becomes train/val/test splits.

Each loader module registers itself with ``@register_dataset``; callers only ever use
``load_dataset(spec, request)``, so adding a dataset never touches the code that trains on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import PIL.Image
import torch
from torch.utils.data import Dataset

# Training augmentation policies (transforms.py builds them); AUTO: the dataset's default, what
# DataRequest.augment=None also means.
from dg2pf_contract.job import AUGMENT_POLICIES, AUTO
from dg2pf_core.data.request import DataRequest, normalisation_problems
from dg2pf_core.data.roots import check_tree
from dg2pf_core.errors import DatasetError


@dataclass
class DataSplits:
    """Items of every split are ``(float tensor [C, H, W], int label)``."""

    train: Dataset  # training augmentation applied
    val: Dataset  # eval transform; never the test set
    test: Dataset | None
    num_classes: int
    class_names: list[str] | None
    # applied to a user's image at serving time: the same preprocessing as val/test
    eval_transform: Callable[[PIL.Image.Image], torch.Tensor]
    description: str  # e.g. "digits: 1293 train / 144 val / 360 test, 10 classes"
    # Unreadable images left out under DataRequest.skip_bad_images, relative to the dataset root
    skipped_images: list[str] = field(default_factory=list)
    # The augmentation policy the train view applies (load_dataset sets it: the one asked for, or the
    # dataset's default)
    augment: str = "none"
    # What a user should know about the data (classes with few training images): metrics.json's warnings
    warnings: list[str] = field(default_factory=list)


Loader = Callable[[str | None, DataRequest], DataSplits]
EvalTransformFactory = Callable[[DataRequest], Callable[[PIL.Image.Image], torch.Tensor]]
DefaultAugment = Callable[[DataRequest], str]


@dataclass(frozen=True)
class _Entry:
    name: str
    needs_path: bool
    help: str
    loader: Loader
    eval_transform: EvalTransformFactory
    default_augment: DefaultAugment

    @property
    def usage(self) -> str:
        return f"{self.name}:PATH" if self.needs_path else self.name


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(
    name: str,
    *,
    needs_path: bool,
    help: str,
    eval_transform: EvalTransformFactory,
    default_augment: str | DefaultAugment = "none",
) -> Callable[[Loader], Loader]:
    """Register ``loader(path, request) -> DataSplits`` under ``name`` (lower case, no colon).

    ``eval_transform(request)`` builds the same preprocessing as ``DataSplits.eval_transform``
    without reading any data: serving a model needs it, the dataset itself may be long gone.
    ``default_augment``: the policy (or ``request -> policy``) used when the request asks for none;
    the loader is called with ``request.augment`` resolved and must train with it.
    """
    if not name or ":" in name or name != name.lower():
        raise ValueError(f"dataset name must be lower case without ':', got {name!r}")

    def decorator(loader: Loader) -> Loader:
        if name in _REGISTRY and _REGISTRY[name].loader is not loader:
            raise ValueError(f"dataset {name!r} is already registered")
        default = default_augment if callable(default_augment) else (lambda _request: default_augment)
        _REGISTRY[name] = _Entry(name, needs_path, help, loader, eval_transform, default)
        return loader

    return decorator


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def needs_path(name: str) -> bool:
    """Whether dataset ``name`` is given as ``name:PATH`` (DatasetError for an unknown name)."""
    return _entry(name).needs_path


def dataset_usages() -> list[tuple[str, str]]:
    """``(spec format, help)`` per dataset, e.g. ``("cifar10:PATH", "CIFAR-10 python ...")``."""
    return [(_REGISTRY[n].usage, _REGISTRY[n].help) for n in dataset_names()]


def _valid_specs() -> str:
    return ", ".join(f"`{_REGISTRY[n].usage}`" for n in dataset_names())


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:/d/c10"`` -> ``("cifar10", "/d/c10")``; ``"digits"`` -> ``("digits", None)``.

    Only the first colon separates, so Windows paths (``imagefolder:C:\\data``) survive. Blanks after
    the colon are dropped (``fashion-mnist: /data``); the rest of the path is kept as written (a folder
    name may end with a space; error messages quote it and point out a stray one).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"empty dataset spec; use one of {_valid_specs()}")
    name, sep, path = spec.partition(":")
    name, path = name.strip().lower(), path.lstrip()
    return name, (path if sep and path.strip() else None)


def _check_request(request: DataRequest) -> None:
    if not isinstance(request.image_size, int) or request.image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {request.image_size!r}", field="image_size")
    if request.in_channels not in (1, 3):
        raise DatasetError(
            f"in_channels must be 1 (grayscale) or 3 (RGB), got {request.in_channels!r}",
            field="in_channels",
        )
    fraction = request.val_fraction
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 0.5:
        raise DatasetError(
            f"val_fraction must be in (0, 0.5] (share of train held out for validation), got {fraction!r}",
            field="val_fraction",
        )
    crop = request.crop_pct
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0.25 <= crop <= 1.0):
        raise DatasetError(
            f"crop_pct must be in [0.25, 1] (the centre fraction of a larger image kept at evaluation; "
            f"1: no crop), got {crop!r}",
            field="crop_pct",
        )
    for name, why in normalisation_problems(request.mean, request.std, request.interpolation, request.in_channels):
        raise DatasetError(why, field=name)
    if not isinstance(request.skip_bad_images, bool):
        raise DatasetError(
            f"skip_bad_images must be true or false, got {request.skip_bad_images!r}",
            field="skip_bad_images",
        )
    if request.augment is not None and request.augment not in (AUTO, *AUGMENT_POLICIES):
        raise DatasetError(
            f"unknown augment policy {request.augment!r}; valid: {', '.join((AUTO, *AUGMENT_POLICIES))}",
            field="augment",
        )


def _entry(name: str) -> _Entry:
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, dataset_names(), n=1)
        hint = f"did you mean `{_REGISTRY[close[0]].usage}`? " if close else ""
        raise DatasetError(f"unknown dataset {name!r}; {hint}valid specs: {_valid_specs()}")
    return entry


def eval_transform_for(spec: str, request: DataRequest) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """The eval preprocessing of the dataset ``spec`` names, built without touching its files."""
    _check_request(request)
    name, _ = parse_spec(spec)
    return _entry(name).eval_transform(request)


def eval_crop_pct(spec: str, crop_pct: float | None) -> float | None:
    """The centre crop the dataset ``spec`` names evaluates with for a job asking ``crop_pct``: a number
    where its eval transform crops (``transforms.FitAndCrop``: folders of images), None where it resizes
    the whole image (the datasets of a fixed size)."""
    from dg2pf_core.data.transforms import FitAndCrop

    name, _ = parse_spec(spec)
    steps = getattr(
        _entry(name).eval_transform(DataRequest(image_size=32, in_channels=3, crop_pct=crop_pct)), "transforms", []
    )
    return next((t.crop_pct for t in steps if isinstance(t, FitAndCrop)), None)


def augment_for(spec: str, request: DataRequest) -> str:
    """The augmentation policy loading ``spec`` with ``request`` trains with: the one asked for, or
    the dataset's default for the request (its image size)."""
    _check_request(request)
    if request.augment not in (None, AUTO):
        return request.augment
    name, _ = parse_spec(spec)
    return _entry(name).default_augment(request)


def load_dataset(spec: str, request: DataRequest) -> DataSplits:
    """Load the dataset a spec names, adapted to ``request``; every bad input is a DatasetError."""
    _check_request(request)
    name, path = parse_spec(spec)
    entry = _entry(name)
    if entry.needs_path and path is None:
        raise DatasetError(f"dataset {name!r} needs a path: use `{entry.usage}` ({entry.help})")
    if not entry.needs_path and path is not None:
        raise DatasetError(f"dataset {name!r} takes no path: use `{entry.usage}`, not {spec!r}")
    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            hint = ""
            if path != path.strip() and os.path.exists(path.strip()):
                hint = f"; {path.strip()!r}, without the surrounding spaces, does: drop them from the spec"
            raise DatasetError(f"dataset path {path!r} does not exist (spec {spec!r}){hint}")
        check_tree(path, request.allowed_roots)  # no link out of the allowed roots

    request = dataclasses.replace(request, augment=augment_for(spec, request))
    splits = entry.loader(path, request)
    splits.augment = request.augment

    for split_name in ("train", "val", "test"):
        split = getattr(splits, split_name)
        if split is not None and len(split) == 0:
            raise DatasetError(f"dataset {spec!r} has an empty {split_name} split")
    return splits
