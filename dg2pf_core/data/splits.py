"""The validation hold-out: a seeded, disjoint slice of the training data.

The paper's early stopping scores on validation data, never on the test set; datasets that ship
no validation split give up ``val_fraction`` of their training images for it.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from dg2pf_core.errors import DatasetError


def hold_out_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train_indices, val_indices)``: a permutation of ``range(n)`` cut at ``val_fraction``.

    Depends only on ``(n, val_fraction, seed)``, so a resumed or repeated run validates on the
    same images. Both parts are non-empty.
    """
    n_val = int(round(n * val_fraction))
    n_val = max(1, n_val)
    if n - n_val < 1:
        raise DatasetError(
            f"{n} training image(s) are too few to hold out a validation split "
            f"(val_fraction={val_fraction}); add images or provide a val/ folder",
            field="val_fraction",
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def hold_out(
    train_view: Dataset, val_view: Dataset, val_fraction: float, seed: int
) -> tuple[Subset, Subset]:
    """Split one base dataset seen through two views (augmented / eval transform).

    The views must index the same images; the train subset takes its items from
    ``train_view``, the validation subset from ``val_view``, on disjoint indices.
    """
    n, n_val_view = len(train_view), len(val_view)  # type: ignore[arg-type]
    if n_val_view != n:
        raise ValueError(f"views differ in length: {n} vs {n_val_view}")
    train_idx, val_idx = hold_out_indices(n, val_fraction, seed)
    return Subset(train_view, train_idx), Subset(val_view, val_idx)
