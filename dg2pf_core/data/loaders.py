"""Batches for the loop: what the DG2PF loop iterates over, per split.

The loop asks for a split's batches through the ``Loaders`` protocol, so a distributed runner can
hand it sharded loaders without the loop knowing. ``LocalLoaders`` is the single-process version.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset

Batch = tuple[torch.Tensor, torch.Tensor]


class Loaders(Protocol):
    def train(self, epoch: int) -> Iterable[Batch]: ...
    def train_batches(self) -> int: ...
    def val(self) -> Iterable[Batch]: ...
    def test(self) -> Iterable[Batch] | None: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling of epoch ``epoch`` depends only on (seed, epoch): a resumed run sees the same order."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


class ShardedLoaders:
    """One rank's share of each split under data-parallel training.

    Train: every epoch a permutation that depends only on (seed, epoch), cut into equal shards so
    every rank runs the same number of steps (DDP requires it); the global batch stays
    ``batch_size`` (``batch_size // world`` per rank). Val/test: disjoint shards covering the split
    exactly once, so summing correct counts over ranks gives the accuracy of the whole split.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset | None,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self._train, self._val, self._test = train, val, test
        self._rank, self._world = rank, world_size
        self._batch = max(1, batch_size // world_size)
        self._eval_batch, self._seed = eval_batch_size, seed
        self._kw = {"num_workers": workers, "pin_memory": pin_memory}

    def _train_indices(self, epoch: int) -> list[int]:
        n = len(self._train)
        perm = torch.randperm(n, generator=epoch_generator(self._seed, epoch)).tolist()
        usable = (n // self._world) * self._world
        return perm[self._rank : usable : self._world]

    def train(self, epoch: int) -> DataLoader:
        shard = Subset(self._train, self._train_indices(epoch))
        return DataLoader(shard, batch_size=self._batch, shuffle=False, drop_last=len(shard) > self._batch, **self._kw)

    def train_batches(self) -> int:
        n = len(self._train) // self._world
        return n // self._batch if n > self._batch else 1

    def _eval(self, data: Dataset) -> DataLoader:
        shard = Subset(data, range(self._rank, len(data), self._world))
        return DataLoader(shard, batch_size=self._eval_batch, shuffle=False, **self._kw)

    def val(self) -> DataLoader:
        return self._eval(self._val)

    def test(self) -> DataLoader | None:
        return None if self._test is None else self._eval(self._test)


class LocalLoaders(ShardedLoaders):
    """The single-process case: the whole of every split, one shard."""

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset | None,
        *,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            train,
            val,
            test,
            rank=0,
            world_size=1,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            workers=workers,
            pin_memory=pin_memory,
        )
