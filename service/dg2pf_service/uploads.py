"""Receiving a checkpoint upload: streamed to a hidden staging folder, bounded in size, time and memory.

The multipart body is parsed as it arrives (never spooled whole first), so an upload over
``max_upload_bytes`` is cut off as soon as the count passes the limit, and a body that stops
sending is aborted after ``upload_idle_timeout_s``. The file goes to ``checkpoints_dir/.partial/``,
where no job ever looks: it is renamed into place only once it has been checked. The check runs in
a worker thread, a bounded number at a time, and refuses files whose declared in-memory size (a
zip's central directory, a safetensors header, a compact artifact's layout) exceeds
``max_uncompressed_bytes`` before anything is inflated.

A staged file is held under an exclusive ``flock`` by the process writing it, so
:func:`clean_partial_uploads` (run at start-up) removes what a killed process left behind, but never
a file another live API process on the same data directory is still receiving.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
import zipfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from dg2pf_contract.artifacts import Artifacts
from dg2pf_core.errors import CheckpointError
from dg2pf_core.io.checkpoints import read_state_dict
from dg2pf_core.io.compact import FORMAT as COMPACT_FORMAT

from .settings import Settings

log = logging.getLogger("dg2pf.uploads")

STAGING = ".partial"
FIELD = "file"
# A Hugging Face model directory (arch hf): the files taken of it (model_dirs), and how one being staged
# is named and locked while it is copied.
MODEL_DIR_FILES = Artifacts.MODEL_DIR
MODEL_DIR_PREFIX = "pin-dir-"
MODEL_DIR_LOCK = ".lock"
# Multipart framing (boundaries, part headers, small extra fields) on top of the file itself.
FRAMING_ALLOWANCE = 64 * 1024
# Python's zipfile holds every record of a central directory in memory while it reads it (a ZipInfo
# and its name: about this much each), so a zip's record count counts toward its in-memory size
# and is read first, from the end record alone.
ZIP_RECORD_BYTES = 512
# Old code staged uploads beside the checkpoints as ".upload-*"; they are leftovers too.
_LEGACY_PREFIX = ".upload-"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "C64": 8,
}


class UploadRefused(Exception):
    """An upload the service will not take, described for the user.

    ``body_unread`` says the request body was not read to its end: the connection must then be
    closed with the answer, or the server would go on reading (and discarding) the rest of it.
    """

    def __init__(
        self, status: int, type_: str, message: str, *, field: str | None = FIELD, body_unread: bool = False
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.body_unread = status, type_, message, field, body_unread


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_uncompressed_bytes: int
    idle_timeout_s: float
    total_timeout_s: float
    validations: int

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(
            max_bytes=settings.max_upload_bytes,
            max_uncompressed_bytes=settings.max_uncompressed_bytes or 4 * settings.max_upload_bytes,
            idle_timeout_s=settings.upload_idle_timeout_s,
            total_timeout_s=settings.upload_timeout_s,
            validations=settings.upload_validations,
        )


@dataclass(frozen=True)
class StagedFile:
    """A received file in the staging folder: what the client called it, its digest and size."""

    path: Path
    filename: str
    sha256: str
    size: int


def staging_dir(settings: Settings) -> Path:
    return settings.checkpoints_dir / STAGING


def clean_partial_uploads(settings: Settings) -> list[Path]:
    """Remove uploads a stopped or killed API left unfinished (never checked, never visible to jobs).

    Files another live process still writes (it holds their lock) are kept. Returns what was removed.
    """
    candidates: list[Path] = []
    staging = staging_dir(settings)
    if staging.is_dir():
        candidates += [p for p in staging.iterdir() if p.is_file()]
    if settings.checkpoints_dir.is_dir():
        candidates += [p for p in settings.checkpoints_dir.glob(f"{_LEGACY_PREFIX}*") if p.is_file()]
    removed = []
    if staging.is_dir():  # model directories being pinned (pinning.pin_model_dir): live ones hold their lock
        for d in staging.glob(f"{MODEL_DIR_PREFIX}*"):
            try:
                with open(d / MODEL_DIR_LOCK, "rb") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            except OSError:
                pass  # no lock file: finished copying, or never started; not registered either way
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    for path in candidates:
        try:
            with open(path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
        except BlockingIOError:
            continue  # a live upload
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


class CheckpointUploads:
    """The service's upload intake: limits, the staging folder and the slots for checking files."""

    def __init__(self, settings: Settings) -> None:
        self.limits = UploadLimits.from_settings(settings)
        self.staging = staging_dir(settings)
        self._slots = anyio.CapacityLimiter(self.limits.validations)

    @asynccontextmanager
    async def receive(self, chunks: AsyncIterator[bytes], headers: Mapping[str, str]) -> AsyncIterator[StagedFile]:
        """Read a multipart body with one file in the field ``file`` into the staging folder.

        The staged file is removed when the block exits, unless :meth:`publish` moved it. Raises
        :class:`UploadRefused` for a body over the limit (413, also from Content-Length alone), one
        that stalls or takes too long (408), one that is not multipart (422) or malformed (400), and
        one without exactly one non-empty file part (422).
        """
        limits = self.limits
        boundary = _boundary(headers.get("content-type"))
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes + FRAMING_ALLOWANCE:
            raise UploadRefused(
                413,
                "too_large",
                f"the upload ({int(declared)} bytes) exceeds this service's limit of "
                f"{limits.max_bytes} bytes for a checkpoint (DG2PF_MAX_UPLOAD_BYTES)",
                body_unread=True,
            )
        self.staging.mkdir(parents=True, exist_ok=True)
        form = _FileForm(self.staging, limits.max_bytes)
        try:
            await _feed(chunks, form, boundary, limits)
            yield form.staged()
        finally:
            form.discard()

    async def check(self, staged: StagedFile) -> str:
        """The file's kind ("safetensors" or "torch"); refuses one that would expand past
        ``max_uncompressed_bytes`` (413) or does not load as weights (422).

        Runs in a worker thread, at most ``upload_validations`` at a time, so the event loop keeps
        answering (health checks, other requests) and memory stays bounded by that many files.
        """
        return await anyio.to_thread.run_sync(_check, staged.path, staged.filename, self.limits, limiter=self._slots)

    @property
    def slots(self) -> anyio.CapacityLimiter:
        """The slots checking uploads in worker threads (at most ``upload_validations`` at a time)."""
        return self._slots

    @staticmethod
    def publish(staged: StagedFile, final: Path) -> None:
        """Move a checked file into place (same file system: an atomic rename)."""
        os.replace(staged.path, final)


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        shown = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise UploadRefused(
            422,
            "invalid_upload",
            f"POST /checkpoints takes a multipart/form-data body with the weights in "
            f"the field '{FIELD}' (got {shown}); e.g. curl -F {FIELD}=@model.safetensors",
            body_unread=True,
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadRefused(
            400, "malformed_upload", "the multipart/form-data Content-Type has no boundary parameter", body_unread=True
        )
    return boundary


async def _feed(chunks: AsyncIterator[bytes], form: _FileForm, boundary: bytes, limits: UploadLimits) -> None:
    """Pass the body to the multipart parser as it arrives, counting bytes and watching the clock."""
    try:
        parser = MultipartParser(boundary, form.callbacks())
    except FormParserError as e:
        raise UploadRefused(
            400, "malformed_upload", f"the multipart body cannot be parsed: {e}", body_unread=True
        ) from e
    stream = aiter(chunks)
    deadline = anyio.current_time() + limits.total_timeout_s
    received = 0
    while True:
        left = deadline - anyio.current_time()
        with anyio.move_on_after(min(limits.idle_timeout_s, left)) as waited:
            chunk = await anext(stream, None)
        if waited.cancelled_caught:
            if limits.idle_timeout_s < left:
                message = (
                    f"no data arrived for {limits.idle_timeout_s:g} s (DG2PF_UPLOAD_IDLE_TIMEOUT_S), after "
                    f"{received} bytes; the upload was aborted: send it again"
                )
            else:
                message = (
                    f"the upload did not finish within {limits.total_timeout_s:g} s (DG2PF_UPLOAD_TIMEOUT_S), "
                    f"after {received} bytes; send it over a faster link or ask the operator to raise the limit"
                )
            raise UploadRefused(408, "upload_timeout", message, body_unread=True)
        if chunk is None:
            break
        received += len(chunk)
        if received > limits.max_bytes + FRAMING_ALLOWANCE:
            raise UploadRefused(
                413,
                "too_large",
                f"the upload exceeds this service's limit of {limits.max_bytes} bytes "
                "for a checkpoint (DG2PF_MAX_UPLOAD_BYTES)",
                body_unread=True,
            )
        try:
            parser.write(chunk)
        except FormParserError as e:
            raise UploadRefused(
                400, "malformed_upload", f"the multipart body cannot be parsed: {e}", body_unread=True
            ) from e
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UploadRefused(
                507,
                "insufficient_storage",
                "the service has no disk space left for the upload; try again later or tell its operator",
                field=None,
                body_unread=True,
            ) from e
    form.finish()


class _FileForm:
    """Multipart callbacks: the part named ``file`` goes to a staging file, hashed and counted;
    other fields are skipped; a second file part is refused."""

    def __init__(self, staging: Path, max_bytes: int) -> None:
        self.staging, self.max_bytes = staging, max_bytes
        self.digest = hashlib.sha256()
        self.size = 0
        self.filename = ""
        self.path: Path | None = None
        self.out: BinaryIO | None = None
        self.ended = False
        self.published = False
        self._headers: dict[str, str] = {}
        self._field, self._value = b"", b""
        self._writing = False
        self._file_parts: list[str] = []

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _end(self) -> None:
        self.ended = True

    def _part_begin(self) -> None:
        self._headers, self._writing = {}, False

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if name != FIELD and filename is None:
            return  # a plain form field: skipped (its bytes count toward the body's limit)
        self._file_parts.append(name)
        if len(self._file_parts) > 1:
            shown = ", ".join(repr(n) for n in self._file_parts)
            raise UploadRefused(
                422,
                "invalid_upload",
                f"the upload has more than one file part ({shown}); send exactly one, in the field '{FIELD}'",
                body_unread=True,
            )
        if name != FIELD:
            raise UploadRefused(
                422,
                "invalid_upload",
                f"the file was sent in the field {name!r}; send it in the field '{FIELD}'",
                body_unread=True,
            )
        self.filename = os.path.basename((filename or b"").decode("utf-8", "replace")) or "upload"
        suffix = Path(self.filename).suffix.lower()
        # The client's suffix lets the reader point out a misnamed file (".safetensors" holding a pickle).
        self.path = self.staging / f"{uuid.uuid4().hex}{suffix if suffix in _CHECKPOINT_SUFFIXES else '.upload'}"
        self.out = open(self.path, "xb")
        fcntl.flock(self.out, fcntl.LOCK_EX)  # kept until the file is published or removed
        self._writing = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._writing or self.out is None:
            return
        self.size += end - start
        if self.size > self.max_bytes:
            raise UploadRefused(
                413,
                "too_large",
                f"the file exceeds this service's limit of {self.max_bytes} bytes for "
                "a checkpoint (DG2PF_MAX_UPLOAD_BYTES)",
                body_unread=True,
            )
        piece = data[start:end]
        self.digest.update(piece)
        self.out.write(piece)

    def _part_end(self) -> None:
        if self._writing and self.out is not None:
            self.out.flush()
        self._writing = False

    def finish(self) -> None:
        if not self.ended:
            raise UploadRefused(
                400,
                "malformed_upload",
                "the multipart body ended before its closing boundary; the upload was cut short: send it again",
            )
        if self.path is None:
            raise UploadRefused(
                422,
                "invalid_upload",
                f"the upload has no file in the field '{FIELD}'; e.g. curl -F {FIELD}=@model.safetensors",
            )
        if self.size == 0:
            raise UploadRefused(422, "invalid_checkpoint", "the uploaded file is empty")

    def staged(self) -> StagedFile:
        assert self.path is not None
        return StagedFile(self.path, self.filename, self.digest.hexdigest(), self.size)

    def discard(self) -> None:
        """Remove the staged file unless it was published; release its lock."""
        if self.path is not None and self.out is not None:
            try:
                self.path.unlink(missing_ok=True)  # a published file is no longer here
            finally:
                self.out.close()


def _check(path: Path, filename: str, limits: UploadLimits) -> str:
    """Worker-thread body of :meth:`CheckpointUploads.check`: the file's kind, or UploadRefused.

    Never another exception: whatever a crafted file makes a reader raise is a refusal of that file
    (422), its traceback logged, not a server error."""
    try:
        size, what = in_memory_size(path, limits.max_uncompressed_bytes)
        if size > limits.max_uncompressed_bytes:
            raise UploadRefused(
                413,
                "too_large",
                f"{filename} would take {size} bytes in memory ({what}), above this "
                f"service's limit of {limits.max_uncompressed_bytes} bytes (DG2PF_MAX_UNCOMPRESSED_BYTES); "
                "save the weights uncompressed (torch.save or safetensors) or ask the operator to raise the limit",
            )
        if archive_members(path) is not None:
            return "hf"  # a zipped model directory: its files are checked as they are stored (model_dirs)
        read_state_dict(path, any_set=True)  # a file with raw + EMA weights: the job says which (checkpoint_key)
        with open(path, "rb") as f:
            head = f.read(9)
    except UploadRefused:
        raise
    except CheckpointError as exc:
        message = exc.message.replace(str(path), filename)
        raise UploadRefused(
            422, "invalid_checkpoint", message if filename in message else f"{filename}: {message}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.exception("checking the upload %s (%s) failed", filename, path)
        why = _clip(f"{type(exc).__name__}: {exc}".replace(str(path), filename))
        raise UploadRefused(422, "invalid_checkpoint", f"{filename} is not a readable checkpoint: {why}") from exc
    return "safetensors" if head[8:9] == b"{" else "torch"


def archive_members(path: Path) -> dict[str, zipfile.ZipInfo] | None:
    """The model files of a zip holding a model directory (at its root or in one folder; its other files
    are ignored, never extracted), or None when the file is no such zip (a torch.save zip, anything
    else). Raises ``CheckpointError`` for a zip with model files in more than one folder."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [
                i for i in archive.infolist() if not i.is_dir() and i.filename.rpartition("/")[2] in MODEL_DIR_FILES
            ]
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if not any(i.filename.rpartition("/")[2] == Artifacts.HF_CONFIG for i in infos):
        return None
    folders = sorted({i.filename.rpartition("/")[0] for i in infos})
    if len(infos) != len({i.filename for i in infos}):
        raise CheckpointError("the zip holds a model directory's file twice under one name: zip the directory anew")
    if len(folders) != 1:
        raise CheckpointError(
            f"the zip holds a model directory's files in more than one folder ({', '.join(map(repr, folders))}): "
            f"zip one directory ({', '.join(MODEL_DIR_FILES)}), at the zip's root or in one folder"
        )
    return {i.filename.rpartition("/")[2]: i for i in infos}


def in_memory_size(path: Path, ceiling: int) -> tuple[int, str]:
    """How many bytes reading the weights at ``path`` will hold, as the file itself declares it, and how
    that was found; read from headers only, nothing is inflated.

    Zip files (torch.save): the sum of the records' uncompressed sizes in the central directory (the
    reader allocates exactly these) and its records' bookkeeping; when the record count alone passes
    ``ceiling``, the directory is not read. safetensors: the data size its header declares, or for a dg2pf
    compact artifact the dense size of the tensors its layout lists. Anything else (a legacy
    torch.save pickle, whose storages are read from the file itself): the file's size. Python objects
    a pickle or a JSON header builds are not counted; they are bounded by the upload limit.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        # In the reader's order: a safetensors header length can begin with the bytes "PK".
        if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
            return _safetensors_size(f, size)
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return _zip_size(f, path, size, ceiling)
    return size, "the file's size"


def _zip_size(f: BinaryIO, path: Path, size: int, ceiling: int) -> tuple[int, str]:
    directory = (_zip_record_count(f, size) or 0) * ZIP_RECORD_BYTES
    if directory > ceiling:
        return directory, f"the directory of its {directory // ZIP_RECORD_BYTES} zip records alone"
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except Exception:  # noqa: BLE001 - a corrupt zip: the reader refuses it with a proper message
        return size, "the file's size"
    return total + directory, "the uncompressed size its zip directory declares"


def _zip_record_count(f: BinaryIO, size: int) -> int | None:
    """The record count of the end-of-central-directory record (zip64 too), or None if not found."""
    tail_len = min(size, 22 + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    records = int.from_bytes(tail[at + 10 : at + 12], "little")
    if records == 0xFFFF and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
        f.seek(int.from_bytes(tail[at - 12 : at - 4], "little"))
        record = f.read(56)
        if record[:4] == b"PK\x06\x06":
            records = int.from_bytes(record[32:40], "little")
    return records


def _safetensors_size(f: BinaryIO, size: int) -> tuple[int, str]:
    """The data size a safetensors header declares (or its compact layout's dense size). Raises
    CheckpointError for a header the format does not allow, whatever is wrong with it (nesting,
    types, offsets that are not integers within the file): readers given one refuse it by crashing."""
    f.seek(0)
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        return size, "the file's size"  # truncated: the reader refuses it
    data_len = size - 8 - header_len
    try:
        header = json.loads(f.read(header_len))
    except RecursionError as exc:  # e.g. {"a":[[[...]]]} nested 200,000 deep
        raise _malformed("it is nested too deeply") from exc
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of thousands of digits
        raise _malformed(f"it is not JSON ({_clip(str(exc))})") from exc
    if not isinstance(header, dict):
        raise _malformed(f"it is a JSON {type(header).__name__}, not an object of tensors")
    data = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and (
                not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values())
            ):
                raise _malformed("__metadata__ must be an object of strings")
            continue
        if not isinstance(entry, dict):
            raise _malformed(f"tensor {_clip(repr(name))} is a JSON {type(entry).__name__}, not an object")
        offsets, shape = entry.get("data_offsets"), entry.get("shape")
        # type() is int: no bools, no floats (1e400 parses as inf), and end within the data section.
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise _malformed(
                f"tensor {_clip(repr(name))}: data_offsets must be two integers 0 <= begin <= end <= "
                f"{data_len} (the size of the data after the header), got {_clip(repr(offsets))}"
            )
        if not isinstance(entry.get("dtype"), str) or not (
            isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        ):
            raise _malformed(
                f"tensor {_clip(repr(name))}: needs a dtype name and a shape of non-negative integers, "
                f"got dtype {_clip(repr(entry.get('dtype')))}, shape {_clip(repr(shape))}"
            )
        data = max(data, offsets[1])
    meta = header.get("__metadata__") or {}
    if meta.get("format") == COMPACT_FORMAT:
        try:
            dense = _compact_dense_size(meta.get("layout"))
        except (RecursionError, OverflowError) as exc:  # a layout nested too deeply, or a dimension of 1e400
            raise _malformed(f"its compact layout cannot be read ({type(exc).__name__})") from exc
        if dense is not None:
            return max(dense, data), "the dense size of the tensors its compact layout lists"
    return data, "the data size its safetensors header declares"


def _malformed(why: str) -> CheckpointError:
    return CheckpointError(f"malformed safetensors header: {why}")


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _compact_dense_size(layout: object) -> int | None:
    try:
        entries = json.loads(layout) if isinstance(layout, str) else None
        return sum(math.prod(int(d) for d in shape) * _SAFETENSORS_ITEMSIZE[code] for _, _, code, shape in entries)
    except (ValueError, TypeError, KeyError):
        return None  # malformed: the reader refuses it


def check_checkpoint_file(path: Path, shown_as: str, settings: Settings) -> str:
    """The check an upload gets (its declared in-memory size against ``max_uncompressed_bytes``, then
    loadable weights), for a file already on disk: its kind ("safetensors" or "torch"), or UploadRefused."""
    return _check(path, shown_as, UploadLimits.from_settings(settings))
