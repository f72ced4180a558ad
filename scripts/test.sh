#!/usr/bin/env bash
# Run the test suite in its own virtualenv (.venv), installing what it needs.
#   scripts/test.sh                 the unit suite, then the end-to-end suite against a real
#                                   control plane (built by scripts/controlplane.sh on first
#                                   use and cached outside the repository)
#   scripts/test.sh [pytest args]   pytest with these arguments only (e.g. tests/test_cluster.py,
#                                   or -m e2e tests/e2e)
set -euo pipefail
cd "$(dirname "$0")/.."
POWERCAP_EXTRAS=test,simulate
source scripts/venv.sh
source scripts/debian-tools.sh
if [ $# -gt 0 ]; then
  exec "$VENV/bin/python" -m pytest "$@"
fi
"$VENV/bin/python" -m pytest
echo "unit suite passed; building (or reusing) the control plane for the end-to-end suite" >&2
bash scripts/controlplane.sh build >/dev/null
exec "$VENV/bin/python" -m pytest -m e2e tests/e2e
