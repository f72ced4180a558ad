#!/usr/bin/env bash
# Run the test suite in its own virtualenv (.venv), installing what it needs.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
POWERCAP_EXTRAS=test,simulate
source scripts/venv.sh
source scripts/debian-tools.sh
exec "$VENV/bin/python" -m pytest "$@"
