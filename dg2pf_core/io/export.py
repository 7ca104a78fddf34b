"""Writing results: a destination directory that is checked before any work (``check_output``) and
filled all at once, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from dg2pf_core.algorithm.channels import STRUCTURE_KEY, Structure
from dg2pf_core.errors import ConfigError
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.io.compact import save_compact


def check_output(out: str | Path) -> None:
    """``out`` can be created and written: no file stands where a directory must be, the nearest
    existing folder is writable, and ``out`` itself is absent or an empty directory. Nothing is
    created (a temporary file is written and removed to prove the folder is writable)."""
    out = Path(out).expanduser()
    absolute = Path(os.path.abspath(out))
    if absolute.is_symlink() and not absolute.exists():
        raise ConfigError(
            f"output {out} is a symbolic link to {os.readlink(absolute)}, which does not exist; "
            "give a directory that does not exist yet (or is empty)",
            field="out",
        )
    absolute = output_path(out)
    cwd = Path(os.getcwd()).resolve()
    if absolute == cwd or absolute in cwd.parents or absolute.parent == absolute:
        raise ConfigError(
            f"output {out} is "
            f"{'the root directory' if absolute.parent == absolute else 'the current directory or one above it'}; "
            "give a new directory for the results (e.g. --out pruned)",
            field="out",
        )
    if absolute.exists():
        if not absolute.is_dir():
            raise ConfigError(
                f"output {out} is a file; give a directory that does not exist yet (or is empty)", field="out"
            )
        if any(absolute.iterdir()):
            raise ConfigError(
                f"output directory {out} already exists and is not empty; choose a new --out", field="out"
            )
    existing = absolute.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"output {out}: {existing} is a file, not a directory, so {out} cannot be created", field="out"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".dg2pf-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"output {out}: cannot write in {existing} ({exc.strerror or exc}); choose another --out", field="out"
        ) from None


def output_path(out: str | Path) -> Path:
    """The directory the results go to: ``out`` made absolute, through a symbolic link if ``out`` is one
    (so results land in the linked directory instead of failing to replace the link)."""
    return Path(os.path.realpath(os.path.expanduser(out)))


class OutputDir:
    """``out`` must not exist or be empty; results are staged in a sibling temp dir and renamed in."""

    def __init__(self, out: str | Path) -> None:
        check_output(out)  # absent or empty, creatable, writable
        self.path = output_path(out)  # through a symbolic link: the linked directory is filled

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        parent = self.path.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=parent))
        try:
            yield tmp
            if self.path.exists():
                self.path.rmdir()  # empty, checked above
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _metadata(structure: Structure | None) -> dict[str, str]:
    # "format": "pt" as transformers and timm write it (transformers' from_pretrained reads no file without it)
    meta = {"format": "pt"}
    return meta if structure is None or structure.empty else {**meta, STRUCTURE_KEY: structure.to_json()}


def write_model(model: nn.Module, path: Path, dtypes: dict | None = None, structure: Structure | None = None) -> None:
    """The pruned weights with the input state_dict's keys (pruned entries are 0), each floating
    tensor in ``dtypes[name]`` when given (the input checkpoint's: fp16 in, fp16 out). The shapes are
    the architecture's, or, with channels removed, those ``structure`` (stored in the file's metadata,
    ``channels.STRUCTURE_KEY``) rebuilds from it."""
    state = model.state_dict()
    if dtypes:
        state = {k: (v.to(dtypes[k]) if k in dtypes and v.is_floating_point() else v) for k, v in state.items()}
    save_state_dict(state, path, metadata=_metadata(structure))


def write_compact(model: nn.Module, path: Path, values: str = "fp32", structure: Structure | None = None) -> None:
    """The same weights as a compact sparse artifact (bitmask + nonzero values; see dg2pf_core.io.compact)."""
    save_compact(model.state_dict(), path, values=values, metadata=_metadata(structure))
