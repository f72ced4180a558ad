#!/usr/bin/env bash
# The main job on an embedded default: no cluster, no GPU needed.
# Usage: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$VENV/bin/powercap" validate config/samples/*.yaml
