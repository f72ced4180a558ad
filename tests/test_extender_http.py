"""The extender over HTTP, with the bodies kube-scheduler sends in both nodeCacheCapable modes."""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient

from extender.app import create_app
from powercap.runtime.sources import NotReady, StateFileSource
from powercap.algorithms import AlgorithmRegistry
from powercap.cluster import ClusterSettings, ClusterView
from tests.fakes.objects import NOW, extender_args, gpu_node, gpu_pod, kubectl_list, policy, telemetry

FULL = gpu_node("gpu-full", "rack-1", telemetry(4800, inlet_c=24))
HOT = gpu_node("gpu-hot", "rack-2", telemetry(1000, inlet_c=29.5))
ROOMY = gpu_node("gpu-roomy", "rack-3", telemetry(1000, inlet_c=22))
LOOSE = gpu_node("gpu-loose", None, telemetry(2800, inlet_c=23))
NODES = [FULL, HOT, ROOMY, LOOSE]
RACKS = [
    {"rackId": "rack-1", "maxPower": 5000},
    {"rackId": "rack-2", "maxPower": 8000, "maxTemperature": 28},
    {"rackId": "rack-3", "maxPower": 8000, "maxTemperature": 28},
]
LLAMA_POD = gpu_pod("llama-7", gpus=1, power_watts="700")
FAILED = {
    "gpu-full": "rack-1: 4800 W in use + 700 W for this pod > maxPower 5000 W (set by policy inference/llama)",
    "gpu-hot": "rack-2: inlet 29.5 °C >= maxTemperature 28 °C (set by policy inference/llama)",
}


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.dump(kubectl_list(NODES, [], [policy("llama", cap_w=8000, racks=RACKS)]), allow_unicode=True, Dumper=yaml.CSafeDumper))
    return path


@pytest.fixture
def client(state_file: Path) -> FlaskClient:
    registry = AlgorithmRegistry.default(discover=lambda: [])
    source = StateFileSource(str(state_file), ClusterSettings(), registry)
    return create_app(source, registry).test_client()


def post(client: FlaskClient, verb: str, body: bytes) -> Any:
    return client.post(f"/{verb}", data=body, headers={"Content-Type": "application/json"})


def test_filter_with_node_names_answers_with_node_names(client: FlaskClient) -> None:
    response = post(client, "filter", extender_args(LLAMA_POD, NODES, node_cache_capable=True))
    assert response.status_code == 200 and response.mimetype == "application/json"
    # kube-scheduler reads NodeNames (null would mean "no node passes") and the failure maps
    assert response.get_data(as_text=True) == json.dumps({
        "Nodes": None,
        "NodeNames": ["gpu-roomy", "gpu-loose"],
        "FailedNodes": FAILED,
        "FailedAndUnresolvableNodes": {},
        "Error": "",
    }, separators=(",", ":"), ensure_ascii=False)


def test_filter_with_full_nodes_answers_with_the_same_node_objects(client: FlaskClient) -> None:
    body = extender_args(LLAMA_POD, NODES, node_cache_capable=False)
    response = post(client, "filter", body)
    assert response.status_code == 200
    result = response.get_json()
    assert result["NodeNames"] is None and result["Error"] == ""
    assert result["FailedNodes"] == FAILED
    # kube-scheduler uses these objects as the filtered nodes: they must be the ones it sent
    assert result["Nodes"] == {"metadata": {}, "items": [ROOMY, LOOSE]}
    sent = json.dumps(ROOMY, separators=(",", ":"), ensure_ascii=False).encode()
    assert sent in response.get_data()


@pytest.mark.parametrize("cache_capable", [True, False], ids=["NodeNames", "Nodes"])
def test_prioritize_answers_a_host_priority_list(client: FlaskClient, cache_capable: bool) -> None:
    response = post(client, "prioritize", extender_args(LLAMA_POD, [ROOMY, LOOSE], node_cache_capable=cache_capable))
    assert response.status_code == 200
    # roomy: min((8000-1000-700)/8000, (28-22)/(28-18)) = 0.6 -> 6; loose: (5600-2800-700)/5600 = 0.375 -> 4
    assert response.get_json() == [{"Host": "gpu-roomy", "Score": 6}, {"Host": "gpu-loose", "Score": 4}]


@pytest.mark.parametrize("cache_capable", [True, False], ids=["NodeNames", "Nodes"])
@pytest.mark.parametrize(
    "pod",
    [
        pytest.param(gpu_pod("web", gpus=0, labels={"app.kubernetes.io/name": "llama"}), id="no-gpu"),
        pytest.param(gpu_pod("other", gpus=4, labels={"app": "other"}), id="no-policy"),
    ],
)
def test_unrelated_pods_pass_every_node_untouched(client: FlaskClient, pod: dict[str, Any], cache_capable: bool) -> None:
    filtered = post(client, "filter", extender_args(pod, NODES, node_cache_capable=cache_capable)).get_json()
    passed = filtered["NodeNames"] if cache_capable else [n["metadata"]["name"] for n in filtered["Nodes"]["items"]]
    assert passed == [n["metadata"]["name"] for n in NODES]
    assert filtered["FailedNodes"] == {} and filtered["FailedAndUnresolvableNodes"] == {}
    scores = post(client, "prioritize", extender_args(pod, NODES, node_cache_capable=cache_capable)).get_json()
    assert {s["Score"] for s in scores} == {0}


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "400 watts", "0.4kW", ""])
def test_an_unusable_power_annotation_falls_back_and_is_logged_once_per_pod(
    client: FlaskClient, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    typo = gpu_pod("llama-8", gpus=1, power_watts=value)
    plain = gpu_pod("llama-9", gpus=1)
    with caplog.at_level(logging.WARNING, logger="extender.app"):
        for _ in range(3):  # kube-scheduler retries a pending pod
            for verb in ("filter", "prioritize"):
                for cache_capable in (True, False):
                    answer = post(client, verb, extender_args(typo, NODES, node_cache_capable=cache_capable)).get_json()
                    fallback = post(client, verb, extender_args(plain, NODES, node_cache_capable=cache_capable)).get_json()
                    assert answer == fallback  # exactly as without the annotation
    (record,) = [r for r in caplog.records if "power-watts" in r.getMessage()]
    assert record.getMessage() == (
        f"pod inference/llama-8: annotation powercapping.example.com/power-watts: {json.dumps(value)} is not a "
        "positive number of watts (such as \"400\" or \"400W\"); its power is estimated as GPUs x the per-GPU "
        "share of its policy's powerCapLimit instead"
    )
    assert (record.pod, record.value, record.policy) == ("inference/llama-8", value, "inference/llama")  # type: ignore[attr-defined]


def test_a_usable_power_annotation_is_used_without_a_warning(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="extender.app"):
        result = post(client, "filter", extender_args(gpu_pod("llama-8", power_watts="700W"), NODES, node_cache_capable=True))
    assert result.get_json()["FailedNodes"] == FAILED  # 700 W, as LLAMA_POD's "700"
    assert not caplog.records


def test_an_infeasible_policy_is_unresolvable_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(kubectl_list(NODES, [], [policy("llama", cap_w=300)])))
    registry = AlgorithmRegistry.default(discover=lambda: [])
    client = create_app(StateFileSource(str(path), ClusterSettings(), registry), registry).test_client()
    result = post(client, "filter", extender_args(gpu_pod("llama-0", gpus=2), NODES, node_cache_capable=True)).get_json()
    assert result["NodeNames"] == []
    assert set(result["FailedAndUnresolvableNodes"]) == {n["metadata"]["name"] for n in NODES}
    assert result["FailedAndUnresolvableNodes"]["gpu-full"] == (
        "policy inference/llama cannot power another GPU: (0 GPUs in use + 2 for this pod) x 200 W minimum limit "
        "= 400 W > its budget 300 W (the whole powerCapLimit)"  # 2 x 200 W; the default margin is 0
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"", "request body is not JSON: Input data was truncated", id="empty"),
        pytest.param(b"{not json", "request body is not JSON", id="not-json"),
        pytest.param(b"[]", "not an ExtenderArgs object: Expected `object`, got `array`", id="array"),
        pytest.param(b'{"Pod": {}, "NodeNames": "gpu-1"}', "not an ExtenderArgs object: Expected `array`, got `str` - at `$.NodeNames`",
                     id="node-names-not-a-list"),
        pytest.param(b'{"NodeNames": ["gpu-1"]}', "Pod is required", id="no-pod"),
        pytest.param(b'{"Pod": {}, "Nodes": null, "NodeNames": null}', "one of NodeNames or Nodes is required", id="no-nodes"),
        pytest.param(b'{"Pod": {}, "Nodes": {"items": [{"metadata": {}}]}}',
                     "Nodes.items[0]: Object missing required field `name` - at `metadata`", id="node-without-name"),
        pytest.param(b'{"Pod": {"spec": {"containers": "x"}}, "NodeNames": []}', "Pod.spec.containers: must be a list, not a string",
                     id="containers-not-a-list"),
        pytest.param(b'{"Pod": {"metadata": 5}, "NodeNames": ["gpu-1"]}', "Pod.metadata: must be an object, not an integer",
                     id="metadata-not-an-object"),
        pytest.param(b'{"Pod": {"spec": "x"}, "NodeNames": ["gpu-1"]}', "Pod.spec: must be an object, not a string", id="spec-not-an-object"),
        pytest.param(b'{"Pod": {"spec": {"containers": [{"resources": [1]}]}}, "NodeNames": ["gpu-1"]}',
                     "Pod.spec.containers[0].resources: must be an object, not a list", id="resources-not-an-object"),
        pytest.param(b'{"Pod": {"metadata": {"annotations": {"powercapping.example.com/power-watts": 300}}}, "NodeNames": ["gpu-1"]}',
                     "Pod.metadata.annotations[powercapping.example.com/power-watts]: must be a string, not an integer",
                     id="annotation-not-a-string"),
        # a namespace that is a list or an object was a TypeError (unhashable) and a 500
        pytest.param(b'{"Pod": {"metadata": {"name": "p", "namespace": ["x"]}}, "NodeNames": ["gpu-1"]}',
                     "Pod.metadata.namespace: must be a string, not a list", id="namespace-not-a-string"),
        pytest.param(b'{"Pod": {"metadata": {"name": {"a": 1}}}, "NodeNames": ["gpu-1"]}',
                     "Pod.metadata.name: must be a string, not an object", id="name-not-a-string"),
    ],
)
@pytest.mark.parametrize("verb", ["filter", "prioritize"])
def test_malformed_requests_get_400_with_a_message_never_a_traceback(client: FlaskClient, verb: str, body: bytes, message: str | None) -> None:
    response = post(client, verb, body)
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    if message is None:
        assert response.status_code == 200
        return
    assert response.status_code == 400
    assert response.get_json()["Error"].startswith(message)


def test_wrong_method_unknown_path_and_oversized_body_are_json_errors(state_file: Path) -> None:
    registry = AlgorithmRegistry.default(discover=lambda: [])
    client = create_app(StateFileSource(str(state_file), ClusterSettings(), registry), registry, max_body_bytes=1000).test_client()
    assert client.get("/filter").status_code == 405
    assert client.post("/bind", data=b"{}").status_code == 404
    too_big = post(client, "filter", extender_args(LLAMA_POD, NODES, node_cache_capable=False))
    assert too_big.status_code == 413
    assert too_big.get_json()["Error"].startswith("413 Request Entity Too Large")


class BrokenSource:
    def current(self) -> ClusterView:
        raise RuntimeError("view exploded")

    def readiness(self) -> str | None:
        return None

    def start(self) -> None: ...

    def stop(self) -> None: ...


def test_our_own_bug_is_a_500_with_one_line_and_a_logged_traceback(caplog: pytest.LogCaptureFixture) -> None:
    client = create_app(BrokenSource(), AlgorithmRegistry.default(discover=lambda: [])).test_client()
    with caplog.at_level(logging.ERROR):
        response = post(client, "filter", extender_args(LLAMA_POD, NODES, node_cache_capable=True))
    assert response.status_code == 500
    assert response.get_json() == {"Error": "internal error in the powercap extender: RuntimeError: view exploded"}
    assert "Traceback" in caplog.text and "view exploded" in caplog.text


class WaitingSource(BrokenSource):
    def current(self) -> ClusterView:
        raise NotReady("waiting for the first list of nodes")

    def readiness(self) -> str | None:
        return "waiting for the first list of nodes"


def test_until_the_view_is_ready_gpu_pods_wait_and_others_pass() -> None:
    client = create_app(WaitingSource(), AlgorithmRegistry.default(discover=lambda: [])).test_client()
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    waiting = post(client, "filter", extender_args(LLAMA_POD, NODES, node_cache_capable=True)).get_json()
    assert waiting["Error"] == "powercap extender is not ready: waiting for the first list of nodes"
    cpu_pod = gpu_pod("web", gpus=0)
    passing = post(client, "filter", extender_args(cpu_pod, NODES, node_cache_capable=True)).get_json()
    assert passing["Error"] == "" and len(passing["NodeNames"]) == len(NODES)
    scores = post(client, "prioritize", extender_args(LLAMA_POD, NODES, node_cache_capable=True)).get_json()
    assert [s["Score"] for s in scores] == [0, 0, 0, 0]


def test_metrics_count_calls_latency_and_rejections_by_reason(client: FlaskClient) -> None:
    post(client, "filter", extender_args(LLAMA_POD, NODES, node_cache_capable=True))
    post(client, "filter", b"junk")
    post(client, "prioritize", extender_args(LLAMA_POD, NODES, node_cache_capable=False))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'powercap_extender_requests_total{outcome="ok",verb="filter"} 1.0' in text
    assert 'powercap_extender_requests_total{outcome="bad_request",verb="filter"} 1.0' in text
    assert 'powercap_extender_requests_total{outcome="ok",verb="prioritize"} 1.0' in text
    assert 'powercap_extender_request_duration_seconds_count{verb="filter"} 2.0' in text
    assert 'powercap_extender_request_duration_seconds_bucket{le="0.005",verb="prioritize"}' in text
    assert 'powercap_extender_nodes_rejected_total{reason="power"} 1.0' in text
    assert 'powercap_extender_nodes_rejected_total{reason="temperature"} 1.0' in text
    assert 'powercap_extender_nodes_rejected_total{reason="stale_telemetry"} 0.0' in text
    assert client.get("/readyz").get_data(as_text=True) == "ok\n"


def test_a_stale_snapshot_node_is_judged_at_the_snapshot_time(tmp_path: Path) -> None:
    """Replaying yesterday's snapshot: fresh-then nodes stay fresh, a node already stale then is stale."""
    old = NOW - timedelta(days=1)
    nodes = [gpu_node("a", "rack-1", telemetry(100, at=old)), gpu_node("b", "rack-2", telemetry(100, at=old - timedelta(minutes=5)))]
    path = tmp_path / "yesterday.yaml"
    path.write_text(yaml.dump(kubectl_list(nodes, [], [policy("llama", racks=[{"rackId": "rack-1", "maxPower": 5000}, {"rackId": "rack-2", "maxPower": 5000}])]), Dumper=yaml.CSafeDumper))
    registry = AlgorithmRegistry.default(discover=lambda: [])
    client = create_app(StateFileSource(str(path), ClusterSettings(), registry), registry).test_client()
    result = post(client, "filter", extender_args(LLAMA_POD, nodes, node_cache_capable=True)).get_json()
    assert result["NodeNames"] == ["a"]
    assert result["FailedNodes"] == {"b": "rack-2: no telemetry from node b for 300 s (stale after 90 s)"}


@pytest.mark.parametrize(
    "node",
    [
        pytest.param({"metadata": {"name": "gpu-roomy", "labels": {}}}, id="as-go-writes-it"),
        pytest.param({"kind": "Node", "apiVersion": "v1", "metadata": {"labels": {}, "name": "gpu-roomy"}}, id="other-field-order"),
    ],
)
def test_node_names_are_read_whatever_the_field_order(client: FlaskClient, node: dict[str, Any]) -> None:
    body = json.dumps({"Pod": LLAMA_POD, "Nodes": {"metadata": {}, "items": [node]}, "NodeNames": None}, separators=(",", ":"))
    result = post(client, "filter", body.encode()).get_json()
    assert result["Nodes"]["items"] == [node]


def test_a_body_without_content_length_is_read_too(client: FlaskClient) -> None:
    body = extender_args(LLAMA_POD, [ROOMY], node_cache_capable=True)
    response = client.post("/filter", input_stream=io.BytesIO(body), environ_overrides={"wsgi.input_terminated": True},
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert response.status_code == 200
    assert response.get_json()["NodeNames"] == ["gpu-roomy"]


def test_two_pods_placed_back_to_back_do_not_share_one_free_minimum(tmp_path: Path) -> None:
    """The published allocations leave 200 W free: room for one more GPU. kube-scheduler
    filters pod A, binds it, and filters pod B before A's binding reaches the extender's
    view: B must wait, or both GPUs would start at 200 W on the same free 200 W."""
    status = {"observedGeneration": 1, "budgetW": 1940,
              "allocations": [{"node": "gpu-loose", "watts": 1740, "gpus": [{"uuid": f"GPU-{i}", "watts": 435} for i in range(4)]}]}
    capped = {**policy("llama", cap_w=2000), "status": status}
    running = [gpu_pod(f"llama-{i}", node="gpu-loose", bound_at=NOW - timedelta(minutes=5)) for i in range(4)]
    first, second = gpu_pod("llama-4"), gpu_pod("llama-5")
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(kubectl_list([LOOSE], [*running, first, second], [capped])))
    registry = AlgorithmRegistry.default(discover=lambda: [])
    client = create_app(StateFileSource(str(path), ClusterSettings(), registry), registry).test_client()

    assert post(client, "filter", extender_args(first, [LOOSE], node_cache_capable=True)).get_json()["NodeNames"] == ["gpu-loose"]
    refused = post(client, "filter", extender_args(second, [LOOSE], node_cache_capable=True)).get_json()
    assert refused["NodeNames"] == [] and refused["FailedAndUnresolvableNodes"] == {}
    assert refused["FailedNodes"]["gpu-loose"].startswith(
        "policy inference/llama has no budget free for this pod yet: 1740 W allocated + 200 W for pods placed a "
        "moment ago + 1 x 200 W minimum for this pod > its budget 1940 W"
    )
    # the same pod asked again passes: it does not count against itself
    assert post(client, "filter", extender_args(first, [LOOSE], node_cache_capable=True)).get_json()["NodeNames"] == ["gpu-loose"]

