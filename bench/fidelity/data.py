"""The benchmark's data: scikit-learn digits at 32x32x3, one fixed stratified split for every cell.

dg2pf_core's ``digits`` dataset holds out its validation split with the run's seed; here every model,
method and seed must see the same train/val/test images, so the split is fixed (seed 0) and built
here, from the same preprocessing constants as dg2pf_core (bilinear 8 -> 32, normalised by the
dataset's pixel mean and std). The split is also written to an ``.npz`` so the INC runner, which lives
in its own virtual environment without dg2pf_core, trains on the identical arrays.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from dg2pf_core.data.digits import DIGITS_MEAN, DIGITS_STD
from dg2pf_core.loaders import LocalLoaders


@dataclass(frozen=True)
class DataSettings:
    image_size: int = 32
    channels: int = 3
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    # Random shift: pad by this many pixels (edge value), crop back to image_size. 0 = off.
    augment_pad: int = 2

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


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


def loaders(split: Split, settings: DataSettings, *, batch_size: int, seed: int, eval_batch_size: int = 256) -> LocalLoaders:
    """dg2pf_core's single-process loaders over the fixed split; the shuffling depends on ``seed``."""
    return LocalLoaders(
        ShiftAugmented(split.x_train, split.y_train, settings.augment_pad),
        TensorDataset(split.x_val, split.y_val),
        TensorDataset(split.x_test, split.y_test),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
    )
