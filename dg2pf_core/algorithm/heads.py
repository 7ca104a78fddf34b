"""Whole attention heads: where a transformer's self-attention can lose heads, and their removal.

A multi-head attention module projects its input to queries, keys and values, reshapes each into
``heads`` slices of ``head_dim`` units, attends within each slice and projects the concatenated slices
back (the output projection's input columns). Removing single units would break that reshape, so
channel granularity prunes such a module by whole heads: head ``h`` is rows ``h*head_dim ...
(h+1)*head_dim`` of each of q, k and v (weights and biases) and the same columns of the output
projection. With those entries zero the head contributes nothing (its values are zero, so whatever
its attention weights, its slice of the output is zero, and the columns reading it are zero too):
the masked network equals the one with the head removed, as for any channel.

Only modules whose whole coupling is known are pruned by heads (``head_sites``): timm's ``Attention``
(fused ``qkv`` + ``proj``; no gate, no scale norm) and transformers' ViT/DeiT attention (``q_proj``,
``k_proj``, ``v_proj`` + ``o_proj``). Anything else with ``num_heads`` keeps its q/k/v whole, as before
(``channels._head_projections``): a per-head parameter the module holds elsewhere (relative position
biases, gates, grouped key/value heads) would silently stop matching.

Removal replaces the projections' parameters with their kept rows/columns and lowers the module's head
count (``num_heads`` / ``num_attention_heads``, and timm's ``attn_dim``), which its forward reshapes by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dg2pf_core.errors import CheckpointError

HEADS_SUFFIX = "#heads"  # a structure stage's key for a head group: "<attention module name>#heads"

# The classes whose forward is known to depend on the projections and the head count only (their code read,
# their masked == removed logits tested): "module.qualname"
_KNOWN = {
    "timm.layers.attention.Attention": ("fused", ("qkv",), "proj"),
    "transformers.models.vit.modeling_vit.ViTAttention": ("split", ("q_proj", "k_proj", "v_proj"), "o_proj"),
    "transformers.models.deit.modeling_deit.DeiTAttention": ("split", ("q_proj", "k_proj", "v_proj"), "o_proj"),
}


@dataclass(frozen=True)
class HeadSite:
    """One attention module prunable by whole heads: its name, head count and width, the projections
    producing q/k/v (one fused ``qkv`` of 3 * heads * head_dim rows, or one per q, k, v) and the output
    projection reading heads * head_dim columns."""

    name: str
    heads: int
    head_dim: int
    fused: bool
    inputs: tuple[str, ...]  # full module names of the q/k/v projection(s)
    output: str  # full module name of the output projection

    @property
    def key(self) -> str:
        return f"{self.name}{HEADS_SUFFIX}"

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, head of each position) along one q/k/v projection's output rows."""
        width = self.heads * self.head_dim
        parts = 3 if self.fused else 1
        idxs = torch.arange(parts * width, dtype=torch.int64)
        return idxs, (idxs % width) // self.head_dim

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, head of each position) along the output projection's input columns."""
        idxs = torch.arange(self.heads * self.head_dim, dtype=torch.int64)
        return idxs, idxs // self.head_dim


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _heads_of(module: nn.Module) -> int | None:
    heads = getattr(module, "num_heads", getattr(module, "num_attention_heads", None))
    return heads if isinstance(heads, int) and not isinstance(heads, bool) else None


def _site(name: str, module: nn.Module) -> tuple[HeadSite | None, str | None]:
    """The site of ``module`` (None with the reason when it cannot lose heads; None, None when it is no
    attention module dg2pf knows)."""
    known = _KNOWN.get(_qualname(module))
    heads, head_dim = _heads_of(module), getattr(module, "head_dim", None)
    if known is None or heads is None or not isinstance(head_dim, int) or head_dim < 1:
        return None, None
    kind, inputs, output = known
    prefix = f"{name}." if name else ""
    width = heads * head_dim
    if heads < 2:
        return None, "a single head"
    if list(module.parameters(recurse=False)):
        return None, "it holds parameters of its own"
    # every child is a projection named here, a per-head norm of q or k (applied to each head alone, its
    # parameters, if any, shared by all heads), dropout or an identity: anything else (timm's scale norm
    # over all heads' outputs, with or without parameters) may depend on the heads
    allowed = {*inputs, output}
    for child_name, child in module.named_children():
        if child_name in allowed or isinstance(child, (nn.Identity, nn.Dropout)):
            continue
        if child_name in ("q_norm", "k_norm") and all(p.shape == (head_dim,) for p in child.parameters()):
            continue
        return None, f"{child_name} ({type(child).__name__}) depends on the heads"
    if getattr(module, "gate", None) is not None:  # timm's gated attention: a per-head projection of its own
        return None, "gate depends on the heads"
    if kind == "fused" and getattr(module, "attn_dim", None) != width:
        # the timm versions whose forward reshapes the heads' output by attn_dim (not by the model width)
        return None, "this timm version's Attention has no attn_dim to reshape by"
    rows = 3 * width if kind == "fused" else width
    for child_name in inputs:
        child = getattr(module, child_name, None)
        if not isinstance(child, nn.Linear) or child.out_features != rows:
            return None, f"{child_name} is not a Linear layer of {rows} outputs"
    out = getattr(module, output, None)
    if not isinstance(out, nn.Linear) or out.in_features != width:
        return None, f"{output} is not a Linear layer of {width} inputs"
    site = HeadSite(name, heads, head_dim, kind == "fused", tuple(prefix + n for n in inputs), prefix + output)
    return site, None


def head_sites(model: nn.Module) -> tuple[list[HeadSite], list[str]]:
    """The attention modules of ``model`` prunable by whole heads, and those of a known class that are
    not ("name (why)")."""
    sites, skipped = [], []
    for name, module in model.named_modules():
        site, why = _site(name, module)
        if site is not None:
            sites.append(site)
        elif why is not None:
            skipped.append(f"{name} ({why})")
    return sites, skipped


def require_site(model: nn.Module, key: str) -> HeadSite:
    """The head site ``key`` names; ``CheckpointError`` when it names none of ``model``."""
    name = key.removesuffix(HEADS_SUFFIX)
    try:
        module = model.get_submodule(name) if key.endswith(HEADS_SUFFIX) else None
    except AttributeError:
        module = None
    site, why = _site(name, module) if module is not None else (None, None)
    if site is None and why is not None:
        raise CheckpointError(
            f"channel structure removes heads of {name!r}, whose heads cannot be removed ({why}): the "
            "structure was altered",
            field="checkpoint",
        )
    if site is None:
        raise CheckpointError(
            f"channel structure names {key!r}, which is not an attention module of this model that dg2pf "
            "prunes by heads: the checkpoint was pruned from another architecture",
            field="checkpoint",
        )
    return site


def _keep(linear: nn.Linear, dim: int, kept: torch.Tensor) -> None:
    with torch.no_grad():
        weight = linear.weight.index_select(dim, kept.to(linear.weight.device)).clone()
        linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            bias = linear.bias.index_select(0, kept.to(linear.bias.device)).clone()
            linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def remove_heads(model: nn.Module, key: str, idxs: list[int]) -> None:
    """Remove, in place, the heads ``idxs`` (in the module's current numbering) of the attention module a
    structure key names. Raises ``CheckpointError`` when the key or an index does not fit the model."""
    site = require_site(model, key)
    if max(idxs) >= site.heads or len(idxs) >= site.heads:
        raise CheckpointError(
            f"channel structure removes heads {sorted(idxs)[:8]} of {site.name!r}, which has {site.heads} "
            "(dg2pf always keeps one): the checkpoint was pruned from another model size or the structure "
            "was altered",
            field="checkpoint",
        )
    gone = torch.zeros(site.heads, dtype=torch.bool)
    gone[torch.as_tensor(idxs, dtype=torch.int64)] = True
    positions, heads = site.rows()
    for name in site.inputs:
        _keep(model.get_submodule(name), 0, positions[~gone[heads]])
    positions, heads = site.columns()
    _keep(model.get_submodule(site.output), 1, positions[~gone[heads]])
    module = model.get_submodule(site.name) if site.name else model
    left = site.heads - len(idxs)
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, left)
    for attr in ("attn_dim", "all_head_size"):  # timm's width of the heads; older transformers' name for it
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, left * site.head_dim)
