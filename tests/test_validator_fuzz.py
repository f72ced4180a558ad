"""Random documents never crash the validator or the defaulter."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from powercap.algorithms import AlgorithmRegistry
from powercap.policies import default_policy, validate_policy
from powercap.problems import Problem

REGISTRY = AlgorithmRegistry.default()
FIELD_NAMES = st.sampled_from([
    "apiVersion", "kind", "metadata", "name", "namespace", "spec", "powerCapLimit", "rackConstraints",
    "rackId", "maxPower", "maxTemperature", "performancePowerRatio", "targetRatio", "tolerancePercentage",
    "customAlgorithm", "parameters", "energyThreshold", "migrationInterval", "selector", "matchLabels",
    "matchExpressions", "key", "operator", "values", "mode", "status",
]) | st.text(max_size=8)
SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-10**12, max_value=10**12)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["powercapping.example.com/v1alpha1", "PowerCappingPolicy", "In", "Exists",
                       "energy-aware-scheduling", "headroom", "Enforce", "rack-1"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(FIELD_NAMES, children, max_size=6),
    max_leaves=40,
)


def policy_like() -> st.SearchStrategy[dict[str, Any]]:
    spec = st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=8)
    return st.fixed_dictionaries({
        "apiVersion": st.just("powercapping.example.com/v1alpha1") | JSON_VALUES,
        "kind": st.just("PowerCappingPolicy") | JSON_VALUES,
        "metadata": st.fixed_dictionaries({"name": st.just("p") | JSON_VALUES}) | JSON_VALUES,
        "spec": spec | JSON_VALUES,
    })


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_like() | JSON_VALUES)
def test_random_documents_never_crash(document: Any) -> None:
    result = validate_policy(document, REGISTRY)
    assert all(isinstance(p, Problem) and p.message for p in result.errors + result.warnings)
    defaulted = default_policy(document, REGISTRY) if isinstance(document, dict) else document
    if result.ok:
        # a valid document stays valid once defaulted, and defaulting is idempotent
        assert validate_policy(defaulted, REGISTRY).ok
        assert default_policy(defaulted, REGISTRY) == defaulted
