"""Linear over-parameterization of a pruned network, for fine-tuning only (Qian et al., 2022).

``expand(model, masks, factor)`` replaces every masked ``Conv2d``/``Linear`` by a chain of two linear
layers with ``factor`` times the input width in between and no non-linearity, initialised so the
product is exactly the original weight (the network computes the same function); ``collapse`` multiplies
the chains back into the original layer types, so the state_dict has the input model's keys and shapes.

The unstructured mask is honoured in every forward pass: an expanded layer's effective weight is
``collapse(chain)`` with the pruned entries zeroed, so they stay exactly 0 and the sparsity never changes.

- Linear ``W`` (out x in) = ``B @ A`` with ``A`` (h x in), ``B`` (out x h), ``h = factor * in``.
- Conv2d ``W`` (out x in x k x k) = a 1x1 convolution ``A`` (in -> h channels) followed by a k x k
  convolution ``B`` (h -> out) with the original stride/padding/dilation: ``W[o,i] = sum_j B[o,j] A[j,i]``,
  exact because a 1x1 convolution commutes with zero padding. Grouped convolutions (depthwise) are
  left as they are: their per-group weights have no input width to widen.

Initialisation: ``A`` has orthonormal columns (QR of a Gaussian matrix), ``B = W A^T``, so
``B A = W A^T A = W``; every chain parameter gets gradients from the start (no zero blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dg2pf_core.algorithm.masks import Masks
from dg2pf_core.errors import ConfigError


def _orthonormal_columns(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # a unique, well-spread orthonormal basis


class _Chain(nn.Module):
    """``weight = keep * (B composed with A)``; subclasses say how the weight is used and collapsed."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor,
        factor: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape[0], weight.shape[1]
        hidden = factor * in_features
        a = _orthonormal_columns(hidden, in_features, generator)  # (hidden x in), A^T A = I
        w = weight.detach().to(torch.float64).reshape(out_features, in_features, -1)  # (out x in x k*k)
        b = torch.einsum("oik,hi->ohk", w, a)  # B = W A^T, per kernel position
        self.a = nn.Parameter(a.to(weight.dtype).to(weight.device))
        self.b = nn.Parameter(b.reshape(out_features, hidden, *weight.shape[2:]).to(weight.dtype).to(weight.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        # masks mark the pruned entries (True = removed); the chain keeps the complement.
        self.register_buffer("keep", ~mask.to(device=weight.device, dtype=torch.bool), persistent=True)

    def weight(self) -> torch.Tensor:
        b = self.b.reshape(self.b.shape[0], self.b.shape[1], -1)
        w = torch.einsum("ohk,hi->oik", b, self.a).reshape(self.keep.shape)
        return w * self.keep

    def _filled(self, layer: nn.Module) -> nn.Module:
        """``layer`` (the original type and shape) holding this chain's effective weight and bias."""
        with torch.no_grad():
            layer.weight.copy_(self.weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


class ExpandedLinear(_Chain):
    def __init__(self, layer: nn.Linear, mask: torch.Tensor, factor: int, generator: torch.Generator) -> None:
        super().__init__(layer.weight, layer.bias, mask, factor, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def collapse(self) -> nn.Linear:
        out_f, in_f = self.keep.shape
        return self._filled(
            nn.Linear(in_f, out_f, bias=self.bias is not None, device=self.a.device, dtype=self.a.dtype)
        )


class ExpandedConv2d(_Chain):
    def __init__(self, layer: nn.Conv2d, mask: torch.Tensor, factor: int, generator: torch.Generator) -> None:
        super().__init__(layer.weight, layer.bias, mask, factor, generator)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.padding_mode = layer.padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            return F.conv2d(
                F.pad(x, pad, mode=self.padding_mode), self.weight(), self.bias, self.stride, 0, self.dilation
            )
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)

    def collapse(self) -> nn.Conv2d:
        out_c, in_c, kh, kw = self.keep.shape
        return self._filled(
            nn.Conv2d(
                in_c,
                out_c,
                (kh, kw),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                bias=self.bias is not None,
                padding_mode=self.padding_mode,
                device=self.a.device,
                dtype=self.a.dtype,
            )
        )


EXPANDED = (ExpandedLinear, ExpandedConv2d)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def expand(model: nn.Module, masks: Masks, factor: int, seed: int = 0) -> list[str]:
    """Replace, in place, each layer whose ``<name>.weight`` has a mask by its chain; returns the
    expanded layers' names. Grouped convolutions are skipped (see the module docstring)."""
    if factor < 1:
        raise ConfigError(f"overparam_expansion must be >= 1, got {factor}", field="overparam_expansion")
    generator = torch.Generator().manual_seed(seed)
    expanded = []
    for key, mask in masks.items():
        name = key.removesuffix(".weight")
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d) and layer.groups == 1:
            chain: nn.Module = ExpandedConv2d(layer, mask, factor, generator)
        elif isinstance(layer, nn.Linear):
            chain = ExpandedLinear(layer, mask, factor, generator)
        else:
            continue
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, chain)
        expanded.append(name)
    return expanded


def collapse(model: nn.Module) -> None:
    """Multiply every chain back into one layer of the original type and shape, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, EXPANDED):
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, module.collapse())


def is_expanded(model: nn.Module) -> bool:
    return any(isinstance(m, EXPANDED) for m in model.modules())


def collapsed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict ``model`` would have after ``collapse``, without changing ``model``."""
    out: dict[str, torch.Tensor] = {}
    chains = {name: m for name, m in model.named_modules() if isinstance(m, EXPANDED)}
    for key, value in model.state_dict().items():
        owner = next((n for n in chains if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value.detach().clone()
        elif key == f"{owner}.a":  # one entry per chain: its weight (and bias)
            chain = chains[owner]
            with torch.no_grad():
                out[f"{owner}.weight"] = chain.weight().detach().clone()
            if chain.bias is not None:
                out[f"{owner}.bias"] = chain.bias.detach().clone()
    return out
