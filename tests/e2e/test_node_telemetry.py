"""PowerCapNode, the per-node telemetry object, against the real API server: the CRD, the
ValidatingAdmissionPolicy that lets an agent write only its own node's object (its token,
bound to its pod, names the node), the agent's loss of Node writes, the garbage collector
taking the object with its Node, and the extender and controller reading telemetry from the
object, and still from the old annotation where there is none; a queue in an object brings
the controller's next round forward."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from powercap import kube
from powercap.nodeobjects import node_object, status_patch
from powercap.telemetry import from_json
from tests.e2e.harness import (
    NAMESPACE,
    ControlPlane,
    SimulatedNode,
    agent_kubeconfig,
    for_create,
    free_port,
    http_ready,
    start_controllers,
    wait_until,
)
from tests.fakes.objects import gpu_node, gpu_pod, policy, telemetry

RACK = "rack-tel"
LLAMA = {"app.kubernetes.io/name": "llama"}
DENIED = ("ValidatingAdmissionPolicy 'powercap-agent-own-node' with binding 'powercap-agent-own-node' denied request: "
          "the node agent on node tel-a may write only PowerCapNode tel-a, not tel-b")


def now_telemetry(power_w: float, *, age_s: float = 0.0, **options: Any) -> str:
    return telemetry(power_w, at=datetime.now(timezone.utc) - timedelta(seconds=age_s), **options)


def pcn(name: str, annotation: str | None = None) -> dict[str, Any]:
    """A PowerCapNode with the telemetry document ``annotation`` holds (none without)."""
    obj: dict[str, Any] = {"apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCapNode",
                           "metadata": {"name": name}}
    if annotation is not None:
        obj["status"] = json.loads(annotation)
    return obj


def create_with_status(cluster: ControlPlane, obj: dict[str, Any]) -> None:
    """Create a PowerCapNode as the admin, then write its status (dropped on create)."""
    status = obj.pop("status", None)
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump(obj))
    if status is not None:
        cluster.kubectl("patch", "pcn", obj["metadata"]["name"], "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": status}))


def as_agent(cluster: ControlPlane, kubeconfig: str, *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(*args, kubeconfig=kubeconfig, input_text=input_text, check=False)


@pytest.fixture(scope="module")
def tel_nodes(cluster: ControlPlane) -> Iterator[dict[str, str]]:
    """Nodes tel-a and tel-b; yields each agent's kubeconfig (the token bound to its pod there)."""
    nodes = [SimulatedNode("tel-a", RACK, gpus=4), SimulatedNode("tel-b", RACK, gpus=4)]
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump_all([n.node_object() for n in nodes]))
    try:
        yield {node.name: agent_kubeconfig(cluster, node.name) for node in nodes}
    finally:
        cluster.kubectl("delete", "pod", "powercap-agent-tel-a", "powercap-agent-tel-b", "-n", NAMESPACE,
                        "--force", "--grace-period=0", check=False)
        cluster.kubectl("delete", "pcn", "tel-a", "tel-b", check=False)
        cluster.kubectl("delete", "node", "tel-a", "tel-b", check=False)


def test_the_crd_explains_every_field_and_prints_the_power_columns(cluster: ControlPlane, tel_nodes: dict[str, str]) -> None:
    explained = cluster.kubectl("explain", "pcn.status.nodePower.source").stdout
    assert "redfish" in explained and "estimate" in explained
    create_with_status(cluster, pcn("tel-a", now_telemetry(2400.0, gpus=4)))
    try:
        table = cluster.kubectl("get", "pcn", "tel-a").stdout.splitlines()
        assert table[0].split() == ["NAME", "GPU", "POWER", "NODE", "POWER", "SOURCE", "INLET", "PUBLISHED"]
        assert table[1].split()[:2] == ["tel-a", "2400"]
    finally:
        cluster.kubectl("delete", "pcn", "tel-a")


def test_an_agent_writes_its_own_nodes_object_and_is_refused_anothers(cluster: ControlPlane, tel_nodes: dict[str, str]) -> None:
    """The agent's own code path (create once, then patch the status) as the agent on tel-a;
    tel-b's object, created or patched, is refused with the reason."""
    node_uid = cluster.get_json("node", "tel-a")["metadata"]["uid"]
    sample = from_json(now_telemetry(1800.0, gpus=4))
    with kube.KubeClient.from_environment(kubeconfig=tel_nodes["tel-a"]) as agent:
        stored = kube.publish_node_status(agent, node_object("tel-a"), status_patch(sample), lambda: node_uid)
        assert stored["status"]["powerW"] == 1800
        assert stored["metadata"]["ownerReferences"][0] == {"apiVersion": "v1", "kind": "Node", "name": "tel-a", "uid": node_uid}
        again = kube.publish_node_status(agent, node_object("tel-a"), status_patch(from_json(now_telemetry(1900.0, gpus=4))))
        assert again["status"]["powerW"] == 1900
        with pytest.raises(kube.ApiError) as created:
            kube.publish_node_status(agent, node_object("tel-b"), status_patch(sample))
        create_with_status(cluster, pcn("tel-b", now_telemetry(1000.0, gpus=4)))
        with pytest.raises(kube.ApiError) as patched:
            kube.publish_node_status(agent, node_object("tel-b"), status_patch(sample))
    for refused in (created.value, patched.value):
        assert refused.code == 403 and DENIED in str(refused)
    kubectl_create = as_agent(cluster, tel_nodes["tel-a"], "create", "-f", "-", input_text=yaml.safe_dump(pcn("tel-c")))
    assert kubectl_create.returncode == 1
    assert kubectl_create.stderr.strip().endswith(DENIED.replace("tel-b", "tel-c")), kubectl_create.stderr
    assert cluster.get_json("pcn", "tel-b")["status"]["powerW"] == 1000
    deleted = as_agent(cluster, tel_nodes["tel-a"], "delete", "pcn", "tel-b")
    assert deleted.returncode == 1 and "forbidden" in deleted.stderr  # no RBAC for delete at all


def test_a_token_that_names_no_node_is_refused_saying_so(cluster: ControlPlane, tel_nodes: dict[str, str]) -> None:
    unbound = cluster.service_account_kubeconfig("powercap-agent")  # not bound to a pod: no node in it
    created = as_agent(cluster, unbound, "create", "-f", "-", input_text=yaml.safe_dump(pcn("tel-b")))
    assert created.returncode == 1
    assert "the node agent may write only its own node's PowerCapNode, and its token names no node" in created.stderr


def test_the_agent_cannot_write_nodes(cluster: ControlPlane, tel_nodes: dict[str, str]) -> None:
    annotated = as_agent(cluster, tel_nodes["tel-a"], "annotate", "node", "tel-a", "powercapping.example.com/telemetry={}")
    assert annotated.returncode == 1
    assert 'cannot patch resource "nodes"' in annotated.stderr
    assert "powercapping.example.com/telemetry" not in (cluster.get_json("node", "tel-a")["metadata"].get("annotations") or {})
    read = as_agent(cluster, tel_nodes["tel-a"], "get", "node", "tel-a", "-o", "name")
    assert read.returncode == 0, read.stderr


def test_a_deleted_node_takes_its_object_with_it(cluster: ControlPlane) -> None:
    node = SimulatedNode("tel-gone", RACK, gpus=2)
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump(node.node_object()))
    try:
        with kube.KubeClient.from_environment(kubeconfig=agent_kubeconfig(cluster, "tel-gone")) as agent:
            uid = cluster.get_json("node", "tel-gone")["metadata"]["uid"]
            kube.publish_node_status(agent, node_object("tel-gone"), status_patch(from_json(now_telemetry(10.0, gpus=2))),
                                     lambda: uid)
        cluster.kubectl("delete", "pod", "powercap-agent-tel-gone", "-n", NAMESPACE, "--force", "--grace-period=0")
        cluster.kubectl("delete", "node", "tel-gone")
        wait_until(lambda: cluster.kubectl("get", "pcn", "tel-gone", check=False).returncode != 0, 60,
                   "the garbage collector to delete PowerCapNode tel-gone with its Node")
    finally:
        cluster.kubectl("delete", "pcn", "tel-gone", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "node", "tel-gone", "--ignore-not-found", check=False)


# -- readers: the object, else the old annotation

READERS = {  # node -> (its PowerCapNode's telemetry age in s or None, its annotation's age or None)
    "read-object": (0.0, None),
    "read-annotation": (None, 0.0),
    "read-object-stale": (600.0, 0.0),  # a fresh annotation does not cover a stale object
    "read-nothing": (None, None),
}


@pytest.fixture
def reader_nodes(cluster: ControlPlane) -> Iterator[None]:
    documents = []
    for index, (name, (object_age, annotation_age)) in enumerate(READERS.items()):
        annotation = now_telemetry(1000.0 + index, age_s=annotation_age, gpus=4) if annotation_age is not None else None
        node = for_create(gpu_node(name, f"rack-{name}", annotation, gpus=4))  # a rack each: judged alone
        documents.append({"apiVersion": "v1", "kind": "Node", **node})
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump_all(documents))
    for index, (name, (object_age, _)) in enumerate(READERS.items()):
        if object_age is not None:
            create_with_status(cluster, pcn(name, now_telemetry(2000.0 + index, age_s=object_age, gpus=4)))
    yield
    cluster.kubectl("delete", "pcn", *READERS, "--ignore-not-found", check=False)
    cluster.kubectl("delete", "node", *READERS, check=False)


def filter_failures(url: str, pod: dict[str, Any]) -> dict[str, str]:
    body = json.dumps({"Pod": pod, "Nodes": None, "NodeNames": list(READERS)}).encode()
    request = urllib.request.Request(f"{url}/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return dict(json.loads(answer.read()).get("FailedNodes") or {})


def test_the_extender_reads_the_object_and_still_the_old_annotation(
        cluster: ControlPlane, reader_nodes: None, namespace: str) -> None:
    """A rack with maxPower needs fresh telemetry from every node (each node here is a rack of
    its own): the filter passes the nodes whose object, or (without an object) whose
    annotation, is fresh, and names the others."""
    racks = [{"rackId": f"rack-{name}", "maxPower": 100000} for name in READERS]
    cluster.apply([for_create(policy("llama", namespace, cap_w=20000, racks=racks))])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = cluster.start("extender-telemetry", ["extender", "--bind", f"127.0.0.1:{port}",
                                                   "--metrics-bind", f"127.0.0.1:{free_port()}"],
                            kubeconfig=cluster.service_account_kubeconfig("powercap-extender"), ready=http_ready(f"{url}/readyz"))
    try:
        pod = gpu_pod("probe", namespace, gpus=1, labels=LLAMA)
        seen: list[dict[str, str]] = [{}]

        def judged() -> dict[str, str] | None:
            seen[0] = filter_failures(url, pod)
            return seen[0] if set(seen[0]) == {"read-object-stale", "read-nothing"} else None

        try:
            failures = wait_until(judged, 30, "the extender to judge the four nodes")
        except AssertionError as error:
            raise AssertionError(f"{error}: the filter failed {seen[0]}") from None
        assert "no telemetry from node read-object-stale for 6" in failures["read-object-stale"]
        assert "no telemetry from node read-nothing (no PowerCapNode read-nothing with a status" in failures["read-nothing"]
    finally:
        cluster.stop(process)


def test_the_controller_allocates_the_gpus_the_object_reports(cluster: ControlPlane, namespace: str) -> None:
    """Nodes with no annotation, their GPUs and pods only in PowerCapNodes: the controller's
    status.allocations covers those GPUs within the budget."""
    nodes = {"ctl-obj-1": ["llama-0", "llama-1", None, None], "ctl-obj-2": ["llama-2", "llama-3", None, None]}
    now = datetime.now(timezone.utc)
    uuids: set[str] = set()
    for index, (name, pods) in enumerate(nodes.items()):
        cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Node", **for_create(gpu_node(name, "rack-1", None, gpus=4))}))
        document = telemetry(2600, at=now - timedelta(milliseconds=index), gpus=4,
                             pods=[f"{namespace}/{pod}" if pod else None for pod in pods])
        uuids |= {gpu.uuid for gpu in from_json(document).gpus if gpu.pod}
        create_with_status(cluster, pcn(name, document))
        for pod_name in filter(None, pods):
            pod = for_create(gpu_pod(pod_name, namespace, gpus=1, labels=LLAMA, node=name))
            del pod["status"]
            cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **pod}))
    replicas = start_controllers(cluster, ("telemetry",), interval_s=1)
    try:
        cluster.apply([for_create(policy("llama", namespace, cap_w=1000))])

        def allocated() -> list[dict[str, Any]] | None:
            status = cluster.get_json("pcp", "llama", "-n", namespace).get("status") or {}
            gpus = [g for entry in status.get("allocations") or () for g in entry.get("gpus") or ()]
            return gpus if len(gpus) == 4 else None

        gpus = wait_until(allocated, 60, "the controller to allocate the 4 GPUs the PowerCapNodes report")
        assert {g["uuid"] for g in gpus} == uuids
        assert sum(g["watts"] for g in gpus) <= 1000  # powerCapLimit (the default margin is 0)
    finally:
        for process in replicas.values():
            cluster.stop(process)
        cluster.kubectl("delete", "pcn", *nodes, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "node", *nodes, check=False)


def rounds_run(port: int) -> float:
    """``powercap_controller_rounds_total`` of the controller whose /metrics is on ``port``."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next(float(line.split()[-1]) for line in body.splitlines() if line.startswith("powercap_controller_rounds_total "))


def test_a_queue_in_a_powercapnode_brings_the_controllers_next_round_forward(cluster: ControlPlane, namespace: str) -> None:
    """The agent publishes a node's first queue at once; the controller hears the PowerCapNode
    event on its watch and runs its next round --queue-round (0.5 s) after the last instead of
    a whole --interval (30 s) later. A longer queue on the same GPU asks for no round."""
    name = "ctl-queue"
    document = json.loads(telemetry(800, at=datetime.now(timezone.utc), gpus=4,
                                    pods=[f"{namespace}/llama-q0", f"{namespace}/llama-q1", None, None]))
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Node", **for_create(gpu_node(name, "rack-1", None, gpus=4))}))
    create_with_status(cluster, pcn(name, json.dumps(document)))
    for pod_name in ("llama-q0", "llama-q1"):
        pod = for_create(gpu_pod(pod_name, namespace, gpus=1, labels=LLAMA, node=name))
        del pod["status"]
        cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **pod}))
    cluster.apply([for_create(policy("llama", namespace, cap_w=1600))])
    port = free_port()
    replicas = start_controllers(cluster, ("queue",), interval_s=30, health_port=port, extra_args=["--queue-round", "0.5"])

    def publish(waiting: int) -> None:
        document["timestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for gpu in document["gpus"]:
            if gpu.get("pod"):
                gpu["requestsWaiting"] = waiting if gpu["index"] == 0 else 0
        cluster.kubectl("patch", "pcn", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": document}))

    try:
        wait_until(lambda: (cluster.get_json("pcp", "llama", "-n", namespace).get("status") or {}).get("allocations"),
                   60, "the controller's first round")
        wait_until(lambda: rounds_run(port) >= 1, 10, "the first round in the metrics")
        time.sleep(1.0)  # past --queue-round: the next round waits the interval unless a queue forms
        before = rounds_run(port)
        publish(waiting=4)
        started = time.monotonic()
        wait_until(lambda: rounds_run(port) > before, 10, "a round soon after the queue formed (--interval is 30 s)")
        assert time.monotonic() - started < 5
        time.sleep(1.0)
        after = rounds_run(port)
        publish(waiting=9)  # the same queue, longer: no queue forms
        time.sleep(2.0)
        assert rounds_run(port) == after
    finally:
        for process in replicas.values():
            cluster.stop(process)
        cluster.kubectl("delete", "pcp", "llama", "-n", namespace, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "pcn", name, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "node", name, check=False)
