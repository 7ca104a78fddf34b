#!/usr/bin/env bash
# Set up and run the whole test suite (slow end-to-end tests included). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/e2e/service/test_ui.py drives the dashboard in the distribution's Chromium: Playwright is told where it
# is and never downloads a browser of its own (no `playwright install`).
if ! command -v chromium >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
# The PostgreSQL-backed store is tested against the real server on 127.0.0.1:5432.
if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
    for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
# One formatter and linter (ruff, configured in pyproject.toml): style is never a review topic.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# A crash in native code (also at interpreter exit) prints every thread's Python stack.
export PYTHONFAULTHANDLER=1
exec .venv/bin/python -m pytest --durations=60 "$@"
