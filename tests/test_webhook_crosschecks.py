"""Cross-policy checks through the webhook, with the other policies injected, over real TLS.

The app is served by werkzeug in a thread so that the tests choose what the webhook knows
about the cluster: a fixed set of policies, an API server that cannot be reached, a cache
that has not synced yet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from powercap.algorithms import AlgorithmRegistry
from webhook.app import create_app
from webhook.lookups import PolicyLookup, StaticPolicies, UnavailablePolicies, WatchedPolicies

from .webhook_helpers import WebhookEndpoint, admission_review, policy, serve_in_thread, webhook_certs  # noqa: F401

LLAMA = {"matchLabels": {"app": "llama"}}
RACK_1 = {"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 30}
CLUSTER = [
    policy("llama-prod", "inference", selector=LLAMA, rackConstraints=[RACK_1]),
    policy("batch-embed", "batch", selector=LLAMA, rackConstraints=[{**RACK_1, "maxPower": 4000}]),
    policy("broken-old", "inference", powerCapLimit=0, selector={}),  # invalid: governs nothing
]


@pytest.fixture(scope="module")
def registry() -> AlgorithmRegistry:
    return AlgorithmRegistry.default()


@pytest.fixture
def serve(webhook_certs: Path, registry: AlgorithmRegistry) -> Iterator[Any]:
    servers: list[Any] = []

    def start(lookup: PolicyLookup | None, **app_options: Any) -> WebhookEndpoint:
        context = serve_in_thread(create_app(registry=registry, policies=lookup, **app_options), webhook_certs)
        servers.append(context)
        return context.__enter__()

    yield start
    for context in servers:
        context.__exit__(None, None, None)


def test_a_second_policy_for_the_same_pods_is_refused_naming_the_first(serve: Any, registry: AlgorithmRegistry) -> None:
    endpoint = serve(StaticPolicies(CLUSTER, registry))
    response = endpoint.validate(admission_review("CREATE", policy("llama-canary", "inference", selector={
        "matchLabels": {"app": "llama"}, "matchExpressions": [{"key": "track", "operator": "In", "values": ["canary"]}]})))
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    assert response["status"]["message"] == (
        'spec.selector: may select the same pods as PowerCappingPolicy "llama-prod" in this namespace '
        "(e.g. a pod labelled app=llama, track=canary); a pod can follow one policy only"
    )


def test_policies_with_disjoint_selectors_or_namespaces_are_allowed(serve: Any, registry: AlgorithmRegistry) -> None:
    endpoint = serve(StaticPolicies(CLUSTER, registry))
    disjoint = policy("mistral", "inference", selector={"matchLabels": {"app": "mistral"}})
    elsewhere = policy("llama-dev", "dev", selector=LLAMA)
    for candidate in (disjoint, elsewhere):
        response = endpoint.validate(admission_review("CREATE", candidate))
        assert response["allowed"] is True and "warnings" not in response


def test_updating_a_policy_does_not_conflict_with_itself(serve: Any, registry: AlgorithmRegistry) -> None:
    endpoint = serve(StaticPolicies(CLUSTER, registry))
    stored = CLUSTER[0]
    changed = {**stored, "spec": {**stored["spec"], "powerCapLimit": 2000}}
    response = endpoint.validate(admission_review("UPDATE", changed, stored))
    assert response["allowed"] is True
    assert response["warnings"] == ["spec.rackConstraints[0]: batch/batch-embed limits rack-1 to 4000 W, 30 °C; the strictest applies"]


def test_an_old_overlap_does_not_block_other_edits(serve: Any, registry: AlgorithmRegistry) -> None:
    twin = policy("llama-twin", "inference", selector=LLAMA)  # overlapping since before the webhook existed
    endpoint = serve(StaticPolicies([*CLUSTER, twin], registry))
    edited = {**twin, "spec": {**twin["spec"], "powerCapLimit": 800}}
    response = endpoint.validate(admission_review("UPDATE", edited, twin))
    assert response["allowed"] is True
    assert response["warnings"] == ['spec.selector: already overlaps PowerCappingPolicy "llama-prod"; a pod can follow one policy only']


def test_the_same_rack_with_other_limits_is_a_warning_naming_the_other_policy(serve: Any, registry: AlgorithmRegistry) -> None:
    endpoint = serve(StaticPolicies(CLUSTER, registry))
    response = endpoint.validate(admission_review("CREATE", policy("qwen", "research", rackConstraints=[{**RACK_1, "maxTemperature": 27}])))
    assert response["allowed"] is True
    assert response["warnings"] == [
        "spec.rackConstraints[0]: batch/batch-embed and 1 more limits rack-1 to 4000 W, 30 °C; the strictest applies"
    ]


def test_an_unreachable_api_server_turns_the_checks_into_a_warning(serve: Any) -> None:
    endpoint = serve(UnavailablePolicies("the Kubernetes API is unreachable"))
    response = endpoint.validate(admission_review("CREATE", policy("llama-canary", "inference", selector=LLAMA)))
    assert response["allowed"] is True
    assert response["warnings"] == ["cross-policy checks skipped: the Kubernetes API is unreachable"]
    refused = endpoint.validate(admission_review("CREATE", policy(powerCapLimit=-1)))
    assert refused["allowed"] is False, "the policy's own checks still run"
    assert refused["status"]["message"] == "spec.powerCapLimit: must be greater than 0"


class FakeCache:
    """Stands in for powercap.kube.WatchCache: what it has listed, and whether it synced."""

    def __init__(self, documents: Iterable[Mapping[str, Any]], has_synced: bool) -> None:
        self.documents = list(documents)
        self.has_synced = has_synced
        self.connected = has_synced
        self.last_error = ""

    def items(self) -> list[Mapping[str, Any]]:
        return self.documents


class FakeClock:
    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_a_cache_that_has_not_synced_gives_a_warning_and_delays_readiness_for_a_while(serve: Any, registry: AlgorithmRegistry) -> None:
    cache, clock = FakeCache(CLUSTER, has_synced=False), FakeClock()
    lookup = WatchedPolicies(cache, registry, clock=clock, sync_grace_s=10)
    endpoint = serve(lookup, is_ready=lookup.ready)
    with endpoint.session() as session:
        assert session.get(f"{endpoint.base_url}/readyz").status_code == 503
        response = endpoint.validate(admission_review("CREATE", policy("llama-canary", "inference", selector=LLAMA)))
        assert response["allowed"] is True
        assert response["warnings"] == ["cross-policy checks skipped: the policy cache has not synced with the Kubernetes API"]
        clock.now_s += 10
        assert session.get(f"{endpoint.base_url}/readyz").status_code == 200, "an API outage must not keep the webhook unready"
        cache.has_synced = cache.connected = True
        response = endpoint.validate(admission_review("CREATE", policy("llama-canary", "inference", selector=LLAMA)))
        assert response["allowed"] is False and "llama-prod" in response["status"]["message"]


def test_a_watched_policy_is_parsed_once_per_resource_version(registry: AlgorithmRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = [{**doc, "metadata": {**doc["metadata"], "resourceVersion": "7"}} for doc in CLUSTER]
    cache = FakeCache(stored, has_synced=True)
    lookup = WatchedPolicies(cache, registry)
    calls: list[str] = []
    import webhook.lookups as lookups

    real = lookups.typed_policy
    def counting(document: dict[str, Any], registry: AlgorithmRegistry) -> Any:
        calls.append(document["metadata"]["name"])
        return real(document, registry)

    monkeypatch.setattr(lookups, "typed_policy", counting)
    assert [p.key for p in lookup.policies()] == ["inference/llama-prod", "batch/batch-embed"]
    assert [p.key for p in lookup.policies()] == ["inference/llama-prod", "batch/batch-embed"]
    assert len(calls) == 3
    cache.documents[0] = {**stored[0], "metadata": {**stored[0]["metadata"], "resourceVersion": "8"}}
    lookup.policies()
    assert calls[3:] == ["llama-prod"]


def test_admission_log_line_carries_the_injected_clock_duration(webhook_certs: Path, registry: AlgorithmRegistry, caplog: pytest.LogCaptureFixture) -> None:
    ticks = iter([10.0, 10.0042])
    app = create_app(registry=registry, clock=lambda: next(ticks), logger=logging.getLogger("test.admission"))
    with serve_in_thread(app, webhook_certs) as endpoint, caplog.at_level(logging.INFO, "test.admission"):
        review = admission_review("DELETE", None, policy())
        endpoint.validate(review)
    [record] = [r for r in caplog.records if r.name == "test.admission"]
    assert getattr(record, "fields") == {
        "endpoint": "validate", "uid": review["request"]["uid"], "kind": "PowerCappingPolicy", "name": "llama-70b-chat",
        "namespace": "inference", "operation": "DELETE", "dry_run": False, "user": "kubernetes-admin",
        "allowed": True, "patched": False, "warnings": 0, "duration_ms": 4.2,
    }


def test_a_bug_of_ours_is_a_500_without_traceback_and_is_logged(webhook_certs: Path, registry: AlgorithmRegistry, caplog: pytest.LogCaptureFixture) -> None:
    class Exploding:
        def policies(self) -> Any:
            raise RuntimeError("boom")

        def ready(self) -> bool:
            return True

    app = create_app(registry=registry, policies=Exploding(), logger=logging.getLogger("test.bug"))
    with serve_in_thread(app, webhook_certs) as endpoint, endpoint.session() as session:
        reply = endpoint.post(session, "validate", admission_review("CREATE", policy()))
    assert (reply.status_code, reply.text) == (500, "internal error\n")
    assert any(r.name == "test.bug" and r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


def test_a_cache_that_lost_the_api_server_gives_a_warning_not_stale_verdicts(serve: Any, registry: AlgorithmRegistry) -> None:
    """After an outage starts, the cached copy may be stale: the checks become a warning."""
    cache = FakeCache(CLUSTER, has_synced=True)
    lookup = WatchedPolicies(cache, registry)
    endpoint = serve(lookup, is_ready=lookup.ready)
    with endpoint.session():
        refused = endpoint.validate(admission_review("CREATE", policy("llama-canary", "inference", selector=LLAMA)))
        assert refused["allowed"] is False
        cache.connected, cache.last_error = False, "connection refused"
        allowed = endpoint.validate(admission_review("CREATE", policy("llama-canary", "inference", selector=LLAMA)))
        assert allowed["allowed"] is True
        assert allowed["warnings"] == ["cross-policy checks skipped: the Kubernetes API cannot be reached (connection refused)"]
