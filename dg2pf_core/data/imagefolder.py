"""``imagefolder:PATH``: your own images, one folder per class (ImageNet's layout).

    PATH/train/<class>/*.jpg     required
    PATH/val/<class>/*           optional
    PATH/test/<class>/*          optional

Which folder plays which role:
    train/ + val/ + test/   validation = val/, test = test/
    train/ + test/          validation held out from train/, test = test/
    train/ + val/           validation held out from train/, test = val/  (ImageNet: the numbers
                            papers report are on its val/, so it must stay unseen by early stopping)
    train/ only             validation held out from train/, no test split
"""

from __future__ import annotations

import os

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from dg2pf_core.data.registry import DataRequest, DataSplits, register_dataset
from dg2pf_core.data.splits import hold_out
from dg2pf_core.data.transforms import TransformedView, imagenet_transforms
from dg2pf_core.errors import DatasetError

_LAYOUT = "expected PATH/train/<class>/<images>, optionally PATH/val/ and PATH/test/ alike"


def _class_folders(folder: str) -> list[str]:
    try:
        classes, _ = find_classes(folder)
    except FileNotFoundError:
        raise DatasetError(f"{folder!r} has no class folders; {_LAYOUT}") from None
    return classes


def _check_same_classes(folder: str, classes: list[str], train_classes: list[str]) -> None:
    if classes == train_classes:
        return
    extra = sorted(set(classes) - set(train_classes))
    lacking = sorted(set(train_classes) - set(classes))
    parts = []
    if extra:
        parts.append(f"has class folders train/ lacks: {', '.join(extra)}")
    if lacking:
        parts.append(f"lacks class folders train/ has: {', '.join(lacking)}")
    raise DatasetError(f"{folder!r} {'; '.join(parts)}; every split needs the same class folders")


def _images(folder: str) -> ImageFolder:
    """The ``(PIL image, label)`` items of one split folder; transforms come from the views."""
    try:
        return ImageFolder(folder)
    except FileNotFoundError as exc:  # torchvision's way of saying a class folder has no images
        raise DatasetError(
            f"{folder!r}: {exc} Every class folder needs at least one image "
            f"({', '.join(IMG_EXTENSIONS)})"
        ) from None


@register_dataset(
    "imagefolder",
    needs_path=True,
    help="a folder with train/<class>/<images>, optionally val/ and test/ with the same classes",
    eval_transform=lambda request: imagenet_transforms(request)[1],
)
def load_imagefolder(path: str | None, request: DataRequest) -> DataSplits:
    assert path is not None  # the registry enforces needs_path
    train_dir = os.path.join(path, "train")
    if not os.path.isdir(train_dir):
        raise DatasetError(f"{path!r} has no train/ folder; {_LAYOUT}")
    split_dirs = {name: os.path.join(path, name) for name in ("val", "test")}
    split_dirs = {name: d for name, d in split_dirs.items() if os.path.isdir(d)}

    train_classes = _class_folders(train_dir)
    for folder in split_dirs.values():
        _check_same_classes(folder, _class_folders(folder), train_classes)

    train_tf, eval_tf = imagenet_transforms(request)
    train_images = _images(train_dir)
    if "val" in split_dirs and "test" in split_dirs:
        train = TransformedView(train_images, train_tf)
        val = TransformedView(_images(split_dirs["val"]), eval_tf)
        test_dir: str | None = split_dirs["test"]
        val_source = "from val/"
    else:
        train, val = hold_out(
            TransformedView(train_images, train_tf), TransformedView(train_images, eval_tf),
            request.val_fraction, request.seed,
        )  # fmt: skip
        test_dir = split_dirs.get("test", split_dirs.get("val"))
        val_source = "held out from train/"
    test = TransformedView(_images(test_dir), eval_tf) if test_dir is not None else None

    test_part = (
        f" / {len(test)} test (from {os.path.basename(test_dir)}/)"
        if test is not None and test_dir is not None
        else ", no test split"
    )
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(train_classes),
        class_names=list(train_classes),
        eval_transform=eval_tf,
        description=(
            f"imagefolder ({path}): {len(train)} train / {len(val)} val ({val_source})"
            f"{test_part}, {len(train_classes)} classes"
        ),
    )
