"""docs/fidelity.md's current tables, its plot and its raw cells, from one or more results directories.

    .venv/bin/python -m bench.fidelity.page --results-dir DIR [--results-dir DIR ...] [--docs-dir docs]
    .venv/bin/python -m bench.fidelity.page --restore [--into DIR]   # the published cells -> results dirs

Each results directory holds the cells of one setting (a model at an input size, pruned from one dense
network; ``python -m bench.fidelity.run --results-dir``); settings are told apart by the cells
themselves (model, image size, the dense checkpoint's SHA-256). Written between the markers of
docs/fidelity.md: the methods with their source, one table (every method, setting and sparsity: mean ±
sample std over seeds, each seed's figure), and paired differences seed by seed: DG2PF's default
against the best peer, the paper preset against the default, every ablation against its base. Beside
it: docs/fidelity.png and docs/fidelity-cells.json (every cell, every epoch; ``--restore`` writes them
back, so the page re-generates on a fresh clone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from .cells import write_json
from .report import check_replaceable, load_cells, write_table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
START, END = "<!-- fidelity-page:start -->", "<!-- fidelity-page:end -->"
CELLS_FILE, PLOT_FILE = "fidelity-cells.json", "fidelity.png"
DEFAULT, PAPER, ABLATION_BASE = "dg2pf", "dg2pf-paper", "abl-base"
# The independent peers (own training loops, bench/fidelity/gmp.py), best first when tied.
PEERS = ("gmp-ao", "gmp-global", "gmp-global-kd", "oneshot-ft")


def setting_of(cell: dict) -> tuple[str, int, str]:
    """(model, input size, dense checkpoint digest prefix): one line of the table per setting."""
    size = (cell.get("data") or {}).get("image_size", 0)
    return cell["model"], int(size), (cell.get("dense_sha256") or "?")[:8]


def setting_text(setting: tuple[str, int, str], dense: float | None) -> str:
    model, size, digest = setting
    return f"{model}, {size} px, dense `{digest}`" + (f" ({dense:.2f}%)" if dense is not None else "")


def method_order(methods: set[str]) -> list[str]:
    from .methods import METHODS  # every method, registered

    head = [m for m in (DEFAULT, PAPER) if m in methods]
    ablations = sorted(m for m in methods if m.startswith("cub-")) + sorted(m for m in methods if m.startswith("abl-"))
    if ABLATION_BASE in ablations:
        ablations.remove(ABLATION_BASE)
        ablations.insert(0, ABLATION_BASE)
    peers = [m for m in PEERS if m in methods]
    rest = [m for m in METHODS if m in methods and m not in (*head, *ablations, *peers)]
    rest += sorted(methods - set(METHODS) - set(head) - set(ablations) - set(peers))
    return head + ablations + peers + rest


def ablation_base(method: str) -> str | None:
    """What an ablation changes one thing of: ``cub-*`` the default (``dg2pf``), ``abl-*`` ``abl-base``, and
    ``abl-base`` itself the default (it is ``dg2pf`` on the linear schedule)."""
    if method.startswith("cub-") or method == ABLATION_BASE:
        return DEFAULT
    if method.startswith("abl-") and method != ABLATION_BASE:
        return ABLATION_BASE
    return None


def _ok(cells: list[dict]) -> list[dict]:
    return [c for c in cells if c["status"] == "ok"]


def group(cells: list[dict]) -> dict[tuple, dict[str, dict[int, dict]]]:
    """(setting, sparsity) -> method -> seed -> cell (ok cells only)."""
    out: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for c in _ok(cells):
        out[(setting_of(c), c["sparsity_target"])][c["method"]][c["seed"]] = c
    return out


def _stats(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float]) -> str:
    mean, std = _stats(values)
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def ran_finetuning(cell: dict) -> bool:
    return any(r.get("phase") == "finetuning" for r in (cell.get("notes") or {}).get("history", []))


def recovered_total(cell: dict) -> int | None:
    counts = [
        r.get("recovered") for r in (cell.get("notes") or {}).get("history", []) if r.get("recovered") is not None
    ]
    return sum(counts) if counts else None


def paired(by_method: dict[str, dict[int, dict]], ours: str, theirs: str) -> dict | None:
    """``ours`` − ``theirs`` test top-1 on the seeds both finished: per seed, mean, wins, the larger of
    the two methods' seed standard deviations (over those seeds), and whether the mean exceeds it."""
    a, b = by_method.get(ours, {}), by_method.get(theirs, {})
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s]["test_top1"] - b[s]["test_top1"] for s in seeds]
    stds = [_stats([m[s]["test_top1"] for s in seeds])[1] or 0.0 for m in (a, b)]
    mean = statistics.fmean(diffs)
    return {
        "seeds": seeds,
        "diffs": diffs,
        "mean": mean,
        "wins": sum(d > 0 for d in diffs),
        "spread": max(stds),
        "beyond": len(seeds) > 1 and abs(mean) > max(stds),
    }


def best_peer(by_method: dict[str, dict[int, dict]]) -> str | None:
    peers = [
        (statistics.fmean(c["test_top1"] for c in by_method[p].values()), -PEERS.index(p), p)
        for p in PEERS
        if by_method.get(p)
    ]
    return max(peers)[2] if peers else None


def _paired_row(label: str, theirs: str, r: dict) -> str:
    verdict = "yes" if r["beyond"] else "no"
    return (
        f"| {label} | {theirs} | {len(r['seeds'])} | {', '.join(f'{d:+.2f}' for d in r['diffs'])} | {r['mean']:+.2f} | "
        f"{r['wins']}/{len(r['diffs'])} | {r['spread']:.2f} | {verdict} |"
    )


def render(cells: list[dict]) -> str:
    from .methods import METHODS  # every method, registered

    groups = group(cells)
    methods = method_order({c["method"] for c in cells})
    dense = {setting_of(c): c.get("dense_test_top1") for c in cells}
    failed = [c for c in cells if c["status"] != "ok"]
    budgets = sorted({json.dumps(c.get("budget"), sort_keys=True) for c in cells})
    lines = [
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {len(cells)} cell(s) by `python -m bench.fidelity.page`; "
        f"budget{'s' if len(budgets) > 1 else ''}: "
        + "; ".join(
            f"E={b['epochs']}, P={b['pruning_epochs']}, patience {b['patience']}, batch {b['batch_size']}"
            for b in (json.loads(x) for x in budgets)
            if b
        )
        + ".",
        "",
        "**Methods.**",
        "",
        "| method | what it is (source) |",
        "|---|---|",
    ]
    for m in methods:
        lines.append(f"| `{m}` | {METHODS[m].description if m in METHODS else '(no longer registered)'} |")
    lines += [
        "",
        "**Results.** Test top-1 % on the 10,000 official test images: mean ± sample std over seeds (n), each "
        "seed's figure (seeds in order); Δ is against the dense network; FT = seeds whose run reached Algorithm 2's "
        "fine-tuning; recovered = weights pruned by a ranking and kept by the next, summed over the run (mean).",
        "",
        "| setting | sparsity | method | test top-1 | n | per seed | Δ dense | epochs | FT | recovered | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=lambda k: (k[0], k[1])):
        setting, sparsity = key
        d = dense.get(setting)
        for m in methods:
            by_seed = groups[key].get(m)
            if not by_seed:
                continue
            ok = [by_seed[s] for s in sorted(by_seed)]
            tops = [c["test_top1"] for c in ok]
            rec = [r for r in (recovered_total(c) for c in ok) if r is not None]
            cpu = [c["cpu_seconds"] for c in ok if c.get("cpu_seconds") is not None]
            lines.append(
                f"| {setting_text(setting, d)} | {sparsity:.2f} | `{m}` | {_fmt(tops)} | {len(ok)} | "
                f"{', '.join(f'{t:.2f}' for t in tops)} | {statistics.fmean(tops) - d:+.2f} | "
                f"{statistics.fmean(c['epochs'] for c in ok):.1f} | {sum(map(ran_finetuning, ok))}/{len(ok)} | "
                + (f"{statistics.fmean(rec):,.0f}" if rec else "")
                + " | "
                + (f"{statistics.fmean(cpu):.0f}" if cpu else "")
                + " |"
            )
    if failed:
        lines += [
            "",
            f"Failed cells ({len(failed)}): "
            + "; ".join(
                f"{c['model']} {c['method']} s={c['sparsity_target']:.2f} seed {c['seed']}: "
                f"{c.get('error', '').splitlines()[0][:120]}"
                for c in failed
            ),
        ]
    head = [
        "| setting, sparsity | against | seeds | difference per seed | mean | wins | larger seed std | beyond it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for key in sorted(groups):
        by_method = groups[key]
        peer = best_peer(by_method)
        if peer and (r := paired(by_method, DEFAULT, peer)):
            rows.append(_paired_row(f"{setting_text(key[0], None)}, {key[1]:.2f}", f"`{peer}` (best peer)", r))
    lines += [
        "",
        f"**`{DEFAULT}` against the best peer** (highest mean of {', '.join(f'`{p}`' for p in PEERS)} in the "
        "setting), paired by seed, test top-1 points:",
        "",
        *head,
        *(rows or ["| (none yet) | | | | | | | |"]),
    ]
    rows = []
    for key in sorted(groups):
        if r := paired(groups[key], PAPER, DEFAULT):
            rows.append(_paired_row(f"{setting_text(key[0], None)}, {key[1]:.2f}", f"`{DEFAULT}`", r))
    if rows:
        lines += ["", f"**`{PAPER}` against `{DEFAULT}`**, paired by seed:", "", *head, *rows]
    rows = []
    for key in sorted(groups):
        for m in methods:
            base = ablation_base(m)
            if base and (r := paired(groups[key], m, base)):
                rows.append(_paired_row(f"{setting_text(key[0], None)}, {key[1]:.2f}: `{m}`", f"`{base}`", r))
    if rows:
        lines += [
            "",
            f"**Each ablation against its base** (one change each: `cub-*` from `{DEFAULT}`, whose configuration "
            f"`abl-cubic` repeats, `abl-*` from `{ABLATION_BASE}`, which is `{DEFAULT}` on the linear schedule), "
            "paired by seed:",
            "",
            *head,
            *rows,
        ]
    return "\n".join(lines)


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(cells)
    settings = sorted({k[0] for k in groups})
    shown = [m for m in method_order({c["method"] for c in _ok(cells)}) if not m.startswith(("abl-", "old-"))]
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(5.5 * max(1, len(settings)), 4.5), squeeze=False)
    dense = {setting_of(c): c.get("dense_test_top1") for c in cells}
    for ax, setting in zip(axes[0], settings):
        sparsities = sorted({k[1] for k in groups if k[0] == setting})
        for i, m in enumerate(shown):
            pts = [
                (j, [c["test_top1"] for c in groups[(setting, sp)][m].values()])
                for j, sp in enumerate(sparsities)
                if groups[(setting, sp)].get(m)
            ]
            if not pts:
                continue
            xs = [j + (i - (len(shown) - 1) / 2) * 0.06 for j, _ in pts]
            ax.errorbar(
                xs,
                [statistics.fmean(v) for _, v in pts],
                yerr=[_stats(v)[1] or 0.0 for _, v in pts],
                marker="os^vD*"[i % 6],
                ms=4,
                capsize=2,
                lw=1.2 if m == DEFAULT else 0.8,
                label=m,
                color=plt.cm.tab10(i % 10),
            )
            for x, (_, v) in zip(xs, pts):
                ax.scatter([x] * len(v), v, s=6, color=plt.cm.tab10(i % 10), alpha=0.5)
        if dense.get(setting) is not None:
            ax.axhline(dense[setting], color="k", ls="--", lw=0.8, label="dense")
        ax.set_title(setting_text(setting, None).replace("`", ""), fontsize=9)
        ax.set_xticks(range(len(sparsities)), [f"{sp:.2f}" for sp in sparsities])
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 % (mean ± std; dots: seeds)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(7, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity.page", description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, action="append", default=[], help="repeatable: one per setting")
    p.add_argument("--docs-dir", type=Path, default=REPO / "docs")
    p.add_argument("--force", action="store_true", help="replace a page made from more cells than given")
    p.add_argument(
        "--restore",
        action="store_true",
        help="write docs/fidelity-cells.json back into results directories "
        "(--into, default bench/fidelity/results-page/<dir>) and stop",
    )
    p.add_argument("--into", type=Path, default=HERE / "results-page")
    args = p.parse_args(argv)
    raw_path = args.docs_dir / CELLS_FILE
    if args.restore:
        raw = json.loads(raw_path.read_text())
        written = 0
        for cell in raw["cells"]:
            parts = Path(cell["dir"]).parts + Path(cell["file"]).parts
            if any(x in ("..", "") or "/" in x for x in parts) or Path(cell["dir"]).is_absolute():
                raise SystemExit(f"{raw_path}: a cell names {cell['dir']}/{cell['file']}, not a relative path")
            path = args.into / cell["dir"] / cell["file"]
            if not path.exists():
                write_json(path, {k: v for k, v in cell.items() if k not in ("dir", "file")})
                written += 1
        print(f"[page] {written} cell(s) restored under {args.into}")
        return
    if not args.results_dir:
        p.error("give at least one --results-dir")
    cells = []
    for d in args.results_dir:
        if not d.is_dir():
            raise SystemExit(f"results directory {d} does not exist")
        for c in load_cells(d):
            c["dir"] = d.name
            cells.append(c)
    md = args.docs_dir / "fidelity.md"
    check_replaceable(md, START, END, len(cells), args.force, args.results_dir[0])
    raw_path.write_text(
        json.dumps({"generated": time.strftime("%Y-%m-%dT%H:%M:%S"), "cells": cells}, indent=1, default=str) + "\n"
    )
    write_table(md, render(cells), START, END)
    plot(cells, args.docs_dir / PLOT_FILE)
    print(f"[page] {len(cells)} cell(s) -> {md}, {PLOT_FILE}, {CELLS_FILE}")


if __name__ == "__main__":
    main()
