"""GPU pods placed by a real kube-scheduler through the extender (config/scheduler's
KubeSchedulerConfiguration), both running as the power-aware-scheduler ServiceAccount with
config/'s RBAC: a pod that would pass a rack's maxPower stays Pending with a FailedScheduling
event naming the rack and the watts; pods that fit go to the node the extender prefers."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.harness import NAMESPACE, REPO_ROOT, ControlPlane, free_port, wait_until
from tests.fakes.objects import gpu_node, gpu_pod, policy, telemetry

RACK_1 = {"rackId": "rack-1", "maxPower": 5000}
RACK_2 = {"rackId": "rack-2", "maxPower": 12000}
LLAMA = {"app.kubernetes.io/name": "llama"}


def node_with_power(name: str, rack: str, power_w: float) -> dict[str, Any]:
    """A Ready 8-GPU node whose agent reported ``power_w`` just now."""
    node = gpu_node(name, rack, telemetry(power_w, at=datetime.now(timezone.utc)))
    for key in ("uid", "resourceVersion", "creationTimestamp"):
        node["metadata"].pop(key)
    return {"apiVersion": "v1", "kind": "Node", **node}


@pytest.fixture(scope="module")
def power_aware_scheduler(cluster: ControlPlane, webhook_url: str) -> Iterator[str]:
    """``powercap extender`` and a second kube-scheduler (profile power-aware-scheduler)
    calling it, as config/scheduler deploys them; yields the extender's URL."""
    kubeconfig = cluster.service_account_kubeconfig("power-aware-scheduler")
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    extender = cluster.start("extender", ["extender", "--bind", f"127.0.0.1:{port}", "--stale-after", "600"],
                             kubeconfig=kubeconfig, ready=ready)
    config = yaml.safe_load((REPO_ROOT / "config" / "scheduler" / "scheduler-config.yaml").read_text())
    config["extenders"][0]["urlPrefix"] = url
    config["clientConnection"] = {"kubeconfig": kubeconfig}
    config_file = cluster.directory / "power-aware-scheduler.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = (cluster.directory / "logs" / "power-aware-scheduler.log").open("ab")
    scheduler = subprocess.Popen(
        [str(Path(cluster.env["CONTROLPLANE_BIN"]) / "kube-scheduler"), f"--config={config_file}",
         "--secure-port=0", "--v=2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    cluster.processes.append(scheduler)

    def leading() -> bool:
        lease = cluster.kubectl("get", "lease", "power-aware-scheduler", "-n", NAMESPACE, "-o", "json", check=False)
        return lease.returncode == 0 and bool(json.loads(lease.stdout)["spec"].get("holderIdentity"))

    wait_until(leading, 60, "the power-aware scheduler to take its Lease")
    yield url
    cluster.stop(scheduler)
    cluster.stop(extender)


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
    for key in ("uid", "resourceVersion", "creationTimestamp", "ownerReferences"):
        pod["metadata"].pop(key)
    del pod["status"]
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **pod}))


def test_a_pod_that_would_pass_a_racks_max_power_waits_and_the_event_names_rack_and_watts(
    cluster: ControlPlane, power_aware_scheduler: str, racks: None, namespace: str
) -> None:
    document = policy("llama", namespace, cap_w=20000, racks=[RACK_1, {"rackId": "rack-2", "maxPower": 3000}])
    for key in ("uid", "generation", "resourceVersion"):
        document["metadata"].pop(key)
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
    for key in ("uid", "generation", "resourceVersion"):
        document["metadata"].pop(key)
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
