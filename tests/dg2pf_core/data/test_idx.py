"""``fashion-mnist:PATH`` and ``mnist:PATH``: the four IDX files, raw or gzipped, as published.

Every dataset here is written by the test in the exact IDX format; every damaged or lying file is
refused with a DatasetError naming it, and a file that lies about its size costs no memory for it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from idx_files import (
    ALL_FILES,
    N_TEST,
    N_TRAIN,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    idx,
    write,
    write_dataset,
)
from PIL import Image

from dg2pf_core.data import DataRequest, dataset_usages, eval_transform_for, load_dataset
from dg2pf_core.data.idx import FASHION_MNIST, MNIST, _read_idx
from dg2pf_core.errors import DatasetError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip


def normalised(image: np.ndarray, mean: float, std: float) -> torch.Tensor:
    return ((torch.from_numpy(image.astype(np.float32)) / 255.0 - mean) / std).unsqueeze(0)


GZ_CHOICES = {"raw": lambda name: False, "gz": lambda name: True, "mixed": lambda name: "images" in name}


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("files", sorted(GZ_CHOICES))
def test_loads_raw_and_gzipped_files_and_pixels_round_trip(tmp_path, files):
    arrays = write_dataset(tmp_path / "fm", GZ_CHOICES[files])
    splits = load_dataset(f"fashion-mnist:{tmp_path / 'fm'}", DataRequest(28, 1, val_fraction=0.1))
    assert splits.num_classes == 10 and splits.class_names == FASHION_CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, N_TEST)
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert f"45 train / 5 val (held out from train) / {N_TEST} test" in splits.description

    mean, std = FASHION_MNIST.mean, FASHION_MNIST.std
    for i in range(N_TEST):
        image, label = splits.test[i]
        assert label == int(arrays[TEST_LABELS][i]) and isinstance(label, int)
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        assert torch.allclose(image, normalised(arrays[TEST_IMAGES][i], mean, std), atol=1e-6)
    first = splits.test[0][0]
    assert first[0, 27, 0].item() == pytest.approx((1.0 - mean) / std)  # pixel 255: the top of the range
    assert first[0, 0, 27].item() == pytest.approx((0.0 - mean) / std)  # pixel 0: the bottom
    # validation items are train images under the eval transform: no augmentation
    for k, j in enumerate(splits.val.indices):
        image, label = splits.val[k]
        assert label == int(arrays[TRAIN_LABELS][j])
        assert torch.allclose(image, normalised(arrays[TRAIN_IMAGES][j], mean, std), atol=1e-6)


def test_training_augmentation_shifts_by_up_to_2_pixels_and_never_flips(tmp_path):
    arrays = write_dataset(tmp_path)
    splits = load_dataset(f"fashion-mnist:{tmp_path}", DataRequest(28, 1))
    mean, std = FASHION_MNIST.mean, FASHION_MNIST.std
    j = splits.train.indices[0]
    padded = np.pad(arrays[TRAIN_IMAGES][j], 2)  # zero padding: black, the datasets' background
    shifts = set()
    torch.manual_seed(0)
    for _ in range(30):
        image, label = splits.train[0]
        assert label == int(arrays[TRAIN_LABELS][j]) and image.shape == (1, 28, 28)
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.allclose(image, normalised(padded[dy : dy + 28, dx : dx + 28], mean, std), atol=1e-6)
        ]
        assert len(matches) == 1, "not a shift of the image (flipped, scaled or not this image)"
        shifts.add(matches[0])
    assert len(shifts) > 3  # random, not one fixed crop


def test_holdout_follows_val_fraction_and_seed(tmp_path):
    write_dataset(tmp_path)
    spec = f"fashion-mnist:{tmp_path}"
    a = load_dataset(spec, DataRequest(28, 1, val_fraction=0.2, seed=0))
    b = load_dataset(spec, DataRequest(28, 1, val_fraction=0.2, seed=0))
    c = load_dataset(spec, DataRequest(28, 1, val_fraction=0.2, seed=1))
    assert len(a.val) == 10 and len(a.train) == 40
    assert a.val.indices == b.val.indices and a.val.indices != c.val.indices
    assert len(a.test) == len(c.test) == N_TEST  # the official test split whatever the seed


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (20, 1), (28, 3)])
def test_serving_eval_transform_equals_the_test_transform(tmp_path, size, channels):
    arrays = write_dataset(tmp_path)
    request = DataRequest(size, channels)
    splits = load_dataset(f"fashion-mnist:{tmp_path}", request)
    serving = eval_transform_for("fashion-mnist:/nowhere", request)  # built without the files
    for split in (splits.train, splits.val, splits.test):
        assert split[0][0].shape == (channels, size, size)
    for i in (0, 5):
        expected = splits.test[i][0]
        picture = Image.fromarray(arrays[TEST_IMAGES][i])
        assert torch.equal(serving(picture), expected)
        assert torch.equal(splits.eval_transform(picture), expected)
        assert torch.equal(pickle.loads(pickle.dumps(serving))(picture), expected)
        for c in range(1, channels):  # a grayscale dataset: the gray copied into every channel
            assert torch.equal(expected[c], expected[0])
    # A user's colour picture is made gray, as the model never saw colour.
    colour = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    assert torch.equal(serving(colour), serving(colour.convert("L")))
    assert serving(colour).shape == (channels, size, size)


def test_mnist_has_digit_classes_its_own_statistics_and_finds_torchvision_downloads(tmp_path):
    arrays = write_dataset(tmp_path / "root" / "MNIST" / "raw", GZ_CHOICES["gz"])
    splits = load_dataset(f"mnist:{tmp_path / 'root'}", DataRequest(28, 1))
    assert splits.class_names == [str(d) for d in range(10)]
    assert torch.allclose(splits.test[3][0], normalised(arrays[TEST_IMAGES][3], MNIST.mean, MNIST.std), atol=1e-6)
    assert splits.test[0][0][0, 27, 0].item() == pytest.approx((1.0 - 0.1307) / 0.3081)
    assert torch.equal(
        eval_transform_for("mnist:/x", DataRequest(28, 1))(Image.fromarray(arrays[TEST_IMAGES][3])), splits.test[3][0]
    )


def test_the_specs_are_listed():
    usages = dict(dataset_usages())
    assert "fashion-mnist:PATH" in usages and "mnist:PATH" in usages
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("fashion-mnist", DataRequest(28, 1))


# ------------------------------------------------------------------------- bad files


def _rewrite(
    name: str,
    array: np.ndarray | None = None,
    *,
    data: Callable[[bytes], bytes] = lambda b: b,
    gz: bool = False,
    dtype_code: int = 0x08,
) -> Callable[[Path, dict], str]:
    def corrupt(folder: Path, arrays: dict) -> str:
        raw = data(idx(arrays[name] if array is None else array, dtype_code))
        return write(folder, name, raw, gz).name

    return corrupt


def _damaged_gzip(folder: Path, arrays: dict) -> str:
    packed = gzip.compress(idx(arrays[TEST_IMAGES]))
    write(folder, TEST_IMAGES, b"", False).unlink()
    (folder / f"{TEST_IMAGES}.gz").write_bytes(packed[: len(packed) // 2])
    return f"{TEST_IMAGES}.gz"


def _labels_with_10(folder: Path, arrays: dict) -> str:
    labels = arrays[TEST_LABELS].copy()
    labels[3] = 10
    return write(folder, TEST_LABELS, idx(labels), False).name


BAD_FILES = {
    "wrong magic": (_rewrite(TRAIN_IMAGES, data=lambda b: b"\x01\x02" + b[2:]), "not an IDX file"),
    "not IDX at all": (_rewrite(TRAIN_LABELS, data=lambda b: b"hello, world"), "not an IDX file"),
    "float dtype code": (_rewrite(TRAIN_IMAGES, dtype_code=0x0D), "dtype code 0x0d"),
    "labels in the images file": (_rewrite(TEST_IMAGES, np.zeros(N_TEST, np.uint8)), "1 dimension"),
    "truncated raw": (_rewrite(TEST_IMAGES, data=lambda b: b[:-5]), "truncated"),
    "truncated in gzip": (_rewrite(TEST_IMAGES, data=lambda b: b[:-5], gz=True), "truncated"),
    "truncated header": (_rewrite(TRAIN_LABELS, data=lambda b: b[:6]), "header ends early"),
    "damaged gzip stream": (_damaged_gzip, "gzip stream is damaged or truncated"),
    "trailing bytes raw": (_rewrite(TRAIN_IMAGES, data=lambda b: b + b"\0\0\0"), "trailing bytes"),
    "trailing bytes in gzip": (_rewrite(TRAIN_IMAGES, data=lambda b: b + b"\0\0\0", gz=True), "trailing bytes"),
    "label count mismatch": (_rewrite(TRAIN_LABELS, np.zeros(N_TRAIN - 1, np.uint8)), f"{N_TRAIN} images but"),
    "label 10": (_labels_with_10, "label 10 at position 3, expected 0..9"),
    "images over 1024x1024": (
        _rewrite(
            TEST_IMAGES, data=lambda b: idx(np.zeros((1, 1, 1), np.uint8))[:4] + struct.pack(">3I", N_TEST, 2000, 2000)
        ),
        "2000x2000",
    ),
    "test images of another size": (_rewrite(TEST_IMAGES, np.zeros((N_TEST, 32, 32), np.uint8)), "28x28 images but"),
}


def test_non_square_images_are_refused_not_stretched(tmp_path):
    arrays = write_dataset(tmp_path)
    write(tmp_path, TRAIN_IMAGES, idx(np.zeros((N_TRAIN, 28, 20), np.uint8)), False)
    write(tmp_path, TEST_IMAGES, idx(np.zeros((N_TEST, 28, 20), np.uint8)), True)
    assert arrays  # labels stay valid: only the image shape is wrong
    with pytest.raises(DatasetError, match="28x20 images") as info:
        load_dataset(f"mnist:{tmp_path}", DataRequest(28, 1))
    assert TRAIN_IMAGES in info.value.message and "imagefolder" in info.value.message


def test_a_path_is_taken_as_written_and_a_stray_space_is_pointed_out(tmp_path):
    spaced = tmp_path / "fm "  # a folder whose name ends with a space is a valid folder
    write_dataset(spaced)
    splits = load_dataset(f"fashion-mnist:{spaced}", DataRequest(28, 1))
    assert len(splits.test) == N_TEST
    plain = tmp_path / "plain"
    write_dataset(plain)
    with pytest.raises(DatasetError, match="does not exist") as info:
        load_dataset(f"fashion-mnist:{plain} ", DataRequest(28, 1))
    assert "without the surrounding spaces" in info.value.message


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_refused_naming_it(tmp_path, case):
    corrupt, needle = BAD_FILES[case]
    arrays = write_dataset(tmp_path)
    name = corrupt(tmp_path, arrays)
    with pytest.raises(DatasetError) as info:
        load_dataset(f"fashion-mnist:{tmp_path}", DataRequest(28, 1))
    assert needle in info.value.message
    assert name in info.value.message
    assert info.value.field == "dataset"


def test_a_missing_file_is_named_with_what_is_expected(tmp_path):
    write_dataset(tmp_path)
    os.remove(tmp_path / TEST_LABELS)
    with pytest.raises(DatasetError) as info:
        load_dataset(f"fashion-mnist:{tmp_path}", DataRequest(28, 1))
    message = info.value.message
    assert f"lacks {TEST_LABELS} (raw or .gz)" in message
    assert all(name in message for name in ALL_FILES)
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset(f"mnist:{tmp_path / TRAIN_IMAGES}", DataRequest(28, 1))


@contextlib.contextmanager
def peak_allocation() -> dict:
    """Peak bytes Python and numpy allocate inside the block."""
    result = {}
    tracemalloc.start()
    try:
        yield result
    finally:
        result["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@pytest.mark.parametrize("gz", [False, True])
def test_a_header_claiming_a_billion_images_is_refused_before_reading(tmp_path, gz):
    write_dataset(tmp_path)
    lie = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10**9, 28, 28) + bytes(1000)
    write(tmp_path, TRAIN_IMAGES, lie, gz)
    started = time.perf_counter()
    with peak_allocation() as memory, pytest.raises(DatasetError) as info:
        load_dataset(f"fashion-mnist:{tmp_path}", DataRequest(28, 1))
    assert time.perf_counter() - started < 5
    assert memory["peak"] < 4 * 2**20  # far from the 784 GB the header asks for
    assert "1,000,000,000 images" in info.value.message and TRAIN_IMAGES in info.value.message


def _gzip_bomb(payload: bytes, extra_mib: int) -> bytes:
    """A valid gzip file of ``payload`` followed by ``extra_mib`` MiB of zeros, built without
    compressing them one by one: a fully flushed deflate block of 1 MiB of zeros needs nothing
    before it, so copies of it are a valid stream."""
    zeros = bytes(2**20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = deflate.compress(payload) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.flush(zlib.Z_FINISH)
    crc = zlib.crc32(payload)
    for _ in range(extra_mib):
        crc = zlib.crc32(zeros, crc)
    size = (len(payload) + extra_mib * len(zeros)) & 0xFFFFFFFF
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + start + block * extra_mib + end + struct.pack("<II", crc, size)


def test_a_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    arrays = write_dataset(tmp_path)
    bomb = _gzip_bomb(idx(arrays[TEST_IMAGES]), extra_mib=512)  # 20 images declared, 512 MiB inside
    assert len(bomb) < 2**20
    (tmp_path / f"{TEST_IMAGES}.gz").write_bytes(bomb)
    os.remove(tmp_path / TEST_IMAGES)
    # the file is a well-formed gzip stream: only the size its header declares gives it away
    with gzip.open(tmp_path / f"{TEST_IMAGES}.gz") as f:
        assert f.read(len(idx(arrays[TEST_IMAGES]))) == idx(arrays[TEST_IMAGES])
    with peak_allocation() as memory, pytest.raises(DatasetError) as info:
        load_dataset(f"fashion-mnist:{tmp_path}", DataRequest(28, 1))
    assert memory["peak"] < 16 * 2**20
    assert "trailing bytes" in info.value.message and f"{TEST_IMAGES}.gz" in info.value.message


def test_a_compressible_images_file_whose_count_disagrees_with_its_labels_costs_no_memory(tmp_path):
    """A small .gz declaring (and holding) two million images, beside a labels file of 50: the two
    headers disagree, which is seen before any image byte is decompressed."""
    write_dataset(tmp_path)
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2_000_000, 28, 28)
    (tmp_path / f"{TRAIN_IMAGES}.gz").write_bytes(_gzip_bomb(header, extra_mib=1496))  # 1.5 GB inside, ~1.5 MB on disk
    os.remove(tmp_path / TRAIN_IMAGES)
    started = time.perf_counter()
    with peak_allocation() as memory, pytest.raises(DatasetError) as info:
        load_dataset(f"fashion-mnist:{tmp_path}", DataRequest(28, 1))
    assert time.perf_counter() - started < 5
    assert memory["peak"] < 16 * 2**20
    message = info.value.message
    assert "2,000,000 images" in message and TRAIN_IMAGES in message and TRAIN_LABELS in message


def test_data_is_read_into_one_array_without_a_second_copy(tmp_path):
    """Peak memory of a good (gzipped) file is about its data, not twice it."""
    big = np.random.default_rng(0).integers(0, 256, (16000, 28, 28), dtype=np.uint8)  # 12.5 MB
    write(tmp_path, TRAIN_IMAGES, idx(big), True)
    with peak_allocation() as memory:
        images = _read_idx(str(tmp_path / f"{TRAIN_IMAGES}.gz"), 3, ())
    assert np.array_equal(images, big)
    assert memory["peak"] < big.nbytes * 1.5  # the array plus a chunk or two of buffers


def _as_directory(path: Path) -> str:
    path.mkdir()
    return "a directory"


def _as_broken_link(path: Path) -> str:
    os.symlink(path.parent / "nowhere", path)
    return "a broken symbolic link"


def _as_device(path: Path) -> str:
    os.symlink("/dev/zero", path)
    return "a device"


@pytest.mark.parametrize("make", [_as_directory, _as_broken_link, _as_device])
def test_an_entry_that_is_not_a_file_is_named_for_what_it_is(tmp_path, make):
    write_dataset(tmp_path)
    os.remove(tmp_path / TEST_IMAGES)
    what = make(tmp_path / TEST_IMAGES)
    with pytest.raises(DatasetError) as info:
        load_dataset(f"fashion-mnist:{tmp_path}", DataRequest(28, 1))
    message = info.value.message
    assert what in message and TEST_IMAGES in message and "lacks" not in message


@pytest.mark.parametrize(
    ("name", "count", "needle"),
    [
        (TRAIN_LABELS, 0, "at least 2"),
        (TRAIN_LABELS, 1, "at least 2"),
        (TEST_LABELS, 0, "at least 1"),
    ],
)
def test_too_few_images_name_the_file(tmp_path, name, count, needle):
    write_dataset(tmp_path)
    write(tmp_path, name, idx(np.zeros(count, np.uint8)), False)
    images = TRAIN_IMAGES if name == TRAIN_LABELS else TEST_IMAGES
    write(tmp_path, images, idx(np.zeros((count, 28, 28), np.uint8)), False)
    with pytest.raises(DatasetError) as info:
        load_dataset(f"fashion-mnist:{tmp_path}", DataRequest(28, 1))
    assert name in info.value.message and needle in info.value.message
    assert "val/ folder" not in info.value.message


def test_digits_at_a_large_image_size_are_preprocessed_per_item():
    """1797 images at 2048 px would be 30 GB preprocessed at once; items are made when read, with
    the values the eager path gives."""
    big = load_dataset("digits", DataRequest(2048, 3))
    assert big.test.images.shape[-2:] == (8, 8)  # native pixels held, not 2048x2048 ones
    image, _ = big.test[0]
    assert image.shape == (3, 2048, 2048)
    from sklearn.datasets import load_digits

    from dg2pf_core.data import digits

    native = torch.from_numpy(load_digits().images / 16.0)
    request = DataRequest(64, 1)
    eager = digits._to_model_input(native[:5], request)
    lazy = digits._DigitImages(native[:5], torch.zeros(5, dtype=torch.int64), 1, lazy=request)
    assert all(torch.equal(lazy[i][0], eager[i]) for i in range(5))


# ---------------------------------------------------------------------------- allowed roots


def test_allowed_roots_apply(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_dataset(root / "fm")
    write_dataset(outside / "fm")
    confined = DataRequest(28, 1, allowed_roots=(str(root),))
    assert len(load_dataset(f"fashion-mnist:{root / 'fm'}", confined).test) == N_TEST
    with pytest.raises(DatasetError, match="outside the allowed roots"):
        load_dataset(f"fashion-mnist:{outside / 'fm'}", confined)
    # one file linked to a copy outside the roots
    os.remove(root / "fm" / TRAIN_LABELS)
    os.symlink(outside / "fm" / TRAIN_LABELS, root / "fm" / TRAIN_LABELS)
    with pytest.raises(DatasetError, match="outside the allowed roots") as info:
        load_dataset(f"fashion-mnist:{root / 'fm'}", confined)
    assert TRAIN_LABELS in info.value.message
    # a link swapped in after the walk is still not read: the file actually opened is checked
    with pytest.raises(DatasetError, match="outside the allowed roots") as info:
        _read_idx(str(root / "fm" / TRAIN_LABELS), 1, (str(root),))
    assert TRAIN_LABELS in info.value.message


def test_the_service_checks_the_new_specs_against_its_data_roots(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("DG2PF_"):
            monkeypatch.delenv(key)
    from dg2pf_service.settings import Settings
    from dg2pf_service.validation import InvalidJob, check_dataset

    root = tmp_path / "datasets"
    write_dataset(root / "fm", GZ_CHOICES["gz"])
    write_dataset(tmp_path / "elsewhere")
    settings = Settings(data_dir=tmp_path / "state", data_roots=[root])
    check_dataset(f"fashion-mnist:{root / 'fm'}", settings)
    check_dataset(f"mnist:{root / 'fm'}", settings)
    for spec, needle in (
        (f"fashion-mnist:{tmp_path / 'elsewhere'}", "outside DG2PF_DATA_ROOTS"),
        ("fashion-mnist", "needs a path"),
        (f"mnist:{root / 'nope'}", "does not exist"),
    ):
        with pytest.raises(InvalidJob, match=needle) as info:
            check_dataset(spec, settings)
        assert info.value.field == "dataset.spec"


# ------------------------------------------------------------------------------------- CLI


def dg2pf(*args: str) -> subprocess.CompletedProcess:
    from dg2pf_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # --help
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def digits_cnn_ckpt(tmp_path_factory) -> Path:
    from dg2pf_core.io.checkpoint_save import save_state_dict
    from dg2pf_core.models import build_model

    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    torch.manual_seed(0)
    save_state_dict(build_model("digits_cnn", 10).state_dict(), path)
    return path


def test_cli_refuses_a_missing_folder_with_one_line(tmp_path, digits_cnn_ckpt):
    out = tmp_path / "out"
    result = dg2pf(
        "prune",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(digits_cnn_ckpt),
        "--dataset",
        "fashion-mnist:/nonexistent",
        "--sparsity",
        "0.9",
        "--out",
        str(out),
        "--quiet",
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dg2pf: error:") and "/nonexistent" in lines[0]
    assert not out.exists()


def test_cli_lists_the_specs_and_evaluates_on_idx_files(tmp_path, digits_cnn_ckpt):
    help_text = dg2pf("prune", "--help").stdout
    assert "fashion-mnist:PATH" in help_text and "mnist:PATH" in help_text
    write_dataset(tmp_path / "fm", GZ_CHOICES["mixed"])
    result = dg2pf(
        "evaluate",
        "--arch",
        "digits_cnn",
        "--num-classes",
        "10",
        "--checkpoint",
        str(digits_cnn_ckpt),
        "--dataset",
        f"fashion-mnist:{tmp_path / 'fm'}",
        "--image-size",
        "28",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == N_TEST and report["split"] == "test"
