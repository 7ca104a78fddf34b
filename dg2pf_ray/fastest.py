"""``max_top1_drop``: the fastest channel-pruned network whose validation top-1 stays within a drop of the
input model's, found by a search over latency budgets on Ray Tune.

1. The driver measures the latency table once (or takes the job's ``latency_table``), finds the dense
   network's and the fastest allowed network's latency, and spaces ``samples`` budgets geometrically
   between 0.85 of dense and the fastest (plus 10%).
2. Each budget's aim is calibrated end to end here, one at a time (``LatencyTarget.calibrate``; not with
   a table of another machine), before any trial starts: trials run side by side, and latency measured
   while they train would measure their contention.
3. Every budget is one trial: a ``latency_budget_ms`` job at the budget's aim, pruning by the driver's
   table (a file every trial reads), run to the end (no early stopping: the aggressive trials are the
   ones the search is for, and their accuracy is known only at the end).
4. After the search every completed trial's network is measured again here, one at a time; the job's
   model is the fastest whose best validation top-1 is at least the input model's minus
   ``max_top1_drop`` (none: the most accurate, and the job says so). With ``precision: int8`` precision
   is one more dimension: every trial quantizes its network (kept only within ``max_quantization_drop``
   of its fp32 top-1), the kept int8 model is measured the same way (ONNX Runtime, the only backend
   allowed then), and each trial's fp32 network and int8 model are both candidates; when the fp32
   network is chosen its int8 file is dropped, so nothing under the floor is served. The choice reads validation
   top-1 only; the test top-1 in metrics.json is the chosen trial's (pareto.json holds no test figure).

``pareto.json`` lists every trial (budget, aim, predicted, measured, MACs, parameters, validation top-1,
chosen); ``pareto.png`` draws them; metrics.json's ``objective`` holds the same and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from ray import tune
from ray.train import Checkpoint

from dg2pf_contract.artifacts import Artifacts, write_text_atomic
from dg2pf_contract.results import Metrics, ObjectiveSearch, ParetoPoint
from dg2pf_core.algorithm.allocation import allocate
from dg2pf_core.algorithm.channels import ChannelPlan
from dg2pf_core.algorithm.latency_table import LatencyTable, machine_here, measure_network, measure_onnx_file
from dg2pf_core.algorithm.latency_target import LatencyTarget, check_layers, measure_table, network_id
from dg2pf_core.errors import ConfigError
from dg2pf_core.io.export import OutputDir
from dg2pf_core.job import PruneJob, load_checkpoint_model, prepare
from dg2pf_core.job.results import OVER_BUDGET

from .cluster import check_capacity, connect
from .train import RunFailed, RunStorage, copy_final
from .tune import DRIVER_CPU, TuneOptions, _status, _tune_output, concurrency, trainable

HIGHEST_SHARE = 0.85  # the slowest budget tried, of the dense network's latency
ABOVE_FASTEST = 1.10  # the fastest budget tried, over the fastest network the guard allows


def budgets(dense_ms: float, fastest_ms: float, samples: int) -> list[float]:
    """``samples`` budgets spaced geometrically from ``HIGHEST_SHARE`` of dense down to just above the
    fastest allowed network (descending); one budget: the geometric middle."""
    hi = HIGHEST_SHARE * dense_ms
    lo = min(hi, ABOVE_FASTEST * fastest_ms)
    if samples == 1:
        return [math.sqrt(hi * lo)]
    return [hi * (lo / hi) ** (i / (samples - 1)) for i in range(samples)]


def candidates(points: list[ParetoPoint]) -> list[tuple[ParetoPoint, str, float, float]]:
    """Every model a search may choose: (trial, precision, measured ms, validation top-1). A completed and
    measured trial gives its fp32 network and, with precision int8, its int8 model when the trial kept one."""
    out = []
    for p in points:
        if p.status != "completed":
            continue
        if p.measured_ms is not None and p.val_top1 is not None:
            out.append((p, "fp32", p.measured_ms, p.val_top1))
        if p.int8_measured_ms is not None and p.int8_val_top1 is not None:
            out.append((p, "int8", p.int8_measured_ms, p.int8_val_top1))
    return out


def choose(points: list[ParetoPoint], floor: float) -> tuple[ParetoPoint | None, str, bool, str]:
    """The chosen trial, which of its models (``fp32`` or ``int8``), whether it keeps the floor, and why:
    the fastest model within the floor, else the most accurate (trials without a measurement or a
    validation top-1 are not candidates)."""
    done = candidates(points)
    if not done:
        return None, "fp32", False, "no trial completed"
    kinds = "trial(s)" if all(k == "fp32" for _, k, _, _ in done) else "models (each trial's fp32 and int8)"
    within = [c for c in done if c[3] >= floor]
    if within:
        best, precision, ms, top1 = min(within, key=lambda c: (c[2], -c[3]))
        return (
            best,
            precision,
            True,
            f"the fastest of the {len(within)} {kinds} within the drop: trial {best.trial_id} {precision}, "
            f"{ms:.4g} ms measured, val top-1 {top1:.2f} >= {floor:.2f}",
        )
    best, precision, ms, top1 = max(done, key=lambda c: (c[3], -c[2]))
    return (
        best,
        precision,
        False,
        f"no trial kept val top-1 >= {floor:.2f}: the most accurate is the model (trial {best.trial_id} "
        f"{precision}, {top1:.2f} at {ms:.4g} ms); allow a larger drop, train longer (max_epochs), or try more "
        "budgets (tune.samples)",
    )


def fp32_chosen_reason(point: ParetoPoint, floor: float) -> str:
    """Why a chosen trial's int8 model is not the job's when its fp32 network is."""
    int8_ms, int8_top1 = point.int8_measured_ms, point.int8_val_top1
    if int8_top1 is not None and int8_top1 < floor:
        why = f"validation top-1 {int8_top1:.2f} is under the max_top1_drop floor {floor:.2f}"
    elif int8_ms is not None:
        why = f"measured {int8_ms:.4g} ms, slower than the fp32 network's {point.measured_ms:.4g} ms"
    else:
        why = "could not be measured"
    return f"the search chose the trial's fp32 network: its int8 model {why}"


def check_resolution(drop: float, val_images: int) -> None:
    """ConfigError when ``drop`` is finer than one validation image: the search could not tell such a drop
    from none (every trial one image worse than dense would miss it), so it is refused before any work."""
    step = 100.0 / max(1, val_images)
    if drop < step:
        least = math.ceil(step * 1000) / 1000  # rounded up: the figure suggested is itself allowed
        raise ConfigError(
            f"max_top1_drop {drop:g} is less than one validation image ({val_images} images: {step:.4g} points "
            f"each): the search cannot tell such a drop from none; allow at least {least:g}, or give the job a "
            "larger validation split (val_fraction)",
            field="max_top1_drop",
        )


def fastest_within(job: PruneJob, out: str | Path, options: TuneOptions) -> Metrics:
    """Run the search and write the chosen trial's artifacts, ``pareto.json`` and ``pareto.png`` to ``out``."""
    cfg = job.config
    if options.search_space:
        raise RunFailed(
            "max_top1_drop searches latency budgets itself: leave the tune search space out (tune.samples sets "
            "how many budgets)",
            field="search_space",
        )
    if options.samples < 1:
        raise RunFailed(f"samples must be >= 1, got {options.samples}", field="samples")
    output = OutputDir(out)
    started = time.perf_counter()
    prepared = prepare(job, out=out, dry=False)
    check_resolution(float(cfg.max_top1_drop), len(prepared.splits.val))  # type: ignore[arg-type]
    connect(options.address, quiet=not options.ray_logs)
    if not options.cluster_may_grow:
        check_capacity(options.workers_per_trial, options.use_gpu, extra_cpus=DRIVER_CPU)
    model, shape = prepared.model.eval(), prepared.input_shape
    machine = machine_here(
        network_id(model, shape), cfg.latency_backend, cfg.latency_threads, cfg.latency_batch_size, shape
    )
    name = options.run_name or f"dg2pf-fastest-{time.strftime('%Y%m%d-%H%M%S')}"
    with RunStorage(options.storage_path, output.path) as storage, _tune_output(options.ray_logs):
        # The table every trial prunes by, and the budgets: beside the run (a shared filesystem when the
        # storage is one), so a search resumed under its name prunes by the same ones.
        own_dir = "://" in storage.path  # object storage: trials on this machine read a local copy
        table_dir = Path(tempfile.mkdtemp(prefix="dg2pf-table-")) if own_dir else Path(storage.path)
        try:
            table_dir.mkdir(parents=True, exist_ok=True)
            table_file = table_dir / f"{name}.latency-table.json"
            plan_file = table_dir / f"{name}.budgets.json"
            experiment = f"{storage.path.rstrip('/')}/{name}"
            if options.run_name and plan_file.is_file() and tune.Tuner.can_restore(experiment):
                table = LatencyTable.read(table_file)
                planned = json.loads(plan_file.read_text())
                wanted, aims = [float(b) for b in planned["budgets_ms"]], [float(a) for a in planned["aims_ms"]]
                skipped = [str(s) for s in planned.get("skipped", [])]
            else:
                table, wanted, aims, skipped = _plan(prepared, machine, options.samples)
                table.write(table_file)
                write_text_atomic(
                    plan_file, json.dumps({"budgets_ms": wanted, "aims_ms": aims, "skipped": skipped}) + "\n"
                )
            base_config = dataclasses.replace(
                cfg, max_top1_drop=None, latency_budget_ms=aims[0], latency_table=str(table_file)
            )
            roots = [*job.allowed_roots, str(table_dir)] if job.allowed_roots else []
            base = dataclasses.replace(job, config=base_config, allowed_roots=roots)
            grid = _fit(base, options, aims, name, storage.path)
            points = _points(grid, wanted, aims, table, shape)
            return _write(job, output, points, table, wanted, skipped, started)
        finally:
            if own_dir:
                shutil.rmtree(table_dir, ignore_errors=True)


def _plan(prepared, machine, samples: int) -> tuple[LatencyTable, list[float], list[float], list[str]]:
    """The table (the job's, or measured here) and the budgets with their calibrated aims (one aim per
    budget; budgets whose aims coincide are tried once)."""
    cfg = prepared.job.config
    model, shape = prepared.model, prepared.input_shape
    plan = ChannelPlan.build(model, shape, cfg.selection())
    params = dict(model.named_parameters())
    given = prepared.latency_table
    if given is not None:
        given.check(machine)
        check_layers(given, model, shape)
    probe = dataclasses.replace(cfg, max_top1_drop=None, latency_budget_ms=1.0)  # the table's settings
    table = given or measure_table(model, shape, machine, probe, None)
    multiple = max(1, cfg.channel_multiple)
    fastest = allocate(plan, params, table, 0.0, cfg.layer_cap, multiple).predicted_ms
    wanted, aims, skipped = [], [], []
    for budget in budgets(table.dense_ms(), fastest, samples):
        target = LatencyTarget(table, budget, plan, cfg.layer_cap)
        try:
            target.multiple = target.reachable_multiple(params, multiple)
            if given is None:
                target.calibrate(model, shape, params)
        except ConfigError as exc:  # measured out of reach here: not a point worth a trial
            skipped.append(exc.message)
            continue
        if all(abs(target.aim_ms - a) > 1e-9 * max(1.0, a) for a in aims):
            wanted.append(budget)
            aims.append(target.aim_ms)
    if not wanted:
        raise RunFailed(f"no latency budget between dense and the fastest allowed network can be met: {skipped[0]}")
    return table, wanted, aims, skipped


def _write(
    job: PruneJob,
    output: OutputDir,
    points: list,
    table: LatencyTable,
    wanted: list[float],
    skipped: list[str],
    started: float,
):
    cfg, m = job.config, table.machine
    baseline = next((p._baseline for p in points if p._baseline is not None), None)
    if baseline is None:
        failures = "; ".join(f"{p.trial_id}: {p.status} {p.error or ''}" for p in points)
        raise RunFailed(f"no trial completed ({failures})")
    floor = baseline - float(cfg.max_top1_drop)  # type: ignore[arg-type]
    for p in points:
        p.within_drop = None if p.val_top1 is None else p.val_top1 >= floor
        p.int8_within_drop = None if p.int8_val_top1 is None else p.int8_val_top1 >= floor
    chosen, precision, met, reason = choose(points, floor)
    if chosen is None:
        raise RunFailed(f"no trial completed and measured ({reason})")
    chosen.chosen, chosen.chosen_precision = True, precision
    search = ObjectiveSearch(
        max_top1_drop=float(cfg.max_top1_drop),  # type: ignore[arg-type]
        baseline_val_top1=baseline,
        floor_val_top1=floor,
        met=met,
        chosen_trial=chosen.trial_id,
        chosen_precision=precision,
        reason=reason,
        backend=m.backend,
        threads=m.threads,
        batch_size=m.batch_size,
        dense_measured_ms=table.dense_measured_ms,
        budgets_ms=wanted,
        points=[ParetoPoint.model_validate(p.model_dump()) for p in points],
        skipped=skipped,
        wall_seconds=time.perf_counter() - started,
    )
    with Checkpoint(chosen._checkpoint).as_directory() as final, output.staging() as tmp:
        copy_final(Path(final), tmp)
        files = Artifacts(tmp)
        write_text_atomic(files.pareto, json.dumps([p.model_dump() for p in search.points], indent=1) + "\n")
        _plot(search, files.root / Artifacts.PARETO_PLOT)
        metrics = Metrics.read(files.metrics)
        metrics.objective = search
        # The job's own record, not the trial's: its config (the trial's is its point in pareto.json), and its
        # latency against the budget by the driver's measurement, taken with no trial running beside it.
        metrics.config = cfg.to_dict()
        if metrics.latency_objective is not None:
            # the budget and the table's prediction are of the trial's fp32 network: measured as that network
            x = metrics.latency_objective
            x.aim_ms, x.budget_ms, x.measured_ms = chosen.aim_ms, chosen.budget_ms, chosen.measured_ms
            x.error = x.predicted_ms / chosen.measured_ms - 1.0 if chosen.measured_ms else None
            x.met = chosen.measured_ms <= chosen.budget_ms if chosen.measured_ms is not None else None
        metrics.warnings = [w for w in metrics.warnings if not w.startswith(OVER_BUDGET)]
        q = metrics.quantization
        if q is not None and q.written and precision == "fp32":
            # The trial kept int8 within its own max_quantization_drop, and the search chose its fp32 network
            # (the int8 model fell under the floor): the job's model is fp32, and nothing serves the int8 file.
            files.int8_onnx.unlink(missing_ok=True)
            q.written, q.file, q.test_top1_int8, q.bytes_int8 = False, None, None, None
            q.reason = fp32_chosen_reason(chosen, floor)
            for cells in (metrics.latency.backends or {}).values() if metrics.latency is not None else ():
                for cell in cells.values():  # the trial's int8 timings: of a file the job does not have
                    cell.int8_ms = cell.int8_p90_ms = cell.int8_speedup = None
        if not met:
            metrics.warnings = [*metrics.warnings, reason]
        metrics.write(files.metrics)
    return metrics


def _fit(base: PruneJob, options: TuneOptions, aims: list[float], name: str, storage: str):
    trainable_ = trainable(base, options, name, storage)
    concurrent = concurrency(options)
    experiment = f"{storage.rstrip('/')}/{name}"
    space = {"latency_budget_ms": tune.grid_search(aims)}
    if options.run_name and tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(
            experiment, trainable_, param_space=space, resume_unfinished=True, resume_errored=True
        ).fit()
    return tune.Tuner(
        trainable_,
        param_space=space,
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent),  # FIFO: every trial ends
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
    ).fit()


class _Point(ParetoPoint):
    _checkpoint: str | None = None
    _baseline: float | None = None


def _points(grid, wanted: list[float], aims: list[float], table: LatencyTable, shape) -> list[_Point]:
    """Every trial as a point; the completed ones' networks measured here, one at a time."""
    m = table.machine
    points = []
    for result in grid:
        metrics, status = result.metrics or {}, _status(result)
        aim = float(result.config["latency_budget_ms"])
        i = min(range(len(aims)), key=lambda k: abs(aims[k] - aim))
        point = _Point(
            trial_id=str(metrics.get("trial_id") or Path(result.path).name),
            status=status,
            budget_ms=wanted[i],
            aim_ms=aim,
            error=(
                str(result.error).strip().splitlines()[-1][:300]
                if result.error is not None
                else (metrics.get("refused") or {}).get("message")
            ),
        )
        checkpoint = metrics.get("checkpoint_path") if status == "completed" else None
        if checkpoint:
            try:
                with Checkpoint(checkpoint).as_directory() as final:
                    run = Metrics.read(Artifacts(final).metrics)
                    _, network, _ = load_checkpoint_model(run.arch, run.num_classes, Artifacts(final).model)
                    point.measured_ms = measure_network(network.eval(), shape, m.backend, m.threads, m.batch_size)
                    q, int8 = run.quantization, Artifacts(final).int8_onnx
                    if q is not None and q.written and int8.is_file():  # precision int8: kept by the trial
                        try:
                            point.int8_measured_ms = measure_onnx_file(int8, shape, m.threads, m.batch_size)
                            point.int8_val_top1 = q.val_top1_int8
                        except Exception as exc:  # noqa: BLE001 - its fp32 network is still a candidate
                            point.error = f"its int8 model could not be measured: {type(exc).__name__}: {exc}"[:300]
            except Exception as exc:  # noqa: BLE001 - one point lost, not the search
                point.error = f"its network could not be read or measured: {type(exc).__name__}: {exc}"[:300]
                points.append(point)
                continue
            point.val_top1 = run.val_top1
            point.macs = run.macs_sparse
            point.params = run.params_total
            point.channels_pruned = run.channels_pruned
            point.predicted_ms = run.latency_objective.predicted_ms if run.latency_objective else None
            point._checkpoint = checkpoint
            point._baseline = run.baseline_val_top1
        points.append(point)
    return sorted(points, key=lambda p: -p.budget_ms)


def _plot(search: ObjectiveSearch, path: Path) -> None:
    """pareto.png: validation top-1 against measured latency, the floor, the chosen point."""
    try:
        from dg2pf_core.io.plots import DPI, _figure

        fig = _figure(6.0, 4.0)
        ax = fig.add_subplot()
        pts = [p for p in search.points if p.measured_ms is not None and p.val_top1 is not None]
        ax.scatter([p.measured_ms for p in pts], [p.val_top1 for p in pts], color="#4e79a7", label="trials")
        q8 = [p for p in search.points if p.int8_measured_ms is not None and p.int8_val_top1 is not None]
        if q8:
            xs, ys = [p.int8_measured_ms for p in q8], [p.int8_val_top1 for p in q8]
            ax.scatter(xs, ys, marker="^", color="#f28e2b", label="int8")
        for p in search.points:
            if p.chosen:
                int8 = p.chosen_precision == "int8"
                x, y = (p.int8_measured_ms, p.int8_val_top1) if int8 else (p.measured_ms, p.val_top1)
                ax.scatter([x], [y], s=120, facecolors="none", edgecolors="#e15759", label="chosen")
        ax.axhline(search.floor_val_top1, color="#e15759", linestyle="--", label=f"floor (-{search.max_top1_drop:g})")
        ax.axhline(search.baseline_val_top1, color="#59a14f", linestyle=":", label="input model")
        ax.axvline(search.dense_measured_ms, color="#bab0ac", linestyle=":", label="dense latency")
        ax.set_xlabel(f"latency, ms ({search.backend}, {search.threads} thread(s), batch {search.batch_size})")
        ax.set_ylabel("validation top-1, %")
        ax.legend(fontsize=8)
        part = path.with_name(f".{path.name}.part")
        fig.savefig(part, format="png", dpi=DPI)
        os.replace(part, path)
    except Exception:  # noqa: BLE001 - the front is in pareto.json and metrics.json either way
        pass
