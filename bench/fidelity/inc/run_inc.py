"""Intel Neural Compressor 2.x magnitude pruning of a torchvision model, as a peer method for the benchmark.

Runs inside bench/fidelity/.venv-inc (see setup.sh), never imports dg2pf_core, and talks to the harness
only through its command line and the JSON it writes:

    .venv-inc/bin/python bench/fidelity/inc/run_inc.py --arch shufflenet_v2_x0_5 --checkpoint dense.safetensors \
        --data split.npz --sparsity 0.9 --epochs E --pruning-epochs P --seed S --batch-size 64 --threads N \
        --out result.json

What it does, with INC's documented 2.x training API (``neural_compressor.training.prepare_compression``
with a ``WeightPruningConfig``, driven through ``compression_manager.callbacks``):

* unstructured (pattern "1x1") magnitude pruning, pruning_scope "global", over every Conv2d and Linear
  weight. INC 2.x always drops the model's last Linear/Conv ("classifier head", found by
  ``parse_last_linear``) from the pruned set and has no option to keep it; that search is switched off
  here so the classifier is pruned like in dg2pf. The first conv is in INC's default set already.
  The run fails if any Conv2d/Linear is missing from INC's pruned modules.
* start_step 0, end_step = P * steps_per_epoch, pruning_frequency = steps_per_epoch (one epoch of steps):
  INC's iterative scheduler prunes at steps 0, S, ..., P*S; its first event is always 0 % (INC counts
  from 0), so the target rises at the end of each of the P pruning epochs along INC's default "exp"
  decay, 1 - (1 - s)^(k/P), reaching the target at the end of epoch P. The final event is triggered
  right after epoch P's last step (on_step_begin), so validation of epoch P already sees the final mask
  and E == P works too.
* max_sparsity_ratio_per_op 0.99 (INC's default is 0.98; 0.99 is dg2pf's max_layer_sparsity).
* AdamW (lr 1e-3, weight decay 1e-4), cross-entropy, batch 64, random shift augmentation on train
  (replicate-pad by 2, random 32x32 crop, per image), for E epochs in all. INC re-applies the masks after
  every optimizer step (on_after_optimizer_step), also after the pruning window; this script checks after
  every later epoch that the final mask's zeros are still zero.
* the weights kept are the best by validation top-1 among epochs > P (the last epoch's when E == P).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import sys
import time
import warnings
from pathlib import Path

METHOD = "inc-magnitude"


class RunError(Exception):
    """A failure reported to the harness as one line."""


def import_torchvision():
    """Import torchvision, even with PyPI's CPU-only torch.

    PyPI has no CPU build of torchvision: its Linux wheel's compiled ops link against torch's CUDA
    libraries, so with the CPU torch they do not load. torchvision then still imports everything in
    Python except that ``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and
    ``torchvision::qnms`` without checking that the ops exist. Defining those two op schemas (no kernels)
    lets the import go through; nothing here uses detection ops, only ``torchvision.models``.
    """
    import torch

    try:
        import torchvision

        return torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TV_SHIM_LIB
    _TV_SHIM_LIB = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            _TV_SHIM_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass  # already defined
    import torchvision

    return torchvision


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, help="torchvision.models builder name, e.g. shufflenet_v2_x0_5")
    p.add_argument("--checkpoint", required=True, help="safetensors state_dict of torchvision.models.<arch>(num_classes=10)")
    p.add_argument("--data", required=True, help="npz with x_train,y_train,x_val,y_val,x_test,y_test")
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--epochs", type=int, required=True, help="total epochs: pruning + fine-tuning")
    p.add_argument("--pruning-epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--augment-pad", type=int, default=2)
    p.add_argument("--max-layer-sparsity", type=float, default=0.99, help="INC max_sparsity_ratio_per_op")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--verbose", action="store_true", help="keep INC's INFO log")
    a = p.parse_args(argv)
    if not 0.0 < a.sparsity < 1.0:
        p.error(f"--sparsity must be in (0, 1), got {a.sparsity}")
    if a.pruning_epochs < 1 or a.epochs < a.pruning_epochs:
        p.error(f"need 1 <= --pruning-epochs <= --epochs, got {a.pruning_epochs} and {a.epochs}")
    if a.batch_size < 1 or a.threads < 1:
        p.error("--batch-size and --threads must be >= 1")
    return a


def load_data(path: str):
    import numpy as np
    import torch

    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise RunError(f"cannot read --data {path}: {e}") from e
    out = {}
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        if k not in z.files:
            raise RunError(f"--data {path} has no array {k!r} (has {sorted(z.files)})")
        a = z[k]
        if k.startswith("x"):
            if a.ndim != 4 or a.shape[1] != 3:
                raise RunError(f"--data {k} must be (N,3,H,W), got {a.shape}")
            out[k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    for s in ("train", "val", "test"):
        if len(out[f"x_{s}"]) != len(out[f"y_{s}"]) or len(out[f"y_{s}"]) == 0:
            raise RunError(f"--data {s} split: {len(out[f'x_{s}'])} images vs {len(out[f'y_{s}'])} labels")
    return out


def build_model(arch: str, checkpoint: str):
    import torch
    from safetensors.torch import load_file

    tv = import_torchvision()
    builder = getattr(tv.models, arch, None)
    if builder is None or not callable(builder):
        raise RunError(f"torchvision.models has no model builder {arch!r}")
    model = builder(weights=None, num_classes=10)
    try:
        state = load_file(checkpoint)
    except Exception as e:
        raise RunError(f"cannot read --checkpoint {checkpoint} as safetensors: {e}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunError(f"checkpoint does not fit {arch}(num_classes=10): missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def prunable_params(model):
    """(param name, module name, weight) of every Conv2d and Linear, in model order."""
    from torch import nn

    out = []
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out.append((f"{mname}.weight", mname, m.weight))
    return out


def sparsity_report(model):
    total = zeros = 0
    layers = {}
    for pname, _, w in prunable_params(model):
        z = int((w.detach() == 0).sum())
        layers[pname] = z / w.numel()
        zeros += z
        total += w.numel()
    return (zeros / total if total else 0.0), layers


def evaluate(model, x, y, batch_size: int) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(y)


def shifted_batch(padded, idx, pad: int, size: int, gen):
    """Random crop of the replicate-padded images: each image shifted by up to ``pad`` pixels."""
    import torch

    if pad == 0:
        return padded[idx]
    offs = torch.randint(0, 2 * pad + 1, (len(idx), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in zip(idx.tolist(), offs)])


def run(a: argparse.Namespace) -> dict:
    if not a.verbose:
        os.environ.setdefault("LOGLEVEL", "WARNING")
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)

    data = load_data(a.data)
    model = build_model(a.arch, a.checkpoint)

    import neural_compressor
    from neural_compressor.compression.pruner import utils as inc_pruner_utils
    from neural_compressor.training import WeightPruningConfig, prepare_compression

    if not a.verbose:
        logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    # INC 2.x excludes the last Linear/Conv (classifier head) unconditionally; keep it, as dg2pf does.
    inc_pruner_utils.parse_last_linear = lambda _model: None

    n_train = len(data["y_train"])
    steps_per_epoch = (n_train + a.batch_size - 1) // a.batch_size
    inc_kwargs = dict(
        pruning_configs=[{}],  # one pruner over every matched op
        target_sparsity=a.sparsity,
        pruning_type="magnitude",
        pattern="1x1",
        op_names=[],  # [] -> INC uses [".*"]: every module whose type name contains Conv or Linear
        excluded_op_names=[],
        pruning_op_types=["Conv", "Linear"],
        pruning_scope="global",
        start_step=0,
        end_step=a.pruning_epochs * steps_per_epoch,
        pruning_frequency=steps_per_epoch,
        sparsity_decay_type="exp",
        min_sparsity_ratio_per_op=0.0,
        max_sparsity_ratio_per_op=a.max_layer_sparsity,
    )
    config = WeightPruningConfig(**copy.deepcopy(inc_kwargs))
    manager = prepare_compression(model, config)
    net = manager.model.model
    if net is not model:
        raise RunError("INC wrapped a copy of the model; training it would not prune the model we train")

    pruners = [p for cb in manager.callbacks.callbacks_list for p in getattr(cb, "pruners", [])]
    if len(pruners) != 1:
        raise RunError(f"expected one INC pruner, got {len(pruners)}")
    pruned_modules = set(pruners[0].modules.keys())
    expected = {mname for _, mname, _ in prunable_params(net)}
    if pruned_modules != expected:
        raise RunError(
            f"INC prunes a different set of layers: missing {sorted(expected - pruned_modules)[:5]}, "
            f"extra {sorted(pruned_modules - expected)[:5]}"
        )
    if pruners[0].pattern.invalid_layers:
        raise RunError(f"INC cannot apply pattern 1x1 to {pruners[0].pattern.invalid_layers[:5]}")

    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    gen = torch.Generator().manual_seed(a.seed)
    x_train, y_train = data["x_train"], data["y_train"]
    size = x_train.shape[-1]
    padded = F.pad(x_train, (a.augment_pad,) * 4, mode="replicate") if a.augment_pad else x_train

    cb = manager.callbacks
    best_val, best_state, best_epoch = -1.0, None, None
    final_zero = None  # the final mask's zeros, to check that they stay zero
    masks_held = True
    epoch_log = []
    start = time.perf_counter()
    cb.on_train_begin()
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        cb.on_epoch_begin(epoch - 1)
        net.train()
        perm = torch.randperm(n_train, generator=gen)
        loss_sum = 0.0
        hook_s = 0.0  # time spent inside INC's callbacks
        for step in range(steps_per_epoch):
            idx = perm[step * a.batch_size : (step + 1) * a.batch_size]
            xb, yb = shifted_batch(padded, idx, a.augment_pad, size, gen), y_train[idx]
            th = time.perf_counter()
            cb.on_step_begin(step)
            hook_s += time.perf_counter() - th
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            hooked = cb.on_after_compute_loss(xb, out, loss)  # [] when no INC callback changes the loss
            if isinstance(hooked, torch.Tensor):
                loss = hooked
            opt.zero_grad(set_to_none=True)
            loss.backward()
            th = time.perf_counter()
            cb.on_before_optimizer_step()
            hook_s += time.perf_counter() - th
            opt.step()
            th = time.perf_counter()
            cb.on_after_optimizer_step()
            cb.on_step_end()
            hook_s += time.perf_counter() - th
            loss_sum += float(loss.detach())
        cb.on_epoch_end()
        if epoch == a.pruning_epochs:
            # INC's last pruning event is at global step P*S, i.e. the next on_step_begin: fire it now so
            # the final mask is in place before epoch P's validation (and when E == P).
            cb.on_step_begin(0)
            final_zero = {pn: (w.detach() == 0).clone() for pn, _, w in prunable_params(net)}
        elif epoch > a.pruning_epochs:
            for pn, _, w in prunable_params(net):
                if bool((w.detach()[final_zero[pn]] != 0).any()):
                    masks_held = False
        val = evaluate(net, data["x_val"], data["y_val"], a.eval_batch_size)
        sp, _ = sparsity_report(net)
        epoch_log.append(
            {"epoch": epoch, "phase": "pruning" if epoch <= a.pruning_epochs else "finetune", "val_top1": val,
             "sparsity": sp, "train_loss": loss_sum / steps_per_epoch, "inc_hook_seconds": hook_s,
             "seconds": time.perf_counter() - t0}
        )
        print(f"[inc] epoch {epoch}/{a.epochs} val {val:.2f} sparsity {sp:.4f} "
              f"({epoch_log[-1]['seconds']:.1f}s, INC hooks {hook_s:.1f}s)", file=sys.stderr, flush=True)
        if epoch > a.pruning_epochs and val > best_val:
            best_val, best_epoch = val, epoch
            best_state = copy.deepcopy(net.state_dict())
    train_end_report = True
    try:
        cb.on_train_end()
    except AttributeError as e:
        # INC 2.6's closing sparsity summary (logging only, after the pruners' own on_train_end hooks have
        # run) takes every module whose type name matches "Conv.d" for a conv and reads its .weight, so it
        # fails on torchvision's Conv2dNormActivation blocks (mobilenet_v2/v3). Nothing is lost.
        if "has no attribute 'weight'" not in str(e):
            raise
        train_end_report = False
    wall = time.perf_counter() - start

    if not masks_held:
        raise RunError("weights pruned by INC's final mask became non-zero during fine-tuning")
    if best_state is not None:
        net.load_state_dict(best_state)
    else:  # E == P: the last epoch's weights, at the final mask
        best_val, best_epoch = epoch_log[-1]["val_top1"], a.epochs
    sparsity, layers = sparsity_report(net)
    test = evaluate(net, data["x_test"], data["y_test"], a.eval_batch_size)
    val = evaluate(net, data["x_val"], data["y_val"], a.eval_batch_size)

    return {
        "method": METHOD,
        "arch": a.arch,
        "test_top1": test,
        "val_top1": val,
        "sparsity": sparsity,
        "target_sparsity": a.sparsity,
        "layer_sparsity": layers,
        "wall_seconds": wall,
        "epochs": a.epochs,
        "pruning_epochs": a.pruning_epochs,
        "best_epoch": best_epoch,
        "masks_held": masks_held,
        "seed": a.seed,
        "threads": a.threads,
        "epoch_log": epoch_log,
        "inc_version": neural_compressor.__version__,
        "torch_version": torch.__version__,
        "config": {
            "api": "neural_compressor.training.prepare_compression(model, WeightPruningConfig(**weight_pruning_config))",
            "weight_pruning_config": inc_kwargs,
            "steps_per_epoch": steps_per_epoch,
            "classifier_head_excluded_by_inc": False,
            "inc_train_end_report": train_end_report,
            "pruned_modules": sorted(pruned_modules),
            "optimizer": {"name": "AdamW", "lr": a.lr, "weight_decay": a.weight_decay},
            "batch_size": a.batch_size,
            "augment": {"replicate_pad": a.augment_pad, "random_crop": size},
        },
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Failed to load image Python extension.*")
    try:
        result = run(a)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)
    except RunError as e:
        print(f"run_inc: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the harness wants one line, whatever failed
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"run_inc: {msg[:500]}", file=sys.stderr)
        return 1
    print(f"run_inc: test {result['test_top1']:.2f} val {result['val_top1']:.2f} "
          f"sparsity {result['sparsity']:.4f} in {result['wall_seconds']:.1f}s -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
