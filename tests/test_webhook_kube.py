"""Cross-policy checks read from the Kubernetes API (powercap.kube.WatchCache) against the
fake API server (tests/fakes/apiserver.py), over real sockets: in-process and in the
production server (``powercap webhook`` with a kubeconfig)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.fakes.apiserver import FakeApiServer

from powercap import kube
from powercap.algorithms import AlgorithmRegistry
from webhook.app import create_app
from webhook.lookups import WatchedPolicies

from .conftest import REPO_ROOT
from .test_kube import wait_until
from .webhook_helpers import (  # noqa: F401  (fixtures)
    WebhookProcess,
    admission_review,
    policy,
    serve_in_thread,
    webhook_certs,
    write_kubeconfig,
)

LLAMA = {"matchLabels": {"app": "llama"}}
POLICIES = "powercappingpolicies"


def stored(document: dict[str, Any]) -> dict[str, Any]:
    """The document as a user would have applied it (the API server sets uid and the like)."""
    return {**document, "metadata": {k: document["metadata"][k] for k in ("name", "namespace")}}


@pytest.fixture
def watched(apiserver: FakeApiServer, registry: AlgorithmRegistry) -> Iterator[tuple[kube.WatchCache, WatchedPolicies]]:
    client = kube.KubeClient.for_server(apiserver.url, read_timeout_s=5.0)
    cache = kube.WatchCache(client, kube.policy_path(), backoff_initial_s=0.02, backoff_max_s=0.1)
    cache.start()
    yield cache, WatchedPolicies(cache, registry)
    cache.stop()
    client.close()


def test_checks_follow_the_policies_in_the_cluster(
    apiserver: FakeApiServer, watched: tuple[kube.WatchCache, WatchedPolicies], webhook_certs: Path, registry: AlgorithmRegistry
) -> None:
    cache, lookup = watched
    apiserver.put_object(POLICIES, stored(policy("llama-prod", "inference", selector=LLAMA)))
    assert cache.wait_synced(5)
    candidate = admission_review("CREATE", policy("llama-canary", "inference", selector=LLAMA))
    with serve_in_thread(create_app(registry=registry, policies=lookup), webhook_certs) as endpoint:
        refused = endpoint.validate(candidate)
        assert refused["allowed"] is False and '"llama-prod"' in refused["status"]["message"]

        apiserver.delete_object(POLICIES, "llama-prod", "inference")
        assert wait_until(lambda: not cache.items())
        assert endpoint.validate(candidate) == {"uid": candidate["request"]["uid"], "allowed": True}

        apiserver.put_object(POLICIES, stored(policy("embed", "batch", rackConstraints=[{"rackId": "rack-1", "maxPower": 4000}])))
        assert wait_until(lambda: len(cache.items()) == 1)
        warned = endpoint.validate(admission_review("CREATE", policy("qwen", "research", rackConstraints=[{"rackId": "rack-1", "maxPower": 5000}])))
        assert warned["warnings"] == ["spec.rackConstraints[0]: batch/embed limits rack-1 to 4000 W; the strictest applies"]


def test_an_unreachable_api_server_gives_a_prompt_warning_not_a_refusal(webhook_certs: Path, registry: AlgorithmRegistry) -> None:
    with FakeApiServer() as gone:
        url = gone.url  # a port that nobody listens on once the server stops
    client = kube.KubeClient.for_server(url, connect_timeout_s=0.5, read_timeout_s=0.5)
    cache = kube.WatchCache(client, kube.policy_path(), backoff_initial_s=0.05, backoff_max_s=0.2)
    cache.start()
    try:
        app = create_app(registry=registry, policies=WatchedPolicies(cache, registry))
        with serve_in_thread(app, webhook_certs) as endpoint:
            started_s = time.monotonic()
            response = endpoint.validate(admission_review("CREATE", policy("llama-canary", "inference", selector=LLAMA)))
            assert time.monotonic() - started_s < 1.0, "an admission never waits on the API server"
        assert response["allowed"] is True
        assert response["warnings"] == ["cross-policy checks skipped: the policy cache has not synced with the Kubernetes API"]
    finally:
        cache.stop()
        client.close()


def test_the_production_server_watches_policies_from_each_worker(apiserver: FakeApiServer, webhook_certs: Path, tmp_path: Path) -> None:
    apiserver.put_object(POLICIES, stored(policy("llama-prod", "inference", selector=LLAMA)))
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url)
    server = WebhookProcess(webhook_certs, tmp_path / "webhook.log", cross_policy_checks=True,
                            env={"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""})
    try:
        assert wait_until(lambda: apiserver.active_watches >= 2), "one watch per gunicorn worker"
        for _ in range(4):  # fresh connections, so that both workers answer
            response = server.endpoint.validate(admission_review("CREATE", policy("llama-canary", "inference", selector=LLAMA)))
            assert response["allowed"] is False and '"llama-prod"' in response["status"]["message"]
        assert len(apiserver.requests_to("GET", kube.policy_path(), watch=False)) >= 2, "one list per worker"
        assert {(r.method, r.path) for r in apiserver.requests} == {("GET", kube.policy_path())}, "it only lists and watches policies"
    finally:
        server.stop()


def test_without_a_kubernetes_configuration_the_server_refuses_to_start(webhook_certs: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    result = subprocess.run(
        [sys.executable, "-m", "powercap", "webhook", "--cert-dir", str(webhook_certs), "--bind", "127.0.0.1:0"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=30, env={**env, "HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: no in-cluster config and no usable kubeconfig")
    assert result.stderr.rstrip().endswith("run in a pod, set KUBECONFIG, or pass --no-cross-policy-checks")
