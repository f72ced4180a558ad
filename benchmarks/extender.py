"""Extender latency and throughput: filter + prioritize, both nodeCacheCapable modes.

    .venv/bin/python benchmarks/extender.py [--quick] [--markdown]

Cluster: 5000 realistic 8-GPU nodes (~14 KB of JSON each: labels, annotations, capacity,
conditions, nodeInfo, 50 images) in 625 racks of 8, each rack limited by a policy; two
bound GPU pods per node (10 000 pods); four policies. For 100, 500, 1000 and 5000
candidate nodes it times one scheduling cycle, a POST /filter then a POST /prioritize
(with the nodes that passed), through the Flask app in process (WSGI: body decoding,
decision, response encoding; no socket), and reports p50/p99.

Sustained pods/s: kube-scheduler's loop at 5000 nodes with 500 candidates per pod
(NodeNames mode): filter, prioritize, bind (a new Pod in the cache, so the next call
rebuilds the cluster view from the previous one), for a fixed number of pods.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, percentile  # noqa: E402
from extender import wire  # noqa: E402
from extender.app import create_app  # noqa: E402
from powercap.runtime.sources import CacheSource, settle_garbage_collector  # noqa: E402
import msgspec  # noqa: E402

from powercap.algorithms import AlgorithmRegistry  # noqa: E402
from powercap.cluster import ClusterSettings, build_cluster_view  # noqa: E402
from tests.fakes.objects import NOW, extender_args, gpu_node, gpu_pod, policy, telemetry  # noqa: E402

NODES = 5000
RACK_SIZE = 8
SIZES = (100, 500, 1000, 5000)


class ListCache:
    """An in-memory stand-in for powercap.kube.WatchCache: items, version, synced."""

    def __init__(self, name: str, items: list[dict[str, Any]]) -> None:
        self.name = name
        self._items = items
        self.version = 1
        self.has_synced = True

    def items(self) -> list[dict[str, Any]]:
        return list(self._items)

    def add(self, item: dict[str, Any]) -> None:
        self._items.append(item)
        self.version += 1

    def start(self) -> None: ...

    def stop(self) -> None: ...


def build_cluster(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    nodes, pods = [], []
    for i in range(NODES):
        name = f"gpu-{i:05d}"
        power_w = rng.uniform(1500, 4500)
        inlet_c = rng.uniform(19, 27)
        nodes.append(gpu_node(name, f"rack-{i // RACK_SIZE:03d}", telemetry(power_w, inlet_c=inlet_c,
                                                                            pods=[f"inference/p-{i}-0"] * 4 + [f"inference/p-{i}-1"] * 4)))
        for j in range(2):
            pods.append(gpu_pod(f"p-{i}-{j}", gpus=4, node=name, bound_at=NOW - timedelta(minutes=10),
                                labels={"app.kubernetes.io/name": f"svc-{(i + j) % 4}"}))
    racks = [f"rack-{r:03d}" for r in range(NODES // RACK_SIZE)]
    policies = []
    for k, algorithm in enumerate(({"name": "headroom"}, {"name": "thermal-aware"},
                                   {"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 4000}},
                                   {"name": "headroom"})):
        constraints = [{"rackId": rack, "maxPower": 30000 + 1000 * k, "maxTemperature": 28 + k} for rack in racks[k::4]]
        policies.append(policy(f"svc-{k}", cap_w=5_000_000, racks=constraints, algorithm=algorithm,
                               selector={"matchLabels": {"app.kubernetes.io/name": f"svc-{k}"}}))
    return nodes, pods, policies


def time_cycles(client: Any, pod: dict[str, Any], candidates: list[dict[str, Any]], cache_capable: bool, runs: int) -> list[float]:
    """Seconds the extender spends on one filter + prioritize cycle (its request handling,
    body decoding and encoding included; the client building bodies and reading answers excluded)."""
    body = extender_args(pod, candidates, node_cache_capable=cache_capable)
    by_name = {n["metadata"]["name"]: n for n in candidates}
    # kube-scheduler's objects live in its own process: keep this client's out of the
    # extender's garbage collector, as the extender keeps its caches out (sources.py)
    settle_garbage_collector()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        filtered_response = client.post("/filter", data=body)
        filter_s = time.perf_counter() - started
        filtered = wire.decode_filter_result(filtered_response.get_data())
        passed = filtered.NodeNames if cache_capable else wire.decode_args(
            msgspec.json.encode({"Pod": {}, "Nodes": filtered.Nodes}))[1].names
        second = extender_args(pod, [by_name[name] for name in passed], node_cache_capable=cache_capable)
        started = time.perf_counter()
        scores_response = client.post("/prioritize", data=second)
        prioritize_s = time.perf_counter() - started
        assert len(msgspec.json.decode(scores_response.get_data())) == len(passed)
        samples.append(filter_s + prioritize_s)
    return samples


def measure(quick: bool) -> dict[str, Any]:  # noqa: C901 - one linear script
    rng = random.Random(42)
    nodes, pods, policies = build_cluster(rng)
    registry = AlgorithmRegistry.default(discover=lambda: [])
    settings = ClusterSettings()
    clock = lambda: NOW  # noqa: E731 - a frozen clock: telemetry stays fresh for the whole run
    node_cache, pod_cache, policy_cache = ListCache("nodes", nodes), ListCache("pods", pods), ListCache("policies", policies)
    source = CacheSource(node_cache, pod_cache, policy_cache, settings, registry, clock=clock, settle_gc=True)

    started = time.perf_counter()
    view = build_cluster_view(nodes, pods, policies, NOW, settings, registry=registry)
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    build_cluster_view(nodes, pods + [gpu_pod("one-more", gpus=1, node="gpu-00000")], policies, NOW, settings, registry=registry, previous=view)
    warm_s = time.perf_counter() - started

    client = create_app(source, registry).test_client()
    pod = gpu_pod("llama-new", gpus=2, labels={"app.kubernetes.io/name": "svc-0"})
    rows = []
    for size in SIZES:
        candidates = rng.sample(nodes, size)
        for cache_capable in (True, False):
            runs = (20 if quick else 500) if cache_capable else max(3, (5 if quick else 30) * 1000 // max(size, 1000))
            time_cycles(client, pod, candidates, cache_capable, 2)  # warm-up
            samples = time_cycles(client, pod, candidates, cache_capable, runs)
            rows.append({"mode": "NodeNames" if cache_capable else "Nodes", "candidates": size, "runs": runs,
                         "p50_ms": percentile(samples, 0.5) * 1000, "p99_ms": percentile(samples, 0.99) * 1000})

    # sustained: filter + prioritize + bind, each binding moving the Pod cache's version
    pods_to_place = 100 if quick else 400
    candidates_500 = [n["metadata"]["name"] for n in nodes[:500]]
    placed = 0
    started = time.perf_counter()
    for i in range(pods_to_place):
        new_pod = gpu_pod(f"burst-{i}", gpus=1, labels={"app.kubernetes.io/name": f"svc-{i % 4}"})
        body = json.dumps({"Pod": new_pod, "Nodes": None, "NodeNames": rng.sample(candidates_500, 500)}).encode()
        filtered = client.post("/filter", data=body).get_json()
        if not filtered["NodeNames"]:
            continue
        second = json.dumps({"Pod": new_pod, "Nodes": None, "NodeNames": filtered["NodeNames"]}).encode()
        scores = client.post("/prioritize", data=second).get_json()
        best = max(scores, key=lambda s: s["Score"])["Host"]
        pod_cache.add(gpu_pod(f"burst-{i}", gpus=1, node=best, bound_at=NOW + timedelta(seconds=1),
                              labels={"app.kubernetes.io/name": f"svc-{i % 4}"}))
        placed += 1
    sustained_s = time.perf_counter() - started
    return {
        "rows": rows,
        "cold_build_ms": cold_s * 1000,
        "warm_build_ms": warm_s * 1000,
        "sustained_pods_per_s": placed / sustained_s,
        "sustained_pods": placed,
        "racks": len(view.racks),
        "pods": len(pods),
        "node_json_bytes": len(json.dumps(nodes[0])),
    }


TARGETS_MS = {("NodeNames", 500): 5.0, ("NodeNames", 5000): 25.0, ("Nodes", 5000): 250.0}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| mode | candidates | runs | p50 ms | p99 ms | target p99 |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["rows"]:
        target = TARGETS_MS.get((row["mode"], row["candidates"]))
        verdict = "" if target is None else f"<= {target:g} ms {'met' if row['p99_ms'] <= target else 'MISSED'}"
        lines.append(f"| {row['mode']} | {row['candidates']} | {row['runs']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {verdict} |")
    lines += [
        "",
        f"- Sustained (NodeNames, 500 candidates of 5000 nodes, every binding moving the Pod cache): "
        f"**{result['sustained_pods_per_s']:.0f} pods/s** over {result['sustained_pods']} pods.",
        f"- Cluster view rebuild at 5000 nodes / {result['pods']} pods / {result['racks']} racks: "
        f"{result['cold_build_ms']:.0f} ms cold, {result['warm_build_ms']:.0f} ms from the previous view.",
        f"- One Node object is {result['node_json_bytes']} bytes of JSON.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    parser.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md table")
    args = parser.parse_args(argv)
    where = machine()
    result = measure(args.quick)
    print(where)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
