"""The full state of a DG2PF run, as saved after every epoch and read back to resume.

Everything needed to continue bit-for-bit on CPU: student weights and buffers, masks, optimiser
state, phase and epoch counters, early-stopping bookkeeping, the best weights so far, RNG state and
the history. Stored with ``torch.save`` and read with ``weights_only=True`` (tensors and plain
containers only), so reading a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dg2pf_contract.artifacts import StateDir
from dg2pf_contract.results import EpochRecord  # noqa: F401 - the loop's per-epoch record, defined with the result
from dg2pf_core.errors import ResumeError

FORMAT = "dg2pf-train-state/1"

PHASES = ("baseline", "gradual_pruning", "distillation", "finetuning", "done")


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """One JSON line per epoch: how progress leaves a run (a worker, a Ray Job) without a connection."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


@dataclass
class TrainingState:
    phase: str = "baseline"
    epoch: int = 0  # training epochs completed, all phases
    stale: int = 0  # epochs since validation top-1 last improved (distillation / fine-tuning)
    restarts: int = 0  # resumes from a checkpoint so far
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_kind: str = "adamw"
    optimizer: dict[str, Any] = field(default_factory=dict)
    best_val_top1: float | None = None
    best_epoch: int | None = None
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)
    baseline: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    rng_cpu: torch.Tensor | None = None
    rng_cuda: list[torch.Tensor] = field(default_factory=list)
    teacher_fingerprint: str = ""
    # Channel granularity, once the pruned channels are removed: the Structure (JSON) that rebuilds the
    # smaller network from the input model, and how many channels it removed.
    structure: str = ""
    channels_pruned: int = 0
    # latency_budget_ms: the latency table and calibrated aim the run prunes by (JSON), so a resumed run prunes
    # by the same ones.
    latency_target: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/train_state.pt`` atomically (temp file + rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = StateDir(directory).training_state
        tmp = path.with_suffix(".tmp")
        try:
            # Into an open file, not a path: then a full disk surfaces as the OSError (ENOSPC) it is, where
            # torch.save to a path only says "unexpected pos"; the previous state file is left as it was.
            with tmp.open("wb") as fh:
                torch.save(self.to_payload(), fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainingState:
        path = Path(path)
        if path.is_dir():
            path = StateDir(path).training_state
        if not path.is_file():
            raise ResumeError(f"no training checkpoint at {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ResumeError(
                f"cannot read training checkpoint {path} (truncated or corrupt: {first}); the run cannot be "
                "continued from it: start it again"
            ) from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ResumeError(f"{path} is not a dg2pf training checkpoint ({FORMAT})")
        payload.pop("format")
        return cls(**{k: v for k, v in payload.items() if k in cls.__dataclass_fields__})


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes: identifies the teacher a run distils from."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
