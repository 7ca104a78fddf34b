"""The grid's cells on disk: where a dataset's results live, the file of each cell, and writing one.

``run`` writes the cells, ``report`` and ``page`` read them (and restore published ones); all three
take the places and the default sparsities from here.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPARSITIES = (0.70, 0.90, 0.95)
SPARSITIES_BY_DATASET = {"digits": SPARSITIES, "fashion-mnist": (0.90, 0.95, 0.98)}


def results_dir_for(dataset: str) -> Path:
    return HERE / ("results" if dataset == "digits" else f"results-{dataset}")


def cell_path(results: Path, model: str, method: str, sparsity: float, seed: int) -> Path:
    return results / model / method / f"s{sparsity:.2f}-seed{seed}.json"


def macs_cell_path(results: Path, model: str, method: str, macs_ratio: float, seed: int) -> Path:
    return results / model / method / f"m{macs_ratio:.2f}-seed{seed}.json"


def latency_cell_path(results: Path, model: str, method: str, share: float, seed: int) -> Path:
    return results / model / method / f"l{share:.2f}-seed{seed}.json"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)  # atomic: an interrupted write never leaves a half cell that looks finished
