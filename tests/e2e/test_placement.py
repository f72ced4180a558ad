"""GPU pods placed by a real kube-scheduler through the extender (config/scheduler's
KubeSchedulerConfiguration), both running as the power-aware-scheduler ServiceAccount with
config/'s RBAC: a pod that would pass a rack's maxPower stays Pending with a FailedScheduling
event naming the rack and the watts; pods that fit go to the node the extender prefers."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from powercap.kube import KubeClient, pod_path
from tests.e2e.harness import ControlPlane, for_create, start_power_aware_scheduler, wait_until
from tests.fakes.objects import gpu_node, gpu_pod, policy, telemetry

RACK_1 = {"rackId": "rack-1", "maxPower": 5000}
RACK_2 = {"rackId": "rack-2", "maxPower": 12000}
LLAMA = {"app.kubernetes.io/name": "llama"}


def node_with_power(name: str, rack: str, power_w: float) -> dict[str, Any]:
    """A Ready 8-GPU node whose agent reported ``power_w`` just now."""
    node = gpu_node(name, rack, telemetry(power_w, at=datetime.now(timezone.utc)))
    for_create(node)
    return {"apiVersion": "v1", "kind": "Node", **node}


@pytest.fixture(scope="module")
def power_aware_scheduler(cluster: ControlPlane, webhook_url: str) -> Iterator[str]:
    """``powercap extender`` and a second kube-scheduler (profile power-aware-scheduler)
    calling it, as config/scheduler deploys them; yields the extender's URL. The Nodes here
    carry fixed telemetry, so it stays fresh for 10 minutes."""
    before = list(cluster.processes)
    yield start_power_aware_scheduler(cluster, stale_after_s=600)
    for process in [p for p in cluster.processes if p not in before]:
        cluster.stop(process)


@pytest.fixture
def racks(cluster: ControlPlane) -> Iterator[None]:
    """rack-1: two nodes drawing 4000 W in all (1000 W free under 5000 W); rack-2: two nodes
    drawing 2000 W (10,000 W free under 12,000 W), gpu-4 the busier of the two."""
    nodes = [node_with_power("gpu-1", "rack-1", 2000), node_with_power("gpu-2", "rack-1", 2000),
             node_with_power("gpu-3", "rack-2", 500), node_with_power("gpu-4", "rack-2", 1500)]
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump_all(nodes))
    yield
    cluster.kubectl("delete", "node", "gpu-1", "gpu-2", "gpu-3", "gpu-4", check=False)


def scheduled_node(cluster: ControlPlane, namespace: str, name: str) -> str | None:
    pod = cluster.get_json("pod", name, "-n", namespace)
    return pod["spec"].get("nodeName")


def failed_scheduling(cluster: ControlPlane, namespace: str, name: str) -> str | None:
    events = cluster.get_json("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    messages = [e["message"] for e in events["items"] if e["reason"] == "FailedScheduling"]
    return messages[-1] if messages else None


def create_pod(cluster: ControlPlane, namespace: str, name: str, gpus: int) -> None:
    pod = gpu_pod(name, namespace, gpus=gpus, labels=LLAMA)
    for_create(pod)
    del pod["status"]
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **pod}))


def test_a_pod_that_would_pass_a_racks_max_power_waits_and_the_event_names_rack_and_watts(
    cluster: ControlPlane, power_aware_scheduler: str, racks: None, namespace: str
) -> None:
    document = policy("llama", namespace, cap_w=20000, racks=[RACK_1, {"rackId": "rack-2", "maxPower": 3000}])
    for_create(document)
    cluster.apply([document])
    create_pod(cluster, namespace, "big", gpus=4)

    message = wait_until(lambda: failed_scheduling(cluster, namespace, "big"), 60, "a FailedScheduling event")
    assert scheduled_node(cluster, namespace, "big") is None
    assert message.startswith("0/4 nodes are available: ")
    # 20000 W over the pod's 4 GPUs: each at its 700 W maximum -> 2800 W for this pod
    assert "2 rack-1: 4000 W in use + 2800 W for this pod > maxPower 5000 W (set by policy " in message
    assert "2 rack-2: 2000 W in use + 2800 W for this pod > maxPower 3000 W (set by policy " in message


def test_pods_that_fit_go_to_the_node_the_extender_scores_highest(
    cluster: ControlPlane, power_aware_scheduler: str, racks: None, namespace: str
) -> None:
    # rack-1: 4000 W of 9000 W in use; rack-2: 2000 W of 12,000 W: both fit a 1400 W pod,
    # rack-2 keeps more headroom after it
    document = policy("llama", namespace, cap_w=20000, racks=[{"rackId": "rack-1", "maxPower": 9000}, RACK_2])
    for_create(document)
    cluster.apply([document])
    wait_until(lambda: extender_sees_policy(power_aware_scheduler, namespace), 30, "the extender to see the policy")
    scores = extender_scores(power_aware_scheduler, gpu_pod("small", namespace, gpus=2, labels=LLAMA),
                             ["gpu-1", "gpu-2", "gpu-3", "gpu-4"])
    assert scores["gpu-3"] > scores["gpu-1"], scores
    create_pod(cluster, namespace, "small", gpus=2)
    node = wait_until(lambda: scheduled_node(cluster, namespace, "small"), 60, "the pod to be bound")
    assert scores[node] == max(scores.values()), (node, scores)


def extender_sees_policy(url: str, namespace: str) -> bool:
    """The extender's view holds the policy (its filter refuses a pod no rack can hold)."""
    too_big = gpu_pod("probe", namespace, gpus=8, labels=LLAMA, power_watts="50000")
    body = json.dumps({"Pod": too_big, "Nodes": None, "NodeNames": ["gpu-1"]}).encode()
    request = urllib.request.Request(f"{url}/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return bool(json.loads(answer.read()).get("FailedNodes"))


def extender_scores(url: str, pod: dict[str, Any], nodes: list[str]) -> dict[str, int]:
    """What the extender's /prioritize answers for ``pod`` over ``nodes`` (NodeNames form)."""
    body = json.dumps({"Pod": pod, "Nodes": None, "NodeNames": nodes}).encode()
    request = urllib.request.Request(f"{url}/prioritize", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return {entry["Host"]: entry["Score"] for entry in json.loads(answer.read())}


# -- a burst: 50 pods created at once never put a rack past maxPower

BURST_LABELS = {"app.kubernetes.io/name": "burst"}
BURST_CAP_W = 100_000  # the policy's share per GPU (100000 W / 50 GPUs and fewer) stays above the GPU maximum
GPU_MAX_W = 700  # what telemetry() reports as every GPU's maximum limit
BURST_PODS = 50
# rack -> (the telemetry power of each of its two 8-GPU nodes, the rack's maxPower)
BURST_RACKS: dict[str, tuple[tuple[float, float], int]] = {
    "burst-a": ((1000, 1000), 2000 + 7 * GPU_MAX_W + 300),  # room for 7 one-GPU pods, 300 W to spare
    "burst-b": ((2500, 500), 3000 + 10 * GPU_MAX_W + 699),  # room for 10, 699 W to spare
    "burst-c": ((300, 700), 1000 + 5 * GPU_MAX_W),  # room for exactly 5 (at the limit passes)
}


def burst_pod_charge_w() -> float:
    """What the extender charges a bound one-GPU pod of the burst policy (docs/extender.md):
    GPUs x min(powerCapLimit / the service's GPUs, the node's GPU maximum limit); the
    service never holds more than BURST_PODS GPUs, so the maximum limit wins."""
    return 1 * min(BURST_CAP_W / BURST_PODS, GPU_MAX_W)


@pytest.fixture
def burst_racks(cluster: ControlPlane) -> Iterator[dict[str, str]]:
    """Two Ready 8-GPU nodes in each of BURST_RACKS, with telemetry from just now; yields
    node -> rack."""
    now = datetime.now(timezone.utc)
    nodes, racks_of = [], {}
    for r, (rack, (powers, _)) in enumerate(sorted(BURST_RACKS.items())):
        for i, power_w in enumerate(powers):
            name = f"{rack}-{i + 1}"
            # each node its own moment: telemetry() derives GPU UUIDs from it, and UUIDs are unique
            node = gpu_node(name, rack, telemetry(power_w, at=now - timedelta(milliseconds=2 * r + i)))
            for_create(node)
            nodes.append({"apiVersion": "v1", "kind": "Node", **node})
            racks_of[name] = rack
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump_all(nodes))
    yield racks_of
    cluster.kubectl("delete", "node", *racks_of, check=False)


def burst_pod(name: str, namespace: str) -> dict[str, Any]:
    """A one-GPU pod of the burst policy that may go only to the burst racks' nodes."""
    pod = gpu_pod(name, namespace, gpus=1, labels=BURST_LABELS)
    for_create(pod)
    del pod["status"]
    pod["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "powercapping.example.com/rack", "operator": "In", "values": sorted(BURST_RACKS)}]},
    ]}}}
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def extender_knows_burst_racks(url: str, namespace: str, nodes: list[str]) -> bool:
    """The extender's view holds the burst policy and every burst node: a pod too big for
    any rack fails each node on its rack's maxPower (an unknown node fails otherwise)."""
    too_big = gpu_pod("probe", namespace, gpus=1, labels=BURST_LABELS, power_watts="50000")
    body = json.dumps({"Pod": too_big, "Nodes": None, "NodeNames": nodes}).encode()
    request = urllib.request.Request(f"{url}/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        failed = json.loads(answer.read()).get("FailedNodes") or {}
    return set(failed) == set(nodes) and all("maxPower" in reason for reason in failed.values())


def test_a_burst_of_50_pods_never_puts_a_rack_past_max_power_and_fills_the_room_there_is(
    cluster: ControlPlane, power_aware_scheduler: str, burst_racks: dict[str, str], namespace: str
) -> None:
    document = policy("burst", namespace, cap_w=BURST_CAP_W, selector={"matchLabels": BURST_LABELS},
                      racks=[{"rackId": rack, "maxPower": max_w} for rack, (_, max_w) in sorted(BURST_RACKS.items())])
    for_create(document)
    cluster.apply([document])
    wait_until(lambda: extender_knows_burst_racks(power_aware_scheduler, namespace, sorted(burst_racks)), 30,
               "the extender to see the burst policy and nodes")

    charge_w = burst_pod_charge_w()
    measured_w = {rack: sum(powers) for rack, (powers, _) in BURST_RACKS.items()}
    max_power_w = {rack: max_w for rack, (_, max_w) in BURST_RACKS.items()}
    fits = {rack: int((max_power_w[rack] - measured_w[rack]) // charge_w) for rack in BURST_RACKS}
    assert sum(fits.values()) < BURST_PODS  # not every pod can go

    client = KubeClient.from_environment(kubeconfig=cluster.kubeconfig)
    names = [f"burst-{i:02d}" for i in range(BURST_PODS)]
    started = time.monotonic()
    with client, ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda name: client.create(pod_path(namespace), burst_pod(name, namespace)), names))
        created_s = time.monotonic() - started

        worst: dict[str, float] = dict.fromkeys(BURST_RACKS, 0.0)  # the most charged to a rack at any poll

        def placements() -> tuple[dict[str, str], set[str]]:
            """pod -> node of the bound pods, and the pods with a FailedScheduling event;
            keeps ``worst`` up to date."""
            bound = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in client.list(pod_path(namespace))["items"]
                     if p["spec"].get("nodeName")}
            events = client.list(f"/api/v1/namespaces/{namespace}/events",
                                 {"fieldSelector": "reason=FailedScheduling"})["items"]
            refused = {e["involvedObject"]["name"] for e in events}
            for rack in BURST_RACKS:
                count = sum(1 for node in bound.values() if burst_racks[node] == rack)
                worst[rack] = max(worst[rack], measured_w[rack] + count * charge_w)
            return bound, refused

        def all_decided() -> bool:
            bound, refused = placements()
            return all(name in bound or name in refused for name in names)

        wait_until(all_decided, 120, "every pod to be bound or refused (FailedScheduling)", interval_s=0.5)
        decided_s = time.monotonic() - started
        # A pod refused while another pod's binding was on its way is retried (kube-scheduler's
        # backoff): wait for the count to settle where it fits, then a moment more.
        wait_until(lambda: len(placements()[0]) >= sum(fits.values()), 60,
                   f"{sum(fits.values())} pods to be bound", interval_s=0.5)
        settled_s = time.monotonic() - started
        time.sleep(5)
        bound, refused = placements()

    per_rack = {rack: sorted(pod for pod, node in bound.items() if burst_racks[node] == rack) for rack in BURST_RACKS}
    print(f"\nburst: {BURST_PODS} pods created in {created_s:.1f} s, each bound or refused after {decided_s:.1f} s, "
          f"{len(bound)} bound after {settled_s:.1f} s; per rack {({r: len(p) for r, p in per_rack.items()})}, "
          f"room for {fits}")
    for rack in BURST_RACKS:
        charged_w = measured_w[rack] + len(per_rack[rack]) * charge_w
        assert charged_w <= max_power_w[rack], (rack, charged_w, max_power_w[rack], per_rack[rack])
        assert worst[rack] <= max_power_w[rack], (rack, worst[rack], max_power_w[rack])
        # not refused while room remained: every rack holds as many pods as fit in it
        assert len(per_rack[rack]) == fits[rack], (rack, per_rack[rack], fits)
    unbound = set(names) - set(bound)
    assert unbound <= refused, sorted(unbound - refused)
    assert len(unbound) == BURST_PODS - sum(fits.values())
    # the refusals say why: the rack's maxPower
    message = failed_scheduling(cluster, namespace, sorted(unbound)[0])
    assert message is not None and "maxPower" in message, message
