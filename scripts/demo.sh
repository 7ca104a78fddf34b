#!/usr/bin/env bash
# The main job on the embedded default (local Ray head, SQLite, local artifact directory): start the
# service, pre-train the digits example, upload it, submit a 90% DG2PF job through the Python client,
# follow its progress, print the result, shut down. Everything lands in demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf demo-out
exec .venv/bin/dg2pf demo --out demo-out
