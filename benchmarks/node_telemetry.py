"""Node telemetry at scale: the Node annotation against PowerCapNode, on a real control plane.

    .venv/bin/python benchmarks/node_telemetry.py [--nodes 500 5000] [--interval-s 5] [--window-s 20]

**Write load.** A real etcd + kube-apiserver (+ kube-scheduler and kube-controller-manager,
themselves Node watchers) from scripts/controlplane.sh, with N realistic 8-GPU Node objects
(~15 KB of JSON each) and, for the new design, N PowerCapNodes. For a fixed window, N
simulated agents publish telemetry at the agents' cadence (``--interval-s``: 5 s is the
agent's minimum interval, what a busy node publishes; 30 s is its heartbeat on a quiet
one), each through the exact call the agent makes: before, a merge patch of the Node's
annotation (``kube.patch_node_annotations``); now, a merge patch of the PowerCapNode's
status (``kube.publish_node_status``). Writers are 8 threads, each writing its nodes on
schedule; on 2 cores they fall behind the target at 5,000 nodes, so the table gives the
target and the achieved rate, and what is measured *per write* (bytes sent, bytes of the
object every watcher then receives, latency) is scaled to the target rate where marked.
Meanwhile one watcher of all Nodes and one of all PowerCapNodes count the events they
receive and their size (each event's object re-encoded as compact JSON).

**Decision latency.** In process, as benchmarks/extender.py: 5,000 nodes in 625 racks with
maxPower, 10,000 GPU pods; one scheduling cycle (POST /filter with 500 candidate names, then
/prioritize) after every batch of telemetry updates delivered by the watch caches (the
view rebuilt from the previous one), for the annotation design (Node objects replaced) and
PowerCapNode (objects replaced, Nodes untouched, merged by TelemetryNodes).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, percentile  # noqa: E402
from extender.app import create_app  # noqa: E402
from powercap import kube  # noqa: E402
from powercap.algorithms import AlgorithmRegistry  # noqa: E402
from powercap.cluster import ClusterSettings  # noqa: E402
from powercap.nodeobjects import node_object, status_patch  # noqa: E402
from powercap.runtime.sources import CacheSource, TelemetryNodes, settle_garbage_collector  # noqa: E402
from powercap.telemetry import TELEMETRY_ANNOTATION, from_json  # noqa: E402
from tests.e2e.harness import REPO_ROOT, ControlPlane, start_controlplane, stop_controlplane  # noqa: E402
from tests.fakes.objects import NOW, gpu_node, gpu_pod, policy, telemetry  # noqa: E402

WRITERS = 8
RACK_SIZE = 8
DESIGNS = ("annotation", "powercapnode")


def compact_size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


def node_name(i: int) -> str:
    return f"gpu-{i:05d}"


def pods_of(i: int) -> list[str | None]:
    return [f"inference/llama-{i}-0"] * 4 + [f"inference/llama-{i}-1"] * 4


# -- the write load on a real control plane ---------------------------------------------------

@dataclass
class Counts:
    events: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, size: int) -> None:
        with self.lock:
            self.events += 1
            self.bytes += size


def watch_counting(client: kube.KubeClient, path: str, counts: Counts, stop: threading.Event) -> threading.Thread:
    """Watch ``path`` from now, counting ADDED/MODIFIED/DELETED events and their JSON size."""
    version = kube.resource_version(client.request("GET", path, params={"limit": 1}))  # one page: the version only

    def run() -> None:
        while not stop.is_set():
            try:
                with client.watch(path, version, {"allowWatchBookmarks": True}, timeout_s=60) as stream:
                    for event_type, obj in stream:
                        if stop.is_set():
                            return
                        if event_type in ("ADDED", "MODIFIED", "DELETED"):
                            counts.add(compact_size(obj))
            except kube.Unreachable:
                if stop.is_set():
                    return  # closed at the end of the run
                raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def in_parallel(work: Callable[[kube.KubeClient, int], None], count: int, plane: ControlPlane) -> None:
    """``work(client, i)`` for i in range(count), on WRITERS threads with a client each."""
    def run(offset: int) -> None:
        with kube.KubeClient.from_environment(kubeconfig=plane.kubeconfig) as client:
            for i in range(offset, count, WRITERS):
                work(client, i)
    threads = [threading.Thread(target=run, args=(w,)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def create_nodes(plane: ControlPlane, first: int, count: int) -> None:
    def create(client: kube.KubeClient, i: int) -> None:
        node = gpu_node(node_name(first + i), f"rack-{(first + i) // RACK_SIZE:04d}")
        for key in ("uid", "resourceVersion", "creationTimestamp"):
            node["metadata"].pop(key, None)
        client.create(kube.node_path(), {"apiVersion": "v1", "kind": "Node", **node})
    in_parallel(create, count, plane)


def create_powercapnodes(plane: ControlPlane, count: int) -> None:
    def create(client: kube.KubeClient, i: int) -> None:
        try:
            client.create(kube.powercapnode_path(), node_object(node_name(i)))
        except kube.Conflict:
            pass
    in_parallel(create, count, plane)


def settle(plane: ControlPlane, quiet_s: float = 3.0, limit_s: float = 180.0) -> None:
    """Wait until no Node changes for ``quiet_s``: kube-controller-manager's TTL controller
    rewrites every Node's ttl annotation when the cluster's size crosses 100, 500, 1,000 or
    2,000 nodes, which would otherwise count as telemetry's events."""
    counts = Counts()
    stop = threading.Event()
    with kube.KubeClient.from_environment(kubeconfig=plane.kubeconfig) as client:
        watch_counting(client, kube.node_path(), counts, stop)
        deadline = time.monotonic() + limit_s
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if counts.events != last:
                last, quiet_since = counts.events, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
        stop.set()
        client.close()


def publish_load(plane: ControlPlane, design: str, nodes: int, interval_s: float, window_s: float) -> dict[str, Any]:
    """N agents publishing every ``interval_s`` for ``window_s``, as ``design`` writes."""
    settle(plane)
    documents = [telemetry(1500.0 + 10 * k, pods=pods_of(0)) for k in range(64)]  # 64 power readings, rotated
    sent = Counts()
    received = Counts()  # response bodies
    latencies: list[float] = []
    latency_lock = threading.Lock()
    started = time.monotonic() + 1.0
    deadline = started + window_s

    def writer(offset: int) -> None:
        mine = list(range(offset, nodes, WRITERS))
        due = {i: started + interval_s * i / nodes for i in mine}
        with kube.KubeClient.from_environment(kubeconfig=plane.kubeconfig) as client:
            while True:
                i = min(mine, key=due.__getitem__)
                at = due[i]
                if at >= deadline or time.monotonic() >= deadline:
                    return  # the window is over (a writer behind its schedule stops with it)
                wait_s = at - time.monotonic()
                if wait_s > 0:
                    time.sleep(wait_s)
                text = documents[(i + int(at)) % len(documents)]
                begun = time.perf_counter()
                if design == "annotation":
                    body = {"metadata": {"annotations": {TELEMETRY_ANNOTATION: text}}}
                    answer = kube.patch_node_annotations(client, node_name(i), {TELEMETRY_ANNOTATION: text})
                else:
                    body = status_patch(from_json(text))
                    answer = kube.publish_node_status(client, node_object(node_name(i)), body)
                took = time.perf_counter() - begun
                sent.add(compact_size(body))
                received.add(compact_size(answer))
                with latency_lock:
                    latencies.append(took)
                due[i] = at + interval_s

    stop = threading.Event()
    node_counts, object_counts = Counts(), Counts()
    with kube.KubeClient.from_environment(kubeconfig=plane.kubeconfig) as watcher_nodes, \
            kube.KubeClient.from_environment(kubeconfig=plane.kubeconfig) as watcher_objects:
        watchers = [watch_counting(watcher_nodes, kube.node_path(), node_counts, stop),
                    watch_counting(watcher_objects, kube.powercapnode_path(), object_counts, stop)]
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ended = time.monotonic()
        time.sleep(2.0)  # the last events reach the watchers
        stop.set()
        watcher_nodes.close()
        watcher_objects.close()
    for thread in watchers:
        thread.join(5)
    elapsed_s = max(ended - started, window_s)
    writes = sent.events
    return {
        "design": design, "nodes": nodes, "interval_s": interval_s, "window_s": round(elapsed_s, 1),
        "target_writes_s": nodes / interval_s,
        "writes_s": writes / elapsed_s,
        "request_bytes_per_write": sent.bytes / max(writes, 1),
        "response_bytes_per_write": received.bytes / max(writes, 1),
        "write_p50_ms": percentile(latencies, 0.5) * 1000 if latencies else 0.0,
        "write_p99_ms": percentile(latencies, 0.99) * 1000 if latencies else 0.0,
        "node_events_s": node_counts.events / elapsed_s,
        "node_event_bytes": node_counts.bytes / max(node_counts.events, 1),
        "object_events_s": object_counts.events / elapsed_s,
        "object_event_bytes": object_counts.bytes / max(object_counts.events, 1),
    }


def measure_writes(sizes: list[int], interval_s: float, window_s: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="powercap-bench-") as directory:
        plane = start_controlplane(Path(directory))
        try:
            plane.kubectl("apply", "-k", str(REPO_ROOT / "config" / "crd"))
            plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/powercapnodes.powercapping.example.com")
            existing = 0
            for size in sorted(sizes):
                create_nodes(plane, existing, size - existing)
                create_powercapnodes(plane, size)
                existing = size
                for design in DESIGNS:
                    row = publish_load(plane, design, size, interval_s, window_s)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            stop_controlplane(Path(directory))
    return rows


# -- the extender's decision latency, in process ----------------------------------------------

class ListCache:
    """An in-memory stand-in for a watch cache, whose changes go to ``listener`` as events."""

    def __init__(self, name: str, items: list[dict[str, Any]], listener: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.name = name
        self._items = {item["metadata"]["name"]: item for item in items}
        self.version = 1
        self.has_synced = True
        self._listener = listener
        for item in items:
            if listener is not None:
                listener("ADDED", item)

    def items(self) -> list[dict[str, Any]]:
        return list(self._items.values())

    def replace(self, item: dict[str, Any]) -> None:
        self._items[item["metadata"]["name"]] = item
        self.version += 1
        if self._listener is not None:
            self._listener("MODIFIED", item)

    def start(self) -> None: ...

    def stop(self) -> None: ...


def measure_decisions(updates_per_cycle: int, cycles: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    count = 5000
    racks = [f"rack-{r:04d}" for r in range(count // RACK_SIZE)]
    pods = [gpu_pod(f"llama-{i}-{j}", gpus=4, node=node_name(i), bound_at=NOW - timedelta(minutes=10),
                    labels={"app.kubernetes.io/name": f"svc-{(i + j) % 4}"}) for i in range(count) for j in range(2)]
    # four services, each limiting a quarter of the racks (a policy holds at most 256 rack constraints)
    policies = [policy(f"svc-{k}", cap_w=5_000_000, racks=[{"rackId": rack, "maxPower": 40000} for rack in racks[k::4]],
                       selector={"matchLabels": {"app.kubernetes.io/name": f"svc-{k}"}}) for k in range(4)]
    documents = [telemetry(1500.0 + 10 * k, pods=pods_of(0)) for k in range(64)]
    registry = AlgorithmRegistry.default(discover=lambda: [])
    setups = {}
    for design in DESIGNS:
        if design == "annotation":
            nodes = ListCache("nodes", [gpu_node(node_name(i), f"rack-{i // RACK_SIZE:04d}", documents[i % 64]) for i in range(count)])
            node_cache: Any = nodes

            def publish(i: int, text: str, nodes: ListCache = nodes) -> None:
                node = nodes._items[node_name(i)]
                nodes.replace({**node, "metadata": {**node["metadata"], "annotations": {
                    **node["metadata"]["annotations"], TELEMETRY_ANNOTATION: text}}})
        else:
            merged = TelemetryNodes()
            plain = ListCache("nodes", [gpu_node(node_name(i), f"rack-{i // RACK_SIZE:04d}") for i in range(count)], merged.node_event)
            objects = ListCache("powercapnodes", [{**node_object(node_name(i)), "status": json.loads(documents[i % 64])}
                                                  for i in range(count)], merged.object_event)
            merged.attach(plain, objects)
            node_cache = merged

            def publish(i: int, text: str, objects: ListCache = objects) -> None:
                objects.replace({**node_object(node_name(i)), "status": json.loads(text)})
        source = CacheSource(node_cache, ListCache("pods", pods), ListCache("policies", policies), ClusterSettings(),
                             registry, clock=lambda: NOW, settle_gc=True)
        setups[design] = (source, create_app(source, registry).test_client(), publish)
    pod = gpu_pod("llama-new", gpus=2, labels={"app.kubernetes.io/name": "svc-0"})
    candidates = [node_name(i) for i in rng.sample(range(count), 500)]
    body = json.dumps({"Pod": pod, "Nodes": None, "NodeNames": candidates}).encode()
    samples: dict[str, list[float]] = {design: [] for design in DESIGNS}
    passed: dict[str, int] = {}
    settle_garbage_collector()
    # the designs take turns, cycle by cycle, with the same updates: what else runs on the
    # machine meanwhile weighs on both alike
    for cycle in range(cycles + 3):
        updated = [rng.randrange(count) for _ in range(updates_per_cycle)]
        for design, (source, client, publish) in setups.items():
            for u, i in enumerate(updated):
                publish(i, documents[(cycle + u) % 64])
            started = time.perf_counter()
            names = client.post("/filter", data=body).get_json()["NodeNames"]
            second = json.dumps({"Pod": pod, "Nodes": None, "NodeNames": names}).encode()
            client.post("/prioritize", data=second)
            if cycle >= 3:  # the first builds the view cold
                samples[design].append(time.perf_counter() - started)
            passed[design] = len(names)
    rows = []
    for design, (source, _, _) in setups.items():
        assert not source.current().invalid_policies, source.current().invalid_policies
        rows.append({"design": design, "updates_per_cycle": updates_per_cycle, "cycles": cycles,
                     "passed": passed[design], "p50_ms": percentile(samples[design], 0.5) * 1000,
                     "p99_ms": percentile(samples[design], 0.99) * 1000})
    return rows


# -- output ------------------------------------------------------------------------------------

def markdown(writes: list[dict[str, Any]], decisions: list[dict[str, Any]], interval_s: float) -> str:
    lines = [
        f"Publishing every {interval_s:g} s per node (measured on the real API server for the window; "
        "*at target* = the per-write figures times the target rate, where the writers fell behind):",
        "",
        "| nodes | design | target writes/s | achieved writes/s | write p50 / p99 ms | sent B/write | "
        "answer B/write | Node watcher: events/s | Node watcher: B/event | Node watcher KB/s at target | "
        "PowerCapNode watcher: events/s | B/event |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in writes:
        per_write_node_events = row["node_events_s"] / max(row["writes_s"], 1e-9)
        at_target_kb_s = per_write_node_events * row["node_event_bytes"] * row["target_writes_s"] / 1000
        lines.append(
            f"| {row['nodes']} | {row['design']} | {row['target_writes_s']:.0f} | {row['writes_s']:.0f} | "
            f"{row['write_p50_ms']:.1f} / {row['write_p99_ms']:.1f} | {row['request_bytes_per_write']:.0f} | "
            f"{row['response_bytes_per_write']:.0f} | {row['node_events_s']:.0f} | {row['node_event_bytes']:.0f} | "
            f"{at_target_kb_s:.0f} | {row['object_events_s']:.0f} | {row['object_event_bytes']:.0f} |")
    lines += [
        "",
        "Extender decision (filter with 500 candidate names + prioritize, 5,000 nodes, 10,000 pods), "
        "after each batch of telemetry updates:",
        "",
        "| design | updates per cycle | cycles | nodes passed | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in decisions:
        lines.append(f"| {row['design']} | {row['updates_per_cycle']} | {row['cycles']} | {row['passed']} | "
                     f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--interval-s", type=float, default=5.0, help="each agent publishes this often (5: busy, 30: quiet)")
    parser.add_argument("--window-s", type=float, default=20.0, help="how long the writers run per design and size")
    parser.add_argument("--updates-per-cycle", type=int, nargs="+", default=[0, 50])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--skip-writes", action="store_true", help="only the in-process decision latency")
    args = parser.parse_args(argv)
    where = machine()
    writes = [] if args.skip_writes else measure_writes(args.nodes, args.interval_s, args.window_s)
    decisions = [row for updates in args.updates_per_cycle for row in measure_decisions(updates, args.cycles)]
    print(where)
    print(markdown(writes, decisions, args.interval_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
