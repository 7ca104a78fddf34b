"""/healthz: the process is up. /readyz: Ray and the database answer. Neither needs a token."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errorshape import error_body
from .errors import MEANING
from .schemas import Health, NotReady, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": NotReady,
            "description": f"{MEANING[503]}: the error shape, with `status` and `checks` beside it",
        }
    },
)
def readyz(request: Request) -> JSONResponse:
    services = request.app.state.services
    checks: dict[str, str] = {}
    try:
        services.store.ping()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["database"] = f"error: {exc}"[:200]
    try:
        services.executor.client.list_jobs()
        checks["ray"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["ray"] = f"error: {exc}"[:200]
    failing = {name: result for name, result in checks.items() if result != "ok"}
    if not failing:
        return JSONResponse({"status": "ready", "checks": checks})
    message = "not ready: " + "; ".join(f"{name}: {result}" for name, result in failing.items())
    return JSONResponse({**error_body("not_ready", message), "status": "not_ready", "checks": checks}, status_code=503)
