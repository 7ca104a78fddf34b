"""Response models of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Phase = Literal["pending", "baseline", "gradual_pruning", "distillation", "finetuning", "done"]


class CheckpointOut(BaseModel):
    id: str
    sha256: str
    bytes: int


class ErrorInfo(BaseModel):
    type: str
    message: str


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
    target_sparsity: float
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
