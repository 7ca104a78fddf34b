"""The latency grid's table (cells ``<model>/<method>/l<share>-seed<k>.json`` written by
``python -m bench.fidelity.run --latency-shares ...``): per model, share and method, validation and test
top-1 (mean ± sample std over seeds), the measured latency against the budget, the speed-up over the
dense network measured beside it, MACs ratio; then ``dg2pf-latency`` minus each peer, paired per seed.

``python -m bench.fidelity.latency_report --results-dir DIR [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

OURS = "dg2pf-latency"


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def load(results: Path) -> list[dict]:
    cells = []
    for path in sorted(results.glob("*/*/l*-seed*.json")):
        cell = json.loads(path.read_text())
        if cell.get("status") == "ok":
            cells.append(cell)
    return cells


def table(cells: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["model"], c["latency_share"], c["method"])].append(c)
    lines = [
        "| model | budget | method | seeds | val top-1 | test top-1 | latency / budget (max) | speed-up vs dense "
        "| MACs ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, share, method), group in sorted(groups.items(), key=lambda kv: (kv[0][:2], kv[0][2] != OURS, kv[0][2])):
        lines.append(
            f"| {model} | {share:.2f}x dense | {method} | {len(group)} | {_stat([c['val_top1'] for c in group])} | "
            f"{_stat([c['test_top1'] for c in group])} | {max(c['latency_over_budget'] for c in group):.3f} | "
            f"{_stat([c['speedup'] for c in group])}x | {_stat([c['macs_ratio'] for c in group])} |"
        )
    lines.append("")
    lines.append(f"Paired per seed at the same budget: {OURS} minus each peer (test top-1; validation in brackets)")
    pairs: dict[tuple, list[tuple[int, float, float]]] = defaultdict(list)
    seeded: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for c in cells:
        seeded[(c["model"], c["latency_share"], c["seed"])][c["method"]] = c
    for (model, share, seed), methods in sorted(seeded.items()):
        ours = methods.get(OURS)
        if ours is None:
            continue
        for method, c in methods.items():
            if method != OURS:
                pairs[(model, share, method)].append(
                    (seed, ours["test_top1"] - c["test_top1"], ours["val_top1"] - c["val_top1"])
                )
    for (model, share, method), diffs in sorted(pairs.items()):
        shown = ", ".join(f"seed {s}: {t:+.2f} ({v:+.2f})" for s, t, v in diffs)
        mean = statistics.mean(t for _, t, _ in diffs)
        lines.append(f"- {model} at {share:.2f}x dense, vs {method}: {shown}; mean {mean:+.2f}")
    lines += ["", *matched(cells)]
    return "\n".join(lines)


MATCH = 1.03  # our network may measure up to 3% slower than the peer's and still count as "as fast"


def matched(cells: list[dict]) -> list[str]:
    """A peer's network may end faster than its budget (its knob moves the widths in steps, or training
    moved its ranking): each peer cell is compared with the ``dg2pf-latency`` cell of the same model and
    seed whose measured latency is the closest at or under the peer's (within ``MATCH``), from any budget."""
    lines = [
        f"At the latency each peer reached: {OURS} (same model and seed, the cell measured closest at or under "
        f"the peer's latency, {MATCH:g}x allowed) minus the peer, test top-1 (validation in brackets)"
    ]
    ours = [c for c in cells if c["method"] == OURS]
    diffs: dict[tuple, list[str]] = defaultdict(list)
    means: dict[tuple, list[float]] = defaultdict(list)
    for peer in sorted((c for c in cells if c["method"] != OURS), key=lambda c: (c["model"], c["method"], c["seed"])):
        near = [
            c
            for c in ours
            if c["model"] == peer["model"]
            and c["seed"] == peer["seed"]
            and c["latency_ms"] <= MATCH * peer["latency_ms"]
        ]
        key = (peer["model"], peer["method"])
        if not near:
            diffs[key].append(f"seed {peer['seed']}: no {OURS} cell as fast ({peer['latency_ms']:.2f} ms)")
            continue
        c = max(near, key=lambda c: c["latency_ms"])
        t, v = c["test_top1"] - peer["test_top1"], c["val_top1"] - peer["val_top1"]
        diffs[key].append(
            f"seed {peer['seed']}: {t:+.2f} ({v:+.2f}) at {c['latency_ms']:.2f} vs {peer['latency_ms']:.2f} ms"
        )
        means[key].append(t)
    for key, shown in sorted(diffs.items()):
        mean = f"; mean {statistics.mean(means[key]):+.2f}" if means[key] else ""
        lines.append(f"- {key[0]}, vs {key[1]}: {'; '.join(shown)}{mean}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity.latency_report", description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None, help="also write the cells' figures here")
    args = p.parse_args(argv)
    cells = load(args.results_dir)
    print(table(cells))
    if args.json:
        keep = (
            "model",
            "method",
            "seed",
            "budget",
            "latency",
            "latency_share",
            "latency_budget_ms",
            "latency_ms",
            "dense_latency_ms",
            "speedup",
            "latency_over_budget",
            "macs_ratio",
            "params_ratio",
            "val_top1",
            "test_top1",
            "dense_val_top1",
            "dense_test_top1",
            "epochs",
            "wall_seconds",
        )
        args.json.write_text(json.dumps([{k: c.get(k) for k in keep} for c in cells], indent=1))


if __name__ == "__main__":
    main()
