"""Compact sparse artifacts: a pruned state_dict as bitmask + nonzero values, in one ``.safetensors``.

Each floating-point tensor whose bitmask + values take fewer bytes than its dense form is stored as
two tensors: ``np.packbits(t != 0)`` over the flattened tensor (uint8) and the nonzero values in
order (1-D). Everything else (integer buffers such as ``num_batches_tracked``, dense float tensors,
empty tensors) is stored as it is. The file is pure data: the layout lives in the safetensors
metadata as compact JSON, a list of ``[name, encoding, dtype, shape]`` in state_dict order, and
tensors are keyed by position (``"3"`` dense, ``"3m"``/``"3v"`` mask/values) so no name is stored
twice. Metadata: ``format="dg2pf-compact"``, ``version="1"``, ``values``, ``layout``.

``values="fp32"`` is lossless: values and dense tensors keep their dtype, and loading gives back a
state_dict ``torch.equal`` to the input, except that ``-0.0`` counts as zero and comes back as
``+0.0`` (NaN and inf are kept as values). ``values="fp16"`` stores every floating-point tensor
(values and dense ones) as float16 and casts back to the recorded dtype on load: the result equals
the input rounded to float16.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors
import torch

from dg2pf_core.errors import CheckpointError, ConfigError
from dg2pf_core.io.checkpoint_save import save_state_dict

FORMAT = "dg2pf-compact"
VERSION = "1"
VALUE_DTYPES = ("fp32", "fp16")

_DENSE, _MASKED = "d", "m"
# safetensors' own dtype names; the layout records each tensor's original dtype with one of these.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}
# A masked tensor adds one safetensors header entry and a longer layout entry: ~64 bytes.
_ENTRY_OVERHEAD = 64
_FP16_MAX = float(torch.finfo(torch.float16).max)
_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}
_SAME_SIZE_NP = {8: np.int64, 4: np.int32, 2: np.int16}
_REEXPORT = "re-export it with dg2pf_core.io.compact.save_compact, or use the dense model.safetensors"


def check_values(values: str) -> None:
    """Raise ConfigError unless ``values`` is a supported value dtype."""
    if values not in VALUE_DTYPES:
        raise ConfigError(f"compact_values must be one of {list(VALUE_DTYPES)}, got {values!r}", field="compact_values")


def save_compact(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    values: str = "fp32",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` to ``path`` as a compact artifact, atomically (see the module doc);
    ``metadata``: more safetensors metadata entries (a channel structure)."""
    check_values(values)
    tensors: dict[str, torch.Tensor] = {}
    layout: list[list] = []
    for i, (name, value) in enumerate(state_dict.items()):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        if t.dtype not in _CODES:
            raise TypeError(f"state_dict[{name!r}] has dtype {t.dtype}, which the compact format does not store")
        entry = [name, _DENSE, _CODES[t.dtype], list(t.shape)]
        if t.is_floating_point():
            stored = _as_value_dtype(t, values, name)
            nonzero = (stored != 0).reshape(-1).numpy()
            n, nnz, size = stored.numel(), int(np.count_nonzero(nonzero)), stored.element_size()
            if (n + 7) // 8 + nnz * size + _ENTRY_OVERHEAD < n * size:
                entry[1] = _MASKED
                tensors[f"{i}m"] = torch.from_numpy(np.packbits(nonzero))
                tensors[f"{i}v"] = _select(stored.reshape(-1), nonzero)
            else:
                tensors[str(i)] = stored
        else:
            tensors[str(i)] = t
        layout.append(entry)
    metadata = {
        **(metadata or {}),
        "format": FORMAT,
        "version": VERSION,
        "values": values,
        "layout": json.dumps(layout, separators=(",", ":")),
    }
    save_state_dict(tensors, path, metadata=metadata)


def _select(flat: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """``flat[keep]``, through numpy on the raw bits (several times faster than torch's indexing)."""
    bits = flat.view(_SAME_SIZE_INT[flat.element_size()]).numpy()
    return torch.from_numpy(np.compress(keep, bits)).view(flat.dtype)


def _as_value_dtype(t: torch.Tensor, values: str, name: str) -> torch.Tensor:
    if values == "fp32":
        return t
    lo, hi = torch.aminmax(t) if t.numel() else (torch.tensor(0.0), torch.tensor(0.0))
    # Only a tensor holding NaN, inf or a large value needs the exact (slower) check.
    in_range = bool(-_FP16_MAX <= lo) and bool(hi <= _FP16_MAX)
    if not in_range and bool((torch.isinf(t.to(torch.float16)) & torch.isfinite(t)).any()):
        raise ConfigError(
            f"{name} holds values beyond the float16 range (|v| > {_FP16_MAX:g}); use compact_values='fp32'",
            field="compact_values",
        )
    return t.to(torch.float16)


def is_compact(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file marked as a dg2pf compact artifact (reads the header only)."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except Exception:  # not a file, not safetensors, unreadable: not a compact artifact
        return False
    return metadata.get("format") == FORMAT


def load_compact(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense state_dict stored in the compact artifact ``path``; CheckpointError if it is unusable."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            layout = _layout(metadata, path)
            keys = set(f.keys())
            expected = {k for i, (_, enc, _, _) in enumerate(layout) for k in _keys(i, enc)}
            if keys != expected:
                _key_error(path, layout, expected - keys, keys - expected)
            return {
                name: _decode(f, i, name, enc, _DTYPES[code], shape, path)
                for i, (name, enc, code, shape) in enumerate(layout)
            }
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"compact artifact {path} cannot be read: {e.strerror or e}") from e
    except Exception as e:  # SafetensorError and friends: header or data is malformed
        raise CheckpointError(f"{path} is not a valid compact artifact ({type(e).__name__}: {e}); {_REEXPORT}") from e


def _keys(i: int, enc: str) -> tuple[str, ...]:
    return (f"{i}m", f"{i}v") if enc == _MASKED else (str(i),)


def _layout(metadata: Mapping[str, str], path: Path) -> list[list]:
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a dg2pf compact artifact (format {metadata.get('format')!r}, expected {FORMAT!r}); "
            "read dense checkpoints with dg2pf_core.io.checkpoints.read_state_dict"
        )
    if metadata.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a dg2pf compact artifact of version {metadata.get('version')!r}, but this dg2pf reads version "
            f"{VERSION!r}; upgrade dg2pf or {_REEXPORT}"
        )
    try:
        layout = json.loads(metadata.get("layout", ""))
    except ValueError:
        layout = None
    ok = isinstance(layout, list) and all(
        isinstance(e, list)
        and len(e) == 4
        and isinstance(e[0], str)
        and e[1] in (_DENSE, _MASKED)
        and e[2] in _DTYPES
        and isinstance(e[3], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e[3])
        and (e[1] == _DENSE or _DTYPES[e[2]].is_floating_point)
        for e in layout
    )
    if not ok:
        raise CheckpointError(f"compact artifact {path} has a missing or malformed layout in its metadata; {_REEXPORT}")
    names = [e[0] for e in layout]
    if len(set(names)) != len(names):
        raise CheckpointError(f"compact artifact {path} lists a tensor name twice in its layout; {_REEXPORT}")
    return layout


def _key_error(path: Path, layout: list[list], missing: set[str], extra: set[str]) -> None:
    def describe(key: str) -> str:  # "3" -> "conv.weight", "3m" -> "mask of conv.weight"
        index, part = key.rstrip("mv"), {"m": "mask of ", "v": "values of "}.get(key[-1], "")
        return f"{part}{layout[int(index)][0]}" if index.isdigit() and int(index) < len(layout) else repr(key)

    parts = []
    if missing:
        parts.append(
            f"lacks {len(missing)} tensor(s) its layout lists "
            f"(first: {', '.join(describe(k) for k in sorted(missing)[:3])})"
        )
    if extra:
        parts.append(f"holds {len(extra)} tensor(s) its layout does not list (first: {', '.join(sorted(extra)[:3])})")
    raise CheckpointError(f"compact artifact {path} " + " and ".join(parts) + f"; it is corrupt or edited; {_REEXPORT}")


def _decode(f, i: int, name: str, enc: str, dtype: torch.dtype, shape: list[int], path: Path) -> torch.Tensor:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"compact artifact {path}: tensor {name!r}: {what}; the file is corrupt; {_REEXPORT}")

    n = math.prod(shape)
    if enc == _DENSE:
        t = f.get_tensor(str(i))
        if list(t.shape) != shape:
            raise bad(f"stored shape {list(t.shape)} differs from the layout's {shape}")
        if t.dtype != dtype and not (t.dtype == torch.float16 and dtype.is_floating_point):
            raise bad(f"stored dtype {t.dtype} cannot stand for {dtype}")
        return t.to(dtype)
    mask, values = f.get_tensor(f"{i}m"), f.get_tensor(f"{i}v")
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != (n + 7) // 8:
        raise bad(
            f"mask is {mask.dtype} of shape {list(mask.shape)}, "
            f"expected uint8 of shape [{(n + 7) // 8}] for shape {shape}"
        )
    if not values.is_floating_point() or values.dim() != 1:
        raise bad(f"values are {values.dtype} of shape {list(values.shape)}, expected a 1-D float tensor")
    bits = np.unpackbits(mask.numpy(), count=n).view(np.bool_)
    kept = int(np.count_nonzero(bits))
    if kept != values.numel():
        raise bad(f"mask marks {kept} nonzero weights but {values.numel()} values are stored")
    # numpy's zeros come from calloc (zero pages, no memset): half the time of torch.zeros here.
    out = torch.from_numpy(np.zeros(n, dtype=_SAME_SIZE_NP[dtype.itemsize])).view(dtype)
    out.masked_scatter_(torch.from_numpy(bits), values.to(dtype))  # fills the marked places in order
    return out.reshape(shape)
