"""int8 composed with channel pruning: ONNX Runtime latency of dense fp32, dense int8, channel MACs 0.5 fp32
and channel MACs 0.5 int8 (docs/benchmarks.md, section 17).

Models: torchvision resnet18, resnet50 and mobilenet_v2 at 32x32 (10 classes) and 224x224 (1000 classes),
random-initialised with trained-looking BatchNorm statistics (seed 0; latency depends on shapes, not values).
The channel variant is what DG2PF's channel granularity leaves at ``target_macs_ratio`` 0.5 from these
weights (``bench_latency.channel_pruned``). Each fp32 model is exported by the job's exporter and quantized
as a ``precision: int8`` job does (``dg2pf_core.io.quantize``: QDQ, per-channel int8 weights, uint8
activations; calibration ``minmax`` on 64 random images, since only latency is measured here, not
accuracy). The four files of a case are timed interleaved on ONNX Runtime (``dg2pf_core.io.latency``,
medians), batch 1 and 32, with ``--threads`` threads (default 1).

    .venv/bin/python bench/bench_int8.py [--threads 1] [--runs 10] [--models resnet18 ...] [--sizes 32 224]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from bench_latency import channel_pruned, trained_looking

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dg2pf_core.io.latency import measure_latency  # noqa: E402
from dg2pf_core.io.onnx_export import export_onnx  # noqa: E402
from dg2pf_core.io.quantize import needs_reduce_range, quantize_file  # noqa: E402
from dg2pf_core.models import build_model  # noqa: E402

CLASSES = {32: 10, 224: 1000}


def case(arch: str, size: int, batches: list[int], runs: int, threads: int, tmp: Path) -> list[dict]:
    shape, classes = (3, size, size), CLASSES[size]
    torch.manual_seed(0)
    dense = trained_looking(build_model(f"torchvision/{arch}", classes))
    pruned, _ = channel_pruned(dense, f"torchvision/{arch}", classes, shape, 0.5)
    calibration = [torch.randn((16, *shape), generator=torch.Generator().manual_seed(i)).numpy() for i in range(4)]
    files = {}
    for name, model in (("dense", dense), ("macs0.5", pruned)):
        fp32 = tmp / f"{arch}-{size}-{name}.onnx"
        if not export_onnx(model, shape, fp32, what=f"{arch} {name}").written:
            raise SystemExit(f"{arch} {name}: not exported")
        int8 = tmp / f"{arch}-{size}-{name}.int8.onnx"
        quantize_file(fp32, int8, calibration, "minmax", needs_reduce_range())
        files[name], files[f"{name}-int8"] = fp32, int8
    rows = []
    for batch in batches:
        report = measure_latency({}, shape, onnx=files, batch_sizes=(batch,), runs=runs, warmup=2, threads=threads)
        cells = report.timings["onnxruntime"][batch]
        dense_ms = cells["dense"].median_ms
        row = {"arch": arch, "size": size, "batch": batch, "threads": report.threads, "runs": runs}
        for name in files:
            row[f"{name}_ms"] = round(cells[name].median_ms, 3)
            row[f"{name}_ratio"] = round(cells[name].median_ms / dense_ms, 3)
        row["bytes"] = {name: path.stat().st_size for name, path in files.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224], choices=sorted(CLASSES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        for arch in args.models:
            for size in args.sizes:
                rows += case(arch, size, args.batches, args.runs, args.threads, Path(tmp))
    print("| model | input | batch | dense fp32 ms | dense int8 | MACs 0.5 fp32 | MACs 0.5 int8 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['size']} | {r['batch']} | {r['dense_ms']:.2f} | {r['dense-int8_ratio']:.3f}x | "
            f"{r['macs0.5_ratio']:.3f}x | {r['macs0.5-int8_ratio']:.3f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
