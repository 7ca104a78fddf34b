"""The job file and its overrides: what a user or a hostile file gives is refused in one line naming the
field, before anything is copied, expanded or sent."""

from __future__ import annotations

import os
import time

import pytest
from pydantic import ValidationError

from dg2pf_contract.job import MAX_JOB_FILE_BYTES, JobFileError, JobSpec, apply_overrides, describe, read_job_file

DOC = {"model": {"arch": "a", "num_classes": 2, "checkpoint": "c"}, "dataset": {"spec": "digits"}, "sparsity": 0.5}
BASE = "model: {arch: digits_cnn, num_classes: 10, checkpoint: c.safetensors}\ndataset: {spec: digits}\n"


def _write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "extra, field",
    [
        ("name: 2024-01-01\n", "name"),  # a YAML date
        ("name: !!binary aGVsbG8=\n", "name"),
        ("name: !!set {a, b}\n", "name"),
        ("sparsity: .inf\n", "sparsity"),
        ("tune: {search_space: {lr: {loguniform: [0.0001, .nan]}}}\n", "tune.search_space.lr.loguniform[1]"),
    ],
)
def test_values_json_cannot_hold_are_refused_naming_the_field(tmp_path, extra, field):
    with pytest.raises(JobFileError) as info:
        read_job_file(_write(tmp_path, BASE + extra))
    assert info.value.field == field and field in info.value.message


def test_a_yaml_alias_bomb_is_refused_at_once_without_expanding(tmp_path):
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(9))}]" for i in range(1, 9)]
    path = _write(tmp_path, "\n".join(levels) + "\n" + BASE + "tune: {search_space: {lr: *a8}}\n")
    started = time.monotonic()
    with pytest.raises(JobFileError, match="more than 100,000 values"):
        read_job_file(path)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("what", ["too large", "a directory", "too deep"])
def test_files_that_are_no_job_spec_are_refused(tmp_path, what):
    if what == "too large":
        path = _write(tmp_path, BASE + "#" * (MAX_JOB_FILE_BYTES + 1))
        needle = "at most"
    elif what == "a directory":
        path, needle = tmp_path, "not a regular file"
    else:
        path, needle = _write(tmp_path, '{"name": ' + "[" * 5000 + "]" * 5000 + "}", "deep.json"), "nested"
    with pytest.raises(JobFileError, match=needle):
        read_job_file(path)


def test_a_fifo_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "job.fifo"
    os.mkfifo(fifo)
    with pytest.raises(JobFileError, match="not a regular file"):
        read_job_file(fifo)


def test_a_byte_order_mark_is_no_error(tmp_path):
    path = tmp_path / "job.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"model": {"arch": "a", "num_classes": 2, "checkpoint": "c"}}')
    assert read_job_file(path)["model"]["arch"] == "a"


def test_overrides_parse_json_refuse_broken_json_and_keep_aliases_shared():
    shared = {"x": 1}
    doc = {"a": shared, "b": shared}
    out = apply_overrides(doc, ["schedule.lr=0.001", "name=plain text", 'schedule.include=["conv.*"]'])
    assert out["schedule"] == {"lr": 0.001, "include": ["conv.*"]} and out["name"] == "plain text"
    assert out["a"] is out["b"] and doc == {"a": shared, "b": shared}  # a copy, sharing kept, input untouched
    with pytest.raises(JobFileError, match="not JSON"):
        apply_overrides({}, ['tune.search_space={"lr": {"loguniform": [0.0001, NaN]}}'])
    with pytest.raises(JobFileError, match="not a section"):
        apply_overrides({"sparsity": 0.5}, ["sparsity.x=1"])


def test_errors_escape_control_characters_of_keys():
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({**DOC, "\x1b[2Jx": 1})
    field, message = describe(info.value)
    assert "\x1b" not in message and "\\x1b[2Jx" in message


def test_an_empty_search_space_is_refused_in_the_spec():
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({**DOC, "tune": {"search_space": {}}})
    assert describe(info.value)[0] == "tune.search_space"


@pytest.mark.parametrize(
    "extra",
    [
        {"sparsity": 0.5},
        {"schedule": {"granularity": "channel", "latency_budget_ms": 2.5, "latency_table": "/data/t.json"}},
        {"schedule": {"granularity": "channel", "max_top1_drop": 1.0}, "tune": {"samples": 3}},
    ],
)
def test_a_stored_spec_every_field_written_validates_again(extra):
    # The service stores model_dump() (every field, null ones too) and reads it back for each dispatch:
    # an optional field whose validator cannot take its own null broke every stored job once.
    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "x"},
        "dataset": {"spec": "digits"},
        **extra,
    }
    stored = JobSpec.model_validate(doc).model_dump(mode="json")
    assert JobSpec.model_validate(stored).model_dump(mode="json") == stored


@pytest.mark.parametrize(
    "field",
    ["latency_budget_ms", "max_top1_drop", "target_macs_ratio", "max_quantization_drop", "patience", "kd_alpha"],
)
def test_a_number_given_as_yes_or_no_is_refused_not_read_as_1(field):
    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": "x"},
        "dataset": {"spec": "digits"},
        "schedule": {"granularity": "channel", field: True},
    }
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(doc)
    assert describe(e.value) == (f"schedule.{field}", f"schedule.{field}: must be a number, got true")
