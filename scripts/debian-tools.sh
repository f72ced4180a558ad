# shellcheck shell=bash
# Sourced by scripts/test.sh: make the command-line tools some tests run available, each
# from its Debian package, when the machine does not have them:
# - promtool, from the package prometheus: the metrics lint (tests/test_agent_metrics.py)
#   and the dashboard's PromQL (tests/test_docs_metrics.py);
# - shellcheck, from the package of that name: tests/test_scripts.py.
# Only the binary is unpacked into $VENV/bin (`apt-get download` + `dpkg-deb -x`):
# installing prometheus would also register (and maybe start) a Prometheus server.
# Quiet unless it fails; the tests themselves fail, not skip, when a tool is still missing.
_debian_tool() {  # COMMAND PACKAGE
  local command="$1" package="$2" log dir venv_bin
  if command -v "$command" >/dev/null 2>&1 || [ -x "$VENV/bin/$command" ] || ! command -v apt-get >/dev/null 2>&1; then
    return 0
  fi
  log="$(mktemp)"
  dir="$(mktemp -d)"
  venv_bin="$(cd "$VENV/bin" && pwd)"
  if (
    cd "$dir"
    if [ "$(id -u)" = 0 ] && [ -z "${_debian_tools_updated:-}" ]; then apt-get update -qq; fi
    apt-get download -qq "$package" && dpkg-deb -x "${package}"_*.deb root && cp "root/usr/bin/$command" "$venv_bin/$command"
  ) >"$log" 2>&1; then
    echo "installed $command into $VENV/bin (Debian package $package)" >&2
  else
    cat "$log" >&2
    echo "warning: could not install $command; the tests that run it will fail" >&2
  fi
  _debian_tools_updated=1
  rm -rf "$log" "$dir"
}
_debian_tool promtool prometheus
_debian_tool shellcheck shellcheck
