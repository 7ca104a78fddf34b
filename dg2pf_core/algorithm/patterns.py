"""User-supplied name patterns (``include``, ``exclude``, ``sp_blocks``), compiled with RE2.

Python's ``re`` backtracks: a pattern such as ``(.*.*.*)*=`` takes minutes against one long name and
cannot be interrupted, so a single job field could freeze the service that validates it. RE2
matches in time linear in the name, whatever the pattern; the price is that backreferences and
lookarounds are refused, with a message naming the field.
"""

from __future__ import annotations

import functools

import re2

from dg2pf_core.errors import ConfigError

# RE2 logs every refused pattern to stderr by itself; the ConfigError already says it.
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    return re2.compile(pattern, _OPTIONS)


def compile_pattern(pattern: str, field: str):
    """``pattern`` compiled with RE2, or a ConfigError on ``field`` saying why it is refused."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{field}: {pattern!r} is not a regular expression (a string)", field=field)
    try:
        return _compiled(pattern)
    except re2.error as exc:
        why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ConfigError(
            f"{field}: invalid name pattern {pattern!r}: {why} (patterns are matched in linear time by RE2, "
            "which has no backreferences or lookarounds)",
            field=field,
        ) from exc


def search(pattern: str, name: str, field: str) -> bool:
    """``re.search`` semantics: ``pattern`` matches anywhere in ``name``."""
    return compile_pattern(pattern, field).search(name) is not None


def fullmatch(pattern: str, name: str, field: str) -> bool:
    return compile_pattern(pattern, field).fullmatch(name) is not None
