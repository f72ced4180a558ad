"""Checks between policies (powercap.conflicts): overlapping selectors, shared racks."""

from __future__ import annotations

from typing import Any

import pytest

from powercap.conflicts import find_conflicts
from powercap.policies import Policy, parse_policy


def policy(name: str, namespace: str = "inference", **spec: Any) -> Policy:
    return parse_policy({
        "apiVersion": "powercapping.example.com/v1alpha1",
        "kind": "PowerCappingPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"powerCapLimit": 1000, **spec},
    })


LLAMA = {"matchLabels": {"app": "llama"}}
RACK_1 = {"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 30}


@pytest.mark.parametrize(
    ("candidate", "others", "errors"),
    [
        pytest.param(policy("a"), [policy("b")], [], id="default-selectors-never-overlap"),
        pytest.param(policy("a", selector=LLAMA), [policy("b", selector=LLAMA)],
                     ['spec.selector: may select the same pods as PowerCappingPolicy "b" in this namespace '
                      "(e.g. a pod labelled app=llama); a pod can follow one policy only"], id="same-selector"),
        pytest.param(policy("a", selector=LLAMA), [policy("b", "batch", selector=LLAMA)], [], id="other-namespace"),
        pytest.param(policy("a", selector=LLAMA), [policy("a", selector=LLAMA)], [], id="itself-during-update"),
        pytest.param(policy("a", selector={}), [policy("b")],
                     ['spec.selector: may select the same pods as PowerCappingPolicy "b" in this namespace '
                      "(e.g. a pod labelled powercapping.example.com/policy=b); a pod can follow one policy only"],
                     id="empty-selector-selects-everything"),
        pytest.param(policy("a", selector=LLAMA),
                     [policy("b", selector={"matchLabels": {"app": "llama"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["canary"]}]}),
                      policy("c", selector={"matchLabels": {"app": "mistral"}})],
                     ['spec.selector: may select the same pods as PowerCappingPolicy "b" in this namespace '
                      "(e.g. a pod labelled app=llama, tier=canary); a pod can follow one policy only"],
                     id="narrower-selector-still-overlaps"),
    ],
)
def test_overlapping_selectors_in_one_namespace_are_errors(candidate: Policy, others: list[Policy], errors: list[str]) -> None:
    assert [str(p) for p in find_conflicts(candidate, others).errors] == errors


@pytest.mark.parametrize(
    ("candidate", "others", "warnings"),
    [
        pytest.param(policy("a", rackConstraints=[RACK_1]), [policy("b", rackConstraints=[RACK_1])], [], id="same-limits"),
        pytest.param(policy("a", rackConstraints=[RACK_1]), [policy("b", "batch", rackConstraints=[{**RACK_1, "maxPower": 4000}])],
                     ["spec.rackConstraints[0]: batch/b limits rack-1 to 4000 W, 30 °C; the strictest applies"], id="other-namespace-other-power"),
        pytest.param(policy("a", rackConstraints=[{"rackId": "rack-2", "maxPower": 1}, RACK_1]),
                     [policy("b", rackConstraints=[{"rackId": "rack-1", "maxTemperature": 27.5}]),
                      policy("c", rackConstraints=[{"rackId": "rack-1"}])],
                     ["spec.rackConstraints[1]: inference/b and 1 more limits rack-1 to 27.5 °C; the strictest applies"], id="several-others"),
        pytest.param(policy("a", rackConstraints=[RACK_1]), [policy("b", rackConstraints=[{**RACK_1, "rackId": "rack-2", "maxPower": 1}])], [], id="other-rack"),
    ],
)
def test_same_rack_with_other_limits_is_a_warning(candidate: Policy, others: list[Policy], warnings: list[str]) -> None:
    result = find_conflicts(candidate, others)
    assert result.ok
    assert [str(p) for p in result.warnings] == warnings
    assert all(len(w) <= 120 for w in warnings)


def test_an_overlap_the_update_did_not_cause_is_only_a_warning() -> None:
    result = find_conflicts(policy("a", selector=LLAMA), [policy("b", selector=LLAMA)], selector_changed=False)
    assert result.ok
    assert [str(p) for p in result.warnings] == [
        'spec.selector: already overlaps PowerCappingPolicy "b"; a pod can follow one policy only'
    ]
