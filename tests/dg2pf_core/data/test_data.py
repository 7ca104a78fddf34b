"""Dataset loading: the splits a pruning run trains, validates and reports on.

Every dataset here is real files in the real on-disk format, written by the test itself.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from dg2pf_core.data import DataRequest, dataset_names, load_dataset, parse_spec
from dg2pf_core.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvertMode,
    channel_stats,
    imagenet_transforms,
)
from dg2pf_core.errors import DatasetError

DIGITS_TOTAL = 1797


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Folder datasets cache their image check; keep each test's out of the user's ~/.cache."""
    monkeypatch.setenv("DG2PF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# --------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", DataRequest(image_size=16, in_channels=1))


@pytest.mark.parametrize("size,channels", [(16, 1), (32, 3)])
def test_digits_items_have_the_requested_shape(size, channels):
    splits = load_dataset("digits", DataRequest(image_size=size, in_channels=channels))
    assert splits.num_classes == 10
    assert splits.class_names == [str(d) for d in range(10)]
    for split in (splits.train, splits.val, splits.test):
        image, label = split[0]
        assert image.shape == (channels, size, size)
        assert image.dtype == torch.float32
        assert isinstance(label, int) and 0 <= label < 10
    images, labels = next(iter(DataLoader(splits.train, batch_size=8)))
    assert images.shape == (8, channels, size, size)
    assert labels.dtype == torch.int64


def test_digits_splits_cover_the_dataset(digits16):
    s = digits16
    assert len(s.test) == 360
    assert len(s.train) + len(s.val) + len(s.test) == DIGITS_TOTAL
    assert s.description == "digits: 1293 train / 144 val / 360 test, 10 classes"


def test_digits_holdout_is_disjoint_and_reproducible(digits16):
    again = load_dataset("digits", DataRequest(image_size=16, in_channels=1))
    train_idx, val_idx = set(digits16.train.indices), set(digits16.val.indices)
    assert not train_idx & val_idx
    assert len(train_idx | val_idx) == len(digits16.train) + len(digits16.val)
    assert digits16.train.indices == again.train.indices
    assert digits16.val.indices == again.val.indices

    other = load_dataset("digits", DataRequest(image_size=16, in_channels=1, seed=1))
    assert other.val.indices != digits16.val.indices


def _stack(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def test_digits_test_split_does_not_depend_on_seed(digits16):
    other = load_dataset("digits", DataRequest(image_size=16, in_channels=1, seed=123))
    a_images, a_labels = _stack(digits16.test)
    b_images, b_labels = _stack(other.test)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    # every class is in the test set (the split is stratified)
    assert set(a_labels.tolist()) == set(range(10))


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5])
def test_digits_val_fraction_is_respected(fraction):
    splits = load_dataset("digits", DataRequest(16, 1, val_fraction=fraction))
    n_train_all = DIGITS_TOTAL - 360
    assert len(splits.val) == round(n_train_all * fraction)
    assert len(splits.train) == n_train_all - len(splits.val)


def test_digits_eval_transform_reproduces_the_test_tensors(digits16):
    """A user's picture of a test digit is preprocessed exactly as the test image was."""
    native = load_dataset("digits", DataRequest(image_size=8, in_channels=1))
    from dg2pf_core.data.digits import DIGITS_MEAN, DIGITS_STD

    for i in range(5):
        raw = native.test[i][0][0] * DIGITS_STD + DIGITS_MEAN  # the 8x8 image in [0, 1]
        pixels = np.clip(np.round(raw.numpy() * 255), 0, 255).astype(np.uint8)
        expected = digits16.test[i][0]
        quantisation = 1.0 / 255 / DIGITS_STD + 1e-5
        light_on_dark = Image.fromarray(pixels).resize((64, 64), Image.NEAREST)
        dark_on_light = Image.fromarray(255 - pixels).convert("RGB")
        for picture in (light_on_dark, dark_on_light):
            got = digits16.eval_transform(picture)
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=quantisation)


# -------------------------------------------------------------------------------------- cifar10

N_PER_BATCH = 20
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


def _batch(rng: np.random.Generator, n: int = N_PER_BATCH, *, bytes_keys: bool = False) -> dict:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(i % 10) for i in range(n)]
    batch = {"batch_label": "synthetic", "data": data, "labels": labels}
    return {k.encode(): v for k, v in batch.items()} if bytes_keys else batch


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar(folder: Path) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for i in range(1, 6):
        # some files with bytes keys, as Python 3 writes the official ones back out
        batches[f"data_batch_{i}"] = _batch(rng, bytes_keys=i % 2 == 0)
    batches["test_batch"] = _batch(rng)
    for name, batch in batches.items():
        _write_pickle(folder / name, batch)
    _write_pickle(folder / "batches.meta", {"label_names": CLASS_NAMES, "num_vis": 3072})
    return batches


def _rows(batch: dict) -> np.ndarray:
    return batch["data"] if "data" in batch else batch[b"data"]


def _expected_eval_tensor(row: np.ndarray) -> torch.Tensor:
    """One CIFAR row (R plane, G plane, B plane) normalised by hand."""
    chw = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return (chw - mean) / std


def test_cifar10_loads_the_python_version_and_pixels_round_trip(tmp_path):
    batches = _write_cifar(tmp_path / "c10")
    splits = load_dataset(f"cifar10:{tmp_path / 'c10'}", DataRequest(32, 3, val_fraction=0.1))
    assert splits.num_classes == 10
    assert splits.class_names == CLASS_NAMES
    assert len(splits.train) + len(splits.val) == 5 * N_PER_BATCH
    assert len(splits.val) == 10
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert len(splits.test) == N_PER_BATCH

    test_rows = batches["test_batch"]["data"]
    for i in (0, 7):
        image, label = splits.test[i]
        assert label == i % 10
        assert torch.allclose(image, _expected_eval_tensor(test_rows[i]), atol=1e-5)

    # validation items are train rows under the eval transform: no augmentation
    train_rows = np.concatenate([_rows(batches[f"data_batch_{i}"]) for i in range(1, 6)])
    j = splits.val.indices[0]
    assert torch.allclose(splits.val[0][0], _expected_eval_tensor(train_rows[j]), atol=1e-5)

    # the serving transform gives the same tensor for the same picture
    picture = Image.fromarray(test_rows[7].reshape(3, 32, 32).transpose(1, 2, 0))
    assert torch.allclose(splits.eval_transform(picture), splits.test[7][0], atol=1e-6)

    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int)


def test_cifar10_adapts_to_size_and_channels_and_finds_the_tarball_folder(tmp_path):
    _write_cifar(tmp_path / "root" / "cifar-10-batches-py")
    splits = load_dataset(f"cifar10:{tmp_path / 'root'}", DataRequest(16, 1))
    for split in (splits.train, splits.val, splits.test):
        assert split[0][0].shape == (1, 16, 16)
    assert splits.eval_transform(Image.new("RGBA", (50, 40))).shape == (1, 16, 16)


def test_cifar10_reads_files_written_under_either_numpy_module_name(tmp_path):
    batches = _write_cifar(tmp_path)
    raw = (tmp_path / "test_batch").read_bytes()
    # numpy 2 writes numpy._core, numpy 1 (and the official files) numpy.core; swap to the other
    if b"numpy._core.multiarray" in raw:
        swapped = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    else:
        swapped = raw.replace(b"numpy.core.multiarray", b"numpy._core.multiarray")
    assert swapped != raw
    (tmp_path / "test_batch").write_bytes(swapped)
    splits = load_dataset(f"cifar10:{tmp_path}", DataRequest(32, 3))
    row = batches["test_batch"]["data"][3]
    assert torch.allclose(splits.test[3][0], _expected_eval_tensor(row), atol=1e-5)


class _Payload:
    """Pickles to "run this code when loaded": what a booby-trapped dataset file would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_cifar10_refuses_a_batch_file_that_would_run_code(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = _batch(np.random.default_rng(1))
    batch["extra"] = _Payload(marker)
    _write_pickle(tmp_path / "data_batch_3", batch)

    with pytest.raises(DatasetError, match="refused for safety") as info:
        load_dataset(f"cifar10:{tmp_path}", DataRequest(32, 3))
    assert "data_batch_3" in info.value.message
    assert not marker.exists()

    # the payload is live: an ordinary unpickler would have run it
    with open(tmp_path / "data_batch_3", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_cifar10_names_a_missing_batch_file(tmp_path):
    _write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_4")
    with pytest.raises(DatasetError, match="data_batch_4"):
        load_dataset(f"cifar10:{tmp_path}", DataRequest(32, 3))


def test_cifar10_rejects_truncated_data_and_label_mismatch(tmp_path):
    _write_cifar(tmp_path)
    batch = _batch(np.random.default_rng(2))
    batch["data"] = batch["data"].reshape(-1)[:-100]
    _write_pickle(tmp_path / "data_batch_2", batch)
    with pytest.raises(DatasetError, match="multiple of 3072"):
        load_dataset(f"cifar10:{tmp_path}", DataRequest(32, 3))

    batch = _batch(np.random.default_rng(2))
    batch["labels"] = batch["labels"][:-1]
    _write_pickle(tmp_path / "data_batch_2", batch)
    with pytest.raises(DatasetError, match="20 images but 19 labels"):
        load_dataset(f"cifar10:{tmp_path}", DataRequest(32, 3))


# ---------------------------------------------------------------------------------- imagefolder


def _write_images(folder: Path, classes: dict[str, int], seed: int = 0) -> None:
    """``classes`` maps class name -> image count; files alternate PNG and JPEG, odd sizes/modes."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(30 + i, 40, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if i % 3 == 0:
                image.save(folder / name / f"{i}.jpg", format="JPEG")
            elif i % 3 == 1:
                image.convert("RGBA").save(folder / name / f"{i}.png", format="PNG")
            else:
                image.convert("L").save(folder / name / f"{i}.png", format="PNG")


CLASSES = {"cat": 6, "dog": 4}


def _load_folder(root: Path, **request) -> object:
    return load_dataset(
        f"imagefolder:{root}", DataRequest(**{"image_size": 24, "in_channels": 3, "val_fraction": 0.2, **request})
    )


def test_imagefolder_train_only_holds_out_val_and_has_no_test(tmp_path):
    _write_images(tmp_path / "train", CLASSES)
    splits = _load_folder(tmp_path)
    assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
    assert splits.test is None
    assert len(splits.train) + len(splits.val) == 10 and len(splits.val) == 2
    assert not set(splits.train.indices) & set(splits.val.indices)
    for split in (splits.train, splits.val):
        image, label = split[0]
        assert image.shape == (3, 24, 24) and label in (0, 1)


def test_imagefolder_val_only_becomes_the_test_split(tmp_path):
    _write_images(tmp_path / "train", CLASSES)
    _write_images(tmp_path / "val", {"cat": 2, "dog": 3}, seed=1)
    splits = _load_folder(tmp_path)
    assert len(splits.test) == 5
    assert len(splits.train) + len(splits.val) == 10  # validation comes from train/
    assert "test (from val/)" in splits.description


def test_imagefolder_test_only_holds_out_val(tmp_path):
    _write_images(tmp_path / "train", CLASSES)
    _write_images(tmp_path / "test", {"cat": 1, "dog": 2}, seed=1)
    splits = _load_folder(tmp_path)
    assert len(splits.test) == 3
    assert len(splits.train) + len(splits.val) == 10


def test_imagefolder_val_and_test_are_used_as_given(tmp_path):
    _write_images(tmp_path / "train", CLASSES)
    _write_images(tmp_path / "val", {"cat": 2, "dog": 3}, seed=1)
    _write_images(tmp_path / "test", {"cat": 1, "dog": 2}, seed=2)
    splits = _load_folder(tmp_path, in_channels=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 5, 3)
    assert [splits.test[i][1] for i in range(3)] == [0, 1, 1]
    assert splits.val[0][0].shape == (1, 24, 24)
    assert splits.train[0][0].shape == (1, 24, 24)


def test_imagefolder_rejects_mismatched_class_folders(tmp_path):
    _write_images(tmp_path / "train", CLASSES)
    _write_images(tmp_path / "val", {"cat": 1, "bird": 1})
    with pytest.raises(DatasetError, match="bird") as info:
        _load_folder(tmp_path)
    assert "dog" in info.value.message


@pytest.mark.parametrize("layout", ["no train folder", "no class folders", "no images"])
def test_imagefolder_rejects_an_empty_train_split(tmp_path, layout):
    if layout != "no train folder":
        (tmp_path / "train").mkdir()
    if layout == "no images":
        (tmp_path / "train" / "cat").mkdir()
        (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="train"):
        _load_folder(tmp_path)


APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + bytes(64)


def test_imagefolder_ignores_hidden_files_and_folders(tmp_path):
    """macOS / Jupyter / git droppings are neither classes nor images, at any depth."""
    _write_images(tmp_path / "train", CLASSES)
    _write_images(tmp_path / "test", {"cat": 1, "dog": 2}, seed=1)
    for folder in ("train/cat", "train/dog", "test/dog"):
        (tmp_path / folder / "._0.jpg").write_bytes(APPLEDOUBLE)
        (tmp_path / folder / "._1.png").write_bytes(APPLEDOUBLE)
        (tmp_path / folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
    # a dot-folder inside a class, one nested deeper, and dot-named class folders
    _write_images(tmp_path / "train" / "cat" / ".ipynb_checkpoints", {"deep": 2})
    (tmp_path / "train" / "dog" / "sub" / ".thumbs").mkdir(parents=True)
    (tmp_path / "train" / "dog" / "sub" / ".thumbs" / "x.jpg").write_bytes(APPLEDOUBLE)
    _write_images(tmp_path / "train" / ".Trashes", {"old": 1})
    _write_images(tmp_path / "train", {".ipynb_checkpoints": 2})
    _write_images(tmp_path / "test", {".hidden_class": 1})
    (tmp_path / "train" / "._cat").write_bytes(APPLEDOUBLE)

    splits = _load_folder(tmp_path)
    assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
    assert len(splits.train) + len(splits.val) == 10 and len(splits.test) == 3
    assert splits.skipped_images == []
    for i in range(len(splits.test)):
        assert splits.test[i][0].shape == (3, 24, 24)


def _unzip_as_macos_makes_it(files: dict[str, bytes], into: Path) -> None:
    """Extract what macOS's "Compress" writes: each file, plus its AppleDouble twin under
    ``__MACOSX/`` at the same relative path, folders included."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
            folder, _, base = name.rpartition("/")
            archive.writestr(f"__MACOSX/{folder}/._{base}", APPLEDOUBLE)
    with zipfile.ZipFile(buffer) as archive:
        archive.extractall(into)


def test_imagefolder_ignores_macos_zip_leftovers_at_any_depth(tmp_path):
    _write_images(tmp_path / "test", CLASSES, seed=1)
    sources = tmp_path / "sources"
    _write_images(sources, CLASSES)
    # a zip of train/'s contents, unzipped into train/: train/__MACOSX/ sits beside the classes
    _unzip_as_macos_makes_it(
        {f"{cls}/{path.name}": path.read_bytes()
         for cls in CLASSES for path in sorted((sources / cls).iterdir())},
        tmp_path / "train",
    )  # fmt: skip
    # ... and one zip of a single class, unzipped inside its folder
    _unzip_as_macos_makes_it({"extra/0.jpg": (sources / "dog" / "0.jpg").read_bytes()}, tmp_path / "test" / "dog")
    # a __MACOSX/ holding files that look like images still holds no class and no image
    _write_images(tmp_path / "train" / "__MACOSX", {"cat": 1})
    assert (tmp_path / "train" / "__MACOSX" / "cat" / "._0.jpg").exists()

    splits = _load_folder(tmp_path)
    assert splits.class_names == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) == 10 and len(splits.test) == 11
    assert splits.skipped_images == []


def test_imagefolder_ignores_windows_thumbs_db_and_desktop_ini(tmp_path):
    _write_images(tmp_path / "train", CLASSES)
    _write_images(tmp_path / "val", {"cat": 1, "dog": 1}, seed=1)
    for folder in ("train", "train/cat", "train/dog", "val/dog"):
        # Thumbs.db is an OLE2 compound file: this is its signature
        (tmp_path / folder / "Thumbs.db").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + bytes(64))
        (tmp_path / folder / "desktop.ini").write_text("[.ShellClassInfo]\r\nIconResource=x\r\n")
    splits = _load_folder(tmp_path)
    assert splits.class_names == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) == 10 and len(splits.test) == 2
    assert splits.skipped_images == []


def test_imagefolder_hidden_files_alone_do_not_make_a_class(tmp_path):
    _write_images(tmp_path / "train", CLASSES)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "._0.jpg").write_bytes(APPLEDOUBLE)
    with pytest.raises(DatasetError, match="bird"):
        _load_folder(tmp_path)


def test_imagefolder_under_a_dot_folder_is_found(tmp_path):
    """Only the part inside the split folder decides what is hidden."""
    root = tmp_path / ".data" / "pets"
    _write_images(root / "train", CLASSES)
    assert len(_load_folder(root).class_names) == 2


# -------------------------------------------------------------------------------- image modes
#
# Each case: an image of a few 1-pixel-wide columns, and the RGB (0..255) each column must become.


def _from_png(image: Image.Image, **save) -> Image.Image:
    """``image`` as PIL reads it back from a real PNG file, the way a dataset's files arrive."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    buffer.seek(0)
    loaded = Image.open(buffer)
    loaded.load()
    return loaded


def _from_tiff(image: Image.Image) -> Image.Image:
    """``image`` as PIL reads it back from a TIFF file (mode "I": 32-bit signed samples)."""
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    buffer.seek(0)
    loaded = Image.open(buffer)
    loaded.load()
    return loaded


def _columns(mode: str, values: list) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 200, 100, 50, 10, 20, 30] + [0] * (3 * 253))
    for x in range(3):
        image.putpixel((x, 0), x)
    return _from_png(image, transparency=0) if transparent else _from_png(image)


def _sixteen_bit(mode: str, values: list[int]) -> Image.Image:
    array = np.array([values], dtype=">u2" if mode == "I;16B" else "<u2")
    image = Image.frombytes(mode, (len(values), 1), array.tobytes())
    return _from_png(image) if mode == "I;16" else image  # a real 16-bit PNG


WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def _gray(v: float) -> tuple[float, float, float]:
    return (v, v, v)


MODE_CASES = {
    "1": lambda: (_columns("1", [0, 1]), [BLACK, WHITE]),
    "L": lambda: (_columns("L", [0, 100, 255]), [BLACK, _gray(100), WHITE]),
    "P": lambda: (_palette(False), [BLACK, (200, 100, 50), (10, 20, 30)]),
    "P with transparency": lambda: (_palette(True), [WHITE, (200, 100, 50), (10, 20, 30)]),
    "RGB": lambda: (_columns("RGB", [(10, 20, 30), WHITE]), [(10, 20, 30), WHITE]),
    # fully transparent -> white whatever colour it stores; half transparent black -> mid gray
    "RGBA": lambda: (
        _from_png(_columns("RGBA", [(10, 20, 30, 0), (0, 0, 0, 128), (10, 20, 30, 255)])),
        [WHITE, _gray(127), (10, 20, 30)],
    ),
    "LA": lambda: (
        _from_png(_columns("LA", [(50, 0), (0, 128), (50, 255)])),
        [WHITE, _gray(127), _gray(50)],
    ),
    "CMYK": lambda: (
        _columns("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]),
        [WHITE, (0, 255, 255), BLACK],
    ),
    # 16-bit: full scale -> 1.0, half scale -> 0.5, never clipped to white
    "I;16": lambda: (
        _sixteen_bit("I;16", [0, 257 * 100, 32768, 65535]),
        [BLACK, _gray(100), _gray(128), WHITE],
    ),
    "I;16B": lambda: (
        _sixteen_bit("I;16B", [0, 257 * 100, 32768, 65535]),
        [BLACK, _gray(100), _gray(128), WHITE],
    ),
    # "I" (32-bit integer): like "F", the smallest of [0, 255], [0, 65535], [0, 2**32 - 1] that
    # holds the image's maximum; negative -> 0. 16-bit values here ...
    "I": lambda: (
        Image.fromarray(np.array([[-5, 257 * 100, 32768, 65535]], dtype=np.int32)),
        [BLACK, _gray(100), _gray(128), WHITE],
    ),
    # ... 8-bit values: an 8-bit PNG through convert("I"), saved as TIFF; not nearly black ...
    "I holding 8-bit values": lambda: (
        _from_tiff(_from_png(_columns("L", [0, 100, 255])).convert("I")),
        [BLACK, _gray(100), WHITE],
    ),
    # ... 32-bit values, as 32-bit integer TIFFs hold (2**32 - 1 = 255 * 16843009)
    "I 32-bit range": lambda: (
        _from_tiff(Image.fromarray(np.array([[-5, 100000, 16843009 * 100, 2**31 - 1]], dtype=np.int32))),
        [BLACK, BLACK, _gray(100), _gray(127)],
    ),
    # float: [0, 1] when the image's maximum is at most 1 ...
    "F": lambda: (
        Image.fromarray(np.array([[0.0, 0.5, 1.0, float("nan")]], dtype=np.float32)),
        [BLACK, _gray(128), WHITE, BLACK],
    ),
    # ... [0, 255] up to 255 (what PIL's convert("F") gives) ...
    "F 8-bit range": lambda: (
        Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32)),
        [BLACK, _gray(100), WHITE],
    ),
    # ... else 16-bit counts
    "F 16-bit range": lambda: (
        Image.fromarray(np.array([[0.0, 32768.0, 65535.0]], dtype=np.float32)),
        [BLACK, _gray(128), WHITE],
    ),
}


def _luma(rgb: tuple[float, float, float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


@pytest.mark.parametrize("case", list(MODE_CASES))
@pytest.mark.parametrize("channels", [3, 1])
def test_every_pil_mode_becomes_the_right_pixels(case, channels):
    image, expected = MODE_CASES[case]()
    assert image.mode == case.split(" ")[0]
    want = (
        torch.tensor([rgb if channels == 3 else (_luma(rgb),) for rgb in expected], dtype=torch.float32).T.reshape(
            channels, 1, len(expected)
        )
        / 255
    )
    converted = ConvertMode(channels)(image)
    assert converted.mode == ("RGB" if channels == 3 else "L")
    got = T.ToTensor()(converted)
    assert torch.allclose(got, want, atol=1.01 / 255), (got * 255, want * 255)


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_the_eval_transform_sees_the_same_pixels(case):
    """What serving applies: a uniform image of each column's colour, normalisation undone."""
    image, expected = MODE_CASES[case]()
    request = DataRequest(image_size=16, in_channels=3)
    evaluate = imagenet_transforms(request)[1]
    mean, std = channel_stats(IMAGENET_MEAN, IMAGENET_STD, 3)
    for x, rgb in enumerate(expected):
        uniform = image.crop((x, 0, x + 1, 1)).resize((20, 20), Image.NEAREST)
        uniform.info = dict(image.info)  # crop drops the palette's transparency entry
        tensor = evaluate(uniform)
        pixels = tensor * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        want = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 16, 16) / 255
        assert torch.allclose(pixels, want, atol=1.5 / 255), (case, x)


def test_sixteen_bit_pngs_in_an_imagefolder_are_scaled_not_clipped(tmp_path):
    for split, value in (("train", 65535), ("test", 32768)):
        for cls in ("dark", "light"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = np.full((30, 30), value if cls == "light" else 0, dtype="<u2")
                image = Image.frombytes("I;16", (30, 30), pixels.tobytes())
                image.save(tmp_path / split / cls / f"{i}.png")
    splits = _load_folder(tmp_path, in_channels=1)
    (mean,), (std,) = channel_stats(IMAGENET_MEAN, IMAGENET_STD, 1)
    light = [splits.test[i][0] * std + mean for i in range(6) if splits.test[i][1] == 1]
    dark = [splits.test[i][0] * std + mean for i in range(6) if splits.test[i][1] == 0]
    assert all(torch.allclose(t, torch.full_like(t, 128 / 255), atol=1e-4) for t in light)
    assert all(torch.allclose(t, torch.zeros_like(t), atol=1e-4) for t in dark)
    for tensor, label in (splits.val[i] for i in range(len(splits.val))):
        pixels = tensor * std + mean  # 65535 (full scale) -> 1.0, 0 -> 0.0
        assert torch.allclose(pixels, torch.full_like(pixels, float(label)), atol=1e-4)


def test_8_bit_values_in_i_tiffs_in_an_imagefolder_keep_their_brightness(tmp_path):
    """What ``Image.open(png).convert("I").save(tiff)`` makes: values 0..255 in 32-bit samples."""
    for split in ("train", "test"):
        for cls, value in (("dim", 60), ("bright", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                png = tmp_path / f"{split}-{cls}-{i}.png"
                Image.fromarray(np.full((30, 30), value, dtype=np.uint8)).save(png)
                Image.open(png).convert("I").save(tmp_path / split / cls / f"{i}.tif")
                png.unlink()
    splits = _load_folder(tmp_path, in_channels=1)
    (mean,), (std,) = channel_stats(IMAGENET_MEAN, IMAGENET_STD, 1)
    for tensor, label in (splits.test[i] for i in range(len(splits.test))):
        want = (200 if splits.class_names[label] == "bright" else 60) / 255
        assert torch.allclose(tensor * std + mean, torch.full_like(tensor, want), atol=1e-4)


def test_i_images_read_from_png_are_16_bit_however_dark(tmp_path, monkeypatch):
    """Older Pillow opens 16-bit gray PNGs as "I": they must not be mistaken for 8-bit values."""
    from PIL import PngImagePlugin

    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))  # as older Pillow did
    path = tmp_path / "dark.png"
    Image.frombytes("I;16", (3, 1), np.array([0, 255, 257 * 100], dtype="<u2").tobytes()).save(path)
    image = Image.open(path)
    assert image.mode == "I"
    assert np.asarray(ConvertMode(1)(image)).tolist() == [[0, 1, 100]]


def test_convert_mode_pickles():
    convert = ConvertMode(1)
    copy = pickle.loads(pickle.dumps(convert))
    image, _ = MODE_CASES["I;16"]()
    assert np.array_equal(np.asarray(copy(image)), np.asarray(convert(image)))


# ------------------------------------------------------------------------------ specs and errors


def test_parse_spec():
    assert parse_spec("cifar10:/data/c10") == ("cifar10", "/data/c10")
    assert parse_spec("digits") == ("digits", None)
    assert parse_spec("imagefolder:C:\\data") == ("imagefolder", "C:\\data")
    assert parse_spec("cifar10:") == ("cifar10", None)
    assert parse_spec(" CIFAR10 : /data/c10 ") == (
        "cifar10",
        "/data/c10 ",
    )  # blanks after the colon dropped, the rest as written


def test_registered_names():
    assert {"digits", "cifar10", "imagefolder"} <= set(dataset_names())


def test_unknown_dataset_suggests_the_valid_specs():
    with pytest.raises(DatasetError) as info:
        load_dataset("svhn", DataRequest(28, 1))
    for spec in ("`digits`", "`cifar10:PATH`", "`imagefolder:PATH`"):
        assert spec in info.value.message
    assert info.value.field == "dataset"
    with pytest.raises(DatasetError, match="did you mean `digits`"):
        load_dataset("digit", DataRequest(28, 1))


def test_path_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}", DataRequest(32, 3))
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("imagefolder", DataRequest(32, 3))
    with pytest.raises(DatasetError, match="takes no path"):
        load_dataset(f"digits:{tmp_path}", DataRequest(32, 3))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0])
def test_val_fraction_out_of_range(fraction):
    with pytest.raises(DatasetError) as info:
        load_dataset("digits", DataRequest(16, 1, val_fraction=fraction))
    assert info.value.field == "val_fraction"


def test_eval_transforms_pickle_for_serving(tmp_path):
    """Serving ships the eval transform to another process; it must survive pickling unchanged."""
    _write_cifar(tmp_path / "c10")
    _write_images(tmp_path / "folder" / "train", CLASSES)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (37, 29, 3), np.uint8))
    for spec in ("digits", f"cifar10:{tmp_path / 'c10'}", f"imagefolder:{tmp_path / 'folder'}"):
        transform = load_dataset(spec, DataRequest(24, 3)).eval_transform
        copy = pickle.loads(pickle.dumps(transform))
        assert torch.equal(copy(picture), transform(picture))
        assert transform(picture).shape == (3, 24, 24)
