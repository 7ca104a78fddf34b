"""Run the fidelity grid: models x sparsities x methods x seeds, one cached JSON per cell, then the report.

    .venv/bin/python -m bench.fidelity.run [--models ...] [--methods ...] [--sparsities ...] [--seeds ...]
        [--epochs E] [--pruning-epochs P] [--jobs J] [--threads N] [--results-dir DIR] [--only-report]
    .venv/bin/python -m bench.fidelity.run --macs-ratios 0.5 [0.25] [--models ...] [--methods ...] [--seeds ...]

With ``--dataset fashion-mnist`` the cells run on Fashion-MNIST through the product's own data path and
(for DG2PF and its ablations) its job path (see data.py and dg2pf_family.py): sparsities 0.90 0.95 0.98
by default, pruning cells on ``--train-subset`` training images (8,000 unless told), results under
``results-fashion-mnist/`` (``--results-dir`` per setting: ``--image-size``, ``--pretrain-seed``); the page
(docs/fidelity.md) is then made from the results directories by ``python -m bench.fidelity.page``.

With ``--macs-ratios`` it runs the channel grid instead: models x MACs ratios x the channel methods
(kind ``macs``: ``dg2pf-channel``, ``tp-magnitude``) x seeds, cells in ``<model>/<method>/m<ratio>-seed<k>.json``,
and writes only the channel table of docs/fidelity-history.md (the sparsity table is left as it is).
With ``--latency-shares`` it runs the latency grid (issue 31): models x shares of the dense network's measured
latency x the methods of kind ``latency`` (``dg2pf-latency`` and two peers pruned to the same measured latency:
latency.py) x seeds, cells in ``<model>/<method>/l<share>-seed<k>.json``, and prints their table
(``python -m bench.fidelity.latency_report``).

(``bash bench/fidelity/run.sh`` sets up both environments first, then runs this.) A finished cell
is never run again, so an interrupted run resumes where it stopped; a failed cell is retried.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch

from dg2pf_core.errors import DG2PFError
from dg2pf_core.io.metrics import conv_linear_macs

from . import latency_report, report
from .cells import (
    SPARSITIES,
    SPARSITIES_BY_DATASET,
    cell_path,
    latency_cell_path,
    macs_cell_path,
    results_dir_for,
    write_json,
)
from .data import DATASETS, DataSettings, export_npz, load_job_split, load_split, settings_for_dataset
from .latency import LATENCY, dense_latency, network_ms
from .measure import measure
from .methods import get_method, method_names
from .pretrain import EXTRA_MODELS, MODELS, Dense, PretrainError, dense_model, settings_for
from .registry import Budget, Cell

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SEEDS = (0, 1, 2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def finished(path: Path, budget: Budget, data: DataSettings | None = None) -> bool:
    """True for an ``ok`` cell run with this budget (and data settings, for cells that record them);
    a cell from another budget or data is an error, not a skip."""
    if not path.exists():
        return False
    done = json.loads(path.read_text())
    if data is not None and "data" in done and done["data"] != asdict(data):
        differ = ", ".join(
            f"{k} {done['data'].get(k)!r} there, {v!r} now" for k, v in asdict(data).items() if done["data"].get(k) != v
        )
        raise SystemExit(
            f"{path} was run with other data settings ({differ}); "
            "pass another --results-dir to keep both, or delete that directory to redo it"
        )
    if done.get("budget") != asdict(budget):
        raise SystemExit(
            f"{path} was run with budget {done.get('budget')}, this run asks for {asdict(budget)}; "
            "pass another --results-dir to keep both, or delete that directory to redo it"
        )
    return done.get("status") == "ok"


def check_dense(results: Path, dense: Dense) -> None:
    """``SystemExit`` naming the first finished cell of ``dense.arch`` in ``results`` that pruned
    another dense model than ``dense`` (by its file digest; cells from before the digest was recorded,
    by the dense test top-1 they quote): one table must not mix pruned networks of two baselines."""
    for path in sorted((results / dense.arch).glob("*/*-seed*.json")):
        try:
            done = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the report names unreadable cells
        if not isinstance(done, dict) or done.get("status") != "ok":
            continue
        there, quoted = done.get("dense_sha256"), done.get("dense_test_top1")
        if there:
            same = there == dense.sha256
        else:  # recorded before the digest: the dense test top-1 it quotes, when it quotes a number
            same = isinstance(quoted, (int, float)) and round(quoted, 2) == round(dense.test_top1, 2)
        if not same:
            raise SystemExit(
                f"{path} pruned another dense {dense.arch} (test top-1 {quoted}% there, "
                f"{dense.test_top1:.2f}% now: the cached dense model was re-trained); pass another --results-dir "
                "for cells of this one, or bring back the dense checkpoint those cells used"
            )


def code_version() -> str:
    """The commit the harness runs (``+changes`` when the work tree differs from it; ``unknown`` outside git)."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_cell(cell: Cell, keep_model: Path | None = None) -> dict:
    """Run and measure one cell; ``keep_model``: also write the pruned model there (safetensors)."""
    record = {
        "method": cell.method,
        "model": cell.model,
        "sparsity_target": cell.sparsity,
        "seed": cell.seed,
        **({"macs_ratio_target": cell.macs_ratio} if cell.macs_ratio is not None else {}),
        **({"latency_budget_ms": cell.latency_budget_ms} if cell.latency_budget_ms is not None else {}),
        "budget": asdict(cell.budget),
        "threads": cell.threads,
        "data": asdict(cell.data),
        "dataset": cell.data.dataset,
        "dense_test_top1": cell.dense.test_top1,
        "dense_val_top1": cell.dense.val_top1,
        "dense_sha256": cell.dense.sha256,
        "torch": torch.__version__,
        "code": code_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        outcome = get_method(cell.method).fn(cell)
        wall = time.perf_counter() - t0  # pruning + training only: scoring is the harness's, not the method's
        # CPU seconds of this process (all its threads): less sensitive than wall time to other work on
        # the machine. Out-of-process methods (INC) report their child's instead.
        cpu = outcome.cpu_seconds if outcome.cpu_seconds is not None else time.process_time() - c0
        measured = outcome.measured if outcome.measured is not None else measure(outcome.model, cell.split)
        if keep_model is not None and outcome.model is not None:
            keep_model.parent.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in outcome.model.state_dict().items()}, str(keep_model)
            )
        record.update(measured.summary())
        if cell.macs_ratio is not None or cell.latency_budget_ms is not None:
            record.update(size_ratios(cell, outcome.model))
        if cell.latency_budget_ms is not None:
            record.update(latency_record(cell, outcome.model))
        record.update(
            {
                "epochs": outcome.epochs,
                "wall_seconds": wall,
                "cpu_seconds": cpu,
                "status": "ok",
                "error": None,
                "notes": outcome.notes,
            }
        )
    except Exception as exc:  # one bad cell must not stop the grid; its reason goes into its JSON
        record.update(
            {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
                "wall_seconds": time.perf_counter() - t0,
            }
        )
    return record


def size_ratios(cell: Cell, model: torch.nn.Module) -> dict:
    """MACs and parameters of the pruned network against the dense one, measured on both networks."""
    shape, cpu = cell.split.input_shape, torch.device("cpu")
    dense = cell.dense.build()
    dense_macs, pruned_macs = conv_linear_macs(dense, shape, cpu)[0], conv_linear_macs(model, shape, cpu)[0]
    dense_params, pruned_params = (sum(p.numel() for p in m.parameters()) for m in (dense, model))
    return {
        "macs_dense": dense_macs,
        "macs_pruned": pruned_macs,
        "macs_ratio": pruned_macs / dense_macs,
        "params_dense": dense_params,
        "params_pruned": pruned_params,
        "params_ratio": pruned_params / dense_params,
    }


def latency_record(cell: Cell, model: torch.nn.Module) -> dict:
    """The pruned network and the dense one measured side by side now (pruned, dense, pruned again: the
    pruned figure is the lower of its two), by the ruler the budget was set with."""
    shape = cell.split.input_shape
    first = network_ms(model, shape)
    dense = network_ms(cell.dense.build(), shape)
    pruned = min(first, network_ms(model, shape))
    return {
        "latency": LATENCY,
        "latency_ms": pruned,
        "dense_latency_ms": dense,
        "speedup": dense / pruned,
        "latency_over_budget": pruned / cell.latency_budget_ms,
    }


# One worker's fixed inputs (set once per process by ``_start_worker``): cells are sent as a few names.
_WORKER: dict = {}


def _start_worker(
    threads: int,
    budget: Budget,
    dense: dict,
    data: DataSettings,
    npz: Path | None,
    keep_models: bool = False,
    dense_ms: dict | None = None,
) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(
        threads=threads,
        budget=budget,
        dense=dense,
        data=data,
        npz=npz,
        splits={},
        keep_models=keep_models,
        dense_ms=dense_ms or {},
    )
    if multiprocessing.parent_process() is not None:  # a pool worker: end with the run that started it
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A pool worker outlives a killed run (SIGTERM or SIGKILL reaches the run only) and would go on
    computing cells nobody waits for; it stops within 2 s of its parent instead."""
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(1)


def _split(seed: int):
    """The cell's data: digits' fixed split, or the product's split for this seed (hold-out and subset)."""
    w = _WORKER
    key = seed if w["data"].job_path else "fixed"
    if key not in w["splits"]:
        w["splits"].clear()  # one at a time: a worker's cells are grouped by seed
        w["splits"][key] = load_job_split(w["data"], seed) if w["data"].job_path else load_split(w["data"])
    return w["splits"][key]


def _run_task(task: tuple) -> dict:
    i, n, model, target, method, seed, path, kind = task
    w = _WORKER
    sp = target if kind == "sparsity" else 0.0
    ratio = target if kind == "macs" else None
    budget_ms = target * w["dense_ms"][model] if kind == "latency" else None
    log(f"[fidelity] cell {i}/{n}: {model} {method} {_target_text(kind, target)} seed={seed}")
    cell = Cell(
        model,
        method,
        sp,
        seed,
        w["budget"],
        w["dense"][model],
        _split(seed),
        w["data"],
        w["npz"],
        w["threads"],
        ratio,
        budget_ms,
    )
    record = run_cell(cell, path.with_suffix(".safetensors") if w["keep_models"] else None)
    if kind == "latency":
        record["latency_share"] = target
    write_json(path, record)
    return record


def _target_text(kind: str, target: float) -> str:
    return {"sparsity": f"s={target:.2f}", "macs": f"macs={target:.2f}"}.get(kind, f"latency={target:.2f}x dense")


def _log_record(record: dict) -> None:
    macs, latency = "macs_ratio_target" in record, "latency_share" in record
    if latency:
        target = _target_text("latency", record["latency_share"])
    else:
        target = _target_text(
            "macs" if macs else "sparsity", record["macs_ratio_target"] if macs else record["sparsity_target"]
        )
    head = f"[fidelity]   done {record['model']} {record['method']} {target} seed={record['seed']}:"
    if record["status"] == "ok":
        size = (
            f"MACs {record['macs_ratio']:.3f}x, params {record['params_ratio']:.3f}x"
            if macs or latency
            else f"sparsity {record['sparsity']:.4f}, max layer {record['max_layer_sparsity']:.3f}"
        )
        if latency:
            size += f", {record['latency_ms']:.2f} ms ({record['latency_over_budget']:.3f}x the budget)"
        log(
            f"{head} test {record['test_top1']:.2f}% (dense {record['dense_test_top1']:.2f}%), "
            f"{size}, {record['epochs']} epochs, "
            f"{record['wall_seconds']:.0f} s wall, {record['cpu_seconds']:.0f} s CPU"
        )
    else:
        log(f"{head} FAILED: {record['error'].splitlines()[0]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity.run", description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=[*MODELS, *EXTRA_MODELS],
        help=f"default: {' '.join(MODELS)}; also {' '.join(EXTRA_MODELS)}",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"default: the grid ({', '.join(method_names())}); investigation variants: "
        f"{', '.join(sorted(set(method_names(grid_only=False)) - set(method_names())))}",
    )
    p.add_argument("--sparsities", nargs="+", type=float, default=None, help=f"default: {list(SPARSITIES)}")
    p.add_argument(
        "--macs-ratios",
        nargs="+",
        type=float,
        default=None,
        help=f"run the channel grid instead (methods of kind macs: {', '.join(method_names(kind='macs'))}; "
        "investigation variants: "
        f"{', '.join(sorted(set(method_names(grid_only=False, kind='macs')) - set(method_names(kind='macs'))))}) "
        "at these fractions of the dense MACs",
    )
    p.add_argument(
        "--latency-shares",
        nargs="+",
        type=float,
        default=None,
        help=f"run the latency grid instead (methods of kind latency: {', '.join(method_names(kind='latency'))}) "
        "at these shares of the dense network's measured latency (ONNX Runtime, 1 thread, batch 32)",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits (the original grid) or fashion-mnist (the product's data and job path; "
        "files from DG2PF_FASHION_MNIST, default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="fashion-mnist: training images per pruning cell, the same for every method of a seed "
        "(default 8000; 0 = all); pre-training always uses the whole training split",
    )
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help="override the dense models' pre-training epochs (a quick trial; part of the cache key)",
    )
    p.add_argument(
        "--pretrain-seed",
        type=int,
        default=None,
        help="the dense models' pre-training seed (default 0; part of the cache key): another seed gives an "
        "independently pre-trained dense network, whose cells go to their own --results-dir",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="fashion-mnist: the input size (default 28, the native one; 56 upsamples as a job's --image-size does)",
    )
    p.add_argument(
        "--min-dense-top1", type=float, default=None, help="override the dense models' test top-1 bar (a quick trial)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--epochs", type=int, default=Budget.epochs, help="E: total training epochs per cell")
    p.add_argument("--pruning-epochs", type=int, default=Budget.pruning_epochs, help="P: pruning epochs within E")
    p.add_argument("--patience", type=int, default=Budget.patience)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every cell (and INC)")
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="cells run at once, each in its own process (jobs x threads = the cores to use)",
    )
    p.add_argument(
        "--results-dir", type=Path, default=None, help="default: results/ (digits), results-<dataset>/ otherwise"
    )
    p.add_argument("--cache-dir", type=Path, default=HERE / "cache", help="pretrained dense models and the split .npz")
    p.add_argument(
        "--docs-dir",
        type=Path,
        default=REPO / "docs",
        help="where the report writes fidelity.{md,png} and fidelity-results.json",
    )
    p.add_argument("--only-report", action="store_true", help="aggregate existing cells; run nothing")
    p.add_argument(
        "--keep-models",
        action="store_true",
        help="write each cell's pruned model beside its JSON (<cell>.safetensors, not committed): for bn_probe --model",
    )
    p.add_argument(
        "--pretrain-only",
        action="store_true",
        help="train (or find cached) the dense models of --models and stop: pre-training may then use "
        "--threads 2 in one process, the cells --jobs 2 --threads 1",
    )
    args = p.parse_args(argv)
    given = [a for a in ("sparsities", "macs_ratios", "latency_shares") if getattr(args, a) is not None]
    if len(given) > 1:
        p.error("give one of --sparsities (the sparsity grid), --macs-ratios (the channel grid) or --latency-shares")
    args.kind = {"macs_ratios": "macs", "latency_shares": "latency"}.get(given[0] if given else "", "sparsity")
    known = method_names(grid_only=False, kind=args.kind)
    unknown = [m for m in args.methods or [] if m not in known]
    if unknown:
        p.error(f"unknown method(s) {unknown} for the {args.kind} grid; choose from {known}")
    given_targets = args.sparsities or args.macs_ratios or args.latency_shares or []
    if len({f"{t:.2f}" for t in given_targets}) < len(given_targets):  # one cell file per target, to 2 decimals
        p.error(f"targets must differ in their first two decimals (one cell each), got {given_targets}")
    bad = [r for r in (args.macs_ratios or []) + (args.latency_shares or []) if not 0.0 < r < 1.0]
    if bad:
        p.error(f"MACs ratios and latency shares must be in (0, 1), got {bad}")
    args.targets = (
        args.macs_ratios or args.latency_shares or args.sparsities or list(SPARSITIES_BY_DATASET[args.dataset])
    )
    args.results_dir = args.results_dir or results_dir_for(args.dataset)
    if args.dataset != "digits" and args.macs_ratios is not None:
        p.error("--macs-ratios (the channel grid) runs on digits only")
    if args.pretrain_epochs is not None and args.pretrain_epochs < 1:
        p.error(f"--pretrain-epochs must be >= 1, got {args.pretrain_epochs}")
    if args.min_dense_top1 is not None and not 0.0 <= args.min_dense_top1 <= 100.0:
        p.error(f"--min-dense-top1 is a percentage in [0, 100], got {args.min_dense_top1}")
    if args.dataset != "digits" and set(args.models) & set(EXTRA_MODELS):
        p.error(
            f"{args.dataset} runs through the product's job path, which builds torchvision models: "
            f"{' '.join(EXTRA_MODELS)} is digits-only"
        )
    if args.image_size is not None and (args.dataset == "digits" or not 8 <= args.image_size <= 512):
        p.error("--image-size is for the job-path datasets (fashion-mnist), in [8, 512]")
    if args.train_subset is not None and (args.dataset == "digits" or args.train_subset < 0):
        p.error("--train-subset is for the job-path datasets (fashion-mnist), and must be >= 0")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    bad = [s for s in args.sparsities or [] if not 0.0 < s < 1.0]
    if bad:
        p.error(f"sparsities must be in (0, 1), got {bad}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = args.methods or method_names(kind=args.kind)
    path_of = {"sparsity": cell_path, "macs": macs_cell_path, "latency": latency_cell_path}[args.kind]
    budget = Budget(epochs=args.epochs, pruning_epochs=args.pruning_epochs, patience=args.patience)
    budget.check()
    if not args.only_report:
        torch.set_num_threads(args.threads)
        data = settings_for_dataset(args.dataset, args.train_subset, args.image_size)
        if data.job_path:
            # Pre-training: the whole training split (seed 0's hold-out); cells: their seed's subset.
            try:
                split, npz = load_job_split(data, 0, subset=False), None
            except DG2PFError as exc:
                raise SystemExit(
                    f"{args.dataset} data ({data.spec()}; the folder is DG2PF_FASHION_MNIST when set): {exc.message}"
                ) from None
            pretrain_data = dataclasses.replace(data, train_subset=0)
        else:
            split, pretrain_data = load_split(data), data
            npz = export_npz(split, args.cache_dir / f"digits-{data.key()}.npz")
        todo = [
            (model, target, method, seed)
            for seed in args.seeds
            for model in args.models
            for target in args.targets
            for method in methods
            if not finished(path_of(args.results_dir, model, method, target, seed), budget, data)
        ]
        log(
            f"[fidelity] {split.sizes()}; budget E={budget.epochs} P={budget.pruning_epochs}; "
            f"{len(todo)} cell(s) to run in {args.results_dir}"
        )
        # All pre-training first, so a model that misses the accuracy bar is known before hours of cells;
        # its cells are skipped (shown as "not run") and the run exits non-zero with the reason.
        dense, unusable = {}, []
        for m in args.models:
            if args.pretrain_only or any(t[0] == m for t in todo):
                try:
                    settings = settings_for(m, dataset=args.dataset)
                    trial = {
                        k: v
                        for k, v in (
                            ("epochs", args.pretrain_epochs),
                            ("min_test_top1", args.min_dense_top1),
                            ("seed", args.pretrain_seed),
                        )
                        if v is not None
                    }
                    settings = dataclasses.replace(settings, **trial)
                    dense[m] = dense_model(m, split, pretrain_data, args.cache_dir, settings, log=log)
                except PretrainError as exc:
                    log(f"[pretrain] ERROR: {exc}")
                    unusable.append(str(exc))
        if args.pretrain_only:
            if unusable:
                raise SystemExit("pre-training missed the accuracy bar:\n" + "\n".join(unusable))
            return
        todo = [t for t in todo if t[0] in dense]
        for m in {t[0] for t in todo}:
            check_dense(args.results_dir, dense[m])
        # The latency grid's budgets: a share of each dense network's latency, measured once (kept on disk).
        dense_ms = (
            {m: dense_latency(args.results_dir, dense[m], split.input_shape) for m in {t[0] for t in todo}}
            if args.kind == "latency"
            else {}
        )
        setup = (args.threads, budget, dense, data, npz, args.keep_models, dense_ms)
        tasks = [
            (i, len(todo), *t, path_of(args.results_dir, t[0], t[2], t[1], t[3]), args.kind)
            for i, t in enumerate(todo, 1)
        ]
        if args.jobs == 1:
            _start_worker(*setup)
            for record in map(_run_task, tasks):
                _log_record(record)
        else:
            # Spawned processes: a forked copy of a process that has run torch's thread pool can hang.
            with ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=setup
            ) as pool:
                for future in as_completed([pool.submit(_run_task, t) for t in tasks]):
                    _log_record(future.result())
    if args.kind == "latency":
        latency_report.main(["--results-dir", str(args.results_dir)])
    elif args.dataset == "digits":  # the digits and channel tables of docs/fidelity-history.md
        report.main(
            ["--results-dir", str(args.results_dir), "--docs-dir", str(args.docs_dir), "--dataset", args.dataset]
            + (["--channel"] if args.kind == "macs" else [])
        )
    else:  # the current page is made from every setting's results directory at once
        log(
            f"[fidelity] cells in {args.results_dir}; docs/fidelity.md: python -m bench.fidelity.page --results-dir "
            f"{args.results_dir} [--results-dir <another setting's>]"
        )
    if not args.only_report and unusable:
        raise SystemExit(
            "pre-training missed the accuracy bar, those models' cells did not run:\n" + "\n".join(unusable)
        )


if __name__ == "__main__":
    main()
