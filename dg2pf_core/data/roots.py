"""Datasets confined to allowed roots (a service's ``DG2PF_DATA_ROOTS``).

A job names a dataset folder under an allowed root; nothing it reads may come from elsewhere:

- ``check_tree`` walks the folder (links not followed) and refuses a symbolic link that resolves
  outside the roots and a hard-linked file (a second name of a file that may live anywhere; copy it
  instead). The service runs it when a job is submitted and the job again when it starts.
- ``confined_open`` opens a file and then checks the file it actually opened (``/proc/self/fd``), so
  a link swapped in after the walk still cannot redirect a read.

Empty ``roots`` means unconfined (the command line reads whatever the user can).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import BinaryIO

from dg2pf_core.errors import DatasetError

_LISTED = 3


def under(path: str, roots: Sequence[str]) -> bool:
    """``path`` (already resolved) is one of ``roots`` or inside one."""
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _real_roots(roots: Sequence[str]) -> list[str]:
    return [os.path.realpath(r) for r in roots]


def check_tree(path: str, roots: Sequence[str]) -> None:
    """Every entry under ``path`` stays inside ``roots``; DatasetError naming the offenders otherwise."""
    if not roots:
        return
    real_roots = _real_roots(roots)
    top = os.path.realpath(path)
    if not under(top, real_roots):
        raise DatasetError(
            f"dataset path {path} resolves to {top}, outside the allowed roots ({', '.join(real_roots)})"
        )
    escaping: list[str] = []
    linked: list[str] = []
    # Links to folders inside the roots are followed (a loader reads through them: every file there
    # is checked too), each real folder once, so link cycles end.
    seen = {top}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        for name in (*dirnames, *filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue  # vanished meanwhile: the loader reports what is missing
            if stat.S_ISLNK(st.st_mode):
                if not under(os.path.realpath(full), real_roots):
                    escaping.append(os.path.relpath(full, top))
                    continue
                try:
                    st = os.stat(full)
                except OSError:
                    continue  # a dangling link: nothing to read through it
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                linked.append(os.path.relpath(full, top))
        kept = []
        for name in dirnames:
            real = os.path.realpath(os.path.join(dirpath, name))
            if real not in seen and under(real, real_roots):
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
    if escaping:
        raise DatasetError(
            f"dataset {path}: {_some(escaping)} symbolic link(s) lead outside the allowed roots "
            f"({', '.join(real_roots)}); copy the data in instead of linking to it"
        )
    if linked:
        raise DatasetError(
            f"dataset {path}: {_some(linked)} file(s) are hard links (a second name of a file that may live "
            "outside the allowed roots); copy them instead of linking"
        )


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED]) + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
    return f"{len(items)} ({shown})"


def confined_open(path: str | os.PathLike, roots: Sequence[str]) -> BinaryIO:
    """``open(path, "rb")`` of a regular file, refused (DatasetError) when it lies outside ``roots``.

    With ``roots``: a path that resolves outside them is refused before it is opened (whether a file
    exists out there is not told); the file is opened without blocking (a FIFO swapped in cannot hang
    the reader) and must be a regular file once open; the file actually opened (``/proc/self/fd``) must
    lie inside the roots, and must not be a second name (hard link) of a file that may live elsewhere."""
    path = os.fsdecode(path)  # str, bytes or a path-like: one text to check and to name
    if "\0" in path:
        raise DatasetError(f"{path!r} holds a NUL character; it is not read")
    real_roots = _real_roots(roots) if roots else []
    if roots and not under(os.path.realpath(path), real_roots):
        raise DatasetError(f"{path} is outside the allowed roots; it is not read")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatasetError(f"{path} is not a regular file; it is not read")
        if roots:
            proc = f"/proc/self/fd/{fd}"
            opened = os.path.realpath(proc if os.path.exists(proc) else path)
            if not under(opened, real_roots):
                raise DatasetError(f"{path} leads to {opened}, outside the allowed roots; it is not read")
            if info.st_nlink > 1:
                raise DatasetError(
                    f"{path} is a hard link (a second name of a file that may live outside the allowed roots); "
                    "it is not read"
                )
        fh = os.fdopen(fd, "rb")
        fh.raw.name = path  # as open(path) names it: readers quote fh.name in their messages
        return fh
    except BaseException:
        os.close(fd)
        raise
