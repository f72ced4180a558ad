#!/usr/bin/env bash
# Regenerate every captured kubectl output in README.md and docs/ (the fenced blocks after
# a `<!-- captured: NAME (scripts/capture-docs.sh) -->` line) from a real cluster: starts
# scripts/local-cluster.sh's cluster in a temporary directory, runs tests/e2e/captures.py's
# commands, rewrites the blocks, stops the cluster. Review the diff; the end-to-end suite
# (tests/e2e/test_captured_docs.py) fails when the docs and the cluster disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
POWERCAP_EXTRAS=test,simulate
source scripts/venv.sh
bash scripts/controlplane.sh build >/dev/null
exec "$VENV/bin/python" -m tests.e2e.captures "$@"
