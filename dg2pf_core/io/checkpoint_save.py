"""Writing model weights: a state_dict as a ``.safetensors`` file, atomically (reading them, from
whatever a user gives: :mod:`dg2pf_core.io.checkpoints`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` as a ``.safetensors`` file, atomically.

    The file appears complete or not at all: it is written beside ``path`` and renamed over it,
    so a crash or a concurrent reader never sees half a checkpoint.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of one buffer);
        # a private copy for each one after the first keeps the values and drops the aliasing.
        ptr = t.untyped_storage().data_ptr()
        owns_whole_storage = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if t.numel() and (ptr in seen_storages or not owns_whole_storage):
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen_storages.add(ptr)
        tensors[key] = t

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        except safetensors.SafetensorError as exc:  # its I/O failures (no such folder, permission, no space) as OSError
            raise OSError(f"cannot write {path}: {exc}") from exc
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
