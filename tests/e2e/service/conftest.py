"""Fixtures for the service scenarios: the light client alone, in a fresh venv."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def light_client_bin(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv (no system site packages) holding only ``pip install clients/``
    (dg2pf-client and what it depends on, from the package index): as a user without torch has it."""
    root = tmp_path_factory.mktemp("light-client")
    clients = Path(__file__).resolve().parents[3] / "clients"
    src = root / "src"  # a copy: the build leaves build/ and *.egg-info beside the sources
    shutil.copytree(clients, src, ignore=shutil.ignore_patterns("__pycache__", "build", "dist", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    pip = subprocess.run(
        [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", str(src)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return root / "venv" / "bin"
