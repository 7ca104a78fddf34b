"""Extra memory of masks and simulated-pruning state, bytes per prunable weight (ResNet-50).

For each sparsity, in a fresh child process (so one measurement's freed-but-kept heap cannot hide
the next one's peak):

- exact: bytes held by the masks (bool tensors, distinct storages counted once) and by the backup
  that ``dg2pf_core.algorithm.simulated._backup(params, masks)`` keeps (the masked values);
- measured: the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its RSS
  before building masks + backup, i.e. the transient peak including temporaries; and the RSS still
  held afterwards while masks and backup are alive.

    .venv/bin/python bench/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys

import torch
from benchreport import environment, environment_lines, table, write_result

from dg2pf_core.algorithm.masks import magnitude_masks, select_prunable
from dg2pf_core.algorithm.simulated import _backup
from dg2pf_core.models import build_model

ARCH, NUM_CLASSES = "torchvision/resnet50", 1000
SPARSITIES = (0.5, 0.9, 0.95)
# A fixed mmap threshold turns off glibc's sliding one: every large buffer is then mapped on allocation
# and unmapped on free, so RSS follows the live tensors and the peak is reproducible (with the sliding
# threshold, freed 25 MB bool buffers stay in the heap and the peak varied 20-29 B/w run to run).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    # glibc keeps freed heap pages resident; without trimming, the throw-away round's freed pages
    # are reused silently and neither the peak nor the held RSS would show the real growth.
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (the masks are views of one buffer)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure_one(sparsity: float) -> dict:
    torch.manual_seed(0)
    model = build_model(ARCH, NUM_CLASSES)
    params = select_prunable(model).params
    n = sum(p.numel() for p in params.values())
    # One throw-away round so that one-time allocations (kernels, thread pools) are not counted.
    _backup(params, magnitude_masks(params, sparsity))
    gc.collect()
    _trim_heap()
    rss_before = _status_kib("VmRSS")
    peak_reset = _reset_peak()
    masks = magnitude_masks(params, sparsity)
    peak_masks = _status_kib("VmHWM")
    backup = _backup(params, masks)
    peak_all = _status_kib("VmHWM")
    gc.collect()
    _trim_heap()
    rss_after = _status_kib("VmRSS")
    mask_bytes = _storage_bytes(masks.values())
    mask_view_bytes = sum(m.numel() * m.element_size() for m in masks.values())
    backup_bytes = sum(b.nbytes for b in backup.values())
    pruned = sum(int(m.sum()) for m in masks.values())
    return {
        "sparsity": sparsity,
        "prunable_weights": n,
        "pruned_weights": pruned,
        "mask_bytes": mask_bytes,
        "mask_view_bytes": mask_view_bytes,
        "backup_bytes": backup_bytes,
        "exact_bytes": mask_bytes + backup_bytes,
        "peak_reset": peak_reset,
        "rss_before_kib": rss_before,
        "peak_rss_delta_bytes_masks": (peak_masks - rss_before) * 1024,
        "peak_rss_delta_bytes": (peak_all - rss_before) * 1024,
        "held_rss_delta_bytes": (rss_after - rss_before) * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sparsity 0.9 only")
    parser.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure_one(args.one)))
        return

    sparsities = (0.9,) if args.quick else SPARSITIES
    runs = []
    for s in sparsities:
        child = subprocess.run(
            [sys.executable, __file__, "--one", str(s)], check=True, capture_output=True, text=True, env=CHILD_ENV
        )
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))

    env = environment()
    n = runs[0]["prunable_weights"]
    rows = []
    for r in runs:
        per = lambda b: f"{b / r['prunable_weights']:.3f}"  # noqa: E731
        rows.append(
            [
                r["sparsity"],
                f"{r['pruned_weights']:,}",
                per(r["mask_bytes"]),
                per(r["backup_bytes"]),
                per(r["exact_bytes"]),
                f"{r['exact_bytes'] / 2**20:.1f}",
                per(r["held_rss_delta_bytes"]),
                per(r["peak_rss_delta_bytes_masks"]),
                per(r["peak_rss_delta_bytes"]),
                f"{r['peak_rss_delta_bytes'] / 2**20:.1f}",
            ]
        )
    print(f"## bench_memory: masks + simulated-pruning backup, {ARCH} ({n:,} prunable weights)")
    print()
    print(environment_lines(env))
    print(
        "- each sparsity measured in a fresh child process (MALLOC_MMAP_THRESHOLD_=65536); RSS from "
        "/proc/self/status (VmHWM reset via /proc/self/clear_refs, glibc heap trimmed before each reading"
        + ("" if all(r["peak_reset"] for r in runs) else ", RESET FAILED: peak is since process start")
        + ")"
    )
    print()
    print(
        table(
            [
                "sparsity",
                "pruned",
                "masks B/w",
                "backup B/w",
                "exact total B/w",
                "exact total MiB",
                "RSS held after B/w",
                "peak RSS during masks B/w",
                "peak RSS masks+backup B/w",
                "peak RSS MiB",
            ],
            rows,
        )
    )
    print()
    print(
        "B/w = bytes per prunable weight. Exact = tensor storage bytes (masks: one bool buffer that "
        "all masks are views of; backup: float32 masked values). Peak RSS = process high-water mark "
        "minus RSS before the call, so it includes the temporaries of `magnitude_masks`."
    )

    path = write_result(
        "bench_memory",
        {
            "benchmark": "bench_memory",
            "environment": env,
            "config": {"arch": ARCH, "num_classes": NUM_CLASSES, "child_env": {"MALLOC_MMAP_THRESHOLD_": "65536"}},
            "runs": runs,
        },
    )
    print()
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
