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
        (str(tmp_path / "secret.json"), "outside the allowed roots"),
        (str(tmp_path / "missing.json"), "outside the allowed roots"),  # existence outside is not told
        ("data/t.json", "must be an absolute path"),
        (str(root / "missing.json"), "No such file or directory"),
        (str(root), "is not a regular file"),
        (str(root / "bad.json"), "latency_table: malformed"),
    ):
        with pytest.raises(InvalidJob, match=needle) as info:
            check_latency_table(path, settings)
        assert info.value.field == "schedule.latency_table"
    (root / "long.json").write_text('{"format": "x", "n": ' + "9" * 5000 + "}")  # past int() string limits
    (root / "nul").mkdir()
    for path, needle in ((str(root / "long.json"), "cannot read"), (str(root) + "/a\x00b.json", "control characters")):
        with pytest.raises(InvalidJob, match=needle):
            check_latency_table(path, settings)
    fifo = root / "fifo.json"
    os.mkfifo(fifo)  # opened without blocking: refused, not waited on
    with pytest.raises(InvalidJob, match="is not a regular file"):
        check_latency_table(str(fifo), settings)
    with pytest.raises(InvalidJob, match="DG2PF_DATA_ROOTS is not set"):
        check_latency_table(str(root / "bad.json"), _settings(tmp_path, monkeypatch, []))


def test_an_int8_job_to_be_served_needs_the_onnxruntime_backend(tmp_path, monkeypatch):
    from dg2pf_contract.job import JobSpec
    from dg2pf_service.validation import InvalidJob, validate_job

    settings = _settings(tmp_path, monkeypatch, [tmp_path])
    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "x" * 32},
        "dataset": {"spec": "digits"},
        "sparsity": 0.5,
        "schedule": {"precision": "int8"},
        "serve": True,
    }

    def nothing(*_a):
        raise AssertionError("refused before any checkpoint, data or cluster is asked")

    with pytest.raises(InvalidJob, match="needs the onnxruntime serving backend") as info:
        validate_job(JobSpec.model_validate(doc), settings, store=None, capacity=nothing)
    assert info.value.field == "serve" and info.value.status == 422
    monkeypatch.setattr(settings, "serve_backend", "onnxruntime")
    with pytest.raises(Exception) as other:  # goes on to the checkpoint (not in this empty store)
        validate_job(JobSpec.model_validate(doc), settings, store=None, capacity=nothing)
    assert "onnxruntime serving backend" not in str(other.value)
