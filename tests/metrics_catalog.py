"""Every Prometheus metric powercap exposes, read from the sources and configuration.

- The programs' own metrics: every ``Counter``/``Gauge``/``Histogram``/``Summary``/
  ``Info``/``Enum`` of prometheus_client constructed in ``powercap/``, ``webhook/``,
  ``extender/`` or ``nodeagent/`` with a literal name (found in the syntax tree, so a
  metric added in any module, of any service, is seen without being instantiated).
- The policy metrics kube-state-metrics derives from PowerCappingPolicies with
  ``config/monitoring/kube-state-metrics.yaml`` (a CustomResourceStateMetrics config).

docs/metrics.md and config/monitoring/grafana-dashboard.json are checked against this catalogue;
:func:`documented_promql` reads the PromQL examples of docs/metrics.md.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import yaml

from tests.conftest import REPO_ROOT

PACKAGES = ("powercap", "webhook", "extender", "controller", "nodeagent")
METRIC_CLASSES = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary",
                  "Info": "info", "Enum": "stateset"}
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
KSM_CONFIG = REPO_ROOT / "config" / "monitoring" / "kube-state-metrics.yaml"
# labels kube-state-metrics puts on every custom resource metric
KSM_COMMON_LABELS = ("customresource_group", "customresource_kind", "customresource_version")


@dataclass(frozen=True)
class Metric:
    name: str            # as exposed: counters end in _total
    type: str
    labels: tuple[str, ...]
    source: str          # the file that defines it

    def series(self) -> set[str]:
        """The series names a query can use."""
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        if self.type == "summary":
            return {self.name, f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


def program_metrics() -> list[Metric]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            constants = module_constants(tree)
            imported = {
                alias.asname or alias.name: alias.name
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
                for alias in node.names if alias.name in METRIC_CLASSES
            }
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported):
                    continue
                if not (node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    continue
                kind = METRIC_CLASSES[imported[node.func.id]]
                name = node.args[0].value
                if kind == "counter":
                    name = name.removesuffix("_total") + "_total"
                labels_node = node.args[2] if len(node.args) > 2 else next(
                    (k.value for k in node.keywords if k.arg == "labelnames"), None
                )
                labels = label_names(labels_node, constants) if labels_node is not None else ()
                found.append(Metric(name, kind, labels, str(path.relative_to(REPO_ROOT))))
    return found


def module_constants(tree: ast.Module) -> dict[str, tuple[str, ...]]:
    """Module-level ``NAME = (...)`` label tuples, so a constructor may name them."""
    constants: dict[str, tuple[str, ...]] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
            try:
                constants[statement.targets[0].id] = label_names(statement.value, constants)
            except (ValueError, TypeError):
                pass
    return constants


def label_names(node: ast.expr, constants: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """A literal list or tuple of label names, a module constant, or a sum of those."""
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return label_names(node.left, constants) + label_names(node.right, constants)
    value = ast.literal_eval(node)
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"not label names: {ast.unparse(node)}")
    return tuple(value)


def kube_state_metrics() -> list[Metric]:
    config = yaml.safe_load(KSM_CONFIG.read_text())
    found = []
    for resource in config["spec"]["resources"]:
        prefix = resource.get("metricNamePrefix", "kube_customresource")
        common = tuple(resource.get("labelsFromPath", {}))
        for metric in resource["metrics"]:
            each = metric["each"]
            kind = each["type"].lower()
            own = tuple(each.get(kind, {}).get("labelsFromPath", {}))
            labels = tuple(sorted(set(KSM_COMMON_LABELS + common + own)))
            found.append(Metric(f"{prefix}_{metric['name']}", kind, labels, str(KSM_CONFIG.relative_to(REPO_ROOT))))
    return found


def all_metrics() -> list[Metric]:
    return program_metrics() + kube_state_metrics()


def documented_promql() -> list[str]:
    """The expressions of docs/metrics.md's ``promql`` code blocks, comments left out; a
    blank line separates two expressions."""
    found = []
    for block in re.findall(r"```promql\n(.*?)```", METRICS_DOC.read_text(), re.DOTALL):
        for chunk in re.split(r"\n\s*\n", block):
            lines = [line for line in chunk.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            if lines:
                found.append("\n".join(lines))
    return found
