#!/usr/bin/env bash
# The whole fidelity benchmark in one command: both environments, the grid, the report.
#
#   bash bench/fidelity/run.sh [options of python -m bench.fidelity.run]
#   e.g. bash bench/fidelity/run.sh --models resnet18 --sparsities 0.9 --seeds 0 --epochs 15 --pruning-epochs 6
#
# Finished cells are kept under bench/fidelity/results/ (or --results-dir), so re-running resumes.
# A failed INC set-up does not stop the run: the inc-magnitude cells are recorded as failed with the
# set-up's reason (bench/fidelity/cache/inc-setup.error).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash scripts/setup.sh
if ! .venv/bin/python -c "import matplotlib" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet -e ".[bench]"
fi

mkdir -p bench/fidelity/cache
inc_log=bench/fidelity/cache/inc-setup.log
if bash bench/fidelity/inc/setup.sh >"$inc_log" 2>&1; then
    rm -f bench/fidelity/cache/inc-setup.error
else
    tail -n 20 "$inc_log" > bench/fidelity/cache/inc-setup.error
    echo "run.sh: INC set-up failed (inc-magnitude cells will be recorded as failed); see $inc_log" >&2
fi

exec .venv/bin/python -m bench.fidelity.run "$@"
