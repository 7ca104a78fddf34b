"""``inc-magnitude``: Intel Neural Compressor's magnitude pruning, run in its own virtual environment.

INC pins its own torch and numpy, so it cannot share .venv; ``inc/setup.sh`` builds
``bench/fidelity/.venv-inc`` and ``inc/run_inc.py`` prunes one cell there, reading the dense
checkpoint and the split ``.npz`` and writing a result JSON measured with the same rule as
``measure.py``. A set-up that failed, or a run that exits non-zero, makes the cell a failed cell
whose error is the reason, never a crash of the harness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .measure import from_layer_sparsity
from .registry import Cell, MethodUnavailable, Outcome, register_method

HERE = Path(__file__).resolve().parent
PYTHON = HERE / ".venv-inc" / "bin" / "python"
RUNNER = HERE / "inc" / "run_inc.py"
# run.sh writes the tail of a failed ``inc/setup.sh`` here (and removes it after a good set-up).
SETUP_ERROR = HERE / "cache" / "inc-setup.error"
TIMEOUT_S = 4 * 3600
REQUIRED = ("test_top1", "val_top1", "sparsity", "layer_sparsity", "epochs")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@register_method(
    "inc-magnitude",
    "Intel Neural Compressor 2.x magnitude pruning (WeightPruningConfig), own venv, via inc/run_inc.py",
)
def inc_magnitude(cell: Cell) -> Outcome:
    if cell.npz is None:
        raise MethodUnavailable(
            f"INC trains in its own environment on fixed arrays (.npz); {cell.data.dataset} goes through the product's "
            "data path, whose per-image augmentation has no array form, so INC is not run on it"
        )
    if SETUP_ERROR.exists():
        raise MethodUnavailable(f"INC set-up failed (bench/fidelity/inc/setup.sh): {_tail(SETUP_ERROR.read_text())}")
    for path, what in ((PYTHON, "the INC interpreter"), (RUNNER, "the INC runner")):
        if not path.exists():
            raise MethodUnavailable(f"{what} {path} is missing; run `bash bench/fidelity/inc/setup.sh`")
    out = cell.npz.parent / "inc-runs" / cell.model / f"s{cell.sparsity:.2f}-seed{cell.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    b = cell.budget
    command = [
        str(PYTHON),
        str(RUNNER),
        "--arch",
        cell.model,
        "--checkpoint",
        str(cell.dense.path),
        "--data",
        str(cell.npz),
        "--sparsity",
        str(cell.sparsity),
        "--epochs",
        str(b.epochs),
        "--pruning-epochs",
        str(b.pruning_epochs),
        "--seed",
        str(cell.seed),
        "--batch-size",
        str(b.batch_size),
        "--threads",
        str(cell.threads),
        "--out",
        str(out),
    ]
    before = os.times()
    try:
        # stderr is echoed live, so a long INC run shows its progress in the harness log too.
        proc = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"inc/run_inc.py ran past {TIMEOUT_S} s; stderr tail:\n{_tail(exc.stderr or '')}") from exc
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"inc/run_inc.py exited {proc.returncode}; stderr tail:\n{_tail(proc.stderr)}")
    try:
        result = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"inc/run_inc.py exited 0 but {out} is not readable JSON: {exc}") from exc
    missing = [k for k in REQUIRED if k not in result]
    if missing:
        raise RuntimeError(f"inc/run_inc.py's result {out} lacks {missing} (contract: bench/fidelity/inc.py)")
    measured = from_layer_sparsity(
        result["test_top1"], result["val_top1"], result["sparsity"], result["layer_sparsity"]
    )
    notes = {k: v for k, v in result.items() if k not in ("test_top1", "val_top1", "sparsity", "layer_sparsity")}
    after = os.times()  # the finished child's CPU time, all its threads
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return Outcome(epochs=int(result["epochs"]), measured=measured, notes=notes, cpu_seconds=cpu)
