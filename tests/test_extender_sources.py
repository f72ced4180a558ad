"""Where the view comes from: state files (load, reload, bad files) and watch caches on an API server."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from extender.app import create_app
from powercap.runtime.sources import NotReady, StateFileError, StateFileSource, cluster_source, load_state
from powercap import kube
from powercap.algorithms import AlgorithmRegistry
from powercap.cluster import ClusterSettings
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.objects import NOW, extender_args, gpu_node, gpu_pod, kubectl_list, policy, telemetry

RACK_LIMIT = [{"rackId": "rack-1", "maxPower": 5000}]
POD = gpu_pod("llama-0", gpus=1, power_watts="700")


class FakeClock:
    def __init__(self, start: datetime = NOW) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def write_state(path: Path, rack_power_w: float, *, fmt: str = "yaml") -> None:
    state = kubectl_list(
        [gpu_node("gpu-1", "rack-1", telemetry(rack_power_w))],
        [gpu_pod("llama-old", gpus=1, node="gpu-1", bound_at=NOW - timedelta(minutes=3))],
        [policy("llama", cap_w=8000, racks=RACK_LIMIT)],
        others=[{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "vllm", "namespace": "inference"}}],
    )
    text = yaml.dump(state, Dumper=yaml.CSafeDumper) if fmt == "yaml" else json.dumps(state, indent=4)
    path.write_text(text)
    stamp = time.time() + rack_power_w  # a distinct mtime even within one clock tick
    os.utime(path, (stamp, stamp))


def source_on(path: Path, clock: FakeClock) -> StateFileSource:
    return StateFileSource(str(path), ClusterSettings(), AlgorithmRegistry.default(discover=lambda: []), clock=clock)


def passes(source: Any) -> list[str]:
    client = create_app(source, AlgorithmRegistry.default(discover=lambda: [])).test_client()
    response = client.post("/filter", data=extender_args(POD, [gpu_node("gpu-1", "rack-1")], node_cache_capable=True))
    return response.get_json()["NodeNames"]


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_a_kubectl_list_loads_nodes_pods_and_policies_and_ignores_other_kinds(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"state.{fmt}"
    write_state(path, 1000, fmt=fmt)
    nodes, pods, policies = load_state(path.read_text())
    assert [len(nodes), len(pods), len(policies)] == [1, 1, 1]
    view = source_on(path, FakeClock()).current()
    assert view.now == NOW  # the snapshot's newest telemetry
    assert view.policies["inference/llama"].bound_gpus == 1
    assert view.racks["rack-1"].limits.max_power_w == 5000


def test_the_view_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    write_state(path, 4300)
    clock = FakeClock()
    source = source_on(path, clock)
    assert passes(source) == ["gpu-1"]  # 4300 + 700 = 5000: at the limit
    write_state(path, 4301)
    assert passes(source) == ["gpu-1"]  # checked at most once a second
    clock.advance(1)
    assert passes(source) == []


def test_a_bad_file_on_reload_keeps_the_last_good_view_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.yaml"
    write_state(path, 1000)
    clock = FakeClock()
    source = source_on(path, clock)
    path.write_text("items: [unclosed\n")
    clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="powercap.runtime.sources"):
        assert passes(source) == ["gpu-1"]
    assert f"state file {path} could not be reloaded, keeping the last good view: invalid YAML at line 2" in caplog.text
    path.write_text("kind: List\nitems: [{kind: Pod, metadata: {name: p}, spec: {containers: [{resources: [1]}]}}]\n")
    clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="powercap.runtime.sources"):
        assert passes(source) == ["gpu-1"]  # well-formed YAML, malformed objects: the same
    assert "keeping the last good view: item 1 (Pod p): spec.containers[0].resources: must be an object, not a list" in caplog.text
    write_state(path, 4800)
    clock.advance(5)
    assert passes(source) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "no such file", id="missing"),
        pytest.param("kind: List\nitems: [\n", "invalid YAML at line 3, column 1: ", id="not-yaml"),
        pytest.param("", "no objects found (expected the output of kubectl get nodes,pcn,pods,pcp -A -o yaml)", id="empty"),
        pytest.param("kind: List\nitems: [42]\n", "item 1 is not a Kubernetes object (no kind)", id="not-objects"),
        pytest.param("kind: List\nitems: [{kind: Node, metadata: {}}]\n", "item 1 (Node) has no metadata.name", id="nameless"),
        pytest.param("kind: List\nitems: 5\n", "a List whose items is an integer, not a list", id="items-not-a-list"),
        pytest.param("kind: List\nitems: [{kind: Node, metadata: {name: gpu-1}, status: x}]\n",
                     "item 1 (Node gpu-1): status: must be an object, not a string", id="node-status-not-an-object"),
        pytest.param("kind: List\nitems: [{kind: Pod, metadata: {name: p, annotations: [1]}}]\n",
                     "item 1 (Pod p): metadata.annotations: must be an object, not a list", id="pod-annotations-not-a-map"),
    ],
)
def test_a_bad_file_at_start_is_a_clear_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "state.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StateFileError) as caught:
        source_on(path, FakeClock())
    assert str(caught.value).startswith(f"{path}: {message}")


# -- in a cluster: watch caches on the (fake) API server


def test_ready_once_the_caches_sync_and_decisions_follow_watch_events(apiserver: FakeApiServer) -> None:
    apiserver.put_object("powercappingpolicies", policy("llama", cap_w=8000, racks=RACK_LIMIT))
    apiserver.put_object("nodes", gpu_node("gpu-1", "rack-1", telemetry(1000)))
    apiserver.put_object("pods", gpu_pod("pending", gpus=1))  # not bound: not watched
    apiserver.put_object("pods", gpu_pod("old", gpus=1, node="gpu-1", bound_at=NOW - timedelta(minutes=5)))
    clock = FakeClock()
    client = kube.KubeClient.for_server(apiserver.url)
    source = cluster_source(client, ClusterSettings(), AlgorithmRegistry.default(discover=lambda: []), clock=clock)
    app = create_app(source, AlgorithmRegistry.default(discover=lambda: [])).test_client()
    with pytest.raises(NotReady):
        source.current()
    assert app.get("/readyz").status_code == 503
    source.start()
    try:
        deadline = time.monotonic() + 10
        while source.readiness() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.get("/readyz").status_code == 200
        view = source.current()
        assert view.policies["inference/llama"].pods == ("inference/old",)
        assert passes(source) == ["gpu-1"]

        # the node agent publishes a fuller rack: the next decision sees it
        apiserver.put_object("nodes", gpu_node("gpu-1", "rack-1", telemetry(4800)))
        wait_for(lambda: source.current().racks["rack-1"].measured_power_w == 4800)
        assert passes(source) == []

        # a burst: a pod bound after that telemetry counts before the agent reports it
        apiserver.put_object("nodes", gpu_node("gpu-1", "rack-1", telemetry(3000)))
        apiserver.put_object("pods", gpu_pod("new", gpus=1, power_watts="700", node="gpu-1", bound_at=NOW + timedelta(seconds=1)))
        wait_for(lambda: source.current().racks["rack-1"].assumed_power_w == 700)
        assert source.current().racks["rack-1"].power_w == 3700
        assert passes(source) == ["gpu-1"]
        assert source.current() is source.current()  # nothing moved: no rebuild
    finally:
        source.stop()
        client.close()


def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
