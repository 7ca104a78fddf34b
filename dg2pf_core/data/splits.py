"""The validation hold-out: a seeded, disjoint slice of the training data.

The paper's early stopping scores on validation data, never on the test set; datasets that ship
no validation split give up ``val_fraction`` of their training images for it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset

from dg2pf_core.errors import DatasetError

# A class with fewer training images than this is named in the job's warnings: it is learnt from a handful
# of examples, and its test figures rest on them.
MIN_TRAIN_PER_CLASS = 5


def hold_out_indices(
    n: int, val_fraction: float, seed: int, labels: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """``(train_indices, val_indices)`` of ``range(n)``, ``val_fraction`` of them held out.

    With ``labels`` (one per item) the hold-out is stratified: the ``round(n * val_fraction)`` images
    are shared out among the classes in proportion to their sizes, and a class never gives its last
    image (a class with one image is never held out, so every class is trained on); without, a plain
    permutation is cut. Depends only on the
    arguments, so a resumed or repeated run validates on the same images. Both parts are non-empty.
    """
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        n_val = max(1, int(round(n * val_fraction)))
        if n - n_val < 1:
            raise _too_few(n, val_fraction)
        order = torch.randperm(n, generator=generator).tolist()
        return sorted(order[n_val:]), sorted(order[:n_val])
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} items")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[int(label)].append(i)
    classes = sorted(by_class)
    n_val = max(1, int(round(n * val_fraction)))
    caps = {c: len(by_class[c]) - 1 for c in classes}  # a class's last image always trains
    if n_val > sum(caps.values()):
        raise _too_few(n, val_fraction)
    # Each class's share of the held-out count, in proportion to its size (largest remainders first, ties
    # by class), so the hold-out is exactly round(n x val_fraction) images, as without labels.
    quota = {c: len(by_class[c]) * n_val / n for c in classes}
    take = {c: min(int(quota[c]), caps[c]) for c in classes}
    for c in sorted(classes, key=lambda c: (-(quota[c] - int(quota[c])), c)) * 2:
        if sum(take.values()) >= n_val:
            break
        if take[c] < caps[c]:
            take[c] += 1
    while sum(take.values()) < n_val:  # caps bound the shares of small classes: the large ones give more
        c = max((c for c in classes if take[c] < caps[c]), key=lambda c: caps[c] - take[c])
        take[c] += 1
    val: list[int] = []
    for c in classes:
        order = torch.randperm(len(by_class[c]), generator=generator).tolist()
        val.extend(by_class[c][j] for j in order[: take[c]])
    held = set(val)
    return [i for i in range(n) if i not in held], sorted(val)


def _too_few(n: int, val_fraction: float) -> DatasetError:
    return DatasetError(
        f"{n} training image(s) are too few to hold out a validation split (val_fraction={val_fraction}); add "
        "images or provide a val/ folder",
        field="val_fraction",
    )


def hold_out(
    train_view: Dataset, val_view: Dataset, val_fraction: float, seed: int, labels: Sequence[int] | None = None
) -> tuple[Subset, Subset]:
    """Split one base dataset seen through two views (augmented / eval transform), per class with
    ``labels`` (``hold_out_indices``).

    The views must index the same images; the train subset takes its items from
    ``train_view``, the validation subset from ``val_view``, on disjoint indices.
    """
    n, n_val_view = len(train_view), len(val_view)  # type: ignore[arg-type]
    if n_val_view != n:
        raise ValueError(f"views differ in length: {n} vs {n_val_view}")
    train_idx, val_idx = hold_out_indices(n, val_fraction, seed, labels)
    return Subset(train_view, train_idx), Subset(val_view, val_idx)


def rare_class_warnings(train_labels: Sequence[int], class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """A warning naming the classes with fewer than ``MIN_TRAIN_PER_CLASS`` training images (none: [])."""
    counts = Counter(int(label) for label in train_labels)
    rare = [(c, counts.get(c, 0)) for c in range(num_classes) if counts.get(c, 0) < MIN_TRAIN_PER_CLASS]
    if not rare:
        return []
    name = (lambda c: repr(class_names[c])) if class_names else str  # noqa: E731
    shown = ", ".join(f"{name(c)} {k}" for c, k in rare[:10]) + (
        f" and {len(rare) - 10} more" if len(rare) > 10 else ""
    )
    return [
        f"{len(rare)} class(es) have fewer than {MIN_TRAIN_PER_CLASS} training images ({shown}): their accuracy rests "
        "on a handful of examples; add images of them"
    ]
