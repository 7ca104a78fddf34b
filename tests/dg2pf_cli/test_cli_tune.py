"""What `dg2pf tune` leaves and shows: nothing in the current directory, no checkpoints left behind, none
of Ray's harmless worker noise on stderr, and a failing trial's error still shown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# Lines a successful run printed before (Ray 2.60): core_worker.cc's "E" lines (the PreemptionWatcher
# actor of every Ray Train controller) and the placement-group cleaner's traceback, both per trial.
NOISE = re.compile(
    r"\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\]|PlacementGroupCleaner|constructor arguments in the object store"
)


def test_tune_writes_only_out_hides_rays_noise_and_still_shows_a_failing_trial(tmp_path):
    inputs, cwd, out = tmp_path / "inputs", tmp_path / "cwd", tmp_path / "results" / "tuned"
    inputs.mkdir()
    cwd.mkdir()
    ckpt = inputs / "digits.safetensors"
    subprocess.run(
        [sys.executable, "-m", "dg2pf_cli", "init", "--arch", "digits_cnn", "--num-classes", "10", "--out", str(ckpt)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    space = inputs / "space.yaml"
    # lr=100 with weight_decay=10 diverges in its first epoch (as in test_ray_tune): that trial fails alone.
    space.write_text("lr: {grid: [0.001, 100.0]}\nweight_decay: 10.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dg2pf_cli",
            "tune",
            "--arch",
            "digits_cnn",
            "--num-classes",
            "10",
            "--checkpoint",
            str(ckpt),
            "--dataset",
            "digits",
            "--sparsity",
            "0.5",
            "--out",
            str(out),
            "--samples",
            "1",
            "--search-space",
            str(space),
            "--pruning-epochs",
            "1",
            "--max-epochs",
            "2",
            "--patience",
            "1",
            "--threads",
            "1",
        ],
        cwd=cwd,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # no runs/ray-train, nothing else
    assert sorted(p.name for p in out.parent.iterdir()) == ["tuned"]  # the temporary storage beside --out is gone
    assert {"model.safetensors", "model.compact.safetensors", "metrics.json", "trials.csv"} <= {
        p.name for p in out.iterdir()
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tune"]["storage_path"] is None
    noise = [line for line in result.stderr.splitlines() if NOISE.search(line)]
    assert noise == [], "\n".join(noise)
    assert "View detailed results here" not in result.stdout and "Configuration for experiment" not in result.stdout
    failed = [line for line in result.stdout.splitlines() if " failed " in line]
    assert len(failed) == 1 and "error:" in failed[0] and "nan" in failed[0], result.stdout
    assert "TrainingDiverged" in result.stderr  # Ray's own report of the failure is kept
    assert re.search(r"completed +val top-1 \d", result.stdout)
