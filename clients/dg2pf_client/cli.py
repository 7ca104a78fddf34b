"""``dg2pf`` commands that talk to a dg2pf service: submit, status, jobs, cancel, download, upload,
deploy, models, undeploy, predict.

They need only this package (httpx, pydantic), so they answer at once. This module is the ``dg2pf``
console script of both installs. The full ``dg2pf`` package adds the commands that run on this machine
(prune, evaluate, serve, ...; they need torch) as a plug-in: the entry point ``local`` of group
``dg2pf.commands``, a ``run(argv) -> int`` for every command but the service ones. This package looks
the plug-in up by that name only, so it never depends on the package that provides it.

Bad input exits with status 2 and one line saying what to fix (the service's refusals included);
Ctrl-C with one line and status 130.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .interrupt import caused_by_interrupt, install

REMOTE_COMMANDS = (
    "submit",
    "status",
    "jobs",
    "cancel",
    "download",
    "upload",
    "deploy",
    "models",
    "undeploy",
    "predict",
)
# The full package's: named here only to say where they are when this package is alone.
LOCAL_COMMANDS = (
    "example",
    "init",
    "prune",
    "evaluate",
    "tune",
    "latency",
    "quantize",
    "latency-table",
    "archs",
    "plot",
    "demo",
    "serve",
    "cluster",
)
# Where a package installed beside this one plugs in the commands that run on this machine.
PLUGIN_GROUP, PLUGIN_NAME = "dg2pf.commands", "local"
DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """Bad input found on this side, before anything is sent: exit 2 with the message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, like every other bad input (the full usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version_line() -> str:
    return f"dg2pf {__version__}"


def _client(args: argparse.Namespace):
    """The client of ``--url``/``$DG2PF_URL`` with ``--token``/``$DG2PF_TOKEN``, both checked first."""
    from urllib.parse import urlsplit

    from .client import Client

    url = args.url or os.environ.get("DG2PF_URL") or DEFAULT_URL
    where = "--url" if args.url else ("DG2PF_URL" if os.environ.get("DG2PF_URL") else "the default URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError as exc:
        raise CliError(f"{where} {url!r} is not a URL ({exc})", field="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"{where} {url!r} is not an http(s) URL with a host (e.g. {DEFAULT_URL})", field="url")
    token = args.token or os.environ.get("DG2PF_TOKEN")
    if token is not None and not (token.isascii() and token.isprintable()):
        raise CliError(
            "the token (--token or DG2PF_TOKEN) must be printable ASCII, as bearer tokens are", field="token"
        )
    return Client(url, token=token)


def _load_json(text: str, what: str) -> object:
    """``text`` as strict JSON (no NaN/Infinity, which the service refuses and cannot be sent)."""

    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise CliError(f"{what} is nested too deeply to be a job spec or a batch") from None


def _fail(message: str) -> int:
    # One line whatever the message holds, control characters escaped (a service's message may echo input).
    line = " ".join(message.split())
    print(f"dg2pf: error: {''.join(c if c.isprintable() else repr(c)[1:-1] for c in line)}", file=sys.stderr)
    return 2


def _one_line_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The service's refusals and local bad input become exit 2 with their message, in one line."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from .errors import ApiError, WaitTimeout

        try:
            return fn(args)
        except (ApiError, CliError) as exc:
            if caused_by_interrupt(exc):  # an error raised because of Ctrl-C is the interrupt
                raise KeyboardInterrupt from exc
            unreachable = getattr(exc, "type", None) == "unreachable" and not getattr(args, "url", None)
            hint = " (give --url or set DG2PF_URL)" if unreachable else ""
            return _fail(exc.message + (f" ({exc.field})" if exc.field else "") + hint)
        except WaitTimeout as exc:
            _fail(str(exc))
            return 1
        except OSError as exc:  # a local file or folder (the service's answers are ApiErrors)
            if caused_by_interrupt(exc):
                raise KeyboardInterrupt from exc
            return _fail(str(exc))

    return run


# --- what the commands print ---


def _print_job(job) -> None:
    print(job.summary())
    _print_result(job)


def _print_result(job) -> None:
    m = job.best_metrics or {}
    if m.get("test_top1") is not None:
        print(
            f"  test top-1 {m.get('baseline_test_top1', float('nan')):.2f}% dense -> {m['test_top1']:.2f}% pruned; "
            f"params nonzero {m.get('params_nonzero')}/{m.get('params_total')}"
        )
    speed = ((m.get("latency") or {}).get("speedup")) or {}
    if speed:
        cells = ", ".join(f"{b} batch {n} {x:.2f}x" for b, by in speed.items() for n, x in by.items() if x is not None)
        print(f"  measured speed-up dense -> pruned: {cells} (MACs ratio {m['latency'].get('macs_ratio') or 0:.3f}x)")
    objective = m.get("objective") or {}
    if objective:
        print(f"  chosen: {objective.get('reason')} ({objective.get('trials')} trials; pareto.json has every one)")
    budget = m.get("latency_objective") or {}
    if budget and not objective:
        measured = budget.get("measured_ms")
        print(
            f"  latency budget {budget.get('budget_ms'):g} ms ({budget.get('backend')}): measured "
            + ("-" if measured is None else f"{measured:.4g} ms")
            + f", the table predicted {budget.get('predicted_ms', float('nan')):.4g} ms"
        )
    for warning in m.get("warnings") or []:
        print(f"  warning: {warning}")
    if job.error:
        print(f"  error: {job.error.type}: {job.error.message}")


def _read_spec(path: str) -> dict:
    """A job spec file as the dict to send (``dg2pf_contract.job.read_job_file``: JSON, or YAML when PyYAML
    is installed); ``Client.submit`` checks it as a JobSpec before sending."""
    from dg2pf_contract.job import JobFileError, read_job_file

    try:
        return read_job_file(path)
    except JobFileError as exc:
        raise CliError(exc.message, field=exc.field) from None


# --- the commands ---


@_one_line_errors
def _cmd_submit(args: argparse.Namespace) -> int:
    spec = _read_spec(args.spec)
    with _client(args) as client:
        submitted = client.submit(spec)
        print(f"submitted {submitted.id}", flush=True)
        if not args.wait:
            return 0
        try:
            job = client.wait(submitted.id, on_update=lambda j: print(j.summary(), flush=True))
        except KeyboardInterrupt:
            print(
                f"dg2pf: interrupted; job {submitted.id} goes on in the service (dg2pf cancel {submitted.id} stops it)",
                file=sys.stderr,
            )
            return 130
        _print_result(job)
        return 0 if job.state == "succeeded" else 1


@_one_line_errors
def _cmd_status(args: argparse.Namespace) -> int:
    if args.follow:
        return _follow(args)
    with _client(args) as client:
        job = client.get(args.id)
    if args.json:
        print(job.model_dump_json(indent=2))
    else:
        _print_job(job)
    return 0


def _follow(args: argparse.Namespace) -> int:
    """``status ID --follow``: a line per state change and per epoch until the job ends (``--json``: each
    event as one JSON line); exit 0 if it succeeded, 1 if it failed or was cancelled."""
    job = None
    try:
        with _client(args) as client:
            for event in client.events(args.id):
                print(event.model_dump_json() if args.json else event.summary(), flush=True)
                job = event.job or job
    except KeyboardInterrupt:
        print(
            f"dg2pf: stopped following; job {args.id} goes on in the service (dg2pf cancel {args.id} stops it)",
            file=sys.stderr,
        )
        return 130
    if job is None:  # no state event at all: not something the service sends
        return _fail(f"the service sent no state for job {args.id}")
    if not args.json:
        _print_result(job)
    return 0 if job.state == "succeeded" else 1


@_one_line_errors
def _cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list(state=args.state, limit=args.limit)
    for job in page.items:
        print(f"{job.id}  {job.state:<9} {job.phase:<15} {job.target}  {job.name or ''}")
    print(f"({len(page.items)} of {page.total})")
    return 0


@_one_line_errors
def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_job(client.cancel(args.id))
    return 0


@_one_line_errors
def _cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for path in client.download(args.id, args.out or args.id):
            print(path)
    return 0


@_one_line_errors
def _cmd_upload(args: argparse.Namespace) -> int:
    from dg2pf_contract.artifacts import Artifacts

    path = Path(args.file)
    if not path.exists():
        raise CliError(f"no such file: {args.file}", field="file")
    if path.is_dir():
        missing = [n for n in (Artifacts.HF_CONFIG, Artifacts.MODEL) if not (path / n).is_file()]
        if missing:
            raise CliError(
                f"{args.file} is a directory without {' and '.join(missing)}: give a checkpoint file, or a Hugging "
                f"Face model directory ({', '.join(Artifacts.MODEL_DIR)})",
                field="file",
            )
    elif not path.is_file():
        raise CliError(f"{args.file} is not a regular file: give a checkpoint file", field="file")
    with _client(args) as client:
        ckpt = client.upload_checkpoint(path)
    if args.json:
        print(ckpt.model_dump_json(indent=2))
    else:  # the id first: a job spec's model.checkpoint (or teacher)
        print(f"{ckpt.id}  {path.name}  {ckpt.bytes:,} bytes  sha256 {ckpt.sha256}")
    return 0


@_one_line_errors
def _cmd_deploy(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.deploy(args.id, wait=not args.no_wait, timeout=args.timeout)
    print(f"{model.id}  {model.status}  {model.url}")
    return 0


@_one_line_errors
def _cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.models()
    for model in page.items:
        print(model.summary())
    print(f"({len(page.items)} deployed; Serve at {page.serve_url})")
    return 0


@_one_line_errors
def _cmd_undeploy(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.undeploy(args.id)
    print(f"undeployed {args.id}")
    return 0


@_one_line_errors
def _cmd_predict(args: argparse.Namespace) -> int:
    if bool(args.images) == bool(args.inputs):
        raise CliError(
            "give image files, or --inputs FILE.json with a batch of tensors "
            f"({'not both' if args.images else 'neither was given'})",
            field="images",
        )
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise CliError(f"no such image file: {', '.join(missing)}", field="images")
    inputs = None
    if args.inputs:
        try:
            doc = _load_json(Path(args.inputs).read_text(), str(args.inputs))
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read {args.inputs}: {exc}", field="inputs") from exc
        inputs = doc["inputs"] if isinstance(doc, dict) and "inputs" in doc else doc
    with _client(args) as client:
        out = client.predict(args.id, inputs=inputs, images=args.images or None, top_k=args.top_k)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    names = args.images or [f"input {i}" for i in range(len(out["predictions"]))]
    for name, preds in zip(names, out["predictions"]):
        ranked = ", ".join(
            f"{p['label'] if p['label'] is not None else p['index']} ({p['probability']:.1%})" for p in preds
        )
        print(f"{name}: {ranked}")
    return 0


def add_remote_commands(sub) -> None:
    """The service commands, as subcommands of ``sub`` (this package's parser, or the full package's)."""

    def client_parser(name: str, help_: str) -> argparse.ArgumentParser:
        cp = sub.add_parser(name, help=help_)
        cp.add_argument("--url", help=f"service URL (default: $DG2PF_URL or {DEFAULT_URL})")
        cp.add_argument("--token", help="bearer token (default: $DG2PF_TOKEN)")
        return cp

    sb = client_parser("submit", "submit a job spec (JSON, or YAML with PyYAML) to the service")
    sb.add_argument("spec")
    sb.add_argument("--wait", action="store_true", help="follow the job until it ends (a line per change)")
    sb.set_defaults(func=_cmd_submit)
    st = client_parser("status", "show a job")
    st.add_argument("id")
    st.add_argument("--json", action="store_true", help="the job as JSON (with --follow: one JSON line per event)")
    st.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="stream the job's events live until it ends: a line per state change and per epoch",
    )
    st.set_defaults(func=_cmd_status)
    js = client_parser("jobs", "list jobs")
    js.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    js.add_argument("--limit", type=int, default=50)
    js.set_defaults(func=_cmd_jobs)
    cn = client_parser("cancel", "cancel a queued or running job")
    cn.add_argument("id")
    cn.set_defaults(func=_cmd_cancel)
    dl = client_parser("download", "download a job's artifacts")
    dl.add_argument("id")
    dl.add_argument("--out", help="directory (default: ./ID)")
    dl.set_defaults(func=_cmd_download)
    up = client_parser(
        "upload",
        "upload a checkpoint (.safetensors or a torch state_dict, or a Hugging Face model directory for arch hf); "
        "prints its id for a job spec",
    )
    up.add_argument("file")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=_cmd_upload)
    de = client_parser("deploy", "deploy a succeeded job's pruned model on Ray Serve")
    de.add_argument("id")
    de.add_argument("--no-wait", action="store_true", help="return without waiting for the model to answer")
    de.add_argument("--timeout", type=float, default=300.0)
    de.set_defaults(func=_cmd_deploy)
    ms = client_parser("models", "list deployed models and their URLs")
    ms.set_defaults(func=_cmd_models)
    ud = client_parser("undeploy", "stop serving a model")
    ud.add_argument("id")
    ud.set_defaults(func=_cmd_undeploy)
    pd = client_parser("predict", "send images (PNG/JPEG) or tensors to a deployed model")
    pd.add_argument("id", help="model id (the job id)")
    pd.add_argument("images", nargs="*", help="image files")
    pd.add_argument("--inputs", help='JSON file: {"inputs": [...]} or a list of C x H x W nested lists')
    pd.add_argument("--top-k", type=int, default=5)
    pd.add_argument("--json", action="store_true", help="print the raw response")
    pd.set_defaults(func=_cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="dg2pf",
        description="The dg2pf service from the command line (the light client, "
        "dg2pf-client). The commands that prune on this machine (example, prune, evaluate, serve, ...) "
        "come with the full dg2pf package (`pip install .` in the repository)",
    )
    p.add_argument("--version", action="version", version=version_line())
    add_remote_commands(p.add_subparsers(dest="command", required=True, parser_class=OneLineParser))
    return p


def local_command_line() -> Callable[[list[str]], int] | None:
    """The ``run(argv) -> int`` of the commands that run on this machine, if an installed package plugs
    one in (the full dg2pf package does); None for this package alone. Loading it imports no torch."""
    from importlib.metadata import entry_points

    for plugin in entry_points(group=PLUGIN_GROUP, name=PLUGIN_NAME):
        return plugin.load()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*REMOTE_COMMANDS, "--version"):
        local = local_command_line()
        if local is not None:  # its parser has every command (--help lists them all)
            return local(argv)
        if argv and argv[0] in LOCAL_COMMANDS:
            return _fail(
                f"`dg2pf {argv[0]}` runs on this machine and comes with the full dg2pf package (torch, Ray: "
                "`pip install .` in the repository); this light client has the service commands: "
                + ", ".join(REMOTE_COMMANDS)
            )
    args = build_parser().parse_args(argv)
    return args.func(args)


def stop_quietly_on_broken_pipe() -> int:
    """The reader of our output went away (``dg2pf jobs | head``): as for any command line tool, stop
    quietly. stdout is pointed at /dev/null so the interpreter's final flush cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, as a shell reports a process a broken pipe ended


def run(argv: Sequence[str] | None = None) -> int:
    """The ``dg2pf`` console script (of dg2pf-client, and of the full package, whose commands plug in)."""
    install()  # Ctrl-C is noted before it is raised: a library that loses the KeyboardInterrupt cannot hide it
    try:
        return main(argv)
    except BrokenPipeError:
        return stop_quietly_on_broken_pipe()
    except BaseException as exc:
        if not caused_by_interrupt(exc):
            raise
        print("dg2pf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(run())
