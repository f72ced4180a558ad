"""``powercap controller``: the budget controller, in a cluster or once over a snapshot.

In a cluster (the default) it runs leader-elected on a coordination.k8s.io Lease, in its
own container of the ``power-aware-scheduler`` Deployment, and writes each policy's
``status`` (see :mod:`controller.loop`). ``--once`` prints what one round would write
and writes nothing: over a snapshot with ``--cluster-state FILE`` (``kubectl get
nodes,pods,pcp -A -o yaml``), else over the cluster as listed now. Exit status 2: bad
usage, an unreadable snapshot, or no way to reach a cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TextIO

import yaml

from controller.loop import (
    DEFAULT_INTERVAL_S,
    BudgetController,
    CacheSnapshots,
    ControllerMetrics,
    ControllerSettings,
    ListSnapshots,
    Snapshot,
)
from powercap.runtime.cliargs import add_cluster_view_arguments, add_log_level_argument, bind_address, cluster_view_settings, positive_seconds
from powercap.runtime.httpserver import HttpServer, Route, check_reply, metrics_route
from powercap.runtime.logs import configure_logging
from powercap.runtime.sources import load_state, snapshot_time, utc_now
from powercap import API_GROUP, API_VERSION, KIND, kube
from powercap.algorithms import AlgorithmRegistry
from powercap.allocation import AllocationSettings
from powercap.budget import FOLLOW_UP_S, QUEUE_ROUND_S, RoundPlan, plan_round
from powercap.cluster import ClusterSettings, build_cluster_view
from powercap.marginal import MarginalSettings
from powercap.numeric import counted
from powercap.rebalance import Decision, plan_rebalance
from powercap.runtime.documents import LOAD_ERRORS, describe_load_error

EXIT_USAGE = 2
DEFAULT_HEALTH_BIND = "127.0.0.1:8081"
DEFAULT_LEASE_NAMESPACE = "powercap-system"
DEFAULT_LEASE_NAME = "powercap-controller"
log = logging.getLogger("controller")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "controller",
        help="budget controller: split each policy's powerCapLimit into per-GPU caps",
        description="Allocate every PowerCappingPolicy's powerCapLimit (less --margin, 0 by default) across "
        "its GPUs and write the caps and conditions to the policy's status, leader-elected on a Lease. "
        "With --once, print what one round would write (for a snapshot given with --cluster-state, "
        "or for the cluster as it is now) and write nothing.",
    )
    parser.add_argument("--once", action="store_true", help="print one round's allocations and statuses; write nothing")
    parser.add_argument("--cluster-state", metavar="FILE",
                        help="with --once: a snapshot (kubectl get nodes,pcn,pods,pcp -A -o yaml) instead of the cluster")
    parser.add_argument("--output", "-o", choices=("table", "json", "yaml"), default="table",
                        help="with --once: a readable table (default), or the statuses as a Kubernetes List")
    parser.add_argument("--interval", default=DEFAULT_INTERVAL_S, type=positive_seconds, metavar="SECONDS",
                        help=f"seconds between rounds (default {DEFAULT_INTERVAL_S:g})")
    parser.add_argument("--transition-follow-up", default=FOLLOW_UP_S, type=follow_up_seconds, metavar="SECONDS",
                        help="after a round that postponed raises until lowered caps are in force, run the next one "
                        "this many seconds later instead of a whole --interval, so the raises land as soon as the "
                        f"agents report the lowers (default {FOLLOW_UP_S:g}; 0 turns it off)")
    parser.add_argument("--queue-round", default=QUEUE_ROUND_S, type=follow_up_seconds, metavar="SECONDS",
                        help="when a GPU's pod begins having requests waiting (its agent publishes that at once), run "
                        "the next round this many seconds after the last one instead of a whole --interval, so the "
                        f"queued GPU gets the surplus first (default {QUEUE_ROUND_S:g}; 0 turns it off)")
    parser.add_argument("--margin", default=AllocationSettings().margin, type=margin_fraction, metavar="FRACTION",
                        help="share of powerCapLimit held back below it, for a breaker that trips on sub-second "
                        "power peaks (default 0: the caps in force sum to powerCapLimit; 0.03 is 3 %%)")
    parser.add_argument("--marginal-rebalancing", default=MarginalSettings().enabled, action=argparse.BooleanOptionalAction,
                        help="re-split the watts of a service's GPUs in one rack toward equal measured tokens per watt "
                        "(needs the pods' token metrics; default on)")
    add_cluster_view_arguments(parser)
    parser.add_argument("--lease-namespace", default=DEFAULT_LEASE_NAMESPACE, metavar="NAMESPACE",
                        help=f"namespace of the leader-election Lease (default {DEFAULT_LEASE_NAMESPACE})")
    parser.add_argument("--lease-name", default=DEFAULT_LEASE_NAME, metavar="NAME",
                        help=f"name of the Lease the replicas share; one of them holds it and runs the rounds (default {DEFAULT_LEASE_NAME})")
    parser.add_argument("--identity", default=None, metavar="ID",
                        help="this replica's name in the Lease (default: $POD_NAME, else host name and a random suffix)")
    parser.add_argument("--health-bind", default=DEFAULT_HEALTH_BIND, type=bind_address, metavar="HOST:PORT",
                        help=f"address of /healthz, /readyz and /metrics (default {DEFAULT_HEALTH_BIND})")
    add_log_level_argument(parser)
    parser.set_defaults(func=run)


MIN_FOLLOW_UP_S = 0.5
"""Below the agents' 1-s tick a follow-up round cannot see their lowers; chained, it would spin."""


def follow_up_seconds(text: str) -> float:
    """argparse ``type=`` of ``--transition-follow-up`` and ``--queue-round``: 0 (off) or a
    finite number of seconds of at least :data:`MIN_FOLLOW_UP_S`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value == 0 or MIN_FOLLOW_UP_S <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (off) or at least {MIN_FOLLOW_UP_S:g} seconds")
    return value


def margin_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must be at least 0 and less than 1 (0.03 is 3 %)")
    return value


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.cluster_state and not args.once:
        print("powercap controller: error: --cluster-state needs --once (the loop runs against a cluster)",
              file=sys.stderr)
        return EXIT_USAGE
    cluster_settings = cluster_view_settings(args)
    settings = ControllerSettings(
        interval_s=args.interval,
        follow_up_s=args.transition_follow_up,
        queue_round_s=args.queue_round,
        allocation=AllocationSettings(margin=args.margin, marginal=MarginalSettings(enabled=args.marginal_rebalancing)),
        identity=args.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}",
    )
    registry = AlgorithmRegistry.default()
    if args.once:
        try:
            snapshot = load_snapshot(args.cluster_state, cluster_settings, registry)
        except (SnapshotError, kube.ApiError) as error:
            print(f"powercap controller: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        print_once(snapshot, settings, args.output, sys.stdout)
        return 0
    try:
        client = kube.KubeClient.from_environment()
    except kube.KubeConfigError as error:
        print(f"powercap controller: error: {error}; use --once --cluster-state FILE to plan a snapshot "
              "without a cluster", file=sys.stderr)
        return EXIT_USAGE
    return serve(client, cluster_settings, registry, settings, args)


class SnapshotError(Exception):
    """A snapshot that cannot be read; the message names the file and the problem."""


def load_snapshot(path: str | None, settings: ClusterSettings, registry: AlgorithmRegistry) -> Snapshot:
    """The snapshot in ``path`` (evaluated at its newest telemetry), or the cluster listed now."""
    if path is None:
        try:
            client = kube.KubeClient.from_environment()
        except kube.KubeConfigError as error:
            raise SnapshotError(f"{error}; pass --cluster-state FILE to plan a snapshot") from None
        with client:
            return ListSnapshots(client, settings, registry).snapshot()
    try:
        with open(path, "rb") as handle:
            nodes, pods, policies = load_state(handle.read().decode("utf-8"))
    except LOAD_ERRORS as error:
        raise SnapshotError(f"{path}: {describe_load_error(error)}") from None
    now = snapshot_time(nodes) or utc_now()
    view = build_cluster_view(nodes, pods, policies, now, settings, registry=registry)
    return Snapshot(view, nodes, pods)


def print_once(snapshot: Snapshot, settings: ControllerSettings, output: str, out: TextIO) -> None:
    plan = plan_round(snapshot.view, settings.allocation)
    if output == "table":
        decisions = {
            key: plan_rebalance(pv, snapshot.view, snapshot.pods, snapshot.nodes, None)
            for key, pv in snapshot.view.policies.items() if pv.policy.algorithm.name == "energy-aware-scheduling"
        }
        write_table(plan, snapshot, decisions, out)
        return
    documents = statuses_as_list(plan)
    if output == "json":
        out.write(json.dumps(documents, indent=2) + "\n")
    else:
        yaml.safe_dump(documents, out, sort_keys=False)


def statuses_as_list(plan: RoundPlan) -> dict[str, Any]:
    """The statuses one round would write, as ``kubectl get pcp -o yaml`` would show them."""
    return {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "metadata": {"name": p.policy.name, "namespace": p.policy.namespace},
                "status": dict(p.status),
            }
            for _, p in sorted(plan.policies.items())
        ],
    }


def write_table(plan: RoundPlan, snapshot: Snapshot, decisions: Mapping[str, Decision], out: TextIO) -> None:
    view = snapshot.view
    out.write(f"budget controller round at {plan.now.isoformat(timespec='seconds')} "
              f"({counted(len(plan.policies), 'policy', 'policies')}, {counted(len(view.nodes), 'node')})\n")
    for warning in view.warnings:  # invalid policies among them: they are not allocated
        out.write(f"warning: {warning}\n")
    for key, policy_plan in sorted(plan.policies.items()):
        policy, status = policy_plan.policy, policy_plan.status
        power = f"{status['powerW']} W" if "powerW" in status else "unknown"
        ratio = f"ratio {status['ratio']:g} tokens/J  " if "ratio" in status else ""
        out.write(
            f"\n{key}  {policy.mode.value}  cap {policy.power_cap_w} W  budget {status['budgetW']} W  "
            f"power {power}  {counted(status['gpus'], 'GPU')}  {ratio}"
            f"({'status would change' if policy_plan.changed else 'status unchanged'})\n"
        )
        measured = {g.gpu.uuid: g.gpu for g in view.policies[key].gpus}
        rows = [("NODE", "GPU", "CAP W", "DEMAND W", "POWER W", "LIMIT W", "LIMITED BY")]
        for cap in policy_plan.allocation.caps:
            gpu = measured.get(cap.uuid)
            rows.append((cap.node, cap.uuid, str(cap.cap_w), f"{cap.demand_w:.0f}",
                         f"{gpu.power_w:.0f}" if gpu else "-", f"{gpu.limit_w:.0f}" if gpu else "-", cap.bound.value))
        if len(rows) > 1:
            _write_rows(rows, out)
        _write_rows([(c["type"], c["status"], c["reason"], c["message"]) for c in status["conditions"]], out)
        for rack in status.get("racks") or ():
            temperature = f", inlet {rack['temperatureC']} °C" if rack.get("temperatureC") is not None else ""
            out.write(f"  rack {rack['rackId']}: {rack['powerW']} W{temperature}\n")
        decision = decisions.get(key)
        if decision is not None:
            out.write(f"  rebalance: {decision.move.message if decision.move else 'none (' + decision.reason + ')'}\n")


def _write_rows(rows: Sequence[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        out.write("  " + "  ".join(cells).rstrip() + "\n")


def serve(client: kube.KubeClient, cluster_settings: ClusterSettings, registry: AlgorithmRegistry,
          settings: ControllerSettings, args: argparse.Namespace) -> int:
    """Run the leader-elected loop until SIGTERM or SIGINT; release the Lease on the way out."""
    snapshots = CacheSnapshots.on(client, cluster_settings, registry)
    metrics = ControllerMetrics()
    elector: kube.LeaderElector | None = None
    controller = BudgetController(client, snapshots, settings, metrics=metrics,
                                  is_leader=lambda: elector is not None and elector.is_leader)
    snapshots.on_queue_formed(controller.queue_formed)
    elector = kube.LeaderElector(
        client, args.lease_namespace, args.lease_name, settings.identity,
        on_started_leading=controller.started_leading, on_stopped_leading=controller.stopped_leading,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    health = HttpServer.on(args.health_bind, health_routes(controller, snapshots, metrics), name="controller-health")
    log.info("powercap controller starting", extra={
        "identity": settings.identity, "lease": f"{args.lease_namespace}/{args.lease_name}",
        "interval_s": settings.interval_s, "follow_up_s": settings.follow_up_s,
        "queue_round_s": settings.queue_round_s, "margin": settings.allocation.margin,
        "marginal_rebalancing": settings.allocation.marginal.enabled, "health": args.health_bind,
        "node_overhead_w": cluster_settings.node_overhead_w, "non_gpu_rise": cluster_settings.non_gpu_rise,
    })
    health.start()
    snapshots.start()
    elector.start()
    try:
        controller.run(stop)
    finally:
        elector.stop()  # releases the Lease: a standby takes over at once
        snapshots.stop()
        health.stop()
        client.close()
    log.info("powercap controller stopped", extra={"identity": settings.identity})
    return 0


def health_routes(controller: BudgetController, snapshots: Readiness, metrics: ControllerMetrics) -> dict[str, Route]:
    """``/healthz`` (the loop ran lately), ``/readyz`` (caches synced) and ``/metrics``."""
    return {
        "/healthz": lambda: check_reply(loop_stall(controller, datetime.now().timestamp())),
        "/readyz": lambda: check_reply(snapshots.readiness()),
        "/metrics": metrics_route(metrics.registry),
    }


class Readiness(Protocol):
    def readiness(self) -> str | None: ...


def loop_stall(controller: BudgetController, now_s: float) -> str | None:
    """Why the loop looks stuck (no round for 3 intervals and a minute), or None."""
    last_s = controller.last_round_s
    if last_s is not None and now_s - last_s > 3 * controller.settings.interval_s + 60:
        return f"no round for {now_s - last_s:.0f} s"
    return None
