"""The budget controller against the real API server: two replicas on a real Lease, a
hand-over within the lease duration when the leader dies, status.allocations within the
budget, written through the status subresource as ServiceAccount powercap-controller
(config/controller's RBAC), one Event per condition transition (none again after a
restart), and an Event on the pod it evicts."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from tests.e2e.harness import NAMESPACE, ControlPlane, for_create, lease_holder, start_controllers, wait_until
from tests.fakes.objects import gpu_node, gpu_pod, policy, telemetry

LEASE = "powercap-controller"
LLAMA = {"app.kubernetes.io/name": "llama"}


def serve_gpus(cluster: ControlPlane, namespace: str, nodes: Mapping[str, tuple[float, Sequence[str | None]]], *,
               max_w: float = 700, owner: Mapping[str, Any] | None = None) -> None:
    """Nodes of 4 GPUs in rack-1, each ``name: (power W, pod on GPU i)`` with fresh telemetry
    (the GPUs' range 200 W to ``max_w``, each at its maximum limit), and those 1-GPU pods of
    llama bound to them; with ``owner``, the pods are Running and owned (controller: true)
    by that object."""
    now = datetime.now(timezone.utc)
    documents = []
    for index, (name, (power_w, pods)) in enumerate(nodes.items()):
        # each node's own moment: the helper derives GPU UUIDs from it, and UUIDs are unique
        at = now - timedelta(milliseconds=index)
        keys = [f"{namespace}/{pod}" if pod else None for pod in pods]
        node = for_create(gpu_node(name, "rack-1", telemetry(power_w, at=at, gpus=4, pods=keys, max_w=max_w), gpus=4))
        documents.append({"apiVersion": "v1", "kind": "Node", **node})
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump_all(documents))
    for name, (_, pods) in nodes.items():
        for pod_name in filter(None, pods):
            pod = for_create(gpu_pod(pod_name, namespace, gpus=1, labels=LLAMA, node=name))
            del pod["status"]
            if owner is not None:
                pod["metadata"]["ownerReferences"] = [{
                    "apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"], "controller": True}]
            cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **pod}))
            if owner is not None:
                cluster.kubectl("patch", "pod", pod_name, "-n", namespace, "--subresource=status", "--type=merge",
                                "-p", '{"status": {"phase": "Running"}}')


def events(cluster: ControlPlane, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
    """The events.k8s.io Events on one object, oldest first."""
    items = cluster.get_json("events.events.k8s.io", "-n", namespace)["items"]
    return sorted((e for e in items if (e["regarding"].get("kind"), e["regarding"].get("name")) == (kind, name)),
                  key=lambda e: e["eventTime"])


def lease(cluster: ControlPlane) -> dict[str, Any] | None:
    done = cluster.kubectl("get", "lease", LEASE, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


@pytest.fixture(scope="module")
def controllers(cluster: ControlPlane) -> Iterator[dict[str, Any]]:
    """Two ``powercap controller`` replicas, identities a and b, rounds every second."""
    replicas = start_controllers(cluster, ("a", "b"), interval_s=1)
    yield replicas
    for process in replicas.values():
        cluster.stop(process)


def test_one_leader_and_a_hand_over_within_the_lease_duration(cluster: ControlPlane, controllers: dict[str, Any]) -> None:
    leader = lease_holder(cluster, LEASE)
    spec = lease(cluster)["spec"]  # type: ignore[index]
    duration_s = spec["leaseDurationSeconds"]
    standby = next(identity for identity in controllers if identity != leader)
    os.killpg(controllers[leader].pid, signal.SIGKILL)  # no release: the standby must wait the Lease out
    killed_at = time.monotonic()
    wait_until(lambda: lease_holder(cluster, LEASE) == standby, duration_s + 15, f"{standby} to take the Lease")
    took_s = time.monotonic() - killed_at
    # As in client-go the standby times the Lease from when it saw the last renewal, not from
    # renewTime: it may see it up to a jittered retry period (2 x 1.2 s) late, and tries again
    # up to one more after the Lease runs out; then the acquire and this test's kubectl poll.
    worst_s = duration_s + 2 * 2 * 1.2 + 2
    assert took_s <= worst_s, f"hand-over took {took_s:.1f} s; the Lease lasts {duration_s} s (worst case {worst_s:.1f} s)"
    transitions = lease(cluster)["spec"].get("leaseTransitions", 0)  # type: ignore[index]
    assert transitions >= 1


def test_status_allocations_stay_within_the_budget(cluster: ControlPlane, controllers: dict[str, Any],
                                                    namespace: str) -> None:
    nodes = {"ctl-1": (2600, ["llama-0", "llama-1", None, None]), "ctl-2": (2600, ["llama-2", "llama-3", None, None])}
    serve_gpus(cluster, namespace, nodes)
    try:
        document = policy("llama", namespace, cap_w=1000)
        for_create(document)
        cluster.apply([document])

        def allocated() -> dict[str, Any] | None:
            status = cluster.get_json("pcp", "llama", "-n", namespace).get("status") or {}
            gpus = [g for entry in status.get("allocations") or () for g in entry.get("gpus") or ()]
            return status if len(gpus) == 4 else None

        status = wait_until(allocated, 60, "the controller to write 4 GPUs' allocations")
        budget_w = 1000  # the whole powerCapLimit: the controller runs with its default --margin 0
        watts = [g["watts"] for entry in status["allocations"] for g in entry["gpus"]]
        assert status["budgetW"] == budget_w
        assert sum(watts) <= budget_w and all(w >= 200 for w in watts), watts
        conditions = {c["type"]: c for c in status["conditions"]}
        assert set(conditions) == {"Ready", "Feasible", "Enforced"}
        assert conditions["Feasible"]["status"] == "True"
        assert all(c["observedGeneration"] == status["observedGeneration"] for c in status["conditions"])
    finally:
        cluster.kubectl("delete", "node", "ctl-1", "ctl-2", check=False)


def test_one_event_per_condition_transition_and_none_again_after_a_restart(
        cluster: ControlPlane, controllers: dict[str, Any], namespace: str) -> None:
    """4 GPUs whose minimums (800 W) pass a 700 W cap's budget (679 W): one Infeasible and one
    NotReady Warning, however many rounds follow; the cap raised: one BudgetCoversMinimums and
    one Ready. The replicas stopped and a new one leading, with the same conditions stored:
    no Event at all. (The GPUs' range is 200-210 W, so that no agent needs to apply a cap.)"""
    nodes = {"evt-1": (400, ["llama-0", "llama-1"]), "evt-2": (400, ["llama-2", "llama-3"])}
    serve_gpus(cluster, namespace, nodes, max_w=210)
    try:
        cluster.apply([for_create(policy("llama", namespace, cap_w=700))])

        def reasons() -> Counter[tuple[str, str]]:
            return Counter((e["type"], e["reason"]) for e in events(cluster, namespace, "PowerCappingPolicy", "llama"))

        wait_until(lambda: len(reasons()) == 2, 60, "the Events of the infeasible policy")
        time.sleep(4)  # four more rounds
        assert reasons() == {("Warning", "Infeasible"): 1, ("Warning", "NotReady"): 1}
        notes = {e["reason"]: e["note"] for e in events(cluster, namespace, "PowerCappingPolicy", "llama")}
        assert notes["Infeasible"].startswith("Feasible is False: 4 GPUs need at least 800 W (their minimum power limits)")
        assert notes["NotReady"].startswith("Ready is False (Infeasible): 4 GPUs need at least 800 W")

        cluster.kubectl("patch", "pcp", "llama", "-n", namespace, "--type=merge", "-p", '{"spec": {"powerCapLimit": 2000}}')
        wait_until(lambda: len(reasons()) == 4, 60, "the Events of the policy made feasible")
        time.sleep(4)
        recovered = {("Warning", "Infeasible"): 1, ("Warning", "NotReady"): 1,
                     ("Normal", "BudgetCoversMinimums"): 1, ("Normal", "Ready"): 1}
        assert reasons() == recovered

        for process in controllers.values():
            cluster.stop(process)
        controllers.update(start_controllers(cluster, ("c",), interval_s=1))
        time.sleep(5)
        assert reasons() == recovered, "a new leader recorded Events for conditions already stored"
    finally:
        cluster.kubectl("delete", "node", *nodes, check=False)


def test_an_evicted_pod_gets_an_event_saying_why(cluster: ControlPlane, controllers: dict[str, Any],
                                                 namespace: str) -> None:
    """energy-aware-scheduling with energyThreshold 1500 W: mv-1 draws 2000 W with two
    500-W pods, mv-2 200 W. After one migrationInterval (30 s, the least) of the leader's
    term, it evicts llama-0 through the Eviction API and records EnergyRebalance on that pod
    (as the descheduler records Descheduled) and on the policy."""
    # The pods' owner: an object that exists (or the garbage collector deletes them) and that
    # no controller acts on (a ReplicaSet would delete pods it did not make).
    cluster.apply([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "llama", "namespace": namespace}}])
    owner = cluster.get_json("configmap", "llama", "-n", namespace)
    nodes = {"mv-1": (2000, ["llama-0", "llama-1", None, None]), "mv-2": (200, [])}
    serve_gpus(cluster, namespace, nodes, owner=owner)
    try:
        algorithm = {"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 1500, "migrationInterval": 30}}
        cluster.apply([for_create(policy("llama", namespace, cap_w=4000, algorithm=algorithm))])
        (event,) = wait_until(lambda: events(cluster, namespace, "Pod", "llama-0"), 120, "an Event on the evicted pod")
        pod = cluster.get_json("pod", "llama-0", "-n", namespace)
        assert pod["metadata"].get("deletionTimestamp"), "evicted: terminating (no kubelet finishes it here)"
        assert (event["type"], event["reason"], event["action"]) == ("Normal", "EnergyRebalance", "Descheduled")
        assert event["regarding"]["uid"] == pod["metadata"]["uid"]
        assert (event["related"]["kind"], event["related"]["name"]) == ("PowerCappingPolicy", "llama")
        assert event["reportingController"] == "powercapping.example.com/budget-controller"
        assert event["note"] == (
            f"evicted for policy {namespace}/llama (energy-aware-scheduling): node mv-1 in rack rack-1 draws 2000 W, "
            "above energyThreshold 1500 W; this pod (500 W) fits under it on another node, such as mv-2 "
            "(200 W + 500 W), where the scheduler can place its replacement"
        )
        (on_policy,) = [e for e in events(cluster, namespace, "PowerCappingPolicy", "llama") if e["reason"] == "EnergyRebalance"]
        assert on_policy["related"]["name"] == "llama-0"
        assert events(cluster, namespace, "Pod", "llama-1") == []
    finally:
        cluster.kubectl("delete", "node", *nodes, check=False)
