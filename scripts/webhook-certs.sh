#!/usr/bin/env bash
# Make the webhook's certificate with `powercap certs`, store it in the Secret the webhook
# Deployment mounts (powercap-webhook-tls: tls.crt, tls.key and the CA's ca.crt, which
# Prometheus verifies the webhook's /metrics with, as with cert-manager's Secret), and put
# the CA into the caBundle of both webhook configurations. Running it again renews the serving certificate from the same CA
# (kept in OUT), so the caBundle does not change and the webhook reloads the new files.
#
# The Secret is written with server-side apply, never `kubectl apply` client-side, which
# would copy the private key into the kubectl.kubernetes.io/last-applied-configuration
# annotation (readable by whoever may read the Secret's metadata, and kept by every later
# client-side apply); that annotation is removed if an older version of this script left
# one. OUT is created mode 0700 and ca.key must stay 0600 (powercap certs refuses it
# otherwise).
#
# Usage: scripts/webhook-certs.sh [--namespace NS] [--out DIR] [--days N]
#   defaults: --namespace powercap-system --out out/webhook-certs --days 365
# Environment: POWERCAP (the powercap command; default: the project's .venv), KUBECTL.
set -euo pipefail
cd "$(dirname "$0")/.."
NAMESPACE=powercap-system
SERVICE=powercap-webhook
OUT=out/webhook-certs
DAYS=365
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) NAMESPACE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --days) DAYS="$2"; shift 2 ;;
    *) echo "usage: $0 [--namespace NS] [--out DIR] [--days N]" >&2; exit 2 ;;
  esac
done
KUBECTL="${KUBECTL:-kubectl}"
if [ -z "${POWERCAP:-}" ]; then
  source scripts/venv.sh
  POWERCAP="$VENV/bin/powercap"
fi

CA_BUNDLE="$("$POWERCAP" certs --service "$SERVICE" --namespace "$NAMESPACE" --out "$OUT" --days "$DAYS")"
"$KUBECTL" -n "$NAMESPACE" create secret generic powercap-webhook-tls --type=kubernetes.io/tls \
  --from-file=tls.crt="$OUT/tls.crt" --from-file=tls.key="$OUT/tls.key" --from-file=ca.crt="$OUT/ca.crt" \
  --dry-run=client -o yaml |
  "$KUBECTL" apply --server-side --force-conflicts --field-manager=powercap-webhook-certs -f -
"$KUBECTL" -n "$NAMESPACE" annotate secret powercap-webhook-tls kubectl.kubernetes.io/last-applied-configuration- >/dev/null
for kind in validating mutating; do
  name="powercap-${kind}-webhook"
  if "$KUBECTL" get "${kind}webhookconfiguration" "$name" >/dev/null 2>&1; then
    "$KUBECTL" patch "${kind}webhookconfiguration" "$name" --type=json \
      -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$CA_BUNDLE\"}]"
  else
    echo "note: ${kind}webhookconfiguration/$name is not installed yet: run 'kubectl apply -k config/webhook', then this script again" >&2
  fi
done
echo "keep $OUT/ca.key safe: it signs every renewal (run this script again before $DAYS days pass)" >&2
