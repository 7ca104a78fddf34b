"""Recognising Ctrl-C when a library has wrapped it, or swallowed it.

Ctrl-C raises ``KeyboardInterrupt`` wherever Python happens to be. When that is inside a C extension's
module initialisation (pybind11's, as scipy's HiGHS wrapper imported by scikit-learn), the import
machinery reports ``ImportError: initialization failed`` raised *from* the interrupt; other libraries
chain it the same way from their own ``except BaseException`` blocks. Some places lose it altogether:
inside numpy's import as torch loads it (numpy is left half-initialised and a later import fails with
an unrelated error), or inside an import-lock callback, where Python prints "Exception ignored" and
carries on. The command line must end all of these as an interrupt (one line, status 130), not as a
crash with a traceback, nor by running on.

So the console script installs :func:`install`'s handler: it notes the signal before raising, and
:func:`caused_by_interrupt` and :func:`check` consult that note as well as the exception chain.
"""

from __future__ import annotations

import signal

_received = False  # set by the handler install() puts in place; never reset within a process


def _on_sigint(signum, frame) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


def install() -> None:
    """Note SIGINT before raising ``KeyboardInterrupt`` as Python's own handler does. Only where
    Python's handler is in place (the main thread, SIGINT not ignored: a job started in the background
    keeps ignoring it)."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread
        pass


def check() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived and was swallowed on the way (call at points
    where a long command may stop: after loading data, between epochs)."""
    if _received:
        raise KeyboardInterrupt


def caused_by_interrupt(exc: BaseException | None) -> bool:
    """True if SIGINT reached :func:`install`'s handler, or ``exc`` is a ``KeyboardInterrupt``, holds
    one (an exception group), or was raised from or while handling one.

    Follows both ``__cause__`` (``raise ... from``) and ``__context__`` (raised inside an ``except``)
    of every exception in the chain, and the members of exception groups; each exception is visited
    once, so a cycle ends the walk.
    """
    if _received:
        return True
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        todo += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
    return False
