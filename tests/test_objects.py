"""Reading racks, GPU requests, power estimates and policies off raw Kubernetes objects."""

from __future__ import annotations

from typing import Any

import pytest

from powercap.objects import (
    node_gpu_capacity,
    node_rack,
    object_key,
    pod_gpu_container,
    pod_gpus_requested,
    pod_is_active,
    pod_power_annotation_w,
    policy_for_pod,
)
from powercap.policies import LabelSelector, Policy


def container(gpus: Any = None, section: str = "limits") -> dict[str, Any]:
    return {"name": "c", "resources": {section: {"nvidia.com/gpu": gpus}} if gpus is not None else {}}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"containers": [container("4")]}, 4, id="string-limit"),
        pytest.param({"containers": [container(2), container(1)]}, 3, id="sum-of-containers"),
        pytest.param({"containers": [container(1)], "initContainers": [container(2)]}, 2, id="init-container-larger"),
        pytest.param({"containers": [container("1", "requests")]}, 1, id="requests-only"),
        pytest.param({"containers": [container()]}, 0, id="no-gpu"),
        pytest.param({"containers": [container("500m")]}, 0, id="fractional-is-not-a-gpu-count"),
        pytest.param({}, 0, id="no-containers"),
    ],
)
def test_pod_gpus_requested(spec: dict[str, Any], expected: int) -> None:
    assert pod_gpus_requested({"spec": spec}) == expected


def named(name: str, gpus: Any = None, section: str = "limits") -> dict[str, Any]:
    return {**container(gpus, section), "name": name}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"containers": [named("server", 1), named("proxy")]}, "server", id="one-asks"),
        pytest.param({"containers": [named("server", "2", "requests")]}, "server", id="requests-only"),
        pytest.param({"containers": [named("a", 1), named("b", 1)]}, None, id="several-ask"),
        pytest.param({"containers": [named("proxy")], "initContainers": [named("warm", 1)]}, None, id="init-only"),
        pytest.param({}, None, id="no-containers"),
    ],
)
def test_pod_gpu_container(spec: dict[str, Any], expected: str | None) -> None:
    """The container named on a GPU's series: the one that asks for GPUs, when it is one."""
    assert pod_gpu_container({"spec": spec}) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("700", 700.0, id="plain"),
        pytest.param("350.5W", 350.5, id="with-unit"),
        pytest.param("0", None, id="zero"),
        pytest.param("-5", None, id="negative"),
        pytest.param("lots", None, id="junk"),
        pytest.param("nan", None, id="nan"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_pod_power_annotation(value: str | None, expected: float | None) -> None:
    annotations = {} if value is None else {"powercapping.example.com/power-watts": value}
    assert pod_power_annotation_w({"metadata": {"annotations": annotations}}) == expected


def test_node_facts() -> None:
    node = {
        "metadata": {"name": "gpu-1", "labels": {"powercapping.example.com/rack": "rack-1"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}},
    }
    assert node_rack(node) == "rack-1"
    assert node_rack(node, "topology.example.com/rack") is None
    assert node_gpu_capacity(node) == 8
    assert object_key(node) == "gpu-1"


def test_policy_for_pod_matches_namespace_and_selector() -> None:
    def policy(name: str, namespace: str, labels: dict[str, str]) -> Policy:
        return Policy(namespace=namespace, name=name, power_cap_w=1000, selector=LabelSelector.from_dict({"matchLabels": labels}))

    policies = [policy("b", "inference", {"app": "llm"}), policy("a", "inference", {"app": "llm"}), policy("c", "other", {"app": "llm"})]
    pod = {"metadata": {"namespace": "inference", "name": "p", "labels": {"app": "llm"}}}
    chosen = policy_for_pod(pod, policies)
    assert chosen is not None and chosen.key == "inference/a"
    assert policy_for_pod({"metadata": {"namespace": "inference", "labels": {"app": "web"}}}, policies) is None
    assert object_key(pod) == "inference/p"


@pytest.mark.parametrize(
    ("pod", "active"),
    [
        pytest.param({"status": {"phase": "Running"}}, True, id="running"),
        pytest.param({"status": {"phase": "Pending"}}, True, id="pending"),
        pytest.param({"status": {"phase": "Succeeded"}}, False, id="succeeded"),
        pytest.param({"status": {"phase": "Running"}, "metadata": {"deletionTimestamp": "2026-11-27T00:00:00Z"}}, False, id="terminating"),
    ],
)
def test_pod_is_active(pod: dict[str, Any], active: bool) -> None:
    assert pod_is_active(pod) is active
