"""Earlier runs' tables (docs/fidelity-history.md): cell JSONs -> raw results, a table per dataset, a plot.

The current page (docs/fidelity.md) is ``bench.fidelity.page``'s; this module keeps the digits, channel and
Fashion-MNIST run 1-4 tables of docs/fidelity-history.md re-generable from their published cells.

    .venv/bin/python -m bench.fidelity.report [--dataset digits|fashion-mnist] [--results-dir DIR] [--docs-dir DIR] \\
        [--channel]
    .venv/bin/python -m bench.fidelity.report --dataset fashion-mnist --restore   # published cells -> results dir

Each dataset has its own table in docs/fidelity-history.md (its own markers), its own plot
(fidelity.png, fidelity-<dataset>.png) and raw results (fidelity-results.json,
fidelity-<dataset>-results.json). Under the table: DG2PF against the best peer, paired by seed.

The table covers the full grid (every registered method, model and sparsity) so a cell that never
ran shows as "not run" rather than silently missing (a model or a sparsity with no cell at all in one
line); cells outside the default grid are added.
With ``--channel`` it aggregates the channel cells (``m<ratio>-seed<k>.json``, methods of kind
``macs``) into their own table of docs/fidelity-history.md instead, between its own markers, and touches
nothing else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from .cells import SPARSITIES_BY_DATASET, results_dir_for, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HISTORY = "fidelity-history.md"  # earlier runs; docs/fidelity.md is bench.fidelity.page's
START, END = "<!-- fidelity-table:start -->", "<!-- fidelity-table:end -->"
CHANNEL_START, CHANNEL_END = "<!-- fidelity-channel-table:start -->", "<!-- fidelity-channel-table:end -->"
# The methods that are not DG2PF or one of its ablations: what DG2PF is compared with, seed by seed.
PEERS = ("oneshot-ft", "gmp-cubic", "torch-prune-l1", "inc-magnitude")


def outputs(dataset: str, docs: Path) -> tuple[str, str, Path, Path]:
    """(start marker, end marker, plot, raw results) of ``dataset``'s table."""
    if dataset == "digits":
        return START, END, docs / "fidelity.png", docs / "fidelity-results.json"
    return (
        f"<!-- fidelity-{dataset}-table:start -->",
        f"<!-- fidelity-{dataset}-table:end -->",
        docs / f"fidelity-{dataset}.png",
        docs / f"fidelity-{dataset}-results.json",
    )


REQUIRED_KEYS = ("method", "model", "seed", "status")
REQUIRED_OK_NUMBERS = ("test_top1", "val_top1", "sparsity", "epochs", "wall_seconds")


def load_cells(results: Path, pattern: str = "s*-seed*.json") -> list[dict]:
    """The cell JSONs under ``results``; ``SystemExit`` naming the file for one that is not a
    readable cell (truncated, not an object, a required field missing or of the wrong type)."""
    cells = []
    for path in sorted(results.glob(f"*/*/{pattern}")):
        try:
            cell = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: not a readable cell ({exc}); delete it to have the run redo the cell") from None
        missing = [k for k in REQUIRED_KEYS if not isinstance(cell, dict) or k not in cell]
        if not missing and cell["status"] == "ok":
            missing = [
                k
                for k in REQUIRED_OK_NUMBERS
                if not isinstance(cell.get(k), (int, float)) or isinstance(cell.get(k), bool)
            ]
        if missing:
            raise SystemExit(
                f"{path}: not a cell this report can read (missing or non-numeric: {', '.join(missing)}); "
                "delete it to have the run redo the cell"
            )
        cell.pop("traceback", None)
        cell["file"] = str(path.relative_to(results))
        cells.append(cell)
    return cells


def restore_cells(raw_path: Path, results: Path) -> tuple[int, int]:
    """Write the cells published in ``raw_path`` (a report's raw results) back under ``results``, each
    at the path it was read from; a cell already there is kept. Returns (written, kept). ``SystemExit``
    naming the file when it is not a report's raw results or names a path outside ``results``."""
    try:
        raw = json.loads(raw_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{raw_path}: not readable raw results ({exc})") from None
    cells = raw.get("cells") if isinstance(raw, dict) else None
    if not isinstance(cells, list):
        raise SystemExit(f"{raw_path}: not a report's raw results (no list of cells)")
    seen: set[str] = set()
    for cell in cells:  # every cell checked before any is written
        name = cell.get("file") if isinstance(cell, dict) else None
        parts = Path(name).parts if isinstance(name, str) else ()
        if (
            len(parts) != 3
            or Path(name).is_absolute()
            or ".." in parts
            or "\0" in name
            or not any(Path(parts[2]).match(p) for p in ("s*-seed*.json", "m*-seed*.json"))
        ):
            raise SystemExit(
                f"{raw_path}: a cell names {name!r}, not <model>/<method>/<cell>.json "
                "(s<sparsity>-seed<k>.json or m<ratio>-seed<k>.json)"
            )
        if name in seen:
            raise SystemExit(f"{raw_path}: two cells name {name!r}; the raw results are damaged")
        seen.add(name)
    written = kept = 0
    for cell in cells:
        path = results / cell["file"]
        if path.exists():
            kept += 1
            continue
        write_json(path, {k: v for k, v in cell.items() if k != "file"})
        written += 1
    return written, kept


def _grid(cells: list[dict], dataset: str = "digits") -> tuple[list[str], list[float], list[str]]:
    from .methods import method_names
    from .pretrain import MODELS

    models = list(MODELS) + sorted({c["model"] for c in cells} - set(MODELS))
    sparsities = sorted(set(SPARSITIES_BY_DATASET[dataset]) | {c["sparsity_target"] for c in cells})
    methods = method_names() + sorted({c["method"] for c in cells} - set(method_names()))
    return models, sparsities, methods


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(cells: list[dict]) -> dict[tuple[str, float, str], dict]:
    """Per (model, sparsity, method): mean/std of the ``ok`` seeds, and the failures' first error line."""
    groups: dict[tuple[str, float, str], list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["model"], c["sparsity_target"], c["method"])].append(c)
    out = {}
    for key, group in groups.items():
        ok = [c for c in group if c["status"] == "ok"]
        row: dict = {"n": len(ok), "failed": [c for c in group if c["status"] != "ok"]}
        if ok:
            row["top1"] = _mean_std([c["test_top1"] for c in ok])
            row["sparsity"] = statistics.fmean(c["sparsity"] for c in ok)
            row["max_layer"] = max(ok, key=lambda c: c["max_layer_sparsity"])
            row["emptied"] = max(c["layers_emptied"] for c in ok)
            row["wall"] = statistics.fmean(c["wall_seconds"] for c in ok)
            cpu = [c["cpu_seconds"] for c in ok if c.get("cpu_seconds") is not None]
            row["cpu"] = statistics.fmean(cpu) if cpu else None
            row["epochs"] = statistics.fmean(c["epochs"] for c in ok)
        out[key] = row
    return out


def _dense(cells: list[dict]) -> dict[str, float]:
    return {c["model"]: c["dense_test_top1"] for c in cells if c.get("dense_test_top1") is not None}


def _budgets(cells: list[dict]) -> list[dict]:
    seen = []
    for c in cells:
        if c.get("budget") not in seen:
            seen.append(c.get("budget"))
    return seen


def paired(cells: list[dict], ours: str = "dg2pf") -> list[dict]:
    """Per (model, sparsity): ``ours`` against the peer with the best mean test top-1, on the seeds
    where both finished: the per-seed differences (points), their mean, wins, and whether the mean
    difference exceeds the larger of the two methods' seed standard deviations."""
    rows = summarize(cells)
    by_seed = {
        (c["model"], c["sparsity_target"], c["method"], c["seed"]): c["test_top1"] for c in cells if c["status"] == "ok"
    }
    out = []
    for model, sp in sorted({(m, s) for m, s, _ in rows}):
        mine = rows.get((model, sp, ours), {})
        peers = [(rows[(model, sp, p)]["top1"][0], p) for p in PEERS if rows.get((model, sp, p), {}).get("n")]
        if not mine.get("n") or not peers:
            continue
        best = max(peers)[1]
        seeds = sorted(
            s for (m, x, meth, s) in by_seed if (m, x, meth) == (model, sp, ours) and (model, sp, best, s) in by_seed
        )
        diffs = [by_seed[(model, sp, ours, s)] - by_seed[(model, sp, best, s)] for s in seeds]
        if not diffs:
            continue
        spread = max(v or 0.0 for v in (mine["top1"][1], rows[(model, sp, best)]["top1"][1]))
        mean = statistics.fmean(diffs)
        out.append(
            {
                "model": model,
                "sparsity": sp,
                "peer": best,
                "seeds": seeds,
                "diffs": diffs,
                "mean": mean,
                "wins": sum(d > 0 for d in diffs),
                "spread": spread,
                "beyond_spread": mean > spread and len(diffs) > 1,
            }
        )
    return out


def paired_table(cells: list[dict]) -> str:
    lines = [
        "",
        "DG2PF (default config) against the best peer (highest mean among "
        f"{', '.join(PEERS)}), paired by seed: differences in test top-1 points.",
        "",
        "| model | sparsity | best peer | seeds | dg2pf − peer per seed | mean | wins "
        "| larger seed std | beyond spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = paired(cells)
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sparsity']:.2f} | {r['peer']} | {len(r['seeds'])} | "
            f"{', '.join(f'{d:+.2f}' for d in r['diffs'])} | {r['mean']:+.2f} | {r['wins']}/{len(r['diffs'])} | "
            f"{r['spread']:.2f} | {'yes' if r['beyond_spread'] else 'no'} |"
        )
    if not rows:
        lines.append("| (no setting where dg2pf and a peer both finished a seed yet) | | | | | | | | |")
    return "\n".join(lines)


def recovered_total(cell: dict) -> int | None:
    """Weights the rankings of a DG2PF cell gave back (pruned by one ranking, kept by the next),
    summed over its rankings; None for cells without the counter."""
    counts = [
        r.get("recovered") for r in (cell.get("notes") or {}).get("history", []) if r.get("recovered") is not None
    ]
    return sum(counts) if counts else None


def recovery_table(cells: list[dict]) -> str:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for c in cells:
        if c["status"] == "ok" and (n := recovered_total(c)) is not None:
            groups[(c["model"], c["sparsity_target"], c["method"])].append(n)
    if not groups:
        return ""
    lines = [
        "",
        "Weights recovered: pruned by one ranking and kept by the next, summed over a cell's rankings (per seed).",
        "",
        "| model | sparsity | method | recovered per seed |",
        "|---|---|---|---|",
    ]
    for (model, sp, method), counts in sorted(groups.items()):
        lines.append(f"| {model} | {sp:.2f} | {method} | {', '.join(f'{n:,}' for n in counts)} |")
    return "\n".join(lines)


def table(cells: list[dict], dataset: str = "digits") -> str:
    models, sparsities, methods = _grid(cells, dataset)
    rows = summarize(cells)
    dense = _dense(cells)
    budgets = _budgets(cells)
    budget_line = (
        "; ".join(f"E={b['epochs']}, P={b['pruning_epochs']}, patience={b['patience']}" for b in budgets if b)
        or "none yet"
    )
    lines = [
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {len(cells)} cell(s) by `python -m bench.fidelity.report"
        + (f" --dataset {dataset}" if dataset != "digits" else "")
        + "`; "
        f"budget: {budget_line}. Test top-1 is mean ± sample std over the seeds that finished (n); "
        "sparsity is the zero fraction over all Conv2d/Linear weights; max layer is the worst layer over seeds; "
        "emptied = layers at 100% (max over seeds); wall and CPU seconds (all threads) of pruning + training, "
        "mean over seeds.",
        "",
        "| model | sparsity | method | test top-1 % | Δ dense | n | achieved sparsity "
        "| max layer sparsity | layers emptied | epochs | wall s | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ran = {(c["model"], c["sparsity_target"]) for c in cells}
    ran_models = {model for model, _ in ran}
    for model in models:
        d = dense.get(model)
        lines.append(
            f"| **{model}** | dense | — | {d:.2f} | | | 0 | | | | | |"
            if d is not None
            else f"| **{model}** | dense | — | not run | | | | | | | | |"
        )
        for sp in sparsities:
            if (model, sp) not in ran:
                if model in ran_models:  # a model that ran elsewhere: this sparsity in one line
                    lines.append(f"| {model} | {sp:.2f} | every method | not run | | 0 | | | | | | |")
                continue
            for method in methods:
                row = rows.get((model, sp, method))
                head = f"| {model} | {sp:.2f} | {method} |"
                if row is None:
                    lines.append(f"{head} not run | | 0 | | | | | | |")
                    continue
                if row["n"] == 0:
                    why = row["failed"][0]["error"].splitlines()[0].replace("|", "\\|")[:140]
                    lines.append(f"{head} failed: {why} | | 0 | | | | | | |")
                    continue
                mean, std = row["top1"]
                acc = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
                delta = f"{mean - d:+.2f}" if d is not None else ""
                worst = row["max_layer"]
                n = f"{row['n']}" + (f" (+{len(row['failed'])} failed)" if row["failed"] else "")
                lines.append(
                    f"{head} {acc} | {delta} | {n} | {row['sparsity']:.4f} | {worst['max_layer_sparsity']:.3f} "
                    f"(`{worst['max_layer']}`) | {row['emptied']} | {row['epochs']:.1f} | {row['wall']:.0f} | "
                    + (f"{row['cpu']:.0f} |" if row["cpu"] is not None else "|")
                )
    return "\n".join(lines) + "\n" + paired_table(cells) + "\n" + recovery_table(cells)


def channel_table(cells: list[dict]) -> str:
    """The channel grid: per model, MACs ratio and method, test top-1 over seeds, the MACs and parameters
    the pruned networks keep, and DG2PF-channel's difference to Torch-Pruning's pruner seed by seed."""
    from .methods import method_names
    from .pretrain import EXTRA_MODELS, MODELS

    present = {c["model"] for c in cells}
    models = [m for m in (*MODELS, *EXTRA_MODELS) if m in present] + sorted(present - set(MODELS) - set(EXTRA_MODELS))
    ratios = sorted({c["macs_ratio_target"] for c in cells}, reverse=True)
    grid = method_names(kind="macs")
    methods = grid + sorted({c["method"] for c in cells} - set(grid))
    groups: dict[tuple[str, float, str], list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["model"], c["macs_ratio_target"], c["method"])].append(c)
    dense = _dense(cells)
    budget_line = (
        "; ".join(f"E={b['epochs']}, P={b['pruning_epochs']}, patience={b['patience']}" for b in _budgets(cells) if b)
        or "none yet"
    )
    lines = [
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {len(cells)} channel cell(s) "
        "by `python -m bench.fidelity.report --channel`; "
        f"budget: {budget_line}. Test top-1 is mean ± sample std over the seeds that finished (n), "
        "the seeds' own figures beside it; MACs and params are the pruned network's Conv/Linear "
        "multiply-accumulates and parameters over the dense network's (mean over seeds); "
        "wall and CPU seconds (all threads) of pruning + training, mean over seeds.",
        "",
        "| model | MACs target | method | test top-1 % | Δ dense | n | per seed | MACs kept "
        "| params kept | epochs | wall s | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        d = dense.get(model)
        lines.append(
            f"| **{model}** | dense | — | {d:.2f} | | | | 1 | 1 | | | |"
            if d is not None
            else f"| **{model}** | dense | — | not run | | | | | | | | |"
        )
        for ratio in ratios:
            for method in methods:
                group = groups.get((model, ratio, method), [])
                ok = sorted((c for c in group if c["status"] == "ok"), key=lambda c: c["seed"])
                head = f"| {model} | {ratio:.2f} | {method} |"
                if not ok:
                    why = (
                        f"failed: {group[0]['error'].splitlines()[0].replace('|', chr(92) + '|')[:140]}"
                        if group
                        else "not run"
                    )
                    lines.append(f"{head} {why} | | 0 | | | | | | |")
                    continue
                mean, std = _mean_std([c["test_top1"] for c in ok])
                acc = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
                failed = len(group) - len(ok)
                cpu = [c["cpu_seconds"] for c in ok if c.get("cpu_seconds") is not None]
                lines.append(
                    f"{head} {acc} | {f'{mean - d:+.2f}' if d is not None else ''} | "
                    f"{len(ok)}{f' (+{failed} failed)' if failed else ''} | "
                    + ", ".join(f"{c['test_top1']:.2f}" for c in ok)
                    + f" | {statistics.fmean(c['macs_ratio'] for c in ok):.3f} | "
                    f"{statistics.fmean(c['params_ratio'] for c in ok):.3f} | "
                    f"{statistics.fmean(c['epochs'] for c in ok):.1f} | "
                    f"{statistics.fmean(c['wall_seconds'] for c in ok):.0f} | "
                    + (f"{statistics.fmean(cpu):.0f} |" if cpu else "|")
                )
    diffs = channel_differences(cells)
    if diffs:
        lines += [
            "",
            "DG2PF-channel minus Torch-Pruning (`dg2pf-channel` − `tp-magnitude`), test top-1 points, "
            "over the seeds both finished:",
            "",
        ]
        for (model, ratio), (per_seed, mean) in diffs.items():
            lines.append(
                f"- {model} at MACs {ratio:.2f}: {mean:+.2f} (seeds: {', '.join(f'{v:+.2f}' for v in per_seed)})"
            )
    return "\n".join(lines)


def channel_differences(cells: list[dict], ours: str = "dg2pf-channel", peer: str = "tp-magnitude") -> dict:
    """Per (model, MACs ratio): ours - peer test top-1 for each seed both finished, and their mean."""
    top1 = {
        (c["model"], c["macs_ratio_target"], c["method"], c["seed"]): c["test_top1"]
        for c in cells
        if c["status"] == "ok"
    }
    out = {}
    for model, ratio in sorted({(m, r) for m, r, _, _ in top1}, key=lambda k: (k[0], -k[1])):
        seeds = sorted(
            s for m, r, meth, s in top1 if (m, r, meth) == (model, ratio, ours) and (model, ratio, peer, s) in top1
        )
        if seeds:
            per_seed = [top1[(model, ratio, ours, s)] - top1[(model, ratio, peer, s)] for s in seeds]
            out[(model, ratio)] = (per_seed, statistics.fmean(per_seed))
    return out


def check_replaceable(md: Path, start: str, end: str, cells: int, force: bool, source: Path) -> None:
    """``SystemExit`` unless the table between the markers of ``md`` may be replaced by one made from
    ``cells`` cells: the markers must be there (when ``md`` exists), and the table there must not come
    from more cells, unless ``force`` (a fresh clone lacks the per-cell results a published table came
    from; re-aggregating there must not wipe the figures). Called before any output is written."""
    import re

    if not md.exists():
        return
    body = md.read_text()
    if start not in body or end not in body:
        raise SystemExit(f"{md} lacks the markers {start} / {end}; put them where the table belongs")
    found = re.search(r"from (\d+) (?:channel )?cell", body.split(start, 1)[1].split(end, 1)[0])
    had = int(found.group(1)) if found else 0
    if not force and had > cells:
        raise SystemExit(
            f"{md}: the table there was made from {had} cell(s), {source} holds {cells}; nothing "
            "overwritten (pass --force to replace it, or --results-dir with the cells it came from)"
        )


def write_table(md: Path, text: str, start: str = START, end: str = END) -> None:
    """Replace the table between the markers (a new ``md`` gets them)."""
    body = md.read_text() if md.exists() else f"# Fidelity benchmark\n\n{start}\n{end}\n"
    if start not in body or end not in body:
        raise SystemExit(f"{md} lacks the markers {start} / {end}; put them where the table belongs")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def plot(cells: list[dict], path: Path, dataset: str = "digits") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines this runs on
    import matplotlib.pyplot as plt

    models, sparsities, methods = _grid(cells, dataset)
    rows = summarize(cells)
    dense = _dense(cells)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, method in enumerate(methods):
            pts = [
                (sp, rows[(model, sp, method)]["top1"])
                for sp in sparsities
                if rows.get((model, sp, method), {}).get("n")
            ]
            if not pts:
                continue
            # Sparsities on evenly spaced positions (0.90 and 0.95 would overlap on a linear axis),
            # each method nudged sideways so the error bars stay apart.
            xs = [sparsities.index(sp) + (i - (len(methods) - 1) / 2) * 0.04 for sp, _ in pts]
            ys = [m for _, (m, _) in pts]
            errs = [s or 0.0 for _, (_, s) in pts]
            # tab20 and a marker per method: more methods than the default 10-colour cycle has colours.
            ax.errorbar(
                xs,
                ys,
                yerr=errs,
                marker="os^vD"[i % 5],
                ms=3,
                capsize=2,
                lw=1,
                label=method,
                color=plt.cm.tab20(i % 20),
            )
        if model in dense:
            ax.axhline(dense[model], color="k", ls="--", lw=0.8, label="dense")
        if not ax.lines:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(model)
        ax.set_xlabel("target sparsity")
        ax.set_xticks(range(len(sparsities)), [f"{sp:.2f}" for sp in sparsities])
        ax.set_xlim(-0.5, len(sparsities) - 0.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%), mean ± std over seeds")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity.report", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    p.add_argument("--results-dir", type=Path, default=None, help="default: results/ (digits), results-<dataset>/")
    p.add_argument("--docs-dir", type=Path, default=REPO / "docs")
    p.add_argument(
        "--channel",
        action="store_true",
        help="the channel cells' table only (docs/fidelity-history.md, its own markers)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace a table made from more cells than the results directory holds"
    )
    p.add_argument(
        "--restore",
        action="store_true",
        help="write the published cells (docs/fidelity[-DATASET]-results.json) back into the results "
        "directory, keeping any cell already there, and stop: on a fresh clone the report then "
        "re-generates the published table (new cells need the dense checkpoints these pruned)",
    )
    args = p.parse_args(argv)
    args.results_dir = args.results_dir or results_dir_for(args.dataset)
    if args.restore:
        if args.channel:
            raise SystemExit(
                "--restore restores the sparsity cells of docs/fidelity[-DATASET]-results.json; drop --channel"
            )
        raw_path = outputs(args.dataset, args.docs_dir)[3]
        written, kept = restore_cells(raw_path, args.results_dir)
        print(
            f"[report] {written} cell(s) restored from {raw_path} into {args.results_dir} ({kept} already there, kept)"
        )
        return
    if not args.results_dir.is_dir():  # a typo must not read as an empty run, --force or not
        raise SystemExit(f"results directory {args.results_dir} does not exist")
    md = args.docs_dir / HISTORY
    if args.channel:
        if args.dataset != "digits":
            raise SystemExit("the channel table covers the digits grid only; run --channel without --dataset")
        cells = load_cells(args.results_dir, "m*-seed*.json")
        check_replaceable(md, CHANNEL_START, CHANNEL_END, len(cells), args.force, args.results_dir)
        write_table(md, channel_table(cells), CHANNEL_START, CHANNEL_END)
        print(f"[report] {len(cells)} channel cell(s) -> {md}")
        return
    cells = load_cells(args.results_dir)
    other = sorted({c["file"] for c in cells if c.get("dataset", "digits") != args.dataset})
    if other:
        raise SystemExit(
            f"{args.results_dir} holds cells of another dataset than {args.dataset} (e.g. {other[0]}); "
            "give --dataset to match, or the results directory of this dataset"
        )
    start, end, png, raw_path = outputs(args.dataset, args.docs_dir)
    check_replaceable(md, start, end, len(cells), args.force, args.results_dir)
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    raw = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "dataset": args.dataset,
        "budgets": _budgets(cells),
        "cells": cells,
    }
    raw_path.write_text(json.dumps(raw, indent=1, default=str) + "\n")
    write_table(md, table(cells, args.dataset), start, end)
    plot(cells, png, args.dataset)
    print(f"[report] {len(cells)} cell(s) -> {md} ({args.dataset} table), {png.name}, {raw_path.name}")


if __name__ == "__main__":
    main()
