"""The budget controller against the real API server: two replicas on a real Lease, a
hand-over within the lease duration when the leader dies, and status.allocations within
the budget, written through the status subresource as ServiceAccount power-aware-scheduler
(config/controller's RBAC)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from tests.e2e.harness import NAMESPACE, ControlPlane, for_create, lease_holder, start_controllers, wait_until
from tests.fakes.objects import gpu_node, gpu_pod, policy, telemetry

LEASE = "powercap-controller"
LLAMA = {"app.kubernetes.io/name": "llama"}


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
    assert took_s <= duration_s + 5, f"hand-over took {took_s:.1f} s; the Lease lasts {duration_s} s"
    transitions = lease(cluster)["spec"].get("leaseTransitions", 0)  # type: ignore[index]
    assert transitions >= 1


def test_status_allocations_stay_within_the_budget(cluster: ControlPlane, controllers: dict[str, Any],
                                                    namespace: str) -> None:
    now = datetime.now(timezone.utc)
    pods = [f"{namespace}/llama-{i}" for i in range(4)]
    nodes = []
    for index, name in enumerate(("ctl-1", "ctl-2")):
        # each node's own moment: the helper derives GPU UUIDs from it, and UUIDs are unique
        at = now - timedelta(milliseconds=index)
        node = gpu_node(name, "rack-1", telemetry(2600, at=at, gpus=4, pods=pods[2 * index:2 * index + 2] + [None, None]),
                        gpus=4)
        for_create(node)
        nodes.append({"apiVersion": "v1", "kind": "Node", **node})
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump_all(nodes))
    try:
        for i in range(4):
            pod = gpu_pod(f"llama-{i}", namespace, gpus=1, labels=LLAMA, node=f"ctl-{i // 2 + 1}")
            for_create(pod)
            del pod["status"]
            cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **pod}))
        document = policy("llama", namespace, cap_w=1000)
        for_create(document)
        cluster.apply([document])

        def allocated() -> dict[str, Any] | None:
            status = cluster.get_json("pcp", "llama", "-n", namespace).get("status") or {}
            gpus = [g for entry in status.get("allocations") or () for g in entry.get("gpus") or ()]
            return status if len(gpus) == 4 else None

        status = wait_until(allocated, 60, "the controller to write 4 GPUs' allocations")
        budget_w = math.floor(1000 * 0.97)
        watts = [g["watts"] for entry in status["allocations"] for g in entry["gpus"]]
        assert status["budgetW"] == budget_w
        assert sum(watts) <= budget_w and all(w >= 200 for w in watts), watts
        conditions = {c["type"]: c for c in status["conditions"]}
        assert set(conditions) == {"Ready", "Feasible", "Enforced"}
        assert conditions["Feasible"]["status"] == "True"
        assert all(c["observedGeneration"] == status["observedGeneration"] for c in status["conditions"])
    finally:
        cluster.kubectl("delete", "node", "ctl-1", "ctl-2", check=False)
