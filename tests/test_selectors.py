"""Whether two policies' selectors can select a common pod (powercap.selectors)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from powercap.policies import LabelSelector
from powercap.selectors import common_pod_labels, describe_labels, selectors_may_overlap


def sel(match_labels: dict[str, str] | None = None, *expressions: tuple[str, str, list[str]]) -> LabelSelector:
    raw: dict[str, Any] = {"matchLabels": match_labels or {}}
    raw["matchExpressions"] = [{"key": k, "operator": op, "values": v} for k, op, v in expressions]
    return LabelSelector.from_dict(raw)


OVERLAP_TABLE = [
    pytest.param(sel(), sel(), True, id="both-empty-match-everything"),
    pytest.param(sel(), sel({"app": "a"}), True, id="empty-matches-everything"),
    pytest.param(sel({"app": "a"}), sel({"app": "a"}), True, id="same-labels"),
    pytest.param(sel({"app": "a"}), sel({"app": "b"}), False, id="same-key-other-value"),
    pytest.param(sel({"app": "a"}), sel({"tier": "web"}), True, id="different-keys-pod-can-carry-both"),
    pytest.param(sel({"powercapping.example.com/policy": "p1"}), sel({"powercapping.example.com/policy": "p2"}), False, id="default-selectors-of-two-policies"),
    pytest.param(sel({"app": "a"}), sel(None, ("app", "In", ["a", "b"])), True, id="label-in-set"),
    pytest.param(sel({"app": "c"}), sel(None, ("app", "In", ["a", "b"])), False, id="label-outside-set"),
    pytest.param(sel(None, ("app", "In", ["a", "b"])), sel(None, ("app", "In", ["b", "c"])), True, id="in-sets-intersect"),
    pytest.param(sel(None, ("app", "In", ["a"])), sel(None, ("app", "In", ["b"])), False, id="in-sets-disjoint"),
    pytest.param(sel({"app": "a"}), sel(None, ("app", "NotIn", ["a"])), False, id="label-excluded"),
    pytest.param(sel({"app": "a"}), sel(None, ("app", "NotIn", ["b"])), True, id="other-value-excluded"),
    pytest.param(sel(None, ("app", "In", ["a", "b"])), sel(None, ("app", "NotIn", ["a", "b"])), False, id="in-all-excluded"),
    pytest.param(sel(None, ("app", "NotIn", ["a"])), sel(None, ("app", "NotIn", ["b"])), True, id="two-notin-pod-without-label"),
    pytest.param(sel(None, ("app", "Exists", [])), sel(None, ("app", "NotIn", ["a"])), True, id="exists-and-notin-another-value"),
    pytest.param(sel(None, ("app", "Exists", [])), sel(None, ("app", "DoesNotExist", [])), False, id="exists-vs-does-not-exist"),
    pytest.param(sel({"app": "a"}), sel(None, ("app", "DoesNotExist", [])), False, id="label-vs-does-not-exist"),
    pytest.param(sel(None, ("app", "DoesNotExist", [])), sel(None, ("app", "NotIn", ["a"])), True, id="absent-satisfies-notin"),
    pytest.param(sel(None, ("app", "DoesNotExist", [])), sel(None, ("tier", "Exists", [])), True, id="does-not-exist-other-key"),
    pytest.param(sel({"app": "a"}, ("app", "NotIn", ["a"])), sel(), False, id="self-contradictory-selector-matches-nothing"),
    pytest.param(sel({"app": "a", "tier": "web"}), sel({"app": "a", "tier": "batch"}), False, id="one-key-of-two-differs"),
    pytest.param(sel(None, ("app", "Gt", ["1"])), sel(None, ("app", "In", ["a"])), True, id="unknown-operator-is-conservative"),
]


@pytest.mark.parametrize(("first", "second", "expected"), OVERLAP_TABLE)
def test_overlap_table(first: LabelSelector, second: LabelSelector, expected: bool) -> None:
    assert selectors_may_overlap(first, second) is expected
    assert selectors_may_overlap(second, first) is expected, "overlap is symmetric"


@pytest.mark.parametrize(("first", "second", "expected"), [p for p in OVERLAP_TABLE if "unknown" not in p.id])
def test_example_pod_is_selected_by_both(first: LabelSelector, second: LabelSelector, expected: bool) -> None:
    labels = common_pod_labels(first, second)
    assert (labels is not None) is expected
    if labels is not None:
        assert first.matches(labels) and second.matches(labels)


KEYS = st.sampled_from(["app", "tier", "example.com/role"])
VALUES = st.sampled_from(["a", "b", "c", "x", "x1"])
REQUIREMENTS = st.one_of(
    st.tuples(KEYS, st.sampled_from(["In", "NotIn"]), st.lists(VALUES, min_size=1, max_size=3)),
    st.tuples(KEYS, st.sampled_from(["Exists", "DoesNotExist"]), st.just([])),
)
SELECTORS = st.builds(
    lambda labels, expressions: sel(labels, *expressions),
    st.dictionaries(KEYS, VALUES, max_size=2),
    st.lists(REQUIREMENTS, max_size=3),
)
LABEL_SETS = st.dictionaries(KEYS, VALUES, max_size=3)


@settings(max_examples=300, deadline=None)
@given(SELECTORS, SELECTORS, st.lists(LABEL_SETS, max_size=20))
def test_answer_agrees_with_matching_real_label_sets(first: LabelSelector, second: LabelSelector, pods: list[dict[str, str]]) -> None:
    labels = common_pod_labels(first, second)
    if labels is None:
        # disjoint: no pod, whatever its labels, is selected by both
        assert not any(first.matches(pod) and second.matches(pod) for pod in pods)
    else:
        assert first.matches(labels) and second.matches(labels)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param({}, "a pod with no labels", id="none"),
        pytest.param({"tier": "web", "app": "a"}, "a pod labelled app=a, tier=web", id="sorted"),
        pytest.param({k: "v" for k in "abcde"}, "a pod labelled a=v, b=v, c=v and 2 more", id="long"),
    ],
)
def test_example_labels_read_well(labels: dict[str, str], expected: str) -> None:
    assert describe_labels(labels) == expected
