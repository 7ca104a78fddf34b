"""Reading and writing model weights safely.

Checkpoints come from users, so reading one must never run code: ``.safetensors`` files are
pure data, and everything else goes through ``torch.load(weights_only=True)``, which refuses
pickled objects other than tensors and plain containers. Every way a file can be unusable
(missing, corrupt, pickled objects, wrong shapes) becomes a :class:`CheckpointError` that
names the file and what to do.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from dg2pf_core.errors import CheckpointError

# Training scripts commonly save {"state_dict": ...} or {"model": ...} next to optimiser state.
_WRAPPER_KEYS = ("state_dict", "model")
# nn.DataParallel / DistributedDataParallel prefix every key with this.
_DDP_PREFIX = "module."
_MAX_NAMES = 3

_SAFE_FORMAT_HINT = (
    "save a plain state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping stored in ``path``, on CPU, without unpickling objects.

    Accepts ``.safetensors`` files (dense, or the compact sparse artifacts of
    :mod:`dg2pf_core.compact`, given back dense) and ``torch.save`` files of a state_dict, optionally
    wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` and/or with DDP's ``module.`` prefix.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the path of a weights file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); was it fully written?")

    if path.suffix == ".safetensors":
        from dg2pf_core.compact import is_compact, load_compact  # imported here: compact imports this module

        raw = load_compact(path) if is_compact(path) else _load_safetensors(path)
    else:
        raw = _load_torch(path)
    return _as_state_dict(raw, path)


def _load_safetensors(path: Path) -> object:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e
    except Exception as e:  # SafetensorError and friends: header or data is malformed
        raise CheckpointError(
            f"checkpoint {path} is not a valid .safetensors file ({_short(e)}); "
            "it may be truncated or corrupt"
        ) from e


def _load_torch(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            # Harmless notice about pickle protocol versions; the load either works or we raise.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            detail = f" (it references {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} contains pickled Python objects{detail}, which dg2pf refuses to load "
                f"for safety; {_SAFE_FORMAT_HINT}"
            ) from e
        raise _corrupt(path, e) from e
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e
    except Exception as e:  # torch raises RuntimeError/EOFError/KeyError/... on garbage bytes
        raise _corrupt(path, e) from e


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is not a readable PyTorch or safetensors file "
        f"({_short(e)}); it may be truncated or corrupt"
    )


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _as_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(raw, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if wrapper is None:
            break
        raw = raw[wrapper]
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(raw).__name__}, not a mapping of parameter names "
            f"to tensors; {_SAFE_FORMAT_HINT}"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path} maps {key!r} to a {type(value).__name__}; a state_dict maps "
                f"names to tensors only; {_SAFE_FORMAT_HINT}"
            )
        state[key] = value
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    if all(k.startswith(_DDP_PREFIX) for k in state):
        state = {k[len(_DDP_PREFIX) :]: v for k, v in state.items()}
    return state


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str = "checkpoint",
    arch: str | None = None,
) -> None:
    """Copy ``state_dict`` into ``model`` strictly, converting to the model's dtypes.

    Raises :class:`CheckpointError` listing every kind of mismatch (keys the model lacks, keys
    the checkpoint lacks, shape mismatches) before touching the model. ``what`` names the
    source and ``arch`` the target in that message.
    """
    expected = model.state_dict()
    unexpected = [k for k in state_dict if k not in expected]
    # BatchNorm fills in a missing counter itself (checkpoints from before it existed lack it),
    # and it does not affect the forward pass, so its absence is not a misfit.
    missing = [
        k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")
    ]
    mismatched = [
        k
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if unexpected or missing or mismatched:
        target = arch or f"the {type(model).__name__} model"
        parts = []
        if unexpected:
            parts.append(
                f"{_count(len(unexpected), 'key')} the model lacks (first: {_first(unexpected)})"
            )
        if missing:
            parts.append(
                f"{_count(len(missing), 'key')} missing from the {what} (first: {_first(missing)})"
            )
        if mismatched:
            shapes = ", ".join(
                f"{k}: {what} {_shape(state_dict[k])} vs model {_shape(expected[k])}"
                for k in mismatched[:_MAX_NAMES]
            )
            more = ", ..." if len(mismatched) > _MAX_NAMES else ""
            count = _count(len(mismatched), "shape mismatch", "shape mismatches")
            parts.append(f"{count} ({shapes}{more})")
        raise CheckpointError(f"{what} does not fit {target}: " + ", ".join(parts))

    # load_state_dict copies in place (param.copy_), which converts dtype and device.
    model.load_state_dict(dict(state_dict), strict=True)


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _first(names: list[str]) -> str:
    return ", ".join(names[:_MAX_NAMES])


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


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
        safetensors.torch.save_file(
            tensors, str(tmp), metadata=dict(metadata) if metadata else None
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so large checkpoints stay cheap."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
