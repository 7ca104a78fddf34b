"""Reading model weights safely (writing them: :mod:`dg2pf_core.io.checkpoint_save`).

Checkpoints come from users, so reading one must never run code. A file is recognised by its
first bytes, not its name: safetensors content is pure data, and ``torch.save`` files go through
``torch.load(weights_only=True)``, which refuses pickled objects other than tensors and plain
containers. Every way a file can be unusable (missing, corrupt, pickled objects, a Git LFS
pointer or an HTML page saved in its place, a TorchScript archive, tensors without dense CPU
data, non-finite weights, wrong shapes or dtypes) becomes a :class:`CheckpointError` that names
the file, says what it is and what to do.
"""

from __future__ import annotations

import codecs
import hashlib
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import safetensors.torch
import torch
import torch.nn as nn

from dg2pf_core.errors import CheckpointError
from dg2pf_core.io.compact import is_compact, load_compact

# Training scripts save the weights under one of these keys next to optimiser state and counters
# ({"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": 5} is the PyTorch tutorial's).
# When a file has several, the first wins: names that say "state dict" outright before the bare
# "model"/"net" ones, which scripts also use for other things (a config, an architecture name).
# EMA copies ("state_dict_ema", "model_ema") are left out: which of two sets of weights to prune
# is the user's call, so such a file is refused with advice rather than guessed at.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "model_state", "net", "network")
# nn.DataParallel / DistributedDataParallel and torch.compile prefix every key with these, in
# either order when a compiled model is wrapped (or a wrapped one compiled).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A LightningModule's checkpoint holds its own state_dict, so the network's keys carry the
# attribute name it was assigned to; "model" is the convention we undo.
_LIGHTNING_PREFIX = "model."
_FINITE_CHUNK = 1 << 22  # elements per slice of the finiteness check (16 MiB as float32)
_MAX_NAMES = 3

_SAFE_FORMAT_HINT = "save a plain state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file"

# Enough for every signature below (tar's sits at byte 257) and a line of text to quote.
_SNIFF_BYTES = 1024
# safetensors refuses headers above 100 MB; a larger "length" means the file is something else.
_MAX_SAFETENSORS_HEADER = 100_000_000
# torch.save before PyTorch 1.6 starts with a protocol-2 pickle of this magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LFS_POINTER = "version https://git-lfs.github.com/spec/"
_REDOWNLOAD = "re-download it"
_EXTRACT = "extract it and give the path of the checkpoint inside"
_NOT_TORCH = "convert the weights to a PyTorch state_dict and save it with torch.save or safetensors"
# (offset, signature, what it is, what to do) for binary formats that are not checkpoints.
_OTHER_FORMATS = (
    (
        0,
        b"\x1f\x8b",
        "a gzip-compressed file",
        "decompress it (gunzip, or tar xzf for .tar.gz) and give the path of the checkpoint inside",
    ),
    (0, b"BZh", "a bzip2-compressed file", "decompress it (bunzip2) and give the path of the checkpoint inside"),
    (0, b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it (unxz) and give the path of the checkpoint inside"),
    (
        0,
        b"\x28\xb5\x2f\xfd",
        "a zstd-compressed file",
        "decompress it (unzstd) and give the path of the checkpoint inside",
    ),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", _EXTRACT),
    (0, b"Rar!\x1a\x07", "a RAR archive", _EXTRACT),
    (257, b"ustar", "a tar archive", "extract it (tar xf) and give the path of the checkpoint inside"),
    (0, b"\x93NUMPY", "a NumPy .npy array, not a mapping of parameter names to tensors", _SAFE_FORMAT_HINT),
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras or TensorFlow weights?), not a PyTorch checkpoint", _NOT_TORCH),
)
# What a file's extension promises, to point out a misnamed file when its content fails to load.
_SUFFIX_FAMILY = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch"}


@dataclass(frozen=True)
class _Format:
    """What a file's first bytes say it is.

    ``family`` picks the reader: "safetensors", "torch" (``torch.load(weights_only=True)``),
    "pickle" (a plain pickle, refused after a scan that runs nothing) or "refuse". ``what`` names
    the content for messages ("a torch.save zip file"); ``advice`` says what to do about a refusal.
    """

    family: str
    what: str
    advice: str = ""


def read_state_dict(
    path: str | Path, *, allow_nonfinite: bool = False, key: str | None = None, any_set: bool = False
) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping stored in ``path``, on CPU, without unpickling objects.

    The format comes from the file's content, whatever its name: safetensors (dense, or the
    compact sparse artifacts of :mod:`dg2pf_core.io.compact`, given back dense) or ``torch.save``
    files (zip or legacy) of a state_dict. Containers are unwrapped: training checkpoints that
    keep the weights under ``state_dict``, ``model_state_dict``, ``model``, ``model_state``,
    ``net`` or ``network`` beside other entries, PyTorch Lightning checkpoints (their ``model.``
    prefix), and - when every key has them - DDP's ``module.`` and torch.compile's
    ``_orig_mod.`` prefixes. Tensors keep their stored dtype and shape (fp16/bf16 stay fp16/bf16).

    Raises :class:`CheckpointError`, naming the file and what to do, when the file is missing,
    empty, truncated or corrupt, holds pickled Python objects, is not a checkpoint (a Git LFS
    pointer, an HTML page, a TorchScript archive, a plain pickle, text, an archive), holds
    anything but tensors, holds tensors without dense data on the CPU (meta, sparse, quantized
    or nested tensors, dtypes that cannot be converted), or - unless ``allow_nonfinite`` - has
    NaN or Inf in a floating tensor.

    Two sets of weights in one file (a training checkpoint with an EMA copy: timm's ``state_dict`` +
    ``state_dict_ema``, torchvision's references' ``model`` + ``model_ema``): ``key`` names the entry to
    take; without it the file is refused naming both (``any_set``: the first is taken, for a check
    that only needs the file to be readable).
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

    fmt = _sniff(path, size)
    if fmt.family == "safetensors":
        raw = load_compact(path) if is_compact(path) else _load_safetensors(path, fmt)
    elif fmt.family == "torch":
        raw = _load_torch(path, fmt)
    elif fmt.family == "pickle":
        _refuse_pickle(path)
    else:
        raise CheckpointError(f"checkpoint {path} is {fmt.what}; {fmt.advice}")
    state = _as_state_dict(_chosen_set(raw, path, key, any_set), path)
    # Before the finiteness check, which needs dense values it can compute on.
    _refuse_unusable(state, f"checkpoint {path}", on_cpu=True)
    if not allow_nonfinite:
        _check_finite(state, path)
    return state


def _sniff(path: Path, size: int) -> _Format:
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e

    # safetensors first: its leading length is arbitrary bytes that can look like PK or a pickle.
    if len(head) > 8 and head[8:9] == b"{":
        header = int.from_bytes(head[:8], "little")
        if 2 <= header <= size - 8:
            return _Format("safetensors", "a safetensors file")
        if header <= _MAX_SAFETENSORS_HEADER:
            return _Format(
                "refuse",
                f"a truncated or corrupt safetensors file: its header declares {header} bytes "
                f"of metadata but only {max(size - 8, 0)} bytes follow the length",
                "copy or download it again",
            )
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path)
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return _Format("torch", "a legacy torch.save file from before PyTorch 1.6")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return _Format("pickle", "a plain Python pickle")
    for offset, signature, what, advice in _OTHER_FORMATS:
        if head[offset : offset + len(signature)] == signature:
            return _Format("refuse", what, advice)
    text = _as_text(head)
    if text is not None:
        return _sniff_text(text)
    if path.suffix.lower() == ".onnx" and head[:1] == b"\x08":  # a protobuf ModelProto: ir_version first
        return _Format(
            "refuse",
            "an ONNX model (dg2pf writes model.onnx and model.int8.onnx for ONNX Runtime, not to read back)",
            "give the model.safetensors beside it; an int8 model's accuracy and latency are in that folder's "
            "metrics.json (quantization, latency) or quantization.json, and it is served with "
            "DG2PF_SERVE_BACKEND=onnxruntime",
        )
    return _Format(
        "refuse",
        f"not in a format dg2pf reads (its first bytes are {head[:8].hex(' ')})",
        "dg2pf reads .safetensors and torch.save files; the file may be truncated or corrupt, "
        "or written by another framework",
    )


def _sniff_zip(path: Path) -> _Format:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()  # the central directory only; nothing is extracted
    except Exception as e:  # BadZipFile and friends: the central directory at the end is missing
        return _Format(
            "refuse",
            f"a zip file (as torch.save writes) that is truncated or corrupt ({_short(e)})",
            "copy or download it again",
        )
    # torch.save, torch.jit.save and torch.export.save all write one top folder of records.
    records = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in records or any(r.startswith("models/") for r in records):
        return _Format(
            "refuse",
            "a torch.export program (.pt2), which dg2pf does not run",
            "in Python, take its weights with torch.export.load(f).state_dict and save them with "
            "torch.save(state_dict, 'model.pt') or safetensors.torch.save_file",
        )
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        return _Format(
            "refuse",
            "a TorchScript archive (torch.jit.save), which dg2pf does not run",
            "in Python, take its weights with torch.jit.load(f).state_dict() and save them with "
            "torch.save(state_dict, 'model.pt') or safetensors.torch.save_file",
        )
    if "data.pkl" in records:
        return _Format("torch", "a torch.save zip file")
    if names and all(name.endswith(".npy") for name in names):
        return _Format("refuse", "a NumPy .npz archive, not a PyTorch checkpoint", _NOT_TORCH)
    shown = ", ".join(names[:_MAX_NAMES]) + (", ..." if len(names) > _MAX_NAMES else "")
    return _Format("refuse", f"a zip archive ({shown or 'empty'}), not a checkpoint", _EXTRACT)


def _as_text(head: bytes) -> str | None:
    """``head`` decoded, when it reads as text: UTF-8, or UTF-16 with a BOM (as PowerShell writes)."""
    encoding = "utf-16" if head.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    if encoding == "utf-8-sig" and b"\x00" in head:
        return None
    try:
        # Incremental, so a character cut at the end of the prefix is no decoding error.
        text = codecs.getincrementaldecoder(encoding)().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if not text.strip():
        return None
    if encoding == "utf-16" and sum(c.isascii() for c in text) < 0.9 * len(text):
        return None  # binary that happens to start with a BOM: its "characters" are arbitrary
    printable = sum(c.isprintable() or c in "\t\n\r\f\v" for c in text)
    return text if printable >= 0.95 * len(text) else None


def _sniff_text(text: str) -> _Format:
    start = text.lstrip("\ufeff \t\r\n\f\v")
    if start.startswith(_LFS_POINTER):
        found = re.search(r"^size (\d+)", start, re.MULTILINE)
        real = f"real {_human_bytes(int(found.group(1)))} " if found else "real "
        return _Format(
            "refuse",
            f"a Git LFS pointer (a small text stand-in for the {real}file), not the checkpoint",
            "run `git lfs pull` in its repository (or download the real file)",
        )
    lowered = start[:_SNIFF_BYTES].lower()
    if lowered.startswith("<") and ("<html" in lowered or lowered.startswith("<!doctype html")):
        return _Format(
            "refuse",
            "an HTML page, not a checkpoint (a download page or an error page saved instead of the file)",
            _REDOWNLOAD,
        )
    begins = f"it begins: {_quote(start)}"
    if lowered.startswith("<"):
        return _Format(
            "refuse",
            f"an XML document, not a checkpoint (often a storage service's error response saved "
            f"instead of the file; {begins})",
            _REDOWNLOAD,
        )
    kind = "a JSON text file" if lowered.startswith(("{", "[")) else "a text file"
    return _Format(
        "refuse",
        f"{kind}, not a checkpoint ({begins})",
        "give the path of the weights file (.safetensors or torch.save); if a download saved "
        "an error message instead of the file, re-download it",
    )


def _quote(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")


def _human_bytes(n: int) -> str:
    size, unit = float(n), "bytes"
    for bigger in ("KB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


def _misnamed(path: Path, fmt: _Format) -> str:
    """' (named .pt but it is a safetensors file)' when the extension promises another format."""
    suffix = path.suffix.lower()
    expected = _SUFFIX_FAMILY.get(suffix)
    return f" (named {suffix} but it is {fmt.what})" if expected not in (None, fmt.family) else ""


def _load_safetensors(path: Path, fmt: _Format) -> object:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e
    except Exception as e:  # SafetensorError and friends: header or data is malformed
        raise CheckpointError(
            f"checkpoint {path}{_misnamed(path, fmt)} is not a valid .safetensors file "
            f"({_short(e)}); it may be truncated or corrupt"
        ) from e


def _load_torch(path: Path, fmt: _Format) -> object:
    try:
        with warnings.catch_warnings():
            # Harmless notices (pickle protocol versions; the scan torch makes of sparse tensors,
            # and the storage API it uses for quantized ones, both of which are refused after).
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            # A file object, not the path: torch.load hands any path ending in .safetensors to
            # safetensors, and this one's content says otherwise.
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            _refuse_objects(path, found.group(1) if found else None, _misnamed(path, fmt))
        raise _corrupt(path, fmt, e) from e
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e
    except Exception as e:  # torch raises RuntimeError/EOFError/KeyError/... on garbage bytes
        raise _corrupt(path, fmt, e) from e


def _refuse_objects(path: Path, reference: str | None, note: str = "") -> NoReturn:
    detail = f" (it references {reference})" if reference else ""
    raise CheckpointError(
        f"{path}{note} contains pickled Python objects{detail}, which dg2pf refuses to load "
        f"for safety; {_SAFE_FORMAT_HINT}"
    )


def _corrupt(path: Path, fmt: _Format, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path}{_misnamed(path, fmt)} cannot be read as {fmt.what} ({_short(e)}); "
        "it may be truncated or corrupt"
    )


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# Globals a pickle.dump of tensors, arrays or containers names; anything else is an object.
_DATA_GLOBAL_MODULES = ("torch", "numpy", "_codecs", "collections")
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)


def _refuse_pickle(path: Path) -> NoReturn:
    """Refuse a plain pickle, naming the first object it would build; reads opcodes, runs nothing."""
    reference = _first_object_global(path)
    if reference is not None:
        _refuse_objects(path, reference or None)
    raise CheckpointError(
        f"checkpoint {path} is a plain Python pickle (pickle.dump), not a torch.save file, and "
        "dg2pf does not unpickle plain pickles for safety; save model.state_dict() with "
        "torch.save(model.state_dict(), 'model.pt') or as a .safetensors file"
    )


def _first_object_global(path: Path) -> str | None:
    """The first global outside plain data that the pickle at ``path`` names ("" if unnamed)."""
    memo: dict[int, object] = {}
    recent: list[object] = []  # the top of the stack: STACK_GLOBAL takes module and name from it
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                name = op.name
                if name in _STRING_OPS:
                    recent.append(arg)
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(arg))
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = recent[-1] if recent else None
                elif name in ("GLOBAL", "INST", "STACK_GLOBAL"):
                    if name == "STACK_GLOBAL":
                        module, qualname = ([None, None] + recent)[-2:]
                        del recent[-2:]
                        both = isinstance(module, str) and isinstance(qualname, str)
                        reference = f"{module}.{qualname}" if both else ""
                    else:
                        reference = str(arg).replace(" ", ".")
                    if reference.split(".", 1)[0] not in _DATA_GLOBAL_MODULES:
                        return reference
                    recent.append(None)
                elif name not in ("PROTO", "FRAME", "STOP"):
                    recent.append(None)  # some other value: only strings matter to STACK_GLOBAL
                del recent[:-2]
    except Exception:  # a truncated or malformed pickle: refused as a plain pickle all the same
        return None
    return None


def _wrapper_key(checkpoint: Mapping) -> str | None:
    """The key of ``checkpoint`` that holds the weights, if it is a training checkpoint."""
    found = [k for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)]
    # A candidate that holds tensors (or wraps them once more) beats one that holds, say, a config.
    holding = [
        k
        for k in found
        if any(isinstance(v, torch.Tensor) for v in checkpoint[k].values())
        or any(isinstance(checkpoint[k].get(w), Mapping) for w in _WRAPPER_KEYS)
    ]
    return (holding or found or [None])[0]


# Entries that hold an exponential moving average of the weights beside the raw ones ("ema" as a word of the key).
_EMA = re.compile(r"(?:^|[_.])ema(?:$|[_.])", re.IGNORECASE)


def _holds_weights(value: object) -> bool:
    return isinstance(value, Mapping) and (
        any(isinstance(v, torch.Tensor) for v in value.values())
        or any(isinstance(value.get(w), Mapping) for w in _WRAPPER_KEYS)
    )


def weight_sets(raw: object) -> list[str]:
    """The top-level entries of a checkpoint that each hold a set of weights (a wrapper key or an EMA copy)."""
    if not isinstance(raw, Mapping):
        return []
    return [
        k for k, v in raw.items() if isinstance(k, str) and (k in _WRAPPER_KEYS or _EMA.search(k)) and _holds_weights(v)
    ]


def _chosen_set(raw: object, path: Path, key: str | None, any_set: bool) -> object:
    """The part of ``raw`` the weights come from: the entry ``key`` names, or the whole checkpoint when it
    holds one set of weights; ``CheckpointError`` for two sets without a choice, or a key it lacks."""
    sets = weight_sets(raw)
    if key is not None:
        if not isinstance(raw, Mapping) or key not in raw or not _holds_weights(raw[key]):
            shown = ", ".join(repr(k) for k in sets) or "none (a plain state_dict: leave the key out)"
            raise CheckpointError(
                f"checkpoint {path} has no set of weights under {key!r}; the entries that hold weights: {shown}",
                field="checkpoint_key",
            )
        return raw[key]
    ema = [k for k in sets if _EMA.search(k)]
    if ema and len(sets) > 1 and not any_set:
        raw_sets = [k for k in sets if k not in ema]
        raise CheckpointError(
            f"checkpoint {path} holds two sets of weights: {', '.join(repr(k) for k in raw_sets)} (the raw ones) and "
            f"{', '.join(repr(k) for k in ema)} (an exponential moving average, what most training scripts evaluate "
            f"and ship); say which to prune: --checkpoint-key {ema[0]} (JobSpec: model.checkpoint_key), or "
            "--checkpoint-key "
            f"{raw_sets[0] if raw_sets else sets[0]} for the raw weights",
            field="checkpoint_key",
        )
    return raw


def _as_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    lightning = False
    while isinstance(raw, Mapping):
        wrapper = _wrapper_key(raw)
        if wrapper is None:
            break
        lightning = lightning or (wrapper == "state_dict" and _is_lightning(raw))
        raw = raw[wrapper]
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(raw).__name__}, not a mapping of parameter names "
            f"to tensors; {_SAFE_FORMAT_HINT}"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if isinstance(key, str) and isinstance(value, Mapping):
            keys = ", ".join(repr(k) for k in _WRAPPER_KEYS)
            raise CheckpointError(
                f"checkpoint {path} maps {key!r} to a dict, not a tensor, and "
                f"has no entry dg2pf takes the weights from ({keys}); name it: --checkpoint-key {key} (JobSpec: "
                "model.checkpoint_key), or save the weights you mean on their own: "
                f"torch.save(checkpoint[{key!r}], 'model.pt')"
            )
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path} maps {key!r} to a {type(value).__name__}; a state_dict maps "
                f"names to tensors only; {_SAFE_FORMAT_HINT}"
            )
        state[key] = value
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    if lightning and _all_prefixed(state, _LIGHTNING_PREFIX):
        state = _strip_prefix(state, _LIGHTNING_PREFIX)
    while prefix := next((p for p in _WRAPPER_PREFIXES if _all_prefixed(state, p)), None):
        state = _strip_prefix(state, prefix)
    return state


def _is_lightning(checkpoint: Mapping) -> bool:
    return "pytorch-lightning_version" in checkpoint or ("epoch" in checkpoint and "global_step" in checkpoint)


def _all_prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    """Whether every key starts with ``prefix`` and keeps a name without it."""
    return all(k.startswith(prefix) and len(k) > len(prefix) for k in state)


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items()}


_SPARSE_LAYOUTS = frozenset({torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc})
# Floating dtypes every CPU kernel handles; others (float8, packed float4) are probed by converting.
_PLAIN_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _refuse_unusable(state: Mapping[str, torch.Tensor], source: str, *, on_cpu: bool) -> None:
    """Raise CheckpointError naming the tensors that hold no dense data a model can copy.

    ``source`` names the checkpoint in the message ("checkpoint /p/x.pt"); ``on_cpu`` also
    refuses tensors on another device (after ``torch.load(map_location="cpu")`` only a device
    that holds no data, like 'meta', can be left).
    """
    problems: dict[str, list[str]] = {}
    for name, tensor in state.items():
        problem = _unusable(tensor, on_cpu=on_cpu)
        if problem is not None:
            problems.setdefault(problem, []).append(name)
    if not problems:
        return
    clauses = []
    for problem, names in problems.items():
        one, many = _UNUSABLE.get(problem, (problem, problem))
        noun = "tensor" if len(names) == 1 else "tensors"
        clauses.append(f"{noun} {_names(names)} {one if len(names) == 1 else many}")
    raise CheckpointError(f"{source}'s " + "; ".join(clauses))


# What is wrong, said of one tensor and of several.
_UNUSABLE = {
    "meta": (
        "holds no data (saved from a model on the 'meta' device: materialise it first)",
        "hold no data (saved from a model on the 'meta' device: materialise it first)",
    ),
    "sparse": (
        "is a sparse tensor; save dense weights (tensor.to_dense())",
        "are sparse tensors; save dense weights (tensor.to_dense())",
    ),
    "nested": (
        "is a nested tensor, which no layer's weight is; save the model's dense state_dict",
        "are nested tensors, which no layer's weight is; save the model's dense state_dict",
    ),
}


def _unusable(tensor: torch.Tensor, *, on_cpu: bool) -> str | None:
    """What keeps a model from copying ``tensor`` (a key of _UNUSABLE or a phrase), or None."""
    if tensor.is_meta:
        return "meta"
    if tensor.layout in _SPARSE_LAYOUTS:
        return "sparse"
    if tensor.is_nested:
        return "nested"
    if tensor.is_quantized:
        dtype = _dtype_name(tensor.dtype)
        return (
            f"is quantized ({dtype}), and quantized checkpoints are not supported: give the "
            "floating-point weights from before quantization"
        )
    if tensor.layout != torch.strided:
        return (
            f"has layout {tensor.layout}, which dg2pf cannot copy into a model; save dense weights (tensor.to_dense())"
        )
    if on_cpu and tensor.device.type != "cpu":
        return (
            f"is on the '{tensor.device.type}' device after loading onto the CPU; save it from the CPU (tensor.cpu())"
        )
    if tensor.is_floating_point() and tensor.dtype not in _PLAIN_FLOATS:
        try:
            tensor.detach().reshape(-1)[:1].float()
        except (NotImplementedError, RuntimeError):
            return (
                f"is {_dtype_name(tensor.dtype)}, which PyTorch cannot convert to float32 on "
                "the CPU; save float32, float16 or bfloat16 weights"
            )
    return None


def _check_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointError if a floating tensor holds NaN or Inf: pruning ranks weights by size."""
    bad: list[str] = []
    for name, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        nan = inf = 0
        # In slices, so the check's temporaries stay small next to the tensor (an upload is checked
        # with a memory ceiling); isfinite has no kernel for most float8 dtypes: float32 holds their values.
        for piece in tensor.reshape(-1).split(_FINITE_CHUNK):
            values = piece if piece.dtype in _PLAIN_FLOATS or piece.is_complex() else piece.float()
            finite = torch.isfinite(values)
            if bool(finite.all()):
                continue
            n = int(torch.isnan(values).sum())
            nan += n
            inf += values.numel() - int(finite.sum()) - n
        if not nan and not inf:
            continue
        counts = " and ".join(f"{n} {label}" for n, label in ((nan, "NaN"), (inf, "Inf")) if n)
        bad.append(f"{name}: {counts}")
    if bad:
        shown = ", ".join(bad[:_MAX_NAMES]) + (", ..." if len(bad) > _MAX_NAMES else "")
        raise CheckpointError(
            f"checkpoint {path} has non-finite values in {_count(len(bad), 'tensor')} ({shown}); "
            "it cannot be pruned or evaluated: re-export it from a healthy training run"
        )


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str = "checkpoint",
    arch: str | None = None,
) -> None:
    """Copy ``state_dict`` into ``model`` strictly, converting to the model's dtypes.

    Raises :class:`CheckpointError` before touching the model when the checkpoint does not fit:
    keys the model lacks, keys the checkpoint lacks and shape mismatches (every kind listed in
    one message), tensors without dense data (meta, sparse, quantized), or a tensor of another
    kind of dtype than the model's (an integer or bool weight where the model has a floating
    one, a floating value for an integer buffer). Floating dtypes convert into each other
    (fp16/bf16/fp64 into fp32), and so do integer ones. ``what`` names the source and may carry
    its path ("checkpoint /p/x.pt", "teacher checkpoint /p/t.pt"); ``arch`` names the target
    ("resnet18 with num_classes=10").
    """
    expected = model.state_dict()
    noun = _source_noun(what)
    unexpected = [k for k in state_dict if k not in expected]
    # BatchNorm fills in a missing counter itself (checkpoints from before it existed lack it),
    # and it does not affect the forward pass, so its absence is not a misfit.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    mismatched = [k for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if unexpected or missing or mismatched:
        target = arch or f"the {type(model).__name__} model"
        parts = []
        if unexpected:
            parts.append(f"{_count(len(unexpected), 'key')} the model lacks (first: {_first(unexpected)})")
        if missing:
            parts.append(f"{_count(len(missing), 'key')} missing from the {noun} (first: {_first(missing)})")
        if mismatched:
            shapes = ", ".join(
                f"{k}: {noun} {_shape(state_dict[k])} vs model {_shape(expected[k])}" for k in mismatched[:_MAX_NAMES]
            )
            more = ", ..." if len(mismatched) > _MAX_NAMES else ""
            count = _count(len(mismatched), "shape mismatch", "shape mismatches")
            parts.append(f"{count} ({shapes}{more})")
        raise CheckpointError(f"{what} does not fit {target}: " + ", ".join(parts))
    # Tensors handed in directly may live on an accelerator, so only their data is checked here.
    _refuse_unusable(state_dict, what, on_cpu=False)
    _refuse_dtype_kinds(state_dict, expected, what)

    full = OrderedDict(state_dict)
    for k, v in expected.items():
        # What BatchNorm does for a checkpoint without the counter: keep the model's own. It no
        # longer does so itself once the metadata below says the checkpoint is of today's version.
        full.setdefault(k, v)
    # Modules read their serialisation version from this (torchvision's MNASNet refuses to load
    # without it). Files carry none - safetensors has no room for it and read_state_dict returns
    # plain dicts - and the shapes were just checked against this model, so its versions apply.
    full._metadata = OrderedDict(  # type: ignore[attr-defined]
        (k, dict(v)) for k, v in getattr(expected, "_metadata", {}).items()
    )
    # load_state_dict copies in place (param.copy_), which converts dtype and device.
    model.load_state_dict(full, strict=True)


def _source_noun(what: str) -> str:
    """``what`` without a path after it: "teacher checkpoint /p/t.pt" -> "teacher checkpoint"."""
    found = re.match(r".*?\bcheckpoint\b", what)
    return found.group(0) if found else what


def _dtype_kind(dtype: torch.dtype) -> str:
    # bool goes with the integers: masks saved as uint8 by older code load into bool buffers.
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def _refuse_dtype_kinds(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise CheckpointError if a tensor's dtype is of another kind than the model's.

    Copying converts silently, so an int32 weight (or float counter) would load as nonsense.
    """
    # In the model's order (layer by layer), not the file's: safetensors sorts its keys.
    bad = [
        k for k, v in expected.items() if k in state_dict and _dtype_kind(state_dict[k].dtype) != _dtype_kind(v.dtype)
    ]
    if not bad:
        return
    first = bad[0]
    others = bad[1:]
    more = f" (and {_count(len(others), 'more tensor')}: {_names(others)})" if others else ""
    raise CheckpointError(
        f"{what}'s tensor {first} is {_dtype_name(state_dict[first].dtype)} but the model's is "
        f"{_dtype_name(expected[first].dtype)}{more}: not weights of this architecture"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(names: list[str]) -> str:
    """The first few of ``names``, and how many more there are."""
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _first(names: list[str]) -> str:
    return ", ".join(names[:_MAX_NAMES])


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so large checkpoints stay cheap."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
