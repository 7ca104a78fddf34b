"""POST /checkpoints under hostile uploads: cut off at the size limit while the body streams in,
aborted when the body stalls, zip bombs refused before they are inflated, checks off the event loop,
and nothing half-received ever left where jobs look.

The service is a real process (uvicorn on a free port, SQLite) as in test_api.py, but attached to a
Ray address where nothing listens: uploads never touch Ray, and the tests stay light on a small
machine. Raw sockets send the bodies a browser or httpx would not (stalled, endless, chunked), so
what the server did can be measured from the client's side.
"""

from __future__ import annotations

import fcntl
import io
import select
import socket
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from service_process import ServiceProcess

from dg2pf_client import Client, TooLarge
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_service.cluster import free_port
from dg2pf_service.settings import Settings
from dg2pf_service.uploads import STAGING, clean_partial_uploads

pytestmark = pytest.mark.slow
LIMIT = 2_000_000
IDLE_S = 2.0
TOTAL_S = 5.0
MB = 1 << 20
BOUNDARY = "dg2pf-test-boundary"


def start_service(root: Path, **env: str) -> ServiceProcess:
    nowhere = f"127.0.0.1:{free_port()}"
    return ServiceProcess(
        root / "state",
        DG2PF_RAY_ADDRESS=nowhere,
        DG2PF_RAY_DASHBOARD_URL=f"http://{nowhere}",
        DG2PF_POLL_SECONDS="60",
        DG2PF_SERVE_POLL_SECONDS="3600",
        DG2PF_MAX_UPLOAD_BYTES=str(LIMIT),
        DG2PF_UPLOAD_IDLE_TIMEOUT_S=str(IDLE_S),
        DG2PF_UPLOAD_TIMEOUT_S=str(TOTAL_S),
        **env,
    ).start(timeout=120)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("uploads"))
    yield svc
    svc.stop()


@pytest.fixture
def staging(service) -> Path:
    return service.data_dir / "checkpoints" / STAGING


def staged_files(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def part_head(name: str = "file", filename: str = "model.pt") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def request_head(port: int, **headers: str) -> bytes:
    lines = [
        "POST /checkpoints HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
    ]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    # A small send buffer: what sendall has handed over is then close to what the server has read.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    sock.settimeout(30)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """Status and raw bytes of the answer, read until the server closes (a reset after it is fine)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12]), data


def upload(service: ServiceProcess, files, **kw) -> httpx.Response:
    return httpx.post(f"{service.url}/checkpoints", files=files, timeout=60, **kw)


def small_checkpoint(path: Path, value: float = 1.0) -> Path:
    save_state_dict({"w": torch.full((64,), value)}, path)
    return path


def zip_bomb(declared: int) -> bytes:
    """A torch.save-style zip (data.pkl and a storage record) whose storage inflates to ``declared``
    zero bytes from a few kilobytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/version", b"3\n")
        with archive.open("archive/data/0", "w") as member:
            zeros = bytes(MB)
            for _ in range(declared // MB):
                member.write(zeros)
    return out.getvalue()


def test_a_good_upload_is_stored_once_and_deduplicated(service, staging, tmp_path):
    path = small_checkpoint(tmp_path / "model.safetensors")
    with Client(service.url) as client:
        first = client.upload_checkpoint(path)
    again = upload(service, {"file": ("other-name.safetensors", path.read_bytes())})
    assert again.status_code == 200 and again.json() == first.model_dump()
    assert first.bytes == path.stat().st_size
    visible = [p.name for p in (service.data_dir / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert visible == [f"{first.id}.safetensors"]
    assert staged_files(staging) == []


def test_a_chunked_upload_far_over_the_limit_is_cut_off_near_the_limit(service, staging):
    # No Content-Length: only counting while the body streams in can stop it. 64 MB would be sent.
    sock = connect(service.port)
    sock.sendall(request_head(service.port, Transfer_Encoding="chunked"))
    sent, piece = 0, bytes(64 * 1024)
    for data in [part_head()] + [piece] * 1024:
        if select.select([sock], [], [], 0)[0]:
            break  # answered
        try:
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(data)
    status, answer = read_answer(sock)
    sock.close()
    assert status == 413 and b"DG2PF_MAX_UPLOAD_BYTES" in answer
    assert LIMIT < sent <= LIMIT + MB, f"{sent} bytes were taken before the 413 (limit {LIMIT})"
    assert staged_files(staging) == []


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read(service, staging, tmp_path):
    sock = connect(service.port)
    start = time.monotonic()
    sock.sendall(request_head(service.port, Content_Length=str(1 << 30)))  # and not one byte of body
    status, answer = read_answer(sock)
    sock.close()
    # Had the server waited for the body, the idle timeout would have answered 408 after IDLE_S.
    assert status == 413 and time.monotonic() - start < IDLE_S
    assert b"1073741824 bytes" in answer
    # The Python client gets the same answer for a file over the limit.
    big = tmp_path / "big.safetensors"
    save_state_dict({"w": torch.zeros(LIMIT // 4 + 1000)}, big)
    with Client(service.url) as client, pytest.raises(TooLarge, match="DG2PF_MAX_UPLOAD_BYTES"):
        client.upload_checkpoint(big)
    assert staged_files(staging) == []


def test_a_stalled_body_is_aborted_with_408_and_its_partial_file_removed(service, staging):
    head, body = part_head(), bytes(1000)
    sock = connect(service.port)
    start = time.monotonic()
    sock.sendall(request_head(service.port, Content_Length=str(len(head) + len(body) + 100)) + head + body[:500])
    time.sleep(IDLE_S / 4)
    assert len(staged_files(staging)) == 1  # the part being received, hidden from jobs
    status, answer = read_answer(sock)
    elapsed = time.monotonic() - start
    sock.close()
    assert status == 408 and b"DG2PF_UPLOAD_IDLE_TIMEOUT_S" in answer
    assert IDLE_S * 0.9 <= elapsed <= IDLE_S + 3
    assert staged_files(staging) == []


def test_a_client_that_goes_away_mid_upload_leaves_nothing(service, staging):
    sock = connect(service.port)
    sock.sendall(request_head(service.port, Content_Length=str(LIMIT)) + part_head() + bytes(100_000))
    deadline = time.monotonic() + IDLE_S / 2  # well before the idle timeout would remove it
    while not staged_files(staging) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(staged_files(staging)) == 1
    sock.close()
    while staged_files(staging) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert staged_files(staging) == []


def test_a_trickling_body_is_aborted_when_the_upload_takes_too_long(service, staging):
    # A byte every half second never trips the idle timeout; the bound on the whole upload stops it.
    sock = connect(service.port)
    start = time.monotonic()
    sock.sendall(
        request_head(service.port, Transfer_Encoding="chunked") + b"%x\r\n%s\r\n" % (len(part_head()), part_head())
    )
    while not select.select([sock], [], [], IDLE_S / 4)[0]:
        sock.sendall(b"1\r\n\x00\r\n")
        assert time.monotonic() - start < TOTAL_S + 5, "no answer"
    status, answer = read_answer(sock)
    sock.close()
    assert status == 408 and b"DG2PF_UPLOAD_TIMEOUT_S" in answer
    assert TOTAL_S * 0.9 <= time.monotonic() - start <= TOTAL_S + 3
    assert staged_files(staging) == []


def test_a_zip_bomb_is_refused_before_it_is_inflated(service, staging):
    bomb = zip_bomb(64 * MB)  # 16x the default ceiling of 4 x DG2PF_MAX_UPLOAD_BYTES
    assert len(bomb) < LIMIT
    r = upload(service, {"file": ("bomb.pt", bomb)})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert (
        err["type"] == "too_large" and "DG2PF_MAX_UNCOMPRESSED_BYTES" in err["message"] and "bomb.pt" in err["message"]
    )
    assert staged_files(staging) == []


def test_a_compact_artifact_expanding_past_the_ceiling_is_refused_before_it_is_read(service, staging, tmp_path):
    from dg2pf_core.io.compact import save_compact

    path = tmp_path / "sparse.safetensors"
    save_compact({"w": torch.zeros(12_000_000)}, path)  # a 1.5 MB bitmask standing for 48 MB of zeros
    assert path.stat().st_size < LIMIT
    r = upload(service, {"file": (path.name, path.read_bytes())})
    assert r.status_code == 413, r.text
    assert "compact layout" in r.json()["error"]["message"] and "48000000 bytes" in r.json()["error"]["message"]
    assert staged_files(staging) == []


def safetensors_file(header: bytes, data: bytes = bytes(8)) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


def _tensor(offsets: str, shape: str = "[2]", dtype: str = '"F32"') -> bytes:
    return f'{{"a":{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}}}}}'.encode()


# Headers that once crashed the check (RecursionError, OverflowError: 500s) and their kin.
MALFORMED_HEADERS = [
    (b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
    (_tensor("[0,1e400]"), "data_offsets must be two integers"),
    (_tensor("[0,8.0]"), "data_offsets must be two integers"),
    (_tensor("[-8,0]"), "data_offsets must be two integers"),
    (_tensor("[8,0]"), "data_offsets must be two integers"),
    (_tensor("[0,99999999999]"), "data_offsets must be two integers"),
    (_tensor("[false,true]"), "data_offsets must be two integers"),
    (_tensor('"0,8"'), "data_offsets must be two integers"),
    (_tensor("[0," + "9" * 5000 + "]"), "not JSON"),
    (_tensor("[0,8]", shape="[1e400]"), "shape of non-negative integers"),
    (_tensor("[0,8]", dtype="7"), "dtype name"),
    (b'{"a":"x"}', "not an object"),
    (b'{"a":[0,8]}', "not an object"),
    (b'{"__metadata__":[1]}', "__metadata__"),
    (
        b'{"__metadata__":{"format":"dg2pf-compact","layout":"' + b"[" * 100_000 + b'"}}',
        "compact layout cannot be read",
    ),
    (b'{"a\xff":1}', "not JSON"),
]


@pytest.mark.parametrize("header, why", MALFORMED_HEADERS, ids=lambda v: v if isinstance(v, str) else None)
def test_a_malformed_safetensors_header_is_refused_with_a_message(service, staging, header, why):
    from dg2pf_core.io.compact import FORMAT

    body = safetensors_file(header.replace(b"dg2pf-compact", FORMAT.encode()))
    assert len(body) < LIMIT
    r = upload(service, {"file": ("crafted.safetensors", body)})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_checkpoint" and why in err["message"] and "crafted.safetensors" in err["message"], (
        err
    )
    assert staged_files(staging) == []


def test_an_unexpected_error_while_checking_is_a_refusal_logged_with_its_traceback(tmp_path, monkeypatch, caplog):
    from dg2pf_service import uploads

    def crash(_path, **_options):
        raise OverflowError("a reader's bug, reached through a crafted file")

    path = small_checkpoint(tmp_path / "staged-name")
    monkeypatch.setattr(uploads, "read_state_dict", crash)
    limits = uploads.UploadLimits.from_settings(Settings(data_dir=tmp_path / "state"))
    with caplog.at_level("ERROR", logger="dg2pf.uploads"), pytest.raises(uploads.UploadRefused) as refused:
        uploads._check(path, "model.safetensors", limits)
    assert refused.value.status == 422 and refused.value.type == "invalid_checkpoint"
    assert refused.value.message.startswith(
        "model.safetensors is not a readable checkpoint: OverflowError: a reader's bug"
    )
    assert str(path) not in refused.value.message  # the staging path is the service's business
    assert any(r.exc_info and r.exc_info[0] is OverflowError for r in caplog.records)


def slow_to_check(size: int = LIMIT - 1000) -> bytes:
    # A plain pickle of one-byte opcodes: the reader scans each opcode in Python (~1 s per MB here)
    # before refusing it, so checking it on the event loop would stall every other request.
    return b"\x80\x04" + b"N" * (size - 3) + b"."


def test_health_checks_answer_while_uploads_are_checked(service, staging):
    results: list[httpx.Response] = []

    def send() -> None:
        results.append(upload(service, {"file": ("slow.pt", slow_to_check())}))

    senders = [threading.Thread(target=send) for _ in range(3)]
    start = time.monotonic()
    for t in senders:
        t.start()
    latencies = []
    while any(t.is_alive() for t in senders):
        t0 = time.monotonic()
        assert httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.05)
    checking = time.monotonic() - start
    assert [r.status_code for r in results] == [422] * 3
    assert all(
        r.json()["error"]["type"] == "invalid_checkpoint" and "slow.pt" in r.json()["error"]["message"] for r in results
    )
    # Meaningful only if the checks took a while; on the event loop /healthz would have waited that long.
    assert checking > 1.5
    assert max(latencies) < 1.0, (
        f"/healthz took up to {max(latencies):.2f} s while uploads were checked for {checking:.1f} s"
    )
    assert staged_files(staging) == []


@pytest.mark.parametrize(
    "files, what",
    [
        ({"note": (None, b"a plain field")}, "no file in the field 'file'"),
        ({"file": ("a.pt", b"x"), "second": ("b.pt", b"y")}, "more than one file part"),
        ({"weights": ("a.pt", b"x")}, "sent in the field 'weights'"),
        ({"file": ("a.pt", b"")}, "empty"),
    ],
)
def test_a_body_without_exactly_one_file_is_refused(service, staging, files, what):
    r = upload(service, files)
    assert r.status_code == 422, r.text
    assert what in r.json()["error"]["message"] and r.json()["error"]["field"] == "file"
    assert staged_files(staging) == []


def test_a_body_that_is_not_multipart_is_refused(service):
    r = httpx.post(
        f"{service.url}/checkpoints", content=b"\x00" * 100, headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 422 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(
        f"{service.url}/checkpoints",
        content=part_head() + b"x" * 10,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"]


def test_clean_partial_uploads_removes_leftovers_but_not_live_uploads(tmp_path):
    settings = Settings(data_dir=tmp_path / "state")
    staging = settings.checkpoints_dir / STAGING
    staging.mkdir(parents=True)
    kept = small_checkpoint(settings.checkpoints_dir / "0123.safetensors")
    left = [staging / "a.pt", staging / "b.upload", settings.checkpoints_dir / ".upload-old"]  # the last: older code's
    for p in left:
        p.write_bytes(b"partial")
    live = staging / "live.safetensors"
    with open(live, "wb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # as a live API process holds the file it receives
        assert sorted(clean_partial_uploads(settings)) == sorted(left)
        assert live.exists() and kept.exists()
    assert clean_partial_uploads(settings) == [live]
    assert staged_files(staging) == [] and kept.exists()
    assert clean_partial_uploads(Settings(data_dir=tmp_path / "never-used")) == []


def test_an_api_killed_while_checking_leaves_only_a_hidden_file_that_clean_up_removes(tmp_path):
    svc = start_service(tmp_path)
    body = slow_to_check()
    outcome: list[BaseException] = []

    def send() -> None:
        try:
            upload(svc, {"file": ("slow.pt", body)})
        except httpx.HTTPError as exc:  # the server died mid-request
            outcome.append(exc)

    checkpoints = svc.data_dir / "checkpoints"
    try:
        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            p.stat().st_size == len(body) for p in (checkpoints / STAGING).glob("*")
        ):
            time.sleep(0.02)
        time.sleep(0.2)  # received in full: being checked now (that takes over a second)
        svc.kill()
        sender.join(30)
    finally:
        svc.stop()
    assert len(outcome) == 1
    assert len(staged_files(checkpoints / STAGING)) == 1
    assert [p.name for p in checkpoints.iterdir()] == [STAGING]  # nothing a job could pick up
    removed = clean_partial_uploads(Settings(data_dir=svc.data_dir))
    assert len(removed) == 1 and staged_files(checkpoints / STAGING) == []
