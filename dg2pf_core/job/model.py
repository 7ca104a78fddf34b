"""The job's models: an architecture built and filled with a checkpoint's weights, read by content,
finite and fitting (``load_checkpoint_model``), and the number of classes a checkpoint was trained for."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from dg2pf_core.algorithm.channels import STRUCTURE_KEY, Structure, apply_structure, read_structure
from dg2pf_core.errors import CheckpointError, ConfigError
from dg2pf_core.io.checkpoints import load_into, read_state_dict
from dg2pf_core.models import ArchSpec, build_model, get_arch, hf
from dg2pf_core.models.registry import build_meta

# Loading weights into a model built on the meta device (a fit check, nothing computed) makes torch warn for
# every tensor; only this module builds such models, and the warning says nothing a user could act on.
warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter in the checkpoint to a meta parameter")


def load_checkpoint_model(
    arch: str,
    num_classes: int,
    checkpoint: str | Path,
    what: str = "checkpoint",
    *,
    meta: bool = False,
    fp16_values: bool = False,
    key: str | None = None,
) -> tuple[ArchSpec, nn.Module, dict[str, torch.dtype]]:
    """``arch`` built with ``num_classes`` and the checkpoint's weights (read by content, finite,
    fitting), and the dtype each tensor had in the checkpoint. Raises ``DG2PFError``.

    ``meta``: build the model on the meta device and only check the fit (names, shapes, dtype kinds):
    no memory for the weights (what a service checks at submit). ``fp16_values``: every value must
    fit float16 (``compact_values=fp16``)."""
    spec = get_arch(arch, checkpoint)
    state, structure = _read(arch, checkpoint, key)
    if spec.ignored_keys:
        state = {k: v for k, v in state.items() if not k.startswith(spec.ignored_keys)}
    if fp16_values:
        check_fp16_range(state, f"the {what}'s")
    with warnings.catch_warnings():
        # Copying into meta tensors is the no-op wanted here; torch warns about every tensor. (Also filtered
        # once for the process below: catch_warnings is not thread-safe, and a service checks jobs in threads.)
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        model = (
            build_meta(arch, num_classes, checkpoint)
            if meta and structure is None
            else build_model(arch, num_classes, checkpoint)
        )
        if structure is not None:
            apply_structure(model, structure, spec.name)
        try:
            load_into(model, state, what=f"{what} {checkpoint}", arch=f"{arch} with num_classes={num_classes}")
        except CheckpointError as exc:
            if structure is None and _narrower(state, model):
                raise CheckpointError(
                    f"{exc.message}; its layers are narrower than {arch}'s, as in a channel-pruned model, but "
                    f"it carries no channel structure ({STRUCTURE_KEY} metadata): use the model.safetensors "
                    "dg2pf wrote (a tool that re-saves a file can drop its metadata)",
                    field=exc.field,
                ) from exc
            raise
    return spec, model, {k: v.dtype for k, v in state.items() if v.is_floating_point()}


def _read(arch: str, checkpoint: str | Path, key: str | None) -> tuple[dict[str, torch.Tensor], Structure | None]:
    """The weights of ``checkpoint`` and its channel structure (a channel-pruned model: other shapes than
    the architecture's), or None. A Hugging Face model directory is read by transformers (its key
    conversions), unless dg2pf wrote it channel-pruned: then its model.safetensors holds dg2pf's layout."""
    path = Path(checkpoint)
    if path.is_dir() and arch != hf.HF_ARCH:
        raise CheckpointError(
            f"checkpoint {checkpoint} is a directory"
            + ("; a Hugging Face model directory takes --arch hf" if hf.is_model_dir(checkpoint) else "")
            + "; give the path of a weights file",
            field="checkpoint",
        )
    if arch == hf.HF_ARCH and (path.is_dir() or path.name == hf.WEIGHTS):
        # the directory, or its model.safetensors: read by transformers (its key conversions), unless dg2pf
        # wrote it channel-pruned (narrower than the config: dg2pf's own layout, read as it is)
        weights = hf.weights_path(path)
        structure = read_structure(weights) if weights.is_file() else None
        if structure is None:
            return hf.read_weights(hf.model_dir_of(path)), None
        hf.spec_values(hf.model_dir_of(path))
        return read_state_dict(weights, key=key), structure
    return read_state_dict(checkpoint, key=key), read_structure(checkpoint)


def _narrower(state: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Whether some tensor of ``state`` has ``model``'s rank but is smaller along a dimension."""
    own = model.state_dict()
    return any(
        k in own
        and v.dim() == own[k].dim()
        and v.shape != own[k].shape
        and all(a <= b for a, b in zip(v.shape, own[k].shape))
        for k, v in state.items()
    )


def check_fp16_range(state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Every floating value fits float16 (``compact_values=fp16`` stores them so)."""
    limit = float(torch.finfo(torch.float16).max)
    for name, t in state_dict.items():
        if t.is_floating_point() and t.numel() and float(t.detach().abs().max()) > limit:
            raise ConfigError(
                f"compact_values fp16: {what} tensor {name} holds values beyond float16's range "
                f"(|x| up to {float(t.abs().max()):.3g} > {limit:g}); use compact_values fp32",
                field="compact_values",
            )


def checkpoint_num_classes(arch: str, checkpoint: str | Path, key: str | None = None) -> int:
    """The number of classes ``checkpoint`` was trained for: the output size of ``arch``'s classifier
    (its last Conv/Linear, the convention the pruning code relies on) in the checkpoint. Raises
    ``DG2PFError`` when the file cannot be read or holds no such weight."""
    from dg2pf_core.algorithm.masks import PRUNABLE_MODULES

    get_arch(arch, checkpoint)  # an unknown name is named as such, with suggestions
    model = build_meta(arch, 2, checkpoint)
    last = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)]
    state, _ = _read(arch, checkpoint, key)
    key = f"{last[-1]}.weight" if last else None
    if key is None or key not in state or state[key].dim() < 2:
        raise CheckpointError(
            f"checkpoint {checkpoint} has no classifier weight {key or '(none in ' + arch + ')'} to "
            f"count the classes from; give --num-classes",
            field="num_classes",
        )
    return int(state[key].shape[0])


def load_model(
    arch: str, num_classes: int, checkpoint: str | Path, key: str | None = None
) -> tuple[ArchSpec, nn.Module]:
    spec, model, _ = load_checkpoint_model(arch, num_classes, checkpoint, key=key)
    return spec, model
