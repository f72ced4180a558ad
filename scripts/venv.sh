# Sourced by the entry scripts: create .venv when missing and install the project into it.
# Re-installing is quick when nothing changed (pip sees everything satisfied).
VENV="${POWERCAP_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
