"""The webhook as kube-apiserver sees it: ``powercap webhook`` (gunicorn) over real TLS sockets,
AdmissionReview bodies with every field the apiserver sends, ``?timeout=10s`` in the URL."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from powercap.algorithms import AlgorithmRegistry
from powercap.policies import POLICY_LABEL, default_policy, validate_policy

from .conftest import SAMPLES_DIR
from .webhook_helpers import (  # noqa: F401  (fixtures)
    WebhookProcess,
    admission_review,
    policy,
    webhook_certs,
    webhook_process,
)


@pytest.fixture
def session(webhook_process: WebhookProcess) -> Iterator[requests.Session]:
    with webhook_process.endpoint.session() as session:
        yield session


def sample(name: str) -> dict[str, Any]:
    document = yaml.safe_load((SAMPLES_DIR / name).read_text())
    return {**policy(), **document, "metadata": {**policy()["metadata"], **document["metadata"]}}


BROKEN = policy(powerCapLimit=0, rackConstraints=[
    {"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 30},
    {"rackId": "rack-2", "maxPower": 0, "maxTemperature": 75},
])
BROKEN_MESSAGE = (
    "spec.powerCapLimit: must be greater than 0; "
    "spec.rackConstraints[1].maxPower: must be greater than 0; "
    "spec.rackConstraints[1].maxTemperature: must be at most 60"
)


@pytest.mark.parametrize("name", ["basic.yaml", "rack-constraints.yaml", "performance-power-ratio.yaml", "custom-algorithm.yaml", "full.yaml"])
def test_shipped_samples_are_allowed_without_warnings(webhook_process: WebhookProcess, session: requests.Session, name: str) -> None:
    response = webhook_process.endpoint.admit(session, "validate", admission_review("CREATE", sample(name)))
    assert response == {"uid": response["uid"], "allowed": True}


def test_a_bad_policy_is_refused_naming_every_bad_field(webhook_process: WebhookProcess, session: requests.Session) -> None:
    response = webhook_process.endpoint.admit(session, "validate", admission_review("CREATE", BROKEN))
    assert response["allowed"] is False
    assert response["status"] == {
        "status": "Failure",
        "code": 422,
        "reason": "Invalid",
        "message": BROKEN_MESSAGE,
        "details": {
            "name": "llama-70b-chat",
            "group": "powercapping.example.com",
            "kind": "PowerCappingPolicy",
            "causes": [
                {"reason": "FieldValueInvalid", "field": "spec.powerCapLimit", "message": "must be greater than 0"},
                {"reason": "FieldValueInvalid", "field": "spec.rackConstraints[1].maxPower", "message": "must be greater than 0"},
                {"reason": "FieldValueInvalid", "field": "spec.rackConstraints[1].maxTemperature", "message": "must be at most 60"},
            ],
        },
    }
    assert "patch" not in response


@pytest.mark.parametrize("dry_run", [False, True], ids=["real", "dry-run"])
def test_dry_run_requests_get_the_same_verdict(webhook_process: WebhookProcess, session: requests.Session, dry_run: bool) -> None:
    refused = webhook_process.endpoint.admit(session, "validate", admission_review("CREATE", BROKEN, dry_run=dry_run))
    allowed = webhook_process.endpoint.admit(session, "validate", admission_review("CREATE", policy(), dry_run=dry_run))
    assert (refused["allowed"], refused["status"]["message"], allowed["allowed"]) == (False, BROKEN_MESSAGE, True)


def test_update_is_judged_on_the_new_object(webhook_process: WebhookProcess, session: requests.Session) -> None:
    breaking = webhook_process.endpoint.admit(session, "validate", admission_review("UPDATE", BROKEN, policy()))
    fixing = webhook_process.endpoint.admit(session, "validate", admission_review("UPDATE", policy(), BROKEN))
    assert breaking["allowed"] is False and breaking["status"]["message"] == BROKEN_MESSAGE
    assert fixing["allowed"] is True


def test_an_object_being_deleted_can_always_be_updated(webhook_process: WebhookProcess, session: requests.Session) -> None:
    finalizing = {**BROKEN, "metadata": {**BROKEN["metadata"], "deletionTimestamp": "2025-06-02T00:00:00Z", "finalizers": []}}
    assert webhook_process.endpoint.admit(session, "validate", admission_review("UPDATE", finalizing, BROKEN))["allowed"] is True


@pytest.mark.parametrize("operation", ["DELETE", "CONNECT"])
def test_delete_and_connect_are_allowed(webhook_process: WebhookProcess, session: requests.Session, operation: str) -> None:
    review = admission_review(operation, None, BROKEN) if operation == "DELETE" else admission_review(operation, {"kind": "PodExecOptions"})
    assert webhook_process.endpoint.admit(session, "validate", review)["allowed"] is True


def test_status_updates_and_other_kinds_are_not_judged(webhook_process: WebhookProcess, session: requests.Session) -> None:
    status_update = admission_review("UPDATE", BROKEN, BROKEN, sub_resource="status")
    pod = admission_review("CREATE", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
    pod["request"]["kind"] = {"group": "", "version": "v1", "kind": "Pod"}
    for review in (status_update, pod):
        for endpoint in ("validate", "mutate"):
            assert webhook_process.endpoint.admit(session, endpoint, review) == {"uid": review["request"]["uid"], "allowed": True}


def test_suspicious_policies_get_short_warnings(webhook_process: WebhookProcess, session: requests.Session) -> None:
    suspicious = policy(powerCapLimit=150, rackConstraints=[{"rackId": "r" * 60 + "-" + "x" * 2}, {"rackId": "rack-2", "maxPower": 100}])
    response = webhook_process.endpoint.admit(session, "validate", admission_review("CREATE", suspicious))
    assert response["allowed"] is True
    assert response["warnings"] == [
        "spec.powerCapLimit: 150 W is below one GPU's minimum limit (200 W on H100/H200): no pod can get a GPU",
        "spec.rackConstraints[0]: sets neither maxPower nor maxTemperature, so it constrains nothing",
        "spec.rackConstraints[1].maxPower: 100 W is below powerCapLimit 150 W: this rack alone cannot hold the whole service",
    ]
    assert all(len(warning) <= 120 for warning in response["warnings"])


def apply_patch(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.JsonPatch(operations).apply(obj)


MUTATIONS = [
    pytest.param(policy(), {"mode": "Enforce", "selector": {"matchLabels": {POLICY_LABEL: "llama-70b-chat"}}}, id="basic"),
    pytest.param(
        policy(performancePowerRatio={"targetRatio": 0.8}, customAlgorithm={"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 500}}),
        {"mode": "Enforce", "selector": {"matchLabels": {POLICY_LABEL: "llama-70b-chat"}},
         "performancePowerRatio": {"targetRatio": 0.8, "tolerancePercentage": 5},
         "customAlgorithm": {"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 500, "migrationInterval": 300}}},
        id="nested-defaults",
    ),
    pytest.param(policy(mode="Observe", selector={}), {"mode": "Observe", "selector": {}}, id="user-values-kept"),
]


@pytest.mark.parametrize(("obj", "defaulted_spec"), MUTATIONS)
@pytest.mark.parametrize("operation", ["CREATE", "UPDATE"])
def test_mutation_patch_fills_defaults_and_is_idempotent(
    webhook_process: WebhookProcess, session: requests.Session, obj: dict[str, Any], defaulted_spec: dict[str, Any], operation: str
) -> None:
    old = policy() if operation == "UPDATE" else None
    first = webhook_process.endpoint.admit(session, "mutate", admission_review(operation, obj, old))
    assert first["allowed"] is True
    mutated = apply_patch(obj, first)
    assert mutated["spec"] == {**obj["spec"], **defaulted_spec}
    assert mutated["metadata"] == obj["metadata"], "metadata (managedFields included) is never touched"
    assert mutated == default_policy(obj, AlgorithmRegistry.default())
    second = webhook_process.endpoint.admit(session, "mutate", admission_review(operation, mutated, old))
    assert second == {"uid": second["uid"], "allowed": True}, "an already-defaulted object gets no patch"


def test_mutation_never_refuses_and_leaves_invalid_values_alone(webhook_process: WebhookProcess, session: requests.Session) -> None:
    response = webhook_process.endpoint.admit(session, "mutate", admission_review("CREATE", BROKEN))
    assert response["allowed"] is True
    mutated = apply_patch(BROKEN, response)
    assert mutated["spec"]["powerCapLimit"] == 0 and mutated["spec"]["rackConstraints"] == BROKEN["spec"]["rackConstraints"]
    assert mutated["spec"]["mode"] == "Enforce"


@pytest.mark.parametrize("operation", ["DELETE", "CONNECT"])
def test_mutation_ignores_delete_and_connect(webhook_process: WebhookProcess, session: requests.Session, operation: str) -> None:
    review = admission_review(operation, None, policy()) if operation == "DELETE" else admission_review(operation, {"kind": "PodExecOptions"})
    response = webhook_process.endpoint.admit(session, "mutate", review)
    assert response == {"uid": response["uid"], "allowed": True}


def _review_with(**request_changes: Any) -> bytes:
    review = admission_review("CREATE", policy(), uid="bad-request-uid")
    for key, value in request_changes.items():
        if value is DROP:
            review["request"].pop(key)
        else:
            review["request"][key] = value
    return json.dumps(review).encode()


DROP = object()
VALID_REVIEW = json.loads(_review_with())

BAD_REQUESTS = [
    pytest.param(b"", "request body is not JSON", id="empty-body"),
    pytest.param(b"{\"apiVersion\": ", "request body is not JSON", id="truncated-json"),
    pytest.param(b"\xff\xfe not utf-8", "request body is not JSON", id="not-utf8"),
    pytest.param(b"[1, 2, 3]", "must be a JSON object", id="json-array"),
    pytest.param(b"\"AdmissionReview\"", "must be a JSON object", id="json-string"),
    pytest.param(b"{\"a\": NaN}", "NaN is not a JSON value", id="nan"),
    pytest.param(b"{\"a\": " + b"9" * 5000 + b"}", "request body is not JSON", id="huge-integer"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "the AdmissionReview has more than 20000 JSON values (the limit)", id="deep-nesting-many-values"),
    pytest.param(b"[" * 1000 + b"]" * 1000, "the AdmissionReview is nested more than 64 levels deep (the limit)", id="deep-nesting"),
    pytest.param(json.dumps({**VALID_REVIEW, "apiVersion": "admission.k8s.io/v1beta1"}).encode(), "expected apiVersion admission.k8s.io/v1 kind AdmissionReview", id="v1beta1"),
    pytest.param(json.dumps({**VALID_REVIEW, "kind": "ConversionReview"}).encode(), "got apiVersion \"admission.k8s.io/v1\" kind \"ConversionReview\"", id="conversion-review"),
    pytest.param(json.dumps({k: v for k, v in VALID_REVIEW.items() if k != "request"}).encode(), "has no request", id="no-request"),
    pytest.param(json.dumps({**VALID_REVIEW, "request": []}).encode(), "has no request", id="request-not-object"),
    pytest.param(_review_with(uid=DROP), "request.uid is missing", id="no-uid"),
    pytest.param(_review_with(uid=""), "request.uid must be a non-empty string, not \"\"", id="empty-uid"),
    pytest.param(_review_with(uid=42), "request.uid must be a non-empty string, not 42", id="uid-number"),
    pytest.param(_review_with(operation="PATCH"), "request.operation must be one of CREATE, UPDATE, DELETE, CONNECT", id="bad-operation"),
    pytest.param(_review_with(kind="PowerCappingPolicy"), "request.kind must be an object", id="kind-string"),
    pytest.param(_review_with(dryRun="false"), "request.dryRun must be a boolean", id="dry-run-string"),
    pytest.param(_review_with(namespace=["inference"]), "request.namespace must be a string", id="namespace-list"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_REQUESTS)
@pytest.mark.parametrize("endpoint", ["validate", "mutate"])
def test_bad_requests_get_400_with_a_short_message(
    webhook_process: WebhookProcess, session: requests.Session, endpoint: str, body: bytes, fragment: str
) -> None:
    reply = webhook_process.endpoint.post(session, endpoint, None, raw=body)
    assert reply.status_code == 400
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert fragment in reply.text
    assert len(reply.text) < 200 and "Traceback" not in reply.text


def test_bodies_over_3_mib_get_413_and_3_mib_is_accepted(webhook_process: WebhookProcess, session: requests.Session) -> None:
    three_mib = 3 * 1024 * 1024
    review = json.dumps(admission_review("CREATE", policy())).encode()
    exactly = review + b" " * (three_mib - len(review))
    assert webhook_process.endpoint.post(session, "validate", None, raw=exactly).status_code == 200
    reply = webhook_process.endpoint.post(session, "validate", None, raw=exactly + b" ")
    assert reply.status_code == 413
    assert reply.text == f"request body is larger than {three_mib} bytes\n"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        pytest.param("GET", "/validate", 405, id="get-validate"),
        pytest.param("PUT", "/mutate", 405, id="put-mutate"),
        pytest.param("POST", "/nope", 404, id="unknown-path"),
        pytest.param("GET", "/healthz", 200, id="healthz"),
        pytest.param("GET", "/readyz", 200, id="readyz"),
    ],
)
def test_other_routes_answer_short_and_never_500(
    webhook_process: WebhookProcess, session: requests.Session, method: str, path: str, status: int
) -> None:
    reply = session.request(method, webhook_process.endpoint.base_url + path, timeout=10)
    assert reply.status_code == status
    assert len(reply.text) < 100


def metric_samples(session: requests.Session, server: WebhookProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = session.get(f"{server.endpoint.base_url}/metrics", timeout=10)
    assert reply.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def test_metrics_count_requests_of_every_worker_by_endpoint_and_outcome(webhook_process: WebhookProcess) -> None:
    denied = ("powercap_webhook_requests_total", (("endpoint", "validate"), ("outcome", "denied")))
    patched = ("powercap_webhook_requests_total", (("endpoint", "mutate"), ("outcome", "patched")))
    bad = ("powercap_webhook_requests_total", (("endpoint", "mutate"), ("outcome", "bad_request")))
    latency = ("powercap_webhook_request_duration_seconds_count", (("endpoint", "validate"),))
    with webhook_process.endpoint.session() as scraper:
        before = metric_samples(scraper, webhook_process)

    def client(_: int) -> None:  # a new connection each time, so the requests spread over the workers
        with webhook_process.endpoint.session() as fresh:
            webhook_process.endpoint.admit(fresh, "validate", admission_review("CREATE", BROKEN))
            webhook_process.endpoint.admit(fresh, "mutate", admission_review("CREATE", policy()))
            webhook_process.endpoint.post(fresh, "mutate", None, raw=b"not json")

    with ThreadPoolExecutor(max_workers=6) as pool:  # concurrent: both workers get some
        list(pool.map(client, range(24)))

    def scrape(_: int) -> dict[Any, float]:
        with webhook_process.endpoint.session() as scraper:
            return metric_samples(scraper, webhook_process)

    with ThreadPoolExecutor(max_workers=4) as pool:  # whichever worker answers, the totals
        scrapes = list(pool.map(scrape, range(8)))
    for after in scrapes:
        for key in (denied, patched, bad, latency):
            assert after.get(key, 0) - before.get(key, 0) == 24, key


def test_one_json_log_line_per_admission(webhook_process: WebhookProcess, session: requests.Session) -> None:
    review = admission_review("CREATE", BROKEN, dry_run=True)
    webhook_process.endpoint.admit(session, "validate", review)
    lines = [line for line in webhook_process.log_lines() if line.get("uid") == review["request"]["uid"]]
    assert len(lines) == 1
    line = lines[0]
    assert {k: line[k] for k in ("message", "endpoint", "kind", "name", "namespace", "operation", "allowed", "dry_run", "user")} == {
        "message": "admission", "endpoint": "validate", "kind": "PowerCappingPolicy", "name": "llama-70b-chat",
        "namespace": "inference", "operation": "CREATE", "allowed": False, "dry_run": True, "user": "kubernetes-admin",
    }
    assert 0 < line["duration_ms"] < 1000


def test_chunked_bodies_are_read_and_limited_too(webhook_process: WebhookProcess, session: requests.Session) -> None:
    review = admission_review("CREATE", BROKEN)
    body = json.dumps(review).encode()
    url = f"{webhook_process.endpoint.base_url}/validate?timeout=10s"
    chunked = session.post(url, data=iter([body[:100], body[100:]]), timeout=10)  # an iterator: Transfer-Encoding: chunked
    assert chunked.request.headers.get("Transfer-Encoding") == "chunked"
    assert chunked.status_code == 200 and chunked.json()["response"]["status"]["message"] == BROKEN_MESSAGE
    too_large = session.post(url, data=iter([b" " * (1024 * 1024)] * 4), timeout=10)
    assert too_large.status_code == 413


def test_a_name_too_long_for_the_default_selector_is_refused_as_validate_refuses_it(
    webhook_process: WebhookProcess, session: requests.Session,
) -> None:
    """Mutation leaves the selector out rather than fill in a label value that cannot be one;
    validation then names the field the user has to write, as ``powercap validate`` does."""
    long_name = "llama-" + "x" * 94
    obj = policy(long_name)
    mutated = apply_patch(obj, webhook_process.endpoint.admit(session, "mutate", admission_review("CREATE", obj)))
    assert "selector" not in mutated["spec"]
    refused = webhook_process.endpoint.admit(session, "validate", admission_review("CREATE", mutated))
    assert refused["allowed"] is False
    causes = refused["status"]["details"]["causes"]
    assert [c["field"] for c in causes] == ["spec.selector"]
    assert causes[0]["message"].startswith("is required when metadata.name is longer than 63 characters (100)")
    offline = validate_policy(mutated, AlgorithmRegistry.default())
    assert [str(p) for p in offline.errors] == [f"{c['field']}: {c['message']}" for c in causes]
