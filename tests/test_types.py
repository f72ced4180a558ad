"""The type hints hold: mypy finds no error in the shipped packages."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_mypy_finds_no_type_errors() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "mypy", "powercap", "webhook", "extender", "controller", "nodeagent"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
