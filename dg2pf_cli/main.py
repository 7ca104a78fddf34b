"""``dg2pf``: pre-train an example, prune a checkpoint with DG2PF, evaluate a checkpoint.

Bad input exits with status 2 and one line saying what to fix; nothing partial is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from dg2pf_client import interrupt
from dg2pf_client.cli import OneLineParser, add_remote_commands, version_line
from dg2pf_contract.artifacts import Artifacts, StateDir
from dg2pf_contract.job import JobFileError, JobSpec, ScheduleSpec, apply_overrides, describe, read_job_file
from dg2pf_contract.options import PRESET_FIELDS, PRESETS
from dg2pf_contract.results import Metrics, Quantization
from dg2pf_core import DG2PFError, PruneJob
from dg2pf_core.algorithm.config import DG2PFConfig as _Config
from dg2pf_core.data import AUGMENT_POLICIES, dataset_usages
from dg2pf_ray.execute import Engine

from .plot import add_plot_command
from .progress import EpochBars
from .summary import latency_rows

CHECKPOINT_KEY_HELP = (
    "the entry of a checkpoint holding two sets of weights to use (state_dict_ema, model_ema, ...: "
    "a training checkpoint with an EMA copy)"
)
CROP_HELP = (
    "imagefolder: evaluation resizes an image whose short side is over --image-size / crop_pct to that "
    "short side and keeps its centre square (default 0.875, ImageNet's: 256 for 224; 1: the centre square "
    "only); a smaller image is resized whole to --image-size, nothing cut"
)
# Config fields the CLI sets through dedicated, required options rather than generated ones.
_NOT_GENERATED = {"sparsity"}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One ``--kebab-case`` option per DG2PFConfig field: every knob of the library, no drift."""
    hints = typing.get_type_hints(_Config)
    group = parser.add_argument_group("DG2PF options")
    for f in dataclasses.fields(_Config):
        if f.name in _NOT_GENERATED:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # "X | None": an option of type X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if hint is bool:
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=f"(default: {default})")
        elif typing.get_origin(hint) is list:
            group.add_argument(flag, dest=f.name, action="append", default=None, metavar="REGEX", help="repeatable")
        elif f.name == "preset":
            group.add_argument(
                flag,
                dest=f.name,
                choices=list(PRESETS),
                default=None,
                help='the named configuration whose values the options saying "the preset\'s" take unless given: '
                "default (the best "
                "measured, docs/fidelity.md) or paper (the paper's algorithm with the authors' "
                f"hyperparameters) (default: {default})",
            )
        elif f.name in PRESET_FIELDS:
            values = ", ".join(f"{p} {v[f.name]}" for p, v in PRESETS.items())
            group.add_argument(flag, dest=f.name, type=hint, default=None, help=f"(default: the preset's: {values})")
        else:
            # the JobSpec's words for the option (the same as the OpenAPI's), and its choices when it has some
            spec = ScheduleSpec.model_fields.get(f.name)
            about = f"{spec.description} " if spec is not None and spec.description else ""
            literal = next((a for a in _literals(spec.annotation)), None) if spec is not None else None
            group.add_argument(
                flag, dest=f.name, type=hint, default=None, choices=literal, help=f"{about}(default: {default})"
            )


def _literals(annotation: object) -> list[list]:
    """The value lists of the Literal types in ``annotation`` (through Optional/Annotated)."""
    if typing.get_origin(annotation) is typing.Literal:
        return [list(typing.get_args(annotation))]
    return [v for a in typing.get_args(annotation) for v in _literals(a)]


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Train (distributed) options")
    group.add_argument("--workers", type=int, help="run on Ray Train with N DDP workers (default: in this process)")
    group.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    group.add_argument(
        "--placement",
        choices=("pack", "spread"),
        help="pack workers on few nodes (default) or spread them one per node",
    )
    group.add_argument("--ray-address", help="existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    group.add_argument(
        "--storage-path",
        help="Ray Train/Tune storage for per-epoch checkpoints, kept (shared storage on a "
        "multi-node cluster; default: a temporary folder beside --out, .OUT.ray-*, removed when the command ends)",
    )
    group.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (default: 2)")
    group.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own log lines too (its start, Ray Train's worker set-up, a line per report of "
        "every worker); by default only its warnings and errors, and one line per epoch",
    )


def _latency_rows(m: Metrics) -> list[tuple[str, str]]:
    if m.objective is not None:
        o = m.objective
        rows = [("search", f"{len(o.points)} latency budgets tried; {o.reason}")]
        for p in o.points:
            measured = "-" if p.measured_ms is None else f"{p.measured_ms:.4g} ms"
            top1 = "-" if p.val_top1 is None else f"{p.val_top1:.2f}%"
            mark = "  <- chosen" if p.chosen else ""
            rows.append((f"  budget {p.budget_ms:.4g} ms", f"{p.status}: measured {measured}, val top-1 {top1}{mark}"))
        return rows
    x = m.latency_objective
    if x is None:
        return []
    measured = "not measured" if x.measured_ms is None else f"{x.measured_ms:.4g} ms"
    verdict = "" if x.met is None else (" (within the budget)" if x.met else " (OVER the budget)")
    return [
        (
            f"latency ({x.backend}, {x.threads} thr, batch {x.batch_size})",
            f"{x.dense_measured_ms:.4g} ms dense -> {measured}{verdict}; the table predicted {x.predicted_ms:.4g} ms",
        )
    ]


def _channel_rows(m: Metrics) -> list[tuple[str, str]]:
    removed = (
        f"{m.channels_pruned:,} of {m.channels_total:,} prunable ({m.channel_sparsity:.2%}); "
        "the model is the smaller dense network"
        if m.channels_pruned
        else f"none of {m.channels_total:,} prunable: the model keeps the input's structure (see the warning)"
    )
    params_dense = m.params_dense or 0
    rows = [
        ("channels removed", removed),
        (
            "parameters, pruned model / dense",
            f"{m.params_total:,} / {params_dense:,} ({m.params_total / max(params_dense, 1):.3f}x)",
        ),
    ]
    skipped = m.skipped_groups or []
    if skipped:  # layers Torch-Pruning groups but this code cannot map to channels: left dense, never pruned
        more = f"; {len(skipped) - 3} more in {Artifacts.METRICS} skipped_groups" if len(skipped) > 3 else ""
        rows.append(("groups left dense", f"{len(skipped)}: {'; '.join(skipped[:3])}{more}"))
    return rows


def _cmd_example(args: argparse.Namespace) -> int:
    from dg2pf_core.job.example import write_example

    _set_threads(args)
    if not args.quiet:
        print(
            f"training the {args.name} example on {args.threads} CPU thread(s) (--threads to change)", file=sys.stderr
        )

    def on_epoch(epoch: int, val: float) -> None:
        if not args.quiet:
            print(f"epoch {epoch:>3}  val top-1 {val:6.2f}%", file=sys.stderr)

    m = write_example(args.name, args.out, seed=args.seed, on_epoch=on_epoch)
    if m.epochs < m.max_epochs and not args.quiet:
        print(
            f"stopped after epoch {m.epochs} of {m.max_epochs}: no better validation top-1 since "
            f"epoch {m.best_epoch}, whose weights are kept",
            file=sys.stderr,
        )
    print(
        f"wrote {args.out}/{Artifacts.MODEL} ({m.arch}): test top-1 {m.test_top1:.2f}% "
        f"(epoch {m.best_epoch}, {m.wall_seconds:.0f} s)"
    )
    return 0


INIT_KEY = "dg2pf_init"  # safetensors metadata of `dg2pf init`'s files: what built them, to build them again
MAX_SEED = 2**32 - 1  # torch.manual_seed's range, as DG2PFConfig.seed's


def _cmd_init(args: argparse.Namespace) -> int:
    """Seeded random weights for any architecture ``dg2pf archs`` lists, as a plain .safetensors
    state_dict that every command taking ``--checkpoint`` reads."""
    import torch

    from dg2pf_core.io.checkpoint_save import save_state_dict
    from dg2pf_core.models import build_model, get_arch
    from dg2pf_core.models.registry import MAX_CLASSES

    get_arch(args.arch)  # an unknown name, with the closest known ones
    if not 2 <= args.num_classes <= MAX_CLASSES:
        raise DG2PFError(
            f"--num-classes must be in [2, {MAX_CLASSES:,}] (a classifier needs at least two classes), "
            f"got {args.num_classes}",
            field="num_classes",
        )
    if not 0 <= args.seed <= MAX_SEED:
        raise DG2PFError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}", field="seed")
    out = Path(args.out).expanduser()
    _check_init_out(out, args.force)
    _set_threads(args)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(args.seed)
        model = build_model(args.arch, args.num_classes)
    meta = {
        INIT_KEY: json.dumps({"arch": args.arch, "num_classes": args.num_classes, "seed": args.seed}, sort_keys=True)
    }
    try:
        save_state_dict(model.state_dict(), out, metadata=meta)
    except OSError as exc:
        raise DG2PFError(f"--out {out} could not be written: {exc.strerror or exc}", field="out") from exc
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {out} ({args.arch}, {args.num_classes} classes, {params:,} parameters, seed {args.seed}): random "
        f"weights; e.g. dg2pf prune --arch {args.arch} --num-classes {args.num_classes} --checkpoint {out} ..."
    )
    return 0


def _check_init_out(out: Path, force: bool) -> None:
    """A new .safetensors file name whose folder can be written; an existing file only with --force."""
    try:
        _check_init_path(out, force)
    except OSError as exc:  # a name too long, a folder that cannot be looked into, ...
        raise DG2PFError(f"--out {out} cannot be written: {exc.strerror or exc}", field="out") from exc


def _check_init_path(out: Path, force: bool) -> None:
    if out.is_dir():
        raise DG2PFError(f"--out {out} is a directory; give a file name, e.g. {out / Artifacts.MODEL}", field="out")
    if out.suffix != ".safetensors":
        raise DG2PFError(
            f"--out {out}: name the file .safetensors (the only format dg2pf writes weights in)", field="out"
        )
    if out.exists() or out.is_symlink():
        if not force:
            raise DG2PFError(f"--out {out} already exists; choose a new name, or --force to replace it", field="out")
        if not out.is_file():
            raise DG2PFError(f"--out {out} is not a regular file; choose a new name", field="out")
    folder = Path(os.path.abspath(out)).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DG2PFError(f"--out {out}: {folder} is a file, not a directory, so {out} cannot be created", field="out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DG2PFError(f"--out {out}: the folder {folder} is not writable", field="out")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


_JOB_OPTIONS = ("arch", "num_classes", "checkpoint", "dataset", "out")


# Flags of the job's fields -> their dotted path in the JobSpec; every DG2PF option flag is schedule.<name>.
_SPEC_PATHS = {
    "arch": "model.arch",
    "num_classes": "model.num_classes",
    "checkpoint": "model.checkpoint",
    "checkpoint_key": "model.checkpoint_key",
    "dataset": "dataset.spec",
    "sparsity": "sparsity",
    "teacher": "teacher",
    "image_size": "dataset.image_size",
    "val_fraction": "dataset.val_fraction",
    "compact_values": "compact_values",
    "skip_bad_images": "dataset.skip_bad_images",
    "crop_pct": "dataset.crop_pct",
    "augment": "dataset.augment",
}
# Options of how this process runs the job, not of the job (no JobSpec field): set on the config after.
_EXECUTION_OPTIONS = ("device", "loader_workers")


def _spec_from(args: argparse.Namespace) -> JobSpec:
    """The job as a JobSpec: the JOB file (what POST /jobs takes) if given, the flags given over it, then
    the ``--set KEY=VALUE`` overrides. Without a file the flags are the whole job."""
    from pydantic import ValidationError

    job_file = getattr(args, "job", None)
    if job_file is None and args.arch == "hf" and args.num_classes is None and args.checkpoint is not None:
        # a transformers model directory says how many classes it has (its classifier's outputs)
        from dg2pf_core.job.model import checkpoint_num_classes

        args.num_classes = checkpoint_num_classes("hf", args.checkpoint)
    if job_file is None:
        missing = [f"--{name.replace('_', '-')}" for name in _JOB_OPTIONS if getattr(args, name, None) is None]
        if missing:
            raise DG2PFError(
                f"the following arguments are required: {', '.join(missing)} (or a JOB file, or --resume DIR)"
            )
        if (
            args.sparsity is None
            and getattr(args, "target_macs_ratio", None) is None
            and getattr(args, "latency_budget_ms", None) is None
            and getattr(args, "max_top1_drop", None) is None
            and not args.set
        ):
            raise DG2PFError(
                "the following arguments are required: --sparsity (or --target-macs-ratio, --latency-budget-ms or "
                "--max-top1-drop with --granularity channel, or --resume DIR)",
                field="sparsity",
            )
    elif args.out is None:
        raise DG2PFError("the following arguments are required: --out", field="out")
    flags = [
        f"{path}={json.dumps(getattr(args, name))}"
        for name, path in _SPEC_PATHS.items()
        if getattr(args, name, None) is not None
    ]
    flags += [
        f"schedule.{f.name}={json.dumps(getattr(args, f.name))}"
        for f in dataclasses.fields(_Config)
        if f.name not in _SPEC_PATHS and f.name not in _EXECUTION_OPTIONS and getattr(args, f.name, None) is not None
    ]
    # Where each field's value came from, to name it in an error: a flag, a --set, else the file.
    given = {f.split("=", 1)[0]: "--" + f.split("=", 1)[0].rsplit(".", 1)[-1].replace("_", "-") for f in flags}
    given.update({s.split("=", 1)[0].strip(): f"--set {s.split('=', 1)[0].strip()}" for s in args.set or []})
    try:
        doc = read_job_file(job_file) if job_file else {}
        return JobSpec.model_validate(apply_overrides(doc, flags + list(args.set or [])))
    except JobFileError as exc:
        raise DG2PFError(exc.message, field=exc.field) from None
    except ValidationError as exc:
        field, message = describe(exc)
        if field in given:
            message = f"{given[field]}: {message.removeprefix(f'{field}: ')}"
        elif job_file:
            message = f"job spec {job_file}: {message}"
        raise DG2PFError(message, field=field) from None


def _job_from(args: argparse.Namespace) -> tuple[JobSpec, PruneJob]:
    """The job's spec and the engine's job (its checkpoint and teacher are paths here)."""
    spec = _spec_from(args)
    job = PruneJob.from_spec(spec, spec.model.checkpoint, spec.teacher)
    execution = {name: getattr(args, name) for name in _EXECUTION_OPTIONS if getattr(args, name, None) is not None}
    if execution:
        job.config = dataclasses.replace(job.config, **execution)
    return spec, job


def _engine(args: argparse.Namespace, spec: JobSpec | None) -> Engine:
    """Where the job runs: what the spec's resources (and tune section) ask for, then the Ray flags over
    it (--workers N: Ray Train with N workers, even 1); no spec (--resume): this process."""
    how = dict(
        address=args.ray_address,
        storage_path=args.storage_path,
        max_failures=args.max_failures,
        verbose=not args.quiet,
        ray_logs=args.verbose,
    )
    engine = Engine.of(spec, **how) if spec is not None else Engine(**how)
    if args.workers is not None and args.workers < 1:
        raise DG2PFError(f"--workers must be >= 1, got {args.workers}", field="workers")
    if args.workers is not None or args.gpu:
        engine = dataclasses.replace(
            engine, workers=args.workers or engine.workers or 1, use_gpu=args.gpu or engine.use_gpu
        )
    return engine.with_overrides(placement=args.placement)


def _cmd_prune(args: argparse.Namespace) -> int:
    from dg2pf_core.job import read_state_dir, state_dir_for
    from dg2pf_ray.execute import execute

    _set_threads(args)
    if args.resume:
        options = (
            *_JOB_OPTIONS,
            "workers",
            "teacher",
            "image_size",
            "augment",
            "crop_pct",
            "checkpoint_key",
            "set",
            "val_fraction",
            "compact_values",
            "skip_bad_images",
            *(f.name for f in dataclasses.fields(_Config)),
        )
        given = list(dict.fromkeys(f"--{n.replace('_', '-')}" for n in options if getattr(args, n, None) is not None))
        given = ([args.job] if args.job else []) + given
        if given:
            raise DG2PFError(
                f"--resume continues a run with its own options; leave out {', '.join(given)}", field="resume"
            )
        state_dir = Path(args.resume)
        job, out = read_state_dir(state_dir)
        args.out = str(out)
        engine = _engine(args, None)
    else:
        spec, job = _job_from(args)
        engine = _engine(args, spec)
        if spec.tune is not None:
            raise DG2PFError(
                f"{args.job or 'this job'} has a tune section: run it with `dg2pf tune` (the same arguments)",
                field="tune",
            )
        state_dir = state_dir_for(args.out)
        if engine.in_process and StateDir(state_dir).training_state.exists():
            raise DG2PFError(
                f"{state_dir} holds an interrupted run for this --out: continue it with "
                f"`dg2pf prune --resume {state_dir}`, or delete it to start over",
                field="out",
            )

    def announce(prepared) -> None:
        interrupt.check()  # a Ctrl-C a library swallowed while the data loaded (importlib prints "Exception ignored")
        if not args.quiet:
            skipped = len(getattr(prepared.splits, "skipped_images", []) or [])
            note = f"; skipped {skipped} unreadable image(s)" if skipped else ""
            augment = getattr(prepared.splits, "augment", None)
            note += f"; augment: {augment}" if augment else ""
            threads = (
                f" ({args.threads} thread{'s' if args.threads != 1 else ''}; --threads to change)"
                if prepared.device.type == "cpu" and engine.in_process
                else ""
            )
            print(f"data: {prepared.splits.description}{note}; device: {prepared.device}{threads}", file=sys.stderr)
        for warning in getattr(prepared.splits, "warnings", None) or []:  # shown even with --quiet, as errors are
            print(f"warning: {warning}", file=sys.stderr)

    if engine.in_process:
        import signal

        # SIGTERM (a service manager, `kill`) ends the run like Ctrl-C: the state is kept and named.
        signal.signal(signal.SIGTERM, _interrupt)
        bars = EpochBars(enabled=not args.quiet)
        try:
            m = execute(
                job,
                args.out,
                engine,
                progress=bars,
                on_prepared=announce,
                state_dir=state_dir,
                resume=bool(args.resume),
            )
        except BaseException as exc:
            kept = getattr(exc, "state_kept", None)
            interrupted = interrupt.caused_by_interrupt(exc)
            if kept is not None and (interrupted or not isinstance(exc, DG2PFError)):
                what = "interrupted" if interrupted else f"stopped by {type(exc).__name__}: {exc}"
                print(
                    f"dg2pf: {what}; nothing was written to {args.out}. The run's state (the last epoch) is kept in "
                    f"{kept}: continue with `dg2pf prune --resume {kept}`",
                    file=sys.stderr,
                )
                return 130 if interrupted else 1
            if interrupted:
                # no state kept: before the first epoch, or after training when no state was saved (a run
                # without a state directory) while the results were being written (staged: none landed)
                when = (
                    f"after {bars.epochs_ended} epoch(s) of training, while the results were written"
                    if bars.epochs_ended
                    else "before training"
                )
                print(f"dg2pf: interrupted {when}; nothing was written to {args.out}", file=sys.stderr)
                return 130
            if kept is not None and StateDir(kept).training_state.exists():  # a DG2PFError after some epochs
                print(
                    f"dg2pf: error: {exc.message}; the run's state (the last epoch) is kept in {kept}: continue with "
                    f"`dg2pf prune --resume {kept}` once the cause is fixed, or delete it to start over",
                    file=sys.stderr,
                )
                return 2
            raise
    else:
        m = execute(job, args.out, engine)
    rows = [
        (
            "target sparsity",
            f"{m.target_sparsity:.2%}"
            if m.target_sparsity is not None
            else f"MACs ratio {m.target_macs_ratio:g} -> {m.channel_sparsity:.2%} of channels"
            if m.target_macs_ratio is not None
            else f"fastest within {m.objective.max_top1_drop:g} pt of top-1 -> {m.channel_sparsity:.2%} of channels"
            if m.objective is not None
            else f"latency {m.latency_objective.budget_ms:g} ms -> {m.channel_sparsity:.2%} of channels"
            if m.latency_objective is not None
            else "-",
        ),
        *_latency_rows(m),
        *(
            _channel_rows(m)
            if m.granularity == "channel"
            else [
                ("sparsity (prunable weights)", f"{m.sparsity_prunable:.4%}"),
                ("sparsity (all parameters)", f"{m.sparsity_total:.4%}"),
                ("parameters nonzero / total", f"{m.params_nonzero:,} / {m.params_total:,}"),
            ]
        ),
        ("MACs sparse / dense", f"{m.macs_sparse:,} / {m.macs_dense:,} ({m.macs_sparse / max(m.macs_dense, 1):.3f}x)"),
        ("most pruned layer", _most_pruned(m)),
        *([("granularity", _nm_check(m))] if m.nm_violations is not None else []),
        ("test top-1 dense -> pruned", _fmt_pair(m.baseline_test_top1, m.test_top1)),
        ("val top-1 (best epoch)", f"{m.val_top1:.2f}% (epoch {m.best_epoch} of {m.epochs})"),
        ("wall time", _wall_time(m)),
        (Artifacts.ONNX, _onnx_line(m)),
        *([(Artifacts.INT8_ONNX, _int8_line(m.quantization))] if m.quantization is not None else []),
        *latency_rows(m),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for warning in m.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}/{_written(m)}, and {Artifacts.METRICS}")
    return 0


def _written(m: Metrics) -> str:
    """The model files a run wrote, for the line that says where the results are."""
    onnx = [Artifacts.ONNX] if m.onnx is not None and m.onnx.written else []
    int8 = [Artifacts.INT8_ONNX] if m.quantization is not None and m.quantization.written else []
    return ", ".join([Artifacts.MODEL, Artifacts.COMPACT, *onnx, *int8])


def _int8_line(q: Quantization) -> str:
    """What became of the int8 model: a job's summary row, and ``dg2pf quantize``'s line."""
    if not q.written:
        return f"not {'kept' if q.val_top1_int8 is not None else 'made'}: {q.reason}"
    test = f", test {q.test_top1_int8:.2f}%" if q.test_top1_int8 is not None else ""
    size = f"; {q.bytes_int8:,} bytes vs {q.bytes_fp32:,} fp32" if q.bytes_int8 and q.bytes_fp32 else ""
    return (
        f"written: val top-1 {q.val_top1_int8:.2f}% vs fp32 {q.val_top1_fp32:.2f}%{test} "
        f"(calibration {q.method}, allowed drop {q.max_drop:g}){size}"
    )


def _wall_time(m: Metrics) -> str:
    """The run from the command's start; on Ray, the workers' own share beside it (the rest is Ray and
    its workers starting, and the results coming back)."""
    if m.objective is not None:
        return (
            f"{m.objective.wall_seconds:.1f} s, the whole search (the chosen trial's run {m.wall_seconds:.1f} s of it)"
        )
    if m.tune is not None:
        return f"{m.tune.wall_seconds:.1f} s, the whole search (the best trial's run {m.wall_seconds:.1f} s of it)"
    if m.driver_wall_seconds is None:
        return f"{m.wall_seconds:.1f} s"
    return f"{m.driver_wall_seconds:.1f} s (the workers' training and evaluation {m.wall_seconds:.1f} s of it)"


def _onnx_line(m: Metrics) -> str:
    if m.onnx is not None and m.onnx.written:
        return f"written (opset {m.onnx.opset}; logits match PyTorch's within {m.onnx.max_abs_diff:.2g})"
    return f"not written: {m.onnx.reason if m.onnx is not None else 'not attempted'}"


def _nm_check(m: Metrics) -> str:
    n = m.granularity.split(":")[0]
    return f"{m.granularity} (groups with more than {n} nonzeros: {m.nm_violations})"


def _most_pruned(m: Metrics) -> str:
    layers = m.layer_sparsity
    if not layers:
        return "-"
    name = max(layers, key=layers.__getitem__)
    cap = f" (cap {m.layer_cap:.2%})" if m.layer_cap is not None else ""
    return f"{name} {layers[name]:.2%}{cap}"


def _cmd_tune(args: argparse.Namespace) -> int:
    from dg2pf_ray.execute import execute

    _set_threads(args)
    spec, job = _job_from(args)
    engine = _engine(args, spec)
    # A search: the JOB file's tune section, the flags over it; each trial on Ray Train.
    engine = dataclasses.replace(
        engine,
        workers=engine.workers or 1,
        tune_samples=engine.tune_samples or 4,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
    )
    m = execute(job, args.out, engine.with_overrides(tune_samples=args.samples, search_space=args.search_space))
    if m.objective is not None:  # max_top1_drop: the search over latency budgets
        for label, value in _latency_rows(m):
            print(f"{label:<24} {value}")
        print(
            f"test top-1 {m.test_top1:.2f}%; wrote {args.out}/{_written(m)}, {Artifacts.METRICS} and {Artifacts.PARETO}"
        )
        return 0
    t = m.tune
    assert t is not None  # a search's metrics always carry it (dg2pf_ray.tune)
    for row in t.trials:
        val = f"{row.val_top1:.2f}%" if row.val_top1 is not None else "-"
        error = f"  error: {row.error}" if row.status == "failed" and row.error else ""
        print(f"{row.trial_id:<24} {row.status:<14} val top-1 {val}{error}")
    print(f"best trial {t.best_trial}: val top-1 {m.val_top1:.2f}%, test top-1 {m.test_top1:.2f}%")
    print(f"wrote {args.out}/{_written(m)}, {Artifacts.METRICS} and {Artifacts.TRIALS}")
    return 0


# --- the service: serve and its embedded cluster here; the remote commands are dg2pf_client.cli's ---


def _cmd_serve(args: argparse.Namespace) -> int:
    from dg2pf_service.__main__ import main as serve_main

    if args.stop:
        args.action = "stop"
        return _cmd_cluster(args)
    if args.data_dir:
        import os

        os.environ["DG2PF_DATA_DIR"] = args.data_dir  # Settings read it (with the other DG2PF_* settings)
    argv = [*(["--host", args.host] if args.host else []), *(["--port", str(args.port)] if args.port else [])]
    return serve_main(argv)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from dg2pf_service.lifecycle import cluster_report, stop_cluster
    from dg2pf_service.settings import Settings

    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    if args.action == "status":
        for line in cluster_report(settings).lines():
            print(line)
        return 0
    for line in stop_cluster(settings):
        print(line)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out))


def _add_service_commands(sub) -> None:
    dm = sub.add_parser("demo", help="the whole path on the embedded default: service, example, 90%% job, result")
    dm.add_argument("--out", default="demo-out")
    dm.set_defaults(func=_cmd_demo)

    sv = sub.add_parser("serve", help="run the API with an embedded Ray and store (data in $DG2PF_DATA_DIR)")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.add_argument("--stop", action="store_true", help="stop the embedded Ray cluster instead (= dg2pf cluster stop)")
    sv.add_argument("--data-dir", help="the service's data directory (default: $DG2PF_DATA_DIR or ./dg2pf-data)")
    sv.set_defaults(func=_cmd_serve)

    cl = sub.add_parser(
        "cluster",
        help="the embedded Ray cluster the service started: status, or stop it "
        "(running jobs are cancelled; refused while the API runs)",
    )
    cl.add_argument("action", choices=["status", "stop"])
    cl.add_argument("--data-dir", help="the service's data directory (default: $DG2PF_DATA_DIR or ./dg2pf-data)")
    cl.set_defaults(func=_cmd_cluster)

    add_remote_commands(sub)


def _fmt_pair(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "n/a (dataset has no test split)"
    return f"{before:.2f}% -> {after:.2f}% ({after - before:+.2f})"


def _cmd_quantize(args: argparse.Namespace) -> int:
    from dg2pf_core.job.quantization import quantize_checkpoint

    _set_threads(args)
    q = quantize_checkpoint(
        args.arch,
        args.num_classes,
        args.checkpoint,
        args.dataset,
        args.out,
        max_drop=args.max_quantization_drop,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        skip_bad_images=args.skip_bad_images,
        crop_pct=args.crop_pct,
        checkpoint_key=args.checkpoint_key,
    )
    if args.json:
        print(q.model_dump_json(indent=2))
    elif q.written:
        print(f"{Artifacts.INT8_ONNX}: {_int8_line(q)}")
    written = [Artifacts.ONNX, *([Artifacts.INT8_ONNX] if q.written else []), Artifacts.QUANTIZATION]
    if not q.written:
        print(f"dg2pf: {Artifacts.INT8_ONNX} {_int8_line(q)}", file=sys.stderr)
    print(f"wrote {args.out}/{', '.join(written)}", file=sys.stderr if args.json else sys.stdout)
    return 0 if q.written else 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dg2pf_core.job.evaluation import evaluate_checkpoint

    _set_threads(args)
    r = evaluate_checkpoint(
        args.arch,
        args.num_classes,
        args.checkpoint,
        args.dataset,
        image_size=args.image_size,
        split=args.split,
        skip_bad_images=args.skip_bad_images,
        crop_pct=args.crop_pct,
        checkpoint_key=args.checkpoint_key,
    )
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['split']} top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  ({r['samples']} images)")
        print(
            f"sparsity: {r['sparsity_prunable']:.4%} of prunable weights, {r['sparsity_total']:.4%} of all parameters"
        )
        if r["channels_removed"] is not None:
            print(
                f"channels: {r['channels_removed']:,} removed (the checkpoint's channel structure): "
                "a smaller dense network"
            )
        print(_size_line(r))
    return 0


def _size_line(size: dict) -> str:
    """One line of ``dg2pf_core.io.metrics.compared``: MACs and parameters against the dense reference."""
    return (
        f"MACs {size['macs']:,} / {size['macs_reference']:,} ({size['macs_ratio']:.3f}x), parameters nonzero "
        f"{size['params_nonzero']:,} / {size['params_reference']:,} ({size['params_ratio']:.3f}x) "
        f"vs {size['reference']}"
    )


def _cmd_latency(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from dg2pf_contract.job import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
    from dg2pf_core.io.latency import measure_latency
    from dg2pf_core.io.metrics import compared, footprint
    from dg2pf_core.io.onnx_export import export_onnx
    from dg2pf_core.job import checkpoint_num_classes, load_checkpoint_model
    from dg2pf_core.job.evaluation import dense_default_footprint, dense_default_name
    from dg2pf_core.job.preflight import check_eval_forward

    _set_threads(args)
    batch_sizes = _batch_sizes(args.batch_sizes)
    for name, value, low, high in (("--runs", args.runs, 1, 10_000), ("--warmup", args.warmup, 0, 1_000)):
        if not low <= value <= high:
            raise DG2PFError(f"{name} must be in [{low}, {high}], got {value}", field=name[2:])
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise DG2PFError(f"--max-seconds must be > 0, got {args.max_seconds}", field="max_seconds")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in ("torch", "onnxruntime")]
    if unknown or "torch" not in backends:
        raise DG2PFError(
            f"--backends takes torch and optionally onnxruntime (e.g. torch,onnxruntime), got {args.backends!r}",
            field="backends",
        )
    num_classes = (
        args.num_classes
        if args.num_classes is not None
        else checkpoint_num_classes(args.arch, args.checkpoint, key=args.checkpoint_key)
    )
    spec, model, _ = load_checkpoint_model(args.arch, num_classes, args.checkpoint, key=args.checkpoint_key)
    size = args.image_size or spec.input_size
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise DG2PFError(
            f"--image-size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, got {size}", field="image_size"
        )
    shape = (spec.in_channels, size, size)
    models = {"model": model}
    if args.dense_checkpoint:
        _, models["dense"], _ = load_checkpoint_model(
            args.arch, num_classes, args.dense_checkpoint, what="dense checkpoint"
        )
    probe = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    for name, m in models.items():
        check_eval_forward(
            m,
            probe,
            arch=args.arch,
            num_classes=num_classes,
            image_size=size,
            device=torch.device("cpu"),
            what="the dense checkpoint" if name == "dense" else "the checkpoint",
        )
    # The pruned model against the dense checkpoint when given, else the architecture built unpruned
    # (a channel-pruned model is dense in its own, smaller shapes: its own counts say nothing).
    if "dense" in models:
        reference, reference_name = footprint(models["dense"], shape), "the dense checkpoint"
    else:
        reference, reference_name = (
            dense_default_footprint(args.arch, num_classes, shape, args.checkpoint),
            dense_default_name(args.arch),
        )
    size = compared(footprint(models["model"], shape), reference, reference_name)
    notes = []
    with tempfile.TemporaryDirectory(prefix="dg2pf-latency-") as tmp:
        files = {}
        if "onnxruntime" in backends:
            for name, m in models.items():
                exported = export_onnx(m, shape, Path(tmp) / f"{name}.onnx", what=f"the {name} ({args.arch})")
                if exported.written:
                    files[name] = Path(tmp) / f"{name}.onnx"
                else:
                    notes.append(f"onnxruntime: {name} not measured: {exported.reason}")
        load_before = machine_load()
        report = measure_latency(
            models,
            shape,
            onnx=files,
            batch_sizes=batch_sizes,
            runs=args.runs,
            warmup=args.warmup,
            threads=args.threads,
            budget_s=args.max_seconds,
        )
        load_after = machine_load()
    doc = {
        "arch": args.arch,
        "checkpoint": args.checkpoint,
        "dense_checkpoint": args.dense_checkpoint,
        "num_classes": num_classes,
        "input_shape": list(shape),
        "macs_ratio": size["macs_ratio"],
        "params_ratio": size["params_ratio"],
        "size": size,
        **report.to_dict(),
        "threads_from": args.threads_from,
        "machine": {
            "cpus": load_before["cpus"],
            "load_before": [round(v, 2) for v in load_before["load"]],
            "load_after": [round(v, 2) for v in load_after["load"]],
        },
    }
    # Other work's share of the load: the average after measuring counts this command's own threads too.
    others = max(load_before["load"][0], load_after["load"][0] - args.threads)
    if others > load_before["cpus"] - args.threads + 0.5:  # fewer idle CPUs than measuring threads
        notes.append(
            f"the machine was busy (other work's load about {others:.1f} on {load_before['cpus']} CPUs, "
            f"{args.threads} thread(s) measuring): the figures are slower and noisier than on an idle machine; "
            "compare tables measured at a similar load"
        )
    doc["notes"] = notes + doc["notes"]
    if "dense" in models:
        doc["speedup_vs_dense"] = {
            b: {
                str(n): cells["dense"].median_ms / cells["model"].median_ms
                for n, cells in by.items()
                if "dense" in cells and "model" in cells
            }
            for b, by in report.timings.items()
        }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"{args.arch} ({num_classes} classes), inputs {' x '.join(map(str, shape))}, {report.threads} thread(s), "
        f"{doc['cpu']}; MACs nonzero / dense {doc['macs_ratio']:.3f}x, parameters {doc['params_ratio']:.3f}x "
        f"(vs {size['reference']})"
    )
    headers = [
        "backend",
        "batch",
        "median ms",
        "p90 ms",
        "runs",
        *(["dense median ms", "vs dense"] if "dense" in models else []),
    ]
    rows = []
    for backend, by_batch in report.timings.items():
        for n, cells in by_batch.items():
            if "model" not in cells:
                continue
            t = cells["model"]
            row = [backend, str(n), f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", str(t.runs)]
            if "dense" in models:
                d = cells.get("dense")
                row += [f"{d.median_ms:.3f}", f"{d.median_ms / t.median_ms:.2f}x"] if d else ["-", "-"]
            rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(_threads_line(doc))
    for note in doc["notes"]:
        print(f"note: {note}")
    return 0


def _threads_line(doc: dict) -> str:
    """The threads the figures were measured with and how busy the machine was: a table measured on a
    loaded machine is slower than the model is."""
    machine = doc["machine"]
    source = (
        "--threads"
        if doc["threads_from"] == "--threads"
        else "the default: the CPUs less the load average, at least 1; --threads to change"
    )
    return (
        f"threads: {doc['threads']} ({source}); machine: {machine['cpus']} CPUs, 1-minute load average "
        f"{machine['load_before'][0]:.2f} before measuring, {machine['load_after'][0]:.2f} after"
    )


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(not 1 <= n <= 4096 for n in sizes):
        raise DG2PFError(
            f"--batch-sizes takes comma-separated sizes in [1, 4096], e.g. 1,32; got {text!r}", field="batch_sizes"
        )
    return tuple(dict.fromkeys(sizes))


def _cmd_latency_table(args: argparse.Namespace) -> int:
    """Measure the latency table a ``latency_budget_ms`` job prunes by, for this machine, into a file
    that a job run elsewhere takes as ``latency_table``."""
    from dg2pf_contract.job import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
    from dg2pf_core.algorithm.config import DG2PFConfig
    from dg2pf_core.algorithm.latency_table import check_batch_bytes, machine_here
    from dg2pf_core.algorithm.latency_target import measure_table, network_id
    from dg2pf_core.job import checkpoint_num_classes, load_checkpoint_model
    from dg2pf_core.models import build_model, get_arch

    out = Path(args.out)
    if not args.out or any(ord(c) < 32 or ord(c) == 127 for c in args.out):
        raise DG2PFError("--out must be a file name without control characters", field="out")
    if out.exists() or out.is_symlink():
        raise DG2PFError(f"{out} exists: name a new file (nothing was measured)", field="out")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise DG2PFError(f"{out.parent} is not a directory this user can write in (nothing was measured)", field="out")
    config = DG2PFConfig(
        granularity="channel",
        latency_budget_ms=1.0,  # any: the table does not depend on it
        latency_backend=args.backend,
        latency_threads=args.threads,
        latency_batch_size=args.batch_size,
        channel_multiple=args.channel_multiple,
    )
    if args.checkpoint is not None:
        num_classes = (
            args.num_classes
            if args.num_classes is not None
            else checkpoint_num_classes(args.arch, args.checkpoint, key=args.checkpoint_key)
        )
        spec, model, _ = load_checkpoint_model(args.arch, num_classes, args.checkpoint, key=args.checkpoint_key)
    else:
        if args.num_classes is None:
            raise DG2PFError("--num-classes is required without --checkpoint", field="num_classes")
        spec, model = get_arch(args.arch), build_model(args.arch, args.num_classes)
    size = spec.input_size if args.image_size is None else args.image_size
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise DG2PFError(
            f"--image-size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, got {size}", field="image_size"
        )
    shape = (spec.in_channels, size, size)
    check_batch_bytes(config.latency_batch_size, shape, "--batch-size", "batch_size", model)
    model.eval()
    machine = machine_here(
        network_id(model, shape), config.latency_backend, config.latency_threads, config.latency_batch_size, shape
    )
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    table = measure_table(model, shape, machine, config, say)
    # Created only if still absent (a file made there while measuring is kept): a temporary file linked in.
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(table.to_json(), indent=1) + "\n")
        os.link(tmp, out)
    except FileExistsError:
        raise DG2PFError(f"{out} appeared while measuring: it is kept; name a new file", field="out") from None
    except OSError as exc:
        raise DG2PFError(f"cannot write {out}: {exc.strerror or exc}", field="out") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    print(
        f"latency table of {args.arch} at {size}x{size} ({machine.backend}, {machine.threads} thread(s), batch "
        f"{machine.batch_size}) on {machine.cpu}: {len(table.layers)} layers, dense {table.dense_measured_ms:.4g} "
        f"ms, measured in {table.build_seconds:.1f} s"
    )
    for note in table.notes:
        print(f"  {note}")
    print(f"wrote {out}: give it to a job as latency_table (--latency-table {out}) with the same settings")
    return 0


def _cmd_archs(args: argparse.Namespace) -> int:
    from dg2pf_core.models import hf
    from dg2pf_core.models.registry import list_archs, timm_version

    for name in list_archs(timm_models=args.timm):
        print(name)
    if not args.timm:
        version = timm_version()
        print(
            f"# and timm/<model> for every timm {version} model (list them: dg2pf archs --timm)"
            if version
            else "# timm models: pip install 'dg2pf[timm]'",
            file=sys.stderr,
        )
        hf_version = hf.transformers_version()
        print(
            f"# hf: a Hugging Face transformers {hf_version} image classifier, read from the model directory given "
            "as --checkpoint"
            if hf_version
            else "# Hugging Face model directories (--arch hf): pip install 'dg2pf[hf]'",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dg2pf", description="Distilled Gradual Pruning with Pruned Fine-tuning")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    ex = sub.add_parser("example", help="train an example model to prune (writes OUT/model.safetensors)")
    ex.add_argument("name", help="example name: digits")
    ex.add_argument("--out", required=True)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--quiet", action="store_true")
    ex.add_argument("--threads", type=int, help=THREADS_HELP)
    ex.set_defaults(func=_cmd_example)

    it = sub.add_parser(
        "init",
        help="write seeded random weights for an architecture (OUT.safetensors): a "
        "checkpoint to prune or train when there is no trained one",
    )
    it.add_argument(
        "--arch",
        required=True,
        help="any name `dg2pf archs` lists, e.g. digits_cnn, cifar/resnet18, torchvision/resnet50",
    )
    it.add_argument("--num-classes", type=int, required=True)
    it.add_argument(
        "--out",
        required=True,
        metavar="FILE.safetensors",
        help="the file to write (refused if it exists, unless --force)",
    )
    it.add_argument(
        "--seed", type=int, default=0, help="the same seed writes the same file, byte for byte (default: 0)"
    )
    it.add_argument("--force", action="store_true", help="replace an existing --out file")
    it.add_argument("--threads", type=int, help=THREADS_HELP)
    it.set_defaults(func=_cmd_init)

    pr = sub.add_parser("prune", help="prune a checkpoint with DG2PF")
    _add_job_options(pr, required=False)
    pr.add_argument(
        "--resume",
        metavar="DIR",
        help="continue an interrupted run from its state directory "
        "(OUT.dg2pf-run, named when the run stopped); no other job options",
    )
    _add_ray_options(pr)
    _add_config_options(pr)
    pr.set_defaults(func=_cmd_prune)
    _add_tune_evaluate_archs(sub)
    add_plot_command(sub)
    return p


def _add_job_options(pr: argparse.ArgumentParser, required: bool = True) -> None:
    # prune checks the required ones itself: a JOB file or --resume DIR replaces them.
    pr.add_argument(
        "job",
        nargs="?",
        metavar="JOB",
        help="a job spec file, JSON or YAML: exactly what POST /jobs takes "
        "(model.checkpoint a path here); the options given below replace its values",
    )
    pr.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="set a field of the job, by its dotted path in "
        "the job spec (schedule.lr=0.001, dataset.image_size=64); repeatable; applied last",
    )
    pr.add_argument(
        "--arch", required=required, help="e.g. digits_cnn, cifar/resnet18, torchvision/resnet50 (see `dg2pf archs`)"
    )
    pr.add_argument("--num-classes", type=int, required=required)
    pr.add_argument(
        "--checkpoint", required=required, help=".safetensors or a torch state_dict file (recognised by content)"
    )
    pr.add_argument("--checkpoint-key", help=CHECKPOINT_KEY_HELP)
    pr.add_argument(
        "--dataset", required=required, help="; ".join(f"{usage}: {text}" for usage, text in dataset_usages())
    )
    pr.add_argument(
        "--sparsity",
        type=float,
        help="fraction of prunable weights (channels with --granularity channel) "
        "to remove, in (0, 1); required unless --target-macs-ratio",
    )
    pr.add_argument("--out", required=required, help="output directory (must not exist or be empty)")
    pr.add_argument("--teacher", help="separate teacher checkpoint (default: the unpruned input model)")
    pr.add_argument("--image-size", type=int, help="input size (default: the architecture's)")
    pr.add_argument(
        "--val-fraction", type=float, help="held out from train when the dataset has no val split (default: 0.1)"
    )
    pr.add_argument(
        "--compact-values",
        choices=["fp32", "fp16"],
        help="value dtype of OUT/model.compact.safetensors (default: fp32, exact)",
    )
    pr.add_argument(
        "--skip-bad-images",
        action="store_true",
        default=None,
        help="leave out images that cannot be decoded (counted in metrics.json) instead of stopping",
    )
    pr.add_argument("--crop-pct", type=float, help=CROP_HELP)
    pr.add_argument(
        "--augment",
        choices=("auto", *AUGMENT_POLICIES),
        help="training augmentation: imagenet (random resized crop + flip), cifar (pad + random crop + "
        "flip), shift (pad + random crop), none; auto (default): imagefolder imagenet from 96 px, cifar "
        "below; cifar10 cifar; mnist, fashion-mnist shift; digits none. Evaluation and serving are the same "
        "whatever it is",
    )
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.add_argument("--threads", type=int, help=THREADS_HELP)


THREADS_HELP = (
    "CPU threads for torch (default: the CPUs this process may use less the machine's load average, at "
    "least 1: on a busy machine torch's one thread per core oversubscribes it and runs several times slower)"
)


def machine_load() -> dict:
    """The CPUs this process may use (its affinity) and the 1-, 5- and 15-minute load averages
    (zeros where the platform has none)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else [0.0, 0.0, 0.0]
    return {"cpus": cpus, "load": load}


def default_threads() -> int:
    """CPUs this process may use (its affinity) less the 1-minute load average, rounded, at least 1.

    torch's own default, one thread per core, assumes an idle machine: on a 2-core box busy with another
    job it made ``dg2pf prune`` and ``dg2pf example`` 2-11x slower than one thread (OpenMP threads
    spin-waiting for each other). An idle machine gets every core, as with torch's default.
    """
    machine = machine_load()
    return max(1, machine["cpus"] - int(machine["load"][0] + 0.5))


# More compute threads than this is a typo, not a plan (they only contend for the CPUs).
MAX_THREADS = 1024


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads``, else ``default_threads()``; recorded in ``args.threads`` (and where it came from in
    ``args.threads_from``) for what the command prints."""
    threads = getattr(args, "threads", None)
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise DG2PFError(
            f"--threads must be in [1, {MAX_THREADS}] (this machine has {os.cpu_count()} CPUs; more threads "
            f"than CPUs only makes torch slower), got {threads}",
            field="threads",
        )
    if threads is None:
        threads = default_threads()
        args.threads_from = "default"
    else:
        args.threads_from = "--threads"
    import torch

    args.threads = threads
    torch.set_num_threads(threads)


def _add_tune_evaluate_archs(sub) -> None:
    tu = sub.add_parser("tune", help="search DG2PF schedule hyperparameters with Ray Tune")
    _add_job_options(tu, required=False)
    tu.add_argument("--samples", type=int, help="configurations to try (default: the JOB file's tune.samples, else 4)")
    tu.add_argument("--search-space", help="YAML/JSON file of option -> distribution (default: the built-in space)")
    tu.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    tu.add_argument(
        "--grace-period", type=int, default=2, help="epochs at the final sparsity before early stopping (default: 2)"
    )
    _add_ray_options(tu)
    _add_config_options(tu)
    tu.set_defaults(func=_cmd_tune)

    qu = sub.add_parser(
        "quantize",
        help="int8 for a checkpoint (pruned earlier, or not): OUT/model.int8.onnx, checked against fp32 as "
        "--precision int8 does (exit 1 when it lost more than --max-quantization-drop)",
    )
    qu.add_argument("--arch", required=True)
    qu.add_argument("--num-classes", type=int, required=True)
    qu.add_argument("--checkpoint", required=True)
    qu.add_argument("--checkpoint-key", help=CHECKPOINT_KEY_HELP)
    qu.add_argument(
        "--dataset", required=True, help="as for prune: " + " | ".join(usage for usage, _ in dataset_usages())
    )
    qu.add_argument("--image-size", type=int)
    qu.add_argument("--crop-pct", type=float, help=CROP_HELP)
    qu.add_argument("--val-fraction", type=float, default=0.1, help="as for prune (default: 0.1)")
    qu.add_argument("--seed", type=int, default=0, help="the validation split's seed, as for prune (default: 0)")
    qu.add_argument(
        "--max-quantization-drop", type=float, default=0.5, help="points of validation top-1 int8 may lose (0.5)"
    )
    qu.add_argument("--skip-bad-images", action="store_true", help="leave out images that cannot be decoded")
    qu.add_argument("--out", required=True, help="a new or empty folder")
    qu.add_argument("--json", action="store_true", help="print quantization.json")
    qu.add_argument("--threads", type=int, help=THREADS_HELP)
    qu.set_defaults(func=_cmd_quantize)

    ev = sub.add_parser("evaluate", help="top-1/top-5 and sparsity of a checkpoint")
    ev.add_argument("--arch", required=True)
    ev.add_argument("--num-classes", type=int, required=True)
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--checkpoint-key", help=CHECKPOINT_KEY_HELP)
    ev.add_argument(
        "--dataset", required=True, help="as for prune: " + " | ".join(usage for usage, _ in dataset_usages())
    )
    ev.add_argument("--image-size", type=int)
    ev.add_argument("--crop-pct", type=float, help=CROP_HELP)
    ev.add_argument("--split", choices=["test", "val"], default="test")
    ev.add_argument("--skip-bad-images", action="store_true", help="leave out images that cannot be decoded")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--threads", type=int, help=THREADS_HELP)
    ev.set_defaults(func=_cmd_evaluate)

    la = sub.add_parser("latency", help="measure a checkpoint's inference latency: PyTorch and ONNX Runtime on the CPU")
    la.add_argument("--arch", required=True)
    la.add_argument("--checkpoint", required=True, help="a plain or compact checkpoint (recognised by content)")
    la.add_argument("--checkpoint-key", help=CHECKPOINT_KEY_HELP)
    la.add_argument("--num-classes", type=int, help="default: the output size of the checkpoint's classifier")
    la.add_argument("--image-size", type=int, help="input size (default: the architecture's)")
    la.add_argument("--batch-sizes", default="1,32", help="comma-separated (default: 1,32)")
    la.add_argument("--runs", type=int, default=30, help="timed runs per model and batch size (default: 30)")
    la.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default: 5; at least 2 are run)")
    la.add_argument(
        "--threads",
        type=int,
        help="torch and ONNX Runtime intra-op threads (default: as for prune, the CPUs "
        "this process may use less the machine's load average, at least 1); the output names them and the load",
    )
    la.add_argument(
        "--dense-checkpoint", help="the unpruned model, timed interleaved with the checkpoint: adds 'vs dense'"
    )
    la.add_argument(
        "--backends",
        default="torch,onnxruntime",
        help="torch[,onnxruntime] (default: both; onnxruntime exports the model(s) to ONNX first)",
    )
    la.add_argument(
        "--max-seconds",
        type=float,
        help="cap the measuring time: fewer runs where needed, each cell says how many (default: no cap)",
    )
    la.add_argument("--json", action="store_true")
    la.set_defaults(func=_cmd_latency)

    lt = sub.add_parser(
        "latency-table",
        help="measure the per-layer latency table a latency_budget_ms job prunes by, on this machine, into a file",
    )
    lt.add_argument("--arch", required=True)
    lt.add_argument("--checkpoint", help="the model to prune (needed when it is channel-pruned already)")
    lt.add_argument("--checkpoint-key", help=CHECKPOINT_KEY_HELP)
    lt.add_argument("--num-classes", type=int, help="default: the checkpoint's classifier's outputs")
    lt.add_argument("--image-size", type=int, help="the job's input size (default: the architecture's)")
    lt.add_argument(
        "--backend", default="onnxruntime", help="onnxruntime (default) or torch: as the job's latency_backend"
    )
    lt.add_argument("--threads", type=int, default=1, help="as the job's latency_threads (default: 1)")
    lt.add_argument("--batch-size", type=int, default=1, help="as the job's latency_batch_size (default: 1)")
    lt.add_argument("--channel-multiple", type=int, default=16, help="as the job's channel_multiple (default: 16)")
    lt.add_argument("--out", required=True, help="the table file to write (JSON; must not exist)")
    lt.add_argument("--quiet", action="store_true", help="no progress lines")
    lt.set_defaults(func=_cmd_latency_table)

    ar = sub.add_parser("archs", help="list architecture names (installed packages' own included)")
    ar.add_argument("--timm", action="store_true", help="list every timm model too (over a thousand)")
    ar.set_defaults(func=_cmd_archs)
    _add_service_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BaseException as exc:
        if interrupt.caused_by_interrupt(exc):  # before DG2PFError: an error raised because of Ctrl-C is the interrupt
            print("dg2pf: interrupted; nothing was written", file=sys.stderr)
            return 130
        if isinstance(exc, DG2PFError):
            print(f"dg2pf: error: {exc.message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
