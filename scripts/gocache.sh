# shellcheck shell=bash
# Sourced by scripts/controlplane.sh and scripts/helm.sh: tools built with Go into a cache
# outside the repository, one build at a time. The sourcing script sets REPO_ROOT and
# defines log and die.

cache_dir() {  # NAME: the cache directory of NAME
  local base="${POWERCAP_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:?HOME is not set; set POWERCAP_CACHE_DIR}/.cache}/powercap}"
  echo "$base/$1"
}

# built_or_locked ROOT WHAT CHECK...: succeeds when CHECK does (built already, or by another
# build that held the lock meanwhile); otherwise fails holding ROOT/.lock (fd 9) for this
# process, which then builds.
built_or_locked() {
  local root="$1" what="$2"
  shift 2
  case "$root/" in
    "$REPO_ROOT"/*) die "the cache ($root) must be outside the repository: set POWERCAP_CACHE_DIR" ;;
  esac
  "$@" && return 0
  mkdir -p "$root"
  # One build at a time (two CI jobs, or a test and a developer).
  exec 9>"$root/.lock"
  if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
    log "waiting for another build of $what in $root"
    flock 9
  fi
  "$@"
}
