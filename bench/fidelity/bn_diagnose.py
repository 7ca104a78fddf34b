"""Where does a pruned network's eval-mode forward pass leave its train-mode one?

For a model kept by ``python -m bench.fidelity.run --keep-models`` (``<cell>.safetensors``), on training
batches of the cell's data: every BatchNorm layer's input statistics per batch (train mode, what
training normalises by) against its running statistics (what evaluation and serving normalise by),
and, with the same batches, the BatchNorm outputs of a train-mode and an eval-mode forward pass,
compared layer by layer (``propagated``: each pass from its own upstream; ``local``: the eval-mode
layer fed the train-mode pass's input, so only that layer's statistics differ).

    .venv/bin/python -m bench.fidelity.bn_diagnose MODEL.safetensors [--arch shufflenet_v2_x0_5] [--image-size 28]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dg2pf_core.io.metrics import evaluate

from .data import load_job_split, loaders, settings_for_dataset
from .pretrain import build


@torch.no_grad()
def layer_report(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in norms}
    outputs: dict[str, dict[str, list[torch.Tensor]]] = {
        "train": {n: [] for n, _ in norms},
        "eval": {n: [] for n, _ in norms},
    }
    mode = {"now": "train"}

    def hook(name):
        def fn(module, args, out):
            if mode["now"] == "train":
                inputs[name].append(args[0].detach())
            outputs[mode["now"]][name].append(out.detach())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in norms]
    saved = {n: (m.running_mean.clone(), m.running_var.clone(), m.momentum) for n, m in norms}
    try:
        for m in (m for _, m in norms):
            m.momentum = 0.0  # train-mode passes must not move the running statistics
        model.train()
        for x, _ in batches:
            model(x)
        mode["now"] = "eval"
        model.eval()
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for n, m in norms:
            m.running_mean.copy_(saved[n][0])
            m.running_var.copy_(saved[n][1])
            m.momentum = saved[n][2]
    rows = []
    for name, m in norms:
        xs = inputs[name]
        dims = [d for d in range(xs[0].dim()) if d != 1]
        per_values = xs[0].numel() // xs[0].shape[1]
        bvar = torch.stack([x.var(dims, unbiased=True) for x in xs])  # [batches, C]
        bmean = torch.stack([x.mean(dims) for x in xs])
        rv, rm = m.running_var, m.running_mean
        med = bvar.median(0).values
        ratio = (rv + m.eps) / (med + m.eps)  # > 1: running variance above a typical batch's
        local = []
        for x, yt in zip(xs, outputs["train"][name]):
            shape = [1, -1] + [1] * (x.dim() - 2)
            ye = (x - rm.view(shape)) / torch.sqrt(rv.view(shape) + m.eps) * m.weight.view(shape) + m.bias.view(shape)
            local.append(((ye - yt).norm() / yt.norm().clamp_min(1e-12)).item())
        prop = [
            ((ye - yt).norm() / yt.norm().clamp_min(1e-12)).item()
            for yt, ye in zip(outputs["train"][name], outputs["eval"][name])
        ]
        live = (m.weight.abs() > 1e-8) | (m.bias.abs() > 1e-8)
        rows.append(
            {
                "layer": name,
                "channels": int(rv.numel()),
                "values_per_channel": per_values,
                "var_ratio_median": float(ratio.median()),
                "var_ratio_max": float(ratio.max()),
                "channels_ratio_gt4": int((ratio > 4).sum()),
                "channels_ratio_lt_quarter": int((ratio < 0.25).sum()),
                "mean_shift_max": float(((bmean - rm).abs() / torch.sqrt(rv + m.eps)).max()),
                "tiny_var_channels": int((med < m.eps).sum()),
                "live_affine": int(live.sum()),
                "local_rel_err": sum(local) / len(local),
                "propagated_rel_err": sum(prop) / len(prop),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity.bn_diagnose", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--arch", default="shufflenet_v2_x0_5")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.arch)
    model.load_state_dict(safetensors.torch.load_file(str(args.model)))
    data = settings_for_dataset("fashion-mnist", image_size=args.image_size)
    split = load_job_split(data, args.seed)
    batches_src = loaders(split, data, batch_size=64, seed=args.seed)
    batches = list(itertools.islice(batches_src.train(99), args.batches))
    cpu = torch.device("cpu")
    print(f"val top-1 eval mode {evaluate(model, batches_src.val(), cpu).top1:.2f}")
    rows = layer_report(model, batches)
    head = (
        "layer",
        "C",
        "n/C",
        "ratio med",
        "ratio max",
        ">4",
        "<1/4",
        "shift max",
        "tiny var",
        "live",
        "local err",
        "prop err",
    )
    print(" | ".join(head))
    for r in rows:
        print(
            f"{r['layer']} | {r['channels']} | {r['values_per_channel']} | "
            f"{r['var_ratio_median']:.3g} | {r['var_ratio_max']:.3g} | "
            f"{r['channels_ratio_gt4']} | {r['channels_ratio_lt_quarter']} | "
            f"{r['mean_shift_max']:.3g} | {r['tiny_var_channels']} | "
            f"{r['live_affine']} | {r['local_rel_err']:.3g} | {r['propagated_rel_err']:.3g}"
        )


if __name__ == "__main__":
    main()
