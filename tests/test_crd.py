"""The CRD: names, printer columns, descriptions, and the structural-schema rules the apiserver enforces."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from powercap import schema

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
    (``spec.rackConstraints[1]: Duplicate value: {"rackId":"rack-1"}``, tests/e2e). A CEL rule
    repeating it cost O(n^2) and, present anywhere, added "some validation rules were not
    checked" to every schema refusal (seen against the real server)."""
    root = version["schema"]["openAPIV3Schema"]
    assert [path for path, node in nodes(root) if "x-kubernetes-validations" in node] == []
    racks = root["properties"]["spec"]["properties"]["rackConstraints"]
    assert (racks["x-kubernetes-list-type"], racks["x-kubernetes-list-map-keys"]) == ("map", ["rackId"])
    assert racks["maxItems"] <= 256 and racks["items"]["properties"]["rackId"]["maxLength"] <= 63


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
