"""The PrometheusRule of config/monitoring: promtool accepts it, its unit tests pass, every
alert fires in them, uses only metrics that exist, is documented in docs/alerts.md and links
its runbook section there."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.manifests import kustomize_overlay
from tests.metrics_catalog import all_metrics
from tests.promtool import promtool

RULE_FILE = REPO_ROOT / "config" / "monitoring" / "alerts.yaml"
PROMTOOL_TESTS = REPO_ROOT / "tests" / "data" / "alerts-promtool-test.yaml"
DOC = REPO_ROOT / "docs" / "alerts.md"
SEVERITIES = {"critical", "warning", "info"}
# the project's docs as a browser opens them from an alert (Alertmanager, Grafana)
RUNBOOK_BASE = "https://github.com/powercap/powercap/blob/main/docs/alerts.md#"
PROMQL_WORDS = {"and", "or", "unless", "max", "min", "sum", "rate", "increase", "absent", "histogram_quantile"}


@pytest.fixture(scope="module")
def rule() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RULE_FILE.read_text())
    return document


def alerts(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def run_promtool(tmp_path: Path, rule: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(PROMTOOL_TESTS, tmp_path / PROMTOOL_TESTS.name)
    return subprocess.run([promtool(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules(tmp_path: Path, rule: dict[str, Any]) -> None:
    result = run_promtool(tmp_path, rule, "check", "rules", "alerts.rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts(rule))} rules found" in result.stdout


def test_the_alerts_fire_as_their_unit_tests_say(tmp_path: Path, rule: dict[str, Any]) -> None:
    """Labels, rendered annotations and timing, on series as kube-state-metrics and the PodMonitors write them."""
    result = run_promtool(tmp_path, rule, "test", "rules", PROMTOOL_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path, rule: dict[str, Any]) -> None:
    """The unit tests can fail: the rack alert compared with the loosest limit misses rack-1."""
    broken = yaml.safe_load(yaml.safe_dump(rule))
    [rack_alert] = [r for r in alerts(broken) if r["alert"] == "PowercapRackOverMaxPower"]
    rack_alert["expr"] = rack_alert["expr"].replace("min by (rack)", "max by (rack)")
    result = run_promtool(tmp_path, broken, "test", "rules", PROMTOOL_TESTS.name)
    assert result.returncode != 0
    assert "alertname: PowercapRackOverMaxPower" in result.stdout + result.stderr


def test_every_alert_is_tested_firing(rule: dict[str, Any]) -> None:
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert {a["alert"] for a in alerts(rule)} == fired


def test_every_alert_is_labelled_annotated_and_documented(rule: dict[str, Any]) -> None:
    doc = DOC.read_text()
    headings = set(re.findall(r"^## (\w+)$", doc, re.MULTILINE))
    names = [a["alert"] for a in alerts(rule)]
    assert len(names) == len(set(names))
    for alert in alerts(rule):
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        assert {"summary", "description"} <= set(alert["annotations"]), name
        assert name in headings, f"docs/alerts.md has no section {name}"
        row = re.search(rf"^\| \[{name}\]\(#{name.lower()}\) \| (\w+) \|", doc, re.MULTILINE)
        assert row and row.group(1) == alert["labels"]["severity"], f"{name}: the table's severity"
    assert headings - {"Alerts"} == set(names)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation but
    ``-`` and ``_`` dropped, spaces as ``-``; a repeated heading gets ``-1``, ``-2``, ..."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize(
    ("markdown", "anchors"),
    [
        pytest.param("## PowercapAgentDown\n", {"powercapagentdown"}, id="alert-name"),
        pytest.param("## What to do: first, look\n", {"what-to-do-first-look"}, id="punctuation"),
        pytest.param("## Steps\n### Steps\n", {"steps", "steps-1"}, id="repeated"),
    ],
)
def test_anchors_are_made_as_github_makes_them(markdown: str, anchors: set[str]) -> None:
    assert github_anchors(markdown) == anchors


def test_every_alert_links_its_runbook_section(rule: dict[str, Any]) -> None:
    """Alertmanager and Grafana show ``runbook_url`` as a link: it must open the alert's own
    section of docs/alerts.md."""
    anchors = github_anchors(DOC.read_text())
    for alert in alerts(rule):
        url = alert["annotations"].get("runbook_url", "")
        assert url.startswith(RUNBOOK_BASE), f"{alert['alert']}: runbook_url {url!r}"
        anchor = url.removeprefix(RUNBOOK_BASE)
        assert anchor == alert["alert"].lower() and anchor in anchors, f"{alert['alert']}: no section #{anchor}"


def test_the_rules_use_only_metrics_that_exist(rule: dict[str, Any]) -> None:
    series = {s for m in all_metrics() for s in m.series()} | {"up"}
    for alert in alerts(rule):
        expr = re.sub(r'\{[^}]*\}|\[[^]]*\]|"[^"]*"|\b(?:by|on)\s*\([^)]*\)', "", alert["expr"])
        names = set(re.findall(r"[a-zA-Z_:][\w:]*", expr)) - PROMQL_WORDS
        assert names and names <= series, f"{alert['alert']}: {names - series} is exposed by nothing"


def test_the_monitoring_component_ships_the_rule(tmp_path: Path) -> None:
    built = kustomize_overlay(tmp_path, ["config/default"], ["config/monitoring"])
    [shipped] = [m for m in built if m["kind"] == "PrometheusRule"]
    assert shipped["metadata"]["namespace"] == "powercap-system"
    assert shipped["spec"] == yaml.safe_load(RULE_FILE.read_text())["spec"]
