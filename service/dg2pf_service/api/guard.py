"""What every request meets before a route runs: the token, and a bounded body.

An ASGI middleware, so it acts before FastAPI reads and parses a body:

- with ``DG2PF_API_TOKENS`` set, every path but the health checks and the dashboard's page shells
  (``ui.paths.is_shell``: HTML, scripts and styles that hold no data) needs the token, checked from the
  headers alone (a 300 MB body without a token is never read; unknown routes answer 401 too, so an
  anonymous client cannot tell which exist);
- a request body (uploads aside: ``uploads.py`` bounds those) is cut off with 413 past
  ``DG2PF_MAX_REQUEST_BYTES``, by its Content-Length before anything is read, or while it streams;
- a body that stops sending for ``DG2PF_UPLOAD_IDLE_TIMEOUT_S``, or is not complete within
  ``DG2PF_REQUEST_BODY_TIMEOUT_S``, gets 408;
- artifacts are served whole: a ``Range`` header is ignored (one documented response, 200).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..errorshape import error_body
from ..settings import Settings
from ..ui.paths import is_shell
from .auth import token_error
from .errors import BodyRefused

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC = frozenset({"/healthz", "/readyz"})
UPLOAD = ("POST", "/checkpoints")


class RequestGuard:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings: Settings = scope["app"].state.services.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] not in PUBLIC and not is_shell(scope["path"]):
            refused = token_error(settings.api_tokens, headers.get("authorization", ""))
            if refused is not None:
                status, type_, message, extra = refused
                await _answer(send, status, error_body(type_, message), extra)
                return
        if (scope["method"], scope["path"]) == UPLOAD:
            await self.app(scope, receive, send)
            return
        limit = settings.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _answer(
                send,
                413,
                error_body(
                    "too_large", f"the request body has {int(declared)} bytes, over DG2PF_MAX_REQUEST_BYTES ({limit})"
                ),
            )
            return
        if "/artifacts/" in scope["path"]:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
        await self.app(
            scope, _bounded(receive, limit, settings.upload_idle_timeout_s, settings.request_body_timeout_s), send
        )


def _bounded(receive: Receive, limit: int, idle_s: float, total_s: float) -> Receive:
    """``receive`` counting the body and timing it until it is complete; then plain ``receive``
    (which later waits, unbounded, for the client's disconnect while a response streams)."""
    state = {"read": 0, "done": False, "deadline": time.monotonic() + total_s}

    async def bounded() -> Message:
        if state["done"]:
            return await receive()
        left = state["deadline"] - time.monotonic()
        try:
            with anyio.fail_after(max(0.0, min(idle_s, left))):
                message = await receive()
        except TimeoutError:
            raise BodyRefused(
                408,
                "request_timeout",
                f"the request body was not received in time (nothing for "
                f"{idle_s:g} s, or not complete within {total_s:g} s)",
            ) from None
        if message["type"] == "http.request":
            state["read"] += len(message.get("body", b""))
            if state["read"] > limit:
                raise BodyRefused(413, "too_large", f"the request body is over DG2PF_MAX_REQUEST_BYTES ({limit})")
            state["done"] = not message.get("more_body", False)
        else:
            state["done"] = True
        return message

    return bounded


async def _answer(send: Send, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
    # The body may be unread: the connection closes with the answer, so nothing more of it is read.
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
        *[(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()],
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
