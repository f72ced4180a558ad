"""The CRD: names, printer columns, descriptions, the structural-schema rules the apiserver enforces,
and its CEL rules evaluated with cel-python (tests/crdrules.py; the real API server: tests/e2e/test_crd_rules.py)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from powercap import schema
from powercap.algorithms import AlgorithmRegistry
from powercap.policies import label_key_problem, label_value_problem, validate_policy
from powercap.problems import Problem

from . import crdrules
from .conftest import REPO_ROOT

CRD_PATH = REPO_ROOT / "config" / "crd" / "powercapping.example.com_powercappingpolicies.yaml"
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
# Keywords a structural schema may use (apiextensions JSONSchemaProps, minus the forbidden ones).
ALLOWED_KEYWORDS = {
    "type", "format", "description", "properties", "required", "items", "additionalProperties",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "minProperties", "maxProperties", "enum", "default",
    "nullable", "title", "example", "multipleOf",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
    "x-kubernetes-validations", "x-kubernetes-embedded-resource",
}


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return only


def nodes(node: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield from schema.walk_schema(node, path)


def test_names_scope_and_subresources(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "powercappingpolicies.powercapping.example.com"
    assert crd["spec"]["group"] == "powercapping.example.com"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == "PowerCappingPolicy"
    assert crd["spec"]["names"]["plural"] == "powercappingpolicies"
    assert crd["spec"]["names"]["shortNames"] == ["pcp"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns_show_cap_power_gpus_ratio_ready_age(version: dict[str, Any]) -> None:
    default_columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert default_columns == ["Cap", "Power", "GPUs", "Ratio", "Ready", "Age"]
    by_name = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert by_name["Cap"]["jsonPath"] == ".spec.powerCapLimit"
    assert by_name["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


def test_package_data_is_the_config_file() -> None:
    """The validator loads the same schema the apiserver gets: one source of truth."""
    assert schema.load_crd() == yaml.safe_load(CRD_PATH.read_text())


def test_schema_is_structural(version: dict[str, Any]) -> None:
    root = version["schema"]["openAPIV3Schema"]
    problems = []
    for path, node in nodes(root):
        where = path or "<root>"
        unknown = set(node) - ALLOWED_KEYWORDS
        if unknown:
            problems.append(f"{where}: keywords not allowed in a structural schema: {sorted(unknown)}")
        if "$ref" in node:
            problems.append(f"{where}: $ref")
        if node.get("additionalProperties") is False:
            problems.append(f"{where}: additionalProperties: false")
        if "uniqueItems" in node:
            problems.append(f"{where}: uniqueItems")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: properties and additionalProperties together")
        if node.get("type") not in TYPES and not node.get("x-kubernetes-int-or-string"):
            problems.append(f"{where}: no type")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{where}: array without items")
        for keyword in ("exclusiveMinimum", "exclusiveMaximum"):
            if keyword in node and not isinstance(node[keyword], bool):
                problems.append(f"{where}: {keyword} must be a boolean in OpenAPI 3.0")
        if node.get("x-kubernetes-list-type") == "map":
            for key in node.get("x-kubernetes-list-map-keys", []):
                if key not in node["items"].get("required", []):
                    problems.append(f"{where}: list-map key {key} must be required")
    assert root["properties"]["metadata"] == {"type": "object"}, "metadata may only say type: object"
    assert problems == []


def test_every_field_has_a_description(version: dict[str, Any]) -> None:
    root = version["schema"]["openAPIV3Schema"]
    missing = [path for path, node in nodes(root) if path and path != "metadata" and not node.get("description")]
    assert missing == []


def test_rack_ids_are_unique_through_the_list_map_not_a_quadratic_cel_rule(version: dict[str, Any]) -> None:
    """The list-map keyed by rackId makes the API server refuse a repeated rackId
    (``spec.rackConstraints[1]: Duplicate value: {"rackId":"rack-1"}``, tests/e2e); a CEL rule
    comparing the items with each other would repeat it in O(n^2)."""
    root = version["schema"]["openAPIV3Schema"]
    assert [rule for (path, _), rule in crdrules.rules(root).items() if path in ("spec", "spec.rackConstraints")] == []
    racks = root["properties"]["spec"]["properties"]["rackConstraints"]
    assert (racks["x-kubernetes-list-type"], racks["x-kubernetes-list-map-keys"]) == ("map", ["rackId"])
    assert racks["maxItems"] <= 256 and racks["items"]["properties"]["rackId"]["maxLength"] <= 63


def test_every_cel_rule_has_a_case_that_breaks_it(version: dict[str, Any]) -> None:
    """tests/e2e/test_crd_rules.py sends each case to the real API server."""
    covered = {case.rule for case in crdrules.RULE_CASES.values()}
    assert set(crdrules.rules(version["schema"]["openAPIV3Schema"])) == covered


def test_every_value_a_rule_reads_is_bounded(version: dict[str, Any]) -> None:
    """The API server refuses a CRD whose rules' estimated cost is over its budget, and it
    estimates an unbounded list, map or string at the size of a whole request
    (tests/e2e/test_crd_rules.py shows each bound is needed): every list and map on the way to
    a rule has maxItems/maxProperties, every string a rule matches has maxLength."""
    by_path = dict(nodes(version["schema"]["openAPIV3Schema"]))
    unbounded = []
    for path, _ in crdrules.rules(version["schema"]["openAPIV3Schema"]):
        node = by_path[path]
        if node.get("type") == "string" and "maxLength" not in node:
            unbounded.append(f"{path}: maxLength")
        if "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append(f"{path}: maxProperties")
        parts = path.split("[*]")
        for end in range(1, len(parts)):
            container = by_path["[*]".join(parts[:end])]
            if container.get("type") == "array" and "maxItems" not in container:
                unbounded.append(f"{'[*]'.join(parts[:end])}: maxItems")
            if container.get("type") == "object" and "maxProperties" not in container:
                unbounded.append(f"{'[*]'.join(parts[:end])}: maxProperties")
    assert unbounded == []


@pytest.mark.parametrize("case", crdrules.RULE_CASES.values(), ids=crdrules.RULE_CASES.keys())
def test_each_cel_rule_refuses_what_the_webhook_refuses(case: crdrules.RuleCase) -> None:
    """cel-python evaluates the CRD's expressions as the API server does (tests/e2e checks the
    API server prints the same): the breaking policy fails that one rule, naming the field, and
    powercap validate (the webhook's checks) refuses it at the same field; both accept the
    nearest valid policy."""
    assert crdrules.cel_problems(case.refused) == [(case.field, case.message, case.rule)]
    assert crdrules.cel_problems(case.accepted) == []
    errors = validate_policy(case.refused, AlgorithmRegistry.default()).errors
    assert [p for p in errors if p.path.startswith(case.field)], errors
    if case.webhook_words:
        assert Problem(case.field, case.message) in errors
    assert validate_policy(case.accepted, AlgorithmRegistry.default()).ok


LABEL_TEXT = st.text(alphabet="aZ09-_./ !", max_size=70) | st.sampled_from(
    ["", "a", "-a", "a-", "a.b_c-D", "A" * 63, "A" * 64, "/a", "a/", "a/b/c", "Example.com/a", "example.com/a",
     "a" * 253 + "/b", "a" * 254 + "/b", "b." * 127 + "c/d", "x/" + "y" * 63, "x/" + "y" * 64]
)


def _rule_text(path: str) -> str:
    return crdrules.rules()[(path, 0)]["rule"]


@given(LABEL_TEXT)
@settings(max_examples=300, deadline=None)
def test_the_label_value_rule_is_the_webhooks(text: str) -> None:
    """Longer than 63 characters never reaches the rule: maxLength refuses it first."""
    assume(len(text) <= 63)
    for path in ("spec.rackConstraints[*].rackId", "spec.selector.matchLabels[*]",
                 "spec.selector.matchExpressions[*].values[*]"):
        assert bool(crdrules.evaluate(_rule_text(path), text)) is (label_value_problem(text) is None)


@given(LABEL_TEXT)
@settings(max_examples=300, deadline=None)
def test_the_label_key_rules_are_the_webhooks(text: str) -> None:
    valid = label_key_problem(text) is None
    assert bool(crdrules.evaluate(_rule_text("spec.selector.matchLabels"), {text: "x"})) is valid
    if len(text) <= 317:
        assert bool(crdrules.evaluate(_rule_text("spec.selector.matchExpressions[*].key"), text)) is valid


@pytest.mark.parametrize(("condition_type", "refused"), crdrules.CONDITION_TYPES.values(),
                         ids=crdrules.CONDITION_TYPES.keys())
def test_condition_types_follow_metav1_condition(condition_type: str, refused: bool) -> None:
    """The controller writes status through the status subresource, which no webhook sees:
    the schema alone keeps metav1.Condition's rules there."""
    status = {"conditions": [crdrules.condition(condition_type)]}
    problems = schema.validate(status, schema.policy_schema()["properties"]["status"], "status")
    assert [p.path for p in problems] == (["status.conditions[0].type"] if refused else [])


@pytest.mark.parametrize(
    ("path", "bounds"),
    [
        ("spec.powerCapLimit", {"type": "integer", "minimum": 0, "exclusiveMinimum": True}),
        ("spec.rackConstraints[*].maxPower", {"type": "integer", "minimum": 0, "exclusiveMinimum": True}),
        ("spec.rackConstraints[*].maxTemperature", {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 60}),
        ("spec.performancePowerRatio.targetRatio", {"type": "number", "minimum": 0, "exclusiveMinimum": True}),
        ("spec.performancePowerRatio.tolerancePercentage", {"type": "number", "minimum": 0, "maximum": 100, "default": 5}),
        ("spec.mode", {"type": "string", "enum": ["Enforce", "Observe"], "default": "Enforce"}),
    ],
)
def test_bounds_are_in_the_schema(version: dict[str, Any], path: str, bounds: dict[str, Any]) -> None:
    node = dict(nodes(version["schema"]["openAPIV3Schema"]))[path]
    assert {k: node.get(k) for k in bounds} == bounds


@pytest.mark.parametrize(
    ("value", "node", "expected"),
    [
        pytest.param(0, {"type": "integer", "minimum": 0, "exclusiveMinimum": True}, ["must be greater than 0"], id="exclusive-minimum-boolean"),
        pytest.param(0, {"type": "integer", "minimum": 0}, [], id="inclusive-minimum"),
        pytest.param(60, {"type": "number", "maximum": 60, "exclusiveMaximum": True}, ["must be less than 60"], id="exclusive-maximum-boolean"),
        pytest.param(None, {"type": "number", "nullable": True}, [], id="nullable"),
        pytest.param(None, {"type": "number"}, ["must be a number, not null"], id="not-nullable"),
        pytest.param("50%", {"x-kubernetes-int-or-string": True}, [], id="int-or-string-string"),
        pytest.param(3, {"x-kubernetes-int-or-string": True}, [], id="int-or-string-int"),
        pytest.param(1.5, {"x-kubernetes-int-or-string": True}, ["must be an integer or a string, not a number"], id="int-or-string-float"),
        pytest.param({"a": 1}, {"type": "object", "x-kubernetes-preserve-unknown-fields": True}, [], id="preserve-unknown"),
        pytest.param({"a": 1}, {"type": "object", "additionalProperties": {"type": "string"}}, [": must be a string, not an integer"], id="map-values"),
        pytest.param(1000.0, {"type": "integer"}, [], id="integral-float-is-integer"),
        pytest.param(float("nan"), {"type": "number"}, ["must be a number, not nan (not a finite number)"], id="nan-is-not-a-number"),
    ],
)
def test_openapi_v3_semantics(value: Any, node: dict[str, Any], expected: list[str]) -> None:
    messages = [str(p) for p in schema.validate(value, node, "x")]
    assert len(messages) == len(expected)
    for message, fragment in zip(messages, expected):
        assert fragment in message


@pytest.mark.parametrize(("value", "node", "expected"), [
    ([], {"type": "array", "minItems": 1}, "x: must have at least 1 item"),
    ([1, 2, 3], {"type": "array", "maxItems": 2}, "x: must have at most 2 items"),
])
def test_array_bounds_count_in_the_right_number(value: list[int], node: dict[str, Any], expected: str) -> None:
    assert [str(p) for p in schema.validate(value, node, "x")] == [expected]


def test_installed_wheel_carries_the_crd(tmp_path: Path) -> None:
    """A pip-installed powercap (not only an editable checkout) finds the schema."""
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO_ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    (wheel,) = tmp_path.glob("powercap-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("powercap/data/crd.yaml").decode()
    assert shipped == CRD_PATH.read_text()
