"""The FastAPI application: routes, error shape, docs behind the token, and the scheduler's lifetime."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from ..services import Services, build
from ..settings import Settings
from ..ui import routes as ui
from . import archs, checkpoints, errors, events, health, jobs, models
from .auth import require_token
from .guard import RequestGuard

TITLE = "dg2pf"
BEARER = "bearer"


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = services or build(settings or Settings())
        app.state.services = svc
        svc.scheduler.tick()  # re-attach to running jobs, resubmit lost ones, dispatch the queue
        svc.scheduler.start(svc.settings.poll_seconds)
        svc.serving.start(svc.settings.serve_poll_seconds)  # restores deployed models (registry + Serve app)
        if svc.tracking is not None:
            svc.tracking.start(svc.settings.mlflow_poll_seconds)
        yield
        if svc.tracking is not None:
            svc.tracking.stop()
        svc.serving.stop()
        svc.scheduler.stop()

    # FastAPI's own /docs, /redoc and /openapi.json would be public: _docs serves them behind the token.
    app = FastAPI(
        title=TITLE,
        version="0.1.0",
        description="DG2PF pruning jobs on Ray",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        responses=errors.error_responses(413, 500, 503),
        redirect_slashes=False,
    )  # /jobs/ is 404, not a redirect answered before the token is checked
    app.state.stopping = threading.Event()  # set when a shutdown begins (server.StoppingServer): streams end
    app.add_middleware(RequestGuard)
    errors.install(app)
    app.include_router(health.router)
    for router in (archs.router, checkpoints.router, jobs.router, events.router, models.router):
        app.include_router(router, responses=errors.error_responses(*errors.AUTH))
    app.include_router(_docs(app))
    ui.install(app)  # /ui: the dashboard's pages (no data, no token) over the routes above
    app.openapi = _openapi(app)
    return app


def _docs(app: FastAPI) -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_token)], include_in_schema=False)

    @router.get("/openapi.json")
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    def swagger() -> HTMLResponse:
        # The schema goes inline: the page's own fetch of /openapi.json would carry no token.
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{TITLE} - Swagger UI",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"spec": app.openapi()},
        )

    @router.get("/redoc")
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{TITLE} - ReDoc")

    return router


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    generate = app.openapi  # FastAPI's: builds the schema once and keeps it in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _errors_as_json(schema)
            services = getattr(app.state, "services", None)
            if services is not None and services.settings.api_tokens:
                _declare_bearer(schema)
        return app.openapi_schema

    return openapi


def _errors_as_json(schema: dict[str, Any]) -> None:
    """Errors are JSON on every route, the event stream's included: FastAPI documents a route's error
    responses under its response class's media type (text/event-stream for GET /jobs/{id}/events)."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content") or {}
                if status[0] in "45" and content and "application/json" not in content:
                    response["content"] = {"application/json": next(iter(content.values()))}


def _declare_bearer(schema: dict[str, Any]) -> None:
    """Mark the operations that need the token (those that answer 401), so /docs offers 'Authorize'."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "one of the service's DG2PF_API_TOKENS",
    }
    for operations in schema["paths"].values():
        for operation in operations.values():
            if "401" in operation.get("responses", {}):
                operation["security"] = [{BEARER: []}]
