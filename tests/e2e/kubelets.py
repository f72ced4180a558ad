"""Stand-in kubelets for simulated GPU nodes: what a node's kubelet and the NVIDIA device
plugin do that powercap depends on, with no container runtime.

    python -m tests.e2e.kubelets --socket-dir DIR --node gpu-1=8 --node gpu-2=8

As KUBECONFIG's user (the control plane's admin), for every pod bound to one of the nodes:

- gives each container the ``nvidia.com/gpu`` devices it requests, the lowest free
  simulated GPUs of that node (UUIDs as ``powercap agent --backend simulated`` names
  them), and serves them on the node's pod-resources socket ``DIR/NODE.sock`` (a real
  gRPC server: tests/fakes/kubelet.py), where the node agent reads them;
- runs the pod's workload on those GPUs: ``DIR/NODE.workload.json``, which the node's
  simulated agent follows (``$POWERCAP_SIMULATED_WORKLOAD``), gives each of them a load
  from 50 to 100 % that is fixed per pod (so that replicas differ, as under real traffic);
  GPUs that no pod holds idle;
- reports the pod Running and Ready through the status subresource;
- finishes a graceful deletion (deletes with grace period 0), as a kubelet does once the
  containers stopped, so ``kubectl delete pod`` works.

A pod that asks for more GPUs than are free stays Pending with no devices, as a pod the
device plugin cannot serve would. SIGTERM or SIGINT stop it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from nodeagent.cli import simulated_uuid_prefix
from nodeagent.simulated import gpu_uuid
from powercap import kube
from powercap.objects import GPU_RESOURCE
from powercap.runtime.logs import configure_logging
from tests.fakes.kubelet import FakeKubelet

log = logging.getLogger("kubelets")
RECONCILE_INTERVAL_S = 0.5


def simulated_gpu_uuids(node: str, count: int) -> list[str]:
    """The UUIDs ``powercap agent --backend simulated --node NODE`` gives its GPUs."""
    return [gpu_uuid(simulated_uuid_prefix(node), index) for index in range(count)]


def container_gpus(container: Mapping[str, Any]) -> int:
    resources = container.get("resources") or {}
    raw = (resources.get("limits") or {}).get(GPU_RESOURCE) or (resources.get("requests") or {}).get(GPU_RESOURCE) or 0
    return int(raw)


@dataclass
class StandInNode:
    """One node's GPUs, the devices given to each pod ("namespace/name" -> container ->
    UUIDs), and its pod-resources endpoint."""

    name: str
    gpus: list[str]
    kubelet: FakeKubelet
    workload_file: Path
    given: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)

    def free(self) -> list[str]:
        taken = {uuid for containers in self.given.values() for uuids in containers.values() for uuid in uuids}
        return [uuid for uuid in self.gpus if uuid not in taken]

    def admit(self, key: str, pod: Mapping[str, Any]) -> bool:
        """Give the pod its devices (once); False when this node has too few free GPUs."""
        if key in self.given:
            return True
        containers = (pod.get("spec") or {}).get("containers") or []
        wanted = {c["name"]: container_gpus(c) for c in containers}
        free = self.free()
        if sum(wanted.values()) > len(free):
            return False
        devices: dict[str, list[str]] = {}
        for container, count in wanted.items():
            devices[container], free = free[:count], free[count:]
        self.given[key] = devices
        self.publish()
        return True

    def forget(self, key: str) -> None:
        self.running.discard(key)
        if self.given.pop(key, None) is not None:
            self.publish()

    def publish(self) -> None:
        self.kubelet.assignments = {
            key: {container: {GPU_RESOURCE: uuids} for container, uuids in containers.items()}
            for key, containers in self.given.items()
        }
        workloads = {
            uuid: {"load": pod_load(key), "prefillShare": 0.2}
            for key, containers in self.given.items() for uuids in containers.values() for uuid in uuids
        }
        partial = self.workload_file.with_suffix(".partial")
        partial.write_text(json.dumps(workloads, indent=1))
        partial.replace(self.workload_file)


def pod_load(key: str) -> float:
    """The load a pod puts on its GPUs: 0.5 to 1.0, fixed by its namespace/name."""
    return round(0.5 + 0.5 * int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF, 2)


def running_status(pod: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The status a kubelet writes once every container started."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "startTime": now,
        "conditions": [
            {"type": kind, "status": "True", "lastTransitionTime": now}
            for kind in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
        ],
        "containerStatuses": [
            {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
             "restartCount": 0, "state": {"running": {"startedAt": now}}}
            for c in containers
        ],
    }


class Kubelets:
    """Reconciles the pods bound to ``nodes`` every half second from one pod watch."""

    def __init__(self, client: kube.KubeClient, nodes: Sequence[StandInNode]) -> None:
        self._client = client
        self._nodes = {node.name: node for node in nodes}
        self._pods = kube.WatchCache(client, "/api/v1/pods", name="pods")

    def run(self, stop: threading.Event) -> None:
        self._pods.start()
        try:
            while not stop.wait(RECONCILE_INTERVAL_S):
                if self._pods.has_synced:
                    self.reconcile()
        finally:
            self._pods.stop()

    def reconcile(self) -> None:
        present: dict[str, set[str]] = {name: set() for name in self._nodes}
        for pod in self._pods.items():
            node = self._nodes.get((pod.get("spec") or {}).get("nodeName") or "")
            if node is None:
                continue
            metadata = pod["metadata"]
            key = f"{metadata['namespace']}/{metadata['name']}"
            present[node.name].add(key)
            try:
                self._reconcile_pod(node, key, pod)
            except kube.ApiError as error:
                log.warning("pod update failed", extra={"pod": key, "node": node.name, "error": str(error)})
        for node in self._nodes.values():
            for key in set(node.given) - present[node.name]:
                node.forget(key)

    def _reconcile_pod(self, node: StandInNode, key: str, pod: Mapping[str, Any]) -> None:
        metadata = pod["metadata"]
        path = f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}"
        if metadata.get("deletionTimestamp"):
            node.forget(key)
            try:
                self._client.request("DELETE", path, body={"gracePeriodSeconds": 0})
            except kube.NotFound:
                pass
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            node.forget(key)
            return
        if key in node.running or not node.admit(key, pod):
            return
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._client.patch(f"{path}/status", {"status": running_status(pod, now)})
        node.running.add(key)
        log.info("pod running", extra={"pod": key, "node": node.name, "gpus": node.given[key]})


def node_argument(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    if not name or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NODE=GPUS, e.g. gpu-1=8")
    return name, int(count)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.kubelets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket-dir", type=Path, required=True, help="where each node's pod-resources socket goes")
    parser.add_argument("--node", type=node_argument, action="append", required=True, metavar="NODE=GPUS")
    args = parser.parse_args(argv)
    configure_logging()
    args.socket_dir.mkdir(parents=True, exist_ok=True)
    nodes = []
    for name, count in args.node:
        kubelet = FakeKubelet(socket_path=args.socket_dir / f"{name}.sock").start()
        node = StandInNode(name, simulated_gpu_uuids(name, count), kubelet, args.socket_dir / f"{name}.workload.json")
        node.publish()  # an empty workload file: every GPU idles until a pod arrives
        nodes.append(node)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = kube.KubeClient.from_environment()
    log.info("kubelets running", extra={"nodes": [node.name for node in nodes]})
    try:
        Kubelets(client, nodes).run(stop)
    finally:
        for node in nodes:
            node.kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
