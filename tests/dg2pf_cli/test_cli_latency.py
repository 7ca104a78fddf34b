"""`dg2pf latency` measures with the thread policy of the other commands and says how busy the machine was."""

from __future__ import annotations

import json

import pytest
import torch

import dg2pf_core.io.latency as latency_module
from dg2pf_core.io.checkpoint_save import save_state_dict
from dg2pf_core.models import build_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("latency") / "digits.safetensors"
    torch.manual_seed(0)
    save_state_dict(build_model("digits_cnn", 10).state_dict(), path)
    return path


@pytest.fixture
def machine(monkeypatch):
    """A 2-CPU machine whose load the test sets; what torch's thread count was while each cell was timed."""
    before = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    timed_with: list[int] = []
    real = latency_module._time_cell

    def spy(*args, **kwargs):
        timed_with.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(latency_module, "_time_cell", spy)

    def load(value: float) -> list[int]:
        monkeypatch.setattr("os.getloadavg", lambda: (value, value / 2, value / 4))
        return timed_with

    yield load
    torch.set_num_threads(before)


def latency(capsys, ckpt, *extra: str) -> tuple[int, str, str]:
    from dg2pf_cli.main import main

    code = main(
        [
            "latency",
            "--arch",
            "digits_cnn",
            "--checkpoint",
            str(ckpt),
            "--backends",
            "torch",
            "--batch-sizes",
            "1",
            "--runs",
            "3",
            "--warmup",
            "0",
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("load, threads, busy", [(0.0, 2, False), (1.2, 1, False), (3.0, 1, True)])
def test_the_default_threads_are_the_policys_and_the_output_names_them_and_the_load(
    capsys, ckpt, machine, load, threads, busy
):
    from dg2pf_cli.main import default_threads

    timed_with = machine(load)
    assert default_threads() == threads
    code, out, err = latency(capsys, ckpt)
    assert code == 0, err
    assert timed_with == [threads]  # what torch ran the timed passes with
    assert f"inputs 1 x 16 x 16, {threads} thread(s)" in out.splitlines()[0]
    line = next(x for x in out.splitlines() if x.startswith("threads: "))
    assert line == (
        f"threads: {threads} (the default: the CPUs less the load average, at least 1; --threads to change); "
        f"machine: 2 CPUs, 1-minute load average {load:.2f} before measuring, {load:.2f} after"
    )
    assert ("note: the machine was busy" in out) == busy


def test_threads_given_are_used_and_the_json_records_them_with_the_load(capsys, ckpt, machine):
    timed_with = machine(5.0)
    code, out, err = latency(capsys, ckpt, "--threads", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert timed_with == [2] and doc["threads"] == 2 and doc["threads_from"] == "--threads"
    assert doc["machine"] == {"cpus": 2, "load_before": [5.0, 2.5, 1.25], "load_after": [5.0, 2.5, 1.25]}
    assert any("the machine was busy" in n for n in doc["notes"])
