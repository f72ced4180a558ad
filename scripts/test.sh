#!/usr/bin/env bash
# Run the test suite in its own virtualenv (.venv), installing what it needs.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
source scripts/promtool.sh
exec "$VENV/bin/python" -m pytest "$@"
