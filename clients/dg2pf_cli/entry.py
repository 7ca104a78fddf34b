"""The ``dg2pf`` console script and ``python -m dg2pf_cli``.

Importing the command line takes seconds (torch); Ctrl-C in that time must end like Ctrl-C later:
one line and status 130, not a traceback from inside an import. So this module imports nothing
heavy itself and catches the interrupt around the import as well as the command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def run(argv: Sequence[str] | None = None) -> int:
    try:
        from .main import main

        return main(argv)
    except KeyboardInterrupt:
        print("dg2pf: interrupted; nothing was written", file=sys.stderr)
        return 130
