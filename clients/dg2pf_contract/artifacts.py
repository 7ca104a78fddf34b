"""A job's files: the one place their names are spelled, and how one is written whole.

Three folders hold them, each a frozen dataclass around its path with a property per file and the bare
names as class constants (for where no folder is at hand: a URL, an allow-list, a message):

- ``Artifacts``: a finished run's output (``dg2pf prune --out``, ``dg2pf tune --out``, a service job's
  ``output/``, a Ray Train run's final checkpoint), staged and renamed into place whole.
- ``StateDir``: a run's state while it trains, kept to resume it (``OUT.dg2pf-run`` beside ``dg2pf prune
  --out``, a service job's ``state/``; a Ray Train checkpoint holds its training state file too).
- ``JobDir``: a service job's folder: the order the runner reads, its progress, its error or its output.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Artifacts:
    """The files of a finished run, in the folder ``root``."""

    root: Path

    MODEL = "model.safetensors"  # the pruned weights, dense, in the input checkpoint's dtypes
    COMPACT = "model.compact.safetensors"  # the same weights as bitmask + nonzero values
    ONNX = "model.onnx"  # only when the model exports and ONNX Runtime matches PyTorch's logits
    INT8_ONNX = "model.int8.onnx"  # precision int8: only when its validation top-1 kept max_quantization_drop
    METRICS = "metrics.json"  # the result document: dg2pf_contract.results.Metrics
    TRAINING_PLOT = "training.png"  # drawn from metrics.json (dg2pf_core.io.plots), unless drawing failed
    LAYERS_PLOT = "layers.png"
    HISTORY = "history.json"  # service jobs: metrics.json's history on its own
    TRIALS = "trials.csv"  # tune runs: one row per trial
    PARETO = "pareto.json"  # max_top1_drop searches: every trial's measured latency and accuracy
    PARETO_PLOT = "pareto.png"  # ... drawn, unless drawing failed
    QUANTIZATION = "quantization.json"  # dg2pf quantize's report: dg2pf_contract.results.Quantization
    # arch hf: the input model directory's config and image processor config, beside MODEL, so the output is
    # a Hugging Face model directory too (dg2pf_core.models.hf)
    HF_CONFIG = "config.json"
    HF_PROCESSOR = "preprocessor_config.json"
    MODEL_DIR = (HF_CONFIG, MODEL, HF_PROCESSOR)  # a model directory's files, as dg2pf takes and writes them

    REQUIRED = (MODEL, COMPACT, METRICS)  # every finished run has these
    PLOTS = (TRAINING_PLOT, LAYERS_PLOT)
    # what a finished run may lack (see metrics.json's onnx, the run's log; the model directory's files: arch hf)
    OPTIONAL = (ONNX, INT8_ONNX, *PLOTS, HF_CONFIG, HF_PROCESSOR)
    # What the HTTP API serves of a job's output (GET /jobs/{id}/artifacts), in this order.
    SERVED = (
        MODEL,
        COMPACT,
        ONNX,
        INT8_ONNX,
        METRICS,
        HISTORY,
        TRAINING_PLOT,
        LAYERS_PLOT,
        TRIALS,
        PARETO,
        PARETO_PLOT,
        HF_CONFIG,
        HF_PROCESSOR,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def compact(self) -> Path:
        return self.root / self.COMPACT

    @property
    def int8_onnx(self) -> Path:
        return self.root / self.INT8_ONNX

    @property
    def pareto(self) -> Path:
        return self.root / self.PARETO

    @property
    def onnx(self) -> Path:
        return self.root / self.ONNX

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def training_plot(self) -> Path:
        return self.root / self.TRAINING_PLOT

    @property
    def layers_plot(self) -> Path:
        return self.root / self.LAYERS_PLOT

    @property
    def history(self) -> Path:
        return self.root / self.HISTORY

    @property
    def trials(self) -> Path:
        return self.root / self.TRIALS

    @property
    def weights(self) -> Path:
        """What serving loads: the compact file, or the dense one where there is none."""
        return self.compact if self.compact.is_file() else self.model


@dataclass(frozen=True)
class StateDir:
    """The state of a run while it trains, in the folder ``root``."""

    root: Path

    JOB = "job.json"  # the job and its output path, for resuming
    TRAINING_STATE = "train_state.pt"  # the last epoch's full TrainingState (dg2pf_core.algorithm.state)
    LOCK = ".lock"  # held by the run that trains there

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def job(self) -> Path:
        return self.root / self.JOB

    @property
    def training_state(self) -> Path:
        return self.root / self.TRAINING_STATE

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK


@dataclass(frozen=True)
class JobDir:
    """A service job's folder ``root``: what the service ordered and what its runner left there."""

    root: Path

    ORDER = "job.json"  # what the executor ordered: the job, its workers, its tune options (the runner's input)
    PROGRESS = "progress.jsonl"  # one epoch record per line, as the run goes
    ERROR = "error.json"  # a failed run's {type, message, field}
    OUTPUT = "output"  # the run's Artifacts, renamed into place once it succeeded
    STATE = "state"  # a single-process run's StateDir while it trains

    # What the HTTP API serves of a job: its output's files, and its progress.
    SERVED = (*Artifacts.SERVED, PROGRESS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def order(self) -> Path:
        return self.root / self.ORDER

    @property
    def progress(self) -> Path:
        return self.root / self.PROGRESS

    @property
    def error(self) -> Path:
        return self.root / self.ERROR

    @property
    def output(self) -> Artifacts:
        return Artifacts(self.root / self.OUTPUT)

    @property
    def state(self) -> StateDir:
        return StateDir(self.root / self.STATE)

    def served(self, name: str) -> Path | None:
        """Where the file ``name`` the API may serve is, None for a name it does not serve."""
        if name == self.PROGRESS:
            return self.progress
        return self.output.root / name if name in Artifacts.SERVED else None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole or not at all: a temp file beside it, flushed, then renamed
    over it. A full disk or a kill while writing leaves the previous file (or none), never half of one;
    the temp file is removed when the write fails."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no NaN or infinity (a diverged loss, an
    unmeasured ratio), and a file with them is not JSON other readers take."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, document: Any, indent: int = 2) -> None:
    """``document`` as JSON in ``path``, written whole (``write_text_atomic``), non-finite numbers as null."""
    write_text_atomic(path, json.dumps(json_safe(document), indent=indent) + "\n")
