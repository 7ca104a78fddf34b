"""The commands of the full package, as the ``dg2pf`` console script runs them, and ``python -m dg2pf_cli``.

The console script is the light client's (``dg2pf_client.cli``); this package plugs into it as the
entry point ``local`` of group ``dg2pf.commands`` (pyproject.toml), so the script hands :func:`run`
every command but the service ones. Here the service commands (submit, status, jobs, ...) and
``--version`` go back to ``dg2pf_client.cli`` without importing torch, for ``python -m dg2pf_cli``.

The other commands import torch, which takes seconds; Ctrl-C in that time must end like Ctrl-C later:
one line and status 130, not a traceback from inside an import. So this module imports nothing heavy
itself and catches the interrupt around the import as well as the command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def run(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from dg2pf_client.interrupt import caused_by_interrupt, install  # light: the standard library only

    install()  # Ctrl-C is noted before it is raised: a library that loses the KeyboardInterrupt cannot hide it
    try:
        from dg2pf_client.cli import REMOTE_COMMANDS

        if args and (args[0] in REMOTE_COMMANDS or args[0] == "--version"):
            from dg2pf_client.cli import run as run_remote

            return run_remote(args)
        from .main import main

        return main(args)
    except BrokenPipeError:
        from dg2pf_client.cli import stop_quietly_on_broken_pipe

        return stop_quietly_on_broken_pipe()
    except BaseException as exc:
        if not caused_by_interrupt(exc):
            raise
        print("dg2pf: interrupted; nothing was written", file=sys.stderr)
        return 130
