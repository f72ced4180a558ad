"""The CRD's CEL rules (``x-kubernetes-validations``), evaluated offline with cel-python, and
one case per rule that the unit tests (tests/test_crd.py) and the real API server
(tests/e2e/test_crd_rules.py) both judge.

The API server evaluates each rule with ``self`` bound to the value at the rule's schema
node, for every such value in the object (every item of a list, every value of a map), and
reports a false rule at that value's path plus the rule's ``fieldPath``, with its
``messageExpression`` (or ``message``). :func:`cel_problems` does the same, so a case's
``field`` and ``message`` are what kubectl prints after ``The PowerCappingPolicy "x" is
invalid:``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import celpy

from powercap import schema
from powercap.problems import join_path

RuleId = tuple[str, int]  # the schema node's path (schema.walk_schema's) and the rule's index there


@lru_cache(maxsize=None)
def _program(expression: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(expression))


def evaluate(expression: str, value: Any) -> Any:
    """``expression`` with ``self`` bound to the JSON ``value``, as a Python value."""
    return _program(expression).evaluate({"self": celpy.json_to_cel(value)})


def rules(root: Mapping[str, Any] | None = None) -> dict[RuleId, Mapping[str, Any]]:
    """Every ``x-kubernetes-validations`` rule of the policy schema, by where it sits."""
    found = {}
    for path, node in schema.walk_schema(root or schema.policy_schema()):
        for index, rule in enumerate(node.get("x-kubernetes-validations", ())):
            found[(path, index)] = rule
    return found


def _values(node: Mapping[str, Any], value: Any, path: str, schema_path: str) -> Iterator[tuple[str, str, Mapping[str, Any], Any]]:
    """(path, schema path, schema node, value) for every value of the document under ``node``."""
    yield path, schema_path, node, value
    if isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name in value and value[name] is not None:
                yield from _values(child, value[name], join_path(path, name), join_path(schema_path, name))
        if isinstance(node.get("additionalProperties"), Mapping):
            for key, item in value.items():
                yield from _values(node["additionalProperties"], item, f"{path}[{key}]", f"{schema_path}[*]")
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for index, item in enumerate(value):
            yield from _values(node["items"], item, f"{path}[{index}]", f"{schema_path}[*]")


def cel_problems(document: Mapping[str, Any]) -> list[tuple[str, str, RuleId]]:
    """(field, message, rule) for every CEL rule ``document`` breaks, in document order."""
    problems = []
    for path, schema_path, node, value in _values(schema.policy_schema(), document, "", ""):
        for index, rule in enumerate(node.get("x-kubernetes-validations", ())):
            if evaluate(rule["rule"], value):
                continue
            message = evaluate(rule["messageExpression"], value) if "messageExpression" in rule else rule["message"]
            field = (path + rule.get("fieldPath", "")).lstrip(".")
            problems.append((field, str(message), (schema_path, index)))
    return problems


BASE: dict[str, Any] = {
    "apiVersion": "powercapping.example.com/v1alpha1",
    "kind": "PowerCappingPolicy",
    "metadata": {"name": "llama"},
    "spec": {"powerCapLimit": 1000},
}
LONG_NAME = "llama-3-70b-instruct-served-by-vllm-on-h200-with-a-name-too-long-for-a-label"
LABEL_VALUE_RULE = ("at most 63 characters of letters, digits, '-', '_' or '.', starting and ending "
                    "with a letter or digit")
LABEL_KEY_RULE = ("must be an optional prefix (a lowercase DNS subdomain of at most 253 characters) and '/', then "
                  f"{LABEL_VALUE_RULE}")


def policy(name: str = "llama", **spec: Any) -> dict[str, Any]:
    document = copy.deepcopy(BASE)
    document["metadata"]["name"] = name
    document["spec"].update(spec)
    return document


def selector_expression(key: str = "app", operator: str = "In", values: list[str] | None = None) -> dict[str, Any]:
    expression: dict[str, Any] = {"key": key, "operator": operator}
    if values is not None:
        expression["values"] = values
    return {"matchExpressions": [expression]}


@dataclass(frozen=True)
class RuleCase:
    """A policy that breaks one rule, what the API server says, and the nearest policy it accepts.

    ``webhook_words``: whether ``powercap validate`` and the webhook refuse it with the same
    message (they split a bad label key into a prefix and a name problem; the CRD says both).
    """

    rule: RuleId
    refused: dict[str, Any]
    field: str
    message: str
    accepted: dict[str, Any]
    webhook_words: bool = True


RULE_CASES = {
    "default-selector-needs-a-short-name": RuleCase(
        ("", 0), policy(LONG_NAME), "spec.selector",
        "is required when metadata.name is longer than 63 characters: the default selector "
        "powercapping.example.com/policy: <metadata.name> needs a valid label value",
        policy(LONG_NAME, selector={"matchLabels": {"app": "llama"}}), webhook_words=False,
    ),
    "rack-id-is-a-label-value": RuleCase(
        ("spec.rackConstraints[*].rackId", 0), policy(rackConstraints=[{"rackId": "rack 1", "maxPower": 5000}]),
        "spec.rackConstraints[0].rackId",
        f'"rack 1" is not a valid label value ({LABEL_VALUE_RULE}); it is matched against the node label value',
        policy(rackConstraints=[{"rackId": "rack-1", "maxPower": 5000}]),
    ),
    "match-labels-keys": RuleCase(
        ("spec.selector.matchLabels", 0), policy(selector={"matchLabels": {"app": "llama", "tier!": "web"}}),
        "spec.selector.matchLabels", f'label key "tier!" {LABEL_KEY_RULE}',
        policy(selector={"matchLabels": {"app": "llama", "example.com/tier": "web"}}), webhook_words=False,
    ),
    "match-labels-values": RuleCase(
        ("spec.selector.matchLabels[*]", 0), policy(selector={"matchLabels": {"app": "llama 3"}}),
        "spec.selector.matchLabels[app]", f'"llama 3" is not a valid label value ({LABEL_VALUE_RULE})',
        policy(selector={"matchLabels": {"app": "llama-3"}}),
    ),
    "in-needs-values": RuleCase(
        ("spec.selector.matchExpressions[*]", 0), policy(selector=selector_expression(operator="NotIn", values=[])),
        "spec.selector.matchExpressions[0].values", "must have at least one value when operator is NotIn",
        policy(selector=selector_expression(operator="NotIn", values=["llama"])),
    ),
    "exists-takes-no-values": RuleCase(
        ("spec.selector.matchExpressions[*]", 1), policy(selector=selector_expression(operator="Exists", values=["x"])),
        "spec.selector.matchExpressions[0].values", "must be empty when operator is Exists",
        policy(selector=selector_expression(operator="Exists")),
    ),
    "expression-key": RuleCase(
        ("spec.selector.matchExpressions[*].key", 0),
        policy(selector=selector_expression(key="/app", operator="Exists")),
        "spec.selector.matchExpressions[0].key", f'label key "/app" {LABEL_KEY_RULE}',
        policy(selector=selector_expression(key="example.com/app", operator="Exists")), webhook_words=False,
    ),
    "expression-values": RuleCase(
        ("spec.selector.matchExpressions[*].values[*]", 0),
        policy(selector=selector_expression(values=["llama", "llama 3"])),
        "spec.selector.matchExpressions[0].values[1]", f'"llama 3" is not a valid label value ({LABEL_VALUE_RULE})',
        policy(selector=selector_expression(values=["llama", "llama_3"])),
    ),
}


# metav1.Condition's type: an optional DNS-subdomain prefix and '/', then a name (True: refused)
CONDITION_TYPES = {
    "ready": ("Ready", False),
    "prefixed": ("example.com/GPUsThrottled", False),
    "space": ("Not Ready", True),
    "uppercase-prefix": ("Example.com/Ready", True),
}


def condition(condition_type: str) -> dict[str, Any]:
    """A condition as the controller writes it, of ``condition_type``."""
    return {"type": condition_type, "status": "True", "reason": "WithinCap", "message": "",
            "lastTransitionTime": "2026-12-05T12:00:00Z"}
