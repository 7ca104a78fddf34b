"""``cifar10:PATH``: the CIFAR-10 "python version" batches on disk, as the paper's CIFAR runs used.

The batches are pickles, and unpickling runs whatever code a file names. A dataset path comes from
a user (or an HTTP request), so the files are read with an unpickler that only rebuilds numpy
arrays and plain containers, and refuses anything else before it runs. torchvision's CIFAR10
class unpickles freely, which is why it is not used here.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dg2pf_core.data.registry import DataSplits, register_dataset
from dg2pf_core.data.request import DataRequest
from dg2pf_core.data.roots import confined_open
from dg2pf_core.data.splits import hold_out, rare_class_warnings
from dg2pf_core.data.transforms import ArrayImages, TransformedView, cifar_transforms
from dg2pf_core.errors import DatasetError

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
SUBFOLDER = "cifar-10-batches-py"  # what the official tarball extracts to
IMAGE_BYTES = 3 * 32 * 32
# batches.meta holds these too; used when a copy of the dataset lacks the meta file.
DEFAULT_CLASS_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

# (module, name) a CIFAR batch may reference -> the module the object lives in today.
# numpy 2 moved numpy.core to numpy._core; files written under either numpy name either.
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, ...]] = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 writes ``bytes`` into protocol-2 pickles as ``_codecs.encode(text, "latin1")``.

    Only that exact call is allowed, not the general codec machinery behind ``_codecs.encode``.
    """
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _resolve(candidates: tuple[str, ...], name: str) -> Any:
    for module_name in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy provides no {name} in {candidates}")


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dicts, lists, strings and numbers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        candidates = _ALLOWED_GLOBALS.get((module, name))
        if candidates is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return _resolve(candidates, name)


def _load_batch(path: str, roots: Sequence[str] = ()) -> dict[str, Any]:
    """One batch file as a dict with str keys, read without running code from the file; with
    ``roots``, the file opened must lie inside them (``roots.confined_open``)."""
    try:
        with confined_open(path, roots) as f:
            raw = f.read()
    except OSError as exc:
        raise DatasetError(f"cannot read CIFAR-10 file {path!r}: {exc}") from exc
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise DatasetError(
            f"{path!r} contains objects other than arrays (it references {exc}) and was refused "
            f"for safety; CIFAR-10 batch files hold only numpy arrays, lists and strings"
        ) from None
    except Exception as exc:  # truncated or not a pickle at all: any unpickling error
        raise DatasetError(
            f"{path!r} is not a CIFAR-10 python-version batch file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path!r} holds a {type(obj).__name__}, expected a dict of arrays")
    # Python 2 pickles (the official files) decode keys to str under latin1; files written from
    # Python 3 with bytes keys keep them as bytes.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _images_and_labels(path: str, roots: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [N, 32, 32, 3], int64 [N])`` from one batch file."""
    batch = _load_batch(path, roots)
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise DatasetError(f"{path!r} lacks the key(s) {missing}; keys found: {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8:
        raise DatasetError(f"{path!r}: data has dtype {data.dtype}, CIFAR-10 pixels are uint8")
    if data.size % IMAGE_BYTES != 0:
        raise DatasetError(
            f"{path!r}: data has {data.size} bytes, not a multiple of {IMAGE_BYTES} "
            f"(one 32x32 RGB image); the file is truncated or not CIFAR-10"
        )
    n = data.size // IMAGE_BYTES
    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    if len(labels) != n:
        raise DatasetError(f"{path!r}: {n} images but {len(labels)} labels")
    # Rows are a red plane, a green plane and a blue plane of 32x32 each.
    images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _find_folder(path: str) -> str:
    """``path`` itself, or the tarball's ``cifar-10-batches-py/`` inside it."""
    if not os.path.isdir(path):
        raise DatasetError(
            f"cifar10 path {path!r} is not a folder; point it at the folder holding data_batch_1..5 and test_batch"
        )
    nested = os.path.join(path, SUBFOLDER)
    if not os.path.exists(os.path.join(path, TEST_FILE)) and os.path.isdir(nested):
        return nested
    return path


def _read_class_names(folder: str, roots: Sequence[str] = ()) -> list[str]:
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.exists(meta_path):
        return list(DEFAULT_CLASS_NAMES)
    names = _load_batch(meta_path, roots).get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DatasetError(f"{meta_path!r}: label_names is not a list of 10 class names")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


@register_dataset(
    "cifar10",
    needs_path=True,
    help="CIFAR-10 python version: a folder with data_batch_1..5, test_batch, batches.meta",
    eval_transform=lambda request: cifar_transforms(request)[1],
    default_augment="cifar",
)
def load_cifar10(path: str | None, request: DataRequest) -> DataSplits:
    assert path is not None  # the registry enforces needs_path
    folder = _find_folder(path)
    missing = [f for f in TRAIN_FILES + (TEST_FILE,) if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DatasetError(
            f"CIFAR-10 folder {folder!r} lacks {', '.join(missing)}; expected the extracted "
            f"cifar-10-python.tar.gz (data_batch_1..5, test_batch, batches.meta)"
        )
    roots = request.allowed_roots
    class_names = _read_class_names(folder, roots)

    parts = [_images_and_labels(os.path.join(folder, f), roots) for f in TRAIN_FILES]
    train_images = np.concatenate([images for images, _ in parts])
    train_labels = np.concatenate([labels for _, labels in parts])
    test_images, test_labels = _images_and_labels(os.path.join(folder, TEST_FILE), roots)
    for name, labels in (("training", train_labels), ("test", test_labels)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DatasetError(
                f"{folder!r}: {name} labels span {labels.min()}..{labels.max()}, expected 0..{len(class_names) - 1}"
            )

    train_tf, eval_tf = cifar_transforms(request)
    base = ArrayImages(train_images, train_labels)
    train, val = hold_out(
        TransformedView(base, train_tf), TransformedView(base, eval_tf),
        request.val_fraction, request.seed, train_labels,
    )  # fmt: skip
    test = TransformedView(ArrayImages(test_images, test_labels), eval_tf)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        warnings=rare_class_warnings(train_labels[train.indices], class_names, len(class_names)),
        eval_transform=eval_tf,
        description=(
            f"cifar10 ({folder}): {len(train)} train / {len(val)} val (held out from train) / "
            f"{len(test)} test, {len(class_names)} classes"
        ),
    )
