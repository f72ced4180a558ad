# shellcheck shell=bash
# Sourced by the entry scripts: create the virtualenv when missing and install the project
# into it, with the extras the script names in POWERCAP_EXTRAS (demo: simulate; tests:
# test,simulate; none: the programs alone). Re-installing is quick when nothing changed.
# pip's output goes to a log that is shown only when the install fails.
VENV="${POWERCAP_VENV:-.venv}"
_project="."
if [ -n "${POWERCAP_EXTRAS:-}" ]; then _project=".[$POWERCAP_EXTRAS]"; fi
_pip_log="$(mktemp)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV" >&2
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$_project" >"$_pip_log" 2>&1; then
  cat "$_pip_log" >&2
  echo "error: installing powercap into $VENV failed (log above)" >&2
  rm -f "$_pip_log"
  exit 1
fi
rm -f "$_pip_log"
