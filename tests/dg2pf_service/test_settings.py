"""Settings: what an operator writes in the environment is what the service uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dg2pf_service.settings import Settings, get_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's own DG2PF_* / RAY_ADDRESS must not leak into the defaults under test.
    for key in list(os.environ):
        if key.startswith("DG2PF_") or key == "RAY_ADDRESS":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_derive_from_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "state")
    root = (tmp_path / "state").resolve()
    assert s.data_dir == root
    assert s.db_url == f"sqlite:///{root}/dg2pf.db"
    assert s.storage_uri == str(root / "ray")
    assert s.data_roots == [root / "datasets"]
    assert (s.checkpoints_dir, s.jobs_dir) == (root / "checkpoints", root / "jobs")
    assert (s.api_tokens, s.auth_enabled, s.ray_address, s.database_url) == ([], False, None, None)
    assert (s.max_upload_bytes, s.poll_seconds, s.host, s.port) == (2 * 1024**3, 1.0, "127.0.0.1", 8000)


def test_relative_data_dir_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = get_settings()
    monkeypatch.chdir("/")
    assert s.data_dir == (tmp_path / "dg2pf-data").resolve()
    assert s.db_url == f"sqlite:///{tmp_path.resolve()}/dg2pf-data/dg2pf.db"


def test_comma_separated_lists_parse_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DG2PF_DATA_ROOTS", "/data/a, /data/b,")
    monkeypatch.setenv("DG2PF_API_TOKENS", "tok-one,tok-two")
    s = get_settings()
    assert s.data_roots == [Path("/data/a"), Path("/data/b")]
    assert s.api_tokens == ["tok-one", "tok-two"] and s.auth_enabled
    # Tokens are secrets: never in a repr (logs, tracebacks) nor a dump.
    assert "tok-one" not in repr(s) and "tok-one" not in str(s.model_dump())


def test_empty_data_roots_means_uploads_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DG2PF_DATA_ROOTS", "")
    assert get_settings().data_roots == []


def test_env_values_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DG2PF_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("DG2PF_DATABASE_URL", "postgresql+psycopg2://dg2pf@db/dg2pf")
    monkeypatch.setenv("DG2PF_STORAGE_URI", "s3://bucket/ray")
    monkeypatch.setenv("DG2PF_PORT", "9000")
    monkeypatch.setenv("DG2PF_MAX_UPLOAD_BYTES", "1024")
    s = get_settings()
    assert s.db_url == "postgresql+psycopg2://dg2pf@db/dg2pf"
    assert (s.storage_uri, s.port, s.max_upload_bytes) == ("s3://bucket/ray", 9000, 1024)
    assert s.jobs_dir == (tmp_path / "d" / "jobs").resolve()
    # Explicit values (tests, embedding) win over the environment.
    assert Settings(port=8123, data_roots=["/x"]).port == 8123


def test_ray_address_honours_plain_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert get_settings().ray_address == "ray://head:10001"
    monkeypatch.setenv("DG2PF_RAY_ADDRESS", "auto")
    assert get_settings().ray_address == "auto"
    assert Settings(ray_address="127.0.0.1:6379").ray_address == "127.0.0.1:6379"


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DG2PF_PORT", "eighty")
    with pytest.raises(ValidationError, match="port"):
        get_settings()


def test_serve_backend_is_torch_or_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_settings().serve_backend == "torch"
    monkeypatch.setenv("DG2PF_SERVE_BACKEND", "onnxruntime")
    assert get_settings().serve_backend == "onnxruntime"
    monkeypatch.setenv("DG2PF_SERVE_BACKEND", "tensorrt")
    with pytest.raises(ValidationError, match="serve_backend"):
        get_settings()
    # ONNX Runtime serves on the CPU: GPUs reserved for its replicas would sit idle.
    with pytest.raises(ValidationError, match="serve_gpus_per_replica to 0"):
        Settings(serve_backend="onnxruntime", serve_gpus_per_replica=1)


def test_the_service_refuses_a_bad_setting_at_start_in_one_line(tmp_path: Path) -> None:
    """Before anything starts (no data directory, no Ray head): exit 2 and the variable to fix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DG2PF_") and k != "RAY_ADDRESS"}
    env.update(DG2PF_DATA_DIR=str(tmp_path / "state"), DG2PF_SERVE_BACKEND="tensorrt")
    done = subprocess.run([sys.executable, "-m", "dg2pf_service"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "dg2pf: error: invalid settings: DG2PF_SERVE_BACKEND: Input should be 'torch' or 'onnxruntime' "
        "(got 'tensorrt')\n"
    )
    assert not (tmp_path / "state").exists()


def test_the_mlflow_store_is_a_database_or_a_server_and_a_relative_one_lives_in_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "state"
    assert (
        Settings(data_dir=data, mlflow_tracking_uri="sqlite:///mlflow.db").mlflow_tracking_uri
        == f"sqlite:///{data}/mlflow.db"
    )
    assert (
        Settings(data_dir=data, mlflow_tracking_uri="sqlite:////srv/m.db").mlflow_tracking_uri == "sqlite:////srv/m.db"
    )
    assert Settings(data_dir=data, mlflow_tracking_uri="http://mlflow:5000").mlflow_tracking_uri == "http://mlflow:5000"
    assert (
        Settings(data_dir=data, mlflow_tracking_uri=" ").mlflow_tracking_uri is None
    )  # an empty variable: no tracking
    for file_store in ("mlruns", "./mlruns", "/srv/mlruns", "file:/srv/mlruns", "file:///srv/mlruns"):
        with pytest.raises(ValidationError, match="file store.*sqlite:///mlflow.db"):
            Settings(data_dir=data, mlflow_tracking_uri=file_store)
    assert "secret" not in repr(Settings(data_dir=data, mlflow_tracking_uri="http://user:secret@mlflow:5000"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "database_url, needle",
    [
        ("sqlite:////proc/nonexistent/dg2pf.db", "No such file or directory: /proc/nonexistent"),
        ("postgresql+psycopg2://someone:secretpw@127.0.0.1:1/dg2pf", "Connection refused"),
        ("mysql://someone@localhost/dg2pf", "no driver for this database is installed"),
        ("not a url", "cannot parse database URL"),
        ("someone:secretpw@127.0.0.1/dg2pf", "cannot parse database URL"),  # no scheme: the password still hidden
        (
            "postgresql+psycopg2://someone:secretpw@127.0.0.1:port/dg2pf",
            "cannot parse database URL",
        ),  # a port that is no number
    ],
)
def test_a_database_the_service_cannot_open_is_one_line_naming_the_setting(
    tmp_path: Path, database_url: str, needle: str
) -> None:
    """Checked before the server and the Ray head start: exit 2, DG2PF_DATABASE_URL and the cause in one line,
    the password never shown."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DG2PF_") and k != "RAY_ADDRESS"}
    env.update(DG2PF_DATA_DIR=str(tmp_path / "state"), DG2PF_DATABASE_URL=database_url)
    done = subprocess.run(
        [sys.executable, "-m", "dg2pf_service", "--port", "1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dg2pf: error: DG2PF_DATABASE_URL") and needle in lines[0], (
        done.stderr
    )
    assert "secretpw" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "state" / "ray-state").exists()  # no Ray head was started


@pytest.mark.slow
def test_a_data_directory_that_cannot_be_made_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DG2PF_") and k != "RAY_ADDRESS"}
    env.update(DG2PF_DATA_DIR=str(tmp_path / "a-file" / "state"))
    done = subprocess.run([sys.executable, "-m", "dg2pf_service"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("dg2pf: error: DG2PF_DATA_DIR") and "Not a directory" in done.stderr
