"""Bodies past the webhook's limits are refused before they are decoded, with a message
naming the limit and one short log line, never a 500 or a traceback; the largest body
accepted stays within a stated memory bound. The production server (``powercap webhook``
under gunicorn) over real TLS, as kube-apiserver calls it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from webhook.app import MAX_BODY_BYTES, REVIEW_LIMITS

from .webhook_helpers import (  # noqa: F401  (fixtures)
    WebhookProcess,
    admission_review,
    policy,
    webhook_certs,
)


@pytest.fixture(scope="module")
def server(webhook_certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookProcess]:  # noqa: F811
    process = WebhookProcess(webhook_certs, tmp_path_factory.mktemp("webhook-limits") / "webhook.log")
    yield process
    process.stop()


def review_bytes(replacement: bytes, operation: str = "CREATE") -> tuple[dict[str, Any], bytes]:
    """An AdmissionReview whose policy has ``spec.customAlgorithm.parameters.x`` = ``replacement`` (raw JSON)."""
    review = admission_review(operation, policy(customAlgorithm={"name": "headroom", "parameters": {"x": "PLACEHOLDER"}}))
    return review, json.dumps(review).encode().replace(b'"PLACEHOLDER"', replacement)


def post(server: WebhookProcess, endpoint: str, body: bytes) -> requests.Response:
    with server.endpoint.session() as session:
        return server.endpoint.post(session, endpoint, None, raw=body)


OVER_LIMITS = [
    pytest.param(b"[" + b",".join([b"0"] * 1_000_000) + b"]", 413, "RequestEntityTooLarge",
                 "the AdmissionReview has more than 20000 JSON values (the limit)", id="a-million-item-list"),
    pytest.param(json.dumps([{"key": f"k{i}", "operator": "Exists"} for i in range(5000)]).encode(), 400, "BadRequest",
                 "the AdmissionReview has an array or object with more than 1024 entries (the limit)", id="5000-match-expressions"),
    pytest.param(json.dumps([{"key": f"k{i}", "operator": "In", "values": ["a", "b"]} for i in range(1000)] * 4).encode(), 413,
                 "RequestEntityTooLarge", "the AdmissionReview has more than 20000 JSON values (the limit)", id="4000-match-expressions"),
    pytest.param(b"[" + b",".join([b"0"] * 1025) + b"]", 400, "BadRequest",
                 "the AdmissionReview has an array or object with more than 1024 entries (the limit)", id="1025-items"),
    pytest.param(json.dumps({f"k{i}": i for i in range(1025)}).encode(), 400, "BadRequest",
                 "the AdmissionReview has an array or object with more than 1024 entries (the limit)", id="1025-members"),
    pytest.param(b"[" * 500 + b"]" * 500, 400, "BadRequest",
                 "the AdmissionReview is nested more than 64 levels deep (the limit)", id="500-levels"),
    pytest.param(b"{\"a\":" * 60 + b"1" + b"}" * 60, 400, "BadRequest",
                 "the AdmissionReview is nested more than 64 levels deep (the limit)", id="60-levels-below-the-object"),
]


@pytest.mark.parametrize(("value", "code", "reason", "message"), OVER_LIMITS)
@pytest.mark.parametrize("endpoint", ["validate", "mutate"])
def test_a_body_past_a_limit_is_denied_naming_the_limit(
    server: WebhookProcess, endpoint: str, value: bytes, code: int, reason: str, message: str
) -> None:
    review, body = review_bytes(value)
    assert len(body) <= MAX_BODY_BYTES
    reply = post(server, endpoint, body)
    assert reply.status_code == 200, reply.text
    response = reply.json()["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is False
    assert response["status"]["code"] == code and response["status"]["reason"] == reason
    assert response["status"]["message"] == message
    warnings = [line for line in server.log_lines() if line.get("uid") == review["request"]["uid"]]
    assert [line["message"] for line in warnings] == ["admission refused: request over limits"]
    assert warnings[0]["level"] == "warning" and warnings[0]["endpoint"] == endpoint
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("endpoint", ["validate", "mutate"])
def test_nesting_within_the_limit_gets_a_normal_answer(server: WebhookProcess, endpoint: str) -> None:
    review, body = review_bytes(b'{"a":' * 50 + b"1" + b"}" * 50)
    reply = post(server, endpoint, body)
    assert reply.status_code == 200
    response = reply.json()["response"]
    if endpoint == "validate":  # headroom takes no parameters: a normal refusal, with the path
        assert response["allowed"] is False and response["status"]["code"] == 422
        assert response["status"]["message"] == "spec.customAlgorithm.parameters.x: unknown parameter; allowed: none"
    else:
        assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    assert "Traceback" not in server.log()


def test_a_body_too_deep_to_read_even_its_envelope_gets_400_naming_the_limit(server: WebhookProcess) -> None:
    _review, body = review_bytes(b"[" * 5000 + b"]" * 5000)
    reply = post(server, "mutate", body)
    assert reply.status_code == 400
    assert reply.text == "bad request: the AdmissionReview is nested more than 64 levels deep (the limit)\n"
    assert "Traceback" not in server.log()


def test_the_limits_leave_room_for_the_largest_valid_policy(server: WebhookProcess) -> None:
    """256 rackConstraints and a selector of 64 labels and 32 expressions of 128 values (the CRD's
    maxItems and maxProperties) with managedFields, as an UPDATE: allowed."""
    racks = [{"rackId": f"rack-{i}", "maxPower": 5000 + i, "maxTemperature": 30} for i in range(256)]
    selector = {"matchLabels": {f"label-{i}": "x" for i in range(64)},
                "matchExpressions": [{"key": f"key-{i}", "operator": "In", "values": [f"v{j}" for j in range(128)]}
                                     for i in range(32)]}
    new = policy(rackConstraints=racks, selector=selector)
    fields = {f'k:{{"rackId":"rack-{i}"}}': {".": {}, "f:maxPower": {}, "f:maxTemperature": {}, "f:rackId": {}} for i in range(256)}
    new["metadata"]["managedFields"][0]["fieldsV1"] = {"f:spec": {"f:rackConstraints": fields, "f:powerCapLimit": {}}}
    review = admission_review("UPDATE", new, new)
    with server.endpoint.session() as session:
        response = server.endpoint.admit(session, "validate", review)
    assert response["allowed"] is True, response


def test_more_rack_constraints_than_the_crd_allows_are_refused_with_the_crd_limit(server: WebhookProcess) -> None:
    racks = [{"rackId": f"rack-{i}", "maxPower": 5000} for i in range(257)]
    with server.endpoint.session() as session:
        response = server.endpoint.admit(session, "validate", admission_review("CREATE", policy(rackConstraints=racks)))
    assert response["allowed"] is False
    assert "spec.rackConstraints: must have at most 256 items" in response["status"]["message"]


def test_a_body_over_3_mib_is_413_without_decoding(server: WebhookProcess) -> None:
    _review, body = review_bytes(b"[" + b",".join([b"0"] * 1_600_000) + b"]")
    assert len(body) > MAX_BODY_BYTES
    reply = post(server, "validate", body)
    assert reply.status_code == 413
    assert reply.text == f"request body is larger than {MAX_BODY_BYTES} bytes\n"


def test_limits_are_the_documented_ones() -> None:
    assert (REVIEW_LIMITS.max_depth, REVIEW_LIMITS.max_items, REVIEW_LIMITS.max_values) == (64, 1024, 20_000)
    text = (Path(__file__).resolve().parent.parent / "docs" / "webhook.md").read_text()
    assert "64 levels" in text and "1024 entries" in text and "20 000 values" in text
