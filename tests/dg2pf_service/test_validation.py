"""The service's submit-time checks of what a job names on its disk: a latency table file."""

from __future__ import annotations

import json
import os

import pytest

from dg2pf_core.algorithm.latency_table import TABLE_FORMAT


def _settings(tmp_path, monkeypatch, roots):
    for key in list(os.environ):
        if key.startswith("DG2PF_"):
            monkeypatch.delenv(key)
    from dg2pf_service.settings import Settings

    return Settings(data_dir=tmp_path / "state", data_roots=roots)


def test_a_latency_table_is_read_only_inside_the_data_roots_and_checked_at_submit(tmp_path, monkeypatch):
    from dg2pf_service.validation import InvalidJob, check_latency_table

    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret.json").write_text("{}")
    (root / "bad.json").write_text(json.dumps({"format": TABLE_FORMAT}))
    settings = _settings(tmp_path, monkeypatch, [root])
    for path, needle in (
        (str(tmp_path / "secret.json"), "outside the allowed data roots"),
        (str(tmp_path / "missing.json"), "outside the allowed data roots"),  # existence outside is not told
        ("data/t.json", "must be an absolute path"),
        (str(root / "missing.json"), "is not a file"),
        (str(root / "bad.json"), "latency_table: malformed"),
    ):
        with pytest.raises(InvalidJob, match=needle) as info:
            check_latency_table(path, settings)
        assert info.value.field == "schedule.latency_table"
    with pytest.raises(InvalidJob, match="DG2PF_DATA_ROOTS is not set"):
        check_latency_table(str(root / "bad.json"), _settings(tmp_path, monkeypatch, []))
