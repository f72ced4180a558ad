"""The node agent's control loop: read GPUs, decide (:mod:`powercap.agentplan`), write, report.

One tick (default every second):

1. read every GPU (:meth:`GpuBackend.snapshot`) and its compute PIDs; map PIDs to pod
   UIDs through ``/proc/<pid>/cgroup`` (cached per PID). A GPU whose reads fail is
   *degraded* this tick: counted in ``powercap_nvml_errors_total{gpu,error}``, flagged in
   ``powercap_gpu_degraded`` and ``/status``, left out of telemetry, never written, and
   *counted* by the plan at the limit it holds (read alone where it can be, else its
   maximum) so the other GPUs of its policy make room; the others carry on. A GPU that
   failed enumeration is counted the same way (:meth:`GpuBackend.unenumerated`), and the
   GPUs are enumerated again every ``rescan_interval_s``, every ``rescan_after_error_s``
   while one fails, so it joins when it answers;
2. take the policy source's view, the pods' tokens/s and requests waiting (scraped on a
   background thread, :mod:`nodeagent.tokens`), the inlet temperature and the
   whole-node power (:class:`~nodeagent.nodepower.NodePowerSampler`: the latest reading of
   the first fresh source, else the GPUs' power plus the configured overhead; the GPUs that
   could not be read count at the limit they hold);
3. :func:`~powercap.agentplan.plan_node`; then call the idempotent setter for each
   SET/RESTORE, lowers first, and a policy's raises only when every lower of that policy
   succeeded this tick (a raise never spends watts a GPU may still hold); verify the
   enforced limit each returns. A failed write degrades the GPU: it is not retried for
   ``degraded_retry_s`` and counts at the limit it holds meanwhile. One JSON log line per
   change (gpu, pod, policy, old/new W, reason), an Event on the policy,
   ``powercap_cap_changes_total``; one warning when a policy's allocations pass its
   budget, its minimums do not fit, or GPUs that cannot move make the others give room;
4. save the state file when the records changed; offer telemetry to the publisher (each
   GPU of a scraped pod with its tokens/s share and the pod's requests waiting), marked
   urgent when a write put in force a lower the controller waits to see
   (:func:`~powercap.agentplan.lowers_to_publish_now`: a lowered allocation, a new GPU at
   its minimum, a clamp; not the tokens/J loop's steps, a thermal cut or an outside reset):
   the publisher sends it without waiting for its minimum interval.

Nothing in a tick raises: an unexpected exception is logged and the next tick runs.
Everything is injected (backend, source, publisher, clocks, state file, token scraper,
inlet source, metrics) so tests drive :meth:`Agent.tick` by hand, without sleeping.

On shutdown (:meth:`Agent.close`) the caps stay where they are unless ``restore=True``
(``--restore-on-exit``): a restarting agent must not open a window without caps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nodeagent.energy import EnergyMeter
from nodeagent.gpus import GpuBackend, GpuError, GpuSnapshot
from nodeagent.inlet import InletSource, NoInlet
from nodeagent.metrics import AgentMetrics, GpuLabels, NodePowerMetrics
from nodeagent.nodepower import NodePowerSampler
from nodeagent.podmap import pod_uid_for_pid
from nodeagent.podresources import PodResourcesSource
from nodeagent.publisher import NullPublisher, Publisher
from nodeagent.sources import PolicySource, SourceView
from nodeagent.state import StateFile
from nodeagent.tokens import TokenRates, metrics_url
from powercap.agentplan import (
    Action,
    CapRecord,
    GpuMemory,
    GpuPlan,
    NodePlan,
    PolicyShare,
    TickInputs,
    UnseenGpu,
    build_telemetry,
    held_w,
    lowers_to_publish_now,
    plan_node,
    raised_caps,
)
from powercap.control import ControlSettings
from powercap.objects import KubeObject, object_key, pod_gpu_container
from powercap.policies import Policy

log = logging.getLogger(__name__)

LIMIT_RESOLUTION_W = 0.5
"""An enforced limit this far under the requested one counts as held lower (mW rounding)."""


@dataclass(frozen=True)
class AgentSettings:
    """How the agent runs: ``node`` name, tick ``interval_s``, ``dry_run`` (never set)."""

    node: str
    interval_s: float = 1.0
    dry_run: bool = False
    control: ControlSettings = field(default_factory=ControlSettings)
    degraded_retry_s: float = 30.0
    rescan_interval_s: float = 60.0
    rescan_after_error_s: float = 5.0


def _change_fields(plan: GpuPlan) -> dict[str, Any]:
    """The log fields of a cap change: gpu uuid and index, pod, policy, old/new W, reason."""
    return {
        "gpu": plan.uuid,
        "gpu_index": plan.index,
        "pod": plan.pod,
        "policy": plan.policy.key if plan.policy else None,
        "old_w": plan.previous_w,
        "new_w": plan.cap_w,
        "reason": plan.reason,
    }


@dataclass
class _Degraded:
    operation: str
    error: str
    kind: str
    since_s: float
    retry_set_at_s: float = 0.0


@dataclass(frozen=True)
class TickResult:
    """What one tick did, for tests and the benchmark."""

    plans: tuple[GpuPlan, ...]
    writes: int
    degraded: frozenset[str]
    policies: Mapping[str, PolicyShare] = field(default_factory=dict)


POLICY_CONDITIONS = {
    "infeasible": "policy infeasible on this node: every GPU at its minimum",
    "over-budget": "allocations pass the policy's budget: clamped",
    "making-room": "GPUs that cannot move hold part of the policy's budget: the others make room",
}
"""The warning logged once when a policy enters each condition (:meth:`Agent._say_policy_conditions`)."""


def _conditions(share: PolicyShare) -> frozenset[str]:
    conditions = set()
    if share.unreadable is None:
        if share.infeasible:
            conditions.add("infeasible")
        if share.over_budget:
            conditions.add("over-budget")
        if share.held_w > 0 and share.clamped:
            conditions.add("making-room")
    return frozenset(conditions)


class Agent:
    """Enforces per-GPU caps on one node (module docstring)."""

    def __init__(
        self,
        backend: GpuBackend,
        source: PolicySource,
        settings: AgentSettings,
        *,
        publisher: Publisher | None = None,
        state: StateFile | None = None,
        tokens: TokenRates | None = None,
        inlet: InletSource | None = None,
        metrics: AgentMetrics | None = None,
        pod_resources: PodResourcesSource | None = None,
        node_power: NodePowerSampler | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        proc_root: Path = Path("/proc"),
    ) -> None:
        self.backend = backend
        self.source = source
        self.settings = settings
        self.publisher = publisher or NullPublisher()
        self.state = state or StateFile(None, settings.node)
        self.tokens = tokens
        self.inlet = inlet or NoInlet()
        self.metrics = metrics or AgentMetrics()
        self.energy = EnergyMeter(backend)
        self.pod_resources = pod_resources
        self.node_power = node_power or NodePowerSampler()
        if self.node_power.metrics is None:
            self.node_power.metrics = NodePowerMetrics(self.metrics.registry)
        self._clock = clock
        self._wall_clock = wall_clock
        self._proc_root = proc_root
        self.devices = backend.devices()
        self._unenumerated = backend.unenumerated()
        self._next_rescan_s = clock() + (settings.rescan_after_error_s if self._unenumerated else settings.rescan_interval_s)
        self._rescan_failing = False
        self._last_readings: dict[str, GpuSnapshot] = {}
        self._unseen: tuple[UnseenGpu, ...] = ()
        self._counted_w: dict[int, float] = {}
        self._in_force_w: dict[str, float] = {}
        self._requests_waiting: dict[str, int | None] = {}
        self._shares: Mapping[str, PolicyShare] = {}
        self._unreadable: Mapping[str, str] = {}
        self._conditions: dict[str, frozenset[str]] = {}
        self.records: dict[str, CapRecord] = self.state.load()
        self._memories: dict[str, GpuMemory] = {}
        self._degraded: dict[str, _Degraded] = {}
        self._owners: dict[str, Policy] = {}
        self._pid_pods: dict[int, str | None] = {}
        self._observed_w: dict[str, float] = {}
        self._held_lower: set[str] = set()
        self._last_plans: tuple[GpuPlan, ...] = ()
        self._fresh = False
        self._source_problem: str | None = None
        self._state_failing = False
        self._lock = threading.Lock()
        self.ticks = 0
        self.last_tick_end_s: float | None = None
        log.info(
            "agent ready",
            extra={
                "node": settings.node,
                "gpus": [d.uuid for d in self.devices],
                "dry_run": settings.dry_run,
                "gpus_recorded": len(self.records),
            },
        )

    # -- the tick ------------------------------------------------------------------------
    def tick(self) -> TickResult:
        started = time.perf_counter()
        now_s = self._clock()
        self._rescan(now_s)
        readings, pod_uids, unseen = self._read_gpus(now_s)
        view = self.source.view()
        self._fresh, self._source_problem = view.fresh, view.problem
        if self.pod_resources is not None:
            self._add_allocated_pods(pod_uids, view.pods_by_uid, self.pod_resources.pods_by_device())
        if self.tokens is not None:
            self.tokens.set_targets(self._scrape_targets(pod_uids, view.pods_by_uid))
        inlet_c = self.inlet.read_c()
        node_power = self.node_power.choose(
            now_s, sum(r.power_w for r in readings) + sum(held_w(g, readings) for g in unseen)
        )
        stuck = frozenset(
            uuid for uuid, degraded in self._degraded.items() if degraded.operation == "set" and now_s < degraded.retry_set_at_s
        )
        node_plan = plan_node(
            TickInputs(
                node=self.settings.node,
                now_s=now_s,
                readings=readings,
                pod_uids_by_gpu=pod_uids,
                pods_by_uid=view.pods_by_uid,
                policies=view.policies,
                policy_fresh=view.fresh,
                node_rack=view.node_rack,
                apply_all_racks=view.apply_all_racks,
                inlet_c=inlet_c,
                tokens_s_by_pod=self.tokens.rates() if self.tokens is not None else {},
                memories=self._memories,
                records=self.records,
                enforce=not self.settings.dry_run,
                settings=self.settings.control,
                unseen=unseen,
                stuck=stuck,
                unreadable_policies=view.unreadable,
                node_policy=view.node_policy,
            )
        )
        plans = node_plan.gpus
        enforced_w: dict[str, float] = {}
        writes = self._carry_out(node_plan, now_s, enforced_w)
        self._save_state()
        self._say_policy_conditions(node_plan)
        raised = raised_caps(plans)  # published at the limit their power was read under
        requests_waiting = self._requests_waiting_by_gpu(plans)
        telemetry = build_telemetry(
            self._wall_clock(), readings, inlet_c, {p.uuid: p.pod for p in plans},
            {uuid: w for uuid, w in enforced_w.items() if uuid not in raised}, {p.uuid: p.tokens_s for p in plans}, node_power,
            requests_waiting_by_gpu=requests_waiting,
            # the limit a raise put in force, beside the one the power was read under
            raised_to_w_by_gpu={uuid: w for uuid, w in enforced_w.items() if uuid in raised},
        )
        # a lower the controller waits for goes out at once; only one this tick's write put in force
        lowered = lowers_to_publish_now(p for p in plans if p.uuid in enforced_w)
        self.publisher.telemetry(telemetry, now_s, lowered=lowered)
        self._update_metrics(readings, plans, enforced_w, view, now_s)
        in_force = {r.uuid: r.requested_limit_w for r in readings}
        in_force.update({p.uuid: p.cap_w for p in plans if p.writes and p.uuid in enforced_w})
        with self._lock:
            self._last_plans = plans
            self._unseen = unseen
            self._counted_w = {g.index: held_w(g, readings) for g in unseen}
            self._in_force_w = in_force
            self._requests_waiting = requests_waiting
            self._shares = node_plan.policies
            self._unreadable = dict(view.unreadable)
            self.ticks += 1
            self.last_tick_end_s = self._clock()
        self.metrics.tick_duration.observe(time.perf_counter() - started)
        return TickResult(plans, writes, frozenset(self._degraded), node_plan.policies)

    def _rescan(self, now_s: float) -> None:
        """Enumerate the GPUs again when due (module docstring); log the ones that join."""
        if now_s < self._next_rescan_s:
            return
        known = {d.uuid for d in self.devices}
        try:
            self.backend.rescan()
            devices, unenumerated = self.backend.devices(), self.backend.unenumerated()
        except GpuError as error:
            if not self._rescan_failing:
                log.warning("GPUs not enumerated again: keeping the list", extra={"error": str(error)})
            self._rescan_failing = True
            self._next_rescan_s = now_s + self.settings.rescan_after_error_s
            return
        self._rescan_failing = False
        self.devices, self._unenumerated = devices, unenumerated
        for device in devices:
            if device.uuid not in known:
                log.info("GPU joined", extra={"gpu": device.uuid, "gpu_index": device.index})
        troubled = unenumerated or any(d.operation == "read" for d in self._degraded.values())
        self._next_rescan_s = now_s + (self.settings.rescan_after_error_s if troubled else self.settings.rescan_interval_s)

    def _read_gpus(self, now_s: float) -> tuple[list[GpuSnapshot], dict[str, frozenset[str]], tuple[UnseenGpu, ...]]:
        readings: list[GpuSnapshot] = []
        pod_uids: dict[str, frozenset[str]] = {}
        live_pids: dict[int, str | None] = {}
        unseen = [UnseenGpu(index) for index in sorted(self._unenumerated)]
        for device in self.devices:
            try:
                snapshot = self.backend.snapshot(device.index)
                pids = self.backend.compute_pids(device.index)
            except GpuError as error:
                self._gpu_failed(device.uuid, "read", error, now_s)
                self.metrics.forget_gpu_readings(device.uuid)
                unseen.append(self._unseen_gpu(device.index, device.uuid))
                self._next_rescan_s = min(self._next_rescan_s, now_s + self.settings.rescan_after_error_s)
                continue
            uids = set()
            for pid in pids:
                if pid not in live_pids:
                    live_pids[pid] = (
                        self._pid_pods[pid] if pid in self._pid_pods else pod_uid_for_pid(pid, self._proc_root)
                    )
                uid = live_pids[pid]
                if uid:
                    uids.add(uid)
            readings.append(snapshot)
            self._last_readings[device.uuid] = snapshot
            pod_uids[device.uuid] = frozenset(uids)
            if device.uuid in self._degraded and self._degraded[device.uuid].operation == "read":
                self._gpu_recovered(device.uuid)
        self._pid_pods = live_pids
        return readings, pod_uids, tuple(unseen)

    def _unseen_gpu(self, index: int, uuid: str) -> UnseenGpu:
        """A GPU whose reading failed: the limit it holds, read alone where that still works."""
        try:
            limit_w: float | None = self.backend.power_limit_w(index)
        except GpuError:
            limit_w = None
        last = self._last_readings.get(uuid)
        return UnseenGpu(index, uuid, limit_w, last.max_limit_w if last is not None else None)

    def _add_allocated_pods(self, pod_uids: dict[str, frozenset[str]], pods_by_uid: Mapping[str, KubeObject],
                            holders: Mapping[str, frozenset[str]]) -> None:
        """Add the pods the kubelet gave each GPU to (``holders``: device ID -> pod keys),
        running a process on it or not yet."""
        if not holders:
            return
        uid_by_name = {object_key(pod): uid for uid, pod in pods_by_uid.items()}
        for device in self.devices:
            if device.uuid not in pod_uids:  # not read this tick
                continue
            names = holders.get(device.uuid, frozenset()) | holders.get(str(device.index), frozenset())
            allocated = {uid_by_name[name] for name in names if name in uid_by_name}
            if allocated:
                pod_uids[device.uuid] = pod_uids[device.uuid] | allocated

    @staticmethod
    def _scrape_targets(pod_uids: dict[str, frozenset[str]], pods: Any) -> dict[str, str]:
        targets = {}
        for uids in pod_uids.values():
            for uid in uids:
                url = metrics_url(pods[uid]) if uid in pods else None
                if url:
                    targets[uid] = url
        return targets

    def _requests_waiting_by_gpu(self, plans: Iterable[GpuPlan]) -> dict[str, int | None]:
        """Each planned GPU's pod's requests waiting, as the scraper last read it (None when
        the GPU has no pod, or its pod is not scraped or had no fresh gauge)."""
        by_pod = self.tokens.requests_waiting() if self.tokens is not None else {}
        return {p.uuid: by_pod.get(p.pod_uid) if p.pod_uid is not None else None for p in plans}

    def _carry_out(self, node_plan: NodePlan, now_s: float, enforced_w: dict[str, float]) -> int:
        """Carry out the plans; returns how many limits were written. Lowers go first; a
        policy's raises only when all its lowers succeeded; restores last."""
        writes = []
        for plan in node_plan.gpus:
            if plan.policy is not None:
                self._owners[plan.uuid] = plan.policy
            if plan.memory is not None:
                self._memories[plan.uuid] = plan.memory
            else:
                self._memories.pop(plan.uuid, None)
            if plan.emergency and plan.policy is not None:
                self._event(plan.policy, "ThermalEmergency", self._describe(plan, "thermal emergency"), "Warning", now_s)
            if plan.action is Action.OBSERVE:
                self._observe(plan)
            if plan.writes:
                writes.append(plan)
            else:
                self._keep_record(plan)
        lowers = [p for p in writes if p.action is Action.SET and p.cap_w < p.previous_w]
        raises = [p for p in writes if p.action is Action.SET and p.cap_w >= p.previous_w]
        restores = [p for p in writes if p.action is Action.RESTORE]
        failed: set[str] = set()
        written = 0
        for plan in lowers:
            if self._write(plan, now_s, enforced_w):
                written += 1
            elif plan.policy is not None:
                failed.add(plan.policy.key)
        for plan in raises:
            if plan.policy is not None and plan.policy.key in failed:
                log.info("raise put off: a lower of the same policy failed this tick",
                         extra={"gpu": plan.uuid, "policy": plan.policy.key, "new_w": plan.cap_w})
                continue
            written += self._write(plan, now_s, enforced_w)
        for plan in restores:
            written += self._write(plan, now_s, enforced_w)
        return written

    def _write(self, plan: GpuPlan, now_s: float, enforced_w: dict[str, float]) -> bool:
        """Call the setter for one plan; True when the limit was written."""
        degraded = self._degraded.get(plan.uuid)
        if degraded is not None and degraded.operation == "set" and now_s < degraded.retry_set_at_s:
            return False  # a write failed recently: keep the cap, retry later
        try:
            enforced = self.backend.set_power_limit_w(plan.index, plan.cap_w)
        except GpuError as error:
            self._gpu_failed(plan.uuid, "set", error, now_s)
            return False
        if degraded is not None:
            self._gpu_recovered(plan.uuid)
        enforced_w[plan.uuid] = enforced
        self._keep_record(plan)
        self.metrics.cap_changes.labels(plan.reason).inc()
        log.info("power cap changed", extra={**_change_fields(plan), "enforced_w": enforced})
        if plan.policy is not None:
            self._event(plan.policy, "PowerCapChanged", self._describe(plan, plan.reason), "Normal", now_s)
        self._check_held_lower(plan, enforced, now_s)
        return True

    def _say_policy_conditions(self, node_plan: NodePlan) -> None:
        """One warning when a policy enters a condition (:data:`POLICY_CONDITIONS`), one
        info line when it leaves it."""
        now = {key: _conditions(share) for key, share in node_plan.policies.items()}
        for key, conditions in now.items():
            share = node_plan.policies[key]
            before = self._conditions.get(key, frozenset())
            for condition in sorted(conditions - before):
                log.warning(POLICY_CONDITIONS[condition], extra={
                    "policy": key, "problem": share.problem, "budget_w": share.budget_w,
                    "allocated_w": share.service_w, "node_allocated_w": share.allocated_w,
                    "held_w": share.held_w, "minimums_w": share.minimums_w, "power_cap_w": share.power_cap_w,
                })
            for condition in sorted(before - conditions):
                log.info("policy condition cleared", extra={"policy": key, "condition": condition})
        self._conditions = {key: conditions for key, conditions in now.items() if conditions}

    def _keep_record(self, plan: GpuPlan) -> None:
        if plan.record is None:
            self.records.pop(plan.uuid, None)
        else:
            self.records[plan.uuid] = plan.record

    def _observe(self, plan: GpuPlan) -> None:
        """Log what Observe mode or --dry-run would write, once per new value."""
        if self._observed_w.get(plan.uuid) == plan.cap_w:
            return
        self._observed_w[plan.uuid] = plan.cap_w
        log.info("power cap not set (observe)", extra={**_change_fields(plan), "dry_run": self.settings.dry_run})

    def _check_held_lower(self, plan: GpuPlan, enforced_w: float, now_s: float) -> None:
        if enforced_w < plan.cap_w - LIMIT_RESOLUTION_W:
            self._held_lower.add(plan.uuid)
            log.warning(
                "power limit held lower by an out-of-band limiter",
                extra={"gpu": plan.uuid, "gpu_index": plan.index, "requested_w": plan.cap_w, "enforced_w": enforced_w},
            )
            if plan.policy is not None:
                note = f"{self._describe(plan, plan.reason)}; enforced {enforced_w:g} W by another limiter"
                self._event(plan.policy, "PowerLimitHeldLower", note, "Warning", now_s)
        else:
            self._held_lower.discard(plan.uuid)

    def _describe(self, plan: GpuPlan, what: str) -> str:
        pod = f" (pod {plan.pod})" if plan.pod else ""
        return (
            f"node {self.settings.node} GPU {plan.index} {plan.uuid}{pod}: "
            f"{plan.previous_w:g} W -> {plan.cap_w:g} W, {what}"
        )

    def _event(self, policy: Policy, reason: str, note: str, event_type: Any, now_s: float) -> None:
        self.publisher.event(policy, reason, note, event_type, now_s)

    # -- degraded GPUs -----------------------------------------------------------------------
    def _gpu_failed(self, uuid: str, operation: str, error: GpuError, now_s: float) -> None:
        kind = type(error).__name__
        unattributed = self._device_labels(uuid).unattributed()
        self.metrics.nvml_errors.labels(**unattributed, error=kind).inc()
        self.metrics.degraded.labels(**unattributed).set(1)
        previous = self._degraded.get(uuid)
        retry_at_s = now_s + self.settings.degraded_retry_s if operation == "set" else 0.0
        self._degraded[uuid] = _Degraded(operation, str(error), kind, previous.since_s if previous else now_s, retry_at_s)
        if previous is None or previous.kind != kind:
            log.warning(
                "GPU degraded: keeping its cap, the others carry on",
                extra={"gpu": uuid, "operation": operation, "error": str(error), "kind": kind},
            )
            policy = self._owners.get(uuid)
            if policy is not None:
                note = f"node {self.settings.node} GPU {uuid}: {operation} failed: {kind}: {error}"
                self._event(policy, "GpuDegraded", note, "Warning", now_s)

    def _gpu_recovered(self, uuid: str) -> None:
        self._degraded.pop(uuid, None)
        self.metrics.degraded.labels(**self._device_labels(uuid).unattributed()).set(0)
        log.info("GPU recovered", extra={"gpu": uuid})

    # -- reporting ---------------------------------------------------------------------------
    def _update_metrics(
        self, readings: Iterable[GpuSnapshot], plans: Iterable[GpuPlan], enforced_w: dict[str, float], view: SourceView,
        now_s: float,
    ) -> None:
        m = self.metrics
        m.policy_fresh.set(1 if view.fresh else 0)
        m.set_unreadable_policies(view.unreadable)
        planned = {plan.uuid: plan for plan in plans}
        for r in readings:
            plan = planned.get(r.uuid)
            labels = self._gpu_labels(r.uuid, plan, view.pods_by_uid)
            m.show_gpu(labels)
            series = labels.reading()
            m.power.labels(**series).set(r.power_w)
            m.limit.labels(**series).set(enforced_w.get(r.uuid, r.limit_w))
            m.temperature.labels(**series).set(r.temperature_c)
            m.energy.labels(**labels.unattributed()).inc(self.energy.used_since_last_j(r, now_s))
            if r.uuid not in self._degraded:
                m.degraded.labels(**labels.unattributed()).set(0)
            held = r.uuid in self._held_lower or (r.uuid in self.records and r.held_by_other_limiter)
            m.out_of_band.labels(**series).set(1 if held else 0)
            if plan is None:
                continue
            m.planned.labels(**series).set(plan.cap_w)
            if plan.tokens_per_joule is not None:
                m.ratio.labels(**series).set(plan.tokens_per_joule)
            else:
                try:
                    m.ratio.remove(*series.values())
                except KeyError:
                    pass

    def _device_labels(self, uuid: str) -> GpuLabels:
        """The GPU's identity labels (index, model, node), no pod."""
        device = next(d for d in self.devices if d.uuid == uuid)
        return GpuLabels(device.index, device.uuid, device.name, self.settings.node)

    def _gpu_labels(self, uuid: str, plan: GpuPlan | None, pods_by_uid: Mapping[str, KubeObject]) -> GpuLabels:
        """The GPU's labels with the pod using it and the policy governing it, as far as known."""
        labels = self._device_labels(uuid)
        if plan is None:
            return labels
        namespace, _, pod = (plan.pod or "").partition("/")
        pod_object = pods_by_uid.get(plan.pod_uid) if plan.pod_uid else None
        container = pod_gpu_container(pod_object) if pod_object is not None else None
        policy = plan.policy
        return replace(labels, pod=pod, namespace=namespace or (policy.namespace if policy else ""),
                       container=container or "", policy=policy.name if policy else "")

    def _save_state(self) -> None:
        try:
            self.state.save(self.records)
        except OSError as error:
            if not self._state_failing:
                log.error("state file not written: retrying every tick", extra={"error": str(error)})
            self._state_failing = True
            return
        if self._state_failing:
            log.info("state file written again")
            self._state_failing = False

    def healthy(self) -> bool:
        """A tick ended within the last ``3 x interval`` (at least 5 s)."""
        with self._lock:
            end_s = self.last_tick_end_s
        return end_s is not None and self._clock() - end_s <= max(3 * self.settings.interval_s, 5.0)

    def status(self) -> dict[str, Any]:
        """The ``/status`` document: per GPU, the limit in force, the last plan, its pod's
        requests waiting and any degradation (GPUs that could not be read or enumerated
        included); per policy, what
        it may hold on this node and any problem."""
        with self._lock:
            plans = self._last_plans
            ticks = self.ticks
            unseen = {g.index: g for g in self._unseen}
            in_force = dict(self._in_force_w)
            shares = dict(self._shares)
            unreadable = dict(self._unreadable)
            counted = dict(self._counted_w)
            waiting = dict(self._requests_waiting)
        planned = {p.uuid: p for p in plans}
        gpus = []
        for device in self.devices:
            plan = planned.get(device.uuid)
            degraded = self._degraded.get(device.uuid)
            missing = unseen.get(device.index)
            gpus.append(
                {
                    "uuid": device.uuid,
                    "index": device.index,
                    "action": plan.action.value if plan else None,
                    "capW": in_force.get(device.uuid, missing.held_w if missing else None),
                    "plannedW": plan.cap_w if plan else None,
                    "countedW": counted.get(device.index) if missing else in_force.get(device.uuid),
                    "reason": plan.reason if plan else None,
                    "policy": plan.policy.key if plan and plan.policy else None,
                    "pod": plan.pod if plan else None,
                    "tokensPerJoule": plan.tokens_per_joule if plan else None,
                    "requestsWaiting": waiting.get(device.uuid),
                    "degraded": degraded is not None,
                    "error": f"{degraded.operation}: {degraded.kind}: {degraded.error}" if degraded else None,
                }
            )
        for index, why in sorted(self._unenumerated.items()):
            gpus.append({
                "uuid": None, "index": index, "action": None, "capW": None, "plannedW": None,
                "countedW": counted.get(index), "reason": None, "policy": None, "pod": None,
                "tokensPerJoule": None, "requestsWaiting": None, "degraded": True, "error": f"enumeration: {why}",
            })
        return {
            "node": self.settings.node,
            "dryRun": self.settings.dry_run,
            "ticks": ticks,
            "policyFresh": self._fresh,
            "policyProblem": self._source_problem,
            "unreadablePolicies": unreadable,
            "nodePower": self.node_power.status(),
            "policies": {
                key: {
                    "budgetW": share.budget_w, "allocatedW": share.allocated_w, "serviceAllocatedW": share.service_w,
                    "allowanceW": share.allowance_w, "heldW": share.held_w, "ceilingsW": share.ceilings_w,
                    "gpus": share.gpus, "clamped": share.clamped, "infeasible": share.infeasible,
                    "problem": share.problem,
                }
                for key, share in sorted(shares.items())
            },
            "gpus": gpus,
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Tick every ``interval_s`` until ``stop`` is set; a tick that overruns is not
        made up for (the next one starts at once, then the schedule resumes)."""
        next_s = self._clock()
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # a bug in one tick must not stop enforcement
                log.exception("tick failed")
            next_s = max(next_s + self.settings.interval_s, self._clock())
            stop.wait(max(0.0, next_s - self._clock()))

    def close(self, *, restore: bool = False) -> None:
        """Stop; with ``restore`` (``--restore-on-exit``, never under --dry-run) give every
        GPU we capped its default limit back first. Caps otherwise stay in place."""
        if restore and not self.settings.dry_run:
            by_uuid = {d.uuid: d for d in self.devices}
            for uuid, record in list(self.records.items()):
                device = by_uuid.get(uuid)
                if device is None:
                    continue
                try:
                    self.backend.set_power_limit_w(device.index, record.default_w)
                except GpuError as error:
                    log.error("default limit not restored", extra={"gpu": uuid, "error": str(error)})
                    continue
                fields = {"gpu": uuid, "gpu_index": device.index, "policy": record.policy}
                fields.update(old_w=record.cap_w, new_w=record.default_w, reason="restore-on-exit")
                log.info("power cap changed", extra=fields)
                self.records.pop(uuid)
            self._save_state()
        elif self.records:
            log.info("exiting with caps in place", extra={"gpus_capped": sorted(self.records)})
        for stopper in (self.source.stop, self.publisher.stop, self.tokens.stop if self.tokens else None,
                        self.node_power.stop):
            if stopper is not None:
                try:
                    stopper()
                except Exception:
                    log.exception("stopping a component failed")
        self.backend.close()

