"""Settings: what an operator writes in the environment is what the service uses."""

from __future__ import annotations

import os
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
