"""Hugging Face model directories in the checkpoint store (jobs with ``arch: hf``).

A model directory reaches the store two ways: named by path under ``DG2PF_DATA_ROOTS`` (``pinning``
opens each file with the checks a checkpoint file gets) or uploaded to POST /checkpoints as a zip of
the directory (``archive_members``; ``dg2pf-client upload DIR`` zips it). Either way only its three
files are taken (anything else in the directory or zip is never read): ``config.json``,
``model.safetensors`` and, when present, ``preprocessor_config.json``. They are copied into a staging
folder, addressed by the content of all three (the sha256 of their names and sha256s: the same files
get the same id by either way), checked (the config's refusals: remote code, a model type with no
image classifier, a backbone; the weights file as an upload is checked), and moved into the store as
one directory, registered with format ``hf``. Nothing is registered before it is checked, and a
copy a stopped API left half done is removed at the next start (``uploads.clean_partial_uploads``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from dg2pf_core.errors import CheckpointError, DG2PFError
from dg2pf_core.models import hf

from .settings import Settings
from .store.models import CheckpointRow
from .store.repo import JobStore
from .uploads import MODEL_DIR_FILES as FILES
from .uploads import MODEL_DIR_LOCK as LOCK
from .uploads import MODEL_DIR_PREFIX as DIR_PREFIX
from .uploads import UploadRefused, archive_members, check_checkpoint_file, staging_dir

REQUIRED = (hf.CONFIG, hf.WEIGHTS)
CHUNK = 1 << 20

# name -> an open binary file of that member (the caller's checks done), or None when it is absent
Opener = Callable[[str], AbstractContextManager[BinaryIO] | None]


def store_from_archive(path: Path, filename: str, settings: Settings, store: JobStore) -> tuple[CheckpointRow, bool]:
    """``store_model_dir`` of the model directory zipped in ``path`` (an upload called ``filename``)."""
    members = archive_members(path)
    if members is None:
        raise CheckpointError(f"{filename} is not a zipped model directory")
    limit = settings.max_uncompressed_bytes or 4 * settings.max_upload_bytes
    try:
        with zipfile.ZipFile(path) as archive:

            def opener(name: str):
                info = members.get(name)
                return None if info is None else archive.open(info)

            return store_model_dir(opener, filename, settings, store, limit)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        # a corrupt member (CRC, truncated), an unsupported compression or an encrypted member
        raise CheckpointError(f"{filename}: a file of the zip cannot be read: {str(exc)[:200]}") from None


def store_model_dir(
    opener: Opener, shown_as: str, settings: Settings, store: JobStore, limit: int
) -> tuple[CheckpointRow, bool]:
    """Stage, address, check and register a model directory whose files ``opener`` gives; ``limit``:
    the most bytes of the three together. The row and whether it is new (the same files before: the
    existing row)."""
    staging = staging_dir(settings)
    staging.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=staging, prefix=DIR_PREFIX))
    try:
        with open(work / LOCK, "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a live copy: clean_partial_uploads of another process keeps it
            digest, total = hashlib.sha256(), 0
            for name in FILES:
                source = opener(name)
                if source is None:
                    if name in REQUIRED:
                        raise CheckpointError(
                            f"checkpoint directory {shown_as!r} holds no {name}: a Hugging Face model directory "
                            f"(arch hf) holds {', '.join(FILES)}"
                        )
                    continue  # no processor config: ImageNet's preprocessing (docs/cli.md)
                with source as src:
                    sha, size = _copy(src, work / name, limit - total)
                total += size
                digest.update(f"{name}\0{sha}\n".encode())
            sha = digest.hexdigest()
            existing = store.get_checkpoint(sha[:32])
            if existing is not None:
                return existing, False
            try:
                hf.checked(work)  # the config's and the processor's refusals, before anything is registered
                kind = check_checkpoint_file(work / hf.WEIGHTS, f"{shown_as}/{hf.WEIGHTS}", settings)
                if kind != "safetensors":
                    raise CheckpointError(f"{shown_as}: its {hf.WEIGHTS} is not a safetensors file")
            except UploadRefused as exc:
                raise CheckpointError(exc.message) from None
            except DG2PFError as exc:
                raise CheckpointError(exc.message.replace(str(work), shown_as)) from None
            final = settings.checkpoints_dir / sha[:32]
            if not final.exists():
                try:
                    os.replace(work, final)
                    (final / LOCK).unlink()
                except OSError:
                    if not final.is_dir():  # not the same files stored meanwhile by another request
                        raise
            row = store.add_checkpoint(sha, total, str(final), "hf")
            return row, True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _copy(src: BinaryIO, dest: Path, limit: int) -> tuple[str, int]:
    """Copy ``src`` to ``dest``: its sha256 and size; CheckpointError past ``limit`` bytes."""
    digest, size = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise CheckpointError(
                    "the model directory's files are over this service's size limit together "
                    "(DG2PF_MAX_UPLOAD_BYTES; DG2PF_MAX_UNCOMPRESSED_BYTES for an archive), or grew while copied"
                )
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size
