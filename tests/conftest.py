"""Shared fixtures: tiny models and data for fast property tests, the real digits example for e2e."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dg2pf_core.loaders import LocalLoaders

from tiny import TinyNet, tiny_data


@pytest.fixture
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_loaders() -> LocalLoaders:
    return LocalLoaders(tiny_data(96, seed=0), tiny_data(32, seed=1), tiny_data(32, seed=2), batch_size=16, eval_batch_size=64, seed=0)


@pytest.fixture(scope="session")
def digits_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pre-trained digits example (trained once per test session, 10-20 s on 2 cores)."""
    from dg2pf_core.example import write_example

    out = tmp_path_factory.mktemp("example") / "digits"
    write_example("digits", out)
    return out


@pytest.fixture(scope="session", autouse=True)
def _image_check_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Image-check caches of the tests' datasets go to a temporary folder, not the user's ~/.cache
    (set in the environment, so the service and runner processes the tests start use it too)."""
    import os

    os.environ["DG2PF_CACHE_DIR"] = str(tmp_path_factory.mktemp("dg2pf-cache"))
