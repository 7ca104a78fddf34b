"""Every image of a folder dataset decoded once before training, so a bad file is named up front.

Without this, a truncated JPEG or a text file saved as ``.png`` surfaces as a bare ``OSError`` in
some DataLoader worker, hours into a run, without the file's name. Decoding a whole dataset is
expensive (ImageNet: 1.3M files), so each file's verdict is cached, keyed by its path, size and
mtime: the next run over unchanged files only stats them.

Cache: ``$DG2PF_CACHE_DIR/imagecheck/<sha256 of the absolute dataset root>.json`` (default
``~/.cache/dg2pf``), written atomically::

    {"format": "dg2pf-imagecheck", "version": 1, "root": "/abs/root",
     "files": {"train/cat/1.jpg": [size, mtime_ns, null | "reason it cannot be read"], ...}}

Paths in ``files`` are relative to ``root``, which the file records; with the file being one per
root, that is the (absolute path, size, mtime_ns) key at half the size. A cache that cannot be
read or parsed is treated as empty and rewritten: it only ever saves time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import PIL.ImageOps

from dg2pf_core.data.roots import confined_open
from dg2pf_core.errors import DatasetError

CACHE_DIR_ENV = "DG2PF_CACHE_DIR"
_FORMAT = "dg2pf-imagecheck"
_VERSION = 1
# Files handed to the thread pool at a time: bounds what is in flight (paths, never pixels)
# whatever the dataset's size.
_CHUNK = 1024


_BOMB_WARNING_FILTER = ("ignore", None, PIL.Image.DecompressionBombWarning, None, 0)
_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_owns_filter = False  # False when the caller had already ignored the warning: theirs stays


@contextmanager
def large_images_expected() -> Iterator[None]:
    """No ``DecompressionBombWarning`` inside: a dataset's large images are decoded on purpose.

    PIL warns for every image over ``MAX_IMAGE_PIXELS`` (89 MP) and refuses those over twice it
    (``DecompressionBombError``, still raised and reported as unreadable). A dataset of large
    scans would otherwise print a warning per image, in the check and again in every loader
    worker. ``warnings.catch_warnings`` cannot do this: it swaps the process-wide filter list, so
    the check's threads, entering and leaving at different times, would restore each other's
    lists; one filter shared by all callers, counted, is taken out when the last one leaves.
    """
    global _quiet_users, _quiet_owns_filter
    with _quiet_lock:
        _quiet_users += 1
        if _quiet_users == 1:
            _quiet_owns_filter = _BOMB_WARNING_FILTER not in warnings.filters
            if _quiet_owns_filter:
                # Not filterwarnings(): it also resets every module's record of warnings already
                # shown, so a warning meant to show once would show again after each image.
                warnings.filters.insert(0, _BOMB_WARNING_FILTER)  # type: ignore[arg-type]
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0 and _quiet_owns_filter:
                try:
                    warnings.filters.remove(_BOMB_WARNING_FILTER)  # type: ignore[arg-type]
                except ValueError:  # the filters were reset meanwhile (catch_warnings exited)
                    pass


def open_image(path: str, roots: Sequence[str] = ()) -> PIL.Image.Image:
    """The image at ``path`` fully decoded, in the mode it was stored in.

    The one way images are read, by the check and by the training loader alike, so that whatever
    passed the check also loads. The mode is kept (unlike torchvision's loader, which converts to
    RGB and so clips 16-bit images): ``transforms.ConvertMode`` adapts it to the model. With
    ``roots``, the file opened must lie inside them (``roots.confined_open``).
    """
    with large_images_expected(), confined_open(path, roots) as f:
        image = PIL.Image.open(f)
        image.load()  # decodes every pixel now, while ``f`` is open: truncation fails here
    return upright(image)


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` as its EXIF orientation says it is shown: phones store a portrait photo's pixels
    sideways with an Orientation tag that every viewer applies. Training, evaluation and serving all
    read images through this, so the model sees what the user sees."""
    orientation = image.getexif().get(0x0112, 1)  # only JPEG, PNG, TIFF and WebP carry one
    if orientation in (None, 1):
        return image
    return PIL.ImageOps.exif_transpose(image)


def load_image(path: str, roots: Sequence[str] = ()) -> PIL.Image.Image:
    """``open_image`` for a dataset's ``__getitem__``: a failure names the file.

    A file the check passed can still change under a running job; the error then says which.
    """
    try:
        return open_image(path, roots)
    except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as exc:
        reason = describe_failure(exc)
        raise DatasetError(f"image {shown_path(path)} cannot be read: {reason}") from exc


def shown_path(path: str) -> str:
    """``path`` for a one-line message: as it is, or quoted with escapes when it holds a newline
    or another control character (legal in file names, and it would break the line)."""
    return path if path.isprintable() else repr(path)


def describe_failure(exc: BaseException) -> str:
    """Why PIL could not read a file, in words, without the file's path (the caller has it)."""
    if isinstance(exc, PIL.UnidentifiedImageError):
        # PIL's message repeats the absolute path, which the caller shows relative to the root
        return "cannot identify image file (not an image, or a format PIL cannot read)"
    if isinstance(exc, PIL.Image.DecompressionBombError):
        return f"too large to decode safely: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read the file: {exc.strerror}"
    # PIL says what is wrong in the message ("image file is truncated", "broken PNG file"); its
    # exception types (OSError, SyntaxError, ...) would tell a user nothing more. Whitespace is
    # collapsed: the reason goes into a one-line error (CLI, job status).
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass(frozen=True)
class UnreadableImage:
    path: str  # as given to find_unreadable_images
    relative_path: str  # to the dataset root, for messages
    reason: str


@dataclass(frozen=True)
class _Verdict:
    path: str
    relative_path: str
    stat: tuple[int, int] | None  # (size, mtime_ns); None when the file could not be stat'ed
    reason: str | None  # None: readable; _PENDING: not decoded yet
    cacheable: bool


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "dg2pf"


def cache_file(root: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the verdicts for the dataset at ``root`` are kept."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(os.path.abspath(root).encode("utf-8", "surrogatepass")).hexdigest()
    return base / "imagecheck" / f"{digest}.json"


def find_unreadable_images(
    root: str,
    paths: Iterable[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> list[UnreadableImage]:
    """The files among ``paths`` (all under ``root``) that PIL cannot fully decode, in order.

    Unchanged files with a cached verdict are only stat'ed. The others are decoded on
    ``workers`` threads (PIL releases the GIL while decoding); one image at a time per thread is
    held, so memory does not grow with the dataset. The cache is rewritten with the verdicts of
    exactly ``paths``, so it holds one entry per file of the dataset's latest check.
    """
    root = os.path.abspath(root)
    target = cache_file(root, cache_dir)
    cached = _read_cache(target, root)
    fresh: dict[str, list] = {}
    changed = False
    bad: list[UnreadableImage] = []
    workers = workers or min(32, os.cpu_count() or 1)
    finished = False
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for chunk in _chunks(paths, _CHUNK):
                # Stat and cache look-ups here, decodes on the pool: a warm check of a million
                # files then costs a million stats, not a million thread hand-offs.
                known = [_known_verdict(path, root, cached) for path in chunk]
                decoded = pool.map(_decoded_verdict, [v for v in known if v.reason is _PENDING])
                for verdict in known:
                    if verdict.reason is _PENDING:
                        verdict = next(decoded)
                    if verdict.reason is not None:
                        bad.append(UnreadableImage(verdict.path, verdict.relative_path, verdict.reason))
                    if verdict.cacheable and verdict.stat is not None:
                        entry = [*verdict.stat, verdict.reason]
                        fresh[verdict.relative_path] = entry
                        changed = changed or cached.get(verdict.relative_path) != entry
        finished = True
    finally:
        if finished:
            if changed or fresh.keys() != cached.keys():  # unchanged: spare rewriting a big file
                _write_cache(target, root, fresh)
        elif fresh:
            # Interrupted (Ctrl-C): keep what was learnt, and the old verdicts not reached yet,
            # so a first check of a big dataset is not started over.
            _write_cache(target, root, {**cached, **fresh})
    return bad


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_PENDING = "<to be decoded>"


def _known_verdict(path: str, root: str, cached: dict[str, object]) -> _Verdict:
    """What is known without decoding: the cached verdict, or reason ``_PENDING``."""
    relative = os.path.relpath(os.path.abspath(path), root)
    try:
        st = os.stat(path)
    except OSError as exc:
        return _Verdict(path, relative, None, describe_failure(exc), cacheable=False)
    stat = (st.st_size, st.st_mtime_ns)
    entry = cached.get(relative)
    if (
        isinstance(entry, list)
        and len(entry) == 3
        and (entry[0], entry[1]) == stat
        and (entry[2] is None or isinstance(entry[2], str))
    ):
        return _Verdict(path, relative, stat, entry[2], cacheable=True)
    if st.st_size == 0:
        return _Verdict(path, relative, stat, "empty file (0 bytes)", cacheable=True)
    return _Verdict(path, relative, stat, _PENDING, cacheable=True)


def _decoded_verdict(pending: _Verdict) -> _Verdict:
    try:
        open_image(pending.path).close()  # the pixels are dropped at once: only the verdict stays
    except Exception as exc:  # noqa: BLE001  any failure to decode makes the file unusable
        # An OSError with an errno came from the file system (permissions, a vanished file),
        # not from the bytes: it can change without the size or mtime changing, so ask again.
        from_os = isinstance(exc, OSError) and exc.errno is not None
        return dataclasses.replace(pending, reason=describe_failure(exc), cacheable=not from_os)
    return dataclasses.replace(pending, reason=None)


def _read_cache(target: Path, root: str) -> dict[str, object]:
    try:
        with open(target, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, truncated or not JSON: start afresh
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != _FORMAT
        or data.get("version") != _VERSION
        or data.get("root") != root
        or not isinstance(data.get("files"), dict)
    ):
        return {}
    return data["files"]


def _write_cache(target: Path, root: str, files: dict[str, list]) -> None:
    data = {"format": _FORMAT, "version": _VERSION, "root": root, "files": files}
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        # Readers see the old file or the new one, never half of one: a concurrent job checking
        # the same root, or one killed mid-write, cannot leave a torn cache behind.
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:
        # The cache only saves time; a read-only home must not stop a run.
        warnings.warn(f"could not write the image check cache {target}: {exc}", stacklevel=3)
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
