"""The layers of DESIGN.md section 1, written down as import-linter contracts (.importlinter).

programs -> runtime -> {kube, core}; no program imports another; ``kubernetes`` only in
powercap.kube, ``pynvml`` only in nodeagent.nvml, ``matplotlib`` only in the simulator's
plots; the core imports no program, runtime, client or I/O toolkit.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"
PROGRAMS = ("webhook", "extender", "controller", "nodeagent")
# the parts of powercap/ that are not the pure core: layers and commands of their own
LAYERED = ("powercap.commands", "powercap.kube", "powercap.runtime", "powercap.simulation.cli", "powercap.simulation.plots")
# package modules holding only constants and docstrings, and `python -m powercap`
PLAIN = {"powercap", "powercap.simulation", "powercap.__main__"}


def lint_imports(root: Path, config: Path = CONFIG) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` run on the packages under ``root`` with the contracts in ``config``."""
    command = [str(Path(sys.executable).parent / "lint-imports"), "--no-logo", "--no-cache", "--config", str(config)]
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=120)


def contract(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    return parser[f"importlinter:contract:{name}"]


def listed(section: configparser.SectionProxy, key: str) -> set[str]:
    return {line.strip() for line in section[key].splitlines() if line.strip()}


def module_names(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_project_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_pure_core_contract_lists_every_core_module() -> None:
    """A new module of powercap/ is core unless it lives in a layer of its own; the
    contract must name it, or it would be checked by nothing."""
    core = {
        name for name in module_names("powercap") - PLAIN
        if not any(name == layer or name.startswith(layer + ".") for layer in LAYERED)
    }
    assert listed(contract("pure-core"), "source_modules") == core


def test_every_program_is_a_layer_of_its_own() -> None:
    top = contract("layers")["layers"].strip().splitlines()[0]
    assert {name.strip() for name in top.split("|")} >= set(PROGRAMS)


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The project's packages, copied, to break a contract in."""
    for package in ("powercap", *PROGRAMS):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "contract_name"),
    [
        pytest.param("extender/crossing.py", "import controller.loop", "no program imports another",
                     id="program-imports-program"),
        pytest.param("powercap/kube/upward.py", "import powercap.runtime.sources", "never upward",
                     id="kube-imports-runtime"),
        pytest.param("powercap/budget_io.py", "from powercap import kube", "The core and the simulator import",
                     id="core-imports-kube"),
        pytest.param("webhook/gpus.py", "import pynvml", "Only nodeagent.nvml imports pynvml",
                     id="pynvml-outside-nvml"),
        pytest.param("nodeagent/charts.py", "import matplotlib.pyplot", "Only the simulator's plots import matplotlib",
                     id="matplotlib-in-the-agent"),
    ],
)
def test_a_broken_contract_fails_the_lint(tree_copy: Path, module: str, line: str, contract_name: str) -> None:
    (tree_copy / module).write_text(f'"""Breaks a layer on purpose."""\n\n{line}\n')
    config = tree_copy / ".importlinter"
    contracts = CONFIG.read_text()
    if module.startswith("powercap/budget_io"):  # a new core module joins the core contract (see above)
        contracts = contracts.replace("    powercap.budget\n", "    powercap.budget\n    powercap.budget_io\n")
    config.write_text(contracts)
    result = lint_imports(tree_copy, config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and contract_name in " ".join(result.stdout.split())
    assert module.removesuffix(".py").replace("/", ".") in result.stdout
