"""Which architectures channel granularity works on: the survey behind ``dg2pf_core.algorithm.channels.CHANNEL_ARCHS``.

For each architecture (one representative per family by default), in a fresh subprocess limited to
10 GB of address space and 300 s: build it (``torchvision`` ones randomly initialised, weights spread
and BatchNorm statistics moved off their defaults as tests/dg2pf_core/algorithm/test_channels.py does), trace it with
``ChannelPlan.build`` at the given input size, find the channel fraction for ``target_macs_ratio`` 0.5
under a layer collapse guard, zero the selected groups (simulated pruning) and compare the logits of
that masked network with those of the network whose channels were removed (``apply_structure``), and
with one rebuilt from the structure's JSON alone. A row passes when the logits agree (relative
error < 1e-4), the rebuilt shapes match and the MACs read off the pruned network equal the plan's.

    .venv/bin/python bench/channel_archs.py                    # the default representatives
    .venv/bin/python bench/channel_archs.py --archs torchvision/resnet18:64 digits_cnn:16

Prints a Markdown table (docs/benchmarks.md section 13 holds the last run's).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [
    "digits_cnn:16",
    "cifar/resnet18:32",
    "cifar/vgg16_bn:32",
    "torchvision/alexnet:224",
    "torchvision/convnext_tiny:64",
    "torchvision/convnext_small:64",
    "torchvision/densenet121:64",
    "torchvision/efficientnet_b0:64",
    "torchvision/efficientnet_b3:64",
    "torchvision/efficientnet_v2_s:64",
    "torchvision/googlenet:64",
    "torchvision/inception_v3:96",
    "torchvision/mnasnet0_5:64",
    "torchvision/mnasnet1_3:64",
    "torchvision/mobilenet_v2:64",
    "torchvision/mobilenet_v3_small:64",
    "torchvision/regnet_x_400mf:64",
    "torchvision/regnet_y_400mf:64",
    "torchvision/regnet_y_1_6gf:64",
    "torchvision/resnet18:64",
    "torchvision/resnet50:64",
    "torchvision/resnext50_32x4d:64",
    "torchvision/squeezenet1_0:64",
    "torchvision/vgg11:64",
    "torchvision/wide_resnet50_2:64",
    "torchvision/vit_b_32:224",
]


def one(arch: str, size: int) -> dict:
    import copy  # noqa: F401, PLC0415

    import torch  # noqa: PLC0415

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_channels import _trained_looking  # noqa: PLC0415

    from dg2pf_core.algorithm.channels import ChannelPlan, Structure, apply_structure  # noqa: PLC0415
    from dg2pf_core.io.metrics import conv_linear_macs  # noqa: PLC0415
    from dg2pf_core.models import build_model, get_arch  # noqa: PLC0415

    torch.set_num_threads(1)
    shape = (get_arch(arch).in_channels, size, size)
    model = _trained_looking(build_model(arch, 10))
    started = time.perf_counter()
    plan = ChannelPlan.build(model, shape)
    trace_s = time.perf_counter() - started
    params = dict(model.named_parameters())

    def cap(f: float) -> float:
        return 1 - 0.6 * (1 - f)

    fraction, ratio = plan.fraction_for_macs(params, 0.5, cap)
    selected = plan.select(params, fraction, cap(fraction))
    x = torch.randn(2, *shape)
    with torch.no_grad():
        for name, mask in plan.masks(params, selected).items():
            params[name].masked_fill_(mask, 0.0)
        masked = model(x)
    structure = Structure(shape).then(plan.pruned_channels(selected))
    apply_structure(model, structure, arch)
    with torch.no_grad():
        removed = model(x)
    relerr = float((removed - masked).abs().max() / masked.abs().max().clamp_min(1e-12))
    dense, _ = conv_linear_macs(build_model(arch, 10), shape, torch.device("cpu"))
    after, _ = conv_linear_macs(model, shape, torch.device("cpu"))
    rebuilt = apply_structure(build_model(arch, 10), Structure.from_json(structure.to_json()), arch)
    same = {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    return {
        "ok": relerr < 1e-4 and same and abs(after / dense - ratio) < 1e-9,
        "relerr": relerr,
        "macs": after / dense,
        "groups": len(plan.groups),
        "skipped": len(plan.skipped),
        "fraction": fraction,
        "trace_s": trace_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=DEFAULT, help="ARCH:SIZE pairs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        resource.setrlimit(resource.RLIMIT_AS, (10 << 30, 10 << 30))
        arch, size = args.child.rsplit(":", 1)
        try:
            row = one(arch, int(size))
        except Exception as exc:  # noqa: BLE001 - reported as the row's result
            row = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        row["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(json.dumps(row))
        return
    print(
        "| architecture | input | passes | groups (skipped) | channels removed | MACs kept "
        "| max rel. logit error | trace s | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for item in args.archs:
        arch, size = item.rsplit(":", 1)
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--child", item], capture_output=True, text=True, timeout=300
            )
            row = (
                json.loads(done.stdout.strip().splitlines()[-1])
                if done.stdout.strip()
                else {"ok": False, "error": done.stderr[-160:]}
            )
        except subprocess.TimeoutExpired:
            row = {"ok": False, "error": "over 300 s"}
        if "error" in row:
            print(
                f"| {arch} | {size}x{size} | **no**: {row['error']} | | | | | | {row.get('maxrss_mb', '')} |",
                flush=True,
            )
            continue
        print(
            f"| {arch} | {size}x{size} | {'yes' if row['ok'] else '**no**'} | {row['groups']} ({row['skipped']}) | "
            f"{row['fraction']:.3f} | {row['macs']:.4f}x | {row['relerr']:.1e} | "
            f"{row['trace_s']:.1f} | {row['maxrss_mb']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
