"""A finished tiny job (digits_cnn from random weights, one pruning and one more epoch: sizes, not accuracy),
run once for the contract's tests: what a real run writes is what the contract names and types."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def finished_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the run's output directory, its state directory, kept)."""
    from dg2pf_core import DG2PFConfig, PruneJob
    from dg2pf_core.io.checkpoint_save import save_state_dict
    from dg2pf_core.job import prune_to_dir
    from dg2pf_core.models import build_model

    root = tmp_path_factory.mktemp("tiny-job")
    torch.manual_seed(0)
    save_state_dict(build_model("digits_cnn", 10).state_dict(), root / "in.safetensors")
    config = DG2PFConfig(sparsity=0.5, pruning_epochs=1, max_epochs=2, patience=1, seed=0)
    prune_to_dir(
        PruneJob("digits_cnn", 10, str(root / "in.safetensors"), "digits", config),
        root / "out",
        state_dir=root / "state",
        keep_state=True,
    )
    return root / "out", root / "state"
