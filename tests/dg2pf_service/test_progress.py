"""Job status fields from a run's progress file, including a run that was restarted mid-way."""

from __future__ import annotations

from dg2pf_core.algorithm.state import EpochRecord
from dg2pf_service.scheduler import progress_fields


def _rec(
    epoch: int, phase: str = "gradual_pruning", restarts: int = 0, best: bool = False, seconds: float = 2.0
) -> dict:
    return {
        **EpochRecord(
            phase=phase,
            epoch=epoch,
            sparsity=0.5,
            train_loss=0.1,
            val_top1=90.0 + epoch,
            val_top5=99.0,
            lr=0.01,
            seconds=seconds,
            is_best=best,
            restarts=restarts,
        ).to_dict(),
        "world_size": 2,
        "nodes": ["a", "b"],
    }


def test_a_restarted_run_shows_each_epoch_once_latest_attempt_wins():
    # Epochs 1-2 ran, the run lost a node and resumed from epoch 1's checkpoint: epoch 2 ran again.
    records = [
        _rec(0, "baseline"),
        _rec(1, best=True),
        _rec(2),
        _rec(2, restarts=1, best=True, seconds=4.0),
        _rec(3, restarts=1),
    ]
    fields = progress_fields(records, target=0.9, pruning_epochs=5)
    assert [r["epoch"] for r in fields["history"]] == [0, 1, 2, 3]
    assert fields["history"][2]["restarts"] == 1 and fields["history"][2]["seconds"] == 4.0
    assert fields["latest_metrics"]["epoch"] == 3 and fields["epoch"] == 3
    assert fields["best_metrics"]["epoch"] == 2 and fields["best_metrics"]["restarts"] == 1
    # ETA from the epochs that count: (2 + 4 + 2) / 3 s per epoch, 2 pruning epochs left.
    assert abs(fields["eta_seconds"] - 2 * 8.0 / 3) < 1e-9


def test_no_records_yet_is_the_baseline_phase():
    assert progress_fields([], target=0.9, pruning_epochs=5) == {"phase": "baseline"}
