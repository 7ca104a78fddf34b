"""Recognising Ctrl-C when a library has wrapped it.

Ctrl-C raises ``KeyboardInterrupt`` wherever Python happens to be. When that is inside a C extension's
module initialisation (pybind11's, as scipy's HiGHS wrapper imported by scikit-learn), the import
machinery reports ``ImportError: initialization failed`` raised *from* the interrupt; other libraries
chain it the same way from their own ``except BaseException`` blocks. The command line must still end
such a run as an interrupt (one line, status 130), not as a crash with a traceback.
"""

from __future__ import annotations


def caused_by_interrupt(exc: BaseException | None) -> bool:
    """True if ``exc`` is a ``KeyboardInterrupt`` or was raised from or while handling one.

    Follows ``__cause__`` (``raise ... from``) and ``__context__`` (raised inside an ``except``) to the
    root of the chain; a cycle in the chain ends the walk.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return False
