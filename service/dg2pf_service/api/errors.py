"""Every error response has one shape: {"error": {"type", "field", "message"}}.

``install`` makes it so for every error the app can produce, its routes' and Starlette's alike (an
unknown route, a method a route does not take, a body that does not parse, an unexpected exception);
``error_responses`` declares it in the OpenAPI for the statuses a route can answer.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from dg2pf_core.errors import DG2PFError

from ..errorshape import error_body
from ..store.db import RETRY_AFTER_S, StoreBusy, busy_reason
from ..validation import InvalidJob
from .schemas import ErrorResponse

log = logging.getLogger("dg2pf.api")

# What each error status means in this API, as the OpenAPI says it.
MEANING = {
    400: "the body is not valid JSON, or not a valid multipart form",
    401: "no bearer token (only when the service runs with DG2PF_API_TOKENS)",
    403: "a bearer token that is not one of DG2PF_API_TOKENS",
    404: "no such job, model, artifact or checkpoint",
    408: "the request body (an upload: its file) was not received in time",
    409: "the job's state does not allow it",
    413: "the request body is larger than DG2PF_MAX_REQUEST_BYTES (an upload: DG2PF_MAX_UPLOAD_BYTES, "
    "or it declares more "
    "than DG2PF_MAX_UNCOMPRESSED_BYTES in memory)",
    422: "a field is invalid; `field` names it",
    500: "an unexpected failure of the service (its log has the traceback)",
    503: "a dependency does not answer, or the job store is busy "
    "(then Retry-After says in how many seconds to try again)",
    507: "the service has no disk space left for the upload",
}
AUTH = (401, 403)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: each status answered with the ErrorResponse shape."""
    return {status: {"model": ErrorResponse, "description": MEANING[status]} for status in statuses}


class ApiError(HTTPException):
    # For route decorators: ``responses=ApiError.responses(404, 422)``.
    responses = staticmethod(error_responses)

    def __init__(
        self, status: int, type_: str, message: str, field: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(status, detail=error_body(type_, message, field), headers=headers)


class BodyRefused(ApiError):
    """A request body refused while a route reads it (``guard``): too large (413) or too slow (408).

    An HTTPException, so FastAPI passes it on as it is while it reads a body (other exceptions there
    become its own 400); the connection closes with the answer, leaving the rest of the body unread."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(status, type_, message, headers={"Connection": "close"})


def _starlette_error(request: Request, exc: StarletteHTTPException) -> dict:
    # Raised by Starlette or FastAPI themselves, not by our routes: say it so a user can act.
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return error_body("not_found", f"no route for {where}; /docs lists the routes")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return error_body(
            "method_not_allowed", f"{where} is not allowed; {request.url.path} takes {allowed or 'no method'}"
        )
    try:
        type_ = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        type_ = "http_error"
    return error_body(type_, str(exc.detail))


def _allowed(request: Request, first: str) -> str:
    """Every method the path takes: Starlette's 405 names only those of the first route matching the path
    (``POST`` for ``/jobs``, which takes ``GET`` too)."""
    methods = {m.strip() for m in first.split(",") if m.strip()}
    for path, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(path)[0].match(request.url.path):
            methods |= {m.upper() for m in operations}
    return ", ".join(sorted(methods))


def _whole_body(request: Request, error: dict) -> str:
    # pydantic's words ("Field required") name nothing when the body as a whole is at fault.
    content_type = request.headers.get("content-type", "")
    if error.get("type") == "missing":
        return "the request body is missing: send it as JSON, with Content-Type: application/json"
    if "json" not in content_type.lower():
        return f"the request body must be JSON, with Content-Type: application/json (not {content_type or 'none'!r})"
    return f"request body: {error.get('msg', 'invalid')}"


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = next(iter(exc.errors()), {})
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        if first.get("type") == "json_invalid":
            return JSONResponse(
                error_body("malformed_json", f"request body is not valid JSON: {first.get('msg')}"), status_code=400
            )
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg')}" if field else _whole_body(request, first)
        return JSONResponse(error_body("invalid_field", message, field), status_code=422)

    @app.exception_handler(InvalidJob)
    async def _invalid_job(request: Request, exc: InvalidJob) -> JSONResponse:
        type_ = "cluster_unavailable" if exc.status == 503 else "invalid_job"
        return JSONResponse(error_body(type_, exc.message, exc.field), status_code=exc.status)

    @app.exception_handler(DG2PFError)
    async def _dg2pf(request: Request, exc: DG2PFError) -> JSONResponse:
        return JSONResponse(error_body(type(exc).__name__, exc.message, exc.field), status_code=422)

    # Starlette's class, not FastAPI's subclass: Starlette raises its own for unknown routes (404) and
    # methods a route does not take (405, OPTIONS included).
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed(request, (headers or {}).get("Allow", ""))}
            exc = StarletteHTTPException(405, exc.detail, headers)
        body = exc.detail if isinstance(exc.detail, dict) and "error" in exc.detail else _starlette_error(request, exc)
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    # A store busy under a burst of requests (SQLite's lock, PostgreSQL's connection pool): 503 with
    # Retry-After, on a connection kept open. Handled here rather than by the catch-all below, which
    # Starlette answers and then raises on to the server, which closes the connection.
    @app.exception_handler(StoreBusy)
    @app.exception_handler(PoolTimeoutError)
    @app.exception_handler(OperationalError)
    async def _store_busy(request: Request, exc: Exception) -> JSONResponse:
        reason = busy_reason(exc)
        if reason is None:
            return _internal(request, exc)
        log.warning("%s %s: %s; answered 503", request.method, request.url.path, reason)
        return JSONResponse(
            error_body("store_busy", f"the job store is busy ({reason}): try again in {RETRY_AFTER_S} s"),
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The server closes the connection after this answer: Connection: close tells the client not to
        # send its next request on it.
        return _internal(request, exc, headers={"Connection": "close"})


def _internal(request: Request, exc: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    # A bug or an unreachable dependency, not the client's input: logged with its traceback, answered
    # in the one error shape (never a plain-text 500).
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body(
            "internal",
            f"the service could not complete {request.method} {request.url.path}: "
            f"{type(exc).__name__}; see the service log",
        ),
        status_code=500,
        headers=headers,
    )
