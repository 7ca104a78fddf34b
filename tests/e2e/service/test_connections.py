"""Sockets held open cannot lock the users out (slowloris).

A real service (uvicorn on a free port, with tokens, attached to a Ray address where nothing listens,
as in test_hostile.py) meets hundreds of connections that send a request line and part of their
headers, then nothing. One client address holds at most DG2PF_MAX_CONNECTIONS_PER_CLIENT of them (the
rest are answered 503 as they are accepted), each only until DG2PF_HEADER_TIMEOUT_S, and a request
with a valid token is served even when held sockets fill DG2PF_MAX_CONNECTIONS. Linux routes all of
127/8 to the loopback interface, so 127.0.0.2 and 127.0.0.3 are other clients of the same machine.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from service_process import ServiceProcess

from dg2pf_service.cluster import free_port
from dg2pf_service.server import client_key

TOKEN = "connections-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOW = 300  # held-open sockets from one address
PER_CLIENT, CAP = 40, 60
HEADER_S = 8.0  # long enough for the probes to run while the sockets are held, on a busy machine
PROBES = 95


def test_a_client_is_counted_by_its_ipv4_address_or_its_ipv6_64():
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"  # an IPv4 client on a dual-stack socket


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("connections")
    nowhere = f"127.0.0.1:{free_port()}"
    svc = ServiceProcess(
        root / "state",
        DG2PF_RAY_ADDRESS=nowhere,
        DG2PF_RAY_DASHBOARD_URL=f"http://{nowhere}",
        DG2PF_POLL_SECONDS="60",
        DG2PF_SERVE_POLL_SECONDS="3600",
        DG2PF_API_TOKENS=TOKEN,
        DG2PF_MAX_CONNECTIONS=str(CAP),
        DG2PF_MAX_CONNECTIONS_PER_CLIENT=str(PER_CLIENT),
        DG2PF_HEADER_TIMEOUT_S=str(HEADER_S),
    )
    try:
        yield svc.start(timeout=180)
    finally:
        svc.stop()


def open_slow(service, source: str, n: int) -> list[socket.socket]:
    """``n`` connections from ``source``, each sending a request line and part of its headers, then nothing."""
    partial = f"GET /jobs HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nX-Slow: ".encode()
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=10, source_address=(source, 0))
        sock.sendall(partial)
        socks.append(sock)
    return socks


def read_all(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sends until it closes (None: it reset the connection)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data or None
    return data


def sort_out(socks: list[socket.socket]) -> tuple[list[socket.socket], list[bytes | None]]:
    """The sockets the server holds (open, unanswered) and what the others got (an answer, or a reset)."""
    time.sleep(1.0)  # the server accepts and answers them in that time, even on a busy machine
    held, answers = [], []
    for sock in socks:
        sock.setblocking(False)
        try:
            first = sock.recv(65536)
        except BlockingIOError:
            held.append(sock)
            continue
        except ConnectionResetError:
            first = None
        answers.append(first if not first else first + (read_all(sock, 5) or b""))
        sock.close()
    return held, answers


def probe(service, source: str, headers: dict[str, str] | None = None) -> int:
    """GET /jobs from ``source`` on a fresh connection: its status, or 0 when the connection failed."""
    lines = ["GET /jobs HTTP/1.1", f"Host: 127.0.0.1:{service.port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    try:
        with socket.create_connection(("127.0.0.1", service.port), timeout=10, source_address=(source, 0)) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            answer = read_all(sock, 10) or b""
    except OSError:
        return 0
    return int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else 0


def still_open(socks: list[socket.socket]) -> int:
    n = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            n += sock.recv(1) == b"x"  # never: nothing is sent on a held socket
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def error_type(answer: bytes) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower(), head
    return json.loads(body)["error"]["type"]


@pytest.mark.slow
def test_one_address_holds_its_share_and_only_until_the_header_timeout(service):
    opened = time.monotonic()
    socks = open_slow(service, "127.0.0.1", SLOW)
    held, answers = sort_out(socks)
    refused_503 = sum(1 for a in answers if a and error_type(a) == "too_many_connections")
    reset = sum(1 for a in answers if a is None)
    assert len(held) == PER_CLIENT
    assert refused_503 == SLOW - PER_CLIENT and reset == 0  # every refusal is a readable 503: never a reset or a hang

    # Another address: every probe is served, with its token or refused for the lack of one (never 503).
    started = time.monotonic()
    statuses = [probe(service, "127.0.0.2", AUTH) for _ in range(PROBES)]
    probing = time.monotonic() - started
    assert probe(service, "127.0.0.2") == 401
    assert still_open(held) == PER_CLIENT, "the sockets timed out before the probes ran: raise HEADER_S"
    # The crowded address itself is refused before anything is read, a token or not.
    assert probe(service, "127.0.0.1", AUTH) in (0, 503)
    print(
        f"\n{SLOW} slow sockets from 127.0.0.1: {len(held)} held, {refused_503} refused with 503, {reset} reset; "
        f"authenticated probes from 127.0.0.2: {statuses.count(200)}/{PROBES} answered 200 (in {probing:.1f} s)"
    )
    assert statuses == [200] * PROBES

    # Each held socket is closed, unanswered, once its headers are HEADER_S late.
    closed = [read_all(sock, HEADER_S + 20) for sock in held]
    waited = time.monotonic() - opened
    assert all(data in (b"", None) for data in closed)
    assert waited < HEADER_S + 15, f"the held sockets were closed after {waited:.1f} s (header timeout {HEADER_S} s)"
    print(f"the {len(held)} held sockets were closed {waited:.1f} s after they opened (header timeout {HEADER_S:g} s)")
    for sock in held:
        sock.close()
    assert probe(service, "127.0.0.1", AUTH) == 200  # the address may connect again


@pytest.mark.slow
def test_a_token_is_served_when_held_sockets_fill_the_connection_cap(service):
    # Two addresses hold their share each: 2 x PER_CLIENT connections, over CAP.
    held = []
    for source in ("127.0.0.1", "127.0.0.3"):
        mine, _ = sort_out(open_slow(service, source, SLOW // 2))
        held += mine
    assert len(held) == 2 * PER_CLIENT > CAP
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10) as client:  # a real client
        r = client.get(f"{service.url}/jobs")
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_busy"
    assert "DG2PF_MAX_CONNECTIONS" in r.json()["error"]["message"]
    # the health probes carry no token and pass the cap: an orchestrator's liveness probe keeps working
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10) as client:
        assert client.get(f"{service.url}/healthz").status_code == 200
    statuses = [probe(service, "127.0.0.2", AUTH) for _ in range(PROBES)]
    assert still_open(held) == len(held), "the sockets timed out before the probes ran: raise HEADER_S"
    print(
        f"\n{len(held)} held sockets over a cap of {CAP}: unauthenticated 503, authenticated probes "
        f"{statuses.count(200)}/{PROBES} answered 200"
    )
    assert statuses == [200] * PROBES
    for sock in held:
        sock.close()
