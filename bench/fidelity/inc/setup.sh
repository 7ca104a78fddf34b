#!/usr/bin/env bash
# Creates bench/fidelity/.venv-inc: a Python 3.11 virtual environment with
# Intel Neural Compressor 2.x (pruning API) and the torch stack run_inc.py needs.
# Idempotent: a stamp file holding the pinned set makes a second run a no-op.
#
# Pins (why):
#   neural-compressor==2.6  last 2.x release; 2.x keeps the PyTorch pruning API
#                           (neural_compressor.training.prepare_compression +
#                           WeightPruningConfig); 3.x moved it. Requires numpy<2.
#   torch==2.13.0           the CPU build; pip takes it from the machine's local
#                           wheel when one is there (find-links), else PyPI.
#                           Installed first so nothing pulls a newer CUDA torch.
#   torchvision==0.28.0     the release paired with torch 2.13 (only models used).
#   numpy==1.26.4           INC 2.6 requires numpy<2.
#   safetensors==0.7.0      reading the dense checkpoint without pickle (+ packaging, which
#                           safetensors.torch imports but does not declare).
#   setuptools==80.10.2     INC 2.6 imports pkg_resources, which setuptools 81+ no longer ships
#                           (torch needs setuptools>=77.0.3).
#   six==1.17.0             imported by INC 2.6 at import time, not declared.
#   constraints.txt         every other package at the version this was tested with.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$(cd "$HERE/.." && pwd)/.venv-inc"
PY="${PYTHON:-python3.11}"

TORCH_PIN="torch==2.13.0"
PINS=(
  "torchvision==0.28.0"
  "neural-compressor==2.6"
  "numpy==1.26.4"
  "safetensors==0.7.0"
  "packaging==26.3"
  "setuptools==80.10.2"
  "six==1.17.0"
)
STAMP="$VENV/.inc-setup-stamp"
WANT="$TORCH_PIN ${PINS[*]} constraints:$(sha256sum "$HERE/constraints.txt" | cut -c1-12)"

fail() { echo "setup.sh: FAILED: $*" >&2; exit 1; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "setup.sh: $VENV already set up ($WANT); nothing to do"
  exit 0
fi

command -v "$PY" >/dev/null 2>&1 || fail "no $PY on PATH (set PYTHON=/path/to/python3.11)"
ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$ver" == "3.11" ]] || fail "$PY is Python $ver, need 3.11"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup.sh: creating $VENV"
  "$PY" -m venv "$VENV" || fail "python -m venv $VENV"
fi
VPY="$VENV/bin/python"
rm -f "$STAMP"


echo "setup.sh: installing $TORCH_PIN"
"$VPY" -m pip install -q -c "$HERE/constraints.txt" "$TORCH_PIN" \
  || fail "pip install $TORCH_PIN (CPU build expected from the local wheel or PyPI)"

echo "setup.sh: installing ${PINS[*]}"
"$VPY" -m pip install -q -c "$HERE/constraints.txt" "$TORCH_PIN" "${PINS[@]}" \
  || fail "pip install ${PINS[*]}"

echo "setup.sh: checking imports"
"$VPY" - "$HERE" <<'EOF' || fail "import check (see traceback above)"
import sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
from run_inc import import_torchvision  # torchvision's PyPI wheel needs a shim with the CPU torch
import numpy, torch, safetensors.torch
tv = import_torchvision()
import neural_compressor
from neural_compressor.training import prepare_compression, WeightPruningConfig
m = tv.models.shufflenet_v2_x0_5(num_classes=10)
print("setup.sh: ok: neural_compressor", neural_compressor.__version__, "torch", torch.__version__,
      "torchvision", tv.__version__, "numpy", numpy.__version__)
EOF

echo "$WANT" > "$STAMP"
echo "setup.sh: done: $VENV"
