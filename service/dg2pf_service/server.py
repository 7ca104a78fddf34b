"""The HTTP server the API runs in: uvicorn, with limits on what a connection may hold.

uvicorn's h11 protocol bounds the request line and headers (``max_header_bytes``: a larger one gets
400); on top of it, a connection that has not sent a complete request line and headers within
``header_timeout_s`` of opening (or of its previous response) is closed, so a client that opens
connections and trickles headers (slowloris) cannot hold them; ``max_connections`` bounds the rest
(503 beyond). The server's own refusals (a malformed request line or header) answer in the API's
error shape. Bodies are bounded by ``api.guard`` and ``uploads``.
"""

from __future__ import annotations

import asyncio
import json
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errorshape import error_body
from .settings import Settings


def protocol_for(settings: Settings) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        header_timeout_s = settings.header_timeout_s
        _headers_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets the same time for its headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._headers_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._headers_deadline is not None:
                self._headers_deadline.cancel()
                self._headers_deadline = None

        def _headers_late(self) -> None:
            self._headers_deadline = None
            # IDLE: no complete request line and headers since the deadline was armed.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            body = json.dumps(error_body("bad_request", "invalid HTTP request: a malformed request line or header, "
                                         f"or request line and headers over {settings.max_header_bytes} bytes")).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return GuardedH11Protocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``."""
    return {
        "host": settings.host, "port": settings.port,
        "http": protocol_for(settings), "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.max_connections, "timeout_keep_alive": 5,
        # On SIGTERM/Ctrl-C, a request still open after this many seconds is cancelled instead of holding
        # the shutdown (event streams end by themselves before: StoppingServer).
        "timeout_graceful_shutdown": 5,
    }


class StoppingServer(uvicorn.Server):
    """uvicorn's server, telling the app when a shutdown begins (``app.state.stopping``, an Event): open
    event streams end by themselves within a poll (their clients resume from another API, or this one
    restarted) instead of uvicorn cancelling them at ``timeout_graceful_shutdown`` with a traceback."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.config.app.state.stopping.set()  # create_app's
        super().handle_exit(sig, frame)


def serve(app: Any, settings: Settings) -> None:
    """Run the API until SIGINT/SIGTERM; ``SystemExit(3)`` when it could not start (as ``uvicorn.run``)."""
    server = StoppingServer(uvicorn.Config(app, log_level="warning", **uvicorn_options(settings)))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        raise SystemExit(3)
