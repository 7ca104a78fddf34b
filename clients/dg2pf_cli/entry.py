"""The ``dg2pf`` console script and ``python -m dg2pf_cli``.

The commands that talk to a service (``dg2pf_client.cli``: submit, status, jobs, ...) and ``--version``
run without importing torch, so they answer at once. The others import torch, which takes seconds;
Ctrl-C in that time must end like Ctrl-C later: one line and status 130, not a traceback from inside
an import. So this module imports nothing heavy itself and catches the interrupt around the import as
well as the command.
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
        # The reader of our output went away (`dg2pf archs | head`): as for any command line tool, stop
        # quietly; stdout is pointed at /dev/null so the interpreter's final flush cannot fail again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a process a broken pipe ended
    except BaseException as exc:
        if not caused_by_interrupt(exc):
            raise
        print("dg2pf: interrupted; nothing was written", file=sys.stderr)
        return 130
