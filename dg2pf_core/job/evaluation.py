"""Evaluating a checkpoint on a dataset split: accuracy, sparsity, and its size against the dense architecture."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dg2pf_core.algorithm.channels import read_structure
from dg2pf_core.algorithm.masks import select_prunable
from dg2pf_core.errors import DatasetError
from dg2pf_core.io.metrics import Footprint, compared, evaluate, footprint
from dg2pf_core.job.data import load_data
from dg2pf_core.job.model import load_model
from dg2pf_core.job.preflight import check_eval_forward
from dg2pf_core.models import build_model, hf


def evaluate_checkpoint(
    arch: str,
    num_classes: int,
    checkpoint: str,
    dataset: str,
    *,
    image_size: int | None = None,
    split: str = "test",
    skip_bad_images: bool = False,
    crop_pct: float | None = None,
    checkpoint_key: str | None = None,
) -> dict:
    """Top-1/top-5 (%) of a checkpoint on a split, its sparsity, the channels its structure removed
    (a channel-pruned checkpoint) and its MACs and parameters against the architecture's dense default
    (``compared``); DG2PFError for bad input, checked before the evaluation (the checkpoint, the data,
    and a forward pass on the first batch)."""
    spec, model = load_model(arch, num_classes, checkpoint, key=checkpoint_key)
    splits, size = load_data(dataset, spec, num_classes, image_size, 0.1, 0, skip_bad_images, crop_pct=crop_pct)
    data = splits.test if split == "test" else splits.val
    if data is None:
        raise DatasetError(f"dataset {dataset!r} has no {split} split; use --split val", field="split")
    first = torch.stack([data[i][0] for i in range(min(8, len(data)))])
    check_eval_forward(model, first, arch=arch, num_classes=num_classes, image_size=size, device=torch.device("cpu"))
    acc = evaluate(model, DataLoader(data, batch_size=256), torch.device("cpu"))
    prunable = select_prunable(model).params.values()
    n_prunable = sum(p.numel() for p in prunable)
    zero_prunable = sum(int((p == 0).sum()) for p in prunable)
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    zero_all = sum(int((p == 0).sum()) for p in params)
    structure = read_structure(hf.weights_path(checkpoint))
    shape = (spec.in_channels, size, size)
    return {
        "split": split,
        "top1": acc.top1,
        "top5": acc.top5,
        "samples": acc.samples,
        "sparsity_prunable": zero_prunable / n_prunable,
        "sparsity_total": zero_all / n_all,
        "channels_removed": None
        if structure is None
        else sum(len(v) for stage in structure.stages for v in stage.values()),
        "input_shape": list(shape),
        **compared(
            footprint(model, shape),
            dense_default_footprint(arch, num_classes, shape, checkpoint),
            dense_default_name(arch),
        ),
    }


def dense_default_name(arch: str) -> str:
    return f"{arch}'s dense default (the architecture built unpruned)"


def dense_default_footprint(
    arch: str, num_classes: int, input_shape: tuple[int, ...], source: str | Path | None = None
) -> Footprint:
    """The size of ``arch`` as the registry builds it, every channel kept: what a pruned checkpoint of
    it is measured against when its own dense model is not at hand."""
    return footprint(build_model(arch, num_classes, source), input_shape)
