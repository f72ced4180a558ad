"""The CRD's ``openAPIV3Schema``, loaded from the CRD file, and a validator with CRD semantics.

CRD schemas are OpenAPI 3.0 flavoured (close to JSON Schema draft 4), not JSON Schema
2020-12: ``exclusiveMinimum``/``exclusiveMaximum`` are booleans that modify
``minimum``/``maximum``, ``nullable: true`` admits null, ``x-kubernetes-int-or-string``
admits an integer or a string, ``x-kubernetes-preserve-unknown-fields`` admits any keys.
A general-purpose JSON Schema library would get these wrong, so this module implements
the subset structural schemas may use.

Unknown fields are errors here: the apiserver would silently prune them, which hides
typos such as ``powerCapLimt``; kubectl's strict field validation rejects them too.

The same validator checks algorithm parameter schemas, which are plain JSON-schema
objects and may also use ``additionalProperties: false`` (forbidden in a CRD).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from powercap.numeric import LARGEST_FLOAT_INT, counted, is_finite_number
from powercap.problems import Problem, join_path

CRD_RESOURCE = "crd.yaml"
Schema = Mapping[str, Any]

_JSON_TYPE_NAMES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
}


# libyaml's safe loader where PyYAML has it: ~10x faster, which matters for a snapshot of a
# large cluster (kubectl get nodes,pods -A -o yaml of 5000 nodes is ~100 MB).
_FAST_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class SafeLoader(_FAST_SAFE_LOADER):  # type: ignore[valid-type,misc]
    """The safe loader, refusing a key written twice in one mapping: YAML keeps the last one
    and drops the first without a word (two ``spec:`` blocks), and the API server's strict
    field validation refuses such documents too."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f'duplicate key "{key_node.value}" (first at line {seen[key].line + 1})',
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


SAFE_LOADER: type[yaml.SafeLoader] = SafeLoader

def package_data_text(name: str) -> str:
    """The text of ``powercap/data/<name>``, from a checkout or an installed wheel."""
    return resources.files("powercap").joinpath("data").joinpath(name).read_text(encoding="utf-8")


def load_crd() -> dict[str, Any]:
    """The CustomResourceDefinition shipped with the package (config/crd/ in the repo)."""
    return yaml.safe_load(package_data_text(CRD_RESOURCE))


@lru_cache(maxsize=1)
def policy_schema() -> Schema:
    """The ``openAPIV3Schema`` of the served, stored version of PowerCappingPolicy."""
    crd = load_crd()
    for version in crd["spec"]["versions"]:
        if version.get("storage"):
            return version["schema"]["openAPIV3Schema"]
    raise LookupError("the CRD has no storage version")


def describe_value(value: Any) -> str:
    """A short, readable rendering of a JSON value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json_type_of(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else f"{value} (not a finite number)"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_type(value: Any, json_type: str) -> bool:
    if isinstance(value, bool):
        return json_type == "boolean"
    if json_type == "integer":
        return isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
    if json_type == "number":
        return isinstance(value, (int, float)) and (
            not isinstance(value, float) or math.isfinite(value)
        )
    expected = {"object": dict, "array": list, "string": str, "boolean": bool}.get(json_type)
    return expected is not None and isinstance(value, expected)


def _format_number(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def validate(value: Any, schema: Schema, path: str = "") -> list[Problem]:
    """Every problem of ``value`` against ``schema``, in document order."""
    return list(_validate(value, schema, path))


def _validate(value: Any, schema: Schema, path: str) -> Iterator[Problem]:
    if value is None:
        if not schema.get("nullable"):
            expected = _expected_type_text(schema)
            yield Problem(path, f"must be {expected}, not null" if expected else "must not be null")
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not (_is_type(value, "integer") or isinstance(value, str)):
            yield Problem(path, f"must be an integer or a string, not {json_type_of(value)}")
            return
    elif "type" in schema and not _is_type(value, schema["type"]):
        yield Problem(path, f"must be {_expected_type_text(schema)}, not {json_type_of(value)}")
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(describe_value(v).strip("'") for v in schema["enum"])
        yield Problem(path, f"unsupported value {describe_value(value)}; must be one of: {allowed}")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield from _check_bounds(value, schema, path)
    elif isinstance(value, str):
        yield from _check_string(value, schema, path)
    elif isinstance(value, list):
        yield from _check_array(value, schema, path)
    elif isinstance(value, dict):
        yield from _check_object(value, schema, path)


def _expected_type_text(schema: Schema) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "an integer or a string"
    return _JSON_TYPE_NAMES.get(schema.get("type", ""), "")


_INTEGER_FORMATS = {"int32": 31, "int64": 63}


def _check_bounds(value: float, schema: Schema, path: str) -> Iterator[Problem]:
    bits = _INTEGER_FORMATS.get(schema.get("format", ""))
    if bits is None and not is_finite_number(value):
        # JSON and YAML bound no integer's digits: one no float holds would fail later, in float()
        yield Problem(path, f"{describe_value(value)} is too large: at most {LARGEST_FLOAT_INT:.3g} in magnitude")
        return
    if bits is not None and not -(2 ** bits) <= value < 2 ** bits:
        # the API server refuses what does not fit its Go type: say so before it does
        yield Problem(path, f"{describe_value(value)} is outside the {schema['format']} range "
                            f"(-2^{bits} to 2^{bits} - 1)")
        return
    if "minimum" in schema:
        bound = schema["minimum"]
        if schema.get("exclusiveMinimum") and value <= bound:
            yield Problem(path, f"must be greater than {_format_number(bound)}")
        elif value < bound:
            yield Problem(path, f"must be at least {_format_number(bound)}")
    if "maximum" in schema:
        bound = schema["maximum"]
        if schema.get("exclusiveMaximum") and value >= bound:
            yield Problem(path, f"must be less than {_format_number(bound)}")
        elif value > bound:
            yield Problem(path, f"must be at most {_format_number(bound)}")


def _check_string(value: str, schema: Schema, path: str) -> Iterator[Problem]:
    if "minLength" in schema and len(value) < schema["minLength"]:
        yield Problem(path, "must not be empty" if schema["minLength"] == 1 else
                      f"must be at least {schema['minLength']} characters long")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        yield Problem(path, f"must be at most {schema['maxLength']} characters long")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        yield Problem(path, f"{describe_value(value)} does not match {schema['pattern']}")


def _check_array(value: list[Any], schema: Schema, path: str) -> Iterator[Problem]:
    if "minItems" in schema and len(value) < schema["minItems"]:
        yield Problem(path, f"must have at least {counted(schema['minItems'], 'item')}")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        yield Problem(path, f"must have at most {counted(schema['maxItems'], 'item')}")
    items = schema.get("items")
    if isinstance(items, Mapping):
        for index, item in enumerate(value):
            yield from _validate(item, items, join_path(path, index))


def _check_object(value: dict[Any, Any], schema: Schema, path: str) -> Iterator[Problem]:
    properties: Mapping[str, Schema] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in value:
            yield Problem(join_path(path, name), "is required")
    additional = schema.get("additionalProperties")
    preserve_unknown = schema.get("x-kubernetes-preserve-unknown-fields", False)
    for key, item in value.items():
        if not isinstance(key, str):
            yield Problem(path, f"keys must be strings, not {json_type_of(key)} {describe_value(key)}")
            continue
        child_path = join_path(path, key)
        if key in properties:
            yield from _validate(item, properties[key], child_path)
        elif isinstance(additional, Mapping):
            yield from _validate(item, additional, child_path)
        elif additional is True or preserve_unknown or (not properties and additional is None):
            continue
        else:
            yield Problem(child_path, _unknown_field_message(key, properties))
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        yield Problem(path, f"must have at least {schema['minProperties']} fields")
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        yield Problem(path, f"must have at most {schema['maxProperties']} fields")


def _unknown_field_message(key: str, properties: Mapping[str, Schema]) -> str:
    allowed = sorted(properties)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown field{hint}; allowed: {', '.join(allowed)}"


def apply_defaults(value: Any, schema: Schema) -> Any:
    """A copy of ``value`` with the schema's ``default`` values filled in, as the apiserver does.

    Defaults apply to absent properties of objects that are present; an absent parent is
    not created. Values of the wrong type are left as they are (validation reports them).
    """
    result = copy.deepcopy(value)
    _default_in_place(result, schema)
    return result


def _default_in_place(value: Any, schema: Schema) -> None:
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        for name, child_schema in schema.get("properties", {}).items():
            if name not in value and "default" in child_schema:
                value[name] = copy.deepcopy(child_schema["default"])
            if name in value:
                _default_in_place(value[name], child_schema)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            _default_in_place(item, schema["items"])


def walk_schema(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every node of a schema with its path (``spec.rackConstraints[*].maxPower``)."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk_schema(child, join_path(path, name))
    if isinstance(schema.get("items"), Mapping):
        yield from walk_schema(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from walk_schema(schema["additionalProperties"], f"{path}[*]")
