"""Pictures of a run, drawn from its ``metrics.json`` alone: ``training.png`` and ``layers.png``.

``training.png``: per epoch, validation top-1, sparsity, training loss and (in pruning epochs) the
weights each ranking recovered, the phases shaded and the kept (best) epoch marked. ``layers.png``:
the sparsity of every pruned layer as a horizontal bar, the target as a line; the figure grows with
the number of layers, so a 200-layer network stays readable.

Every job writes both beside metrics.json (``job.write_results``); ``dg2pf plot`` draws them for any
finished run, older ones included (any run's metrics.json reads as ``dg2pf_contract.results.Metrics``;
a field its version did not write is drawn when present). Matplotlib's object API on the Agg canvas: no
display, and no pyplot
state shared between jobs or threads. Layer names, paths and options come from the run and are drawn
as written (``parse_math=False``: a "$" in a name is no TeX).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import EpochRecord, Metrics, MetricsError
from dg2pf_core.errors import DG2PFError

# The loop's phases in their order, with a label and a colour each (shaded behind every panel).
PHASES = {
    "baseline": ("baseline (unpruned)", "#9e9e9e"),
    "gradual_pruning": ("gradual pruning", "#f28e2b"),
    "distillation": ("distillation", "#4e79a7"),
    "finetuning": ("pruned fine-tuning", "#59a14f"),
}
NAME_LIMIT = 36  # characters of a layer name on layers.png; longer ones lose their leading parts
DPI = 100
MAX_HEIGHT_IN = 600  # layers.png: under Agg's limit of 2^16 pixels at DPI
MAX_VALUE_LABELS = 300  # layers.png writes each bar's figure beside it up to this many layers


class PlotError(DG2PFError):
    """A metrics.json that holds not what the pictures are drawn from (damaged, or not a run's)."""

    field = "metrics"


def parse_metrics(text: str, where: str) -> Metrics:
    """The ``metrics.json`` document in ``text`` (read from ``where``, named in errors)."""
    try:
        return Metrics.parse(text, where)
    except MetricsError as exc:
        raise PlotError(str(exc)) from None


def write_plots(metrics: Metrics, out: str | Path) -> list[Path]:
    """Draw ``training.png`` and ``layers.png`` of ``metrics`` into the directory ``out`` (created if
    needed); returns their paths. Both are drawn before either is written, and each file appears
    whole or not at all. Raises ``PlotError`` when ``metrics`` lacks the per-epoch history or the
    per-layer sparsity."""
    figures = {Artifacts.TRAINING_PLOT: training_figure(metrics), Artifacts.LAYERS_PLOT: layers_figure(metrics)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures.items():
        path = out / name
        part = path.with_name(f".{name}.part")
        try:
            figure.savefig(part, format="png", dpi=DPI)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        written.append(path)
    return written


def _figure(width: float, height: float):
    # Imported here: the job and the CLI import this module for its names without loading matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _num(value: float | None) -> float | None:
    """A finite number, or None (not recorded, or NaN written as null)."""
    return float(value) if value is not None and math.isfinite(value) else None


def epoch_records(metrics: Metrics) -> list[EpochRecord]:
    """The history's records, one per epoch (a resumed run's latest), in order."""
    if not metrics.history:
        raise PlotError(
            f"{Artifacts.METRICS} has no per-epoch history: it is not the {Artifacts.METRICS} of a pruning "
            "run (dg2pf prune, dg2pf tune or a service job)"
        )
    by_epoch = {record.epoch: record for record in metrics.history}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _phase_spans(records: list[EpochRecord]) -> list[tuple[str, int, int]]:
    """(phase, first epoch, last epoch) of each run of consecutive records in one phase."""
    spans: list[tuple[str, int, int]] = []
    for r in records:
        if spans and spans[-1][0] == r.phase:
            spans[-1] = (r.phase, spans[-1][1], r.epoch)
        else:
            spans.append((r.phase, r.epoch, r.epoch))
    return spans


def _phase_style(phase: str) -> tuple[str, str]:
    return PHASES.get(phase, (phase, "#bab0ac"))  # a phase this version does not know: named as recorded


def _is_channel(metrics: Metrics) -> bool:
    return metrics.granularity == "channel"


def _target_text(metrics: Metrics) -> str:
    target, macs = _num(metrics.target_sparsity), _num(metrics.target_macs_ratio)
    if target is not None:
        return f"target {target:.0%}" if target * 100 == round(target * 100) else f"target {target:.2%}"
    if macs is not None:
        return f"MACs target {macs:g}x"
    return "no target recorded"


def _title(metrics: Metrics) -> str:
    dataset = metrics.dataset
    name, _, path = dataset.partition(":")
    if path:  # a dataset spec with a path: its last folder says enough in a title
        dataset = f"{name}:…/{Path(path).name}"
    head = f"{metrics.arch} on {dataset}, {metrics.granularity}, {_target_text(metrics)}"
    pairs = []
    for what, before, after in (
        ("val", metrics.baseline_val_top1, metrics.val_top1),
        ("test", metrics.baseline_test_top1, metrics.test_top1),
    ):
        a, b = _num(before), _num(after)
        if a is not None and b is not None:
            pairs.append(f"{what} top-1 {a:.2f}% → {b:.2f}% ({b - a:+.2f})")
    return head + ("\n" + ", ".join(pairs) if pairs else "")


def training_figure(metrics: Metrics):
    """The training curves of a run (a matplotlib Figure on the Agg canvas)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    records = epoch_records(metrics)
    epochs = [r.epoch for r in records]
    pruning = [r for r in records if r.phase == "gradual_pruning" and r.recovered is not None]
    panels = 4 if pruning else 3
    figure = _figure(9.0, 1.2 + 2.1 * panels)
    axes = figure.subplots(panels, 1, sharex=True)
    kept = metrics.best_epoch

    def series(value: Callable[[EpochRecord], float | None], scale: float = 1.0) -> tuple[list[int], list[float]]:
        points = [(r.epoch, _num(value(r))) for r in records]
        return [e for e, v in points if v is not None], [v * scale for _, v in points if v is not None]

    spans = _phase_spans(records)
    for ax in axes:
        for phase, first, last in spans:
            ax.axvspan(first - 0.5, last + 0.5, color=_phase_style(phase)[1], alpha=0.15, lw=0)
        if kept is not None:
            ax.axvline(kept, color="black", ls="--", lw=1)
        ax.grid(alpha=0.3)

    top1 = axes[0]
    x, y = series(lambda r: r.val_top1)
    top1.plot(x, y, "o-", color="#1f4e79", ms=3, lw=1.5, label="validation top-1")
    baseline = _num(metrics.baseline_val_top1)
    if baseline is not None:
        top1.axhline(baseline, color="#555555", ls=":", lw=1, label=f"unpruned validation top-1 ({baseline:.2f}%)")
    test = _num(metrics.test_top1)
    if kept in x:
        top1.plot(
            [kept],
            [y[x.index(kept)]],
            marker="*",
            ms=14,
            color="#d62728",
            ls="none",
            label=f"kept: epoch {kept}, validation {y[x.index(kept)]:.2f}%",
        )
        if test is not None:
            top1.plot(
                [kept],
                [test],
                marker="D",
                ms=6,
                color="#d62728",
                mfc="white",
                ls="none",
                label=f"test top-1 of the kept model ({test:.2f}%)",
            )
    top1.set_ylabel("top-1 (%)")
    if top1.get_legend_handles_labels()[0]:  # a damaged history may leave nothing to name
        top1.legend(loc="best", fontsize=8)

    sparsity = axes[1]
    x, y = series(lambda r: r.sparsity, 100.0)
    sparsity.plot(
        x, y, "o-", color="#b07aa1", ms=3, lw=1.5, label="channels removed" if _is_channel(metrics) else "sparsity"
    )
    target = _num(metrics.target_sparsity)
    if target is not None:
        sparsity.axhline(target * 100, color="black", ls=":", lw=1, label=_target_text(metrics))
    sparsity.set_ylabel("channels removed (%)" if _is_channel(metrics) else "sparsity of prunable\nweights (%)")
    sparsity.set_ylim(0, 105)
    if sparsity.get_legend_handles_labels()[0]:  # a damaged history may leave nothing to name
        sparsity.legend(loc="best", fontsize=8)

    loss = axes[2]
    x, y = series(lambda r: r.train_loss)
    loss.plot(x, y, "o-", color="#e15759", ms=3, lw=1.5)
    loss.set_ylabel("training loss")
    if not x:
        loss.text(
            0.5, 0.5, "no training loss recorded", ha="center", va="center", transform=loss.transAxes, color="grey"
        )

    if pruning:
        recovered = axes[3]
        x = [r.epoch for r in pruning]
        y = [r.recovered for r in pruning]
        recovered.bar(x, y, width=0.6, color="#76b7b2")
        recovered.set_ylabel("weights recovered\nper ranking")
        config = metrics.config  # the options as that run's version named them: read by name, where present
        how = ", ".join(f"{k} {config[k]}" for k in ("recovery", "gradual_masks") if isinstance(config.get(k), str))
        note = f"{sum(y):,.0f} in all" + (f" ({how})" if how else "")
        recovered.text(
            0.99, 0.95, note, ha="right", va="top", transform=recovered.transAxes, fontsize=8, parse_math=False
        )
        if not any(y):
            recovered.set_ylim(0, 1)
        recovered.yaxis.get_major_locator().set_params(integer=True)

    axes[-1].set_xlabel("epoch (0: the unpruned network, evaluated before training)")
    axes[-1].set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    handles = [
        Patch(color=_phase_style(p)[1], alpha=0.35, label=_phase_style(p)[0])
        for p in dict.fromkeys(s[0] for s in spans)
    ]
    handles.append(Line2D([], [], color="black", ls="--", lw=1, label=f"kept (best) epoch {kept}"))
    legend = figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    for text in legend.get_texts():
        text.set_parse_math(False)
    figure.suptitle(_title(metrics), fontsize=10, parse_math=False)
    return figure


def layer_values(metrics: Metrics) -> dict[str, float]:
    """Per-layer sparsity (fraction) in the network's order; a damaged entry is an error."""
    bad = [name for name, v in metrics.layer_sparsity.items() if _num(v) is None]
    if bad:
        raise PlotError(
            f"{Artifacts.METRICS}'s layer_sparsity has no number for {len(bad)} layer(s), first {bad[0]!r}: "
            "the file is damaged"
        )
    return metrics.layer_sparsity


def short_name(name: str, limit: int = NAME_LIMIT) -> str:
    """A layer's name for a bar label: without ``.weight``, and when long, its leading parts replaced
    by "…": the end says which layer it is (``…denseblock4.denselayer16.conv2``)."""
    name = name.removesuffix(".weight")
    if len(name) <= limit:
        return name
    tail = ""
    for part in reversed(name.split(".")):
        longer = f"{part}.{tail}" if tail else part
        if len(longer) + 1 > limit:
            break
        tail = longer
    return "…" + (tail or name[-(limit - 1) :])


def _labels(names: list[str]) -> list[str]:
    """Short names that still tell every bar apart: where two coincide, those two get longer."""
    limits = dict.fromkeys(names, NAME_LIMIT)
    while True:
        labels = [short_name(n, limits[n]) for n in names]
        counts = Counter(labels)
        clashing = [n for n, label in zip(names, labels) if counts[label] > 1 and label != n.removesuffix(".weight")]
        if not clashing:
            return labels
        for n in clashing:
            limits[n] += 8


def layers_figure(metrics: Metrics):
    """The per-layer sparsity bars of a run (a matplotlib Figure on the Agg canvas)."""
    from matplotlib.patches import Patch

    values = layer_values(metrics)
    names = list(values)
    n = len(names)
    channel = _is_channel(metrics)
    # A row per layer; past ~3,500 layers rows get thinner: Agg draws no image over 2^16 pixels high.
    figure = _figure(8.5, max(3.0, 1.4 + min(0.17, MAX_HEIGHT_IN / max(n, 1)) * n))
    ax = figure.subplots()
    warning = metrics.config.get("warn_layer_sparsity")
    warn = _num(warning) if isinstance(warning, (int, float)) else None
    if n:
        shares = [values[k] * 100 for k in names]
        high = [warn is not None and v / 100 > warn for v in shares]
        ax.barh(range(n), shares, height=0.7, color=["#e15759" if h else "#4e79a7" for h in high])
        size = 8 if n <= 60 else 7 if n <= 120 else 6
        ax.set_yticks(range(n), _labels(names), fontsize=size, parse_math=False)
        if n <= MAX_VALUE_LABELS:
            for i, v in enumerate(shares):
                ax.text(v + 0.8, i, f"{v:.1f}%", va="center", fontsize=size - 1, color="#333333")
        ax.set_ylim(n - 0.5, -0.5)  # the network's first layer on top
        handles = []
        if any(high):
            handles.append(Patch(color="#e15759", label=f"beyond the warning threshold ({warn:.0%})"))
    else:
        ax.set_yticks([])
        ax.text(50, 0.5, "no pruned layer recorded", ha="center", va="center", color="grey")
        handles = []
    target = _num(metrics.target_sparsity)
    if target is not None:
        handles.append(ax.axvline(target * 100, color="black", ls="--", lw=1.2, label=_target_text(metrics)))
    cap = _num(metrics.layer_cap)
    if cap is not None:
        handles.append(ax.axvline(cap * 100, color="#d62728", ls=":", lw=1.2, label=f"layer cap {cap:.2%}"))
    ax.set_xlim(0, 112)
    ax.set_xticks(range(0, 101, 10))
    if n > 30:  # a tall figure: the scale at the top too, where reading starts
        ax.tick_params(axis="x", top=True, labeltop=True)
    ax.set_xlabel("channels removed (%)" if channel else "sparsity (% of the layer's weights pruned)")
    ax.grid(axis="x", alpha=0.3)
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    achieved = _num(metrics.sparsity_prunable)
    what = "channels removed per layer group" if channel else "sparsity per layer"
    overall = f", {achieved:.2%} overall" if achieved is not None else ""
    ax.set_title(
        f"{metrics.arch}: {what} ({n} {'group' if channel else 'layer'}{'s' if n != 1 else ''}"
        f"{overall}, {_target_text(metrics)})",
        fontsize=10,
        parse_math=False,
    )
    return figure
