"""The fake API server keeps the real server's semantics that our code relies on."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.fakes.apiserver import FakeApiServer

from powercap import kube
from powercap.kube import ApiError, KubeClient

NS = "ml"


@pytest.fixture
def client(apiserver: FakeApiServer) -> Iterator[KubeClient]:
    with KubeClient.for_server(apiserver.url) as c:
        yield c


def policy(cap_w: int = 4000, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "powercapping.example.com/v1alpha1",
        "kind": "PowerCappingPolicy",
        "metadata": {"name": "llama", "namespace": NS},
        "spec": {"powerCapLimit": cap_w},
        **extra,
    }


def test_create_sets_server_fields_and_drops_a_custom_resources_status(client: KubeClient) -> None:
    created = client.create(kube.policy_path(NS), policy(status={"budgetW": 1}))
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    assert "status" not in created
    named = client.create(kube.pod_path(NS), {"metadata": {"generateName": "vllm-"}, "spec": {}})
    assert named["metadata"]["name"].startswith("vllm-") and len(named["metadata"]["name"]) == 10


def test_status_subresource_splits_spec_and_status_writes(client: KubeClient, apiserver: FakeApiServer) -> None:
    path = kube.policy_path(NS, "llama")
    apiserver.put_object("powercappingpolicies", policy(status={"budgetW": 1}))

    main = client.replace(path, {**client.get(path), "spec": {"powerCapLimit": 3000}, "status": {"budgetW": 2}})
    assert main["spec"]["powerCapLimit"] == 3000 and main["status"] == {"budgetW": 1}
    assert main["metadata"]["generation"] == 2

    status = client.replace(kube.status_path(path), {**main, "spec": {"powerCapLimit": 1}, "status": {"budgetW": 3}})
    assert status["spec"]["powerCapLimit"] == 3000 and status["status"] == {"budgetW": 3}
    assert status["metadata"]["generation"] == 2

    patched = client.patch(kube.status_path(path), {"status": {"powerW": 2500}})
    assert patched["status"] == {"budgetW": 3, "powerW": 2500}

    same = client.replace(path, patched)  # nothing changed: no new resourceVersion
    assert kube.resource_version(same) == kube.resource_version(patched)


def test_delete_answers_like_the_real_server(client: KubeClient, apiserver: FakeApiServer) -> None:
    apiserver.put_object("pods", {"metadata": {"name": "p", "namespace": NS}})
    apiserver.put_object("leases", {"metadata": {"name": "l", "namespace": NS}, "spec": {}})
    assert client.request("DELETE", kube.pod_path(NS, "p"))["kind"] == "Pod"
    status = client.request("DELETE", kube.lease_path(NS, "l"))
    assert (status["kind"], status["status"], status["details"]["group"]) == ("Status", "Success", "coordination.k8s.io")


@pytest.mark.parametrize(
    ("path", "params", "code", "message"),
    [
        pytest.param(kube.pod_path(), {"fieldSelector": "spec.priority=1"}, 400,
                     "field label not supported: spec.priority", id="unsupported-field-label"),
        pytest.param(kube.pod_path(), {"labelSelector": "a in b"}, 400,
                     'unable to parse requirement: "a in b"', id="bad-label-selector"),
        pytest.param("/apis/example.com/v1/widgets", None, 404,
                     "the server could not find the requested resource", id="unknown-resource"),
    ],
)
def test_bad_requests_are_refused(
    client: KubeClient, path: str, params: dict[str, str] | None, code: int, message: str
) -> None:
    with pytest.raises(ApiError) as caught:
        client.list(path, params)
    assert (caught.value.code, caught.value.message) == (code, message)


def test_malformed_events_are_invalid(client: KubeClient) -> None:
    with pytest.raises(ApiError) as caught:
        client.create(kube.event_path(NS), {"metadata": {"name": "e"}, "type": "Info", "regarding": {"name": "x"}})
    assert caught.value.code == 422 and caught.value.reason == "Invalid"
    fields = {cause["field"] for cause in caught.value.details["causes"]}
    assert fields == {"eventTime", "reportingController", "reportingInstance", "action", "reason", "type",
                      "metadata.namespace"}


def test_watch_wire_format_is_chunked_json_lines(apiserver: FakeApiServer) -> None:
    apiserver.put_object("nodes", {"metadata": {"name": "n1"}})
    conn = http.client.HTTPConnection(apiserver.url.removeprefix("http://"))
    conn.request("GET", "/api/v1/nodes?watch=1&resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=1")
    response = conn.getresponse()
    assert response.getheader("Transfer-Encoding") == "chunked"
    lines = response.read().decode().splitlines()
    events = [json.loads(line) for line in lines]
    # the replay ends with a bookmark; none before a timeout of 2 s or less (kube-apiserver v1.37)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert lines[0].startswith('{"type":"ADDED","object":{"apiVersion":"v1","kind":"Node",')
    assert events[1]["object"] == {"kind": "Node", "apiVersion": "v1", "metadata": {
        "resourceVersion": str(apiserver.resource_version), "annotations": {"k8s.io/initial-events-end": "true"}}}
    conn.close()


def test_a_watch_gets_a_bookmark_2_s_before_its_timeout(apiserver: FakeApiServer, client: KubeClient) -> None:
    apiserver.put_object("nodes", {"metadata": {"name": "n1"}})
    rv = str(apiserver.resource_version)
    started = time.monotonic()
    with client.watch(kube.node_path(), rv, timeout_s=3) as stream:
        events = [(kind, obj, time.monotonic() - started) for kind, obj in stream]
    ended_s = time.monotonic() - started
    assert [(kind, obj) for kind, obj, _ in events] == [
        ("BOOKMARK", {"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": rv}})]
    assert 0.9 <= events[0][2] < 1.5 and 2.9 <= ended_s < 3.5, (events[0][2], ended_s)
