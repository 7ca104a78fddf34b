"""A background loop's failure is logged once per condition, not once per poll."""

import logging

from dg2pf_service.conditions import Conditions


def test_a_lasting_failure_is_logged_once_and_its_end_once(caplog):
    log = logging.getLogger("test.conditions")
    c = Conditions(log)
    caplog.set_level(logging.DEBUG, logger="test.conditions")
    for port in range(100):  # the same condition, whatever number it carries (a port, a pid)
        c.failed("serving", "serving reconcile failed", ConnectionRefusedError(111, f"Connection refused to :{port}"))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert (
        len(errors) == 1 and "Connection refused" in errors[0].getMessage() and "logged once" in errors[0].getMessage()
    )
    assert sum(r.exc_info is not None for r in caplog.records) == 1  # the traceback once, at DEBUG
    c.failed("serving", "serving reconcile failed", OSError(28, "No space left on device"))  # another condition
    c.ok("serving", "serving reconcile")
    c.ok("serving", "serving reconcile")  # already fine: nothing more
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert messages[1:] == [
        "serving reconcile failed: the previous failure repeated 100 times",
        "serving reconcile failed: OSError: [Errno 28] No space left on device (logged once while it lasts)",
        "serving reconcile: working again after 1 failed pass(es)",
    ]
    c.failed("job a", "reconciling job a failed", RuntimeError("x"))  # keys are independent
    c.failed("job b", "reconciling job b failed", RuntimeError("x"))
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 4
