"""Pinning a checkpoint a job names by path: the job reads a checked copy in the checkpoint store.

A path is checked when the job is submitted, but the job reads it later: a file swapped, or made a
link to somewhere else, in between would otherwise be read unchecked. So the file is opened once,
the file actually opened is checked (inside ``DG2PF_DATA_ROOTS``, a regular file, not hard-linked,
within the upload size limit), and copied from that open descriptor into the checkpoint store,
content-addressed and registered like an upload; the job gets the copy's path.

A Hugging Face model directory (``arch: hf``) is pinned the same way, file by file: its config.json,
model.safetensors and preprocessor_config.json (nothing else of it is read) are each opened and checked
as above and copied into one store directory, addressed by the content of all three.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from dg2pf_core.data.roots import under
from dg2pf_core.errors import CheckpointError
from dg2pf_core.models import hf

from .model_dirs import store_model_dir
from .settings import Settings
from .store.repo import JobStore
from .uploads import UploadRefused, check_checkpoint_file, staging_dir

CHUNK = 1 << 20


def pin_checkpoint(path: Path, settings: Settings, store: JobStore) -> str:
    """The store's path of a checked copy of ``path``: a weights file, or a Hugging Face model directory
    (see ``pin_model_dir``). CheckpointError naming what is wrong."""
    roots = [os.path.realpath(r) for r in settings.data_roots]
    if path.is_absolute() and under(os.path.realpath(path), roots) and os.path.isdir(os.path.realpath(path)):
        return pin_model_dir(path, settings, store)
    return pin_file(path, settings, store)


def pin_file(path: Path, settings: Settings, store: JobStore) -> str:
    """The store's path of a checked copy of ``path`` (CheckpointError naming what is wrong).

    Nothing outside the roots is opened, and refusals of such paths all read the same, so they tell
    nothing about what exists there or where links lead. The copy gets the check an upload gets (its
    declared in-memory size, loadable weights) before it is registered.
    """
    fd = _open_checked(path, settings)
    try:
        return _copy_into_store(fd, str(path), settings, store)
    finally:
        os.close(fd)


def _open_checked(path: Path, settings: Settings, what: str = "checkpoint file") -> int:
    """A read descriptor of the regular file ``path`` (not a link, not hard-linked, inside the roots,
    within the upload limit): the file actually opened is the one checked."""
    roots = [os.path.realpath(r) for r in settings.data_roots]
    outside = CheckpointError(
        f"checkpoint path {str(path)!r} is not a file under DG2PF_DATA_ROOTS "
        f"({', '.join(roots) or 'none set'}); or give an id from POST /checkpoints"
    )
    if not path.is_absolute() or not under(os.path.realpath(path), roots):
        raise outside
    resolved = os.path.realpath(path)
    try:
        # No link is followed now (O_NOFOLLOW on the resolved path: one swapped in meanwhile fails), and
        # a FIFO or device neither blocks nor is read (O_NONBLOCK; refused below as not a regular file).
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {str(path)!r} does not exist") from None
    except OSError:
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be opened by the service (a link replaced meanwhile, a directory, "
            "or no read permission)"
        ) from None
    try:
        opened = os.path.realpath(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else resolved
        if not under(opened, roots):
            raise outside
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"checkpoint path {str(path)!r} is not a regular file")
        if st.st_nlink > 1:
            raise CheckpointError(
                f"{what} {str(path)!r} is a hard link (a second name of a file that may live "
                "outside the allowed roots); copy it instead of linking"
            )
        if st.st_size > settings.max_upload_bytes:
            raise CheckpointError(
                f"{what} {str(path)!r} has {st.st_size} bytes, over DG2PF_MAX_UPLOAD_BYTES "
                f"({settings.max_upload_bytes})"
            )
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def pin_model_dir(path: Path, settings: Settings, store: JobStore) -> str:
    """The store's directory holding checked copies of a Hugging Face model directory's files
    (``model_dirs.FILES``; nothing else of it is read), each opened as ``_open_checked`` opens a file."""

    def opener(name: str):
        try:
            fd = _open_checked(path / name, settings, f"{name} of the model directory")
        except CheckpointError as exc:
            if "does not exist" not in exc.message:
                raise
            if name == hf.WEIGHTS:
                pickled = hf.pickled_weights(os.listdir(path))
                if pickled:
                    raise CheckpointError(
                        f"checkpoint directory {str(path)!r} holds no {name}: its weights are pickled "
                        f"({', '.join(pickled[:3])}), which dg2pf never opens; re-save them with "
                        "save_pretrained(safe_serialization=True)"
                    ) from None
            return None
        return os.fdopen(fd, "rb")

    row, _ = store_model_dir(opener, str(path), settings, store, settings.max_upload_bytes)
    return row.path


def _copy_into_store(fd: int, shown_as: str, settings: Settings, store: JobStore) -> str:
    staging = staging_dir(settings)  # where uploads are staged: cleaned at start-up, never read by jobs
    staging.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    out_fd, tmp_name = tempfile.mkstemp(dir=staging, prefix="pin-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(out_fd, "wb") as out, os.fdopen(os.dup(fd), "rb") as src:
            fcntl.flock(out, fcntl.LOCK_EX)  # a live copy: clean_partial_uploads of another process keeps it
            size = 0
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:  # grew while being copied
                    raise CheckpointError(
                        f"checkpoint file grew past DG2PF_MAX_UPLOAD_BYTES ({settings.max_upload_bytes}) "
                        "while it was copied"
                    )
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            sha = digest.hexdigest()
            existing = store.get_checkpoint(sha[:32])
            if existing is not None:
                return existing.path
            try:
                kind = check_checkpoint_file(tmp, shown_as, settings)  # before anything is registered
            except UploadRefused as exc:
                raise CheckpointError(exc.message) from None
            final = settings.checkpoints_dir / f"{sha[:32]}{'.safetensors' if kind == 'safetensors' else '.pt'}"
            os.replace(tmp, final)
            return store.add_checkpoint(sha, size, str(final), kind).path
    finally:
        tmp.unlink(missing_ok=True)
