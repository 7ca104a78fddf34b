"""Architecture registry: a name in, a freshly initialised model out.

Two kinds of names resolve here:

* names registered with :func:`register_arch` (``cifar/resnet18``, ``digits_cnn``, ...);
* ``torchvision/<model>`` for every torchvision *classification* model. These are resolved
  on lookup rather than registered up front so that a newer torchvision brings its models
  along without a code change. They are always built with ``weights=None``: dg2pf never
  downloads weights, the user brings a checkpoint.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from dg2pf_contract.job import MAX_CLASSES
from dg2pf_core.errors import ConfigError, UnknownArchitectureError

TORCHVISION_PREFIX = "torchvision/"

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


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(name: str, *, input_size: int, in_channels: int, description: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes) -> nn.Module`` under ``name``."""
    if name.startswith(TORCHVISION_PREFIX):
        # That namespace is resolved dynamically; a static entry would shadow it silently.
        raise ValueError(f"'{TORCHVISION_PREFIX}' names are reserved for torchvision models: {name!r}")

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


def list_archs() -> list[str]:
    """Every architecture name :func:`get_arch` accepts, sorted."""
    names = set(_REGISTRY)
    names.update(TORCHVISION_PREFIX + n for n in _torchvision_classifiers())
    return sorted(names)


def get_arch(name: str) -> ArchSpec:
    """Look up an architecture; an unknown name raises with the closest known names."""
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    if name.startswith(TORCHVISION_PREFIX):
        model_name = name[len(TORCHVISION_PREFIX) :]
        if model_name in _torchvision_classifiers():
            return _torchvision_spec(model_name)
    raise UnknownArchitectureError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(name, list_archs(), n=3, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return f"unknown architecture {name!r}{hint} (see `dg2pf archs`)"


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised ``name`` model with a ``num_classes``-way classifier."""
    spec = get_arch(name)
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
    return spec.builder(num_classes)


def build_meta(name: str, num_classes: int) -> nn.Module:
    """``name`` with its weights on the meta device: every shape, no memory for the values (what a
    service checks at submit). A builder that computes its layout from the values of tensors
    (regnet's widths: ``.tolist()`` of a computed tensor, which meta tensors cannot give) is built
    again with small tensors real and only the large ones on meta."""
    try:
        with torch.device("meta"):
            return build_model(name, num_classes)
    except (NotImplementedError, RuntimeError):  # "Cannot copy out of meta tensor", ".item() ... meta"
        with _LargeOnMeta():
            return build_model(name, num_classes)


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


def parameter_count(name: str, num_classes: int) -> int:
    """Parameters of ``name`` with ``num_classes`` classes, counted on the meta device: nothing is
    allocated, so a service can refuse a huge architecture before building it."""
    return sum(p.numel() for p in build_meta(name, num_classes).parameters())
