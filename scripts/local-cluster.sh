#!/usr/bin/env bash
# powercap on a real Kubernetes control plane on this machine: no cluster, no GPU needed.
#   scripts/local-cluster.sh up [--scenario FILE] [--dir DIR]   start it; prints KUBECONFIG
#                                                              and commands to try
#   scripts/local-cluster.sh down [--dir DIR]                   stop everything
# etcd, kube-apiserver, kube-scheduler and kube-controller-manager come from
# scripts/controlplane.sh (built on first use: minutes, then cached); powercap's webhook,
# extender with the power-aware kube-scheduler, 2 controller replicas and one simulated
# node agent per GPU node run beside them as their own ServiceAccounts. The nodes,
# racks, policies and services come from a scenario (default scripts/local-cluster.yaml).
# State and logs: .local-cluster/ (or --dir). See docs/local-cluster.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# the stand-in kubelets serve the pod-resources API with grpcio, from the test extra
POWERCAP_EXTRAS=test,simulate
source scripts/venv.sh
if [ "${1:-}" = up ]; then
  bash scripts/controlplane.sh build >/dev/null
fi
exec "$VENV/bin/python" -m tests.e2e.localcluster "$@"
