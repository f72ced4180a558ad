#!/usr/bin/env bash
# A real Kubernetes control plane (etcd, kube-apiserver, kube-scheduler,
# kube-controller-manager) for end-to-end tests, built from Kubernetes' own Go modules
# (tests/e2e/controlplane) and run as plain processes on 127.0.0.1: no docker, no kind,
# no kubelet, no downloaded binaries.
#
# Usage:
#   scripts/controlplane.sh build     build the binaries into the cache (reused while the
#                                     pins are unchanged); prints the bin directory
#   scripts/controlplane.sh path      print the bin directory, building first if needed
#   scripts/controlplane.sh version   print the pinned Kubernetes release (e.g. v1.37.2)
#   scripts/controlplane.sh up DIR    start the control plane with certificates,
#                                     kubeconfigs, logs and pid files in DIR; prints the
#                                     admin kubeconfig's path once all of it is ready
#   scripts/controlplane.sh down DIR  stop what `up DIR` started (idempotent)
#
# The binaries live outside the repository, in
#   ${POWERCAP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/powercap}/controlplane/<release>/bin
# keyed on a hash of tests/e2e/controlplane's go.mod, go.sum and .go files and the Go
# version: a changed pin rebuilds, an unchanged one returns at once. A cold build takes
# 6-10 minutes on 2 cores (docs/controlplane-build-notes.md); with Go's build cache
# ($GOCACHE) warm, a rebuild (new key, same packages) takes under a minute.
#
# `up DIR` starts an empty cluster each time (DIR/etcd-data is wiped); the certificates in
# DIR/pki are made once and reused. DIR/controlplane.env holds the addresses for scripts.
# Without a kubelet no container runs: pods are scheduled (bound to Nodes that tests
# create, Ready, in their status) and stay Pending. Nothing taints those Nodes: the
# apiserver runs without the TaintNodesByCondition admission plugin and the controller
# manager without its nodelifecycle controller (no kubelet renews the Nodes' Leases).
#
# Environment:
#   POWERCAP_CACHE_DIR          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/powercap)
#   GO                          the go command (default: go on PATH); Go >= 1.26 needed
#   CONTROLPLANE_BUILD_P        go build -p (parallel compile jobs; default: Go's, = cores)
#   CONTROLPLANE_APISERVER_ARGS extra kube-apiserver flags for `up` (split on spaces)
#   CONTROLPLANE_SCHEDULER_ARGS extra kube-scheduler flags for `up`, e.g. --config=FILE
#   CONTROLPLANE_CONTROLLER_MANAGER_ARGS  extra kube-controller-manager flags for `up`
#   CONTROLPLANE_CONTROLLERS    its --controllers (default '*,-nodelifecycle')
#   CONTROLPLANE_TIMEOUT        seconds `up` waits for each component (default 120)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODULE_DIR="$REPO_ROOT/tests/e2e/controlplane"
ETCD_MODULE_DIR="$MODULE_DIR/etcd"
BINARIES=(etcd kube-apiserver kube-scheduler kube-controller-manager)
# Bump when the build recipe (flags, layout) changes, so that old caches are rebuilt.
RECIPE=2
GO="${GO:-go}"
# the modules build on their own go.mod/go.sum, whatever go.work the caller has
export GOWORK=off

log() { echo "controlplane: $*" >&2; }
die() { echo "controlplane: error: $*" >&2; exit 1; }
# shellcheck source=scripts/gocache.sh
source "$REPO_ROOT/scripts/gocache.sh"

usage() {
  sed -n '/^# Usage:/,/^# The binaries/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# --- the pins --------------------------------------------------------------------------

release() {  # the k8s.io/kubernetes version required by the module
  local version
  version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ { print $2; exit }' "$MODULE_DIR/go.mod")"
  [ -n "$version" ] || die "no 'k8s.io/kubernetes v1.X.Y' requirement in $MODULE_DIR/go.mod"
  echo "$version"
}

etcd_version() {
  local version
  version="$(awk '{ for (i = 1; i < NF; i++) if ($i == "go.etcd.io/etcd/server/v3" && $(i + 1) ~ /^v3\./) { print $(i + 1); exit } }' "$ETCD_MODULE_DIR/go.mod")"
  [ -n "$version" ] || die "no 'go.etcd.io/etcd/server/v3 v3.X.Y' requirement in $ETCD_MODULE_DIR/go.mod"
  echo "$version"
}

# Every k8s.io staging module must be replaced by the v0.X.Y matching release v1.X.Y: a
# stale replace builds a mix of two releases, or does not build at all.
check_replaces() {
  local rel="$1" staging bad
  staging="v0.${rel#v1.}"
  bad="$(awk -v want="$staging" '$2 == "=>" && $1 ~ /^k8s\.io\// && $4 != want { print $1 " => " $3 " " $4 }' "$MODULE_DIR/go.mod")"
  [ -z "$bad" ] || die "these replaces in $MODULE_DIR/go.mod do not match $rel (want $staging):
$bad"
}

cache_root() {
  cache_dir "controlplane/$(release)"
}

need_go() {
  command -v "$GO" >/dev/null 2>&1 || die "'$GO' not found: the control plane is built from source with Go >= 1.26 (install Go, or set GO=/path/to/go)"
}

# Hash of what the binaries are built from: the recipe, the Go toolchain and the modules'
# go.mod, go.sum and .go files.
build_key() {
  local goversion
  goversion="$(cd "$MODULE_DIR" && "$GO" env GOVERSION GOOS GOARCH | tr '\n' ' ')"
  {
    echo "recipe $RECIPE"
    echo "go $goversion"
    (cd "$MODULE_DIR" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -d' ' -f1
}

is_built() {  # ROOT KEY
  local root="$1" key="$2" name
  [ -f "$root/key" ] && [ "$(cat "$root/key")" = "$key" ] || return 1
  for name in "${BINARIES[@]}"; do
    [ -x "$root/bin/$name" ] || return 1
  done
}

ldflags() {  # RELEASE: what hack/lib/version.sh sets, so that --version and the
  # emulation/compatibility version checks see the real release, not v0.0.0
  local rel="$1" minor date flags="-s -w" pkg
  minor="${rel#v1.}"
  minor="${minor%%.*}"
  date="$(cd "$MODULE_DIR" && "$GO" list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$rel -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    [ -z "$date" ] || flags+=" -X $pkg.buildDate=$date"
  done
  echo "$flags"
}

build() {
  need_go
  local rel root key started partial p=() seconds
  rel="$(release)"
  check_replaces "$rel"
  root="$(cache_root)"
  key="$(build_key)"
  if built_or_locked "$root" "$rel" is_built "$root" "$key"; then
    echo "$root/bin"
    return 0
  fi
  if [ -n "${CONTROLPLANE_BUILD_P:-}" ]; then p=(-p "$CONTROLPLANE_BUILD_P"); fi
  partial="$root/bin.partial"
  # static binaries, as Kubernetes and etcd release them (and no C compiler needed)
  export CGO_ENABLED=0
  rm -rf "$partial"
  mkdir -p "$partial"
  started=$SECONDS
  log "building kube-apiserver, kube-scheduler, kube-controller-manager $rel and etcd $(etcd_version) into $root/bin"
  log "(6-10 minutes on 2 cores with a cold Go build cache, about 1 warm; it is $("$GO" env GOCACHE))"
  (
    cd "$MODULE_DIR"
    "$GO" build "${p[@]}" -trimpath -buildvcs=false -ldflags "$(ldflags "$rel")" -o "$partial/" ./cmd/kube-apiserver ./cmd/kube-scheduler ./cmd/kube-controller-manager
  ) || die "go build of the Kubernetes $rel binaries failed (module $MODULE_DIR)"
  log "Kubernetes binaries built in $((SECONDS - started))s; building etcd"
  (
    cd "$ETCD_MODULE_DIR"
    "$GO" build "${p[@]}" -trimpath -buildvcs=false -ldflags "-s -w" -o "$partial/etcd" .
  ) || die "go build of etcd $(etcd_version) failed (module $ETCD_MODULE_DIR)"
  "$partial/kube-apiserver" --version | grep -qx "Kubernetes $rel" \
    || die "the built kube-apiserver reports '$("$partial/kube-apiserver" --version)', not 'Kubernetes $rel'"
  rm -rf "${root:?}/bin"
  mv "$partial" "$root/bin"
  echo "$key" >"$root/key"
  seconds=$((SECONDS - started))
  log "built in ${seconds}s: $(cd "$root/bin" && du -h "${BINARIES[@]}" | tr '\t\n' ' ')"
  echo "$root/bin"
}

path() {
  need_go
  local root key
  root="$(cache_root)"
  key="$(build_key)"
  if is_built "$root" "$key"; then
    echo "$root/bin"
  else
    log "not built yet (or the pins changed): building"
    build
  fi
}

# --- up / down -------------------------------------------------------------------------

# What `up` starts; `down` stops the first three together, then etcd.
COMPONENTS=(kube-controller-manager kube-scheduler kube-apiserver etcd)

now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

free_port() {  # a port nobody listens on, below Linux's ephemeral range, not in $TAKEN
  local port tries
  for tries in $(seq 1 200); do
    port=$((20000 + RANDOM % 12000))
    case " $TAKEN " in *" $port "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  die "no free port found after $tries tries"
}

running_pid() {  # DIR NAME: the pid of NAME started in DIR, if it still runs
  local file="$1/run/$2.pid" pid stat comm state
  [ -f "$file" ] || return 1
  pid="$(cat "$file")"
  [ -n "$pid" ] && stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  comm="${stat#*(}"
  comm="${comm%)*}"
  state="${stat##*) }"
  # the kernel keeps 15 characters of the name; another name: the pid was reused
  [ "$comm" = "${2:0:15}" ] || return 1
  # exited, not yet reaped (its parent, once `up` is gone, is init)
  [ "${state%% *}" != Z ] || return 1
  echo "$pid"
}

PKI_FILES=(ca.crt front-proxy-ca.crt apiserver.crt apiserver-kubelet-client.crt front-proxy-client.crt
  admin.crt scheduler.crt controller-manager.crt sa.key sa.pub)

pki() {  # DIR: CAs, the apiserver's serving certificate, client certificates and the
  # service-account key pair, made once per DIR (EC P-256 keys: fast to make)
  local pki="$1/pki" ext file complete=1
  for file in "${PKI_FILES[@]}"; do
    [ -f "$pki/$file" ] || complete=0
  done
  [ "$complete" = 0 ] || return 0
  command -v openssl >/dev/null 2>&1 || die "openssl is needed to make the certificates"
  log "making certificates in $pki"
  mkdir -p "$pki"
  ext="$(mktemp)"
  pki_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/$1.key" 2>/dev/null; }
  ca() {  # NAME COMMON_NAME
    pki_key "$1"
    openssl req -x509 -new -key "$pki/$1.key" -days 3650 -subj "/CN=$2" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out "$pki/$1.crt" 2>/dev/null
  }
  leaf() {  # CA NAME SUBJECT EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
    pki_key "$2"
    {
      echo "basicConstraints=critical,CA:FALSE"
      echo "keyUsage=critical,digitalSignature"
      echo "extendedKeyUsage=$4"
      [ -z "${5:-}" ] || echo "subjectAltName=$5"
    } >"$ext"
    openssl req -new -key "$pki/$2.key" -subj "$3" 2>/dev/null \
      | openssl x509 -req -CA "$pki/$1.crt" -CAkey "$pki/$1.key" -set_serial "0x$(openssl rand -hex 16)" \
        -days 365 -extfile "$ext" -out "$pki/$2.crt" 2>/dev/null
  }
  ca ca powercap-e2e-ca
  ca front-proxy-ca powercap-e2e-front-proxy-ca
  leaf ca apiserver "/CN=kube-apiserver" serverAuth \
    "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  leaf ca apiserver-kubelet-client "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client" clientAuth
  leaf front-proxy-ca front-proxy-client "/CN=front-proxy-client" clientAuth
  leaf ca admin "/O=system:masters/CN=kubernetes-admin" clientAuth
  leaf ca scheduler "/CN=system:kube-scheduler" clientAuth
  leaf ca controller-manager "/CN=system:kube-controller-manager" clientAuth
  pki_key sa
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  rm -f "$ext"
}

kubeconfig() {  # FILE SERVER USER: a kubeconfig with the certificates embedded
  local b64=(base64 -w0)
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: powercap-e2e
  cluster:
    server: $2
    certificate-authority-data: $("${b64[@]}" <"$DIR/pki/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $("${b64[@]}" <"$DIR/pki/$3.crt")
    client-key-data: $("${b64[@]}" <"$DIR/pki/$3.key")
contexts:
- name: powercap-e2e
  context:
    cluster: powercap-e2e
    user: $3
current-context: powercap-e2e
EOF
  chmod 600 "$1"
}

start() {  # NAME ARGS...: run the binary in the background, logs and pid in DIR
  local name="$1"
  shift
  "$BIN/$name" "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 &
  echo $! >"$DIR/run/$name.pid"
}

extra_args() {  # VARIABLE: the words of $VARIABLE, one a line (for mapfile)
  local words=()
  if [ -n "${!1:-}" ]; then read -r -a words <<<"${!1}"; fi
  if [ ${#words[@]} -gt 0 ]; then printf '%s\n' "${words[@]}"; fi
}

wait_for() {  # NAME DESCRIPTION COMMAND...: poll COMMAND until it succeeds
  local name="$1" what="$2" started deadline
  shift 2
  started="$(now)"
  deadline=$((SECONDS + ${CONTROLPLANE_TIMEOUT:-120}))
  until "$@" >/dev/null 2>&1; do
    if ! running_pid "$DIR" "$name" >/dev/null; then
      tail -n 30 "$DIR/logs/$name.log" >&2 || true
      die "$name exited before it was $what (log: $DIR/logs/$name.log)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$DIR/logs/$name.log" >&2 || true
      die "$name not $what after ${CONTROLPLANE_TIMEOUT:-120}s (log: $DIR/logs/$name.log)"
    fi
    sleep 0.1
  done
  log "$name $what in $(since "$started")s"
}

api() {  # PATH: GET it from the apiserver as the admin
  curl -fsS --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" "$SERVER$1"
}

lease_held() {  # NAME: the Lease kube-system/NAME has a holder
  api "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/$1" | grep -q '"holderIdentity": *"[^"]'
}

up() {
  [ $# -eq 1 ] || usage
  mkdir -p "$1"
  DIR="$(cd "$1" && pwd)"
  local name etcd_client etcd_peer apiserver_port scheduler_port kcm_port extra started
  for name in "${COMPONENTS[@]}"; do
    if running_pid "$DIR" "$name" >/dev/null; then
      die "$name is already running from $DIR: run '$0 down $DIR' first"
    fi
  done
  BIN="$(path)"
  command -v curl >/dev/null 2>&1 || die "curl is needed to wait for the components"
  started="$(now)"
  mkdir -p "$DIR/logs" "$DIR/run"
  trap 'up_failed $?' EXIT  # whatever fails from here on, stop what was started
  pki "$DIR"
  TAKEN=""
  etcd_client="$(free_port)"; TAKEN+=" $etcd_client"
  etcd_peer="$(free_port)"; TAKEN+=" $etcd_peer"
  apiserver_port="$(free_port)"; TAKEN+=" $apiserver_port"
  scheduler_port="$(free_port)"; TAKEN+=" $scheduler_port"
  kcm_port="$(free_port)"
  SERVER="https://127.0.0.1:$apiserver_port"

  rm -rf "$DIR/etcd-data"
  start etcd --name=powercap-e2e --data-dir="$DIR/etcd-data" \
    --listen-client-urls="http://127.0.0.1:$etcd_client" --advertise-client-urls="http://127.0.0.1:$etcd_client" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-cluster="powercap-e2e=http://127.0.0.1:$etcd_peer" --initial-cluster-state=new \
    --unsafe-no-fsync --log-level=warn
  wait_for etcd ready curl -fsS "http://127.0.0.1:$etcd_client/health"

  # --endpoint-reconciler-type=none: the default (lease) reconciler refuses a loopback
  # --advertise-address ("may not be in the loopback range"); with no kube-proxy nothing
  # would route the kubernetes Service to it anyway.
  # --requestheader-*/--proxy-client-*: the front-proxy CA that delegated authentication
  # (the scheduler's and controller manager's own endpoints, aggregated APIs) reads.
  # --disable-admission-plugins=TaintNodesByCondition: it taints every new Node
  # not-ready, and only the nodelifecycle controller (off, see below) would lift that:
  # without it the Nodes that tests create, Ready, are schedulable at once.
  mapfile -t extra < <(extra_args CONTROLPLANE_APISERVER_ARGS)
  start kube-apiserver --etcd-servers="http://127.0.0.1:$etcd_client" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$apiserver_port" \
    --endpoint-reconciler-type=none \
    --tls-cert-file="$DIR/pki/apiserver.crt" --tls-private-key-file="$DIR/pki/apiserver.key" \
    --client-ca-file="$DIR/pki/ca.crt" \
    --kubelet-client-certificate="$DIR/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$DIR/pki/apiserver-kubelet-client.key" \
    --requestheader-client-ca-file="$DIR/pki/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$DIR/pki/front-proxy-client.crt" --proxy-client-key-file="$DIR/pki/front-proxy-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$DIR/pki/sa.pub" --service-account-signing-key-file="$DIR/pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota \
    --disable-admission-plugins=TaintNodesByCondition \
    --allow-privileged=true --profiling=false \
    "${extra[@]}"
  kubeconfig "$DIR/admin.kubeconfig" "$SERVER" admin
  kubeconfig "$DIR/scheduler.kubeconfig" "$SERVER" scheduler
  kubeconfig "$DIR/controller-manager.kubeconfig" "$SERVER" controller-manager
  wait_for kube-apiserver ready api /readyz

  mapfile -t extra < <(extra_args CONTROLPLANE_SCHEDULER_ARGS)
  start kube-scheduler --kubeconfig="$DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig="$DIR/scheduler.kubeconfig" --authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$scheduler_port" --leader-elect=true \
    "${extra[@]}"
  # --controllers without nodelifecycle: tests' Nodes have no kubelet to renew their
  # Leases, and that controller would taint them unreachable (and evict their pods).
  mapfile -t extra < <(extra_args CONTROLPLANE_CONTROLLER_MANAGER_ARGS)
  start kube-controller-manager --kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" --leader-elect=true \
    --controllers="${CONTROLPLANE_CONTROLLERS:-*,-nodelifecycle}" \
    --use-service-account-credentials=true --service-account-private-key-file="$DIR/pki/sa.key" \
    --root-ca-file="$DIR/pki/ca.crt" --service-cluster-ip-range=10.0.0.0/24 --cluster-name=powercap-e2e \
    --cluster-signing-cert-file="$DIR/pki/ca.crt" --cluster-signing-key-file="$DIR/pki/ca.key" \
    "${extra[@]}"
  wait_for kube-scheduler "holding its Lease" lease_held kube-scheduler
  wait_for kube-controller-manager "holding its Lease" lease_held kube-controller-manager
  # pods are refused in a namespace until the controller manager made its ServiceAccount
  wait_for kube-controller-manager "done with default/default" api /api/v1/namespaces/default/serviceaccounts/default

  cat >"$DIR/controlplane.env" <<EOF
# written by scripts/controlplane.sh up; removed by scripts/controlplane.sh down $DIR
CONTROLPLANE_RELEASE=$(release)
CONTROLPLANE_BIN=$BIN
KUBECONFIG=$DIR/admin.kubeconfig
APISERVER_URL=$SERVER
ETCD_URL=http://127.0.0.1:$etcd_client
SCHEDULER_URL=https://127.0.0.1:$scheduler_port
CONTROLLER_MANAGER_URL=https://127.0.0.1:$kcm_port
CA_FILE=$DIR/pki/ca.crt
EOF
  trap - EXIT
  log "up in $(since "$started")s: $SERVER (logs in $DIR/logs; stop with: $0 down $DIR)"
  echo "$DIR/admin.kubeconfig"
}

up_failed() {  # RC: the EXIT trap while `up` runs: stop what was started
  [ "$1" -eq 0 ] || down "$DIR" >/dev/null 2>&1 || true
}

stop() {  # DIR NAME...: SIGTERM each, up to 15s for them to exit, then SIGKILL
  local dir="$1" name pid i left
  shift
  for name in "$@"; do
    if pid="$(running_pid "$dir" "$name")"; then
      kill -TERM "$pid" 2>/dev/null || true
      STOPPED=$((STOPPED + 1))
    fi
  done
  for i in $(seq 1 150); do
    left=0
    for name in "$@"; do
      if running_pid "$dir" "$name" >/dev/null; then left=1; fi
    done
    [ "$left" = 1 ] || break
    sleep 0.1
  done
  for name in "$@"; do
    if pid="$(running_pid "$dir" "$name")"; then
      log "$name (pid $pid) still runs ${i}00ms after SIGTERM: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/run/$name.pid"
  done
}

down() {
  [ $# -eq 1 ] || usage
  local dir="$1" started
  [ -d "$dir" ] || { log "nothing to stop: $dir does not exist"; return 0; }
  started="$(now)"
  STOPPED=0
  stop "$dir" kube-controller-manager kube-scheduler kube-apiserver
  stop "$dir" etcd
  rm -f "$dir/controlplane.env"
  log "stopped $STOPPED process(es) started from $dir in $(since "$started")s"
}

case "${1:-}" in
  build) [ $# -eq 1 ] || usage; build ;;
  path) [ $# -eq 1 ] || usage; path ;;
  version) [ $# -eq 1 ] || usage; release ;;
  up) shift; up "$@" ;;
  down) shift; down "$@" ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
