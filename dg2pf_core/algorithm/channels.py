"""Channel granularity: DG2PF over groups of coupled output channels, then their physical removal.

The coupling comes from Torch-Pruning's dependency graph (DepGraph, ``torch_pruning``): pruning output
channel ``c`` of a layer also removes the matching entries of everything tied to it (its BatchNorm, the
next layers' input columns, every layer added to it in a residual sum). One such set of channels across
coupled layers is a *group* (rooted at a Conv/Linear layer); ``ChannelPlan`` lists the prunable groups
once and turns any choice of pruned channels into ordinary element masks (``masks``' convention:
``{parameter name: bool}``, ``True`` = pruned) over every parameter a group touches, so simulated
pruning, weight recovery and distillation run on them unchanged.

- Ranking: a channel's importance is the L2 norm of all its entries across the group, divided by the
  square root of their number (the root-mean-square magnitude: groups of different sizes compare
  fairly). One global ranking over all groups prunes ``round(fraction * channels)`` channels; the layer
  collapse guard caps each group at ``cap`` of its channels (at least one channel always stays).
- MACs: a Conv/Linear layer's multiply-accumulates after removal are its unmasked weight entries times
  its output positions, so the MACs of a channel mask are known without removing anything;
  ``fraction_for_macs`` finds the channel fraction that meets a MACs ratio by bisection.
- Removal: ``remove_channels`` prunes the model in place through the dependency graph. What was removed
  is a ``Structure``: plain data (module names and channel indices per stage) stored as JSON in the
  safetensors metadata of the written model (``STRUCTURE_KEY``); ``apply_structure`` rebuilds the smaller
  network from the architecture by replaying it. No module is ever pickled.

Groups are skipped (left dense) when they contain the classifier's output, a layer the selection
leaves out, or a layer whose parameters this module cannot map to channels (grouped, non-depthwise
convolutions, recurrent or attention layers); ``ChannelPlan.skipped`` names them.

Self-attention is pruned by whole heads (``heads.py``): each attention module it knows is one more group
whose channels are its heads (q/k/v rows and output-projection columns, ``unit`` = head_dim entries
per layer), ranked, masked, counted and removed like any other; a structure stage names it
``<module>#heads``.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dg2pf_core.algorithm.heads import HEADS_SUFFIX, head_sites, remove_heads, require_site
from dg2pf_core.algorithm.masks import PRUNABLE_MODULES, Masks, Selection, layer_caps, magnitude_masks, select_prunable
from dg2pf_core.errors import CheckpointError, ConfigError

STRUCTURE_KEY = "dg2pf_structure"  # safetensors metadata key of a channel-pruned model's structure
STRUCTURE_FORMAT = "dg2pf-channels/1"
MAX_STRUCTURE_STAGES = 8  # one per channel job a model went through (each replay traces once)
MAX_STRUCTURE_BYTES = 8 << 20  # far above any torchvision classifier's (resnet152: ~0.2 MB at 90%)
# Tracing runs one forward + backward pass at the input size: its memory grows with the pixels
# (resnet50 at 512x512: ~0.5 GB). Channel granularity traces up to this size, and a structure's
# recorded input size is bounded by it.
MAX_TRACE_SIZE = 512
MACS_TOLERANCE = 0.02  # target_macs_ratio is met within 2% (relative) when widths are rounded
# floor(cap * C) <= C - 1 for any group of up to 1e9 channels
_CAP_BELOW_ONE = 1.0 - 1e-9


# The architectures channel granularity is verified on (Torch-Pruning 1.6, this torchvision): each
# traced at its default input size in seconds and about 1 GB, and its masked network's logits equal
# those of the network with the channels removed (tests/dg2pf_core/algorithm/test_channels.py runs digits_cnn, resnet18
# and mobilenet_v2; docs/benchmarks.md lists the survey of the others). Patterns are fnmatch-style.
CHANNEL_ARCHS = (
    "digits_cnn",
    "cifar/*",
    "torchvision/alexnet",
    "torchvision/convnext_*",
    "torchvision/densenet*",
    "torchvision/efficientnet_*",
    "torchvision/googlenet",
    "torchvision/inception_v3",
    "torchvision/mnasnet*",
    "torchvision/mobilenet_v2",
    "torchvision/mobilenet_v3_*",
    "torchvision/regnet_*",
    "torchvision/resnet*",
    "torchvision/resnext*",
    "torchvision/squeezenet*",
    "torchvision/vgg*",
    "torchvision/wide_resnet*",
    "torchvision/vit_*",
    "timm/resnet*",
    "timm/convnext_*",
    # whole attention heads (heads.py) and MLP hidden units; the residual width (tied to the position
    # embedding) and torchvision's nn.MultiheadAttention are kept whole
    "timm/vit_*",
    "timm/deit*",
    "timm/test_vit*",
    # transformers image classifiers (--arch hf): the registry names them hf/<model_type>
    "hf/vit",
    "hf/deit",
    "hf/convnext",
    "hf/resnet",
)
# Known not to work, and why (checked first: a clear reason instead of "not verified").
CHANNEL_REFUSED = {
    "torchvision/shufflenet_v2_*": "Torch-Pruning's dependency graph fails on its channel shuffle (ZeroDivisionError "
    "inside torch_pruning)",
    "torchvision/swin_*": "tracing its shifted-window attention with Torch-Pruning takes minutes and over 8 GB "
    "of memory",
    "torchvision/maxvit_*": "tracing its block and grid attention with Torch-Pruning takes minutes and over 8 GB "
    "of memory",
}


def unsupported_reason(arch: str) -> str | None:
    """Why channel granularity is not available for ``arch`` (a registry name), or None when it is:
    decided from the name alone, before any model is built or traced."""
    from fnmatch import fnmatchcase  # noqa: PLC0415

    for pattern, why in CHANNEL_REFUSED.items():
        if fnmatchcase(arch, pattern):
            return why
    if not any(fnmatchcase(arch, p) for p in CHANNEL_ARCHS):
        return f"it is not verified on it (it is on: {', '.join(CHANNEL_ARCHS)})"
    return None


def check_architecture(arch: str) -> None:
    """``ConfigError`` (field ``granularity``) unless channel granularity is available for ``arch``."""
    why = unsupported_reason(arch)
    if why is not None:
        raise ConfigError(
            f"granularity 'channel' is not available for {arch}: {why}; use granularity 'unstructured' "
            "or an N:M pattern for this model",
            field="granularity",
        )


@dataclass(frozen=True)
class _Item:
    param: str  # parameter name in the model
    dim: int  # the dimension channels index
    idxs: torch.Tensor  # positions along ``dim`` (int64)
    roots: torch.Tensor  # the group channel each position belongs to (int64, same length)


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels: ``root`` (a Conv/Linear module name, or ``<attention module>#heads``
    for a group of whole heads) and its ``channels``, each ``unit`` units wide in the layers it touches
    (1; a head's ``head_dim``)."""

    root: str
    channels: int
    items: tuple[_Item, ...]
    unit: int = 1

    def multiple(self, multiple: int) -> int:
        """The step this group's kept count is rounded to for kept widths (count x unit) in multiples of
        ``multiple``: heads of 64 units are multiples of 16 already (1); of 8 or 72 units, pairs (2)."""
        return math.lcm(max(1, multiple), self.unit) // self.unit

    def entries_per_channel(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        counts = torch.zeros(self.channels, dtype=torch.float64)
        for item in self.items:
            p = params[item.param]
            per_position = p.numel() // p.shape[item.dim]
            counts.index_add_(0, item.roots, torch.full((len(item.roots),), float(per_position), dtype=torch.float64))
        return counts


@dataclass(frozen=True)
class Structure:
    """What channel pruning removed: ``stages`` of ``{root module name: pruned channel indices}`` (a head
    group's key is ``<attention module>#heads``, its indices heads),
    each stage's indices in the numbering of the network the previous stages left, and the input
    shape (C, H, W) the dependency graph is traced with."""

    input_shape: tuple[int, int, int]
    stages: tuple[dict[str, list[int]], ...] = ()

    def then(self, stage: Mapping[str, list[int]]) -> Structure:
        return Structure(self.input_shape, (*self.stages, {k: list(v) for k, v in stage.items() if v}))

    @property
    def empty(self) -> bool:
        return not any(self.stages)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": STRUCTURE_FORMAT,
                "input_shape": list(self.input_shape),
                "stages": [dict(s) for s in self.stages],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, source: str = "the checkpoint") -> Structure:
        """Parse and bound-check (types, sizes); the names and indices are checked against a model
        by ``apply_structure``. Raises ``CheckpointError``."""

        def bad(why: str) -> CheckpointError:
            return CheckpointError(
                f"{source} has an invalid channel structure ({STRUCTURE_KEY} metadata): {why}; "
                "re-export it with dg2pf, or use an unpruned checkpoint",
                field="checkpoint",
            )

        if len(text) > MAX_STRUCTURE_BYTES:
            raise bad(f"{len(text):,} bytes, over the {MAX_STRUCTURE_BYTES:,} allowed")
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise bad(f"not JSON ({exc})") from exc
        except RecursionError as exc:  # nesting deeper than the interpreter's stack
            raise bad("JSON nested too deeply") from exc
        if not isinstance(doc, dict) or doc.get("format") != STRUCTURE_FORMAT:
            raise bad(f"format is not {STRUCTURE_FORMAT!r}")
        shape, stages = doc.get("input_shape"), doc.get("stages")
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_TRACE_SIZE for v in shape)
            or shape[0] > 4
        ):
            raise bad(
                f"input_shape must be three integers: channels in [1, 4], height and width in [1, {MAX_TRACE_SIZE}]"
            )
        if not isinstance(stages, list) or len(stages) > MAX_STRUCTURE_STAGES:
            raise bad(f"stages must be a list of at most {MAX_STRUCTURE_STAGES}")
        parsed = []
        for stage in stages:
            if not isinstance(stage, dict) or not all(isinstance(k, str) and len(k) <= 1000 for k in stage):
                raise bad("each stage must map module names to channel index lists")
            for name, idxs in stage.items():
                if (
                    not isinstance(idxs, list)
                    or not idxs
                    or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 24 for i in idxs)
                    or len(set(idxs)) != len(idxs)
                ):
                    raise bad(f"{name!r}: channel indices must be distinct non-negative integers")
            parsed.append({k: list(v) for k, v in stage.items()})
        return cls(tuple(shape), tuple(parsed))  # type: ignore[arg-type]


def _tp():
    import torch_pruning  # noqa: PLC0415 - only channel granularity needs it

    return torch_pruning


class TraceError(Exception):
    """Torch-Pruning (or the model's forward pass) failed on this model: the reason, one line."""


def _traced(fn: Callable, *args):
    """``fn(*args)`` with any failure of the tracer or of the model's forward pass (a Torch-Pruning
    bug on an unusual graph, a shape the model cannot take, memory) as ``TraceError``."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - third-party tracer: any failure is "cannot trace"
        text = " ".join(str(exc).split())
        raise TraceError(f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__) from exc


def _dependency_graph(model: nn.Module, input_shape: tuple[int, ...]):
    """Torch-Pruning's graph of ``model``, traced once in eval mode (BatchNorm statistics untouched)."""
    return _traced(_build_graph, model, input_shape)


def _build_graph(model: nn.Module, input_shape: tuple[int, ...]):
    tp = _tp()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros((1, *input_shape), device=device), verbose=False
            )
    finally:
        model.train(was_training)


def _param_dims(module: nn.Module, handler, fn) -> list[tuple[str, int]] | None:
    """(parameter attribute, dimension) that ``handler`` prunes channels along in ``module``; None
    when this module cannot say (the group is then skipped); [] for parameter-free nodes."""
    own = [n for n, _ in module.named_parameters(recurse=False)] if isinstance(module, nn.Module) else None
    if own is None:  # a bare nn.Parameter node
        return None
    if handler in (
        fn.prune_conv_out_channels,
        fn.prune_depthwise_conv_out_channels,
        fn.prune_depthwise_conv_in_channels,
    ):
        if not isinstance(module, nn.modules.conv._ConvNd):
            return None
        depthwise = module.groups == module.out_channels == module.in_channels
        if module.groups > 1 and not depthwise:
            return None
        dims = [("weight", 1 if module.transposed and not depthwise else 0)]
        return dims + ([("bias", 0)] if module.bias is not None else [])
    if handler == fn.prune_conv_in_channels:
        if not isinstance(module, nn.modules.conv._ConvNd) or module.groups > 1:
            return None
        return [("weight", 0 if module.transposed else 1)]
    if handler == fn.prune_linear_out_channels:
        return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
    if handler == fn.prune_linear_in_channels:
        return [("weight", 1)]
    if handler in (fn.prune_batchnorm_out_channels, fn.prune_batchnorm_in_channels):
        return [(n, 0) for n in ("weight", "bias") if n in own]
    if handler in (fn.prune_prelu_out_channels, fn.prune_prelu_in_channels):
        return [("weight", 0)] if module.weight.numel() > 1 else []
    return [] if not own else None


def _head_projections(model: nn.Module) -> list[nn.Module]:
    """The query/key/value projections of attention modules that reshape them into ``num_heads`` heads by
    width (timm's ``Attention``: ``qkv``, or ``q``/``k``/``v``/``kv``, or ``*_proj``; transformers' ``*_proj`` or
    ``query``/``key``/``value`` beside ``num_attention_heads``): removing single output channels
    would break that reshape, so they are never roots of a traced group. Where ``heads.head_sites``
    knows the module, its heads are a group of their own (``_head_groups``); elsewhere they stay whole."""
    out = []
    for module in model.modules():
        heads = getattr(module, "num_heads", getattr(module, "num_attention_heads", None))  # timm's; transformers'
        if isinstance(module, nn.MultiheadAttention) or not isinstance(heads, int):
            continue
        names = (
            "qkv",
            "q",
            "k",
            "v",
            "kv",
            "q_proj",
            "k_proj",
            "v_proj",
            "kv_proj",
            "qkv_proj",
            "query",
            "key",
            "value",
        )
        for name in names:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                out.append(child)
    return out


def _head_groups(model: nn.Module, selected: set[str]) -> tuple[list[ChannelGroup], list[str]]:
    """One group of whole heads per attention module ``heads.head_sites`` finds (its q/k/v rows and its
    output projection's columns per head), unless the selection leaves one of its layers out."""
    sites, skipped = head_sites(model)
    groups = []
    for site in sites:
        left_out = [n for n in (*site.inputs, site.output) if f"{n}.weight" not in selected]
        if left_out:
            skipped.append(f"{site.key} (the selection leaves out {', '.join(left_out)})")
            continue
        items = []
        for name in site.inputs:
            idxs, roots = site.rows()
            items.append(_Item(f"{name}.weight", 0, idxs, roots))
            if model.get_submodule(name).bias is not None:
                items.append(_Item(f"{name}.bias", 0, idxs, roots))
        idxs, roots = site.columns()
        items.append(_Item(f"{site.output}.weight", 1, idxs, roots))
        groups.append(ChannelGroup(site.key, site.heads, tuple(items), unit=site.head_dim))
    return groups, skipped


@dataclass
class ChannelPlan:
    """The prunable channel groups of one model (in its current shapes)."""

    groups: list[ChannelGroup]
    positions: dict[str, int]  # Conv/Linear weight name -> output positions per sample
    skipped: list[str] = field(default_factory=list)  # roots left dense: "name (why)"

    @property
    def channels(self) -> int:
        return sum(g.channels for g in self.groups)

    @classmethod
    def build(cls, model: nn.Module, input_shape: tuple[int, ...], selection: Selection = Selection()) -> ChannelPlan:
        """Trace ``model`` (a dense nn.Module, not DDP) with one zero input of ``input_shape`` (C, H, W).
        Raises ``ConfigError`` (field ``granularity``) when no group can be pruned."""
        fn = _tp().pruner.function
        shape = "x".join(map(str, input_shape))
        if max(input_shape[1:]) > MAX_TRACE_SIZE:
            raise ConfigError(
                f"granularity 'channel' traces the model at its input size, {shape}: at most "
                f"{MAX_TRACE_SIZE}x{MAX_TRACE_SIZE} (set image_size)",
                field="granularity",
            )
        names = {m: n for n, m in model.named_modules()}
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)]
        selected = set(select_prunable(model, selection).params)
        classifier = layers[-1][1] if layers else None
        ignored = [m for n, m in layers if f"{n}.weight" not in selected or m is classifier]
        ignored += _head_projections(model)  # attention splits these by width into heads: kept whole
        try:
            graph = _dependency_graph(model, input_shape)
            raw = _traced(
                lambda: list(graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_MODULES))
            )
            positions = _traced(_positions, model, input_shape)
        except TraceError as exc:
            raise ConfigError(
                f"granularity 'channel' cannot trace {type(model).__name__} at input {shape} with Torch-Pruning's "
                f"dependency graph ({exc}); use granularity 'unstructured' or an N:M pattern for this "
                "model",
                field="granularity",
            ) from exc
        groups, skipped = [], []
        for group in raw:
            root_module = group[0].dep.target.module
            root = names[root_module]
            items, why = [], None
            for item in group.items:
                module, handler = item.dep.target.module, item.dep.handler
                dims = _param_dims(module, handler, fn)
                if dims is None:
                    why = f"{names.get(module, type(module).__name__)} ({type(module).__name__}) has no channel mapping"
                    break
                if not dims:
                    continue
                idxs = torch.as_tensor(list(item.idxs), dtype=torch.int64)
                roots = torch.as_tensor(list(item.root_idxs), dtype=torch.int64)
                for attr, dim in dims:
                    size = getattr(module, attr).shape[dim]
                    if idxs.numel() and int(idxs.max()) >= size:  # e.g. a packed gated MLP's fc1 coupled 1:1 to fc2
                        why = (
                            f"{names.get(module, type(module).__name__)}.{attr} has {size} channels and the traced "
                            "group maps more onto it (a packed or split layer)"
                        )
                        break
                    items.append(_Item(f"{names[module]}.{attr}" if names[module] else attr, dim, idxs, roots))
                if why is not None:
                    break
            channels = len(group[0].idxs)
            if why is None and channels < 2:
                why = "a single channel"
            if why is not None:
                skipped.append(f"{root} ({why})")
                continue
            groups.append(ChannelGroup(root, channels, tuple(items)))
        head_groups, head_skipped = _head_groups(model, selected)
        groups += head_groups
        skipped += head_skipped
        if not groups:
            raise ConfigError(
                "granularity 'channel': no channel group of this model can be pruned (the classifier's "
                "outputs never are; see include/exclude)" + (f"; skipped: {', '.join(skipped[:5])}" if skipped else ""),
                field="granularity",
            )
        return cls(groups, positions, skipped)

    # --- ranking ---
    def importance(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per group: each channel's root-mean-square magnitude over all its entries (float32, CPU)."""
        out = {}
        for g in self.groups:
            sq = torch.zeros(g.channels, dtype=torch.float64)
            for item in g.items:
                p = params[item.param].detach()
                per = p.float().pow(2).transpose(0, item.dim).reshape(p.shape[item.dim], -1).sum(1).cpu().double()
                sq.index_add_(0, item.roots, per[item.idxs])
            out[g.root] = (sq / g.entries_per_channel(params)).sqrt().float()
        return out

    def select(
        self, params: Mapping[str, torch.Tensor], fraction: float, cap: float, multiple: int = 1
    ) -> dict[str, torch.Tensor]:
        """Per group, a bool vector of its pruned channels: the globally least important
        ``round(fraction * channels)``, no group beyond ``cap`` of its channels nor left empty; then,
        with ``multiple`` > 1, every group's kept width rounded up to a multiple of it (its most
        important pruned channels put back; a group keeps all its channels at most), so fewer go."""
        importance = self.importance(params)
        # The guard: at most floor(cap * C) channels of a group go, and (cap < 1) never all of them.
        pruned = magnitude_masks(importance, fraction, "global", max_layer_sparsity=min(cap, _CAP_BELOW_ONE))
        if multiple <= 1:
            return pruned
        for g in self.groups:
            chosen = pruned[g.root]
            back = _kept_to_multiple(g.channels, g.channels - int(chosen.sum()), g.multiple(multiple)) - (
                g.channels - int(chosen.sum())
            )
            if back > 0:
                idx = torch.nonzero(chosen).flatten()
                chosen[idx[importance[g.root][idx].argsort(descending=True, stable=True)[:back]]] = False
        return pruned

    def masks(self, params: Mapping[str, torch.Tensor], pruned: Mapping[str, torch.Tensor]) -> Masks:
        """Element masks over every parameter the groups touch for the chosen channels ``pruned``."""
        out: Masks = {}
        for g in self.groups:
            chosen = pruned[g.root]
            for item in g.items:
                p = params[item.param]
                if item.param not in out:  # shapes only (meta tensors): the masks on the CPU
                    out[item.param] = torch.zeros(p.shape, dtype=torch.bool, device="cpu" if p.is_meta else p.device)
                hit = item.idxs[chosen[item.roots]].to(out[item.param].device)
                if len(hit):
                    out[item.param].index_fill_(item.dim, hit, True)
        return out

    def pruned_channels(self, pruned: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """The structure stage of a selection: root -> sorted pruned indices (empty groups left out)."""
        return {
            g.root: torch.nonzero(pruned[g.root]).flatten().tolist() for g in self.groups if bool(pruned[g.root].any())
        }

    # --- cost ---
    def macs(self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> int:
        """Conv/Linear multiply-accumulates per sample once the masked channels are removed."""
        total = 0
        for name, positions in self.positions.items():
            kept = params[name].numel() - (int(masks[name].sum()) if name in masks else 0)
            total += kept * positions
        return total

    def dense_macs(self, params: Mapping[str, torch.Tensor]) -> int:
        return sum(params[name].numel() * positions for name, positions in self.positions.items())

    def check_fraction(self, fraction: float, cap: float) -> None:
        """``ConfigError`` (field ``sparsity``) when the layer collapse guard (``cap``: the most of a group
        that may go) cannot let ``round(fraction * channels)`` channels go. Shapes only (meta tensors)."""
        total = self.channels
        want = round(fraction * total)
        sizes = {g.root: torch.empty(g.channels, device="meta") for g in self.groups}
        allowed = sum(layer_caps(sizes, min(cap, _CAP_BELOW_ONE), want).values())
        if want > allowed:
            raise ConfigError(
                f"sparsity {fraction:g} with granularity 'channel' asks for {want:,} of the {total:,} prunable "
                f"channels, but the layer collapse guard (at most {cap:g} of a layer's channels, one always "
                f"kept) lets {allowed:,} ({allowed / total:.3f}) go: lower sparsity, or raise max_layer_sparsity "
                "/ lower layer_density_floor",
                field="sparsity",
            )

    def check_reachable(
        self, params: Mapping[str, torch.Tensor], ratio: float, cap: Callable[[float], float], multiple: int = 1
    ) -> int:
        """The most channels the layer collapse guard lets go; ``ConfigError`` (field ``target_macs_ratio``)
        when even that (kept widths rounded up to ``multiple``) leaves more than ``ratio`` of the MACs.
        Reads shapes only (every group at its cap; which channels does not change a count): works on
        meta tensors, before any weight is read."""
        most = self.most_prunable(cap)
        at_cap = {
            g.root: torch.arange(g.channels)
            < g.channels - _kept_to_multiple(g.channels, g.channels - n, g.multiple(multiple))
            for g, n in zip(self.groups, self._group_caps(most, cap))
        }
        least = self.macs(params, self.masks(params, at_cap)) / self.dense_macs(params)
        if least > ratio:
            rounded = f" with widths rounded up to multiples of {multiple} (channel_multiple)" if multiple > 1 else ""
            raise ConfigError(
                f"target_macs_ratio {ratio:g} cannot be reached: pruning every channel the layer collapse guard "
                f"allows{rounded} leaves {least:.3f} of the MACs (raise max_layer_sparsity or lower "
                "layer_density_floor"
                + (", lower channel_multiple" if multiple > 1 else "")
                + ", or ask for a larger ratio)",
                field="target_macs_ratio",
            )
        return most

    def fraction_for_count(
        self, params: Mapping[str, torch.Tensor], fraction: float, cap: Callable[[float], float], multiple: int
    ) -> float:
        """The ranking fraction whose selection with kept widths rounded up to ``multiple`` prunes
        ``round(fraction * channels)`` channels (rounding puts some back: the ranking goes further to
        make up for them), or the most the layer collapse guard allows when it cannot. ``fraction``
        itself when ``multiple`` is 1."""
        total = self.channels
        want = round(fraction * total)
        if multiple <= 1 or want == 0:
            return fraction

        def pruned(k: int) -> int:
            return sum(int(v.sum()) for v in self.select(params, k / total, cap(k / total), multiple).values())

        lo, hi = want, self.most_prunable(cap)
        if hi <= lo:  # the guard lets no more go (a fraction it cannot reach is refused at submit)
            return fraction
        if pruned(hi) < want:  # even the most the guard allows, rounded, prunes fewer: prune that
            return hi / total
        while hi - lo > 1:  # the smallest k whose rounded selection prunes at least want ...
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if pruned(mid) >= want else (mid, hi)
        return min((lo, hi), key=lambda k: (abs(pruned(k) - want), k)) / total  # ... or the one before, if closer

    def fit_count(
        self,
        params: Mapping[str, torch.Tensor],
        fraction: float,
        cap: Callable[[float], float],
        multiple: int = 1,
        tolerance: float = MACS_TOLERANCE,
    ) -> tuple[float, int]:
        """``fraction_for_count`` with the largest of ``multiple``, its halves, ... 1 whose rounded
        selection prunes ``round(fraction * channels)`` channels within ``tolerance`` of them (relative,
        at least one channel): narrow layers in steps of 16 may not come near. Returns (ranking fraction,
        the multiple used)."""
        want, m = round(fraction * self.channels), max(1, multiple)
        while True:
            at = self.fraction_for_count(params, fraction, cap, m)
            got = sum(int(v.sum()) for v in self.select(params, at, cap(at), m).values())
            if m == 1 or abs(got - want) <= max(1.0, tolerance * want):
                return at, m
            m //= 2

    def _group_caps(self, k: int, cap: Callable[[float], float]) -> list[int]:
        """Per group, the channels the guard ``cap`` lets go at a ranking of ``k`` channels."""
        c = min(cap(k / self.channels), _CAP_BELOW_ONE)
        return [math.floor(c * g.channels + 1e-9) for g in self.groups]

    def most_prunable(self, cap: Callable[[float], float]) -> int:
        """The most channels a ranking may prune under the layer collapse guard ``cap(fraction)``."""

        def caps(k: int) -> int:
            return sum(self._group_caps(k, cap))

        lo, hi = 0, self.channels - 1  # k <= what the caps at k/total let go: holds up to the most, not after
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if mid <= caps(mid) else (lo, mid)
        return hi if hi <= caps(hi) else lo

    def fit_macs(
        self,
        params: Mapping[str, torch.Tensor],
        ratio: float,
        cap: Callable[[float], float],
        multiple: int = 1,
        tolerance: float = MACS_TOLERANCE,
    ) -> tuple[float, float, int]:
        """``fraction_for_macs`` with kept widths rounded to the largest of ``multiple``, its halves, ... 1
        that still meets ``ratio`` within ``tolerance`` (relative): a narrow network's widths in steps of
        16 may not come near the target. Returns (fraction, MACs ratio, the multiple used)."""
        m = max(1, multiple)
        while True:
            try:
                fraction, got = self.fraction_for_macs(params, ratio, cap, m)
            except ConfigError:
                if m == 1:
                    raise
            else:
                if m == 1 or abs(got - ratio) <= tolerance * ratio:
                    return fraction, got, m
            m //= 2

    def fraction_for_macs(
        self, params: Mapping[str, torch.Tensor], ratio: float, cap: Callable[[float], float], multiple: int = 1
    ) -> tuple[float, float]:
        """The channel fraction whose selection (under ``cap(fraction)``, the layer collapse guard at that
        fraction) leaves the MACs ratio closest to ``ratio`` (one channel either side of the first count
        at or under it), and that MACs ratio. Raises ``ConfigError`` (field ``target_macs_ratio``) when the guard
        cannot reach it."""
        dense = self.dense_macs(params)
        total = self.channels

        def ratio_at(k: int) -> float:
            return (
                self.macs(params, self.masks(params, self.select(params, k / total, cap(k / total), multiple))) / dense
            )

        most = self.check_reachable(params, ratio, cap, multiple)
        lo, hi = 0, most
        while hi - lo > 1:  # ratio_at falls as k grows: the first k at or under the target ...
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ratio_at(mid) <= ratio else (mid, hi)
        k = min((lo, hi), key=lambda k: abs(ratio_at(k) - ratio))  # ... or the one before, if closer
        return k / total, ratio_at(k)


def _kept_to_multiple(channels: int, kept: int, multiple: int) -> int:
    """``kept`` rounded up to a multiple of ``multiple``, at most ``channels``."""
    return min(channels, -(-kept // multiple) * multiple) if multiple > 1 else kept


@torch.no_grad()
def _positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    positions: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        out = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
        positions[f"{names[module]}.weight"] = output.numel() // out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE_MODULES)]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_shape), device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return positions


def remove_channels(model: nn.Module, input_shape: tuple[int, ...], stage: Mapping[str, list[int]]) -> None:
    """Physically remove, in place, the output channels ``stage`` names (root module -> indices in the
    model's current numbering) with everything coupled to them. Raises ``CheckpointError`` when a
    name or index does not fit the model (a structure from another architecture or a tampered file)."""
    if not stage:
        return
    for key, idxs in stage.items():  # whole heads: sliced directly, before the graph is traced
        if key.endswith(HEADS_SUFFIX):
            remove_heads(model, key, idxs)
    stage = {k: v for k, v in stage.items() if not k.endswith(HEADS_SUFFIX)}
    if not stage:
        return
    try:
        graph = _dependency_graph(model, input_shape)
    except TraceError as exc:
        raise CheckpointError(
            f"the checkpoint's channel structure cannot be replayed on {type(model).__name__} at its "
            f"recorded input {'x'.join(map(str, input_shape))} ({exc}): the checkpoint was pruned "
            "from another architecture or the structure was altered",
            field="checkpoint",
        ) from exc
    for root, idxs in stage.items():
        try:
            module = model.get_submodule(root)
        except AttributeError:
            module = None
        if not isinstance(module, PRUNABLE_MODULES):
            raise CheckpointError(
                f"channel structure names {root!r}, which is not a Conv/Linear layer of this model: "
                "the checkpoint was pruned from another architecture",
                field="checkpoint",
            )
        pruner = graph.get_pruner_of_module(module)
        width = pruner.get_out_channels(module)
        if max(idxs) >= width:
            raise CheckpointError(
                f"channel structure prunes channel {max(idxs)} of {root!r}, which has {width} (0 to "
                f"{width - 1}): the checkpoint was pruned from another architecture or model size",
                field="checkpoint",
            )
        if len(idxs) >= width:
            raise CheckpointError(
                f"channel structure removes all {width} channels of {root!r}: dg2pf always keeps one; "
                "the structure was altered",
                field="checkpoint",
            )
        try:
            _traced(lambda: graph.get_pruning_group(module, pruner.prune_out_channels, sorted(idxs)).prune())
        except TraceError as exc:
            raise CheckpointError(
                f"the checkpoint's channel structure cannot be replayed at {root!r} ({exc}): the "
                "checkpoint was pruned from another architecture or the structure was altered",
                field="checkpoint",
            ) from exc


def apply_structure(model: nn.Module, structure: Structure, arch: str | None = None) -> nn.Module:
    """``model`` (built dense from its architecture, registry name ``arch`` where known) pruned, in place,
    to ``structure``. Raises ``CheckpointError`` when the structure does not fit the model, would remove
    classes, or names an architecture channel granularity is not available for (checked first: tracing
    some graphs takes minutes and GBs)."""
    why = None if arch is None else unsupported_reason(arch)
    if why is not None:
        raise CheckpointError(
            f"the checkpoint carries a channel structure ({STRUCTURE_KEY}), which dg2pf never writes "
            f"for {arch} ({why}): it was altered; use an unpruned checkpoint",
            field="checkpoint",
        )
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE_MODULES)]
    classes = layers[-1].weight.shape[0] if layers else None
    first = next((m for m in layers if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != structure.input_shape[0]:
        raise CheckpointError(
            f"the checkpoint's channel structure was traced on {structure.input_shape[0]}-channel "
            f"inputs, but this {type(model).__name__} takes {first.in_channels}: it was pruned from "
            "another architecture or the structure was altered",
            field="checkpoint",
        )
    projections = _head_projections(model)
    for stage in structure.stages:  # names first, for every stage: nothing is traced for a structure that cannot fit
        for root in stage:
            if root.endswith(HEADS_SUFFIX):
                require_site(model, root)  # its head count is checked when the stage is replayed
                continue
            try:
                module = model.get_submodule(root) if root else None
            except AttributeError:
                module = None
            if not isinstance(module, PRUNABLE_MODULES):
                raise CheckpointError(
                    f"channel structure names {root!r}, which is not a Conv/Linear layer of this model: "
                    "the checkpoint was pruned from another architecture",
                    field="checkpoint",
                )
            if any(module is p for p in projections):
                raise CheckpointError(
                    f"channel structure removes single outputs of {root!r}, an attention projection that "
                    "dg2pf only ever prunes by whole heads: the structure was altered",
                    field="checkpoint",
                )
    for stage in structure.stages:
        remove_channels(model, structure.input_shape, stage)
        gc.collect()  # the dependency graph is a web of cycles holding the traced activations: free it now
    if layers and layers[-1].weight.shape[0] != classes:  # the outputs are the classes: never pruned
        raise CheckpointError(
            f"the checkpoint's channel structure removes outputs of the classifier ({classes} classes -> "
            f"{layers[-1].weight.shape[0]}); dg2pf never writes such a model: use an unpruned checkpoint",
            field="checkpoint",
        )
    return model


def structured(model: nn.Module, checkpoint: str | Path, arch: str | None = None) -> nn.Module:
    """``model`` (the architecture ``arch``, built dense) pruned to the channel structure ``checkpoint``
    records, if any: what every reader of a dg2pf artifact calls before loading its weights."""
    structure = read_structure(checkpoint)
    return model if structure is None else apply_structure(model, structure, arch)


def read_structure(path: str | Path) -> Structure | None:
    """The channel structure stored in a safetensors file's metadata, or None (unpruned or not
    safetensors). Raises ``CheckpointError`` for a malformed one."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - not safetensors: read_state_dict reports what it is
        return None
    text = metadata.get(STRUCTURE_KEY)
    return None if text is None else Structure.from_json(text, source=str(path))
