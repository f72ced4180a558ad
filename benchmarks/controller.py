"""Budget controller: allocation latency at 10,000 GPUs, and status writes of a steady cluster.

    .venv/bin/python benchmarks/controller.py [--quick] [--write docs/benchmarks.md]

1. **Allocation** (:func:`powercap.allocation.allocate`, the pure formula) for 10,000 GPUs
   on 1,000 nodes (10 GPUs each) in 50 racks of 20 nodes, 25 of them limited by a
   ``maxPower`` that binds. Every GPU has a previous cap (steady state: deadband and safe
   transitions run), 1 % of them sit on nodes with stale telemetry. Two shapes: one
   service of 10,000 GPUs, and 100 services of 100 GPUs spread across the racks (racks
   shared between services). Target: p99 <= 50 ms. (To compare two versions, run this
   script in a checkout of each, back to back: docs/benchmarks.md does so.)
2. **One whole round** (:func:`powercap.budget.plan_round`: allocation plus every status,
   from a cluster view of those 1,000 nodes and 100 policies).
3. **Status writes per minute** of a steady cluster, through the real controller
   (:class:`controller.loop.BudgetController`) and HTTP client against the fake API
   server: 100 nodes x 8 GPUs, 20 policies, 5 constrained racks, a round every 5 s of
   simulated time for 15 minutes. Each round the simulated node agents apply the
   published caps and report fresh telemetry in which every GPU's power moves by up to
   +-1 % or +-3 % (demand noise). Counted: PUTs to ``/status`` (and the GETs before them).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, percentile, write_section  # noqa: E402
from controller.loop import BudgetController, ControllerSettings, ListSnapshots  # noqa: E402
from powercap.runtime.sources import settle_garbage_collector  # noqa: E402
from powercap import kube  # noqa: E402
from powercap.algorithms import AlgorithmRegistry  # noqa: E402
from powercap.allocation import GpuState, RackLimit, Service, allocate  # noqa: E402
from powercap.budget import plan_round  # noqa: E402
from powercap.cluster import ClusterSettings, build_cluster_view  # noqa: E402
from powercap.telemetry import TELEMETRY_ANNOTATION, GpuTelemetry, from_json  # noqa: E402
from tests.fakes.apiserver import FakeApiServer  # noqa: E402
from tests.fakes.clusters import Gpu, agents_apply, node  # noqa: E402
from tests.fakes.objects import NOW, gpu_pod, policy  # noqa: E402

GPUS_PER_NODE = 10
NODES = 1000
RACK_NODES = 20
SECTION = "## Budget controller"
STEADY_MINUTES = 5  # the last minutes of the simulation count as steady state


def allocation_inputs(rng: random.Random, services: int) -> tuple[list[Service], list[RackLimit]]:
    """10,000 GPUs on 1,000 nodes; ``services`` services dealt round-robin over the nodes."""
    per_service: list[list[GpuState]] = [[] for _ in range(services)]
    for n in range(NODES):
        rack = f"rack-{n // RACK_NODES:02d}"
        for g in range(GPUS_PER_NODE):
            limit_w = rng.choice([300.0, 450.0, 600.0, 700.0])
            busy = rng.random() < 0.6
            gpu = GpuState(
                uuid=f"GPU-{n:04d}-{g}", node=f"gpu-{n:04d}", rack=rack, min_w=200, max_w=700,
                power_w=limit_w * rng.uniform(0.96, 1.0) if busy else rng.uniform(80, 250),
                limit_w=limit_w, previous_w=limit_w, fresh=rng.random() > 0.01,
            )
            per_service[(n * GPUS_PER_NODE + g) % services].append(gpu)
    result = [Service(f"bench/svc-{s:03d}", len(gpus) * 430, tuple(gpus)) for s, gpus in enumerate(per_service)]
    racks = [RackLimit(f"rack-{r:02d}", RACK_NODES * GPUS_PER_NODE * 420, rng.uniform(0, 4000)) for r in range(0, NODES // RACK_NODES, 2)]
    return result, racks


class Timing(NamedTuple):
    p50_ms: float   # wall clock
    p99_ms: float   # wall clock
    cpu_p50_ms: float


class AllocationRow(NamedTuple):
    shape: str
    timing: Timing


def time_calls(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, Timing]:
    """Each call timed ``runs`` times after a warm-up, the calls alternating (the same machine state)."""
    samples: dict[str, tuple[list[float], list[float]]] = {}
    for name, call in calls.items():
        call()
        samples[name] = ([], [])
    for _ in range(runs):
        for name, call in calls.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            call()
            samples[name][0].append((time.perf_counter() - started) * 1000)
            samples[name][1].append((time.process_time() - started_cpu) * 1000)
    return {name: Timing(statistics.median(wall), percentile(wall, 0.99), statistics.median(cpu))
            for name, (wall, cpu) in samples.items()}


def bench_allocation(runs: int) -> list[AllocationRow]:
    """Per shape, ``allocate`` timed ``runs`` times."""
    rows = []
    for label, services in (("1 service x 10,000 GPUs", 1), ("100 services x 100 GPUs, shared racks", 100)):
        inputs, racks = allocation_inputs(random.Random(7), services)
        # The controller process takes its long-lived objects (caches, the view) out of the
        # cyclic collector after each rebuild (powercap.runtime.sources.settle_garbage_collector), so
        # a full collection does not scan them in the middle of a round; do the same here.
        settle_garbage_collector()
        try:
            timing = time_calls({"allocate": lambda: allocate(inputs, racks)}, runs)["allocate"]
        finally:
            gc.unfreeze()
        rows.append(AllocationRow(label, timing))
    return rows


def cluster_objects(rng: random.Random, nodes: int, gpus_per_node: int, policies: int, racks_every: int,
                    rack_nodes: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes with per-GPU telemetry, 4-GPU pods, and policies dealt round-robin over the pods."""
    node_objects, pods = [], []
    pods_per_node = gpus_per_node // 4 or 1
    for n in range(nodes):
        name = f"gpu-{n:04d}"
        gpus = []
        for p in range(pods_per_node):
            service = (n * pods_per_node + p) % policies
            pod = f"svc-{service:03d}-{n}-{p}"
            pods.append(gpu_pod(pod, gpus=4, node=name, labels={"app.kubernetes.io/name": f"svc-{service:03d}"},
                                bound_at=NOW - timedelta(hours=1)))
            for g in range(4):
                demand_w = rng.uniform(150, 700)
                gpus.append(Gpu(f"GPU-{n:04d}-{p}-{g}", demand_w, 700, f"inference/{pod}"))
        node_objects.append(node(name, f"rack-{n // rack_nodes:02d}", gpus, capacity=pods_per_node * 4))
    rack_count = (nodes + rack_nodes - 1) // rack_nodes
    limits = [{"rackId": f"rack-{r:02d}", "maxPower": int(rack_nodes * gpus_per_node * 430)}
              for r in range(0, rack_count, racks_every)]
    policy_objects = [
        policy(f"svc-{s:03d}", cap_w=int(nodes * gpus_per_node / policies * 450),
               selector={"matchLabels": {"app.kubernetes.io/name": f"svc-{s:03d}"}}, racks=limits if s == 0 else ())
        for s in range(policies)
    ]
    return node_objects, pods, policy_objects


def bench_round(runs: int) -> Timing:
    nodes, pods, policies = cluster_objects(random.Random(3), NODES, 8, 100, 2, RACK_NODES)
    view = build_cluster_view(nodes, pods, policies, NOW, ClusterSettings())
    return time_calls({"round": lambda: plan_round(view)}, runs)["round"]


def agents_report(server: FakeApiServer, demand_w: dict[str, float], rng: random.Random, at: datetime,
                  noise: float) -> None:
    """Every node agent applies its published caps and reports: power = min(demand x (1 +- noise), cap)."""
    def draw_w(gpu: GpuTelemetry, limit_w: float) -> float:
        return min(demand_w[gpu.uuid] * rng.uniform(1 - noise, 1 + noise), limit_w * rng.uniform(0.985, 1.0))

    for updated in agents_apply(server.objects("nodes"), server.objects("powercappingpolicies"), at=at, draw_w=draw_w):
        server.put_object("nodes", updated)


def bench_writes(minutes: int, noise: float, interval_s: float = 5.0) -> dict[str, Any]:
    rng = random.Random(11)
    nodes, pods, policies = cluster_objects(rng, 100, 8, 20, 2, 10)
    demand_w = {}
    for node_object in nodes:
        for gpu in from_json(node_object["metadata"]["annotations"][TELEMETRY_ANNOTATION]).gpus:
            demand_w[gpu.uuid] = gpu.power_w
    with FakeApiServer() as server:
        for resource, objects in (("nodes", nodes), ("pods", pods), ("powercappingpolicies", policies)):
            for obj in objects:
                server.put_object(resource, obj)
        now = [NOW]
        with kube.KubeClient.for_server(server.url) as client:
            snapshots = ListSnapshots(client, ClusterSettings(), AlgorithmRegistry.default(), clock=lambda: now[0])
            controller = BudgetController(client, snapshots, ControllerSettings(interval_s=interval_s))
            rounds_per_minute = round(60 / interval_s)
            writes_per_minute, gets_per_minute, round_ms = [], [], []
            for _minute in range(minutes):
                server.clear_requests()
                for _ in range(rounds_per_minute):
                    now[0] += timedelta(seconds=interval_s)
                    agents_report(server, demand_w, rng, now[0] - timedelta(seconds=1), noise)
                    started = time.perf_counter()
                    controller.run_round()
                    round_ms.append((time.perf_counter() - started) * 1000)
                status_puts = [r for r in server.requests if r.method == "PUT" and r.path.endswith("/status")]
                policy_gets = [r for r in server.requests if r.method == "GET" and "/powercappingpolicies/" in r.path]
                writes_per_minute.append(len(status_puts))
                gets_per_minute.append(len(policy_gets))
    steady = writes_per_minute[-STEADY_MINUTES:]
    return {
        "policies": len(policies), "nodes": len(nodes), "gpus": len(demand_w), "minutes": minutes,
        "rounds_per_minute": rounds_per_minute, "noise": noise,
        "first_minute": writes_per_minute[0],
        "steady_mean": statistics.mean(steady), "steady_max": max(steady),
        "gets_steady_mean": statistics.mean(gets_per_minute[-STEADY_MINUTES:]),
        "per_minute": writes_per_minute,
        "round_ms_p50": statistics.median(round_ms),
    }


def markdown(allocation_rows: list[AllocationRow], round_ms: Timing, writes, shared_note: str) -> str:
    lines = [
        SECTION,
        "",
        "`benchmarks/controller.py` (see its docstring for the set-up). Machine: "
        f"{machine()}. {shared_note}",
        "",
        "Allocation (`powercap.allocation.allocate`), 10,000 GPUs on 1,000 nodes, 25 of 50 racks limited; target p99 <= 50 ms:",
        "",
        "| shape | p50 ms | p99 ms | CPU time p50 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {row.shape} | {row.timing.p50_ms:.1f} | {row.timing.p99_ms:.1f} | {row.timing.cpu_p50_ms:.1f} |"
              for row in allocation_rows]
    lines += [
        f"| whole round (`plan_round`: allocation + 100 statuses, 8,000 GPUs) | {round_ms[0]:.1f} | {round_ms[1]:.1f} "
        f"| {round_ms[2]:.1f} |",
        "",
        "p50 and p99 are wall-clock times; CPU time leaves out the time the process waited for a core. "
        "The inputs are taken out of Python's cyclic garbage collector before timing, as the controller "
        "process does with its caches after each rebuild (`powercap.runtime.sources.settle_garbage_collector`); "
        "without that, about one call in ten carries a ~20 ms full collection over the 10,000 inputs.",
        "",
    ]
    lines += [
        f"Status writes of a steady cluster ({writes[0]['nodes']} nodes, {writes[0]['gpus']} GPUs, "
        f"{writes[0]['policies']} policies, budgets and 5 racks binding, a round every "
        f"{60 / writes[0]['rounds_per_minute']:g} s, {writes[0]['minutes']} simulated minutes; the real controller "
        "and HTTP client against the fake API server). Every round each GPU's power is its demand times a "
        "random factor in [1 - noise, 1 + noise]:",
        "",
        "| GPU power noise per round | writes in the first minute | steady writes per minute, mean (worst) "
        "| per policy per minute | policy GETs per minute |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for w in writes:
        lines.append(
            f"| +-{w['noise'] * 100:g} % | {w['first_minute']} | {w['steady_mean']:.1f} ({w['steady_max']}) "
            f"| {w['steady_mean'] / w['policies']:.2f} | {w['gets_steady_mean']:.1f} |"
        )
    lines += [
        "",
        f"The first minute is a cold start (every cap at its first allocation, then following demand). "
        f"Steady = the last {STEADY_MINUTES} minutes. Without settling, every policy would be written every round: "
        f"{writes[0]['policies'] * writes[0]['rounds_per_minute']} writes per minute. Writes per minute, minute by "
        + "; ".join(f"+-{w['noise'] * 100:g} %: " + ", ".join(str(n) for n in w["per_minute"]) for w in writes)
        + f". One round over HTTP (list, view, plan, writes) took {writes[0]['round_ms_p50']:.0f} ms at p50.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    parser.add_argument("--write", metavar="FILE", help="replace the '## Budget controller' section of FILE")
    parser.add_argument("--note", default="", help="a sentence about the machine's load while measuring")
    args = parser.parse_args()
    runs = 10 if args.quick else 200
    allocation_rows = bench_allocation(runs)
    for row in allocation_rows:
        t = row.timing
        print(f"allocate, {row.shape}: p50 {t.p50_ms:.1f} ms, p99 {t.p99_ms:.1f} ms, CPU p50 {t.cpu_p50_ms:.1f} ms")
    round_ms = bench_round(3 if args.quick else 30)
    print(f"plan_round, 1,000 nodes, 100 policies: p50 {round_ms[0]:.1f} ms, p99 {round_ms[1]:.1f} ms")
    writes = [bench_writes(STEADY_MINUTES + 1 if args.quick else 15, noise) for noise in (0.01, 0.03)]
    for w in writes:
        print(f"status writes per minute, noise +-{w['noise'] * 100:g} %: first {w['first_minute']}, "
              f"steady mean {w['steady_mean']:.1f}, worst {w['steady_max']} (per minute: {w['per_minute']})")
    section = markdown(allocation_rows, round_ms, writes, args.note)
    if args.write:
        write_section(Path(args.write), SECTION.removeprefix("## "), section)
        print(f"wrote the '{SECTION}' section of {args.write}")
    else:
        print()
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
