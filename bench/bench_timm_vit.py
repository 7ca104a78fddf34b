"""timm vision transformers under channel granularity: ONNX Runtime latency, dense vs MACs 0.5
(docs/benchmarks.md, section 19).

Models: timm ``vit_small_patch16_224`` and ``deit_small_patch16_224`` at 224x224, 1000 classes, built as
``--arch timm/<name>`` builds them (random-initialised: latency depends on shapes, not values). The pruned
network is what DG2PF's channel granularity leaves at ``target_macs_ratio`` 0.5 from these weights
(``bench_latency.channel_pruned``): on a timm ViT that is whole attention heads (``heads.py``) and MLP
hidden units, ranked together; the residual width is tied to the position embedding. MACs are the
Conv/Linear multiply-accumulates (``conv_linear_macs``); attention's two matrix products are not in that
count, so the measured latency ratio is the figure to read. Both networks are exported by the job's
exporter and timed interleaved on ONNX Runtime (``dg2pf_core.io.latency``, medians), batch 1 and 32,
``--threads`` threads (default 1).

    .venv/bin/python bench/bench_timm_vit.py [--threads 1] [--runs 10] [--json docs/vit-latency.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from bench_latency import channel_pruned

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dg2pf_core.io.latency import measure_latency  # noqa: E402
from dg2pf_core.io.metrics import conv_linear_macs  # noqa: E402
from dg2pf_core.io.onnx_export import export_onnx  # noqa: E402
from dg2pf_core.models import build_model  # noqa: E402

MODELS = ("timm/vit_small_patch16_224", "timm/deit_small_patch16_224")


def case(arch: str, batches: list[int], runs: int, threads: int, tmp: Path) -> list[dict]:
    shape = (3, 224, 224)
    torch.manual_seed(0)
    dense = build_model(arch, 1000).eval()
    pruned, how = channel_pruned(dense, arch, 1000, shape, 0.5)
    macs = [conv_linear_macs(m, shape, torch.device("cpu"))[0] for m in (dense, pruned)]
    files = {}
    for name, model in (("dense", dense), ("macs0.5", pruned)):
        path = tmp / f"{arch.replace('/', '_')}-{name}.onnx"
        if not export_onnx(model, shape, path, what=f"{arch} {name}").written:
            raise SystemExit(f"{arch} {name}: not exported")
        files[name] = path
    rows = []
    for batch in batches:
        report = measure_latency({}, shape, onnx=files, batch_sizes=(batch,), runs=runs, warmup=2, threads=threads)
        cells = report.timings["onnxruntime"][batch]
        rows.append(
            {
                "arch": arch,
                "batch": batch,
                "threads": report.threads,
                "runs": runs,
                "macs_ratio": round(macs[1] / macs[0], 4),
                "params": [sum(p.numel() for p in m.parameters()) for m in (dense, pruned)],
                "dense_ms": round(cells["dense"].median_ms, 3),
                "pruned_ms": round(cells["macs0.5"].median_ms, 3),
                "ratio": round(cells["macs0.5"].median_ms / cells["dense"].median_ms, 3),
                "heads": [how["heads_total"], how["heads_total"] - how["heads_removed"]],
                "skipped_groups": how["skipped_groups"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for arch in args.models for r in case(arch, args.batches, args.runs, args.threads, Path(tmp))]
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
