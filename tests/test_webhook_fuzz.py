"""Hypothesis fuzz of both endpoints over real TLS: whatever a client sends, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_validator_fuzz import JSON_VALUES, policy_like
from .webhook_helpers import WebhookProcess, admission_review, webhook_certs, webhook_process  # noqa: F401

REQUEST_FIELDS = st.sampled_from([
    "uid", "kind", "resource", "subResource", "requestKind", "requestResource", "name", "namespace",
    "operation", "userInfo", "object", "oldObject", "dryRun", "options",
])


def reviews() -> st.SearchStrategy[Any]:
    """AdmissionReviews with random objects and, now and then, random or missing request fields."""
    base = st.builds(
        lambda operation, obj, old, dry_run: admission_review(operation, obj, old, dry_run=dry_run),
        st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT"]),
        policy_like() | JSON_VALUES,
        st.none() | policy_like(),
        st.booleans(),
    )
    changes = st.dictionaries(REQUEST_FIELDS, JSON_VALUES, max_size=2)
    removals = st.lists(REQUEST_FIELDS, max_size=2)

    def mutate(review: dict[str, Any], changed: dict[str, Any], removed: list[str]) -> dict[str, Any]:
        review["request"].update(changed)
        for key in removed:
            review["request"].pop(key, None)
        return review

    return st.builds(mutate, base, changes, removals)


BODIES = reviews() | JSON_VALUES | st.fixed_dictionaries({
    "apiVersion": st.just("admission.k8s.io/v1") | JSON_VALUES,
    "kind": st.just("AdmissionReview") | JSON_VALUES,
    "request": JSON_VALUES,
})


@pytest.fixture(scope="module")
def session(webhook_process: WebhookProcess) -> Iterator[requests.Session]:
    with webhook_process.endpoint.session() as session:
        yield session


@pytest.mark.parametrize("endpoint", ["validate", "mutate"])
def test_random_json_never_gives_a_server_error(webhook_process: WebhookProcess, session: requests.Session, endpoint: str) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=BODIES)
    def check(body: Any) -> None:
        reply = webhook_process.endpoint.post(session, endpoint, None, raw=json.dumps(body).encode())
        assert reply.status_code in (200, 400), reply.text
        if reply.status_code == 200:
            answer = reply.json()
            assert answer["response"]["uid"] == body["request"]["uid"]
            assert isinstance(answer["response"]["allowed"], bool)
            assert all(len(w) <= 120 for w in answer["response"].get("warnings", []))
        else:
            assert reply.text.startswith("bad request: ") and len(reply.text) < 200

    check()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=300))
def test_random_bytes_never_give_a_server_error(webhook_process: WebhookProcess, body: bytes) -> None:
    with webhook_process.endpoint.session() as session:
        for endpoint in ("validate", "mutate"):
            assert webhook_process.endpoint.post(session, endpoint, None, raw=body).status_code in (200, 400)
