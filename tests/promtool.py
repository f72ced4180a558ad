"""promtool as the tests run it: ``check metrics`` on an exposition text, ``check rules``
on PromQL expressions. scripts/test.sh installs it (Debian's prometheus package) into the
venv's bin directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

# dcgm-exporter's label names (UUID, modelName, Hostname), which the agent keeps so that
# the two join directly, break promtool's snake_case rule; every other finding counts
DCGM_LABELS_LINT = "label names should be written in 'snake_case' not 'camelCase'"


def promtool() -> str:
    """promtool on PATH or beside the venv's python."""
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    assert found, "promtool is missing: scripts/test.sh installs it from Debian's prometheus package"
    return found


def metrics_lint_problems(exposition: str) -> list[str]:
    """What ``promtool check metrics`` finds wrong with an exposition text, but for the
    dcgm-exporter label names."""
    lint = subprocess.run([promtool(), "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30)
    found = (lint.stdout + lint.stderr).splitlines()
    return [line for line in found if line.strip() and not line.endswith(DCGM_LABELS_LINT)]


def rule_problems(tmp_path: Path, expressions: Sequence[str]) -> str:
    """What ``promtool check rules`` says of the expressions as recording rules ("" when it
    accepts them)."""
    rules = [{"record": f"checked:query{i}", "expr": expr} for i, expr in enumerate(expressions)]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "checked", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    return "" if result.returncode == 0 else result.stdout + result.stderr
