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

Names starting with "." and ``__MACOSX`` are neither classes nor images, at any depth (macOS's
``._x.jpg``, ``.DS_Store`` and the ``__MACOSX/`` its zip files carry, ``.ipynb_checkpoints/``,
``.git/``); other files that are not images by extension (Windows' ``Thumbs.db`` and
``desktop.ini``, notes) are never looked at. Every image is decoded once before training
(``imagecheck``): unreadable ones refuse the dataset, naming them, or with
``DataRequest.skip_bad_images`` are left out and listed in ``DataSplits.skipped_images``.
"""

from __future__ import annotations

import functools
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

from dg2pf_core.data.imagecheck import (
    UnreadableImage,
    find_unreadable_images,
    load_image,
    shown_path,
)
from dg2pf_core.data.registry import DataSplits, register_dataset
from dg2pf_core.data.request import DataRequest
from dg2pf_core.data.splits import hold_out, rare_class_warnings
from dg2pf_core.data.transforms import TransformedView, imagenet_transforms
from dg2pf_core.errors import DatasetError

_LAYOUT = "expected PATH/train/<class>/<images>, optionally PATH/val/ and PATH/test/ alike"
_LISTED = 10  # unreadable files named in the error; the rest are counted


# Folders that tools leave beside the data: macOS's Archive Utility puts the AppleDouble
# (``._name``) files of a zip's entries under ``__MACOSX/``, mirroring the real folders.
_TOOL_FOLDERS = frozenset({"__MACOSX"})


def is_hidden(relative_path: str) -> bool:
    """Whether a path inside a split folder is hidden: any part of it starts with a dot or is
    ``__MACOSX``.

    Covers macOS's ``._name.jpg`` AppleDouble files, ``.DS_Store`` and ``__MACOSX/``,
    ``.ipynb_checkpoints/``, ``.git/`` and any other dot-folder, at any depth. Only the part
    inside the split folder counts: the dataset may well live under a dot-folder itself
    (``~/.data/imagenet``).
    """
    return any(part.startswith(".") or part in _TOOL_FOLDERS for part in Path(relative_path).parts)


def find_visible_classes(directory: str) -> tuple[list[str], dict[str, int]]:
    """torchvision's ``find_classes`` without hidden folders; FileNotFoundError when none.

    Classes are the folder names in Unicode NFC form, sorted: the same class spelled NFC in one split and
    NFD in another (a copy made on macOS) is one class with one index. ``class_to_idx`` maps the folder
    names as they are on disk. A name that is not valid UTF-8 (a zip from another system) or two folders
    that are the same name in two forms are refused, naming them."""
    names = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not is_hidden(entry.name))
    if not names:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # bytes the file system gave that are not UTF-8, kept as lone surrogates
            raise DatasetError(
                f"{directory!r} has a class folder whose name is not valid UTF-8: "
                f"{os.fsencode(name)!r} (made on a system with another encoding?); rename it: the name "
                "is the label the model answers with"
            ) from None
    by_form: dict[str, str] = {}
    for name in names:
        form = unicodedata.normalize("NFC", name)
        if form in by_form:
            raise DatasetError(
                f"{directory!r} has two class folders with the same name in two Unicode forms: "
                f"{by_form[form]!r} and {name!r} (NFC and NFD); merge them"
            )
        by_form[form] = name
    classes = sorted(by_form)
    index = {form: i for i, form in enumerate(classes)}
    return classes, {name: index[form] for form, name in by_form.items()}


def spelling_notes(folder: str, directory: str, train_dir: str) -> list[str]:
    """A note when a split spells some class folders in another Unicode form than train/ does."""

    def on_disk(d: str) -> dict[str, str]:
        return {unicodedata.normalize("NFC", n): n for n in find_visible_classes(d)[1]}

    here, train = on_disk(directory), on_disk(train_dir)
    differ = [train[f] for f in here if f in train and here[f] != train[f]]
    if not differ:
        return []
    return [
        f"{folder}/ spells {len(differ)} class folder name(s) in another Unicode form than train/ "
        f"(e.g. {differ[0]!r}, NFC vs NFD: a copy made on macOS); they were taken as the same classes"
    ]


class VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder minus hidden files and folders, images kept in their own mode.

    Items are ``(PIL image, class index)``, the image fully decoded by ``imagecheck.load_image``:
    torchvision's default loader would convert to RGB and so clip 16-bit images before
    ``ConvertMode`` could scale them, and would fail on a bad file without naming it.
    """

    def __init__(self, root: str, roots: tuple[str, ...] = ()) -> None:
        # functools.partial of a module function: pickles for DataLoader workers.
        super().__init__(root, loader=functools.partial(load_image, roots=roots))

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        return find_visible_classes(os.fspath(directory))

    @staticmethod
    def make_dataset(
        directory: str | os.PathLike[str],
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        directory = os.fspath(directory)

        def visible_and_valid(path: str) -> bool:
            if is_hidden(os.path.relpath(path, directory)):
                return False
            if is_valid_file is not None:
                return is_valid_file(path)
            return extensions is not None and has_file_allowed_extension(path, extensions)

        return make_dataset(directory, class_to_idx, is_valid_file=visible_and_valid, allow_empty=allow_empty)

    def drop(self, paths: set[str]) -> None:
        """Leave the files ``paths`` out of the samples."""
        self.samples = [sample for sample in self.samples if sample[0] not in paths]
        self.imgs = self.samples
        self.targets = [label for _, label in self.samples]


def _class_folders(folder: str) -> list[str]:
    try:
        classes, _ = find_visible_classes(folder)
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


def _images(folder: str, roots: tuple[str, ...] = ()) -> VisibleImageFolder:
    """The ``(PIL image, label)`` items of one split folder; transforms come from the views."""
    try:
        return VisibleImageFolder(folder, roots)
    except FileNotFoundError as exc:  # torchvision's way of saying a class folder has no images
        raise DatasetError(
            f"{folder!r}: {exc} Every class folder needs at least one image ({', '.join(IMG_EXTENSIONS)})"
        ) from None


# Below this input size the ImageNet recipe's random resized crop (down to 8% of the image, scaled
# back up) leaves a few blurred pixels of what the class looks like: a 32 px image cropped to 8% is
# 9 px across. Small images train with CIFAR's pad-and-crop + flip instead; 96 px (STL-10's size)
# is the smallest at which ImageNet-style crops are customary.
IMAGENET_AUGMENT_MIN_SIZE = 96


def default_augment(request: DataRequest) -> str:
    return "imagenet" if request.image_size >= IMAGENET_AUGMENT_MIN_SIZE else "cifar"


@register_dataset(
    "imagefolder",
    needs_path=True,
    help="a folder with train/<class>/<images>, optionally val/ and test/ with the same classes",
    eval_transform=lambda request: imagenet_transforms(request)[1],
    default_augment=default_augment,
)
def load_imagefolder(path: str | None, request: DataRequest) -> DataSplits:
    assert path is not None  # the registry enforces needs_path
    train_dir = os.path.join(path, "train")
    if not os.path.isdir(train_dir):
        raise DatasetError(f"{path!r} has no train/ folder; {_LAYOUT}")
    split_dirs = {name: os.path.join(path, name) for name in ("val", "test")}
    split_dirs = {name: d for name, d in split_dirs.items() if os.path.isdir(d)}

    train_classes = _class_folders(train_dir)
    notes: list[str] = []
    for name, folder in split_dirs.items():
        _check_same_classes(folder, _class_folders(folder), train_classes)
        notes += spelling_notes(name, folder, train_dir)

    images = {"train": _images(train_dir, request.allowed_roots)}
    images.update({name: _images(d, request.allowed_roots) for name, d in split_dirs.items()})
    skipped = _leave_out_unreadable(path, images, request.skip_bad_images)

    train_tf, eval_tf = imagenet_transforms(request)
    train_images = images["train"]
    if "val" in split_dirs and "test" in split_dirs:
        train = TransformedView(train_images, train_tf)
        val = TransformedView(images["val"], eval_tf)
        test_name: str | None = "test"
        val_source = "from val/"
    else:
        train, val = hold_out(
            TransformedView(train_images, train_tf), TransformedView(train_images, eval_tf),
            request.val_fraction, request.seed, train_images.targets,
        )  # fmt: skip
        test_name = "test" if "test" in split_dirs else "val" if "val" in split_dirs else None
        val_source = "held out from train/"
    test = TransformedView(images[test_name], eval_tf) if test_name is not None else None

    test_part = f" / {len(test)} test (from {test_name}/)" if test is not None else ", no test split"
    skipped_part = f"; {len(skipped)} unreadable image(s) skipped" if skipped else ""
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(train_classes),
        class_names=list(train_classes),
        warnings=notes
        + rare_class_warnings(
            [train_images.targets[i] for i in getattr(train, "indices", range(len(train_images)))],
            train_classes,
            len(train_classes),
        ),
        eval_transform=eval_tf,
        description=(
            f"imagefolder ({path}): {len(train)} train / {len(val)} val ({val_source})"
            f"{test_part}, {len(train_classes)} classes{skipped_part}"
        ),
        skipped_images=skipped,
    )


def _leave_out_unreadable(root: str, images: dict[str, VisibleImageFolder], skip: bool) -> list[str]:
    """Decode every image of every split once; refuse the dataset, or with ``skip`` leave the
    unreadable ones out. Returns the files left out, relative to ``root``."""
    paths = (sample_path for folder in images.values() for sample_path, _ in folder.samples)
    bad = find_unreadable_images(root, paths)
    if not bad:
        return []
    if not skip:
        raise DatasetError(_unreadable_message(root, bad))
    left_out = {image.path for image in bad}
    for split_name, folder in images.items():
        folder.drop(left_out)
        emptied = sorted(set(folder.classes) - {folder.classes[t] for t in folder.targets})
        if emptied:
            raise DatasetError(
                f"{split_name}/ has no readable image left in class folder(s) "
                f"{', '.join(emptied)} once the {len(bad)} unreadable image(s) are skipped; "
                "every class folder needs at least one"
            )
    return [image.relative_path for image in bad]


def _unreadable_message(root: str, bad: list[UnreadableImage]) -> str:
    # One line (the CLI's and the job status's error is one line): the first files, then the count.
    listed = "; ".join(f"{shown_path(image.relative_path)} ({image.reason})" for image in bad[:_LISTED])
    more = f"; ... and {len(bad) - _LISTED} more ({len(bad)} in all)" if len(bad) > _LISTED else ""
    return (
        f"{len(bad)} image(s) in {root!r} cannot be read: {listed}{more}; "
        "remove or fix them, or pass --skip-bad-images (skip_bad_images: true in a job spec)"
    )
