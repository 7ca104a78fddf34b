"""/jobs: submit, list, inspect, cancel, and the artifacts of a job."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from dg2pf_contract.artifacts import JobDir
from dg2pf_contract.job import JobSpec

from ..validation import validate_job
from .auth import require_token
from .errors import ApiError
from .schemas import (
    ARTIFACT_CONTENT,
    LOCATION,
    Artifact,
    ArtifactList,
    ErrorInfo,
    JobList,
    JobOut,
    JobSubmitted,
    State,
    artifact_media_type,
)

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_token)])

MAX_OFFSET = 2**31 - 1  # beyond any page a store holds; larger numbers overflow SQL integers
JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="a job id (32 hex digits)")]


def _links(job_id: str) -> dict[str, str]:
    return {"self": f"/jobs/{job_id}", "cancel": f"/jobs/{job_id}/cancel", "artifacts": f"/jobs/{job_id}/artifacts"}


def job_out(row) -> JobOut:
    return JobOut(
        id=row.id,
        name=row.name,
        state=row.state,
        phase=row.phase,
        epoch=row.epoch,
        restarts=row.restarts or 0,
        restart_log=row.restart_log or [],
        current_sparsity=row.current_sparsity,
        target_sparsity=row.target_sparsity,
        latest_metrics=row.latest_metrics,
        best_metrics=row.best_metrics,
        history=row.history or [],
        error=ErrorInfo(type=row.error_type, message=row.error_message or "") if row.error_type else None,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        eta_seconds=row.eta_seconds,
        spec=row.spec["spec"],
        links=_links(row.id),
    )


def _services(request: Request):
    return request.app.state.services


def _row_or_404(services, job_id: str):
    row = services.store.get_job(job_id)
    if row is None:
        raise ApiError(404, "not_found", f"no job with id {job_id!r}", "id")
    return row


@router.post(
    "",
    status_code=202,
    response_model=JobSubmitted,
    responses={202: {"headers": LOCATION}, **ApiError.responses(400, 404, 408, 422, 503)},
)
def submit(spec: JobSpec, response: Response, services=Depends(_services)) -> JobSubmitted:
    checkpoint, teacher = validate_job(spec, services.settings, services.store, services.capacity)
    doc = {"spec": spec.model_dump(mode="json"), "resolved": {"checkpoint": checkpoint, "teacher": teacher}}
    row = services.store.create_job(doc, spec.name, spec.sparsity or 0.0, services.settings.jobs_dir)
    response.headers["Location"] = f"/jobs/{row.id}"
    return JobSubmitted(id=row.id, state="queued", links=_links(row.id))


@router.get("", response_model=JobList, responses=ApiError.responses(422))
def list_jobs(
    state: State | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    services=Depends(_services),
) -> JobList:
    rows, total = services.store.list_jobs(state=state, limit=limit, offset=offset)
    return JobList(items=[job_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=ApiError.responses(404, 422))
def get_job(job_id: JobId, services=Depends(_services)) -> JobOut:
    return job_out(_row_or_404(services, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ApiError.responses(404, 409, 422))
def cancel(job_id: JobId, services=Depends(_services)) -> JobOut:
    row = _row_or_404(services, job_id)
    now = datetime.now(UTC)
    if row.state == "queued" and services.store.transition(job_id, {"queued"}, "cancelled", finished_at=now) is None:
        row = services.store.get_job(job_id)  # dispatched meanwhile: cancel it as a running job
    if row.state == "running":
        # Recorded first, so the job is cancelled even while Ray does not answer (a head being
        # restarted): the scheduler stops its Ray job as soon as it can, and never resubmits it.
        done = services.store.transition(job_id, {"running"}, "cancelled", finished_at=now)
        if done is not None:
            services.scheduler.stop_ray_job(done.ray_submission_id)
    elif row.state != "queued":
        raise ApiError(
            409,
            "conflict",
            f"job {job_id} is already {row.state}; only queued or running jobs can be cancelled",
            "state",
        )
    return job_out(services.store.get_job(job_id))


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=ApiError.responses(404, 422))
def artifacts(job_id: JobId, services=Depends(_services)) -> ArtifactList:
    job_dir = JobDir(_row_or_404(services, job_id).artifacts_dir)
    paths = {name: job_dir.served(name) for name in JobDir.SERVED}
    found = [
        Artifact(name=name, bytes=path.stat().st_size, url=f"/jobs/{job_id}/artifacts/{name}")
        for name, path in paths.items()
        if path is not None and path.is_file()
    ]
    return ArtifactList(job_id=job_id, artifacts=found)


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {
            "description": "the file: .safetensors as application/octet-stream, .json as application/json, "
            "training.png, layers.png and pareto.png as image/png, trials.csv as text/csv, progress.jsonl as "
            "application/x-ndjson",
            "content": ARTIFACT_CONTENT,
        },
        **ApiError.responses(404, 422),
    },
)
def artifact(
    job_id: JobId, name: Annotated[str, PathParam(max_length=64)], services=Depends(_services)
) -> FileResponse:
    path = JobDir(_row_or_404(services, job_id).artifacts_dir).served(name)
    if path is None:
        raise ApiError(404, "not_found", f"unknown artifact {name!r}; one of {list(JobDir.SERVED)}", "name")
    if not path.is_file():
        raise ApiError(404, "not_found", f"job {job_id} has no {name} (yet)", "name")
    return FileResponse(path, filename=name, media_type=artifact_media_type(name))
