"""Fashion-MNIST/MNIST folders written in the exact IDX format (raw or gzipped), for the data tests and the
fidelity harness's."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

N_TRAIN, N_TEST = 50, 20
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
ALL_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


def idx(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """``array`` in the IDX format: 0x0000, dtype code, dims, big-endian uint32 sizes, data."""
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write(folder: Path, name: str, data: bytes, gz: bool) -> Path:
    for stale in (folder / name, folder / f"{name}.gz"):
        stale.unlink(missing_ok=True)
    path = folder / (f"{name}.gz" if gz else name)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_dataset(folder: Path, gz: Callable[[str], bool] = lambda name: False, seed: int = 0) -> dict[str, np.ndarray]:
    """Random pixels with two known ones in the first test image; labels 0..9 in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN_IMAGES: rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: (np.arange(N_TRAIN) % 10).astype(np.uint8),
        TEST_IMAGES: rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        TEST_LABELS: ((np.arange(N_TEST) * 3) % 10).astype(np.uint8),
    }
    arrays[TEST_IMAGES][0, 27, 0] = 255
    arrays[TEST_IMAGES][0, 0, 27] = 0
    for name, array in arrays.items():
        write(folder, name, idx(array), gz(name))
    return arrays
