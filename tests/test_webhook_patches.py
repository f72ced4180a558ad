"""JSON Patch diffs (webhook.patches) and the defaults the mutating webhook sends as patches."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from powercap.algorithms import AlgorithmRegistry
from webhook.handlers import PolicyAdmission
from webhook.patches import diff, same_json
from webhook.reviews import Request, Verdict, build_response, shorten

from .test_validator_fuzz import JSON_VALUES, policy_like

KEYS = st.sampled_from(["a", "b", "a/b", "m~n", "", "spec"])
DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=250, deadline=None)
@given(DOCUMENTS, DOCUMENTS)
def test_applying_the_diff_gives_the_target(before: Any, after: Any) -> None:
    operations = diff(before, after)
    assert same_json(jsonpatch.JsonPatch(operations).apply(copy.deepcopy(before)), after)
    assert diff(after, after) == [], "no diff, no patch"


@pytest.mark.parametrize(
    ("before", "after", "operations"),
    [
        pytest.param({"a": 1}, {"a": 1, "b": {"c": 2}}, [{"op": "add", "path": "/b", "value": {"c": 2}}], id="add-nested"),
        pytest.param({"a/b": 1, "m~n": 2}, {"a/b": 1, "m~n": 3}, [{"op": "replace", "path": "/m~0n", "value": 3}], id="escaped-keys"),
        pytest.param({"a": 1}, {"a": True}, [{"op": "replace", "path": "/a", "value": True}], id="one-is-not-true"),
        pytest.param({"a": 1}, {"a": 1.0}, [], id="one-equals-one-point-zero"),
        pytest.param({"l": [1, 2]}, {"l": [1, 3]}, [{"op": "replace", "path": "/l/1", "value": 3}], id="list-item"),
        pytest.param({"l": [1, 2]}, {"l": [1]}, [{"op": "replace", "path": "/l", "value": [1]}], id="list-resized"),
        pytest.param({"a": 1, "b": 2}, {"b": 2}, [{"op": "remove", "path": "/a"}], id="remove"),
        pytest.param([1], {"a": 1}, [{"op": "replace", "path": "", "value": {"a": 1}}], id="root"),
    ],
)
def test_diff_table(before: Any, after: Any, operations: list[dict[str, Any]]) -> None:
    assert diff(before, after) == operations


REGISTRY = AlgorithmRegistry.default()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_like() | JSON_VALUES)
def test_defaulting_only_adds_and_is_idempotent(document: Any) -> None:
    admission = PolicyAdmission(REGISTRY)
    defaulted = admission.default(document)
    operations = diff(document, defaulted)
    assert all(op["op"] == "add" for op in operations), "a value the user set is never changed or removed"
    assert not any(op["path"].startswith(("/metadata", "/status")) for op in operations)
    assert diff(defaulted, admission.default(defaulted)) == []


def request(**changes: Any) -> Request:
    return Request(**{"uid": "u", "operation": "CREATE", "kind": {"group": "g", "version": "v", "kind": "K"}, **changes})


def test_warnings_are_cut_to_120_characters() -> None:
    long = "spec.rackConstraints[0]: " + "x" * 200
    response = build_response(request(), Verdict(warnings=(long, "short")))["response"]
    assert [len(w) for w in response["warnings"]] == [120, 5]
    assert response["warnings"][0].endswith("...")
    assert shorten("a" * 120) == "a" * 120
