"""Background loops' failures, logged once per condition instead of once per poll.

A loop that polls every few seconds (the scheduler, the serving supervisor, the MLflow tracker) meets the
same failure on every pass while a condition lasts (Ray unreachable, the disk full, the database locked):
logging each pass buried the log in hundreds of identical tracebacks. ``Conditions`` logs a failure the
first time it is seen (one line, with the traceback at DEBUG), says how often it repeated when it changes
or clears, and says when it cleared.
"""

from __future__ import annotations

import logging
import re
import threading

_NUMBERS = re.compile(r"0x[0-9a-f]+|\d+")


def reason_of(exc: BaseException) -> str:
    """One line for a failure: a DG2PFError's own message, else the type and the text."""
    from dg2pf_core.errors import DG2PFError

    if isinstance(exc, DG2PFError):
        return exc.message
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:1000]


class Conditions:
    """Per key (what failed: "serving", "job <id>"), the condition it is in now, logged on change only."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._now: dict[str, tuple[str, int]] = {}  # key -> (condition's shape, passes it lasted)
        self._lock = threading.Lock()

    def failed(self, key: str, what: str, exc: BaseException) -> None:
        """``what`` (e.g. "serving reconcile failed") with ``exc``: logged when the key enters this condition."""
        reason = reason_of(exc)
        shape = _NUMBERS.sub("#", reason)  # a port, a pid or a count that differs does not make a new condition
        with self._lock:
            before = self._now.get(key)
            if before is not None and before[0] == shape:
                self._now[key] = (shape, before[1] + 1)
                return
            self._now[key] = (shape, 1)
        if before is not None and before[1] > 1:
            self.log.warning("%s: the previous failure repeated %d times", what, before[1])
        self.log.error("%s: %s (logged once while it lasts)", what, reason)
        self.log.debug("%s", what, exc_info=exc)

    def ok(self, key: str, what: str) -> None:
        """The key works again: say so once, with how long the failure lasted."""
        with self._lock:
            before = self._now.pop(key, None)
        if before is not None:
            self.log.warning("%s: working again after %d failed pass(es)", what, before[1])
