"""docs/metrics.md lists exactly the metrics powercap exposes, and the Grafana dashboard
queries only those, in PromQL that Prometheus accepts.

An operator builds alerts from docs/metrics.md and loads config/monitoring/grafana-dashboard.json
(the monitoring Component ships it as a ConfigMap for Grafana's dashboard sidecar); a renamed
metric or label must fail here, not show up as an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.manifests import kustomize_overlay
from tests.promtool import rule_problems
from tests.metrics_catalog import KSM_COMMON_LABELS, Metric, all_metrics, documented_promql

DOC = REPO_ROOT / "docs" / "metrics.md"
DASHBOARD = REPO_ROOT / "config" / "monitoring" / "grafana-dashboard.json"
# Labels Prometheus adds to every scraped series (node: the PodMonitors' relabeling).
TARGET_LABELS = {"node", "instance", "job", "pod", "namespace", "container", "le"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                "bool", "offset", "inf", "nan"}
# Grafana's variables, replaced by what Grafana would send
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$node": ".*"}


@pytest.fixture(scope="module")
def catalog() -> dict[str, Metric]:
    metrics = all_metrics()
    by_name = {m.name: m for m in metrics}
    assert len(by_name) == len(metrics), "a metric name is defined twice"
    return by_name


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `(powercap_\w+)` \| (\w+) \|([^|]*)\|", line)
        if match:
            name, kind, labels = match.groups()
            assert name not in rows, f"{name} is documented twice"
            rows[name] = (kind, tuple(label.strip() for label in labels.split(",") if label.strip()))
    return rows


def test_doc_lists_exactly_the_metrics_that_exist(catalog: dict[str, Metric]) -> None:
    expected = {
        name: (m.type, tuple(sorted(set(m.labels) - set(KSM_COMMON_LABELS))))
        for name, m in catalog.items()
    }
    actual = {name: (kind, tuple(sorted(labels))) for name, (kind, labels) in documented().items()}
    assert actual == expected


def test_every_program_with_metrics_is_covered(catalog: dict[str, Metric]) -> None:
    sources = {m.source.split("/")[0] for m in catalog.values()}
    assert {"nodeagent", "extender", "controller", "webhook", "config"} <= sources


def targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) of every query, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (label matchers, ranges, grouping and
    function names taken out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word, rest = match.group(), text[match.end():].lstrip()
        if rest.startswith("(") or word in PROMQL_WORDS or re.fullmatch(r"\d+\w*", word):
            continue
        names.add(word)
    return names


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
        for label in group.split(",") if label.strip()
    } | set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


# kubectl apply (client-side) copies the whole object into an annotation, which may hold 256 KiB
APPLY_ANNOTATION_LIMIT_BYTES = 262144


def test_the_monitoring_component_ships_the_dashboard_for_grafanas_sidecar(tmp_path: Path) -> None:
    """Grafana's dashboard sidecar loads every ConfigMap labelled grafana_dashboard: "1"; the
    dashboard in it must be the file's, provisionable as is (no import-time ${DS_...} inputs)."""
    built = kustomize_overlay(tmp_path, ["config/default"], ["config/monitoring"])
    [shipped] = [m for m in built if m["kind"] == "ConfigMap" and m["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert shipped["metadata"]["namespace"] == "powercap-system"
    [(name, text)] = shipped["data"].items()
    assert name.endswith(".json") and json.loads(text) == json.loads(DASHBOARD.read_text())
    assert "__inputs" not in json.loads(text) and "${DS_" not in text
    assert len(json.dumps(shipped)) < APPLY_ANNOTATION_LIMIT_BYTES


def test_dashboard_queries_only_metrics_and_labels_that_exist(dashboard: dict[str, Any], catalog: dict[str, Metric]) -> None:
    series = {s: m for m in catalog.values() for s in m.series()}
    used = set()
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"]).groups()
            assert label in set(series[metric].labels) | TARGET_LABELS, variable["name"]
    for title, expr in targets(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: {expr} selects no metric"
        unknown = names - set(series)
        assert not unknown, f"{title}: {expr} uses {unknown}, which nothing exposes"
        labels = set().union(*(series[n].labels for n in names)) | TARGET_LABELS
        assert grouping_labels(expr) <= labels, f"{title}: {expr} uses labels {grouping_labels(expr) - labels}"
        used |= {series[n].name for n in names}
    assert set(catalog) - used == set(), "metrics without a panel"


def test_dashboard_promql_is_valid(tmp_path: Path, dashboard: dict[str, Any]) -> None:
    expressions = []
    for _, expr in targets(dashboard):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        expressions.append(expr)
    assert rule_problems(tmp_path, expressions) == ""


def test_the_documented_promql_is_valid(tmp_path: Path) -> None:
    """The dcgm-exporter joins of docs/metrics.md (tests/test_agent_metrics.py runs the first
    on the agent's own series); none needs label_replace."""
    expressions = documented_promql()
    assert len(expressions) >= 3
    assert not any("label_replace" in expr for expr in expressions)
    assert rule_problems(tmp_path, expressions) == ""


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        pytest.param('sum by (node) (rate(a_total{x="y"}[5m]))', {"a_total"}, id="grouping-range-matcher"),
        pytest.param("count(b == 0) or vector(0)", {"b"}, id="operators-and-functions"),
        pytest.param("max by (rack) (c) / on(rack) group_left min(d)", {"c", "d"}, id="vector-matching"),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
