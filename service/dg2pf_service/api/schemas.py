"""Response models of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field

# The content type each kind of artifact is served with, by file suffix.
ARTIFACT_MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".csv": "text/csv",
    ".jsonl": "application/x-ndjson",
    ".png": "image/png",
}
BINARY = {"type": "string", "format": "binary"}
ARTIFACT_CONTENT = {media_type: {"schema": {} if media_type == "application/json" else BINARY}
                    for media_type in ARTIFACT_MEDIA_TYPES.values()}
LOCATION = {"Location": {"description": "where the created resource is", "schema": {"type": "string"}}}

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Phase = Literal["pending", "baseline", "gradual_pruning", "distillation", "finetuning", "done"]


class CheckpointOut(BaseModel):
    id: str
    sha256: str
    bytes: int


class ErrorInfo(BaseModel):
    type: str
    message: str


class ErrorDetail(BaseModel):
    type: str = Field(description="what went wrong, for programs: not_found, invalid_field, invalid_job, conflict, ...")
    field: str | None = Field(description="the dotted path of the input at fault (a JobSpec field, a query or path "
                              "parameter, `file`), or null when the request as a whole is")
    message: str = Field(description="what went wrong, for people: says what to change")


class ErrorResponse(BaseModel):
    """The one shape of every error response of the API."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, str] = Field(description="per dependency (database, ray): ok")


class NotReady(ErrorResponse):
    """503 from /readyz: the error shape, with the per-check detail beside it."""

    status: Literal["not_ready"]
    checks: dict[str, str] = Field(description="per dependency (database, ray): ok or the error it gave")


class JobSubmitted(BaseModel):
    id: str
    state: State
    links: dict[str, str]


class RestartInfo(BaseModel):
    at: datetime
    epoch: int
    reason: str


class JobOut(BaseModel):
    id: str
    name: str | None
    state: State
    phase: Phase
    epoch: int
    restarts: int = Field(0, description="times the job was resubmitted after its Ray work was lost (it resumed from its last epoch)")
    restart_log: list[RestartInfo] = Field(default_factory=list, description="when and why each restart happened")
    current_sparsity: float
    target_sparsity: float = Field(description="the job's sparsity; 0 when its schedule's target_macs_ratio decides the "
                                   "channel fraction during the run (current_sparsity shows it once pruning starts)")
    latest_metrics: dict[str, Any] | None
    best_metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    error: ErrorInfo | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    eta_seconds: float | None
    spec: dict[str, Any]
    links: dict[str, str]


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class ArtifactList(BaseModel):
    job_id: str
    artifacts: list[dict[str, Any]]


def artifact_media_type(name: str) -> str:
    return ARTIFACT_MEDIA_TYPES.get(PurePosixPath(name).suffix, "application/octet-stream")
