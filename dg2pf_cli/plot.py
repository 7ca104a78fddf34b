"""``dg2pf plot DIR|JOB_ID [--out DIR]``: ``training.png`` and ``layers.png`` of any run, drawn here
from its ``metrics.json`` (``dg2pf_core.io.plots``).

DIR is a run's output directory (``dg2pf prune --out``, ``dg2pf download``; a metrics.json file is
taken too); the PNGs go there unless ``--out`` says otherwise. A job id, when no such directory
exists, is a service job: its metrics.json is fetched over HTTP (``--url``/``--token`` as for the
other remote commands) and the PNGs go to ``./JOB_ID``. Bad input is a ``DG2PFError``: exit 2 and one
line saying what to fix.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from dg2pf_client.cli import DEFAULT_URL
from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import Metrics, MetricsError
from dg2pf_core.io.plots import PlotError, parse_metrics, write_plots

JOB_ID = re.compile(r"[0-9a-f]{32}")


def add_plot_command(sub) -> None:
    """Register ``plot`` on the ``dg2pf`` sub-command parsers ``sub``."""
    pl = sub.add_parser("plot", help="draw training.png and layers.png of a run directory or a service job")
    pl.add_argument(
        "run",
        metavar="DIR|JOB_ID",
        help="a run's output directory (holding metrics.json), or a job id "
        "of the service (looked up when no such directory exists)",
    )
    pl.add_argument("--out", help="directory for the PNGs (default: DIR, or ./JOB_ID for a job)")
    pl.add_argument("--url", help=f"service URL, for a job id (default: $DG2PF_URL or {DEFAULT_URL})")
    pl.add_argument("--token", help="bearer token, for a job id (default: $DG2PF_TOKEN)")
    pl.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    path = Path(args.run).expanduser()
    if path.exists() or not JOB_ID.fullmatch(args.run):
        metrics, default_out = _local(path)
    else:
        metrics, default_out = _remote(args), Path(args.run)
    out = Path(args.out).expanduser() if args.out else default_out
    if out.exists() and not out.is_dir():
        raise PlotError(f"--out {out} is a file; give a directory for the PNGs", field="out")
    try:
        written = write_plots(metrics, out)
    except OSError as exc:
        raise PlotError(
            f"cannot write the plots to {out} ({exc.strerror or exc}); give a writable --out", field="out"
        ) from None
    print(f"wrote {written[0]} and {written[1]}")
    return 0


def _local(path: Path) -> tuple[Metrics, Path]:
    """The metrics of a run directory (or of a metrics.json named directly) and where its PNGs go."""
    if not path.exists():
        raise PlotError(
            f"{path} does not exist: give a run's output directory (holding {Artifacts.METRICS}) or a job id "
            "(32 hex digits)",
            field="run",
        )
    file, folder = (Artifacts(path).metrics, path) if path.is_dir() else (path, path.parent)
    if not file.is_file():
        raise PlotError(
            f"{path} holds no {Artifacts.METRICS}: give the output directory of a finished run (dg2pf prune "
            "--out, dg2pf download) or a job id",
            field="run",
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlotError(f"{file} cannot be read ({getattr(exc, 'strerror', None) or exc})", field="run") from None
    return parse_metrics(text, str(file)), folder


def _remote(args: argparse.Namespace) -> Metrics:
    """A service job's metrics.json, over HTTP (the remote commands' client, URL and token)."""
    import httpx

    from dg2pf_client.cli import CliError, _client
    from dg2pf_client.errors import ApiError

    try:
        with _client(args) as client:
            return client.metrics(args.run)
    except httpx.InvalidURL as exc:
        raise PlotError(
            f"cannot reach the dg2pf service at {args.url}: {exc} (give --url or set DG2PF_URL)", field="url"
        ) from None
    except CliError as err:
        raise PlotError(err.message, field=err.field or "url") from None
    except ApiError as err:
        if err.type == "unreachable":
            raise PlotError(f"{err.message} (give --url or set DG2PF_URL)", field="url") from None
        raise PlotError(f"job {args.run}: {err.message}", field=err.field or "run") from None
    except MetricsError as err:  # the service sent something that is not a run's metrics.json
        raise PlotError(str(err), field="run") from None
