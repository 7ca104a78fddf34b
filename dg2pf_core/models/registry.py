"""Architecture registry: a name in, a freshly initialised model out.

Four kinds of names resolve here:

* names registered with :func:`register_arch` (``cifar/resnet18``, ``digits_cnn``, ...);
* ``torchvision/<model>`` for every torchvision *classification* model. These are resolved
  on lookup rather than registered up front so that a newer torchvision brings its models
  along without a code change. They are always built with ``weights=None``: dg2pf never
  downloads weights, the user brings a checkpoint;
* ``timm/<model>[.<tag>]`` for every timm model (``pip install 'dg2pf[timm]'``), built with
  ``pretrained=False`` and the hub offline; the model's ``pretrained_cfg`` (input size, mean/std,
  resize filter, crop percentage) is its preprocessing unless the job overrides the size or crop;
* ``hf``: a Hugging Face transformers image classifier, its architecture read from a model directory's
  ``config.json`` (:mod:`dg2pf_core.models.hf`); the functions here take that directory, or a weights
  file inside one, as ``source``;
* names installed packages register in the ``dg2pf.archs`` entry point group (a team's own
  networks, ``--arch mypkg/mynet``): the entry point names an :class:`ArchSpec`. Only installed
  distributions are read; nothing is ever imported from a job's own files.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from dg2pf_contract.job import MAX_CLASSES
from dg2pf_core.data.request import FILTERS, normalisation_problems
from dg2pf_core.errors import ConfigError, DG2PFError, UnknownArchitectureError
from dg2pf_core.models import hf

TORCHVISION_PREFIX = "torchvision/"
TIMM_PREFIX = "timm/"

Builder = Callable[[int], nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    """What dg2pf needs to know about an architecture besides its weights."""

    name: str
    builder: Builder  # num_classes -> freshly initialised model
    input_size: int  # default square input size, pixels
    in_channels: int
    description: str
    # Checkpoint key prefixes of parts the built model leaves out (auxiliary heads): dropped on load.
    ignored_keys: tuple[str, ...] = ()
    # Preprocessing of folder datasets and serving (None: ImageNet's mean/std, bilinear, crop 0.875).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    # Where an installed package's spec came from (its entry point): its failures name it.
    source: str | None = None


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(name: str, *, input_size: int, in_channels: int, description: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes) -> nn.Module`` under ``name``."""
    if name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)) or name == hf.HF_ARCH:
        # Those namespaces are resolved dynamically; a static entry would shadow them silently.
        raise ValueError(f"'{TORCHVISION_PREFIX}' and '{TIMM_PREFIX}' names are reserved: {name!r}")

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = ArchSpec(
            name=name,
            builder=builder,
            input_size=input_size,
            in_channels=in_channels,
            description=description,
        )
        return builder

    return decorate


def _torchvision_classifiers() -> list[str]:
    # module=torchvision.models restricts to classification (excludes detection, video, ...).
    return sorted(torchvision.models.list_models(module=torchvision.models))


# Models whose training-mode forward returns auxiliary logits beside the main ones. They are built
# without their auxiliary heads: those only help training from scratch (torchvision's inference
# models drop them too), pruning fine-tunes a trained network on its main logits, and the pruned
# model is the inference model. A checkpoint's auxiliary-head weights are ignored on load.
_AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
_INPUT_SIZE = {"inception_v3": 299}


def _torchvision_spec(model_name: str) -> ArchSpec:
    # init_weights=False: the checkpoint overwrites them (and it silences a FutureWarning).
    extra = {"aux_logits": False, "init_weights": False} if model_name in _AUX_HEADS else {}

    def build(num_classes: int) -> nn.Module:
        return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes, **extra)

    note = ", built without its auxiliary heads" if model_name in _AUX_HEADS else ""
    return ArchSpec(
        name=TORCHVISION_PREFIX + model_name,
        builder=build,
        input_size=_INPUT_SIZE.get(model_name, 224),
        in_channels=3,
        description=f"torchvision {model_name} (ImageNet-style, randomly initialised{note})",
        ignored_keys=_AUX_HEADS.get(model_name, ()),
    )


def _timm():
    """timm, with the Hugging Face hub offline (dg2pf never downloads a model), or None when not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import timm  # noqa: PLC0415
    except ImportError:
        return None
    return timm


def _timm_spec(model_name: str) -> ArchSpec:
    timm = _timm()
    if timm is None:
        raise UnknownArchitectureError(
            f"architecture {TIMM_PREFIX}{model_name!r} needs timm, which is not installed: pip install 'dg2pf[timm]'"
        )
    base = model_name.split(".", 1)[0]
    if not model_name or not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise UnknownArchitectureError(f"unknown timm model {model_name!r}{hint} (timm {timm.__version__})")
    try:
        cfg = timm.get_pretrained_cfg(model_name, allow_unregistered=False)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    if cfg is None and "." in model_name:
        raise UnknownArchitectureError(f"timm model {base!r} has no pretrained tag {model_name.split('.', 1)[1]!r}")
    input_size = tuple(getattr(cfg, "input_size", None) or (3, 224, 224))
    # A crop_pct over 1 (volo at 448/512: 1.15) resizes past the image: the evaluation crop is capped at the
    # whole image here (docs/cli.md); a non-square input size is taken at its width (square inputs only).
    crop = min(1.0, float(cfg.crop_pct)) if cfg is not None and cfg.crop_pct else None

    def build(num_classes: int) -> nn.Module:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)

    return ArchSpec(
        name=TIMM_PREFIX + model_name,
        builder=build,
        input_size=int(input_size[-1]),
        in_channels=int(input_size[0]),
        description=f"timm {model_name} (randomly initialised; preprocessing from its pretrained_cfg)",
        mean=tuple(cfg.mean) if cfg is not None and cfg.mean else None,
        std=tuple(cfg.std) if cfg is not None and cfg.std else None,
        interpolation=cfg.interpolation if cfg is not None and cfg.interpolation in FILTERS else None,
        crop_pct=crop,
    )


ENTRY_POINT_GROUP = "dg2pf.archs"


def _installed() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """The ``dg2pf.archs`` entry points of installed distributions, by name (not loaded); a name two
    packages register differently has both."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        same = found.setdefault(ep.name, [])
        if all(e.value != ep.value for e in same):  # one package seen twice on the path is one entry
            same.append(ep)
    return found


def _installed_spec(name: str, eps: list[importlib.metadata.EntryPoint]) -> ArchSpec:
    if len(eps) > 1:
        raise UnknownArchitectureError(
            f"architecture {name!r} is registered by more than one installed package "
            f"({', '.join(e.value for e in eps)}): uninstall one, or rename its entry point"
        )
    ep = eps[0]
    try:
        spec = ep.load()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken package named, not a crash
        raise UnknownArchitectureError(
            f"architecture {name!r} is registered by an installed package ({ep.value}), which failed to load: "
            f"{type(exc).__name__}: {exc}"[:500]
        ) from None
    if not isinstance(spec, ArchSpec) or not callable(spec.builder):
        raise UnknownArchitectureError(
            f"architecture {name!r}: the entry point {ep.value} must name a dg2pf_core.models.ArchSpec, "
            f"got {type(spec).__name__}"
        )
    return check_spec(dataclasses.replace(spec, name=name, source=ep.value))


def check_spec(spec: ArchSpec) -> ArchSpec:
    """``spec`` when its sizes and preprocessing are usable, else an ``UnknownArchitectureError`` naming
    where it came from (an installed package's entry point)."""
    from dg2pf_contract.job import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE  # noqa: PLC0415

    where = f" (from {spec.source})" if spec.source else ""

    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    problems = []
    if not isinstance(spec.in_channels, int) or isinstance(spec.in_channels, bool) or spec.in_channels not in (1, 3):
        problems.append(f"in_channels must be 1 or 3, got {spec.in_channels!r}")
    size = spec.input_size
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        problems.append(f"input_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size!r}")
    problems += [why for _, why in normalisation_problems(spec.mean, spec.std, spec.interpolation, spec.in_channels)]
    if spec.crop_pct is not None and not (number(spec.crop_pct) and 0.25 <= spec.crop_pct <= 1.0):
        problems.append(f"crop_pct must be in [0.25, 1], got {spec.crop_pct!r}")
    if problems:
        raise UnknownArchitectureError(f"architecture {spec.name!r}{where} cannot be used: {'; '.join(problems)}")
    return dataclasses.replace(
        spec,
        mean=None if spec.mean is None else tuple(float(v) for v in spec.mean),
        std=None if spec.std is None else tuple(float(v) for v in spec.std),
    )


def list_archs(timm_models: bool = False) -> list[str]:
    """Every architecture name :func:`get_arch` accepts, sorted; timm's (over a thousand) only with
    ``timm_models``."""
    names = set(_REGISTRY) | ({hf.HF_ARCH} if hf.transformers_version() else set())
    names.update(TORCHVISION_PREFIX + n for n in _torchvision_classifiers())
    names.update(installed_archs())
    if timm_models and (timm := _timm()) is not None:
        names.update(TIMM_PREFIX + n for n in timm.list_models())
    return sorted(names)


def installed_archs() -> list[str]:
    """The names installed packages register (``dg2pf.archs``), sorted; those shadowing a built-in or
    reserved name are left out (``get_arch`` never resolves them)."""
    return sorted(n for n in _installed() if _reserved(n) is None)


def timm_version() -> str | None:
    timm = _timm()
    return None if timm is None else str(timm.__version__)


def _reserved(name: str) -> str | None:
    """Why an installed package may not register ``name``: a built-in name, or one in a namespace
    dg2pf's own names use (``torchvision/``, ``timm/``, ``cifar/``, ...); None when it may."""
    spaces = {TORCHVISION_PREFIX, TIMM_PREFIX} | {n.split("/", 1)[0] + "/" for n in _REGISTRY if "/" in n}
    if name in _REGISTRY or name == hf.HF_ARCH or name.startswith(hf.HF_ARCH + "/"):
        return "a built-in name"
    return next((f"the {p} namespace" for p in sorted(spaces) if name.startswith(p)), None)


def get_arch(name: str, source: str | os.PathLike | None = None) -> ArchSpec:
    """Look up an architecture; an unknown name raises with the closest known names. ``source``: the
    checkpoint (a model directory, or a weights file inside one) the ``hf`` architecture is read from."""
    if name == hf.HF_ARCH:
        return _hf_spec(source)
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    if name.startswith(TORCHVISION_PREFIX):
        model_name = name[len(TORCHVISION_PREFIX) :]
        if model_name in _torchvision_classifiers():
            return _torchvision_spec(model_name)
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name[len(TIMM_PREFIX) :])
    eps = _installed().get(name)
    if eps and _reserved(name) is None:
        return _installed_spec(name, eps)
    raise UnknownArchitectureError(_unknown_message(name))


def _hf_spec(source: str | os.PathLike | None) -> ArchSpec:
    if source is None:
        raise UnknownArchitectureError(
            "architecture 'hf' is read from a Hugging Face model directory: give it as the checkpoint "
            f"(config.json, {hf.WEIGHTS}, {hf.PROCESSOR})"
        )
    model_dir = hf.model_dir_of(source)
    config, pre = hf.spec_values(model_dir)
    model_type = config["model_type"]

    def build(num_classes: int) -> nn.Module:
        return hf.build(model_dir, num_classes)

    channels = config.get("num_channels", 3)
    return check_spec(
        ArchSpec(
            name=f"{hf.HF_ARCH}/{model_type}",
            builder=build,
            input_size=pre["input_size"],
            in_channels=channels,
            description=f"transformers {model_type} from {model_dir} (its config.json and image processor)",
            mean=pre["mean"],
            std=pre["std"],
            interpolation=pre["interpolation"],
            crop_pct=pre["crop_pct"],
            source=str(model_dir / hf.CONFIG),
        )
    )


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(name, list_archs(), n=3, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return f"unknown architecture {name!r}{hint} (see `dg2pf archs`)"


def build_model(name: str, num_classes: int, source: str | os.PathLike | None = None) -> nn.Module:
    """A freshly initialised ``name`` model with a ``num_classes``-way classifier (``source``: see get_arch)."""
    spec = get_arch(name, source)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(
            f"num_classes must be an integer >= 2 (a classifier needs at least two classes), got {num_classes!r}",
            field="num_classes",
        )
    if num_classes > MAX_CLASSES:
        # Checked before building: the classifier alone would take num_classes x features x 4 bytes.
        raise ConfigError(
            f"num_classes {num_classes} is beyond the {MAX_CLASSES:,} classes dg2pf builds a classifier for",
            field="num_classes",
        )
    if spec.source is None:
        return spec.builder(num_classes)
    try:  # an installed package's builder: its failures are named, never a crash of the caller
        model = spec.builder(num_classes)
    except DG2PFError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        raise UnknownArchitectureError(
            f"architecture {name!r}: its builder ({spec.source}) failed: {type(exc).__name__}: {exc}"[:500]
        ) from None
    if not isinstance(model, nn.Module):
        raise UnknownArchitectureError(
            f"architecture {name!r}: its builder ({spec.source}) returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def build_meta(name: str, num_classes: int, source: str | os.PathLike | None = None) -> nn.Module:
    """``name`` with its weights on the meta device: every shape, no memory for the values (what a
    service checks at submit). A builder that computes its layout from the values of tensors
    (regnet's widths: ``.tolist()`` of a computed tensor, which meta tensors cannot give) is built
    again with small tensors real and only the large ones on meta."""
    try:
        with torch.device("meta"):
            return build_model(name, num_classes, source)
    except (NotImplementedError, RuntimeError, UnknownArchitectureError):  # "Cannot copy out of meta tensor"
        with _LargeOnMeta():
            return build_model(name, num_classes, source)


class _LargeOnMeta(TorchFunctionMode):
    """Like ``torch.device("meta")`` for tensors of more than SMALL elements; smaller ones are made
    where they would be without it, so a builder can read the values it computes with them. What is
    allocated is bounded by the model's count of small tensors, not by its size."""

    SMALL = 4096

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            made = func(*args, **{**kwargs, "device": "meta"})  # the shape, for nothing
            if not isinstance(made, torch.Tensor) or made.numel() > self.SMALL:
                return made
        return func(*args, **kwargs)


def parameter_count(name: str, num_classes: int, source: str | os.PathLike | None = None) -> int:
    """Parameters of ``name`` with ``num_classes`` classes, counted on the meta device: nothing is
    allocated, so a service can refuse a huge architecture before building it."""
    return sum(p.numel() for p in build_meta(name, num_classes, source).parameters())
