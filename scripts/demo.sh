#!/usr/bin/env bash
# The main job on an embedded default: no cluster, no GPU needed.
# Simulates the built-in 64-GPU cluster (40 H200-like, 24 L40S-like, 3 racks, 3 LLM
# services, one compressed day) under no capping, a static equal split of each cap and
# powercap, running the real extender, controller and node agent decisions in simulated
# time. Prints the results table; writes summary.json and PNG plots to out/simulation/.
# Usage: scripts/demo.sh [powercap simulate options, e.g. --duration 300 --seed 2]
set -euo pipefail
cd "$(dirname "$0")/.."
POWERCAP_EXTRAS=simulate
source scripts/venv.sh
OUT="out/simulation"
"$VENV/bin/powercap" validate config/samples/*.yaml >/dev/null
"$VENV/bin/powercap" simulate --out "$OUT" "$@"
echo
echo "open $OUT/report.html (the table and every plot on one page), or the plots:"
echo "  $OUT/services.png $OUT/service-power.png $OUT/racks.png $OUT/throughput.png"
