#!/usr/bin/env bash
# The main job on the embedded default: pre-train the digits example, prune it to 90% with DG2PF,
# evaluate the result. Everything lands in demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
rm -rf demo-out
echo "== 1/3 pre-train digits_cnn on scikit-learn's handwritten digits"
dg2pf example digits --out demo-out/example
echo "== 2/3 prune it to 90% sparsity with DG2PF"
dg2pf prune --arch digits_cnn --num-classes 10 --checkpoint demo-out/example/model.safetensors \
    --dataset digits --sparsity 0.9 --out demo-out/pruned
echo "== 3/3 evaluate the pruned checkpoint on the test split"
dg2pf evaluate --arch digits_cnn --num-classes 10 --checkpoint demo-out/pruned/model.safetensors --dataset digits
