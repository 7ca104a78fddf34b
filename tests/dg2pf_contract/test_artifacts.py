"""Every file a job leaves is named in one place (``dg2pf_contract.artifacts``), and the contract stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from dg2pf_contract.artifacts import Artifacts, JobDir, StateDir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_file_a_finished_job_writes_is_named_by_artifacts(finished_job):
    out, state = finished_job
    written = {p.name for p in out.iterdir()}
    assert set(Artifacts.REQUIRED) <= written <= set(Artifacts.SERVED)
    # this model exports to ONNX and draws its plots; an fp32 job writes no int8 model, and a job of another
    # architecture than hf no model directory files
    assert written == {*Artifacts.REQUIRED, *Artifacts.OPTIONAL} - {
        Artifacts.INT8_ONNX,
        Artifacts.HF_CONFIG,
        Artifacts.HF_PROCESSOR,
    }
    files = Artifacts(out)
    assert all(
        p.is_file()
        for p in (files.model, files.compact, files.onnx, files.metrics, files.training_plot, files.layers_plot)
    )
    # The state a run keeps while it trains (kept here on purpose: it goes once the output is written).
    assert {p.name for p in state.iterdir()} == {StateDir.JOB, StateDir.TRAINING_STATE, StateDir.LOCK}
    assert StateDir(state).training_state.is_file()


def test_the_api_serves_the_output_and_the_progress_and_nothing_else(tmp_path):
    job = JobDir(tmp_path / "job")
    assert job.served(Artifacts.METRICS) == job.output.metrics == tmp_path / "job" / JobDir.OUTPUT / Artifacts.METRICS
    assert job.served(JobDir.PROGRESS) == job.progress
    for name in (JobDir.ORDER, JobDir.ERROR, "../job.json", "output", StateDir.TRAINING_STATE):
        assert job.served(name) is None
    assert JobDir.SERVED == (*Artifacts.SERVED, JobDir.PROGRESS)


def test_a_file_name_is_spelled_nowhere_else_in_the_code():
    """No string constant of the first-party code is a job's file name but the ones in artifacts.py."""
    names = {*Artifacts.SERVED, StateDir.JOB, StateDir.TRAINING_STATE, JobDir.PROGRESS, JobDir.ERROR}
    packages = [
        "dg2pf_core",
        "dg2pf_ray",
        "dg2pf_cli",
        "bench",
        "clients/dg2pf_client",
        "clients/dg2pf_contract",
        "service/dg2pf_service",
    ]
    spelled = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "artifacts.py" and path.parent.name == "dg2pf_contract":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and node.value in names:
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert spelled == []


def test_the_contract_imports_neither_torch_nor_ray():
    code = (
        "import sys, dg2pf_contract.artifacts, dg2pf_contract.results; "
        "print(sorted(m for m in ('torch', 'numpy', 'ray', 'dg2pf_core') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
