"""What a pruned model is worth: accuracy, parameter counts, sparsity and multiply-accumulates."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dg2pf_core.algorithm.masks import PRUNABLE_MODULES


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float  # percent
    loss: float  # mean cross-entropy
    samples: int


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none") -> Accuracy:
    """Top-1/top-5 over everything ``loader`` yields; summed over processes when torch.distributed runs,
    so each rank passing its own shard gives the accuracy of the whole split."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    for inputs, targets in loader:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(inputs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets.unsqueeze(1))
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, targets, reduction="sum")
        sums[3] += targets.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    n = int(sums[3].item())
    if n == 0:
        return Accuracy(float("nan"), float("nan"), float("nan"), 0)
    return Accuracy(100.0 * float(sums[0]) / n, 100.0 * float(sums[1]) / n, float(sums[2]) / n, n)


@dataclass(frozen=True)
class SizeReport:
    params_total: int
    params_nonzero: int
    prunable_total: int
    prunable_pruned: int  # by the mask, exactly
    sparsity_prunable: float
    sparsity_total: float
    macs_dense: int  # multiply-accumulates of Conv/Linear layers per sample, dense
    macs_sparse: int  # the same counting only nonzero weights


@torch.no_grad()
def conv_linear_macs(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> tuple[int, int]:
    """(dense, sparse) multiply-accumulates of the Conv/Linear layers for one sample.

    A weight entry is used once per output position, so a layer's sparse cost is its nonzero weight
    count times the number of output positions; dense counts every entry. Other layers (BN, ReLU,
    pooling) are a small share and are not counted.
    """
    dense = sparse = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal dense, sparse
        out_channels = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
        positions = output.numel() // out_channels  # batch is 1
        dense += module.weight.numel() * positions
        sparse += int(torch.count_nonzero(module.weight)) * positions

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE_MODULES)]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return dense, sparse


def size_report(
    model: nn.Module, masks: Mapping[str, torch.Tensor], input_shape: tuple[int, ...], device: torch.device
) -> SizeReport:
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    prunable_total = sum(m.numel() for m in masks.values())
    pruned = int(sum(int(m.sum()) for m in masks.values()))
    dense, sparse = conv_linear_macs(model, input_shape, device)
    return SizeReport(
        params_total=total,
        params_nonzero=nonzero,
        prunable_total=prunable_total,
        prunable_pruned=pruned,
        sparsity_prunable=pruned / prunable_total if prunable_total else 0.0,
        sparsity_total=1.0 - nonzero / total if total else 0.0,
        macs_dense=dense,
        macs_sparse=sparse,
    )


@dataclass(frozen=True)
class Footprint:
    """A model's size as it runs: its parameters and its Conv/Linear multiply-accumulates per sample."""

    params: int
    params_nonzero: int
    macs: int  # counting only nonzero weights: what a sparse kernel, or a smaller dense network, runs
    macs_dense: int  # counting every weight entry


def footprint(model: nn.Module, input_shape: tuple[int, ...], device: torch.device = torch.device("cpu")) -> Footprint:
    dense, sparse = conv_linear_macs(model, input_shape, device)
    params = list(model.parameters())
    return Footprint(sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params), sparse, dense)


def compared(model: Footprint, reference: Footprint, reference_name: str) -> dict:
    """``model`` against an unpruned ``reference`` (every entry of it counted): what a user reads as
    "0.5x the compute, 0.4x the parameters"."""
    return {
        "reference": reference_name,
        "macs": model.macs,
        "macs_reference": reference.macs_dense,
        "macs_ratio": model.macs / reference.macs_dense if reference.macs_dense else None,
        "params": model.params,
        "params_nonzero": model.params_nonzero,
        "params_reference": reference.params,
        "params_ratio": model.params_nonzero / reference.params if reference.params else None,
    }
