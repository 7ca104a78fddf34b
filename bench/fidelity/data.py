"""The benchmark's data. Two sources, chosen by ``DataSettings.dataset``:

- ``digits`` (the original grid): scikit-learn digits at 32x32x3, one fixed stratified split for
  every cell, built here (``Split``: tensors).
- ``fashion-mnist``: the product's own data path (``JobSplit``): the dataset spec
  ``fashion-mnist:DIR`` through dg2pf_core's registry and its real transforms (the ``shift``
  augmentation, the eval transform serving uses), the validation split held out from the official
  training set with the cell's seed exactly as ``dg2pf prune`` holds it out, the official 10,000
  test images. Pruning cells train on a fixed, uniformly drawn subset of the training split
  (``train_subset`` images; the same indices for every method of a seed); pre-training uses all of it.

The digits part:

dg2pf_core's ``digits`` dataset holds out its validation split with the run's seed; here every model,
method and seed must see the same train/val/test images, so the split is fixed (seed 0) and built
here, from the same preprocessing constants as dg2pf_core (bilinear 8 -> 32, normalised by the
dataset's pixel mean and std). The split is also written to an ``.npz`` so the INC runner, which lives
in its own virtual environment without dg2pf_core, trains on the identical arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from dg2pf_core.data import DataRequest, DataSplits, load_dataset
from dg2pf_core.data.digits import DIGITS_MEAN, DIGITS_STD
from dg2pf_core.data.loaders import LocalLoaders

DATASETS = ("digits", "fashion-mnist")
# Where the four IDX files are (Debian/Ubuntu: apt-get install dataset-fashion-mnist).
FASHION_MNIST_DIR = os.environ.get("DG2PF_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DataSettings:
    image_size: int = 32
    channels: int = 3
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    # Random shift: pad by this many pixels (edge value), crop back to image_size. 0 = off.
    augment_pad: int = 2
    # The job-path datasets (fashion-mnist): the fraction of the training set held out for validation
    # (PruneJob.val_fraction) and the training images a pruning cell uses (0 = all).
    dataset: str = "digits"
    job_val_fraction: float = 0.05
    train_subset: int = 0

    def key(self) -> str:
        values = asdict(self)
        if self.dataset == "digits":  # the fields added for fashion-mnist do not change digits' keys
            for name in ("dataset", "job_val_fraction", "train_subset"):
                values.pop(name)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def job_path(self) -> bool:
        return self.dataset != "digits"

    def spec(self) -> str:
        """The dataset spec a user's job would give (``fashion-mnist:DIR``)."""
        return f"{self.dataset}:{FASHION_MNIST_DIR}"


def settings_for_dataset(dataset: str, train_subset: int | None = None, image_size: int | None = None) -> DataSettings:
    """The settings of each source: digits as before; fashion-mnist at its native 28 px (or
    ``image_size``: upsampled by the product's transform, as a job with ``--image-size`` has it), 5% of
    the training set held out for validation, pruning cells on 8,000 training images unless told."""
    if dataset == "digits":
        if image_size is not None:
            raise ValueError("digits runs at its fixed 32 px")
        return DataSettings()
    if dataset == "fashion-mnist":
        return DataSettings(
            image_size=image_size or 28,
            augment_pad=0,
            dataset=dataset,
            job_val_fraction=0.05,
            train_subset=8_000 if train_subset is None else train_subset,
        )
    raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")


@dataclass
class Split:
    x_train: torch.Tensor  # float32 [N, 3, 32, 32], normalised
    y_train: torch.Tensor  # int64 [N]
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def sizes(self) -> str:
        return f"{len(self.y_train)} train / {len(self.y_val)} val / {len(self.y_test)} test"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_val.shape[1:])

    def eval_sets(self) -> tuple[Dataset, Dataset]:
        return TensorDataset(self.x_val, self.y_val), TensorDataset(self.x_test, self.y_test)


@dataclass
class JobSplit:
    """The product's data for one seed (see the module docstring); items ``(float [3, S, S], label)``."""

    spec: str  # the dataset spec, as a user's job gives it
    splits: DataSplits  # train already cut to the subset
    image_size: int
    seed: int
    train_full: int  # training images before the subset

    def sizes(self) -> str:
        return (
            f"{len(self.splits.train)} train (of {self.train_full}) / {len(self.splits.val)} val / "
            f"{len(self.splits.test)} test, augment {self.splits.augment}"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def eval_sets(self) -> tuple[Dataset, Dataset]:
        return self.splits.val, self.splits.test


def train_subset(train: Dataset, size: int, seed: int) -> Dataset:
    """``size`` images of ``train`` drawn uniformly without replacement with ``seed`` (sorted
    indices); ``train`` itself when ``size`` is 0 or not smaller."""
    n = len(train)  # type: ignore[arg-type]
    if size <= 0 or size >= n:
        return train
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    return Subset(train, sorted(order[:size].tolist()))


def job_request(settings: DataSettings, seed: int) -> DataRequest:
    """What ``dg2pf prune --image-size S --val-fraction F --seed K`` asks of the data loader: the same
    request ``dg2pf_core.job.prepare`` makes, so the harness's peers and the product's jobs get the
    same images, hold-out and transforms."""
    return DataRequest(
        image_size=settings.image_size, in_channels=settings.channels, val_fraction=settings.job_val_fraction, seed=seed
    )


def load_job_split(settings: DataSettings, seed: int, *, subset: bool = True) -> JobSplit:
    splits = load_dataset(settings.spec(), job_request(settings, seed))
    full = len(splits.train)  # type: ignore[arg-type]
    if subset:
        splits.train = train_subset(splits.train, settings.train_subset, seed)
    return JobSplit(settings.spec(), splits, settings.image_size, seed, full)


def load_split(settings: DataSettings = DataSettings()) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    idx = np.arange(len(labels))
    rest, test_idx = train_test_split(
        idx, test_size=settings.test_fraction, stratify=labels, random_state=settings.split_seed
    )
    # val_fraction is of the whole dataset, so 60/20/20 reads as written.
    val_share = settings.val_fraction / (1.0 - settings.test_fraction)
    train_idx, val_idx = train_test_split(
        rest, test_size=val_share, stratify=labels[rest], random_state=settings.split_seed
    )
    pixels = torch.from_numpy(bunch.images / 16.0).to(torch.float32).unsqueeze(1)
    x = F.interpolate(pixels, size=(settings.image_size,) * 2, mode="bilinear", align_corners=False)
    x = ((x - DIGITS_MEAN) / DIGITS_STD).repeat(1, settings.channels, 1, 1).contiguous()
    y = torch.from_numpy(labels)
    pick = lambda i: (x[torch.from_numpy(i)], y[torch.from_numpy(i)])  # noqa: E731
    (xtr, ytr), (xva, yva), (xte, yte) = pick(train_idx), pick(val_idx), pick(test_idx)
    return Split(xtr, ytr, xva, yva, xte, yte)


def export_npz(split: Split, path: Path) -> Path:
    """Write the split for the INC runner; rewritten only when missing (the name carries the settings key)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{k: v.numpy() for k, v in vars(split).items()})
        tmp.replace(path)
    return path


class ShiftAugmented(Dataset):
    """Train images shifted by up to ``pad`` pixels. Draws from torch's global RNG, which
    ``run_dg2pf`` and the other methods seed with the cell's seed, so a cell is reproducible."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pad: int) -> None:
        self.x, self.y, self.pad = x, y, pad
        self.padded = F.pad(x, (pad,) * 4, mode="replicate") if pad else x

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not self.pad:
            return self.x[i], int(self.y[i])
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        size = self.x.shape[-1]
        return self.padded[i, :, dy : dy + size, dx : dx + size], int(self.y[i])


def loaders(
    split: Split | JobSplit, settings: DataSettings, *, batch_size: int, seed: int, eval_batch_size: int = 256
) -> LocalLoaders:
    """dg2pf_core's single-process loaders over the split; the shuffling depends on ``seed``."""
    if isinstance(split, JobSplit):
        s = split.splits
        return LocalLoaders(s.train, s.val, s.test, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
    return LocalLoaders(
        ShiftAugmented(split.x_train, split.y_train, settings.augment_pad),
        TensorDataset(split.x_val, split.y_val),
        TensorDataset(split.x_test, split.y_test),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
    )
