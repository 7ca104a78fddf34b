"""The HTTP server the API runs in: uvicorn, with limits on what a connection may hold.

uvicorn's h11 protocol bounds the request line and headers (``max_header_bytes``: a larger one gets
400). On top of it, so that sockets held open by someone cannot lock the users out:

- one client address (an IPv6 client: its /64) holds at most ``max_connections_per_client`` open
  connections: one more is answered 503 and closed as it is accepted, before anything is read from it;
- a connection that has not sent a complete request line and headers within ``header_timeout_s`` of
  opening (or of its previous response) is closed, so a client that opens connections and trickles
  headers (slowloris) holds each only that long;
- a request that finds ``max_connections`` connections open (or requests in flight) gets 503, unless it
  presents a valid token (``DG2PF_API_TOKENS``): unfinished headers cannot be authenticated, so sockets
  nobody authenticated may fill the cap, but never keep out a request that carries a token.

The server's own refusals (a malformed request line or header, a crowded address or server) answer in
the API's error shape. Bodies are bounded by ``api.guard`` and ``uploads``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import resource
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .api.auth import token_error
from .errorshape import error_body
from .settings import Settings

log = logging.getLogger(__name__)
# Besides the connections: the store, uploads, artifacts, Ray's sockets and the logs.
OTHER_FILES = 1024


def client_key(host: str) -> str:
    """What ``max_connections_per_client`` counts by: the client's IPv4 address, or its IPv6 address's
    /64 (the share of IPv6 space one host gets: a cap per single address would be a cap per socket)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _raw_answer(status: int, reason: str, body: dict) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, written before (or without) reading a request."""
    payload = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
        "retry-after: 1\r\nconnection: close\r\n\r\n"
    ).encode() + payload


# How long a connection refused at accept stays half-closed, its input read and dropped, before it is closed.
REFUSED_LINGER_S = 2.0
# Paths the global connection cap never refuses (liveness and readiness probes carry no token).
PROBES = frozenset({"/healthz", "/readyz"})


def protocol_for(settings: Settings) -> type[H11Protocol]:
    per_client: dict[str, int] = {}  # open connections by client_key, over all of this server's connections
    per_client_cap = settings.max_connections_per_client

    class GuardedH11Protocol(H11Protocol):
        header_timeout_s = settings.header_timeout_s
        _headers_deadline: asyncio.TimerHandle | None = None
        _counted_as: str | None = None

        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._app, self.app = self.app, self._within_cap

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if self.client is not None:  # None: a Unix socket, no address to count by
                key = self._counted_as = client_key(self.client[0])
                per_client[key] = per_client.get(key, 0) + 1
                if per_client_cap and per_client[key] > per_client_cap:
                    self._refuse_crowded_address(key)
                    return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets the same time for its headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._uncount()
            super().connection_lost(exc)

        def _uncount(self) -> None:
            if self._counted_as is not None:
                left = per_client.pop(self._counted_as) - 1
                if left:
                    per_client[self._counted_as] = left
                self._counted_as = None

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # a refused connection's request is read and dropped: never parsed, never run
            super().data_received(data)

        _refused = False

        def _refuse_crowded_address(self, key: str) -> None:
            # Answered unread: the cheapest refusal, so opening more costs the server nothing. It no longer
            # counts against the address; the write side is shut and what the client already sent is read and
            # dropped for a moment before the close, so the close is not a reset that could lose the 503.
            self._uncount()
            self._refused = True
            message = (
                f"{per_client_cap} connections from {key} are open already, the most one client address may hold "
                "(DG2PF_MAX_CONNECTIONS_PER_CLIENT): reuse them, or close some"
            )
            self.transport.write(_raw_answer(503, "Service Unavailable", error_body("too_many_connections", message)))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_S, self.transport.close)

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

        async def _within_cap(self, scope: dict, receive: Any, send: Any) -> None:
            """The app behind ``max_connections``, counted once the request's headers are complete: the first
            moment its token can be checked (so uvicorn's own ``limit_concurrency``, which cannot, is off)."""
            cap = settings.max_connections
            # This request's own task is in ``tasks`` already: more than the cap means one over it. The health
            # probes pass too: an orchestrator's liveness probe carries no token.
            if (
                scope.get("path") not in PROBES
                and (len(self.connections) > cap or len(self.tasks) > cap)
                and not _carries_token(settings, scope)
            ):
                message = (
                    f"the service is at its limit of {cap} open connections or requests in flight "
                    "(DG2PF_MAX_CONNECTIONS): try again shortly"
                )
                payload = json.dumps(error_body("server_busy", message)).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"retry-after", b"1"),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": payload})
                return
            await self._app(scope, receive, send)

        def send_400_response(self, msg: str) -> None:
            body = json.dumps(
                error_body(
                    "bad_request",
                    "invalid HTTP request: a malformed request line or header, "
                    f"or request line and headers over {settings.max_header_bytes} bytes",
                )
            ).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return GuardedH11Protocol


def _carries_token(settings: Settings, scope: dict) -> bool:
    """True when tokens are set and the request presents one of them (without tokens nobody is told apart)."""
    if not settings.api_tokens:
        return False
    authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
    return token_error(settings.api_tokens, authorization) is None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``."""
    return {
        "host": settings.host,
        "port": settings.port,
        "http": protocol_for(settings),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        # The API has no WebSocket route: an Upgrade request stays an HTTP request, on the protocol that counts it.
        "ws": "none",
        "timeout_keep_alive": 5,
        # On SIGTERM/Ctrl-C, a request still open after this many seconds is cancelled instead of holding
        # the shutdown (event streams end by themselves before: StoppingServer).
        "timeout_graceful_shutdown": 5,
    }


def fit_open_files(max_connections: int) -> None:
    """Raise this process's soft limit on open files (within the hard limit) to what ``max_connections``
    needs: a connection past the limit would fail at accept, for users and intruders alike."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + OTHER_FILES
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        log.warning(
            "DG2PF_MAX_CONNECTIONS (%d) needs about %d open files, but this process may open %d (its hard "
            "limit, ulimit -Hn): raise it, or lower DG2PF_MAX_CONNECTIONS",
            max_connections,
            want,
            new,
        )


class StoppingServer(uvicorn.Server):
    """uvicorn's server, telling the app when a shutdown begins (``app.state.stopping``, an Event): open
    event streams end by themselves within a poll (their clients resume from another API, or this one
    restarted) instead of uvicorn cancelling them at ``timeout_graceful_shutdown`` with a traceback."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.config.app.state.stopping.set()  # create_app's
        super().handle_exit(sig, frame)


def serve(app: Any, settings: Settings) -> None:
    """Run the API until SIGINT/SIGTERM; ``SystemExit(3)`` when it could not start (as ``uvicorn.run``)."""
    fit_open_files(settings.max_connections)
    server = StoppingServer(uvicorn.Config(app, log_level="warning", **uvicorn_options(settings)))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        raise SystemExit(3)
