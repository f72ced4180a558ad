"""The node agent's control loop: read GPUs, decide (:mod:`powercap.agentplan`), write, report.

One tick (default every second):

1. read every GPU (:meth:`GpuBackend.snapshot`) and its compute PIDs; map PIDs to pod
   UIDs through ``/proc/<pid>/cgroup`` (cached per PID). A GPU whose reads fail is
   *degraded* this tick: counted in ``powercap_nvml_errors_total{gpu,error}``, flagged in
   ``powercap_gpu_degraded`` and ``/status``, left out of planning (its cap stays as it
   is) and telemetry; the others carry on;
2. take the policy source's view, the pods' tokens/s and the inlet temperature;
3. :func:`~powercap.agentplan.plan_tick`; then for each SET/RESTORE call the idempotent
   setter and verify the enforced limit it returns. A failed write degrades the GPU and
   is not retried for ``degraded_retry_s``. One JSON log line per change (gpu, pod,
   policy, old/new W, reason), an Event on the policy, ``powercap_cap_changes_total``;
4. save the state file when the records changed; offer telemetry to the publisher.

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nodeagent.gpus import GpuBackend, GpuError, GpuSnapshot
from nodeagent.inlet import InletSource, NoInlet
from nodeagent.metrics import AgentMetrics
from nodeagent.podmap import pod_uid_for_pid
from nodeagent.podresources import PodResourcesSource
from nodeagent.publisher import NullPublisher, Publisher
from nodeagent.sources import PolicySource
from nodeagent.state import StateFile
from nodeagent.tokens import TokenRates, metrics_url
from powercap.agentplan import Action, CapRecord, GpuMemory, GpuPlan, TickInputs, build_telemetry, plan_tick
from powercap.control import ControlSettings
from powercap.objects import KubeObject, object_key
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
        self.pod_resources = pod_resources
        self._clock = clock
        self._wall_clock = wall_clock
        self._proc_root = proc_root
        self.devices = backend.devices()
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
        readings, pod_uids = self._read_gpus(now_s)
        view = self.source.view()
        self._fresh, self._source_problem = view.fresh, view.problem
        if self.pod_resources is not None:
            self._add_allocated_pods(pod_uids, view.pods_by_uid, self.pod_resources.pods_by_device())
        if self.tokens is not None:
            self.tokens.set_targets(self._scrape_targets(pod_uids, view.pods_by_uid))
        inlet_c = self.inlet.read_c()
        plans = plan_tick(
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
            )
        )
        enforced_w: dict[str, float] = {}
        writes = sum(self._execute(plan, now_s, enforced_w) for plan in plans)
        self._save_state()
        telemetry = build_telemetry(
            self._wall_clock(), readings, inlet_c, {p.uuid: p.pod for p in plans}, enforced_w,
            {p.uuid: p.tokens_s for p in plans},
        )
        self.publisher.telemetry(telemetry, now_s)
        self._update_metrics(readings, plans, enforced_w, view.fresh)
        with self._lock:
            self._last_plans = plans
            self.ticks += 1
            self.last_tick_end_s = self._clock()
        self.metrics.tick_duration.observe(time.perf_counter() - started)
        return TickResult(plans, writes, frozenset(self._degraded))

    def _read_gpus(self, now_s: float) -> tuple[list[GpuSnapshot], dict[str, frozenset[str]]]:
        readings: list[GpuSnapshot] = []
        pod_uids: dict[str, frozenset[str]] = {}
        live_pids: dict[int, str | None] = {}
        for device in self.devices:
            try:
                snapshot = self.backend.snapshot(device.index)
                pids = self.backend.compute_pids(device.index)
            except GpuError as error:
                self._gpu_failed(device.uuid, "read", error, now_s)
                self.metrics.forget_gpu_readings(device.uuid)
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
            pod_uids[device.uuid] = frozenset(uids)
            if device.uuid in self._degraded and self._degraded[device.uuid].operation == "read":
                self._gpu_recovered(device.uuid)
        self._pid_pods = live_pids
        return readings, pod_uids

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

    def _execute(self, plan: GpuPlan, now_s: float, enforced_w: dict[str, float]) -> int:
        """Carry out one plan; returns 1 when a limit was written."""
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
        if not plan.writes:
            self._keep_record(plan)
            return 0
        degraded = self._degraded.get(plan.uuid)
        if degraded is not None and now_s < degraded.retry_set_at_s:
            return 0  # a write failed recently: keep the cap, retry later
        try:
            enforced = self.backend.set_power_limit_w(plan.index, plan.cap_w)
        except GpuError as error:
            self._gpu_failed(plan.uuid, "set", error, now_s)
            return 0
        if degraded is not None:
            self._gpu_recovered(plan.uuid)
        enforced_w[plan.uuid] = enforced
        self._keep_record(plan)
        self.metrics.cap_changes.labels(plan.reason).inc()
        log.info("power cap changed", extra={**_change_fields(plan), "enforced_w": enforced})
        if plan.policy is not None:
            self._event(plan.policy, "PowerCapChanged", self._describe(plan, plan.reason), "Normal", now_s)
        self._check_held_lower(plan, enforced, now_s)
        return 1

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
        self.metrics.nvml_errors.labels(uuid, kind).inc()
        self.metrics.degraded.labels(uuid).set(1)
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
        self.metrics.degraded.labels(uuid).set(0)
        log.info("GPU recovered", extra={"gpu": uuid})

    # -- reporting ---------------------------------------------------------------------------
    def _update_metrics(
        self, readings: Iterable[GpuSnapshot], plans: Iterable[GpuPlan], enforced_w: dict[str, float], fresh: bool
    ) -> None:
        m = self.metrics
        m.policy_fresh.set(1 if fresh else 0)
        for r in readings:
            m.power.labels(r.uuid).set(r.power_w)
            m.limit.labels(r.uuid).set(enforced_w.get(r.uuid, r.limit_w))
            m.temperature.labels(r.uuid).set(r.temperature_c)
            if r.uuid not in self._degraded:
                m.degraded.labels(r.uuid).set(0)
            held = r.uuid in self._held_lower or (r.uuid in self.records and r.held_by_other_limiter)
            m.out_of_band.labels(r.uuid).set(1 if held else 0)
        for plan in plans:
            m.planned.labels(plan.uuid).set(plan.cap_w)
            if plan.tokens_per_joule is not None:
                m.ratio.labels(plan.uuid).set(plan.tokens_per_joule)
            else:
                try:
                    m.ratio.remove(plan.uuid)
                except KeyError:
                    pass

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
        """The ``/status`` document: per GPU, the last plan and any degradation."""
        with self._lock:
            plans = self._last_plans
            ticks = self.ticks
        planned = {p.uuid: p for p in plans}
        gpus = []
        for device in self.devices:
            plan = planned.get(device.uuid)
            degraded = self._degraded.get(device.uuid)
            gpus.append(
                {
                    "uuid": device.uuid,
                    "index": device.index,
                    "action": plan.action.value if plan else None,
                    "capW": plan.cap_w if plan else None,
                    "reason": plan.reason if plan else None,
                    "policy": plan.policy.key if plan and plan.policy else None,
                    "pod": plan.pod if plan else None,
                    "tokensPerJoule": plan.tokens_per_joule if plan else None,
                    "degraded": degraded is not None,
                    "error": f"{degraded.operation}: {degraded.kind}: {degraded.error}" if degraded else None,
                }
            )
        return {
            "node": self.settings.node,
            "dryRun": self.settings.dry_run,
            "ticks": ticks,
            "policyFresh": self._fresh,
            "policyProblem": self._source_problem,
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
        for stopper in (self.source.stop, self.publisher.stop, self.tokens.stop if self.tokens else None):
            if stopper is not None:
                try:
                    stopper()
                except Exception:
                    log.exception("stopping a component failed")
        self.backend.close()

