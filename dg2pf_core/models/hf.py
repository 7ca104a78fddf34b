"""Hugging Face transformers image classifiers as architectures: ``--arch hf --checkpoint DIR``.

The architecture of such a model is not a name but its directory's ``config.json`` (what
``save_pretrained`` writes beside ``model.safetensors`` and the image processor's
``preprocessor_config.json``). So ``hf`` resolves against a *model directory*: the checkpoint
directory a job is given, or a job's output directory, which gets the same two JSON files (a pruned
model is written back as a directory of the same kind; with channel granularity its shapes are
dg2pf's structure, not the config's: dg2pf rebuilds it, transformers alone cannot).

Safety, offline, by construction: the config is read as JSON and refused when it names remote code
(``auto_map``), or a model type transformers has no image classifier for; the model class is
transformers' own for that type, built with ``AutoModelForImageClassification.from_config`` and never
``trust_remote_code``; the weights are read only from ``model.safetensors`` by transformers itself
(``use_safetensors``, ``local_files_only``: its key conversions apply, a pickle is never opened), with
the hub offline. The built model returns its logits tensor (not transformers' output object), so the
pruning loop, Torch-Pruning and the ONNX export see a plain classifier.

Preprocessing comes from ``preprocessor_config.json`` (mean/std, resize filter, input size, the
centre crop as a fraction); without that file, the config's ``image_size`` and ImageNet's mean/std.
Departures (docs/cli.md): a processor that squashes any image to a square (ViT's) is evaluated with a
resize of the short side and a centre crop, as dg2pf does for every model (the same on square images);
Lanczos/box/Hamming filters are taken as their nearest supported one.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.job import MAX_CLASSES
from dg2pf_core.errors import CheckpointError, DG2PFError, UnknownArchitectureError

# Before anything imports huggingface_hub (it reads these once): dg2pf never downloads a model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HF_ARCH = "hf"
CONFIG, WEIGHTS, PROCESSOR = Artifacts.MODEL_DIR
MAX_JSON_BYTES = 1 << 20  # a config of a vision classifier is a few kB; id2label of 22k classes under 1 MB
# PIL's resample codes, as transformers' image processors store them, to the filters dg2pf resizes with.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


def transformers_module():
    """transformers with the hub offline (set at this module's import), or an error saying how to install it."""
    try:
        import transformers  # noqa: PLC0415
    except ImportError:
        raise UnknownArchitectureError(
            "architecture 'hf' needs transformers, which is not installed: pip install 'dg2pf[hf]'"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # a job's log is not a terminal
    return transformers


def transformers_version() -> str | None:
    """The installed transformers' version (read from its metadata, not imported), or None."""
    import importlib.metadata  # noqa: PLC0415

    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def model_dir_of(checkpoint: str | Path) -> Path:
    """The model directory of ``checkpoint``: itself when a directory (the input), else the folder of the
    weights file (a job's output: model.safetensors beside config.json)."""
    path = Path(checkpoint)
    return path if path.is_dir() or not path.exists() else path.parent


def weights_path(checkpoint: str | Path) -> Path:
    """The weights file of ``checkpoint``: a model directory's model.safetensors, or the file itself."""
    path = Path(checkpoint)
    return path / WEIGHTS if path.is_dir() else path


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def _read_json(path: Path, what: str) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{what} {path} has {size} bytes; a model's {path.name} is at most {MAX_JSON_BYTES}")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} is not readable JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path} nests too deeply to be a model's configuration") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def classifier_types() -> dict[str, tuple[str, ...]]:
    """model_type -> the transformers classes that classify images for it (this transformers)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES  # noqa: PLC0415

    return {
        k: (v,) if isinstance(v, str) else tuple(v) for k, v in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items()
    }


def check_model_dir(model_dir: str | Path) -> dict:
    """The directory's config.json, when it is a model directory dg2pf can load: a config naming no
    remote code, of a model type transformers classifies images with, and a model.safetensors beside it.
    Raises ``CheckpointError`` (field ``checkpoint``) or ``UnknownArchitectureError`` saying what is wrong."""
    d = Path(model_dir)
    if not d.exists():
        raise CheckpointError(f"checkpoint {d} does not exist", field="checkpoint")
    if not d.is_dir():
        raise CheckpointError(
            f"architecture 'hf' takes a Hugging Face model directory (config.json, {WEIGHTS}, {PROCESSOR}) as its "
            f"checkpoint; {d} is not a directory",
            field="checkpoint",
        )
    if not (d / CONFIG).is_file():
        raise CheckpointError(
            f"{d} holds no {CONFIG}: give the directory a transformers model was saved to (save_pretrained)",
            field="checkpoint",
        )
    raw = _read_json(d / CONFIG, "model config")
    if "auto_map" in raw or raw.get("trust_remote_code"):
        raise CheckpointError(
            f"{d / CONFIG} names code of its own (auto_map): dg2pf never runs a model's remote code; "
            "only architectures built into transformers are loaded",
            field="checkpoint",
        )
    id2label = raw.get("id2label")
    labels = raw.get("num_labels", len(id2label) if isinstance(id2label, dict) and id2label else 2)
    if id2label is not None and not isinstance(id2label, dict):
        raise CheckpointError(f"{d / CONFIG}: id2label must be an object (index -> name)", field="checkpoint")
    if isinstance(labels, bool) or not isinstance(labels, int) or not 1 <= labels <= MAX_CLASSES:
        # transformers makes one label name per class when it reads the config: bounded before it does
        raise CheckpointError(
            f"{d / CONFIG}: num_labels must be an integer in [1, {MAX_CLASSES:,}], got {labels!r}", field="checkpoint"
        )
    for key, why in _ELSEWHERE.items():
        if raw.get(key):
            raise CheckpointError(f"{d / CONFIG} sets {key}: {why}", field="checkpoint")
    _check_depth(raw, d / CONFIG)
    transformers_module()
    types = classifier_types()
    model_type = raw.get("model_type")
    if model_type in _REFUSED_TYPES:
        raise UnknownArchitectureError(f"{d / CONFIG}: model_type {model_type!r}: {_REFUSED_TYPES[model_type]}")
    if not isinstance(model_type, str) or model_type not in types:
        raise UnknownArchitectureError(
            f"{d / CONFIG}: model_type {model_type!r} has no image classifier in transformers "
            f"(those that do: {', '.join(sorted(types))})"
        )
    archs = raw.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(f"{d / CONFIG}: architectures must be a list of class names", field="checkpoint")
        others = [a for a in archs if a not in types[model_type]]
        if others:
            raise UnknownArchitectureError(
                f"{d / CONFIG} is a {', '.join(others)}, not an image classifier "
                f"({' or '.join(types[model_type])} for model_type {model_type!r})"
            )
    if not (d / WEIGHTS).is_file():
        present = sorted(p.name for p in d.iterdir())[:10]
        pickled = pickled_weights(present)
        why = (
            f"its weights are pickled ({', '.join(pickled)}), which dg2pf never opens: re-save the model with "
            "save_pretrained(safe_serialization=True)"
            if pickled
            else f"it holds {', '.join(present) or 'nothing else'}"
            + (
                "; a sharded checkpoint (model.safetensors.index.json) is not supported"
                if "model.safetensors.index.json" in present
                else ""
            )
        )
        raise CheckpointError(f"{d} holds no {WEIGHTS}: {why}", field="checkpoint")
    return raw


# Configs that would make transformers read weights or code from elsewhere (a file outside the model
# directory, the hub), or need packages a vision classifier does not: refused before anything is built.
_REFUSED_TYPES = {
    "timm_wrapper": "a timm model wrapped by transformers builds (and can load files) through timm's own "
    "arguments; prune it by name with --arch timm/<model> and its weights file instead",
}
_ELSEWHERE = {
    "use_timm_backbone": "its backbone comes from timm by name, possibly with downloaded weights",
    "use_pretrained_backbone": "its backbone's weights would be loaded from elsewhere than this directory",
    "quantization_config": "the model is quantized (bitsandbytes, GPTQ, ...); give its float weights",
}
# The most blocks a config may ask for, in one stack or over all stages (the largest vision transformers
# have 48): building, even on the meta device, costs time and memory per module.
MAX_DEPTH = 256


def _check_depth(raw: dict, where: Path) -> None:
    """Every ``*layer*``/``*depth*`` count of the config (nested configs too) at most MAX_DEPTH, summed
    over a list of stages."""
    stack: list[object] = [raw]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (dict, list)):
                    stack.append(value)
                if not any(w in str(key).lower() for w in ("layer", "depth", "block")):
                    continue
                counts = value if isinstance(value, list) else [value]
                total = sum(v for v in counts if isinstance(v, int) and not isinstance(v, bool))
                if total > MAX_DEPTH:
                    raise CheckpointError(
                        f"{where}: {key} asks for {total} blocks; dg2pf builds at most {MAX_DEPTH}", field="checkpoint"
                    )
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))


def pickled_weights(names: list[str]) -> list[str]:
    """Those of a directory's file ``names`` that hold pickled weights (never opened by dg2pf), sorted."""
    return sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _square(value: object, what: str, path: Path) -> int | None:
    """An image size as transformers' processors write it (an int, {height, width}, {shortest_edge})."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value and isinstance(value["shortest_edge"], int):
            return value["shortest_edge"]
        h, w = value.get("height"), value.get("width")
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise CheckpointError(
                    f"{path}: {what} is {h} x {w}; dg2pf takes square inputs only", field="checkpoint"
                )
            return h
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return value[0]
    raise CheckpointError(f"{path}: {what} {value!r} is not an image size dg2pf reads", field="checkpoint")


def preprocessing(model_dir: Path, config: dict) -> dict:
    """input_size, mean, std, interpolation, crop_pct of the model directory (its image processor's)."""
    config_size = config.get("image_size")
    if isinstance(config_size, list) and len(config_size) == 2 and config_size[0] == config_size[1]:
        config_size = config_size[0]
    out: dict = {"input_size": config_size if isinstance(config_size, int) else 224, "mean": None, "std": None}
    out["interpolation"], out["crop_pct"] = None, None
    path = model_dir / PROCESSOR
    if not path.is_file():
        return out  # ImageNet's mean/std, bilinear, the config's input size (docs/cli.md)
    p = _read_json(path, "image processor config")
    if p.get("do_rescale", True) is not True or not _number(p.get("rescale_factor", 1 / 255)):
        raise CheckpointError(
            f"{path}: the model takes unscaled pixel values (do_rescale false); dg2pf scales to [0, 1]"
        )
    if abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise CheckpointError(f"{path}: rescale_factor {p['rescale_factor']} is not 1/255, which dg2pf scales by")
    channels = config.get("num_channels", 3)
    for flag in ("do_normalize", "do_rescale", "do_center_crop", "do_resize"):
        if not isinstance(p.get(flag, True), bool):
            raise CheckpointError(f"{path}: {flag} must be true or false, got {p[flag]!r}")
    if p.get("do_normalize", True):
        for key in ("image_mean", "image_std"):
            v = p.get(key)
            if v is None:
                continue
            v = [v] * channels if _number(v) else v
            if not isinstance(v, list) or not all(_number(x) for x in v):
                raise CheckpointError(f"{path}: {key} must be a number or a list of numbers, got {v!r}")
            out["mean" if key == "image_mean" else "std"] = tuple(float(x) for x in v)
    else:
        out["mean"], out["std"] = (0.0,) * channels, (1.0,) * channels
    resample = p.get("resample")
    if resample is not None:
        if isinstance(resample, bool) or not isinstance(resample, int) or resample not in _RESAMPLE:
            raise CheckpointError(f"{path}: resample {resample!r} is not one of PIL's filters 0-5")
        out["interpolation"] = _RESAMPLE[resample]
    size = _square(p.get("size"), "size", path)
    crop = _square(p.get("crop_size"), "crop_size", path) if p.get("do_center_crop") else None
    if crop is not None and size:
        out["input_size"], out["crop_pct"] = crop, min(1.0, crop / size)
    elif size:
        out["input_size"] = size
        pct = p.get("crop_pct")  # ConvNeXt's processor: resize to size / crop_pct, cut out the centre (under 384)
        if _number(pct) and isinstance(p.get("size"), dict) and "shortest_edge" in p["size"] and size < 384:
            out["crop_pct"] = float(pct)
        else:
            out["crop_pct"] = 1.0  # resized to the input size as a whole: no margin cut off
    return out


def _logits_class(cls: type) -> type:
    """A subclass of the transformers model class whose forward takes the pixels and returns the logits."""
    return _LOGITS.setdefault(cls, type(cls.__name__, (cls,), {"forward": _forward_logits, "__module__": __name__}))


_LOGITS: dict[type, type] = {}


def _forward_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
    return super(type(self), self).forward(pixel_values=pixel_values, return_dict=True).logits


def _hf_config(model_dir: Path, num_classes: int | None = None):
    transformers = transformers_module()
    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    if num_classes is not None and config.num_labels != num_classes:
        config.num_labels = num_classes
    if not config.architectures:  # transformers' auto classes look the class up there
        config.architectures = [classifier_types()[config.model_type][0]]
    return config


def build(model_dir: Path, num_classes: int) -> nn.Module:
    """The directory's architecture, freshly initialised, with ``num_classes`` outputs, returning logits."""
    transformers = transformers_module()
    config = _hf_config(model_dir, num_classes)
    # eager attention: one traceable graph for Torch-Pruning and the ONNX export
    model = transformers.AutoModelForImageClassification.from_config(
        config, trust_remote_code=False, attn_implementation="eager"
    )
    model.__class__ = _logits_class(type(model))
    return model.float()  # trained in float32 whatever dtype the config names (fp16/bf16 weights are copied in)


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The directory's weights in this transformers' layout (its key conversions applied), read from
    ``model.safetensors`` only. Raises ``CheckpointError`` when they do not fit its config."""
    d = Path(model_dir)
    spec_values(d)  # the config's and processor's checks, read once per directory (cached)
    transformers = transformers_module()
    try:
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            str(d),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
            attn_implementation="eager",
        )
    except Exception as exc:  # noqa: BLE001 - whatever a crafted file makes transformers raise is a refusal
        raise CheckpointError(
            f"{d / WEIGHTS} could not be loaded by transformers: {type(exc).__name__}: {str(exc)[:300]}",
            field="checkpoint",
        ) from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = [k if isinstance(k, str) else k[0] for k in (info.get(kind) or [])]
        if names:
            problems.append(f"{len(names)} {kind.replace('_', ' ')} ({', '.join(map(str, names[:3]))})")
    if problems:
        raise CheckpointError(f"{d / WEIGHTS} does not fit {d / CONFIG}: {'; '.join(problems)}", field="checkpoint")
    return {k: v.detach() for k, v in model.state_dict().items()}


@lru_cache(maxsize=32)
def _spec_values(model_dir: str, mtime_ns: int) -> tuple[dict, dict]:
    return checked(Path(model_dir))


def checked(model_dir: Path) -> tuple[dict, dict]:
    """(config.json, its preprocessing) of a model directory, every check run; whatever a crafted file makes
    them raise is a ``CheckpointError``, never another exception."""
    try:
        config = check_model_dir(model_dir)
        return config, preprocessing(model_dir, config)
    except DG2PFError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise CheckpointError(
            f"{model_dir}: its {CONFIG} or {PROCESSOR} cannot be used: {type(exc).__name__}: {str(exc)[:200]}",
            field="checkpoint",
        ) from None


def spec_values(model_dir: str | Path) -> tuple[dict, dict]:
    """(config.json, its preprocessing) of a model directory, checked; cached per directory and config time."""
    d = Path(model_dir).resolve()
    try:
        mtime = (d / CONFIG).stat().st_mtime_ns
    except OSError:
        mtime = 0
    return _spec_values(str(d), mtime)


def write_files(source_dir: str | Path, output_dir: str | Path) -> list[str]:
    """The input directory's config.json and preprocessor_config.json copied into ``output_dir``, beside
    the job's model.safetensors: the output is then a model directory of the same kind. The file names."""
    src, out = Path(source_dir), Path(output_dir)
    written = []
    for name in (CONFIG, PROCESSOR):
        if (src / name).is_file():
            data = (src / name).read_bytes()
            tmp = out / f"{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)
            written.append(name)
    return written
