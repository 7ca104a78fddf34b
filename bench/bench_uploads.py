"""POST /checkpoints under hostile uploads: bytes read past the size limit, memory of the worst accepted
uploads, and /healthz latency while uploads are checked.

The script starts real service processes (``python -m dg2pf_service --port P``, as
``tests/support/service_process.py`` does) in a fresh temp data dir: SQLite, and a Ray address where
nothing listens (uploads never touch Ray; no Ray head competes for the 2 cores).

a. **Cut-off.** Against ``DG2PF_MAX_UPLOAD_BYTES=2000000``: a 1 GiB file part generated on the fly,
   sent with ``Transfer-Encoding: chunked`` (no Content-Length, so only counting while the body
   streams in can stop it) in 64 KiB HTTP chunks from a raw socket, checking before each chunk
   whether the answer has arrived. Reported: bytes the client had handed to the kernel when the
   answer came, once with a 32 KiB socket send buffer (close to what the server read) and once
   with the default one (which adds what sits in the kernel's buffers); and what the API process
   itself read (``rchar`` of ``/proc/PID/io``: every byte its read() calls returned, the request
   included), minus the limit. Also the time to the 413.
b. **Memory.** Against ``DG2PF_MAX_UPLOAD_BYTES=64 MiB`` (so the uncompressed ceiling is 256 MiB,
   4x): the API process's peak RSS (``VmHWM``, reset before each case by writing 5 to
   ``/proc/PID/clear_refs``) over its RSS before the upload, while it checks: a safetensors file just
   under the upload limit; a torch.save zip whose storage record is deflated (a few hundred KB on
   the wire) and declares just under the ceiling; four of those at once (at most
   ``DG2PF_UPLOAD_VALIDATIONS=2`` are checked at a time); and one declaring just over the ceiling
   (refused before it is inflated).
c. **/healthz while uploads are checked.** Against the 2 MB limit: four client threads upload, again
   and again, a 2 MB file that is slow to check (a plain pickle of one-byte opcodes, which the reader
   scans opcode by opcode in Python before refusing it: about 1 s per MB here, the worst accepted
   size); meanwhile one client GETs /healthz every 10 ms. Windows with and without uploads alternate
   (``--rounds`` each, ``--window`` s long), p50/p99/max per variant and the ratio.

The report goes to stdout and ``bench/results/bench_uploads.json``; unless ``--no-docs`` (or
``--quick``), the measured block of docs/benchmarks.md section 9 (between its markers) is replaced.

    .venv/bin/python bench/bench_uploads.py [--quick] [--no-docs] [--keep]
"""

from __future__ import annotations

import argparse
import io
import os
import select
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import torch
from benchreport import (
    ProcessTreeContention,
    contention_line,
    environment,
    environment_lines,
    table,
    update_docs,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from service_process import ServiceProcess  # noqa: E402  (the tests' way of starting a real service)

from dg2pf_core.io.checkpoint_save import save_state_dict  # noqa: E402
from dg2pf_service.cluster import free_port  # noqa: E402
from dg2pf_service.uploads import in_memory_size  # noqa: E402

MIB = 1 << 20
SMALL_LIMIT = 2_000_000
BIG_LIMIT = 64 * MIB
CEILING = 4 * BIG_LIMIT
BOUNDARY = "bench-boundary"
DOCS = ROOT / "docs" / "benchmarks.md"


def start_service(root: Path, limit: int) -> ServiceProcess:
    nowhere = f"127.0.0.1:{free_port()}"
    return ServiceProcess(
        root / "state",
        DG2PF_RAY_ADDRESS=nowhere,
        DG2PF_RAY_DASHBOARD_URL=f"http://{nowhere}",
        DG2PF_POLL_SECONDS="600",
        DG2PF_SERVE_POLL_SECONDS="3600",
        DG2PF_MAX_UPLOAD_BYTES=str(limit),
    ).start(timeout=120)


def proc_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


# --- a. cut-off ------------------------------------------------------------------------------------


def oversized_chunked(svc: ServiceProcess, total: int, sndbuf: int | None) -> dict:
    pid = svc.proc.pid
    sock = socket.create_connection(("127.0.0.1", svc.port))
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(60)
    head = (
        f"POST /checkpoints HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="huge.pt"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    piece = os.urandom(64 * 1024)
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    read0 = rchar(pid)
    t0 = time.perf_counter()
    sock.sendall(head + f"{len(part):x}\r\n".encode() + part + b"\r\n")
    sent = len(part)
    while sent < total:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    seconds = time.perf_counter() - t0
    sock.close()
    time.sleep(0.2)
    return {
        "status": int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else None,
        "client_sent": sent,
        "server_read": rchar(pid) - read0,
        "seconds": seconds,
        "sndbuf": sndbuf,
    }


# --- b. memory -------------------------------------------------------------------------------------


def near_limit_safetensors(path: Path) -> Path:
    save_state_dict({"w": torch.randn((BIG_LIMIT - 1024) // 4)}, path)
    assert path.stat().st_size <= BIG_LIMIT
    return path


def deflated_torch_zip(path: Path, declared: int) -> Path:
    """A real torch.save file of one float32 tensor of zeros, every record deflated (torch reads it)."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros((declared - 64 * 1024) // 4)}, buf)
    plain = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in plain.infolist():
            out.writestr(info.filename, plain.read(info.filename))
    return path


def post_file(url: str, path: Path) -> httpx.Response:
    with path.open("rb") as fh:
        return httpx.post(
            f"{url}/checkpoints", files={"file": (path.name, fh, "application/octet-stream")}, timeout=600
        )


def peak_while(svc: ServiceProcess, path: Path, copies: int) -> dict:
    pid = svc.proc.pid
    time.sleep(0.5)
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = proc_kb(pid, "VmRSS")
    results: list[httpx.Response] = []
    t0 = time.perf_counter()
    senders = [threading.Thread(target=lambda: results.append(post_file(svc.url, path))) for _ in range(copies)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    seconds = time.perf_counter() - t0
    peak = proc_kb(pid, "VmHWM")
    return {
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "declared_bytes": in_memory_size(path, 1 << 62)[0],
        "copies": copies,
        "statuses": sorted(r.status_code for r in results),
        "rss_before_mb": before / 1024,
        "peak_mb": peak / 1024,
        "peak_over_before_mb": (peak - before) / 1024,
        "seconds": seconds,
        "rss_after_mb": proc_kb(pid, "VmRSS") / 1024,
    }


# --- c. /healthz while uploads are checked ---------------------------------------------------------


def slow_to_check(path: Path) -> Path:
    path.write_bytes(b"\x80\x04" + b"N" * (SMALL_LIMIT - 1000) + b".")
    return path


def healthz_windows(svc: ServiceProcess, slow: Path, rounds: int, window: float, uploaders: int) -> dict:
    lat: dict[str, list[float]] = {"without uploads": [], "4 uploads in flight": []}
    statuses: list[int] = []
    body = slow.read_bytes()
    with httpx.Client(base_url=svc.url, timeout=30) as probe:
        probe.get("/healthz")
        for r in range(rounds):
            for variant in list(lat) if r % 2 == 0 else list(lat)[::-1]:
                stop = threading.Event()
                threads = []
                if variant != "without uploads":

                    def loop() -> None:
                        with httpx.Client(base_url=svc.url, timeout=600) as c:
                            while not stop.is_set():
                                statuses.append(c.post("/checkpoints", files={"file": ("slow.pt", body)}).status_code)

                    threads = [threading.Thread(target=loop) for _ in range(uploaders)]
                    for t in threads:
                        t.start()
                    time.sleep(0.5)  # received; being checked (or waiting for a check slot)
                end = time.perf_counter() + window
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    probe.get("/healthz").raise_for_status()
                    lat[variant].append(time.perf_counter() - t0)
                    time.sleep(0.01)
                stop.set()
                for t in threads:
                    t.join()
    out = {}
    for variant, values in lat.items():
        values = sorted(values)
        out[variant] = {
            "n": len(values),
            "p50_ms": 1000 * statistics.median(values),
            "p99_ms": 1000 * values[min(len(values) - 1, int(0.99 * len(values)))],
            "max_ms": 1000 * values[-1],
        }
    out["uploads_checked"] = len(statuses)
    out["upload_statuses"] = sorted(set(statuses))
    return out


# --- report ----------------------------------------------------------------------------------------


def report(cut: list[dict], mem: list[dict], health: dict, env: dict, args) -> str:
    lines = [
        "### bench_uploads: POST /checkpoints under hostile uploads (real service process, SQLite)",
        "",
        environment_lines(env),
        "- service: `python -m dg2pf_service`, uvicorn (httptools, uvloop), no Ray head "
        "(an address where nothing listens); DG2PF_UPLOAD_VALIDATIONS=2 (default)",
        contention_line(env["contention"]),
        "",
    ]
    lines += [f"#### a. a 1 GiB chunked upload against DG2PF_MAX_UPLOAD_BYTES={SMALL_LIMIT}", ""]
    rows = [
        [
            "32 KiB" if c["sndbuf"] else "default",
            c["status"],
            c["client_sent"] - SMALL_LIMIT,
            c["server_read"] - SMALL_LIMIT,
            f"{1000 * c['seconds']:.0f}",
        ]
        for c in cut
    ]
    lines += [
        table(
            [
                "client send buffer",
                "answer",
                "client had sent past the limit (bytes)",
                "API process read past the limit (bytes, rchar)",
                "ms to the answer",
            ],
            rows,
        ),
        "",
    ]
    worst = max(c["server_read"] - SMALL_LIMIT for c in cut)
    lines += [
        f"- most the API process read past the limit: {worst} bytes (target < 1 MB: "
        f"{'met' if worst < 1_000_000 and all(c['status'] == 413 for c in cut) else 'NOT met'})",
        "",
    ]
    lines += [
        f"#### b. peak RSS of the API process while it checks (DG2PF_MAX_UPLOAD_BYTES={BIG_LIMIT}, ceiling {CEILING})",
        "",
    ]
    rows = [
        [
            m["file"],
            m["file_bytes"],
            m["declared_bytes"],
            m["copies"],
            ",".join(map(str, m["statuses"])),
            f"{m['rss_before_mb']:.0f}",
            f"{m['peak_over_before_mb']:.0f}",
            f"{m['peak_over_before_mb'] * MIB / m['declared_bytes']:.2f}",
            f"{m['seconds']:.1f}",
        ]
        for m in mem
    ]
    lines += [
        table(
            [
                "upload",
                "bytes on the wire",
                "declared in memory",
                "at once",
                "answers",
                "RSS before (MiB)",
                "peak over before (MiB)",
                "peak / declared (per batch)",
                "s",
            ],
            rows,
        ),
        "",
    ]
    one, four = mem[1]["peak_over_before_mb"], mem[2]["peak_over_before_mb"]
    lines += [f"- four deflated zips at once / one: {four / one:.2f}x the peak (at most 2 are checked at a time)", ""]
    base, load = health["without uploads"], health["4 uploads in flight"]
    lines += [f"#### c. GET /healthz every 10 ms, {args.rounds} windows of {args.window:g} s each way, alternating", ""]
    rows = [
        [k, v["n"], f"{v['p50_ms']:.1f}", f"{v['p99_ms']:.1f}", f"{v['max_ms']:.1f}"]
        for k, v in (("without uploads", base), ("4 uploads in flight", load))
    ]
    lines += [table(["variant", "requests", "p50 ms", "p99 ms", "max ms"], rows), ""]
    lines += [
        f"- p99 with / without uploads: **{load['p99_ms'] / base['p99_ms']:.2f}x** "
        f"(p50 {load['p50_ms'] / base['p50_ms']:.2f}x); {health['uploads_checked']} uploads checked meanwhile, "
        f"answered {health['upload_statuses']}"
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s windows; no docs update")
    parser.add_argument("--rounds", type=int, default=None, help="windows each way for c (default 3; --quick 1)")
    parser.add_argument("--window", type=float, default=None, help="seconds per window for c (default 6; --quick 2)")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, service logs)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.window = args.window or (2.0 if args.quick else 6.0)
    tmp = Path(tempfile.mkdtemp(prefix="bup-", dir="/tmp"))
    contention = ProcessTreeContention()
    small = start_service(tmp / "small", SMALL_LIMIT)
    try:
        cut = [oversized_chunked(small, 1 << 30, sndbuf) for sndbuf in ((32 * 1024,) * 3 + (None,))]
        for c in cut:
            print(f"(a: {c})", file=sys.stderr, flush=True)
        health = healthz_windows(small, slow_to_check(tmp / "slow.pt"), args.rounds, args.window, uploaders=4)
        print(f"(c: {health})", file=sys.stderr, flush=True)
    finally:
        small.stop()
    big = start_service(tmp / "big", BIG_LIMIT)
    try:
        files = tmp / "files"
        files.mkdir()
        mem = [peak_while(big, near_limit_safetensors(files / "near-limit.safetensors"), 1)]
        under = deflated_torch_zip(files / "deflated-under-ceiling.pt", CEILING)
        mem += [peak_while(big, under, 1), peak_while(big, under, 4)]
        mem += [peak_while(big, deflated_torch_zip(files / "deflated-over-ceiling.pt", CEILING + 4 * MIB), 1)]
        for m in mem:
            print(f"(b: {m})", file=sys.stderr, flush=True)
    finally:
        big.stop()
    env = environment()
    env["contention"] = contention.result()
    block = report(cut, mem, health, env, args)
    print(block)
    write_result(
        "bench_uploads",
        {
            "environment": env,
            "cut_off": cut,
            "memory": mem,
            "healthz": health,
            "limits": {"small": SMALL_LIMIT, "big": BIG_LIMIT, "ceiling": CEILING},
        },
    )
    if not (args.quick or args.no_docs):
        update_docs(DOCS, "bench_uploads", "## 9. `bench_uploads`: POST /checkpoints under hostile uploads", block)
        print(f"(updated {DOCS.relative_to(ROOT)})", file=sys.stderr)
    if args.keep:
        print(f"(kept {tmp})", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
