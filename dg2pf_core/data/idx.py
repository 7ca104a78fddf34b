"""``fashion-mnist:PATH`` and ``mnist:PATH``: the four IDX files as their publishers ship them.

A folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, each raw or gzipped (``.gz``). The IDX format is read here with numpy,
not torchvision, because a dataset path comes from a user (or an HTTP request): every header is
checked and its sizes bounded before any data is read, and a gzipped file is decompressed in chunks
up to the size its header declares, so a file that lies about its size (a gzip bomb, a header
claiming 10^9 images) is refused without the memory it asks for.

IDX: two zero bytes, a dtype code (0x08 = unsigned byte, the only one these datasets use), the
number of dimensions, one big-endian uint32 per dimension, then the data in row-major order.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from dg2pf_core.data.registry import DataSplits, register_dataset
from dg2pf_core.data.request import DataRequest
from dg2pf_core.data.roots import confined_open
from dg2pf_core.data.splits import hold_out, rare_class_warnings
from dg2pf_core.data.transforms import ArrayImages, TransformedView, grayscale_shift_transforms
from dg2pf_core.errors import DatasetError

UBYTE = 0x08
# Far above any IDX dataset held in memory (MNIST: 60,000 images of 28x28, 47 MB), far below what
# would exhaust a machine: a header past these is refused before its data is read.
# The largest published IDX set (EMNIST ByClass: 697,932 training images of 28x28, 0.5 GiB) fits
# several times over; a damaged or hostile header costs at most MAX_DATA_BYTES, read into one
# preallocated array (no second copy), and only after the labels file agrees on the count.
MAX_IMAGES = 3_000_000
MAX_SIDE = 1024
MAX_DATA_BYTES = 2 * 1024**3  # one file's pixels
CHUNK = 1 << 20  # gzip is decompressed this much at a time
GZIP_MAGIC = b"\x1f\x8b"
NUM_CLASSES = 10

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxDataset:
    name: str  # the spec's name
    title: str
    class_names: tuple[str, ...]
    # Gray-level mean and std of the training images scaled to [0, 1]; hard-coded so that serving
    # needs no dataset at hand.
    mean: float
    std: float
    torchvision_folder: str  # where torchvision's download puts the files: ROOT/<this>/raw


FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    title="Fashion-MNIST",
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),  # fmt: skip
    mean=0.2860,  # over the 60,000 training images: 0.286041, std 0.353024
    std=0.3530,
    torchvision_folder="FashionMNIST",
)
MNIST = IdxDataset(
    name="mnist",
    title="MNIST",
    class_names=tuple(str(d) for d in range(10)),
    mean=0.1307,  # the figures every MNIST recipe uses (training set: 0.130660, 0.308108)
    std=0.3081,
    torchvision_folder="MNIST",
)


def _exactly(f: BinaryIO, n: int) -> bytes:
    """``n`` bytes from ``f`` (fewer only at the end of the data); for headers."""
    buffer = np.empty(n, dtype=np.uint8)
    return buffer[: _read_into(f, buffer)].tobytes()


def _read_into(f: BinaryIO, out: np.ndarray) -> int:
    """Fill ``out`` (uint8, contiguous) from ``f`` ``CHUNK`` bytes at a time; the bytes read, fewer
    only when the data ends early. No intermediate copies: the array is the only buffer."""
    view, done = memoryview(out.reshape(-1)), 0
    while done < len(view):
        part = f.read(min(len(view) - done, CHUNK))
        if not part:
            break
        view[done : done + len(part)] = part
        done += len(part)
    return done


def _read_idx(path: str, dims: int, roots: Sequence[str], count: tuple[int, str] | None = None) -> np.ndarray:
    """The uint8 array of one IDX file with ``dims`` dimensions, raw or gzipped (told by content).
    ``count``: (items, the file that says so): what the header must declare (the labels' count, for
    the images), checked before any data is read."""
    kind = "images" if dims == 3 else "labels"
    try:
        with confined_open(path, roots) as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            if not gzipped:
                return _parse(path, raw, dims, kind, os.fstat(raw.fileno()).st_size, count)
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                return _parse(path, unzipped, dims, kind, None, count)  # type: ignore[arg-type]
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(
            f"{path!r}: the gzip stream is damaged or truncated ({exc}); download the file again"
        ) from None
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {path!r}: {exc}") from exc


def _parse(
    path: str, f: BinaryIO, dims: int, kind: str, file_size: int | None, count: tuple[int, str] | None = None
) -> np.ndarray:
    head = _exactly(f, 4)
    if len(head) < 4 or head[:2] != b"\0\0":
        raise DatasetError(
            f"{path!r} is not an IDX file: it starts with {head.hex() or 'nothing'}, an IDX "
            f"file with two zero bytes (0000080{dims} for the published {kind} files)"
        )
    if head[2] != UBYTE:
        raise DatasetError(
            f"{path!r}: IDX dtype code 0x{head[2]:02x}, expected 0x08 (unsigned bytes) as in the published files"
        )
    if head[3] != dims:
        raise DatasetError(
            f"{path!r}: {head[3]} dimension(s), expected {dims} for {kind}; "
            f"is this the {'labels' if dims == 3 else 'images'} file?"
        )
    sizes_raw = _exactly(f, 4 * dims)
    if len(sizes_raw) < 4 * dims:
        raise DatasetError(f"{path!r}: the header ends early (truncated file)")
    shape = tuple(int(s) for s in np.frombuffer(sizes_raw, dtype=">u4"))
    if shape[0] > MAX_IMAGES:
        raise DatasetError(
            f"{path!r}: the header declares {shape[0]:,} {kind}, more than this loader "
            f"holds in memory ({MAX_IMAGES:,}); the file is damaged, or use imagefolder:PATH"
        )
    if dims == 3 and not all(1 <= side <= MAX_SIDE for side in shape[1:]):
        raise DatasetError(
            f"{path!r}: the header declares {shape[1]}x{shape[2]} images, "
            f"expected sides of 1..{MAX_SIDE} (28x28 in the published files)"
        )
    if count is not None and shape[0] != count[0]:
        raise DatasetError(
            f"{path!r} declares {shape[0]:,} {kind} but {count[1]!r} {count[0]:,} labels; "
            "both must come from the same release"
        )
    declared = int(np.prod(shape, dtype=np.int64))
    if declared > MAX_DATA_BYTES:
        raise DatasetError(
            f"{path!r}: the header declares {declared:,} bytes of {kind} "
            f"({' x '.join(map(str, shape))}), more than {MAX_DATA_BYTES:,}"
        )
    header = 4 + 4 * dims
    if file_size is not None and file_size != header + declared:
        raise DatasetError(_size_mismatch(path, shape, kind, file_size - header, declared))
    data = np.empty(shape, dtype=np.uint8)
    got = _read_into(f, data)
    if got < declared:
        raise DatasetError(_size_mismatch(path, shape, kind, got, declared))
    if f.read(1):  # for gzip: one more byte, never the rest of a stream that may be endless
        raise DatasetError(
            f"{path!r}: the data continues past the {declared:,} bytes the header declares "
            f"({' x '.join(map(str, shape))} {kind}): the file has trailing bytes"
        )
    return data


def _size_mismatch(path: str, shape: tuple[int, ...], kind: str, got: int, declared: int) -> str:
    what = "is truncated" if got < declared else "has trailing bytes"
    return (
        f"{path!r}: {got:,} bytes of data, the header declares {declared:,} "
        f"({' x '.join(map(str, shape))} {kind}): the file {what}"
    )


def _find(folder: str, base: str) -> str | None:
    """The raw file, else the gzipped one (the raw one is read faster when both exist); an entry of
    that name that is not a readable regular file is named for what it is, not reported missing."""
    for name in (base, base + ".gz"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
        if os.path.lexists(candidate):
            raise DatasetError(
                f"{candidate!r} is {_what(candidate)}, not a regular file; the dataset needs "
                f"{base} (raw or .gz) as a file"
            )
    return None


def _what(path: str) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)!r})"
    if os.path.isdir(path):
        return "a directory"
    return "a device, pipe or socket" if os.path.exists(path) else "unreadable"


def _locate(path: str, ds: IdxDataset) -> dict[str, str]:
    """The four files in ``path``, or in torchvision's ``path/<Name>/raw`` download folder."""
    if not os.path.isdir(path):
        raise DatasetError(
            f"{ds.name} path {path!r} is not a folder; point it at the folder holding "
            f"the four IDX files ({', '.join(FILES.values())}, raw or .gz)"
        )
    missing = []
    for folder in (path, os.path.join(path, ds.torchvision_folder, "raw")):
        found = {key: _find(folder, base) for key, base in FILES.items()}
        if all(found.values()):
            return {key: p for key, p in found.items() if p is not None}
        missing = missing or [base for key, base in FILES.items() if found[key] is None]
    raise DatasetError(
        f"{ds.title} folder {path!r} lacks {', '.join(missing)} (raw or .gz); expected the four files as "
        f"published: {', '.join(FILES.values())}"
    )


def _images_and_labels(
    images_path: str, labels_path: str, roots: Sequence[str], minimum: int
) -> tuple[np.ndarray, np.ndarray]:
    # Labels first (one byte per image): the images' header must then declare as many, before
    # a byte of image data is read.
    labels = _read_idx(labels_path, 1, roots)
    if len(labels) < minimum:
        raise DatasetError(
            f"{labels_path!r} declares {len(labels):,} labels; the split needs at least {minimum} "
            f"({'a training and a validation image' if minimum > 1 else 'one image'})"
        )
    images = _read_idx(images_path, 3, roots, count=(len(labels), labels_path))
    if len(labels) and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DatasetError(f"{labels_path!r}: label {labels[bad]} at position {bad}, expected 0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


def load_idx(path: str | None, request: DataRequest, ds: IdxDataset) -> DataSplits:
    """The official train/test split; validation held out from train (``request.val_fraction``)."""
    assert path is not None  # the registry enforces needs_path
    files = _locate(path, ds)
    roots = request.allowed_roots
    train_images, train_labels = _images_and_labels(files["train_images"], files["train_labels"], roots, 2)
    test_images, test_labels = _images_and_labels(files["test_images"], files["test_labels"], roots, 1)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"{files['train_images']!r} holds {'x'.join(map(str, train_images.shape[1:]))} images but "
            f"{files['test_images']!r} {'x'.join(map(str, test_images.shape[1:]))}; both must come from one dataset"
        )
    rows, cols = train_images.shape[1:]
    if rows != cols:
        raise DatasetError(
            f"{files['train_images']!r} holds {rows}x{cols} images; {ds.name} images are square and the "
            f"loader would stretch these to image_size x image_size: use `imagefolder:PATH` for other data"
        )

    train_tf, eval_tf = grayscale_shift_transforms(request, ds.mean, ds.std)
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
        num_classes=NUM_CLASSES,
        class_names=list(ds.class_names),
        warnings=rare_class_warnings(train_labels[train.indices], ds.class_names, NUM_CLASSES),
        eval_transform=eval_tf,
        description=(
            f"{ds.name} ({os.path.dirname(files['train_images'])}): {len(train)} train / {len(val)} val "
            f"(held out from train) / {len(test)} test, {NUM_CLASSES} classes"
        ),
    )


@register_dataset(
    "fashion-mnist",
    needs_path=True,
    help="Fashion-MNIST: a folder with the four IDX files (train-images-idx3-ubyte, ... raw or .gz; "
    "Debian/Ubuntu: apt-get install dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)",
    eval_transform=lambda request: grayscale_shift_transforms(request, FASHION_MNIST.mean, FASHION_MNIST.std)[1],
    default_augment="shift",
)
def load_fashion_mnist(path: str | None, request: DataRequest) -> DataSplits:
    return load_idx(path, request, FASHION_MNIST)


@register_dataset(
    "mnist",
    needs_path=True,
    help="MNIST: a folder with the four IDX files (train-images-idx3-ubyte, ... raw or .gz)",
    eval_transform=lambda request: grayscale_shift_transforms(request, MNIST.mean, MNIST.std)[1],
    default_augment="shift",
)
def load_mnist(path: str | None, request: DataRequest) -> DataSplits:
    return load_idx(path, request, MNIST)
