"""The budget controller loop: leader election, caches, status writes, Events, evictions.

Every ``interval_s`` (default 5 s), while this replica holds the Lease, one round:

1. take a snapshot (cluster view + raw Nodes and Pods) from the watch caches;
2. plan it with :func:`powercap.budget.plan_round` (pure: allocations, statuses);
3. for each policy whose planned status differs from the stored one, write it through
   the ``/status`` subresource with :func:`powercap.kube.update_status` (GET, compute
   against what is stored now, skip when equal, PUT with the resourceVersion, retry on
   409), then record one Event for every condition that changed
   (:func:`powercap.status.transitions`: against the status read back, so a new leader
   records nothing for a condition that already held);
4. for ``energy-aware-scheduling`` policies, ask :func:`powercap.rebalance.plan_rebalance`
   which pod (if any) to move, and evict it through the Eviction API (a 429 from a
   PodDisruptionBudget means: try again after ``eviction_retry_s``), recording an Event on
   the evicted pod and on the policy.

A round that wrote a policy's changed allocations postponing raises until lowered caps are
in force (:attr:`powercap.budget.RoundPlan.follow_up_keys`: a GPU bound ``transition``) is
followed by the next one after ``follow_up_s`` (default :data:`~powercap.budget.FOLLOW_UP_S`,
1.5 s; never later than ``interval_s``; 0 turns it off) instead of a whole interval: the
agents apply and publish such a lower within a tick or two, and the next round spends the
watts it freed. A round whose writes of such a policy failed, or that wrote none, waits the
interval, so a failing API server is not asked more often. A round whose watch cache still
shows the status this replica's last write replaced writes nothing and waits the interval.
When a PowerCapNode event shows a GPU whose pod began having requests waiting
(:meth:`powercap.runtime.sources.TelemetryNodes.on_queue_formed`, wired to
:meth:`BudgetController.queue_formed`), the next round runs ``queue_round_s`` after the
last one ended (default :data:`~powercap.budget.QUEUE_ROUND_S`, 1 s; 0 turns it off)
if that is sooner: a replica falling behind gets the surplus first (the allocation's step
4) within a second or two of its queue forming, not a whole interval later. Not after a
round whose writes failed, that found the cache behind its writes, or that could not run
(:attr:`RoundReport.may_round_early`): those wait the interval.

A steady cluster produces no write at all: statuses settle (see :mod:`powercap.status`),
and a policy whose planned status equals the cached one is not even read. Leadership is
checked before every write; a replica that loses the Lease stops writing at once and
forgets its in-memory state (lagging GPUs seen last round, the time of the last eviction).
A new leader waits one ``migrationInterval`` before its first eviction.

Everything the loop decides is in the pure core; this module only does I/O and logs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from powercap.runtime.programmetrics import register_program_metrics
from powercap.runtime.sources import Cache, CacheSource, NotReady, TelemetryNodes, cluster_caches, utc_now
from powercap import API_GROUP, API_VERSION, KIND, kube
from powercap.algorithms import AlgorithmRegistry
from powercap.allocation import AllocationSettings
from powercap.budget import FOLLOW_UP_S, QUEUE_ROUND_S, PolicyPlan, RoundPlan, plan_round
from powercap.cluster import ClusterSettings, ClusterView, build_cluster_view
from powercap.nodeobjects import merge_node_objects
from powercap.objects import KubeObject, object_key
from powercap.policies import Policy
from powercap.rebalance import Move, plan_rebalance
from powercap.status import Transition, published_allocations, render_status, transitions

log = logging.getLogger("controller")

REPORTING_CONTROLLER = f"{API_GROUP}/budget-controller"
REBALANCE_REASON = "EnergyRebalance"
DESCHEDULED = "Descheduled"
DEFAULT_INTERVAL_S = 5.0
DEFAULT_EVICTION_RETRY_S = 30.0
_QUEUE_LOOK_S = 0.1  # past queue_round_s, how often the waiting loop looks for a queue formed
# Pods the controller watches: everything not finished, pending ones included (a pending
# pod of a service means the last move has not settled yet).
POD_FIELD_SELECTOR = "status.phase!=Succeeded,status.phase!=Failed"


@dataclass(frozen=True)
class ControllerSettings:
    interval_s: float = DEFAULT_INTERVAL_S
    allocation: AllocationSettings = field(default_factory=AllocationSettings)
    eviction_retry_s: float = DEFAULT_EVICTION_RETRY_S
    write_attempts: int = 5
    identity: str = "powercap-controller"
    follow_up_s: float = FOLLOW_UP_S  # the wait after a round that postponed raises; 0: the interval
    queue_round_s: float = QUEUE_ROUND_S  # the earliest next round once a queue forms; 0: the interval

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be greater than 0, not {self.interval_s}")
        if not self.follow_up_s >= 0:
            raise ValueError(f"follow_up_s must be at least 0 (0 turns the follow-up round off), not {self.follow_up_s}")
        if not self.queue_round_s >= 0:
            raise ValueError(f"queue_round_s must be at least 0 (0 turns the early round off), not {self.queue_round_s}")
        if self.write_attempts < 1:
            raise ValueError(f"write_attempts must be at least 1, not {self.write_attempts}")


@dataclass(frozen=True)
class Snapshot:
    """What one round decides from: the cluster view and the raw Nodes and Pods behind it."""

    view: ClusterView
    nodes: list[KubeObject]
    pods: list[KubeObject]


class Snapshots(Protocol):
    def snapshot(self) -> Snapshot:
        """The cluster now; raises :class:`NotReady` until the source has seen it."""


class CacheSnapshots:
    """Snapshots from the watch caches (Nodes with their PowerCapNodes; unfinished Pods; policies)."""

    def __init__(self, nodes: Cache, pods: Cache, policies: Cache, settings: ClusterSettings,
                 registry: AlgorithmRegistry, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._nodes, self._pods = nodes, pods
        # settle_gc: the controller owns its process; keep full collections from scanning the caches
        self._views = CacheSource(nodes, pods, policies, settings, registry, clock=clock, refresh_s=0.0, settle_gc=True)

    @classmethod
    def on(cls, client: kube.KubeClient, settings: ClusterSettings, registry: AlgorithmRegistry) -> CacheSnapshots:
        return cls(*cluster_caches(client, POD_FIELD_SELECTOR), settings, registry)

    def snapshot(self) -> Snapshot:
        view = self._views.current()
        return Snapshot(view, self._nodes.items(), self._pods.items())

    def readiness(self) -> str | None:
        return self._views.readiness()

    def on_queue_formed(self, listener: Callable[[str], None]) -> None:
        """:meth:`powercap.runtime.sources.TelemetryNodes.on_queue_formed` of the Node cache."""
        if isinstance(self._nodes, TelemetryNodes):
            self._nodes.on_queue_formed(listener)

    def start(self) -> None:
        self._views.start()

    def stop(self) -> None:
        self._views.stop()


class ListSnapshots:
    """Snapshots listed afresh from the API on every call (``powercap controller --once``)."""

    def __init__(self, client: kube.KubeClient, settings: ClusterSettings, registry: AlgorithmRegistry,
                 *, clock: Callable[[], datetime] = utc_now) -> None:
        self._client, self._settings, self._registry, self._clock = client, settings, registry, clock

    def snapshot(self) -> Snapshot:
        nodes = merge_node_objects(self._client.list(kube.node_path())["items"],
                                   self._client.list(kube.powercapnode_path())["items"])
        pods = self._client.list(kube.pod_path(), {"fieldSelector": POD_FIELD_SELECTOR})["items"]
        policies = self._client.list(kube.policy_path())["items"]
        view = build_cluster_view(nodes, pods, policies, self._clock(), self._settings, registry=self._registry)
        return Snapshot(view, nodes, pods)


class ControllerMetrics:
    """Prometheus metrics of the controller, in a registry of their own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        register_program_metrics(self.registry)
        self.rounds = Counter("powercap_controller_rounds_total", "Controller rounds run as leader.",
                              registry=self.registry)
        self.round_seconds = Histogram("powercap_controller_round_seconds", "Duration of one round.",
                                       registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.status_writes = Counter("powercap_controller_status_writes_total",
                                     "Policy statuses written through the status subresource.", registry=self.registry)
        self.write_failures = Counter("powercap_controller_status_write_failures_total",
                                      "Status writes that failed (after retrying conflicts).", registry=self.registry)
        self.evictions = Counter("powercap_controller_evictions_total", "Eviction attempts by result.", ["result"],
                                 registry=self.registry)
        self.leader = Gauge("powercap_controller_leader", "1 while this replica holds the Lease.", registry=self.registry)


@dataclass
class RoundReport:
    """What one round did (for logs and tests)."""

    plan: RoundPlan | None = None
    written: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (policy or pod key, reason)
    evictions: list[tuple[str, kube.EvictionResult]] = field(default_factory=list)  # (pod, result)
    follow_up: bool = False  # the next round comes after follow_up_s, not interval_s (module docstring)
    behind: bool = False  # the watch cache still showed a status our last write replaced: nothing planned

    @property
    def may_round_early(self) -> bool:
        """Whether a queue forming may bring the next round forward: not after failed writes
        (a failing API server is not asked more often) nor while the cache lags our writes."""
        return not self.failed and not self.behind

    def wait_s(self, settings: ControllerSettings) -> float:
        """Seconds from this round's start to the next: ``min(follow_up_s, interval_s)`` after a
        follow-up round, else ``interval_s``."""
        return min(settings.follow_up_s, settings.interval_s) if self.follow_up else settings.interval_s


class BudgetController:
    """One leader's rounds. ``is_leader`` is asked before every write."""

    def __init__(
        self,
        client: kube.KubeClient,
        snapshots: Snapshots,
        settings: ControllerSettings,
        *,
        is_leader: Callable[[], bool] = lambda: True,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._snapshots = snapshots
        self.settings = settings
        self._is_leader = is_leader
        self.metrics = metrics or ControllerMetrics()
        self._clock = clock
        self._lagging: dict[str, frozenset[str]] = {}
        self._last_move: dict[str, datetime] = {}
        self._blocked_until: dict[str, datetime] = {}
        # policy -> (its uid, the allocations our last write replaced, when), until the watch
        # cache shows the write, the status moves on, or two intervals pass
        self._unseen_writes: dict[str, tuple[str, dict[str, float], float]] = {}
        # Set by the elector thread, applied by the loop at its next round.
        self._term_started: datetime | None = None
        self._term_applied: datetime | None = None
        self.last_round_s: float | None = None  # clock time the last round ended (health)
        self._queue_formed = threading.Event()  # set from the watch thread, cleared as a round starts

    def queue_formed(self, node: str = "") -> None:
        """A GPU's pod on ``node`` began having requests waiting: run the next round early
        (module docstring). Safe to call from any thread; never blocks."""
        if self.settings.queue_round_s > 0:
            self._queue_formed.set()

    def started_leading(self, now: datetime | None = None) -> None:
        """A new term: what a previous one knew is forgotten at the next round, and the first
        eviction waits one migrationInterval. Safe to call from the elector's thread."""
        self._term_started = now or utc_now()
        self.metrics.leader.set(1)

    def stopped_leading(self) -> None:
        self.metrics.leader.set(0)

    def _begin_term(self) -> None:
        if self._term_started is not None and self._term_started != self._term_applied:
            self._lagging.clear()
            self._last_move.clear()
            self._blocked_until.clear()
            self._unseen_writes.clear()
            self._term_applied = self._term_started

    def run_round(self) -> RoundReport:
        """One round (see the module docstring). Raises :class:`NotReady` before the caches sync."""
        started_s = time.perf_counter()
        self._queue_formed.clear()  # this round sees every queue formed so far
        self._begin_term()
        snapshot = self._snapshots.snapshot()
        behind = self._cache_behind_writes(snapshot.view)
        if behind:
            # A round on statuses older than our own last writes would count GPUs at caps they
            # were already moved from (a raise among them): wait for the watch, write nothing.
            log.info("waiting for the watch to show the statuses written last round", extra={"policies": behind})
            self.last_round_s = self._clock()
            return RoundReport(plan=RoundPlan(now=snapshot.view.now), behind=True)
        plan = plan_round(snapshot.view, self.settings.allocation, lagging_before=self._lagging)
        self._lagging = {key: p.lagging for key, p in plan.policies.items()}
        report = RoundReport(plan=plan)
        for key, policy_plan in plan.policies.items():
            if not policy_plan.changed:
                continue
            if not self._is_leader():
                log.info("not leading any more: stopping this round's writes", extra={"policy": key})
                return report
            self._write(policy_plan, snapshot.view.now, report)
        if self._is_leader():
            self._rebalance(snapshot, report)
        # only after such a status was written: the agents follow nothing else, and a failing API
        # server is not asked more often
        report.follow_up = self.settings.follow_up_s > 0 and not plan.follow_up_keys.isdisjoint(report.written)
        self.metrics.rounds.inc()
        self.metrics.round_seconds.observe(time.perf_counter() - started_s)
        self.last_round_s = self._clock()
        log.debug("round done", extra={"policies": len(plan.policies), "written": len(report.written),
                                       "follow_up": report.follow_up, "next_round_in_s": report.wait_s(self.settings),
                                       "seconds": round(time.perf_counter() - started_s, 4)})
        return report

    def _write(self, plan: PolicyPlan, now: datetime, report: RoundReport) -> None:
        policy = plan.policy
        before: dict[str, Any] = {}

        def compute(current: dict[str, Any]) -> dict[str, Any] | None:
            if (current.get("metadata") or {}).get("uid") not in (policy.uid, None, ""):
                return None  # deleted and re-created since the snapshot: next round
            if not self._is_leader():  # the Lease may be lost while a conflict is retried
                return None
            before.clear()
            before.update(current.get("status") or {})
            return render_status(plan.inputs, before, now)

        path = kube.policy_path(policy.namespace, policy.name)
        try:
            stored = kube.update_status(self._client, path, compute, attempts=self.settings.write_attempts)
        except kube.NotFound:
            log.info("status of %s not written: the policy was deleted", policy.key, extra={"policy": policy.key})
            return
        except kube.ApiError as error:
            self.metrics.write_failures.inc()
            report.failed.append(policy.key)
            log.log(error.log_level,
                    "status of %s not written: %s", policy.key, error,
                    extra={"policy": policy.key, "error": str(error), "code": error.code})
            return
        if stored is None:
            return
        self.metrics.status_writes.inc()
        report.written.append(policy.key)
        replaced = published_allocations(before)
        if replaced != published_allocations(stored.get("status")):
            self._unseen_writes[policy.key] = (policy.uid, replaced, time.monotonic())
        allocation = plan.allocation
        log.info("status of %s written", policy.key, extra={
            "policy": policy.key, "gpus": len(allocation.caps), "allocated_w": allocation.allocated_w,
            "budget_w": allocation.budget_w, "feasible": allocation.feasible,
        })
        for change in transitions(before, stored.get("status") or {}):
            self._event(_reference(policy), change.event_reason, change.note, "Allocate",
                        warning=change.event_type == "Warning")
            report.events.append((policy.key, change.event_reason))
            _log_transition(policy, change)

    def _cache_behind_writes(self, view: ClusterView) -> list[str]:
        """The policies whose status in the watch cache is still the one this replica's last
        write replaced. The others are forgotten: the write is seen, the status moved on, the
        policy is gone or re-created, or two intervals passed (a watch that far behind is
        left to the caches' own resync; the rounds go on)."""
        behind = []
        now_s = time.monotonic()
        for key, (uid, replaced, written_s) in list(self._unseen_writes.items()):
            policy_view = view.policies.get(key)
            if (policy_view is not None and policy_view.policy.uid == uid and now_s - written_s <= 2 * self.settings.interval_s
                    and published_allocations(policy_view.policy.status) == replaced):
                behind.append(key)
            else:
                del self._unseen_writes[key]
        return sorted(behind)

    def _rebalance(self, snapshot: Snapshot, report: RoundReport) -> None:
        view = snapshot.view
        pods: dict[str, KubeObject] | None = None
        for key, policy_view in sorted(view.policies.items()):
            if policy_view.policy.algorithm.name != "energy-aware-scheduling":
                continue
            blocked_until = self._blocked_until.get(key)
            if blocked_until is not None and view.now < blocked_until:
                continue
            decision = plan_rebalance(policy_view, view, snapshot.pods, snapshot.nodes,
                                      self._last_move.get(key, self._term_applied))
            if decision.move is None:
                log.debug("no rebalancing for %s: %s", key, decision.reason, extra={"policy": key, "why": decision.reason})
                continue
            if pods is None:
                pods = {object_key(pod): pod for pod in snapshot.pods}
            self._evict(policy_view.policy, decision.move, pods.get(decision.move.pod), view.now, report)

    def _evict(self, policy: Policy, move: Move, pod: KubeObject | None, now: datetime, report: RoundReport) -> None:
        namespace, _, name = move.pod.partition("/")
        pod_reference = {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name,
                         "uid": ((pod or {}).get("metadata") or {}).get("uid")}
        try:
            result = kube.evict_pod(self._client, namespace, name)
        except kube.ApiError as error:
            log.warning("eviction of %s failed: %s", move.pod, error, extra={"policy": policy.key, "pod": move.pod,
                                                                              "error": str(error)})
            self.metrics.evictions.labels(result="error").inc()
            return
        self.metrics.evictions.labels(result=result.value).inc()
        report.evictions.append((move.pod, result))
        if result is kube.EvictionResult.EVICTED:
            self._last_move[policy.key] = now
            self._blocked_until.pop(policy.key, None)
            # The descheduler's convention: the strategy as reason, "Descheduled" as action, on
            # the pod (what its owner reads in `kubectl describe pod`) and here on the policy.
            self._event(pod_reference, REBALANCE_REASON, move.pod_note, DESCHEDULED, related=_reference(policy))
            self._event(_reference(policy), REBALANCE_REASON, move.message, DESCHEDULED, related=pod_reference)
            report.events.append((move.pod, REBALANCE_REASON))
            report.events.append((policy.key, REBALANCE_REASON))
            log.info("evicted %s to rebalance %s", move.pod, move.node, extra={
                "policy": policy.key, "pod": move.pod, "node": move.node, "node_power_w": move.node_power_w,
                "threshold_w": move.threshold_w, "target": move.target})
        elif result is kube.EvictionResult.BLOCKED:
            first = policy.key not in self._blocked_until
            self._blocked_until[policy.key] = now + timedelta(seconds=self.settings.eviction_retry_s)
            if first:
                note = (f"cannot evict {move.pod} now: a PodDisruptionBudget allows no disruption; "
                        f"retrying every {self.settings.eviction_retry_s:g} s ({move.message})")
                self._event(_reference(policy), "EvictionBlocked", note, "Evict", warning=True, related=pod_reference)
                report.events.append((policy.key, "EvictionBlocked"))

    def _event(self, regarding: dict[str, Any], reason: str, note: str, action: str, *, warning: bool = False,
               related: dict[str, Any] | None = None) -> None:
        kube.post_event(self._client, regarding, reason, note, "Warning" if warning else "Normal",
                        action=action, reporting_controller=REPORTING_CONTROLLER,
                        reporting_instance=self.settings.identity, related=related, clock=self._clock)

    def run(self, stop: threading.Event) -> None:
        """Rounds every ``interval_s`` while leading (``follow_up_s`` after a round that
        postponed raises, :meth:`RoundReport.wait_s`), until ``stop`` is set. Never raises."""
        while not stop.is_set():
            started_s = time.monotonic()
            wait_s = self.settings.interval_s
            may_round_early = False
            if self._is_leader():
                try:
                    report = self.run_round()
                    wait_s, may_round_early = report.wait_s(self.settings), report.may_round_early
                except NotReady as waiting:
                    log.info("waiting: %s", waiting, extra={"why": str(waiting)})
                except Exception:  # a bug in one round must not end the loop
                    log.exception("controller round failed")
            else:
                self.last_round_s = self._clock()  # alive, just not leading
                self._queue_formed.clear()
            self._wait(stop, started_s, wait_s, may_round_early)

    def _wait(self, stop: threading.Event, started_s: float, wait_s: float, may_round_early: bool) -> None:
        """Until ``wait_s`` after ``started_s`` (monotonic); or, when ``may_round_early``,
        ``queue_round_s`` after now (the round's end) once a queue formed meanwhile (looked at
        every :data:`_QUEUE_LOOK_S` from then on); or until ``stop``."""
        deadline_s = started_s + wait_s
        if self.settings.queue_round_s <= 0 or not may_round_early:
            stop.wait(max(0.0, deadline_s - time.monotonic()))
            return
        early_s = time.monotonic() + self.settings.queue_round_s
        while not stop.is_set():
            now_s = time.monotonic()
            if now_s >= deadline_s or (now_s >= early_s and self._queue_formed.is_set()):
                return
            look_s = early_s if now_s < early_s else now_s + _QUEUE_LOOK_S
            if stop.wait(min(deadline_s, look_s) - now_s):
                return


def _reference(policy: Policy) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "namespace": policy.namespace,
            "name": policy.name, "uid": policy.uid or None}


def _log_transition(policy: Policy, change: Transition) -> None:
    level = logging.INFO if change.event_type == "Normal" else logging.WARNING
    log.log(level, "%s: %s", policy.key, change.note, extra={
        "policy": policy.key, "condition": change.condition.type, "status": change.condition.status,
        "reason": change.condition.reason, "previous_status": change.previous_status,
        "previous_reason": change.previous_reason,
    })
