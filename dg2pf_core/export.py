"""Writing results: a destination directory that is filled all at once, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from .channels import STRUCTURE_KEY, Structure
from .checkpoint_save import save_state_dict
from .compact import save_compact
from .preflight import check_output, output_path


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


def _metadata(structure: Structure | None) -> dict[str, str] | None:
    return None if structure is None or structure.empty else {STRUCTURE_KEY: structure.to_json()}


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
    """The same weights as a compact sparse artifact (bitmask + nonzero values; see dg2pf_core.compact)."""
    save_compact(model.state_dict(), path, values=values, metadata=_metadata(structure))
