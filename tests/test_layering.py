"""The layering rules of DESIGN.md section 1, checked on the source itself.

- powercap/ (the pure core) imports no flask, gunicorn, pynvml, requests, nor any service
  package (webhook, extender, nodeagent);
- only powercap/kube.py imports kubernetes;
- services never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("webhook", "extender", "nodeagent")
CORE_FORBIDDEN = {"flask", "gunicorn", "pynvml", "requests", *SERVICES}
KUBE_MODULE = ROOT / "powercap" / "kube.py"


def imported_top_level_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", python_files("powercap"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_service_or_toolkit(path: Path) -> None:
    forbidden = imported_top_level_modules(path) & CORE_FORBIDDEN
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


@pytest.mark.parametrize(
    "path",
    [p for package in ("powercap", *SERVICES) for p in python_files(package)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_only_kube_module_imports_kubernetes(path: Path) -> None:
    if path == KUBE_MODULE:
        return
    assert "kubernetes" not in imported_top_level_modules(path), (
        f"{path.relative_to(ROOT)} imports kubernetes; use powercap.kube instead"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_services_do_not_import_each_other(service: str) -> None:
    others = set(SERVICES) - {service}
    for path in python_files(service):
        crossing = imported_top_level_modules(path) & others
        assert not crossing, f"{path.relative_to(ROOT)} imports {sorted(crossing)}"


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import flask\nfrom kubernetes.client import V1Pod\nfrom . import sibling\n")
    assert imported_top_level_modules(sample) == {"flask", "kubernetes"}


def test_only_the_nvml_backend_imports_pynvml() -> None:
    importers = {
        str(path.relative_to(ROOT))
        for package in ("powercap", *SERVICES)
        for path in python_files(package)
        if "pynvml" in imported_top_level_modules(path)
    }
    assert importers == {"nodeagent/nvml.py"}
