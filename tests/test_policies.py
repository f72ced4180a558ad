"""The policy validator: the messages every user sees, from the CLI and the webhook alike."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from powercap.algorithms import AlgorithmRegistry
from powercap.policies import (
    POLICY_LABEL,
    Mode,
    default_policy,
    parse_policy,
    validate_policy,
)

from .conftest import SAMPLES_DIR

# The four examples of the CRD documentation, exactly as written there.
SEED_EXAMPLES = {
    "basic.yaml": """\
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata:
  name: llm-inference-power-capping
spec:
  powerCapLimit: 1000
""",
    "rack-constraints.yaml": """\
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata:
  name: llm-inference-power-capping
spec:
  powerCapLimit: 1000
  rackConstraints:
    - rackId: rack-1
      maxPower: 5000
      maxTemperature: 30
    - rackId: rack-2
      maxPower: 4000
      maxTemperature: 28
""",
    "performance-power-ratio.yaml": """\
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata:
  name: llm-inference-power-capping
spec:
  powerCapLimit: 1000
  performancePowerRatio:
    targetRatio: 0.8
    tolerancePercentage: 10
""",
    "custom-algorithm.yaml": """\
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata:
  name: llm-inference-power-capping
spec:
  powerCapLimit: 1000
  customAlgorithm:
    name: energy-aware-scheduling
    parameters:
      energyThreshold: 500
      migrationInterval: 300
""",
}

VALID: dict[str, Any] = yaml.safe_load(SEED_EXAMPLES["basic.yaml"])


@pytest.mark.parametrize("filename", sorted(SEED_EXAMPLES))
def test_documented_examples_are_shipped_verbatim_and_valid(filename: str, registry: AlgorithmRegistry) -> None:
    assert (SAMPLES_DIR / filename).read_text() == SEED_EXAMPLES[filename]
    result = validate_policy(yaml.safe_load(SEED_EXAMPLES[filename]), registry)
    assert result.errors == ()
    assert result.warnings == ()


def test_full_sample_uses_every_spec_field_and_is_valid(registry: AlgorithmRegistry) -> None:
    document = yaml.safe_load((SAMPLES_DIR / "full.yaml").read_text())
    assert set(document["spec"]) == {
        "powerCapLimit", "rackConstraints", "performancePowerRatio", "customAlgorithm", "selector", "mode"
    }
    result = validate_policy(document, registry)
    assert result.ok, result.errors
    assert result.warnings == ()


def with_spec(**changes: Any) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is DELETE:
            document["spec"].pop(key, None)
        else:
            document["spec"][key] = value
    return document


DELETE = object()
RACK = {"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 30}


def rack(**changes: Any) -> dict[str, Any]:
    return {**RACK, **changes}


INVALID = [
    pytest.param(with_spec(powerCapLimit=0), {"spec.powerCapLimit": "must be greater than 0"}, id="cap-zero"),
    pytest.param(with_spec(powerCapLimit=-5), {"spec.powerCapLimit": "must be greater than 0"}, id="cap-negative"),
    pytest.param(with_spec(powerCapLimit="1000"), {"spec.powerCapLimit": "must be an integer, not a string"}, id="cap-string"),
    pytest.param(with_spec(powerCapLimit=1000.5), {"spec.powerCapLimit": "must be an integer, not a number"}, id="cap-fraction"),
    pytest.param(with_spec(powerCapLimit=True), {"spec.powerCapLimit": "must be an integer, not a boolean"}, id="cap-boolean"),
    pytest.param(with_spec(powerCapLimit=None), {"spec.powerCapLimit": "must be an integer, not null"}, id="cap-null"),
    pytest.param(with_spec(powerCapLimit=DELETE), {"spec.powerCapLimit": "is required"}, id="cap-missing"),
    pytest.param({k: v for k, v in VALID.items() if k != "spec"}, {"spec": "is required"}, id="spec-missing"),
    pytest.param(with_spec(powerCapLimt=1000), {"spec.powerCapLimt": "did you mean powerCapLimit?"}, id="typo-unknown-field"),
    pytest.param(with_spec(rackConstraints=[rack(maxPower=0)]), {"spec.rackConstraints[0].maxPower": "must be greater than 0"}, id="rack-power-zero"),
    pytest.param(with_spec(rackConstraints=[RACK, rack(rackId="rack-2", maxPower=-1)]), {"spec.rackConstraints[1].maxPower": "must be greater than 0"}, id="second-rack-power-negative"),
    pytest.param(with_spec(rackConstraints=[rack(maxTemperature=0)]), {"spec.rackConstraints[0].maxTemperature": "must be greater than 0"}, id="temperature-zero"),
    pytest.param(with_spec(rackConstraints=[rack(maxTemperature=61)]), {"spec.rackConstraints[0].maxTemperature": "must be at most 60"}, id="temperature-above-60"),
    pytest.param(with_spec(rackConstraints=[rack(maxTemperature=85.5)]), {"spec.rackConstraints[0].maxTemperature": "must be at most 60"}, id="gpu-temperature-not-inlet"),
    pytest.param(with_spec(rackConstraints=[rack(rackId="")]), {"spec.rackConstraints[0].rackId": "must not be empty"}, id="rack-id-empty"),
    pytest.param(with_spec(rackConstraints=[{"maxPower": 100}]), {"spec.rackConstraints[0].rackId": "is required"}, id="rack-id-missing"),
    pytest.param(with_spec(rackConstraints=[RACK, rack(maxPower=4000)]), {"spec.rackConstraints[1].rackId": 'duplicate rackId "rack-1"'}, id="rack-id-duplicate"),
    pytest.param(with_spec(rackConstraints=[rack(rackId="rack 1")]), {"spec.rackConstraints[0].rackId": "not a valid label value"}, id="rack-id-not-a-label-value"),
    pytest.param(with_spec(rackConstraints={"rackId": "rack-1"}), {"spec.rackConstraints": "must be a list, not an object"}, id="racks-not-a-list"),
    pytest.param(with_spec(rackConstraints=[rack(maxPower="5kW")]), {"spec.rackConstraints[0].maxPower": "must be an integer, not a string"}, id="rack-power-with-unit"),
    pytest.param(with_spec(performancePowerRatio={"targetRatio": 0}), {"spec.performancePowerRatio.targetRatio": "must be greater than 0"}, id="ratio-zero"),
    pytest.param(with_spec(powerCapLimit=10**50), {"spec.powerCapLimit": "is outside the int64 range (-2^63 to 2^63 - 1)"}, id="cap-beyond-int64"),
    pytest.param(with_spec(rackConstraints=[rack(maxPower=2**63)]), {"spec.rackConstraints[0].maxPower": "9223372036854775808 is outside the int64 range"}, id="rack-power-beyond-int64"),
    pytest.param(with_spec(rackConstraints=[rack(maxTemperature=float("nan"))]), {"spec.rackConstraints[0].maxTemperature": "must be a number, not nan (not a finite number)"}, id="temperature-nan"),
    pytest.param(with_spec(performancePowerRatio={"tolerancePercentage": 5}), {"spec.performancePowerRatio.targetRatio": "is required"}, id="ratio-target-missing"),
    pytest.param(with_spec(performancePowerRatio={"targetRatio": 0.8, "tolerancePercentage": 101}), {"spec.performancePowerRatio.tolerancePercentage": "must be at most 100"}, id="tolerance-above-100"),
    pytest.param(with_spec(performancePowerRatio={"targetRatio": 0.8, "tolerancePercentage": -1}), {"spec.performancePowerRatio.tolerancePercentage": "must be at least 0"}, id="tolerance-negative"),
    pytest.param(with_spec(customAlgorithm={"name": "round-robin"}), {"spec.customAlgorithm.name": 'unknown algorithm "round-robin"; registered: energy-aware-scheduling, headroom, thermal-aware'}, id="algorithm-unknown"),
    pytest.param(with_spec(customAlgorithm={"parameters": {}}), {"spec.customAlgorithm.name": "is required"}, id="algorithm-name-missing"),
    pytest.param(with_spec(customAlgorithm={"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 500, "interval": 60}}), {"spec.customAlgorithm.parameters.interval": "unknown parameter; allowed: energyThreshold, migrationInterval"}, id="algorithm-parameter-unknown"),
    pytest.param(with_spec(customAlgorithm={"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 500, "migrationInterval": 10}}), {"spec.customAlgorithm.parameters.migrationInterval": "must be at least 30"}, id="migration-interval-too-short"),
    pytest.param(with_spec(customAlgorithm={"name": "energy-aware-scheduling", "parameters": {"migrationInterval": 300}}), {"spec.customAlgorithm.parameters.energyThreshold": "is required"}, id="energy-threshold-missing"),
    pytest.param(with_spec(customAlgorithm={"name": "energy-aware-scheduling", "parameters": {"energyThreshold": -500}}), {"spec.customAlgorithm.parameters.energyThreshold": "must be greater than 0"}, id="energy-threshold-negative"),
    pytest.param(with_spec(customAlgorithm={"name": "headroom", "parameters": {"spread": 2}}), {"spec.customAlgorithm.parameters.spread": "unknown parameter; allowed: none"}, id="headroom-takes-no-parameters"),
    pytest.param(with_spec(customAlgorithm={"name": "headroom", "parameters": [1, 2]}), {"spec.customAlgorithm.parameters": "must be an object, not a list"}, id="parameters-not-an-object"),
    pytest.param(with_spec(mode="enforce"), {"spec.mode": "must be one of: Enforce, Observe"}, id="mode-wrong-case"),
    pytest.param(with_spec(selector={"matchExpressions": [{"key": "app", "operator": "In"}]}), {"spec.selector.matchExpressions[0].values": "must have at least one value when operator is In"}, id="selector-in-without-values"),
    pytest.param(with_spec(selector={"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}), {"spec.selector.matchExpressions[0].values": "must be empty when operator is Exists"}, id="selector-exists-with-values"),
    pytest.param(with_spec(selector={"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["x"]}]}), {"spec.selector.matchExpressions[0].operator": "must be one of: In, NotIn, Exists, DoesNotExist"}, id="selector-bad-operator"),
    pytest.param(with_spec(selector={"matchLabels": {"app": "has space"}}), {"spec.selector.matchLabels[app]": "not a valid label value"}, id="selector-bad-label-value"),
    pytest.param(with_spec(selector={"matchLabels": {"-bad": "x"}}), {"spec.selector.matchLabels[-bad]": 'label key "-bad"'}, id="selector-bad-label-key"),
    pytest.param(with_spec(selector={"matchLabels": {"app": 7}}), {"spec.selector.matchLabels.app": "must be a string, not an integer"}, id="selector-label-value-not-string"),
    pytest.param({**VALID, "apiVersion": "powercapping.example.com/v1"}, {"apiVersion": "must be powercapping.example.com/v1alpha1"}, id="wrong-api-version"),
    pytest.param({**VALID, "metadata": {"name": "Bad_Name"}}, {"metadata.name": "lowercase RFC 1123 subdomain"}, id="bad-name"),
    pytest.param({**VALID, "metadata": {"name": "ok", "namespace": "In Ference"}}, {"metadata.namespace": "lowercase RFC 1123 label"}, id="bad-namespace"),
    pytest.param({**VALID, "metadata": {}}, {"metadata.name": "is required"}, id="name-missing"),
    # the API server sets generation; a file or hand-written review carrying another made the webhook answer 500
    pytest.param({**VALID, "metadata": {"name": "ok", "generation": float("inf")}}, {"metadata.generation": "must be a non-negative int64"}, id="generation-infinite"),
    pytest.param({**VALID, "metadata": {"name": "ok", "generation": "2"}}, {"metadata.generation": "must be a non-negative int64"}, id="generation-string"),
    pytest.param({**VALID, "metadata": {"name": "ok", "generation": 2**64}}, {"metadata.generation": "must be a non-negative int64"}, id="generation-past-int64"),
    pytest.param(with_spec(powerCapLimit=10**400), {"spec.powerCapLimit": "outside the int64 range"}, id="cap-400-digits"),
    pytest.param({**VALID, "kind": "Pod"}, {"kind": "must be PowerCappingPolicy, not 'Pod'"}, id="wrong-kind"),
]


@pytest.mark.parametrize(("document", "expected"), INVALID)
def test_invalid_policies_are_rejected_with_the_right_paths(
    document: dict[str, Any], expected: dict[str, str], registry: AlgorithmRegistry
) -> None:
    result = validate_policy(document, registry)
    assert not result.ok
    by_path = {problem.path: problem.message for problem in result.errors}
    assert set(by_path) == set(expected), [str(p) for p in result.errors]
    for path, fragment in expected.items():
        assert fragment in by_path[path]


def test_every_problem_of_a_document_is_reported_at_once(registry: AlgorithmRegistry) -> None:
    document = {
        "apiVersion": "powercapping.example.com/v1alpha1",
        "kind": "PowerCappingPolicy",
        "metadata": {"name": "many-errors", "namespace": "inference"},
        "spec": {
            "powerCapLimit": 0,
            "rackConstraints": [
                {"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 30},
                {"rackId": "rack-1", "maxPower": 0, "maxTemperature": 75},
            ],
            "performancePowerRatio": {"targetRatio": -1, "tolerancePercentage": 150},
            "customAlgorithm": {"name": "energy-aware-scheduling", "parameters": {"energyThresold": 500}},
            "mode": "Dry",
        },
    }
    messages = [str(problem) for problem in validate_policy(document, registry).errors]
    assert messages == [
        "spec.powerCapLimit: must be greater than 0",
        "spec.rackConstraints[1].maxPower: must be greater than 0",
        "spec.rackConstraints[1].maxTemperature: must be at most 60",
        "spec.performancePowerRatio.targetRatio: must be greater than 0",
        "spec.performancePowerRatio.tolerancePercentage: must be at most 100",
        "spec.mode: unsupported value 'Dry'; must be one of: Enforce, Observe",
        'spec.rackConstraints[1].rackId: duplicate rackId "rack-1" (also spec.rackConstraints[0])',
        "spec.customAlgorithm.parameters.energyThreshold: is required",
        "spec.customAlgorithm.parameters.energyThresold: unknown parameter; allowed: energyThreshold, migrationInterval",
    ]


WARNING_CASES = [
    pytest.param(with_spec(powerCapLimit=150), "spec.powerCapLimit", "below one GPU's minimum limit", id="cap-below-gpu-minimum"),
    pytest.param(with_spec(rackConstraints=[rack(maxPower=800)]), "spec.rackConstraints[0].maxPower", "below powerCapLimit 1000 W", id="rack-below-cap"),
    pytest.param(with_spec(rackConstraints=[rack(maxTemperature=55)]), "spec.rackConstraints[0].maxTemperature", "inlet air, not GPU temperature", id="implausible-inlet"),
    pytest.param(with_spec(rackConstraints=[{"rackId": "rack-9"}]), "spec.rackConstraints[0]", "constrains nothing", id="rack-without-limits"),
    pytest.param(with_spec(performancePowerRatio={"targetRatio": 1, "tolerancePercentage": 0}), "spec.performancePowerRatio.tolerancePercentage", "no dead band", id="zero-tolerance"),
]


@pytest.mark.parametrize(("document", "path", "fragment"), WARNING_CASES)
def test_suspicious_but_legal_policies_get_short_warnings(
    document: dict[str, Any], path: str, fragment: str, registry: AlgorithmRegistry
) -> None:
    result = validate_policy(document, registry)
    assert result.ok, result.errors
    assert [w.path for w in result.warnings] == [path]
    assert fragment in result.warnings[0].message
    assert len(str(result.warnings[0])) <= 120


@pytest.mark.parametrize("document", [None, [], "policy", 42, [VALID]], ids=["null", "list", "string", "number", "list-of-policy"])
def test_non_object_documents_are_errors_not_crashes(document: Any, registry: AlgorithmRegistry) -> None:
    result = validate_policy(document, registry)
    assert [str(p) for p in result.errors] == [f"a policy must be an object, not {_type_name(document)}"]


def _type_name(value: Any) -> str:
    return {type(None): "null", list: "a list", str: "a string", int: "an integer"}[type(value)]


def test_defaults_fill_only_what_is_missing(registry: AlgorithmRegistry) -> None:
    document = yaml.safe_load(SEED_EXAMPLES["custom-algorithm.yaml"])
    document["spec"]["customAlgorithm"]["parameters"] = {"energyThreshold": 500}
    document["spec"]["performancePowerRatio"] = {"targetRatio": 0.8}
    defaulted = default_policy(document, registry)
    assert defaulted["spec"]["mode"] == "Enforce"
    assert defaulted["spec"]["performancePowerRatio"] == {"targetRatio": 0.8, "tolerancePercentage": 5}
    assert defaulted["spec"]["selector"] == {"matchLabels": {POLICY_LABEL: "llm-inference-power-capping"}}
    assert defaulted["spec"]["customAlgorithm"]["parameters"] == {"energyThreshold": 500, "migrationInterval": 300}
    assert "mode" not in document["spec"], "the input document must not be modified"
    assert default_policy(defaulted, registry) == defaulted, "defaulting must be idempotent"


def test_defaults_never_change_a_value_the_user_set(registry: AlgorithmRegistry) -> None:
    document = yaml.safe_load((SAMPLES_DIR / "full.yaml").read_text())
    document["spec"]["mode"] = "Observe"
    assert default_policy(document, registry) == document


def test_parse_policy_gives_typed_defaulted_policy(registry: AlgorithmRegistry) -> None:
    policy = parse_policy(yaml.safe_load((SAMPLES_DIR / "full.yaml").read_text()), registry)
    assert policy.key == "inference/llama-70b-chat"
    assert policy.power_cap_w == 4200
    assert [(r.rack_id, r.max_power_w, r.max_temperature_c) for r in policy.racks] == [
        ("rack-a1", 12000, 27.0), ("rack-a2", 10000, 27.0)
    ]
    assert policy.performance is not None
    assert policy.performance.low_tokens_per_joule == pytest.approx(2.25)
    assert policy.performance.high_tokens_per_joule == pytest.approx(2.75)
    assert policy.algorithm.name == "energy-aware-scheduling"
    assert dict(policy.algorithm.parameters) == {"energyThreshold": 3500, "migrationInterval": 600}
    assert policy.mode is Mode.ENFORCE and policy.enforced
    assert policy.selector.matches({"app.kubernetes.io/name": "llama-70b-chat", "serving.example.com/tier": "canary"})
    assert not policy.selector.matches({"app.kubernetes.io/name": "llama-70b-chat", "serving.example.com/tier": "dev"})


def test_parse_policy_defaults_selector_and_algorithm(registry: AlgorithmRegistry) -> None:
    policy = parse_policy(VALID, registry)
    assert policy.key == "default/llm-inference-power-capping"
    assert policy.algorithm.name == "headroom"
    assert policy.selector.matches({POLICY_LABEL: "llm-inference-power-capping"})
    assert not policy.selector.matches({POLICY_LABEL: "other"})


def test_parse_policy_refuses_invalid_documents_naming_the_problem(registry: AlgorithmRegistry) -> None:
    with pytest.raises(ValueError, match=r"spec\.powerCapLimit: must be greater than 0"):
        parse_policy(with_spec(powerCapLimit=0), registry)


@pytest.mark.parametrize(
    ("operator", "values", "labels", "expected"),
    [
        pytest.param("In", ("a", "b"), {"k": "a"}, True, id="in-match"),
        pytest.param("In", ("a",), {}, False, id="in-missing-key"),
        pytest.param("NotIn", ("a",), {}, True, id="notin-missing-key"),
        pytest.param("NotIn", ("a",), {"k": "a"}, False, id="notin-match"),
        pytest.param("Exists", (), {"k": ""}, True, id="exists"),
        pytest.param("DoesNotExist", (), {"k": "x"}, False, id="does-not-exist"),
    ],
)
def test_selector_requirements_match_like_kubernetes(
    operator: str, values: tuple[str, ...], labels: dict[str, str], expected: bool
) -> None:
    from powercap.policies import LabelSelector

    selector = LabelSelector.from_dict({"matchExpressions": [{"key": "k", "operator": operator, "values": list(values)}]})
    assert selector.matches(labels) is expected
