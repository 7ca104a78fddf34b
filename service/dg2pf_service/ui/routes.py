"""The dashboard's routes: four page shells, their static files, and the predict relay.

The pages are rendered from ``templates/`` with nothing but the page's name and, for a job's page, its
id (checked as 32 hex digits); their scripts fetch everything else from the JSON API. Each page is sent
with a Content-Security-Policy that allows only this origin's scripts and styles, so a job name or an
error message that holds markup can never run as code, even if a script slipped and parsed it as HTML.

``POST /ui/api/models/{id}/predict`` relays an image to the model's Ray Serve URL: Serve's proxy is
another origin (``DG2PF_SERVE_PORT``), whose answers a page may not read, so the models page sends its
upload here and this route forwards it, with the caller's token, to the same predict endpoint a client
calls. The request guard bounds the body (``DG2PF_MAX_REQUEST_BYTES``) and checks the token first.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ..api.auth import require_token
from ..api.errors import ApiError
from ..api.jobs import JobId
from .paths import PREFIX, RELAY, STATIC

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
PREDICT_TIMEOUT_S = 60.0
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


def _page(request: Request, template: str, **context) -> HTMLResponse:
    root = request.scope.get("root_path", "")  # behind a proxy that mounts the service under a path
    response = templates.TemplateResponse(request, template, {"root": root, "static": f"{root}{STATIC}", **context})
    response.headers.update(HEADERS)
    return response


@router.get(PREFIX)
def jobs_page(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", page="jobs", title="Jobs")


@router.get(f"{PREFIX}/jobs/{{job_id}}")
def job_page(request: Request, job_id: JobId) -> HTMLResponse:
    return _page(request, "job.html", page="job", title=f"Job {job_id[:8]}", job_id=job_id)


@router.get(f"{PREFIX}/models")
def models_page(request: Request) -> HTMLResponse:
    return _page(request, "models.html", page="models", title="Models")


@router.get(f"{PREFIX}/submit")
def submit_page(request: Request) -> HTMLResponse:
    return _page(request, "submit.html", page="submit", title="Submit a job")


@router.post(f"{RELAY}/models/{{model_id}}/predict", dependencies=[Depends(require_token)])
async def predict(
    model_id: JobId,
    request: Request,
    top_k: int = Query(5, ge=1, le=1000, description="classes per input, most probable first"),
) -> Response:
    services = request.app.state.services
    headers = {
        "Content-Type": request.headers.get("content-type", "application/octet-stream"),
        "serve_multiplexed_model_id": model_id,
    }  # routes to a replica that has the model loaded
    if "authorization" in request.headers:
        headers["Authorization"] = request.headers["authorization"]
    body = await request.body()
    try:
        async with httpx.AsyncClient(timeout=PREDICT_TIMEOUT_S) as client:
            answer = await client.post(
                services.serving.model_url(model_id), content=body, params={"top_k": top_k}, headers=headers
            )
    except httpx.HTTPError as exc:
        raise ApiError(
            503,
            "serve_unavailable",
            f"Ray Serve did not answer at {services.serving.url} "
            f"({type(exc).__name__}); GET /models says the model's status",
            "model",
        ) from None
    # Serve's answer as it is: its predictions, or its error in the service's one error shape.
    return Response(
        answer.content,
        status_code=answer.status_code,
        media_type=answer.headers.get("content-type", "application/json"),
    )


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app``: the pages, the relay and ``/ui/static``."""
    app.include_router(router)
    app.mount(STATIC, StaticFiles(directory=HERE / "static"), name="ui-static")
