"""The HTTP API's response models: one definition for both sides of the wire.

The service declares its responses with these classes (``dg2pf_service.api.schemas`` imports them), and
the client parses the answers with the same ones, so the two cannot drift apart; a contract test checks
them against the service's OpenAPI as well. Pure pydantic: importing this module must never bring torch,
Ray or the service. The request side is ``dg2pf_contract.job.JobSpec``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Phase = Literal["pending", "baseline", "gradual_pruning", "distillation", "finetuning", "done"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class ErrorDetail(BaseModel):
    type: str = Field(description="what went wrong, for programs: not_found, invalid_field, invalid_job, conflict, ...")
    field: str | None = Field(
        description="the dotted path of the input at fault (a JobSpec field, a query or path "
        "parameter, `file`), or null when the request as a whole is"
    )
    message: str = Field(description="what went wrong, for people: says what to change")


class ErrorResponse(BaseModel):
    """The one shape of every error response of the API."""

    error: ErrorDetail


class CheckpointOut(BaseModel):
    id: str
    sha256: str
    bytes: int


class JobSubmitted(BaseModel):
    id: str
    state: State
    links: dict[str, str]


class ErrorInfo(BaseModel):
    type: str
    message: str


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
    restarts: int = Field(
        0, description="times the job was resubmitted after its Ray work was lost (it resumed from its last epoch)"
    )
    restart_log: list[RestartInfo] = Field(default_factory=list, description="when and why each restart happened")
    current_sparsity: float
    target_sparsity: float = Field(
        description="the job's sparsity; 0 when its schedule's target_macs_ratio decides the "
        "channel fraction during the run (current_sparsity shows it once pruning starts)"
    )
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

    @property
    def target(self) -> str:
        """The target as people read it: ``90%``, or ``MACs target`` for a channel job sized by compute."""
        return f"{self.target_sparsity:.0%}" if self.target_sparsity else "MACs target"

    def summary(self) -> str:
        """One line: id, state, phase, epoch, sparsity, the latest validation top-1 or the test top-1 once
        done, the ETA while running, the error's type."""
        line = (
            f"{self.id}  {self.state:<9} {self.phase:<15} epoch {self.epoch:>3}  "
            f"sparsity {self.current_sparsity:6.2%} -> {self.target}"
        )
        best, latest = self.best_metrics or {}, self.latest_metrics or {}
        if best.get("test_top1") is not None:
            line += f"  test top-1 {best['test_top1']:.2f}%"
        elif latest.get("val_top1") is not None:
            line += f"  val top-1 {latest['val_top1']:.2f}%"
        if self.state == "running" and self.eta_seconds:
            line += f"  eta {self.eta_seconds:.0f} s"
        if self.error is not None:
            line += f"  error: {self.error.type}"
        return line

    def __str__(self) -> str:  # print(job), e.g. Client.wait(..., on_update=print): one line, not every field
        return self.summary()


class JobEvent(BaseModel):
    """One event of ``GET /jobs/{id}/events``: a ``state`` event carries the job (``job``), an ``epoch``
    event one epoch record (``record``: epoch, phase, sparsity, train_loss, val_top1, val_top5, lr,
    seconds, is_best, recovered); ``id`` is what ``Last-Event-ID`` resumes from."""

    id: str
    kind: Literal["state", "epoch"]
    job: JobOut | None = None
    record: dict[str, Any] | None = None

    def summary(self) -> str:
        """One line: the job's summary for a state event; for an epoch, its phase, sparsity, loss and
        validation top-1 (``*`` marks the best so far, ``recovered`` the weights a ranking brought back)."""
        if self.job is not None:
            return self.job.summary()
        r = self.record or {}
        loss = r.get("train_loss")
        line = (
            f"  epoch {r.get('epoch', '?'):>3}  {r.get('phase', '?'):<15} sparsity {r.get('sparsity') or 0:6.2%}  "
            f"loss {'-' if loss is None else f'{loss:.4f}'}  val top-1 {r.get('val_top1') or 0:6.2f}%"
            f"{' *' if r.get('is_best') else '  '}"
        )
        if r.get("recovered") is not None:
            line += f"  recovered {r['recovered']}"
        if r.get("seconds") is not None:
            line += f"  {r['seconds']:.1f} s"
        return line


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class Artifact(BaseModel):
    name: str = Field(description="a file of the job, e.g. model.safetensors or metrics.json")
    bytes: int
    url: str = Field(description="where to GET it, relative to the API")


class ArtifactList(BaseModel):
    job_id: str
    artifacts: list[Artifact]


class ModelOut(BaseModel):
    id: str
    job_id: str
    status: str = Field(
        description="ready | deploying | unhealthy | failed | pending | unknown (Ray Serve did not answer)"
    )
    url: str = Field(description="where to POST predictions: Ray Serve's HTTP proxy, not this API")
    created_at: datetime
    arch: str | None
    num_classes: int | None
    input_shape: list[int] | None
    class_names: list[str] | None
    sparsity: float | None
    test_top1: float | None
    # What computes its logits: DG2PF_SERVE_BACKEND, or "torch" on an onnxruntime service for a job
    # that has no model.onnx (the job's metrics.json says why, in onnx.reason).
    backend: str | None = None
    message: str | None = None

    def summary(self) -> str:
        sparsity = f"sparsity {self.sparsity:.2%}" if self.sparsity is not None else ""
        top1 = f"test top-1 {self.test_top1:.2f}%" if self.test_top1 is not None else ""
        backend = f"on {self.backend}" if self.backend else ""
        return f"{self.id}  {self.status:<9} {self.arch or '?':<12} {sparsity}  {top1}  {backend}  {self.url}"

    def __str__(self) -> str:
        return self.summary()


class ModelList(BaseModel):
    items: list[ModelOut]
    serve_url: str
