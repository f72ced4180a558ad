#!/usr/bin/env bash
# Run the test suite in its own virtualenv (.venv), installing what it needs.
#   scripts/test.sh                 the unit suite, then the end-to-end suite against a real
#                                   control plane (built by scripts/controlplane.sh on first
#                                   use and cached outside the repository); helm, for the
#                                   chart's tests, is built first (scripts/helm.sh) either way
#   scripts/test.sh [pytest args]   pytest with these arguments only (e.g. tests/test_cluster.py,
#                                   or -m e2e tests/e2e)
set -euo pipefail
cd "$(dirname "$0")/.."
POWERCAP_EXTRAS=test,simulate
source scripts/venv.sh
source scripts/debian-tools.sh
# helm for the chart's tests (tests/test_helm_chart.py), built from the Go module proxy on
# first use (1-2 minutes) and cached outside the repository. Without it those tests skip,
# or fail where CI=true.
if POWERCAP_HELM="$(bash scripts/helm.sh build)"; then
  export POWERCAP_HELM
else
  echo "warning: helm could not be built (scripts/helm.sh build): the chart's tests will skip, or fail in CI" >&2
fi
if [ $# -gt 0 ]; then
  exec "$VENV/bin/python" -m pytest "$@"
fi
"$VENV/bin/python" -m pytest
echo "unit suite passed; building (or reusing) the control plane for the end-to-end suite" >&2
bash scripts/controlplane.sh build >/dev/null
exec "$VENV/bin/python" -m pytest -m e2e tests/e2e
