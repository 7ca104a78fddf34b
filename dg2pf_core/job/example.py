"""Pre-trained example models to prune: the input of the demo and of the end-to-end tests."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import ExampleMetrics
from dg2pf_core.data.loaders import LocalLoaders
from dg2pf_core.errors import ConfigError
from dg2pf_core.io.export import OutputDir, write_model
from dg2pf_core.io.metrics import evaluate
from dg2pf_core.job.data import load_data
from dg2pf_core.models import build_model, get_arch


@dataclass(frozen=True)
class Example:
    arch: str
    dataset: str
    num_classes: int
    epochs: int  # at most; the cosine learning rate spans them
    lr: float
    batch_size: int
    description: str
    patience: int | None = None  # stop after this many epochs without a better validation top-1


EXAMPLES: dict[str, Example] = {
    "digits": Example(
        arch="digits_cnn",
        dataset="digits",
        num_classes=10,
        epochs=30,
        lr=2e-3,
        batch_size=64,
        patience=10,
        description="digits_cnn trained on scikit-learn's handwritten digits (16x16, 10 classes)",
    ),
}


def pretrain(
    arch: str,
    num_classes: int,
    dataset: str,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    image_size: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    patience: int | None = None,
) -> tuple[torch.nn.Module, ExampleMetrics]:
    """Train ``arch`` from scratch (Adam, cosine lr over ``epochs``) and keep the best epoch by validation
    top-1; with ``patience``, stop once that many epochs in a row brought no better one. The learning
    rate follows the same cosine either way, so the epochs run are the same as without it and the kept
    weights too unless a later epoch would have been better (metrics: ``epochs`` run, ``max_epochs``,
    ``best_epoch``)."""
    torch.manual_seed(seed)
    spec = get_arch(arch)
    model = build_model(arch, num_classes)
    splits, size = load_data(dataset, spec, num_classes, image_size, 0.1, seed)
    loaders = LocalLoaders(splits.train, splits.val, splits.test, batch_size=batch_size, eval_batch_size=256, seed=seed)
    device = torch.device("cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    best_val, best_state, best_epoch, ran = -1.0, None, 0, 0
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for inputs, targets in loaders.train(epoch):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        scheduler.step()
        val = evaluate(model, loaders.val(), device).top1
        ran = epoch + 1
        if val > best_val:
            best_val, best_state, best_epoch = val, copy.deepcopy(model.state_dict()), ran
        if on_epoch is not None:
            on_epoch(ran, val)
        if patience is not None and ran - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    test_loader = loaders.test()
    test = evaluate(model, test_loader, device) if test_loader is not None else None
    metrics = ExampleMetrics(
        arch=arch,
        num_classes=num_classes,
        dataset=dataset,
        image_size=size,
        epochs=ran,
        max_epochs=epochs,
        best_epoch=best_epoch,
        val_top1=best_val,
        test_top1=test.top1 if test else None,
        test_top5=test.top5 if test else None,
        wall_seconds=time.perf_counter() - started,
    )
    return model, metrics


def write_example(
    name: str, out: str | Path, *, seed: int = 0, on_epoch: Callable[[int, float], None] | None = None
) -> ExampleMetrics:
    """Train example ``name`` and write ``out/model.safetensors`` + ``out/metrics.json``."""
    if name not in EXAMPLES:
        raise ConfigError(f"unknown example {name!r}; available: {sorted(EXAMPLES)}", field="example")
    ex = EXAMPLES[name]
    output = OutputDir(out)
    model, metrics = pretrain(
        ex.arch,
        ex.num_classes,
        ex.dataset,
        epochs=ex.epochs,
        lr=ex.lr,
        batch_size=ex.batch_size,
        seed=seed,
        on_epoch=on_epoch,
        patience=ex.patience,
    )
    with output.staging() as tmp:
        files = Artifacts(tmp)
        write_model(model, files.model)
        metrics.write(files.metrics)
    return metrics
