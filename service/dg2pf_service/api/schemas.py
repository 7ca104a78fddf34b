"""Response models of the HTTP API (those the client parses come from ``dg2pf_contract.api``)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, Field

# The models the client parses live in the light client package (pure pydantic): one definition for
# both sides of the wire. Only what the client never reads is declared here.
from dg2pf_contract.api import (  # noqa: F401 - re-exported for the routes
    TERMINAL,
    Artifact,
    ArtifactList,
    CheckpointOut,
    ErrorDetail,
    ErrorInfo,
    ErrorResponse,
    JobList,
    JobOut,
    JobSubmitted,
    ModelList,
    ModelOut,
    Phase,
    RestartInfo,
    State,
)

# The content type each kind of artifact is served with, by file suffix.
ARTIFACT_MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".csv": "text/csv",
    ".jsonl": "application/x-ndjson",
    ".png": "image/png",
}
BINARY = {"type": "string", "format": "binary"}
ARTIFACT_CONTENT = {
    media_type: {"schema": {} if media_type == "application/json" else BINARY}
    for media_type in ARTIFACT_MEDIA_TYPES.values()
}
LOCATION = {"Location": {"description": "where the created resource is", "schema": {"type": "string"}}}


class ArchList(BaseModel):
    archs: list[str] = Field(description="every name a job's arch may give, timm's models aside")
    installed: list[str] = Field(description="those registered by installed packages (the dg2pf.archs entry points)")
    timm: str | None = Field(description="timm's version when installed: then any timm/<model> name is accepted too")
    transformers: str | None = Field(
        None, description="transformers' version when installed: then arch hf takes a Hugging Face model directory"
    )


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, str] = Field(description="per dependency (database, ray): ok")


class NotReady(ErrorResponse):
    """503 from /readyz: the error shape, with the per-check detail beside it."""

    status: Literal["not_ready"]
    checks: dict[str, str] = Field(description="per dependency (database, ray): ok or the error it gave")


def artifact_media_type(name: str) -> str:
    return ARTIFACT_MEDIA_TYPES.get(PurePosixPath(name).suffix, "application/octet-stream")
