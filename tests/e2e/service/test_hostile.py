"""Hostile requests against a real service with tokens and data roots: nothing is read before the
token, bodies and headers are bounded in size and time, and a checkpoint path can name nothing but a
regular file under the roots (refusals say nothing of what exists elsewhere).

Like test_uploads.py, the service is a real process attached to a Ray address where nothing listens:
every request here is refused before Ray would be asked. Raw sockets send what httpx would not.
"""

from __future__ import annotations

import io
import os
import select
import socket
import time
import zipfile

import httpx
import pytest
from service_process import ServiceProcess

from dg2pf_service.cluster import free_port

pytestmark = pytest.mark.slow
TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IDLE_S = 2.0
HEADER_S = 2.0
MB = 1 << 20


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "data").mkdir()
    nowhere = f"127.0.0.1:{free_port()}"
    svc = ServiceProcess(
        root / "state",
        DG2PF_RAY_ADDRESS=nowhere,
        DG2PF_RAY_DASHBOARD_URL=f"http://{nowhere}",
        DG2PF_POLL_SECONDS="60",
        DG2PF_SERVE_POLL_SECONDS="3600",
        DG2PF_API_TOKENS=TOKEN,
        DG2PF_DATA_ROOTS=str(root / "data"),
        DG2PF_MAX_UPLOAD_BYTES=str(4 * MB),
        DG2PF_MAX_UNCOMPRESSED_BYTES=str(16 * MB),
        DG2PF_UPLOAD_IDLE_TIMEOUT_S=str(IDLE_S),
        DG2PF_HEADER_TIMEOUT_S=str(HEADER_S),
    ).start(timeout=120)
    svc.root = root  # type: ignore[attr-defined]
    yield svc
    svc.stop()


def raw(service, head: bytes, body: bytes = b"", timeout: float = 20.0) -> tuple[int, bytes, float]:
    """Send ``head`` + ``body`` and read until the server closes: status, bytes, seconds to the answer."""
    sock = socket.create_connection(("127.0.0.1", service.port))
    sock.settimeout(timeout)
    started = time.monotonic()
    sock.sendall(head + body)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return (int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0), data, time.monotonic() - started


def post_head(service, path: str = "/jobs", **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{service.port}", "Content-Type: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def error_of(data: bytes) -> dict:
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    import json

    error = json.loads(body)["error"]
    assert set(error) == {"type", "field", "message"}
    return error


def test_nothing_is_read_before_the_token_is_checked(service):
    # 300 MB announced, one byte sent: the answer comes at once, from the headers alone.
    status, data, _ = raw(service, post_head(service, Content_Length=str(300 * MB)), b"{")
    assert status == 401 and error_of(data)["type"] == "unauthorized"
    status, data, _ = raw(service, post_head(service, Content_Length=str(300 * MB), Authorization="Bearer nope"), b"{")
    assert status == 403
    # Unknown routes too: without the token nobody learns which routes exist.
    assert httpx.get(f"{service.url}/no/such/route").status_code == 401
    assert httpx.get(f"{service.url}/healthz").status_code == 200


def test_bodies_over_the_limit_are_cut_off(service):
    status, data, _ = raw(
        service, post_head(service, Content_Length=str(2 * MB), Authorization=f"Bearer {TOKEN}"), b"{"
    )
    assert status == 413 and "DG2PF_MAX_REQUEST_BYTES" in error_of(data)["message"]

    # Chunked, no Content-Length: counted while it streams in; 64 MB would be sent.
    sock = socket.create_connection(("127.0.0.1", service.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)  # what is sent is then close to what is read
    sock.settimeout(20)
    sock.sendall(post_head(service, Transfer_Encoding="chunked", Authorization=f"Bearer {TOKEN}"))
    sent, piece = 0, b"a" * 65536
    for data in [b'{"name": "'] + [piece] * 1024:
        if select.select([sock], [], [], 0)[0]:
            break  # answered
        try:
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(data)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and error_of(answer)["type"] == "too_large", answer[:300]
    assert sent <= 2 * MB, f"{sent} bytes were taken before the 413 (limit 1 MiB)"


def test_a_stalled_body_gets_408(service):
    status, data, seconds = raw(
        service, post_head(service, Content_Length="100", Authorization=f"Bearer {TOKEN}"), b"{"
    )
    assert status == 408 and error_of(data)["type"] == "request_timeout"
    assert seconds < IDLE_S + 10


def test_headers_that_never_end_or_are_too_large_are_refused(service):
    # Slowloris: a request line and part of the headers, then nothing: the server closes the connection.
    status, data, seconds = raw(service, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n".encode())
    assert status == 0 and data == b"" and seconds < HEADER_S + 10
    # Opened, then silent.
    status, data, seconds = raw(service, b"")
    assert data == b"" and seconds < HEADER_S + 10
    status, data, _ = raw(service, f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 200_000}\r\n\r\n".encode())
    assert status == 400 and error_of(data)["type"] == "bad_request"


def test_trailing_slashes_are_not_redirected(service):
    r = httpx.get(f"{service.url}/jobs/", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def spec(checkpoint: str) -> dict:
    return {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": checkpoint},
        "dataset": {"spec": "digits"},
        "sparsity": 0.5,
    }


def zip_bomb(declared: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/version", b"3\n")
        with archive.open("archive/data/0", "w") as member:
            for _ in range(declared // MB):
                member.write(bytes(MB))
    return out.getvalue()


def submit(service, checkpoint: str) -> httpx.Response:
    return httpx.post(f"{service.url}/jobs", json=spec(checkpoint), headers=AUTH, timeout=30)


def test_a_checkpoint_path_names_only_a_regular_file_under_the_roots(service, tmp_path):
    data = service.root / "data"
    fifo = data / "model.fifo"
    os.mkfifo(fifo)  # opening it for reading would block a worker thread forever
    r = submit(service, str(fifo))
    assert r.status_code == 422 and "not a regular file" in r.json()["error"]["message"], r.text
    assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
    # Outside the roots, existing or not, linked or not: one answer, naming nothing found there.
    (tmp_path / "exists.pt").write_bytes(b"x")
    os.symlink(tmp_path / "exists.pt", data / "link-out.pt")
    answers = {
        submit(service, p).json()["error"]["message"].replace(p, "PATH")
        for p in (
            str(tmp_path / "exists.pt"),
            str(tmp_path / "missing.pt"),
            "/proc/self/cwd",
            "/proc/self/mem",
            str(data / "link-out.pt"),
        )
    }
    assert len(answers) == 1, answers
    (message,) = answers
    assert "not a file under DG2PF_DATA_ROOTS" in message and str(tmp_path) not in message


def test_a_zip_bomb_named_by_path_is_refused_by_its_directory_and_not_registered(service):
    bomb = service.root / "data" / "bomb.pt"
    bomb.write_bytes(zip_bomb(64 * MB))  # 64 MiB in memory against a 16 MiB ceiling; ~64 KB on disk
    r = submit(service, str(bomb))
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "in memory" in message and "DG2PF_MAX_UNCOMPRESSED_BYTES" in message
    assert str(service.data_dir) not in message  # the store's paths are not the client's business
    checkpoints = service.data_dir / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.is_file()] == []


def test_a_valid_job_while_ray_does_not_answer_gets_503_and_creates_nothing(service):
    from dg2pf_core.io.checkpoint_save import save_state_dict
    from dg2pf_core.models import build_model

    path = service.root / "data" / "good.safetensors"
    save_state_dict(build_model("digits_cnn", 10).state_dict(), path)
    r = submit(service, str(path))
    assert r.status_code == 503 and r.json()["error"]["type"] == "cluster_unavailable", r.text
    assert "submit it again" in r.json()["error"]["message"]
    assert httpx.get(f"{service.url}/jobs", headers=AUTH).json()["total"] == 0
