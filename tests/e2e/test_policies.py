"""Policies through the real kube-apiserver: kubectl apply, the webhooks, the CRD schema,
``kubectl get pcp`` and ``kubectl explain``, as a user meets them."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from powercap.algorithms import AlgorithmRegistry
from powercap.policies import validate_policy
from tests.e2e.harness import REPO_ROOT, ControlPlane, start_webhook

SAMPLES = sorted((REPO_ROOT / "config" / "samples").glob("*.yaml"))
GOOD = {
    "apiVersion": "powercapping.example.com/v1alpha1",
    "kind": "PowerCappingPolicy",
    "metadata": {"name": "llama"},
    "spec": {"powerCapLimit": 1000, "rackConstraints": [{"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 30}]},
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def with_spec(name: str, **spec: Any) -> dict[str, Any]:
    policy = copy.deepcopy(GOOD)
    policy["metadata"]["name"] = name
    policy["spec"].update(spec)
    return policy


def without(name: str, field: str) -> dict[str, Any]:
    policy = with_spec(name)
    del policy["spec"][field]
    return policy


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_every_sample_is_accepted_and_defaulted(cluster: ControlPlane, webhook_url: str, namespace: str,
                                                sample: Path) -> None:
    placed = [{**d, "metadata": {**d["metadata"], "namespace": namespace}} for d in documents(sample)]
    done = cluster.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(placed))
    for document in documents(sample):
        name = document["metadata"]["name"]
        assert f"powercappingpolicy.powercapping.example.com/{name} created" in done.stdout
        stored = cluster.get_json("pcp", name, "-n", namespace)
        spec = stored["spec"]
        # the mutating webhook's defaults, as `kubectl get -o yaml` shows them
        assert spec["mode"] == document["spec"].get("mode", "Enforce")
        assert spec["selector"] == document["spec"].get(
            "selector", {"matchLabels": {"powercapping.example.com/policy": name}})
        if "performancePowerRatio" in document["spec"]:
            expected = document["spec"]["performancePowerRatio"].get("tolerancePercentage", 5)
            assert spec["performancePowerRatio"]["tolerancePercentage"] == expected


def documented_policies() -> list[Any]:
    """Every PowerCappingPolicy in a ```yaml block of README.md and docs/."""
    found = []
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```ya?ml\n(.*?)```", path.read_text(), flags=re.S):
            try:
                parsed = [d for d in yaml.safe_load_all(block) if isinstance(d, dict)]
            except yaml.YAMLError:
                continue  # a fragment, not a document
            found += [pytest.param(d, id=f"{path.name}:{d['metadata']['name']}")
                      for d in parsed if d.get("kind") == "PowerCappingPolicy"]
    return found


@pytest.mark.parametrize("policy", documented_policies())
def test_the_documented_examples_get_the_verdict_powercap_validate_gives(
    cluster: ControlPlane, webhook_url: str, namespace: str, policy: dict[str, Any]
) -> None:
    valid = validate_policy(policy, AlgorithmRegistry.default()).ok
    placed = {**policy, "metadata": {**policy["metadata"], "namespace": namespace}}
    done = cluster.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(placed), check=False)
    assert (done.returncode == 0) is valid, done.stderr


# The API server checks the CRD schema (and kubectl's strict field validation) before any
# admission webhook: these never reach the webhook, and kubectl prints the server's words.
# A missing field, an unsupported value, a too long string or list stops the CRD's CEL rules,
# and the API server says so on a line of its own (docs/decisions.md).
NOT_CHECKED = ("<nil>: Invalid value: null: some validation rules were not checked because the object was invalid; "
               "correct the existing errors to complete validation")
SCHEMA_REFUSALS = [
    pytest.param(with_spec("zero-cap", powerCapLimit=0),
                 "spec.powerCapLimit: Invalid value: 0: spec.powerCapLimit in body should be greater than 0", id="zero-cap"),
    pytest.param(with_spec("negative-cap", powerCapLimit=-5),
                 "spec.powerCapLimit: Invalid value: -5: spec.powerCapLimit in body should be greater than 0",
                 id="negative-cap"),
    pytest.param(without("no-cap", "powerCapLimit"), ["spec.powerCapLimit: Required value", NOT_CHECKED],
                 id="missing-cap"),
    pytest.param(with_spec("rack-zero", rackConstraints=[{"rackId": "rack-1", "maxPower": 0}]),
                 "spec.rackConstraints[0].maxPower: Invalid value: 0: spec.rackConstraints[0].maxPower in body should be "
                 "greater than 0", id="rack-maxpower-zero"),
    pytest.param(with_spec("rack-hot", rackConstraints=[{"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 75}]),
                 "spec.rackConstraints[0].maxTemperature: Invalid value: 75: spec.rackConstraints[0].maxTemperature in "
                 "body should be less than or equal to 60", id="rack-temperature-above-60"),
    pytest.param(with_spec("rack-dup", rackConstraints=[{"rackId": "rack-1", "maxPower": 5000},
                                                        {"rackId": "rack-1", "maxPower": 4000}]),
                 'spec.rackConstraints[1]: Duplicate value: {"rackId":"rack-1"}', id="duplicate-rack"),
    pytest.param(with_spec("rack-empty", rackConstraints=[{"rackId": "", "maxPower": 5000}]),
                 'spec.rackConstraints[0].rackId: Invalid value: "": spec.rackConstraints[0].rackId in body should be at '
                 "least 1 chars long", id="empty-rack-id"),
    pytest.param(with_spec("ratio-zero", performancePowerRatio={"targetRatio": 0}),
                 "spec.performancePowerRatio.targetRatio: Invalid value: 0: spec.performancePowerRatio.targetRatio in "
                 "body should be greater than 0", id="ratio-zero"),
    pytest.param(with_spec("tolerance", performancePowerRatio={"targetRatio": 0.8, "tolerancePercentage": 150}),
                 "spec.performancePowerRatio.tolerancePercentage: Invalid value: 150: "
                 "spec.performancePowerRatio.tolerancePercentage in body should be less than or equal to 100",
                 id="tolerance-above-100"),
    pytest.param(with_spec("mode", mode="Sometimes"),
                 ['spec.mode: Unsupported value: "Sometimes": supported values: "Enforce", "Observe"', NOT_CHECKED],
                 id="bad-mode"),
    pytest.param(with_spec("bad-selector", selector={"matchExpressions": [{"key": "app", "operator": "Near"}]}),
                 ['spec.selector.matchExpressions[0].operator: Unsupported value: "Near": supported values: "In", '
                  '"NotIn", "Exists", "DoesNotExist"', NOT_CHECKED], id="bad-selector-operator"),
    # the CRD's CEL rules (tests/e2e/test_crd_rules.py has one case per rule)
    pytest.param(with_spec("in-without-values", selector={"matchExpressions": [{"key": "app", "operator": "In"}]}),
                 "spec.selector.matchExpressions[0].values: Required value: must have at least one value when "
                 "operator is In", id="selector-in-without-values"),
    pytest.param(with_spec("bad-label-key", selector={"matchLabels": {"not a key!": "x"}}),
                 'spec.selector.matchLabels: Invalid value: label key "not a key!" must be an optional prefix (a '
                 "lowercase DNS subdomain of at most 253 characters) and '/', then at most 63 characters of letters, "
                 "digits, '-', '_' or '.', starting and ending with a letter or digit", id="selector-bad-label-key"),
]


def kubectl_invalid(name: str, lines: str | list[str]) -> str:
    """What kubectl prints for a 422 naming ``lines``: one on the first line, more as a list."""
    lines = [lines] if isinstance(lines, str) else lines
    head = f'The PowerCappingPolicy "{name}" is invalid: '
    return head + lines[0] if len(lines) == 1 else head + "\n" + "\n".join(f"* {line}" for line in lines)


@pytest.mark.parametrize(("policy", "refusal"), SCHEMA_REFUSALS)
def test_what_the_schema_refuses_kubectl_prints_in_the_api_servers_words(
    cluster: ControlPlane, webhook_url: str, namespace: str, policy: dict[str, Any], refusal: str | list[str]
) -> None:
    done = cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(policy), check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == kubectl_invalid(policy["metadata"]["name"], refusal)
    # powercap validate refuses the same document, naming the same field
    problems = validate_policy(policy, AlgorithmRegistry.default()).errors
    first = refusal if isinstance(refusal, str) else refusal[0]
    assert problems and first.startswith(problems[0].path.split("[")[0])
    assert cluster.kubectl("get", "pcp", "-n", namespace, "-o", "name").stdout == ""


def test_a_mistyped_field_is_refused_by_strict_field_validation(cluster: ControlPlane, webhook_url: str,
                                                                namespace: str) -> None:
    typo = with_spec("typo", powerCapLimt=1000)
    done = cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(typo), check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        'Error from server (BadRequest): error when creating "STDIN": PowerCappingPolicy in version "v1alpha1" '
        'cannot be handled as a PowerCappingPolicy: strict decoding error: unknown field "spec.powerCapLimt"'
    )


# What the CRD cannot say reaches the webhook, whose 422 with one cause per problem kubectl
# prints like the server's own refusals (docs/decisions.md).
WEBHOOK_REFUSALS = [
    pytest.param(with_spec("algo", customAlgorithm={"name": "no-such-algorithm"}), id="unknown-algorithm"),
    pytest.param(with_spec("algo-params", customAlgorithm={"name": "energy-aware-scheduling",
                                                           "parameters": {"energyThreshold": -1, "migrationInterval": 5}}),
                 id="bad-algorithm-parameters"),
    pytest.param(with_spec("algo-unknown-param", customAlgorithm={"name": "headroom", "parameters": {"spread": 2}}),
                 id="unknown-algorithm-parameter"),
]


def expected_refusal(policy: dict[str, Any]) -> str:
    """What kubectl prints for the webhook's 422, from the validator the webhook runs."""
    problems = validate_policy(policy, AlgorithmRegistry.default()).errors
    assert problems, "the test's policy must be invalid"
    return kubectl_invalid(policy["metadata"]["name"], [str(p) for p in problems])


@pytest.mark.parametrize("policy", WEBHOOK_REFUSALS)
def test_what_only_the_webhook_can_judge_is_refused_with_every_problem_named(
    cluster: ControlPlane, webhook_url: str, namespace: str, policy: dict[str, Any]
) -> None:
    done = cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(policy), check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == expected_refusal(policy), done.stderr
    assert cluster.kubectl("get", "pcp", "-n", namespace, "-o", "name").stdout == ""


def test_a_policy_selecting_the_pods_of_another_is_refused_naming_it(cluster: ControlPlane, webhook_url: str,
                                                                     namespace: str) -> None:
    first = with_spec("llama-prod", selector={"matchLabels": {"app": "llama"}})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(first))
    second = with_spec("llama-canary", selector={"matchLabels": {"app": "llama", "track": "canary"}})
    done = cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(second), check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        'The PowerCappingPolicy "llama-canary" is invalid: spec.selector: may select the same pods as '
        'PowerCappingPolicy "llama-prod" in this namespace (e.g. a pod labelled app=llama, track=canary); '
        "a pod can follow one policy only"
    )


def test_get_pcp_shows_the_printer_columns(cluster: ControlPlane, webhook_url: str, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(GOOD))
    header, row = cluster.kubectl("get", "pcp", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "CAP", "POWER", "GPUS", "RATIO", "READY", "AGE"]
    assert row.split()[:2] == ["llama", "1000"]
    wide = cluster.kubectl("get", "pcp", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split()
    assert {"MODE", "BUDGET"} <= set(wide)


@pytest.mark.parametrize(
    ("field", "words"),
    [
        pytest.param("pcp.spec.powerCapLimit", "FIELD: powerCapLimit <integer>", id="cap"),
        pytest.param("pcp.spec.rackConstraints", "FIELD: rackConstraints <[]Object>", id="racks"),
        pytest.param("pcp.spec.rackConstraints.maxTemperature", "FIELD: maxTemperature <number>", id="temperature"),
        pytest.param("pcp.spec.customAlgorithm.parameters", "FIELD: parameters <Object>", id="parameters"),
        pytest.param("pcp.status.allocations.gpus", "FIELD: gpus <[]Object>", id="allocations"),
        pytest.param("pcp.status.conditions", "FIELD: conditions <[]Object>", id="conditions"),
    ],
)
def test_kubectl_explain_describes_nested_fields(cluster: ControlPlane, field: str, words: str) -> None:
    text = cluster.kubectl("explain", field).stdout
    assert words in text
    description = text.split("DESCRIPTION:", 1)[1].strip()
    assert len(description.split()) >= 5, f"{field} has no real description:\n{text}"


def test_with_the_webhook_unreachable_no_policy_gets_in(cluster: ControlPlane, webhook_url: str, namespace: str) -> None:
    """failurePolicy Fail: the validating webhook down refuses every apply, naming the webhook."""
    webhook = next(p for p in cluster.processes if "webhook" in " ".join(map(str, p.args)))
    cluster.stop(webhook)
    try:
        done = cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(GOOD), check=False)
        assert done.returncode == 1
        assert 'failed calling webhook "validate.powercapping.example.com"' in done.stderr
        assert "connection refused" in done.stderr
    finally:
        restart_webhook(cluster, webhook)


def restart_webhook(cluster: ControlPlane, stopped: Any) -> None:
    args = [str(a) for a in stopped.args]
    port = int(args[args.index("--bind") + 1].rpartition(":")[2])
    start_webhook(cluster, Path(args[args.index("--cert-dir") + 1]), port)


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        pytest.param(with_spec("zero-cap", powerCapLimit=0), "spec.powerCapLimit: Invalid value: 0", id="zero-cap"),
        pytest.param(with_spec("hot", rackConstraints=[{"rackId": "r", "maxPower": 1, "maxTemperature": 75}]),
                     "spec.rackConstraints[0].maxTemperature: Invalid value: 75", id="temperature"),
        pytest.param(with_spec("mode", mode="Sometimes"), 'spec.mode: Unsupported value: "Sometimes"', id="mode"),
    ],
)
def test_the_crd_schema_alone_refuses_what_it_can(cluster: ControlPlane, without_webhooks: None, namespace: str,
                                                   policy: dict[str, Any], words: str) -> None:
    """Without the webhooks registered (a cluster where they are not installed yet), the CRD's
    openAPIV3Schema still refuses what a schema can say."""
    done = cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(policy), check=False)
    assert done.returncode == 1
    assert f'The PowerCappingPolicy "{policy["metadata"]["name"]}" is invalid' in done.stderr
    assert words in done.stderr, done.stderr
