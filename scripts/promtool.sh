# Sourced by scripts/test.sh: make `promtool` available for the metrics lint test
# (tests/test_agent_metrics.py), from Debian's `prometheus` package.
# Only the promtool binary is unpacked into $VENV/bin (`apt-get download` + `dpkg-deb -x`):
# installing the package would also register (and maybe start) a Prometheus server.
# Quiet unless it fails; the test itself fails, not skips, when promtool is still missing.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$VENV/bin/promtool" ] && command -v apt-get >/dev/null 2>&1; then
  _promtool_log="$(mktemp)"
  _promtool_dir="$(mktemp -d)"
  _venv_bin="$(cd "$VENV/bin" && pwd)"
  if (
    cd "$_promtool_dir"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq; fi
    apt-get download -qq prometheus && dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool "$_venv_bin/promtool"
  ) >"$_promtool_log" 2>&1; then
    echo "installed promtool into $VENV/bin (Debian package prometheus)" >&2
  else
    cat "$_promtool_log" >&2
    echo "warning: could not install promtool; the metrics lint test will fail" >&2
  fi
  rm -rf "$_promtool_log" "$_promtool_dir"
fi
