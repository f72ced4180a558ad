"""The CRD on its own, through the real kube-apiserver with powercap's webhooks unregistered:
each CEL rule refuses a policy naming the field and accepts the nearest valid one, the
status keeps metav1.Condition's rules, the API server's cost estimate needs every bound the
CRD sets, and ``kubectl explain`` describes every field.

The cases are tests/crdrules.py's, which tests/test_crd.py also evaluates with cel-python.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from powercap import schema
from tests import crdrules
from tests.e2e.harness import ControlPlane

CRD_NAME = "powercappingpolicies.powercapping.example.com"


def refusal_lines(stderr: str) -> list[str]:
    """The problems of kubectl's ``The PowerCappingPolicy "x" is invalid: ...``, one per line."""
    text = stderr.strip().split(" is invalid: ", 1)[1]
    return [line.removeprefix("* ") for line in text.splitlines() if line.strip()]


def create_dry_run(cluster: ControlPlane, document: dict[str, Any]) -> Any:
    """``kubectl create --dry-run=server``: every check the API server makes, nothing stored."""
    return cluster.kubectl("create", "--dry-run=server", "-n", "default", "-f", "-",
                           input_text=yaml.safe_dump(document), check=False)


@pytest.mark.parametrize("case", crdrules.RULE_CASES.values(), ids=crdrules.RULE_CASES.keys())
def test_each_rule_refuses_naming_the_field_and_accepts_the_valid_twin(
    cluster: ControlPlane, without_webhooks: None, case: crdrules.RuleCase
) -> None:
    refused = create_dry_run(cluster, case.refused)
    assert refused.returncode == 1, refused.stdout
    (line,) = refusal_lines(refused.stderr)
    assert line.startswith(f"{case.field}: ") and line.endswith(case.message), line
    accepted = create_dry_run(cluster, case.accepted)
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        pytest.param({"selector": {"matchExpressions": [{"key": f"k{i}", "operator": "Exists"} for i in range(33)]}},
                     "spec.selector.matchExpressions: Too many: 33: must have at most 32 items", id="expressions"),
        pytest.param({"selector": {"matchLabels": {f"k{i}": "v" for i in range(65)}}},
                     "spec.selector.matchLabels: Too many: 65: must have at most 64 items", id="match-labels"),
        pytest.param({"selector": {"matchLabels": {"app": "l" * 64}}},
                     "spec.selector.matchLabels.app: Too long: may not be more than 63 bytes", id="label-value"),
    ],
)
def test_the_bounds_the_rules_need_are_refused_before_them(
    cluster: ControlPlane, without_webhooks: None, spec: dict[str, Any], line: str
) -> None:
    """A bound broken stops the CEL rules; the API server says so on a second line."""
    done = create_dry_run(cluster, crdrules.policy(**spec))
    assert done.returncode == 1
    lines = refusal_lines(done.stderr)
    assert lines[0] == line and len(lines) == 2, lines
    assert "some validation rules were not checked" in lines[1]


@pytest.mark.parametrize(("condition_type", "refused"), crdrules.CONDITION_TYPES.values(),
                         ids=crdrules.CONDITION_TYPES.keys())
def test_status_conditions_keep_metav1_conditions_rules(
    cluster: ControlPlane, without_webhooks: None, namespace: str, condition_type: str, refused: bool
) -> None:
    """The status subresource reaches no webhook: the CRD alone guards what the controller writes."""
    cluster.kubectl("create", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(crdrules.policy()))
    status = {"status": {"conditions": [crdrules.condition(condition_type)]}}
    done = cluster.kubectl("patch", "pcp", "llama", "-n", namespace, "--subresource=status", "--type=merge",
                           "-p", yaml.safe_dump(status), check=False)
    assert (done.returncode == 1) is refused, done.stderr
    if refused:
        assert refusal_lines(done.stderr)[0].startswith(f'status.conditions[0].type: Invalid value: "{condition_type}"')


def _selector(root: dict[str, Any]) -> dict[str, Any]:
    return root["properties"]["spec"]["properties"]["selector"]["properties"]


# (what is left out, where the API server's refusal names the rule it can no longer afford)
UNBOUNDED: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "rackConstraints-maxItems": (
        lambda root: root["properties"]["spec"]["properties"]["rackConstraints"].pop("maxItems"),
        "properties[rackConstraints].items.properties[rackId].x-kubernetes-validations[0].rule"),
    "matchLabels-maxProperties": (
        lambda root: _selector(root)["matchLabels"].pop("maxProperties"),
        "properties[matchLabels].x-kubernetes-validations[0].rule"),
    "label-value-maxLength": (
        lambda root: _selector(root)["matchLabels"]["additionalProperties"].pop("maxLength"),
        "properties[matchLabels].additionalProperties.x-kubernetes-validations[0].rule"),
    "matchExpressions-maxItems": (
        lambda root: _selector(root)["matchExpressions"].pop("maxItems"),
        "properties[key].x-kubernetes-validations[0].rule"),
    "key-maxLength": (
        lambda root: _selector(root)["matchExpressions"]["items"]["properties"]["key"].pop("maxLength"),
        "properties[key].x-kubernetes-validations[0].rule"),
    "values-maxItems": (
        lambda root: _selector(root)["matchExpressions"]["items"]["properties"]["values"].pop("maxItems"),
        "properties[values].items.x-kubernetes-validations[0].rule"),
    "value-maxLength": (
        lambda root: _selector(root)["matchExpressions"]["items"]["properties"]["values"]["items"].pop("maxLength"),
        "properties[values].items.x-kubernetes-validations[0].rule"),
}


def test_the_shipped_crd_is_within_the_cel_cost_budget(cluster: ControlPlane) -> None:
    done = cluster.kubectl("get", "crd", CRD_NAME, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}")
    assert done.stdout == "True"
    # the file as shipped, not only as kustomize labelled it for the install
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump(schema.load_crd()))
    assert f"{CRD_NAME} configured (server dry run)" in applied.stdout


@pytest.mark.parametrize("leave_out", UNBOUNDED.values(), ids=UNBOUNDED.keys())
def test_without_each_bound_the_api_server_refuses_the_crd_as_too_costly(
    cluster: ControlPlane, leave_out: tuple[Callable[[dict[str, Any]], object], str]
) -> None:
    """Each maxItems, maxProperties and maxLength is what keeps the rules' estimated cost
    under the API server's budget: without it the estimate counts a whole request's worth."""
    unbound, rule = leave_out
    crd = copy.deepcopy(schema.load_crd())
    unbound(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    done = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump(crd), check=False)
    assert done.returncode == 1
    costly = [line for line in done.stderr.splitlines() if "estimated rule cost exceeds budget" in line]
    assert any(rule in line for line in costly), done.stderr


def explainable_fields() -> list[str]:
    """``pcp.spec.rackConstraints.rackId``: every field of the schema as kubectl explain names it."""
    return [f"pcp.{path.replace('[*]', '')}" for path, _ in schema.walk_schema(schema.policy_schema())
            if path and path != "metadata" and not path.endswith("[*]")]


def test_kubectl_explain_describes_every_field(cluster: ControlPlane) -> None:
    undescribed = []
    for field in explainable_fields():
        done = cluster.kubectl("explain", field, check=False)
        name = field.rsplit(".", 1)[1]
        description = done.stdout.split("DESCRIPTION:", 1)[-1].split("FIELDS:", 1)[0].strip()
        if done.returncode != 0 or f"FIELD: {name} <" not in done.stdout or len(description.split()) < 2:
            undescribed.append(f"{field}: {done.stderr.strip() or done.stdout[:200]}")
    assert len(explainable_fields()) > 40
    assert undescribed == []
