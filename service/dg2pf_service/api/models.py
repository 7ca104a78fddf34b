"""/models: deploy a succeeded job's pruned model on Ray Serve, list, inspect and undeploy models.

Predictions are served by Ray Serve itself, at each model's ``url`` (``POST .../models/{id}/predict``
on Serve's HTTP proxy), not by this API process: the API only decides what is deployed.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import Metrics
from dg2pf_core.errors import DG2PFError

from ..serving.backends import backend_for
from ..serving.deploy import NotDeployable
from ..serving.supervisor import ServingStatus
from .auth import require_token
from .errors import ApiError
from .jobs import JobId
from .schemas import LOCATION, ModelList, ModelOut

router = APIRouter(tags=["models"], dependencies=[Depends(require_token)])


def _services(request: Request):
    return request.app.state.services


def _model_out(services, row, serving: ServingStatus) -> ModelOut:
    try:
        meta: Metrics | None = Metrics.read(Artifacts(row.output_dir).metrics)
    except (OSError, ValueError):  # the output is gone or damaged: the model's figures are unknown
        meta = None
    try:
        # The backend of the replicas that answer (the running application's), with the same per-job
        # fallback they apply (a job without model.onnx is served by PyTorch).
        backend: str | None = backend_for(serving.backend, row.output_dir)[0]
    except DG2PFError:  # the output is gone or damaged: the replica's error says so when it is asked
        backend = None
    return ModelOut(
        id=row.model_id,
        job_id=row.model_id,
        created_at=row.created_at,
        url=services.serving.model_url(row.model_id, services.public_serve_url()),
        arch=meta.arch if meta else None,
        num_classes=meta.num_classes if meta else None,
        input_shape=[meta.in_channels, meta.image_size, meta.image_size] if meta else None,
        class_names=meta.class_names if meta else None,
        sparsity=meta.sparsity_prunable if meta else None,
        test_top1=meta.test_top1 if meta else None,
        backend=backend,
        status=serving.status,
        message=serving.message,
    )


def _status(services) -> ServingStatus:
    try:
        return services.serving.model_status()
    except Exception as exc:  # noqa: BLE001 - Serve unreachable is a status, not a 500
        return ServingStatus("unknown", f"Ray Serve did not answer: {exc}"[:300], services.serving.options.backend)


@router.post(
    "/jobs/{job_id}/deploy",
    status_code=202,
    response_model=ModelOut,
    responses={202: {"headers": LOCATION}, **ApiError.responses(404, 409, 422)},
)
def deploy(job_id: JobId, response: Response, services=Depends(_services)) -> ModelOut:
    try:
        row = services.deployments.deploy(job_id)
    except NotDeployable as exc:
        status = 404 if exc.field == "id" else 409
        raise ApiError(status, "not_found" if status == 404 else "conflict", exc.message, exc.field) from None
    response.headers["Location"] = f"/models/{job_id}"
    return _model_out(services, row, _status(services))


@router.get("/models", response_model=ModelList)
def list_models(services=Depends(_services)) -> ModelList:
    serving = _status(services)
    return ModelList(
        items=[_model_out(services, r, serving) for r in services.store.list_deployments()],
        serve_url=services.public_serve_url(),
    )


def _deployment_or_404(services, model_id: str):
    row = services.store.get_deployment(model_id)
    if row is None:
        raise ApiError(
            404,
            "not_found",
            f"no deployed model with id {model_id!r}; deploy a succeeded job with POST /jobs/{{id}}/deploy",
            "id",
        )
    return row


@router.get("/models/{model_id}", response_model=ModelOut, responses=ApiError.responses(404, 422))
def get_model(model_id: JobId, services=Depends(_services)) -> ModelOut:
    return _model_out(services, _deployment_or_404(services, model_id), _status(services))


@router.delete("/models/{model_id}", status_code=204, responses=ApiError.responses(404, 422))
def undeploy(model_id: JobId, services=Depends(_services)) -> Response:
    _deployment_or_404(services, model_id)
    services.deployments.undeploy(model_id)
    return Response(status_code=204)
