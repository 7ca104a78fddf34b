"""Is a pruned network's validation top-1 its own, or its BatchNorm running averages'?

Runs one Fashion-MNIST job the way the fidelity grid does (``PruneJob`` -> ``prepare`` -> ``run``, the
cell's 8,000-image training subset) and, after every epoch from the last ranking on (the mask is
then final), scores the epoch's network twice on the validation split: with BatchNorm's running
averages as training left them, and after re-estimating them on 50 training batches
(``dg2pf_core.algorithm.batchnorm.recalibrate_batchnorm``);
then on 50 augmented training batches with the re-estimated statistics, on the validation split
with each batch normalised by its own statistics (train mode: what training's loss sees), and after
one and three rounds of estimating the statistics in eval mode (``_estimate_in_eval_mode``: as the
served network computes its activations).
The probe saves and restores torch's random state, so the job trains as it would without it.

    .venv/bin/python -m bench.fidelity.bn_probe --sparsity 0.98 --seed 0 --set bn_recalibration_batches=0
    .venv/bin/python -m bench.fidelity.bn_probe --sparsity 0.98 --seed 0 --method gmp-cubic \\
        --set bn_recalibration_batches=0

Needs the cached dense shufflenet_v2_x0_5 (``python -m bench.fidelity.run --dataset fashion-mnist
--models shufflenet_v2_x0_5 --pretrain-only``). Prints one line per epoch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
from pathlib import Path

import torch

from dg2pf_core import job as product
from dg2pf_core.algorithm.batchnorm import recalibrate_batchnorm
from dg2pf_core.io.metrics import evaluate

from .data import settings_for_dataset
from .dg2pf_family import INVESTIGATIONS, VARIANTS, config_for, prepare_job
from .pretrain import cache_key, settings_for
from .registry import Budget
from .run import HERE

MODEL = "shufflenet_v2_x0_5"
CONSISTENT_ROUNDS = 3  # rounds of the eval-mode estimate (each: PROBE_BATCHES forward passes)
PROBE_BATCHES, PROBE_EPOCH = 50, 99  # the probe's batches: the training loader's order of epoch 99


def main(argv: list[str] | None = None) -> None:
    methods = {**VARIANTS, **INVESTIGATIONS}
    p = argparse.ArgumentParser(prog="python -m bench.fidelity.bn_probe", description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="dg2pf", choices=sorted(methods))
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=JSON", help="a DG2PFConfig field over the method's"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, default=HERE / "cache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = dict(methods[args.method][0])
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = json.loads(value)
    config = config_for(args.method, args.sparsity, args.seed, Budget(epochs=12, pruning_epochs=6), overrides)
    data = settings_for_dataset("fashion-mnist")
    # The dense model the grid's cells prune: the cache entry of the same pre-training settings.
    key = cache_key(MODEL, dataclasses.replace(data, train_subset=0), settings_for(MODEL, dataset=data.dataset))
    checkpoint = args.cache_dir / f"{key}.safetensors"
    if not checkpoint.is_file():
        raise SystemExit(f"no dense {MODEL} at {checkpoint}; pre-train it first (see the docstring)")
    _job, prepared = prepare_job(MODEL, checkpoint, data, config)
    loaders = prepared.local_loaders()
    probe, cpu = copy.deepcopy(prepared.model), torch.device("cpu")

    def reporter(record, state) -> None:
        line = f"epoch {record.epoch:2d} {record.phase:15s} sparsity {record.sparsity:.3f} val {record.val_top1:6.2f}"
        if record.epoch >= config.pruning_epochs:
            rng = torch.get_rng_state()
            probe.load_state_dict(state.model)
            running = evaluate(probe, loaders.val(), cpu).top1
            recalibrate_batchnorm(probe, loaders.train(PROBE_EPOCH), cpu, PROBE_BATCHES)
            line += f" | running averages {running:6.2f} re-estimated {evaluate(probe, loaders.val(), cpu).top1:6.2f}"
            train_batches = itertools.islice(loaders.train(PROBE_EPOCH), PROBE_BATCHES)
            line += f" | train batches {evaluate(probe, train_batches, cpu).top1:6.2f}"
            line += f" | batch statistics {_top1_in_train_mode(probe, loaders.val()):6.2f}"
            probe.load_state_dict(state.model)
            recalibrate_batchnorm(probe, loaders.train(PROBE_EPOCH), cpu, PROBE_BATCHES)
            for rounds in range(1, CONSISTENT_ROUNDS + 1):
                _estimate_in_eval_mode(probe, itertools.islice(loaders.train(PROBE_EPOCH), PROBE_BATCHES))
                if rounds in (1, CONSISTENT_ROUNDS):
                    line += f" | eval-mode estimate x{rounds} {evaluate(probe, loaders.val(), cpu).top1:6.2f}"
            torch.set_rng_state(rng)
        print(line, flush=True)

    result = product.run(prepared, loaders=loaders, reporter=reporter)
    print(f"test top-1 {result.test.top1:.2f} (epoch {result.best_epoch} kept)")


@torch.no_grad()
def _estimate_in_eval_mode(model: torch.nn.Module, batches) -> None:
    """One round of BatchNorm statistics as the served network sees them: every BatchNorm's input mean
    and variance (averaged over ``batches``) recorded with the model in eval mode, so the layers above
    normalise by the previous round's statistics rather than by each batch's own (as
    ``recalibrate_batchnorm``, which estimates in train mode, has them). Repeated, a network whose
    eval-mode forward pass is stable converges to statistics it agrees with; one that needs per-batch
    normalisation to keep its activations in range drifts off further each round."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    sums: dict[int, list] = {id(m): [0.0, 0.0, 0] for m in layers}

    def record(module, inputs, _output) -> None:
        x = inputs[0].double()
        dims = [d for d in range(x.dim()) if d != 1]
        s = sums[id(module)]
        s[0], s[1], s[2] = s[0] + x.mean(dims), s[1] + x.var(dims), s[2] + 1

    handles = [m.register_forward_hook(record) for m in layers]
    model.eval()
    try:
        for inputs, _ in batches:
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    for m in layers:
        mean, var, n = sums[id(m)]
        if n:
            m.running_mean.copy_(mean / n)
            m.running_var.copy_(var / n)


@torch.no_grad()
def _top1_in_train_mode(model: torch.nn.Module, batches) -> float:
    """Top-1 % with every BatchNorm normalising by its batch's own statistics (train mode): what the
    training loss sees (``evaluate`` always scores in eval mode). The model's running statistics are
    changed; the caller reloads it."""
    model.train()
    correct = seen = 0
    try:
        for inputs, targets in batches:
            correct += int((model(inputs).argmax(1) == targets).sum())
            seen += len(targets)
    finally:
        model.eval()
    return 100.0 * correct / max(seen, 1)


if __name__ == "__main__":
    main()
