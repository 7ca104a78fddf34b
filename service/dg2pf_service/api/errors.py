"""Every error response has one shape: {"error": {"type", "field", "message"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dg2pf_core.errors import DG2PFError

from ..errorshape import error_body
from ..validation import InvalidJob


log = logging.getLogger("dg2pf.api")


class ApiError(HTTPException):
    def __init__(self, status: int, type_: str, message: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(status, detail=error_body(type_, message, field), headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("malformed_json", f"request body is not valid JSON: {first.get('msg')}"), status_code=400)
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return JSONResponse(error_body("invalid_field", message, field), status_code=422)

    @app.exception_handler(InvalidJob)
    async def _invalid_job(request: Request, exc: InvalidJob) -> JSONResponse:
        return JSONResponse(error_body("invalid_job", exc.message, exc.field), status_code=exc.status)

    @app.exception_handler(DG2PFError)
    async def _dg2pf(request: Request, exc: DG2PFError) -> JSONResponse:
        return JSONResponse(error_body(type(exc).__name__, exc.message, exc.field), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) and "error" in exc.detail else error_body("http_error", str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug or an unreachable dependency, not the client's input: logged with its traceback, answered
        # in the one error shape (never a plain-text 500).
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("internal", f"the service could not complete {request.method} {request.url.path}: "
                                       f"{type(exc).__name__}; see the service log"), status_code=500)
