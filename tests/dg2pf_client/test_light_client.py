"""The light client (clients/, dg2pf-client): nothing heavy imported, its wire models equal to the API's
OpenAPI, the remote commands fast (no torch) with one line for bad input and for Ctrl-C.

The fresh-venv install of the package alone talking to a real service is in tests/e2e/service/test_api.py
(it reuses that module's service)."""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from dg2pf_client.cli import LOCAL_COMMANDS, REMOTE_COMMANDS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "dg2pf_client"
HEAVY = ("torch", "torchvision", "ray", "numpy", "dg2pf_core", "dg2pf_ray", "dg2pf_service")
# What the client parses, by the operation that answers it (method, path, success status).
RESPONSES = {
    ("post", "/checkpoints", "201"): "CheckpointOut",
    ("post", "/jobs", "202"): "JobSubmitted",
    ("get", "/jobs", "200"): "JobList",
    ("get", "/jobs/{job_id}", "200"): "JobOut",
    ("post", "/jobs/{job_id}/cancel", "200"): "JobOut",
    ("get", "/jobs/{job_id}/artifacts", "200"): "ArtifactList",
    ("post", "/jobs/{job_id}/deploy", "202"): "ModelOut",
    ("get", "/models", "200"): "ModelList",
    ("get", "/models/{model_id}", "200"): "ModelOut",
}


def _loaded_after(code: str) -> list[str]:
    """The heavy top-level modules loaded once ``code`` ran in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


def test_importing_the_client_and_its_command_line_loads_no_torch_ray_or_service():
    names = "Client, JobOut, JobList, ModelList, ApiError, WaitTimeout"
    assert (
        _loaded_after(
            "import dg2pf_client, dg2pf_client.cli, dg2pf_contract.api, dg2pf_contract.job\n"
            f"from dg2pf_client import {names}"
        )
        == []
    )


def test_no_module_of_the_client_imports_a_heavy_package_even_inside_a_function():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in HEAVY]
    assert found == []


def test_the_full_command_line_runs_remote_commands_without_importing_torch():
    run = "from dg2pf_cli.entry import run\ntry:\n    run(['jobs', '--help'])\nexcept SystemExit:\n    pass"
    assert _loaded_after(run) == []


def test_the_light_client_never_names_the_package_that_plugs_into_it():
    """The full package's commands reach ``dg2pf`` through the entry point it declares: the light client
    looks up the entry point, never the package (no import of it, no find_spec of its name)."""
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(PACKAGE.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"\bdg2pf_cli\b", node.value)
    ]
    assert found == []


@pytest.mark.slow
def test_both_installs_have_one_dg2pf_script_and_the_full_package_plugs_its_commands_in():
    from dg2pf_cli.entry import run as full_run
    from dg2pf_client.cli import PLUGIN_GROUP, PLUGIN_NAME, local_command_line

    projects = [
        tomllib.loads(p.read_text())["project"] for p in (ROOT / "pyproject.toml", ROOT / "clients" / "pyproject.toml")
    ]
    assert {project["scripts"]["dg2pf"] for project in projects} == {"dg2pf_client.cli:run"}
    assert projects[0]["entry-points"][PLUGIN_GROUP] == {PLUGIN_NAME: "dg2pf_cli.entry:run"}
    assert local_command_line() is full_run  # as installed (pip install -e .): found by its entry point
    out = subprocess.run([*_dg2pf(), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "prune" in out.stdout and "submit" in out.stdout, out.stderr


def test_alone_the_light_client_runs_the_service_commands_and_says_where_the_others_are(monkeypatch, capsys):
    import importlib.metadata

    from dg2pf_client import cli

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **selection: [])  # no package plugs in
    assert cli.local_command_line() is None
    assert cli.main(["prune", "--arch", "x"]) == 2
    err = capsys.readouterr().err
    assert "comes with the full dg2pf package" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as help_exit:
        cli.main(["--help"])
    shown = capsys.readouterr().out
    listed = shown[shown.index("{") + 1 : shown.index("}")].split(",")  # the usage line's commands
    assert help_exit.value.code == 0 and listed == list(cli.REMOTE_COMMANDS), shown


def _openapi() -> dict:
    from dg2pf_service.api.app import create_app

    return create_app().openapi()


def _shape(schema):
    """A schema's wire shape: field names, types, required, nested; not its titles, descriptions, defaults."""
    if isinstance(schema, dict):
        return {
            k: sorted(v) if k == "required" else _shape(v)
            for k, v in schema.items()
            if k not in ("title", "description", "default")
        }
    if isinstance(schema, list):
        return [_shape(v) for v in schema]
    return schema


def test_the_client_wire_models_match_the_service_openapi():
    from pydantic.json_schema import models_json_schema

    import dg2pf_contract.api as wire

    openapi = _openapi()
    for (method, path, status), name in RESPONSES.items():
        content = openapi["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
        assert content == {"$ref": f"#/components/schemas/{name}"}, (method, path)
    models = [getattr(wire, name) for name in {*RESPONSES.values(), "ErrorResponse"}]
    _, top = models_json_schema([(m, "serialization") for m in models], ref_template="#/components/schemas/{model}")
    client = top["$defs"]
    served = openapi["components"]["schemas"]
    for name, schema in client.items():  # each model the client parses and every model inside one
        assert name in served, name
        assert _shape(served[name]) == _shape(schema), name


def test_the_service_declares_its_responses_with_the_client_classes():
    import dg2pf_contract.api as wire
    from dg2pf_service.api import models, schemas

    for name in {*RESPONSES.values(), "ErrorResponse", "ErrorDetail"}:
        assert getattr(schemas, name) is getattr(wire, name), name
    assert models.ModelOut is wire.ModelOut and models.ModelList is wire.ModelList


def test_the_client_version_is_the_package_version_and_dg2pf_version_prints_it():
    from dg2pf_client import __version__

    assert __version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = subprocess.run([*_dg2pf(), "--version"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, f"dg2pf {__version__}")


def test_the_full_command_line_has_every_remote_command_and_the_light_one_knows_its_local_ones():
    from dg2pf_cli.main import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert set(REMOTE_COMMANDS) <= commands
    assert commands - set(REMOTE_COMMANDS) <= set(LOCAL_COMMANDS)  # the light one names where each of them is


def test_a_job_prints_as_one_line():
    from dg2pf_client import JobOut

    job = JobOut.model_validate(
        {
            "id": "ab" * 16,
            "name": "n",
            "state": "running",
            "phase": "distillation",
            "epoch": 7,
            "current_sparsity": 0.9,
            "target_sparsity": 0.9,
            "latest_metrics": {"val_top1": 97.5},
            "best_metrics": None,
            "history": [{"epoch": 1}] * 50,
            "error": None,
            "created_at": "2026-01-01T00:00:00Z",
            "started_at": None,
            "finished_at": None,
            "eta_seconds": 3.0,
            "spec": {"model": {"arch": "digits_cnn"}},
            "links": {},
        }
    )
    line = str(job)
    assert "\n" not in line and len(line) < 160, line
    for needle in ("ab" * 16, "running", "distillation", "epoch   7", "90.00% -> 90%", "val top-1 97.50%", "eta 3 s"):
        assert needle in line, line


def _dg2pf() -> list[str]:
    script = Path(sys.executable).parent / "dg2pf"  # the console script as installed, else the module
    return [str(script)] if script.exists() else [sys.executable, "-m", "dg2pf_cli"]


def _refused(*args: str) -> str:
    out = subprocess.run([*_dg2pf(), *args], capture_output=True, text=True, timeout=60)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("dg2pf") and " error: " in lines[0], (
        out.stderr
    )
    return lines[0]


def test_bad_input_to_remote_commands_is_one_line_and_exit_2(tmp_path):
    nowhere = ["--url", "http://127.0.0.1:9"]  # a refusal that names the service would mean the spec was sent
    assert "no-such.json" in _refused("submit", str(tmp_path / "no-such.json"), *nowhere)
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "must be a mapping" in _refused("submit", str(tmp_path / "list.json"), *nowhere)
    (tmp_path / "broken.yaml").write_text("model: {arch: [\n")
    assert "broken.yaml" in _refused("submit", str(tmp_path / "broken.yaml"), *nowhere)
    assert "no such file" in _refused("upload", str(tmp_path / "none.safetensors"), *nowhere)
    assert "cannot reach" in _refused("jobs", *nowhere)
    assert "invalid choice" in _refused("jobs", "--state", "sleeping")


@pytest.mark.slow
def test_bad_urls_tokens_ids_and_specs_are_refused_here_before_any_request(tmp_path):
    """Nothing to send: refused on this side, one line, and no folder made for a refused download."""
    nowhere = ["--url", "http://127.0.0.1:9"]
    for url in ("notaurl", "ftp://x", "http://", "http://127.0.0.1:99999"):
        assert f"--url {url!r}" in _refused("jobs", "--url", url)
    assert "printable ASCII" in _refused("jobs", "--token", "tökén", *nowhere)
    for command in (("status", "../healthz"), ("cancel", "x?y"), ("undeploy", "../models/abc"), ("status", "")):
        assert "is not a job or model id" in _refused(*command, *nowhere)
    assert "is not a job or model id" in _refused("download", "../escape", "--out", str(tmp_path / "out"), *nowhere)
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty.json").write_text(" \n")
    assert "is empty" in _refused("submit", str(tmp_path / "empty.json"), *nowhere)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in _refused("submit", str(tmp_path / "deep.json"), *nowhere)
    assert "is a directory" in _refused("upload", str(tmp_path), *nowhere)
    assert "neither was given" in _refused("predict", "0" * 32, *nowhere)


@pytest.mark.slow
def test_a_url_that_is_not_the_dg2pf_service_is_named_in_one_line():
    """Another server at the URL (a web page, an empty 404, JSON of another shape): one line saying
    so, never a parsing traceback."""
    import http.server
    import threading

    from dg2pf_client import Client, NotTheService

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body, kind, status = {
                "/html/jobs": (b"<html>hi</html>", "text/html", 200),
                "/json/jobs": (b'{"status": "ok"}', "application/json", 200),
            }.get(self.path.split("?")[0], (b"", "text/plain", 404))
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for prefix, needle in (
            ("/html", "text/html, not the dg2pf API's JobList"),
            ("/json", "not the dg2pf API's JobList"),
            ("/empty", "HTTP 404 Not Found with an empty answer"),
        ):
            assert needle in _refused("jobs", "--url", base + prefix)
        with pytest.raises(NotTheService):
            Client(base + "/html").list()
    finally:
        server.shutdown()


def test_events_survive_keep_alives_and_a_dropped_connection_resuming_from_the_last_id():
    """Client.events against a peer that speaks the stream's wire format: keep-alive comments are not
    events, a connection cut mid-job is resumed with Last-Event-ID, and nothing arrives twice."""
    import http.server
    import json
    import threading

    from dg2pf_client import Client

    job = {
        "id": "a" * 32,
        "name": None,
        "state": "running",
        "phase": "gradual_pruning",
        "epoch": 1,
        "current_sparsity": 0.3,
        "target_sparsity": 0.9,
        "latest_metrics": None,
        "best_metrics": None,
        "history": [],
        "error": None,
        "created_at": "2026-12-01T00:00:00Z",
        "started_at": None,
        "finished_at": None,
        "eta_seconds": None,
        "spec": {},
        "links": {},
    }
    done = {**job, "state": "succeeded", "phase": "done"}
    record = {"epoch": 1, "phase": "gradual_pruning", "sparsity": 0.3, "train_loss": 0.5, "val_top1": 90.0}
    streams = [  # what each connection sends; the first ends before the job does
        [("state", "0:running:gradual_pruning", job), None, ("epoch", "1:running:gradual_pruning", record)],
        [("epoch", "2:running:gradual_pruning", {**record, "epoch": 2}), ("state", "2:succeeded:done", done)],
    ]
    asked: list[str | None] = []

    class Stream(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            asked.append(self.headers.get("Last-Event-ID"))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for item in streams[len(asked) - 1]:
                if item is None:
                    self.wfile.write(b": ping\n\n")  # as FastAPI sends after 15 s of silence
                else:
                    kind, id_, data = item
                    self.wfile.write(f"event: {kind}\nid: {id_}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{server.server_address[1]}") as client:
            events = list(client.events("a" * 32))
    finally:
        server.shutdown()
    assert [(e.kind, e.id) for e in events] == [
        ("state", "0:running:gradual_pruning"),
        ("epoch", "1:running:gradual_pruning"),
        ("epoch", "2:running:gradual_pruning"),
        ("state", "2:succeeded:done"),
    ]
    assert asked == [None, "1:running:gradual_pruning"]
    assert events[1].summary().startswith("  epoch   1  gradual_pruning") and "val top-1  90.00%" in events[1].summary()
    assert events[-1].job.state == "succeeded"


def test_ctrl_c_while_a_remote_command_waits_for_the_service_ends_with_one_line_and_130():
    with socket.socket() as silent:  # a service that accepts the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        proc = subprocess.Popen(
            [*_dg2pf(), "jobs", "--url", f"http://127.0.0.1:{silent.getsockname()[1]}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            conn, _ = silent.accept()  # the command is waiting for its answer now
            if Path(f"/proc/{proc.pid}/maps").exists():
                assert "/torch/" not in Path(f"/proc/{proc.pid}/maps").read_text()
            time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            conn.close()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("dg2pf: interrupted"), err


@pytest.mark.parametrize("command", ["jobs", "--version"])
def test_remote_commands_start_in_well_under_a_second(command):
    # CPU time, not wall time: a busy machine (CI shares its cores) stretches the latter. Importing torch
    # alone takes several CPU seconds.
    args = [command, "--help"] if command != "--version" else [command]
    before = os.times()
    out = subprocess.run([*_dg2pf(), *args], capture_output=True, text=True, timeout=60)
    after = os.times()
    assert out.returncode == 0, out.stderr
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    assert cpu < 0.8, cpu
