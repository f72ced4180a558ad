"""What kube-scheduler could never send, and what a broken client might: bodies past the
extender's limits, deep nesting and odd GPU quantities get a 400 naming the problem (or
the right answer), never a 500 or a traceback."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient

from extender import wire
from extender.app import create_app
from powercap.algorithms import AlgorithmRegistry
from powercap.cluster import ClusterSettings
from powercap.runtime.sources import StateFileSource
from tests.fakes.objects import extender_args, gpu_node, gpu_pod, kubectl_list, policy, telemetry

NODES = [gpu_node("gpu-1", "rack-1", telemetry(4800)), gpu_node("gpu-2", "rack-2", telemetry(1000))]
RACKS = [{"rackId": "rack-1", "maxPower": 5000}, {"rackId": "rack-2", "maxPower": 5000}]


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(kubectl_list(NODES, [], [policy("llama", racks=RACKS)])))
    registry = AlgorithmRegistry.default(discover=lambda: [])
    return create_app(StateFileSource(str(path), ClusterSettings(), registry), registry).test_client()


def pod_with_gpus(value: Any, section: str = "limits") -> dict[str, Any]:
    pod = gpu_pod("llama-0", gpus=1)
    for container in pod["spec"]["containers"]:
        container["resources"] = {section: {"nvidia.com/gpu": value}}
    return pod


def call(client: FlaskClient, verb: str, body: bytes) -> tuple[int, Any]:
    response = client.post(f"/{verb}", data=body, headers={"Content-Type": "application/json"})
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    return response.status_code, response.get_json()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param("²", '"²" is not a Kubernetes quantity such as "2"', id="superscript-two"),
        pytest.param("٣", '"٣" is not a Kubernetes quantity such as "2"', id="arabic-indic-three"),
        pytest.param("9" * 5000, "is not a Kubernetes quantity", id="5000-digits"),
        pytest.param("-1", '"-1" must not be negative', id="negative"),
        pytest.param(-1, "-1 must not be negative", id="negative-number"),
        pytest.param("0.5", '"0.5" is not a whole number of GPUs', id="fractional"),
        pytest.param("500m", '"500m" is not a whole number of GPUs', id="milli"),
        pytest.param("1e400", '"1e400" is not a whole number of GPUs from 0 to 1000000', id="huge-exponent"),
        pytest.param("1e9", '"1e9" is more than 1000000 GPUs', id="a-billion"),
        pytest.param("1Ei", '"1Ei" is more than 1000000 GPUs', id="exbi"),
        pytest.param(True, "true must be a quantity", id="boolean"),
        pytest.param([1], "[1] must be a quantity", id="list"),
        pytest.param("nan", '"nan" is not a Kubernetes quantity', id="nan"),
    ],
)
@pytest.mark.parametrize("verb", ["filter", "prioritize"])
def test_an_odd_gpu_quantity_is_a_400_naming_the_field(client: FlaskClient, verb: str, value: Any, problem: str) -> None:
    status, body = call(client, verb, extender_args(pod_with_gpus(value), NODES, node_cache_capable=True))
    assert status == 400
    assert body["Error"].startswith("Pod.spec.containers[0].resources.limits[nvidia.com/gpu]: ")
    assert problem in body["Error"]


@pytest.mark.parametrize("value", ["1", 1, 1.0, "1000m", "+1", "0.001k", "1e0", " 1 "])
def test_every_spelling_of_one_gpu_gets_the_one_gpu_answer(client: FlaskClient, value: Any) -> None:
    pod = pod_with_gpus(value)
    pod["metadata"]["annotations"] = {"powercapping.example.com/power-watts": "700"}
    status, body = call(client, "filter", extender_args(pod, NODES, node_cache_capable=True))
    assert status == 200
    assert body["NodeNames"] == ["gpu-2"]
    assert body["FailedNodes"] == {"gpu-1": "rack-1: 4800 W in use + 700 W for this pod > maxPower 5000 W (set by policy inference/llama)"}


def test_zero_gpus_in_any_spelling_pass_every_node_untouched(client: FlaskClient) -> None:
    for value in ("0", 0, "0m", "0e5"):
        status, body = call(client, "filter", extender_args(pod_with_gpus(value, "requests"), NODES, node_cache_capable=True))
        assert (status, body["NodeNames"], body["FailedNodes"]) == (200, ["gpu-1", "gpu-2"], {})


def nested_pod(levels: int) -> bytes:
    return extender_args(gpu_pod("llama-0"), NODES, node_cache_capable=True).replace(
        b'"metadata":{', b'"metadata":{"deep":' + b"[" * levels + b"]" * levels + b",", 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(nested_pod(65), "Pod is nested more than 64 levels deep (the limit)", id="pod-65-levels"),
        pytest.param(nested_pod(900), "Pod is nested more than 64 levels deep (the limit)", id="pod-900-levels"),
        pytest.param(nested_pod(100_000), "request body is nested too deeply to read", id="pod-100000-levels"),
        pytest.param(b'{"Pod": {}, "NodeNames": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     "request body is nested too deeply to read", id="100000-levels-elsewhere"),
        pytest.param(b'{"Pod": {"a": [' + b",".join([b"0"] * 10_001) + b"]}, \"NodeNames\": []}",
                     "Pod has an array or object with more than 10000 entries (the limit)", id="pod-long-list"),
        pytest.param(b'{"Pod": {"a": "' + b"x" * (4 * 1024 * 1024) + b'"}, "NodeNames": []}',
                     "Pod: larger than 4194304 bytes of JSON (the limit)", id="pod-over-4-mib"),
        pytest.param(b'{"Pod": {}, "NodeNames": [' + b",".join([b'"n"'] * 100_001) + b"]}",
                     "NodeNames: more than 100000 names (the limit)", id="too-many-names"),
        pytest.param(b'{"Pod": {}, "Nodes": {"items": [' + b",".join([b"{}"] * 100_001) + b"]}}",
                     "Nodes.items: more than 100000 nodes (the limit)", id="too-many-nodes"),
        pytest.param(b'{"Pod": {}, "Nodes": {"items": [' + b",".join([b"1"] * 200_000) + b"]}}",
                     "not an ExtenderArgs object: Expected `object`, got `int` - at `$.Nodes.items[0]`", id="nodes-not-objects"),
    ],
)
@pytest.mark.parametrize("verb", ["filter", "prioritize"])
def test_a_body_past_a_limit_is_a_400_naming_it(client: FlaskClient, caplog: pytest.LogCaptureFixture, verb: str, body: bytes, message: str) -> None:
    with caplog.at_level(logging.INFO):
        status, answer = call(client, verb, body)
    assert status == 400
    assert answer["Error"].startswith(message), answer["Error"]
    records = [r for r in caplog.records if r.name == "extender.app"]
    assert len(records) == 1 and records[0].levelno == logging.INFO and not records[0].exc_info
    assert len(records[0].getMessage()) < 300


def test_nesting_just_within_the_pod_limit_is_answered(client: FlaskClient) -> None:
    status, body = call(client, "filter", nested_pod(60))
    assert status == 200 and body["NodeNames"] == ["gpu-2"]


def test_full_node_bodies_of_many_small_nodes_are_counted_before_they_are_kept() -> None:
    items = [{"metadata": {"name": f"n{i}"}} for i in range(2000)]
    args, candidates = wire.decode_args(json.dumps({"Pod": {}, "Nodes": {"items": items}}).encode())
    assert candidates.names == [f"n{i}" for i in range(2000)]
    assert args.Nodes is not None and len(args.Nodes.items or ()) == 2000
