"""Compact sparse artifacts: file size vs the dense ``model.safetensors``, and save/load times.

For ``cifar/resnet18`` and ``digits_cnn`` (10 classes) at sparsity 0.5, 0.9 and 0.95: global
``magnitude_masks`` over the prunable weights of a random-init model (seed 0), applied in place.
The size of a compact artifact depends only on how many weights are zero per tensor, not on which
ones nor on their values, so random weights give the same sizes as trained ones at equal sparsity.
The non-prunable float tensors that a fresh model holds as constants (BatchNorm weight/bias/running
statistics, biases: zeros and ones) are first filled with nonzero random values, as in a trained
model, so they count as dense, not as all-zero tensors the compact format would shrink.

Files: dense (``save_state_dict``, what ``model.safetensors`` is), compact with fp32 values
(exact) and with fp16 values. Times: save a state_dict to a file; load = read the file
(``read_state_dict`` for the dense file, ``load_compact`` for the compact ones) and copy it into a
model (``load_into``), since safetensors maps a dense file lazily and reading alone would time
almost nothing. The three formats interleaved (order rotating), medians. Also checks that the fp32
round trip is exact.

    .venv/bin/python bench/bench_artifacts.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import struct
import tempfile
import time
from pathlib import Path

import torch
from benchreport import Contention, contention_line, environment, environment_lines, median, table, write_result

from dg2pf_core.algorithm.masks import apply_masks_, magnitude_masks, select_prunable
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.io.checkpoints import load_into, read_state_dict
from dg2pf_core.io.compact import load_compact, save_compact
from dg2pf_core.models import build_model

ARCHS = ("cifar/resnet18", "digits_cnn")
NUM_CLASSES = 10
SPARSITIES = (0.5, 0.9, 0.95)
FORMATS = ("dense", "fp32", "fp16")


def pruned_state(arch: str, sparsity: float) -> tuple[dict[str, torch.Tensor], int, int]:
    """(state_dict, prunable weights, zeros among them) of a random-init model pruned to ``sparsity``."""
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES)
    params = select_prunable(model).params
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and name not in params:
                t.copy_(torch.rand_like(t) + 0.5)
        apply_masks_(params, magnitude_masks(params, sparsity))
    n = sum(p.numel() for p in params.values())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    return {k: v.clone() for k, v in model.state_dict().items()}, n, zeros


def save(fmt: str, state: dict[str, torch.Tensor], path: Path) -> None:
    if fmt == "dense":
        save_state_dict(state, path)
    else:
        save_compact(state, path, values=fmt)


def load(fmt: str, path: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(path) if fmt == "dense" else load_compact(path)


def header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def measure(arch: str, sparsity: float, repeats: int, work: Path) -> dict:
    state, prunable, zeros = pruned_state(arch, sparsity)
    target = build_model(arch, NUM_CLASSES)
    paths = {fmt: work / f"{fmt}.safetensors" for fmt in FORMATS}
    for fmt in FORMATS:  # untimed: first-touch costs belong to the process, not to a format
        save(fmt, state, paths[fmt])
        load_into(target, load(fmt, paths[fmt]))
    times = {f"{op}_{fmt}": [] for op in ("save", "load") for fmt in FORMATS}
    for i in range(repeats):
        order = FORMATS[i % 3 :] + FORMATS[: i % 3]
        for fmt in order:
            gc.collect()
            t0 = time.perf_counter()
            save(fmt, state, paths[fmt])
            times[f"save_{fmt}"].append(time.perf_counter() - t0)
        for fmt in order:
            gc.collect()
            t0 = time.perf_counter()
            load_into(target, load(fmt, paths[fmt]))
            times[f"load_{fmt}"].append(time.perf_counter() - t0)
    back = load_compact(paths["fp32"])
    exact = list(back) == list(state) and all(torch.equal(back[k], v) for k, v in state.items())
    sizes = {fmt: paths[fmt].stat().st_size for fmt in FORMATS}
    return {
        "arch": arch,
        "sparsity": sparsity,
        "prunable_weights": prunable,
        "pruned_weights": zeros,
        "params_total": sum(v.numel() for v in state.values() if v.is_floating_point()),
        "bytes": sizes,
        "header_bytes": {fmt: header_bytes(paths[fmt]) for fmt in FORMATS},
        "ratio_fp32": sizes["fp32"] / sizes["dense"],
        "ratio_fp16": sizes["fp16"] / sizes["dense"],
        # bitmask + fp32 values of the prunable weights alone, over their dense fp32 bytes
        "ratio_prunable_ideal": (1 / 32) + (prunable - zeros) / prunable,
        "seconds": times,
        "median_ms": {k: 1000 * median(v) for k, v in times.items()},
        "fp32_round_trip_exact": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 timed repeat instead of 5")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)

    contention = Contention()
    with tempfile.TemporaryDirectory(prefix="bench_artifacts-") as tmp:
        rows = [measure(arch, s, repeats, Path(tmp)) for arch in ARCHS for s in SPARSITIES]
    env = environment()
    env["contention"] = contention.result()

    print("## bench_artifacts: compact sparse artifacts (bitmask + nonzero values) vs dense model.safetensors")
    print()
    print(environment_lines(env))
    print(contention_line(env["contention"]))
    print(
        f"- random-init weights (seed 0), global magnitude masks; 1 untimed round, then {repeats} timed repeats "
        "per format, interleaved (order rotating), files in a temp dir (page cache warm)"
    )
    print()
    print(
        table(
            [
                "model",
                "sparsity",
                "dense bytes",
                "compact fp32 bytes",
                "fp32 / dense",
                "compact fp16 bytes",
                "fp16 / dense",
                "ideal fp32 (prunable only)",
                "header bytes dense / fp32",
                "fp32 exact",
            ],
            [
                [
                    r["arch"],
                    r["sparsity"],
                    f"{r['bytes']['dense']:,}",
                    f"{r['bytes']['fp32']:,}",
                    f"{r['ratio_fp32']:.4f}",
                    f"{r['bytes']['fp16']:,}",
                    f"{r['ratio_fp16']:.4f}",
                    f"{r['ratio_prunable_ideal']:.4f}",
                    f"{r['header_bytes']['dense']:,} / {r['header_bytes']['fp32']:,}",
                    "yes" if r["fp32_round_trip_exact"] else "NO",
                ]
                for r in rows
            ],
        )
    )
    print()
    print("### Save, and load into a model (read + `load_into`), median ms")
    print()
    print(
        table(
            ["model", "sparsity", "save dense", "save fp32", "save fp16", "load dense", "load fp32", "load fp16"],
            [
                [
                    r["arch"],
                    r["sparsity"],
                    *(f"{r['median_ms'][f'{op}_{fmt}']:.1f}" for op in ("save", "load") for fmt in FORMATS),
                ]
                for r in rows
            ],
        )
    )
    path = write_result(
        "bench_artifacts",
        {
            "benchmark": "bench_artifacts",
            "environment": env,
            "config": {
                "archs": ARCHS,
                "num_classes": NUM_CLASSES,
                "sparsities": SPARSITIES,
                "warmup": 1,
                "repeats": repeats,
            },
            "rows": rows,
        },
    )
    print()
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
