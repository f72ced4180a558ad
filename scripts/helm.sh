#!/usr/bin/env bash
# The helm CLI for the chart's tests (tests/test_helm_chart.py), built from the Go module
# proxy (helm.sh/helm/v3/cmd/helm at a pinned version): no downloaded binaries.
#
# Usage:
#   scripts/helm.sh build     build helm into the cache unless it is there; prints its path
#   scripts/helm.sh path      print the path of the built helm; fails if it is not built
#   scripts/helm.sh version   print the pinned helm version (e.g. v3.21.4)
#
# The binary lives outside the repository, in
#   ${POWERCAP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/powercap}/helm/<version>/bin/helm
# keyed on the version, this recipe and the Go toolchain: a changed pin rebuilds, an
# unchanged one returns at once. A cold build (modules downloaded, empty Go build cache)
# takes about 2 minutes on 2 cores (1 with the modules and Go build cache warm).
#
# Environment:
#   POWERCAP_CACHE_DIR   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/powercap)
#   GO                   the go command (default: go on PATH)
#   HELM_VERSION         another helm v3 release to build (default: the pin below)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HELM_VERSION="${HELM_VERSION:-v3.21.4}"
# Bump when the build recipe (flags, layout) changes, so that old caches are rebuilt.
RECIPE=1
GO="${GO:-go}"
export GOWORK=off GOFLAGS=-mod=mod

log() { echo "helm.sh: $*" >&2; }
die() { echo "helm.sh: error: $*" >&2; exit 1; }
# shellcheck source=scripts/gocache.sh
source "$REPO_ROOT/scripts/gocache.sh"

usage() {
  sed -n '/^# Usage:/,/^# The binary/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

cache_root() {
  cache_dir "helm/$HELM_VERSION"
}

need_go() {
  command -v "$GO" >/dev/null 2>&1 || die "'$GO' not found: helm is built from source with Go (install Go, or set GO=/path/to/go)"
}

build_key() {
  echo "recipe $RECIPE helm $HELM_VERSION go $("$GO" env GOVERSION GOOS GOARCH | tr '\n' ' ')"
}

is_built() {  # ROOT KEY
  [ -x "$1/bin/helm" ] && [ -f "$1/key" ] && [ "$(cat "$1/key")" = "$2" ]
}

# What helm's Makefile sets: the version `helm version` reports, and the Kubernetes
# version that `helm template` and `helm lint` assume without --kube-version (client-go's
# v0.X.Y is Kubernetes v1.X; unset, helm v3 assumes v1.20).
ldflags() {  # MODULE_DIR
  local client_go minor flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" pkg
  client_go="$(cd "$1" && "$GO" list -m -f '{{.Version}}' k8s.io/client-go)"
  minor="${client_go#v0.}"
  minor="${minor%%.*}"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
  done
  echo "$flags"
}

build() {
  need_go
  local root key module started
  root="$(cache_root)"
  key="$(build_key)"
  if built_or_locked "$root" "helm $HELM_VERSION" is_built "$root" "$key"; then
    echo "$root/bin/helm"
    return 0
  fi
  started=$SECONDS
  module="$(mktemp -d)"
  # shellcheck disable=SC2064  # expand $module now: it is local
  trap "rm -rf '$module'" EXIT
  log "building helm $HELM_VERSION into $root/bin (about 2 minutes cold; Go's build cache is $("$GO" env GOCACHE))"
  (
    cd "$module"
    "$GO" mod init powercap.local/helm-build >/dev/null 2>&1
    "$GO" get "helm.sh/helm/v3@$HELM_VERSION" >/dev/null 2>&1 \
      || "$GO" get "helm.sh/helm/v3@$HELM_VERSION"
    rm -rf "$root/bin.partial"
    CGO_ENABLED=0 "$GO" build -trimpath -buildvcs=false -ldflags "$(ldflags "$module")" \
      -o "$root/bin.partial/helm" helm.sh/helm/v3/cmd/helm
  ) || die "go build of helm $HELM_VERSION failed"
  "$root/bin.partial/helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION" \
    || die "the built helm reports '$("$root/bin.partial/helm" version --short)', not $HELM_VERSION"
  rm -rf "${root:?}/bin"
  mv "$root/bin.partial" "$root/bin"
  echo "$key" >"$root/key"
  log "built in $((SECONDS - started))s: $(du -h "$root/bin/helm" | cut -f1)"
  echo "$root/bin/helm"
}

path() {
  need_go
  local root
  root="$(cache_root)"
  is_built "$root" "$(build_key)" || die "helm $HELM_VERSION is not built (or Go changed): run scripts/helm.sh build"
  echo "$root/bin/helm"
}

case "${1:-}" in
  build) [ $# -eq 1 ] || usage; build ;;
  path) [ $# -eq 1 ] || usage; path ;;
  version) [ $# -eq 1 ] || usage; echo "$HELM_VERSION" ;;
  *) usage ;;
esac
