"""A real run on a Hugging Face model directory: a transformers ViT trained on the digits, saved with
``save_pretrained``, then pruned by a dg2pf job at MACs 0.5 (docs/benchmarks.md, section 20).

Per seed: a ``ViTForImageClassification`` (32x32 inputs, patch 8, width 64, 4 layers, 4 heads, MLP 256,
about 0.2 M weights) is trained from scratch on the digits' training split (AdamW, one-cycle, ``--epochs``)
and written as a user's model directory: config.json, model.safetensors and a ViT image processor's
preprocessor_config.json. Then the job a user would run: ``PruneJob("hf", 10, DIR, "digits",
granularity="channel", target_macs_ratio=0.5)`` with DG2PF's defaults otherwise. Reported from the job's
own metrics.json: the input model's test top-1 (``baseline_test_top1``, measured by the job on the
official 360-image test split) and the pruned model's, paired per seed, the MACs ratio, and the ONNX
Runtime latency ratio (1 thread, batch 1 and 32, medians, measured by the job). Channel granularity on
a ViT removes whole attention heads and MLP hidden units, ranked together; the row counts the heads kept.

Each seed's row is cached in ``--cache`` (a JSON file per seed): rerunning resumes.

    .venv/bin/python bench/bench_hf_vit_digits.py [--seeds 0 1 2] [--epochs 40] [--json docs/hf-vit-digits.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dg2pf_contract.artifacts import Artifacts  # noqa: E402
from dg2pf_core import DG2PFConfig, PruneJob  # noqa: E402
from dg2pf_core.algorithm.channels import read_structure  # noqa: E402
from dg2pf_core.algorithm.heads import HEADS_SUFFIX  # noqa: E402
from dg2pf_core.data import DataRequest, load_dataset  # noqa: E402
from dg2pf_core.job.prune import prune_to_dir  # noqa: E402

HALF = (0.5, 0.5, 0.5)


def train_dense(seed: int, epochs: int, out: Path) -> float:
    """Train the ViT on the digits' training split and save it as a model directory; its test top-1 (%)."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=10,
    )
    model = transformers.ViTForImageClassification(config)
    splits = load_dataset("digits", DataRequest(image_size=32, in_channels=3, mean=HALF, std=HALF, seed=seed))
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(pixel_values=x).logits.argmax(1) == y).sum()) for x, y in DataLoader(splits.test, 256))
    model.save_pretrained(out)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=HALF, image_std=HALF)
    processor.save_pretrained(out)
    return 100.0 * correct / len(splits.test)


def row(seed: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        own_top1 = train_dense(seed, epochs, Path(tmp) / "vit")
        trained_s = time.time() - t0
        job = PruneJob(
            "hf",
            10,
            str(Path(tmp) / "vit"),
            "digits",
            DG2PFConfig(granularity="channel", target_macs_ratio=0.5, seed=seed),
        )
        t0 = time.time()
        m = prune_to_dir(job, Path(tmp) / "out")
        pruned_s = time.time() - t0
        structure = read_structure(Path(tmp) / "out" / Artifacts.MODEL)
        stages = structure.stages if structure else ()
        heads_removed = sum(len(v) for stage in stages for k, v in stage.items() if k.endswith(HEADS_SUFFIX))
    ort = (m.latency.backends or {}).get("onnxruntime", {}) if m.latency else {}
    return {
        "seed": seed,
        "epochs": epochs,
        "dense_test_top1_own_eval": own_top1,
        "dense_test_top1": m.baseline_test_top1,
        "pruned_test_top1": m.test_top1,
        "drop": m.baseline_test_top1 - m.test_top1,
        "macs_ratio": m.macs_sparse / m.macs_dense,
        "heads_kept": 16 - heads_removed,  # of 4 layers x 4 heads
        "onnx_latency_ratio": {b: c.pruned_ms / c.dense_ms for b, c in ort.items()},
        "threads": m.latency.threads if m.latency else None,
        "train_seconds": round(trained_s, 1),
        "prune_seconds": round(pruned_s, 1),
        "epochs_pruned": m.epochs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / "fidelity" / "cache" / "hf-vit-digits")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)
    a.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in a.seeds:
        cached = a.cache / f"seed{seed}-e{a.epochs}-heads.json"  # rows of the code that prunes heads
        if cached.is_file():
            r = json.loads(cached.read_text())
        else:
            r = row(seed, a.epochs)
            cached.write_text(json.dumps(r, indent=2))
        rows.append(r)
        lat = ", ".join(f"batch {b}: {v:.3f}x" for b, v in r["onnx_latency_ratio"].items())
        print(
            f"seed {seed}: dense {r['dense_test_top1']:.2f}  pruned {r['pruned_test_top1']:.2f}  "
            f"drop {r['drop']:+.2f}  MACs {r['macs_ratio']:.3f}  heads kept {r['heads_kept']}/16  "
            f"ONNX Runtime latency {lat}",
            flush=True,
        )
    drops = [r["drop"] for r in rows]
    spread = f"min {min(drops):+.2f}, max {max(drops):+.2f}"
    print(f"drop (dense - pruned, points): mean {statistics.mean(drops):+.2f}, {spread}")
    if a.json:
        a.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
