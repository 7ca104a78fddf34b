"""The deployed-model registry: one small JSON file per model under ``serving_dir``.

The database says which models are deployed; these files are its projection onto the storage the
Serve replicas can see (a shared volume on a real cluster). A replica answers for a model only
while its file exists, so undeploying takes effect on the next request, without redeploying the
Serve application. The API rewrites the files from the database on start-up and on every pass
of its serving supervisor, which is how deployments survive a service or a cluster restart.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODEL_ID = re.compile(r"^[0-9a-f]{32}$")  # model ids are job ids (uuid4 hex)


@dataclass(frozen=True)
class RegisteredModel:
    model_id: str
    output_dir: str  # the job's output/ with metrics.json and the model files


def valid_model_id(model_id: str) -> bool:
    return bool(MODEL_ID.match(model_id))


class ModelRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _file(self, model_id: str) -> Path:
        if not valid_model_id(model_id):
            raise ValueError(f"invalid model id {model_id!r}")
        return self.root / f"{model_id}.json"

    def put(self, model: RegisteredModel) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._file(model.model_id)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"model_id": model.model_id, "output_dir": model.output_dir}, f)
            os.replace(tmp, path)  # atomic: a replica never reads half a file
        finally:
            if os.path.exists(tmp):  # the write failed (a full disk): no temp file left per reconcile pass
                os.unlink(tmp)

    def get(self, model_id: str) -> RegisteredModel | None:
        if not valid_model_id(model_id):
            return None
        try:
            doc = json.loads(self._file(model_id).read_text())
        except (OSError, ValueError):
            return None
        return RegisteredModel(doc["model_id"], doc["output_dir"])

    def has(self, model_id: str) -> bool:
        """Deployed right now: one stat, cheap enough to ask on every request."""
        return valid_model_id(model_id) and self._file(model_id).is_file()

    def remove(self, model_id: str) -> None:
        try:
            self._file(model_id).unlink()
        except FileNotFoundError:
            pass

    def ids(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.stem for p in self.root.glob("*.json") if valid_model_id(p.stem)}

    def sync(self, wanted: dict[str, str]) -> None:
        """Make the files match ``wanted`` (model id -> output dir)."""
        for model_id in self.ids() - set(wanted):
            self.remove(model_id)
        for model_id, output_dir in wanted.items():
            current = self.get(model_id)
            if current is None or current.output_dir != output_dir:
                self.put(RegisteredModel(model_id, output_dir))
