"""What the node agent does with each GPU this tick: pure decisions, no I/O (DESIGN.md §6).

The agent reads every GPU, maps GPUs to pods, gathers policies, tokens/s and the inlet
temperature, then asks :func:`plan_tick` what to do. Per GPU the answer is one
:class:`Action`:

``NONE``     no policy owns the GPU and we never capped it: leave it alone;
``HOLD``     keep the current limit (the law says so, or the view is stale);
``SET``      write the control law's cap (:func:`powercap.control.next_cap`);
``RESTORE``  the GPU left every policy: give it its default limit back;
``OBSERVE``  the law would move the cap, but the policy is ``mode: Observe`` or the
             agent runs ``--dry-run``: report it, never call a setter.

Which policy owns a GPU, in order:

1. the policy of a pod running on it (NVML PIDs -> cgroup -> pod UID -> pod ->
   :func:`powercap.objects.policy_for_pod`);
2. else the policy whose ``status.allocations`` entry for this node names the GPU's UUID
   (a pod starting up or restarting has no process yet; the budget controller still
   counts its GPU, and the GPU keeps its cap instead of bouncing to its default).

Its allocation (the control law's ceiling) is that entry's ``watts``; a node entry
without a ``gpus`` list splits its ``watts`` evenly over the policy's GPUs on this node:
``allocation = floor(node watts / n)``. A GPU with no allocation runs at its minimum.

Safety rules encoded here (each has a test row in tests/test_agentplan.py):

- the current cap fed to the law is the *requested* (management) limit, not the
  enforced one: an out-of-band limiter holding the GPU lower does not make us rewrite;
- without a fresh view of the policies nothing is raised: the law holds (only a thermal
  cut moves) and a GPU that seems to have left every policy is not restored;
- only GPUs the agent capped (a :class:`CapRecord`, persisted in the host state file) are
  ever restored; a GPU whose management limit went back to its default while a record
  says we capped it lower lost its cap to a driver reload or GPU reset: re-applied, with
  reason ``driver-reset``;
- a restart adopts the recorded caps and control state (ratio offset, thermal limit), so
  the first tick after a restart writes nothing when the caps already match.

Telemetry (:func:`build_telemetry`) and its rate limiting (:func:`should_publish`) are
here too: publish when any GPU's or the node's power moved by more than 5 %, a
temperature by 2 degC or more, a limit or pod changed, or a heartbeat is due; never more
often than a minimum interval. A GPU's ``tokensPerSecond`` (its pod's tokens/s split
across the pod's GPUs by power, :func:`gpu_tokens_s`) never triggers a publish by
itself: a rate moves on every scrape, and the ratio it feeds (``status.ratio``) may lag
by a heartbeat; it goes out with whatever publish comes next.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from types import MappingProxyType
from typing import Any, Protocol, TypeGuard

from powercap.allocation import AllocationSettings, budget_w
from powercap.control import CapDecision, CapReason, ControlSettings, ControlState, GpuMeasurement, next_cap
from powercap.objects import KubeObject, object_key, pod_is_active, policy_for_pod
from powercap.policies import Policy
from powercap.telemetry import GpuTelemetry, NodeTelemetry

DRIVER_RESET = "driver-reset"
LEFT_POLICIES = "left-policies"
DEFAULT_LIMIT_TOLERANCE_W = 0.5
"""A management limit within this of the default counts as the default (mW rounding)."""


class GpuReading(Protocol):
    """What the plan needs from one GPU reading (``nodeagent.gpus.GpuSnapshot`` fits)."""

    @property
    def index(self) -> int: ...
    @property
    def uuid(self) -> str: ...
    @property
    def power_w(self) -> float: ...
    @property
    def limit_w(self) -> float: ...
    @property
    def requested_limit_w(self) -> float: ...
    @property
    def min_limit_w(self) -> float: ...
    @property
    def max_limit_w(self) -> float: ...
    @property
    def default_limit_w(self) -> float: ...
    @property
    def temperature_c(self) -> float: ...
    @property
    def slowdown_c(self) -> float | None: ...


class Action(str, Enum):
    NONE = "none"
    HOLD = "hold"
    SET = "set"
    RESTORE = "restore"
    OBSERVE = "observe"


@dataclass(frozen=True)
class CapRecord:
    """A GPU the agent is responsible for, as the host state file remembers it.

    ``cap_w`` is the management limit we last set or adopted, ``default_w`` the limit to
    give back, ``policy`` the owner's ``namespace/name``; the control state survives a
    restart except the time of the last thermal cut (monotonic clocks do not).
    """

    uuid: str
    cap_w: float
    default_w: float
    policy: str
    ratio_offset_w: float = 0.0
    thermal_limit_w: float | None = None

    def control_state(self) -> ControlState:
        return ControlState(ratio_offset_w=self.ratio_offset_w, thermal_limit_w=self.thermal_limit_w)


@dataclass(frozen=True)
class GpuMemory:
    """What the plan remembers about one GPU between ticks of one agent process."""

    policy: str
    control: ControlState


@dataclass(frozen=True)
class TickInputs:
    """Everything one tick decides on.

    Attributes:
        node: this node's name (the key into ``status.allocations``).
        now_s: monotonic seconds (thermal cut pacing).
        readings: one per GPU that could be read this tick.
        pod_uids_by_gpu: GPU UUID -> UIDs of the pods whose processes run on it.
        pods_by_uid: this node's pods, by ``metadata.uid``.
        policies: every policy the agent knows (status included).
        policy_fresh: the view of policies and pods is current (False: API unreachable).
        node_rack: the node's rack label, None when unlabelled.
        apply_all_racks: the rack is unknown (``--policy FILE``): the strictest
            ``maxTemperature`` of the owner's rack constraints applies.
        inlet_c: inlet air temperature, None when unknown.
        tokens_s_by_pod: generated tokens/s per pod UID (absent: no measurement).
        memories: per GPU UUID, the control state from the last tick.
        records: per GPU UUID, what the state file says we capped.
        enforce: False under ``--dry-run``: no SET or RESTORE, only OBSERVE.
        settings: control law tuning.
    """

    node: str
    now_s: float
    readings: Sequence[GpuReading]
    pod_uids_by_gpu: Mapping[str, frozenset[str]] = field(default_factory=dict)
    pods_by_uid: Mapping[str, KubeObject] = field(default_factory=dict)
    policies: Sequence[Policy] = ()
    policy_fresh: bool = True
    node_rack: str | None = None
    apply_all_racks: bool = False
    inlet_c: float | None = None
    tokens_s_by_pod: Mapping[str, float] = field(default_factory=dict)
    memories: Mapping[str, GpuMemory] = field(default_factory=dict)
    records: Mapping[str, CapRecord] = field(default_factory=dict)
    enforce: bool = True
    settings: ControlSettings = field(default_factory=ControlSettings)


@dataclass(frozen=True)
class GpuPlan:
    """The decision for one GPU.

    ``cap_w`` is the limit to write for SET/RESTORE, the limit the law wants for
    OBSERVE, the current management limit otherwise. ``record`` is what the state file
    must hold once the action is done (None: forget the GPU); ``memory`` what to
    remember for the next tick (None: nothing). ``tokens_s`` is this GPU's share of its
    pod's generated tokens/s (:func:`gpu_tokens_s`), None without a measurement.
    """

    uuid: str
    index: int
    action: Action
    cap_w: float
    previous_w: float
    reason: str
    policy: Policy | None = None
    pod: str | None = None
    pod_uid: str | None = None
    tokens_per_joule: float | None = None
    tokens_s: float | None = None
    emergency: bool = False
    record: CapRecord | None = None
    memory: GpuMemory | None = None

    @property
    def writes(self) -> bool:
        """Whether the agent calls the setter for this GPU."""
        return self.action in (Action.SET, Action.RESTORE)


# -- ownership and allocation -------------------------------------------------------------


def node_allocation(policy: Policy, node: str) -> Mapping[str, Any] | None:
    """The policy's ``status.allocations`` entry for ``node``, or None."""
    allocations = policy.status.get("allocations") or ()
    for entry in allocations if isinstance(allocations, (list, tuple)) else ():
        if isinstance(entry, Mapping) and entry.get("node") == node:
            return entry
    return None


def allocated_uuids(policy: Policy, node: str) -> frozenset[str]:
    """GPU UUIDs that the policy's allocation for ``node`` names."""
    entry = node_allocation(policy, node) or {}
    return frozenset(
        str(gpu["uuid"]) for gpu in entry.get("gpus") or () if isinstance(gpu, Mapping) and gpu.get("uuid")
    )


def allocation_w(policy: Policy, node: str, uuid: str, gpus_on_node: int) -> float | None:
    """The watts the budget controller allocated to one GPU, or None (runs at minimum).

    The per-GPU entry wins; a node entry with no ``gpus`` list is split evenly:
    ``floor(watts / gpus_on_node)``, so the split never sums above the node's share.
    """
    entry = node_allocation(policy, node)
    if entry is None:
        return None
    gpus = entry.get("gpus")
    if isinstance(gpus, (list, tuple)):
        for gpu in gpus:
            if isinstance(gpu, Mapping) and gpu.get("uuid") == uuid and _is_number(gpu.get("watts")):
                return float(gpu["watts"])
        return None
    watts = entry.get("watts")
    if not _is_number(watts) or gpus_on_node <= 0:
        return None
    return float(math.floor(float(watts) / gpus_on_node))


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def split_allocation(
    policy: Policy, node: str, uuids: Sequence[str], margin: float = AllocationSettings().margin
) -> Policy:
    """``--policy FILE`` mode: every local GPU belongs to ``policy``.

    Keeps an allocation the file's ``status`` already has for ``node``; otherwise
    writes one: each GPU gets ``floor(budget / len(uuids))`` W with the budget controller's
    ``budget = floor(powerCapLimit x (1 - margin))``, so the node's caps sum to at most the
    same budget a cluster would give (the margin absorbs power overshooting a limit); the
    control law then clamps each to its [min, max].
    """
    if node_allocation(policy, node) is not None or not uuids:
        return policy
    per_gpu_w = budget_w(policy.power_cap_w, margin) // len(uuids)
    entry = {"node": node, "gpus": [{"uuid": u, "watts": per_gpu_w} for u in uuids], "watts": per_gpu_w * len(uuids)}
    status = dict(policy.status)
    status["allocations"] = [*(status.get("allocations") or ()), entry]
    return replace(policy, status=MappingProxyType(status))


def max_inlet_c(policy: Policy, node_rack: str | None, apply_all_racks: bool) -> float | None:
    """The inlet temperature limit the owner sets for this node's rack, or None.

    Known rack: its ``maxTemperature``. Unknown rack (``apply_all_racks``): the lowest
    ``maxTemperature`` of all the policy's rack constraints. Unlabelled node: None.
    """
    if apply_all_racks:
        limits = [r.max_temperature_c for r in policy.racks if r.max_temperature_c is not None]
        return min(limits) if limits else None
    rack = policy.rack(node_rack) if node_rack else None
    return rack.max_temperature_c if rack else None


@dataclass(frozen=True)
class _Owner:
    policy: Policy | None
    pod: KubeObject | None


def _owner(inputs: TickInputs, uuid: str) -> _Owner:
    pods = sorted(
        (
            inputs.pods_by_uid[uid]
            for uid in inputs.pod_uids_by_gpu.get(uuid, frozenset())
            if uid in inputs.pods_by_uid and pod_is_active(inputs.pods_by_uid[uid])
        ),
        key=object_key,
    )
    for pod in pods:
        policy = policy_for_pod(pod, inputs.policies)
        if policy is not None:
            return _Owner(policy, pod)
    by_allocation = sorted(
        (p for p in inputs.policies if uuid in allocated_uuids(p, inputs.node)), key=lambda p: p.key
    )
    return _Owner(by_allocation[0] if by_allocation else None, pods[0] if pods else None)


# -- tokens per joule ---------------------------------------------------------------------


def tokens_per_joule(tokens_s: float | None, power_w: float) -> float | None:
    """``tokens_s / power_w``: generated tokens per joule, None when either is unknown or 0 W."""
    if tokens_s is None or power_w <= 0 or not math.isfinite(tokens_s):
        return None
    return tokens_s / power_w


def gpu_tokens_s(pod_tokens_s: float | None, gpu_power_w: float, pod_power_w: float, pod_gpus: int) -> float | None:
    """One GPU's share of its pod's generated tokens/s, split by power.

    ``pod_tokens_s x gpu_power_w / pod_power_w`` (``pod_power_w`` = power of all the
    pod's GPUs, this one included); evenly over ``pod_gpus`` when they all draw 0 W.
    The shares of a pod's GPUs add up to its tokens/s, so a service's sum is right
    however its pods spread. None when the pod's rate is unknown.
    """
    if pod_tokens_s is None or not math.isfinite(pod_tokens_s) or pod_gpus <= 0:
        return None
    share = gpu_power_w / pod_power_w if pod_power_w > 0 else 1.0 / pod_gpus
    return max(0.0, pod_tokens_s) * share


@dataclass
class _PodLoad:
    power_w: float = 0.0
    gpus: int = 0


def _pod_loads(inputs: TickInputs) -> dict[str, _PodLoad]:
    """Power and number of every pod's GPUs together (a tensor-parallel pod spans several GPUs)."""
    loads: dict[str, _PodLoad] = {}
    for reading in inputs.readings:
        for uid in inputs.pod_uids_by_gpu.get(reading.uuid, frozenset()):
            load = loads.setdefault(uid, _PodLoad())
            load.power_w += reading.power_w
            load.gpus += 1
    return loads


# -- the plan -----------------------------------------------------------------------------


def plan_tick(inputs: TickInputs) -> tuple[GpuPlan, ...]:
    """One :class:`GpuPlan` per reading, in reading order (module docstring)."""
    owners = {r.uuid: _owner(inputs, r.uuid) for r in inputs.readings}
    gpus_per_policy: dict[str, int] = {}
    for owner in owners.values():
        if owner.policy is not None:
            gpus_per_policy[owner.policy.key] = gpus_per_policy.get(owner.policy.key, 0) + 1
    pod_loads = _pod_loads(inputs)
    plans = []
    for reading in inputs.readings:
        owner = owners[reading.uuid]
        record = inputs.records.get(reading.uuid)
        if owner.policy is None:
            plans.append(_plan_unowned(inputs, reading, owner.pod, record))
        else:
            plans.append(_plan_owned(inputs, reading, owner, record, gpus_per_policy, pod_loads))
    return tuple(plans)


def _plan_unowned(inputs: TickInputs, reading: GpuReading, pod: KubeObject | None, record: CapRecord | None) -> GpuPlan:
    current_w = reading.requested_limit_w
    # The pod is named even when no policy matches it: telemetry and logs show who uses the GPU.
    base = GpuPlan(reading.uuid, reading.index, Action.NONE, current_w, current_w, "unowned", pod=object_key(pod) if pod else None)
    if record is None:
        return base
    if not inputs.policy_fresh:
        # The GPU may only look unowned because the view is stale: never raise now.
        return replace(base, action=Action.HOLD, reason=CapReason.STALE_POLICY.value, record=record)
    if abs(current_w - reading.default_limit_w) <= DEFAULT_LIMIT_TOLERANCE_W:
        return replace(base, reason=LEFT_POLICIES)  # already at its default: just forget it
    action = Action.RESTORE if inputs.enforce else Action.OBSERVE
    kept = None if inputs.enforce else record
    return replace(base, action=action, cap_w=reading.default_limit_w, reason=LEFT_POLICIES, record=kept)


def _plan_owned(
    inputs: TickInputs,
    reading: GpuReading,
    owner: _Owner,
    record: CapRecord | None,
    gpus_per_policy: Mapping[str, int],
    pod_loads: Mapping[str, _PodLoad],
) -> GpuPlan:
    policy = owner.policy
    assert policy is not None
    pod_uid = (owner.pod.get("metadata") or {}).get("uid") if owner.pod else None
    ratio: float | None = None
    tokens_s: float | None = None
    if pod_uid is not None:
        pod_tokens_s = inputs.tokens_s_by_pod.get(pod_uid)
        load = pod_loads.get(pod_uid, _PodLoad())
        tokens_s = gpu_tokens_s(pod_tokens_s, reading.power_w, load.power_w, load.gpus)
        if policy.performance is not None:
            ratio = tokens_per_joule(pod_tokens_s, load.power_w)
    memory = inputs.memories.get(reading.uuid)
    if memory is not None and memory.policy == policy.key:
        state = memory.control
    elif record is not None and record.policy == policy.key:
        state = record.control_state()
    else:
        state = ControlState()
    measurement = GpuMeasurement(
        current_cap_w=reading.requested_limit_w,
        min_w=reading.min_limit_w,
        max_w=reading.max_limit_w,
        allocation_w=allocation_w(policy, inputs.node, reading.uuid, gpus_per_policy.get(policy.key, 0)),
        temperature_c=reading.temperature_c,
        slowdown_c=reading.slowdown_c,
        inlet_c=inputs.inlet_c,
        max_inlet_c=max_inlet_c(policy, inputs.node_rack, inputs.apply_all_racks),
        tokens_per_joule=ratio,
        target=policy.performance,
        policy_fresh=inputs.policy_fresh,
    )
    decision = next_cap(measurement, state, inputs.now_s, inputs.settings)
    reason = decision.reason.value
    if decision.change and _lost_to_reset(reading, record):
        reason = DRIVER_RESET
    enforcing = inputs.enforce and policy.enforced
    if decision.change:
        action = Action.SET if enforcing else Action.OBSERVE
    else:
        action = Action.HOLD
    return GpuPlan(
        uuid=reading.uuid,
        index=reading.index,
        action=action,
        cap_w=decision.cap_w,
        previous_w=reading.requested_limit_w,
        reason=reason,
        policy=policy,
        pod=object_key(owner.pod) if owner.pod else None,
        pod_uid=pod_uid,
        tokens_per_joule=ratio,
        tokens_s=tokens_s,
        emergency=decision.emergency,
        record=_next_record(reading, policy, decision, record) if enforcing else record,
        memory=GpuMemory(policy.key, decision.state),
    )


def _lost_to_reset(reading: GpuReading, record: CapRecord | None) -> bool:
    """A record says we capped the GPU below its default, and it is back at its default."""
    return (
        record is not None
        and record.cap_w < reading.default_limit_w - DEFAULT_LIMIT_TOLERANCE_W
        and abs(reading.requested_limit_w - reading.default_limit_w) <= DEFAULT_LIMIT_TOLERANCE_W
    )


def _next_record(reading: GpuReading, policy: Policy, decision: CapDecision, record: CapRecord | None) -> CapRecord:
    """What the state file holds for a GPU an enforced policy owns (adopted when we find it)."""
    default_w = record.default_w if record is not None else reading.default_limit_w
    return CapRecord(
        uuid=reading.uuid,
        cap_w=decision.cap_w,
        default_w=default_w,
        policy=policy.key,
        ratio_offset_w=decision.state.ratio_offset_w,
        thermal_limit_w=decision.state.thermal_limit_w,
    )


# -- telemetry ----------------------------------------------------------------------------


def build_telemetry(
    timestamp: datetime,
    readings: Iterable[GpuReading],
    inlet_c: float | None,
    pods_by_gpu: Mapping[str, str | None] | None = None,
    enforced_w_by_gpu: Mapping[str, float] | None = None,
    tokens_s_by_gpu: Mapping[str, float | None] | None = None,
) -> NodeTelemetry:
    """The node annotation's content: ``powerW = sum of GPU power``; a GPU's ``limitW``
    is its enforced limit (after this tick's writes when ``enforced_w_by_gpu`` has it);
    its ``tokensPerSecond`` is ``tokens_s_by_gpu``'s (:attr:`GpuPlan.tokens_s`), reported
    only beside a pod (null otherwise)."""
    pods = pods_by_gpu or {}
    enforced = enforced_w_by_gpu or {}
    tokens = tokens_s_by_gpu or {}
    gpus = tuple(
        GpuTelemetry(
            uuid=r.uuid,
            index=r.index,
            power_w=r.power_w,
            limit_w=enforced.get(r.uuid, r.limit_w),
            min_w=r.min_limit_w,
            max_w=r.max_limit_w,
            temperature_c=r.temperature_c,
            pod=pods.get(r.uuid),
            tokens_s=tokens.get(r.uuid) if pods.get(r.uuid) is not None else None,
        )
        for r in readings
    )
    return NodeTelemetry(timestamp=timestamp, power_w=sum(g.power_w for g in gpus), inlet_temperature_c=inlet_c, gpus=gpus)


@dataclass(frozen=True)
class PublishSettings:
    """Telemetry rate limits: ``min_interval_s`` between two annotations at least,
    ``heartbeat_s`` at most (the extender calls telemetry stale after 90 s)."""

    power_change_fraction: float = 0.05
    temperature_change_c: float = 2.0
    min_interval_s: float = 5.0
    heartbeat_s: float = 30.0


def should_publish(
    last: NodeTelemetry | None,
    candidate: NodeTelemetry,
    since_last_s: float,
    settings: PublishSettings = PublishSettings(),
) -> bool:
    """Whether ``candidate`` is worth a node patch, ``since_last_s`` after ``last`` went out.

    True when nothing was published yet, or ``since_last_s >= min_interval_s`` and one of:
    heartbeat due (``since_last_s >= heartbeat_s``); the set of GPUs, a limit or a pod
    changed; ``|P' - P| > fraction x P`` for the node or a GPU; ``|T' - T| >= 2 degC`` for
    a GPU or the inlet; the inlet became known or unknown. Tokens/s is not compared: it
    rides along (module docstring).
    """
    if last is None:
        return True
    if since_last_s < settings.min_interval_s:
        return False
    if since_last_s >= settings.heartbeat_s:
        return True
    if _power_moved(last.power_w, candidate.power_w, settings) or _temperature_moved(
        last.inlet_temperature_c, candidate.inlet_temperature_c, settings
    ):
        return True
    before = {g.uuid: g for g in last.gpus}
    if set(before) != {g.uuid for g in candidate.gpus}:
        return True
    for gpu in candidate.gpus:
        old = before[gpu.uuid]
        if (gpu.limit_w, gpu.pod, gpu.min_w, gpu.max_w) != (old.limit_w, old.pod, old.min_w, old.max_w):
            return True
        if _power_moved(old.power_w, gpu.power_w, settings) or _temperature_moved(
            old.temperature_c, gpu.temperature_c, settings
        ):
            return True
    return False


def _power_moved(old_w: float, new_w: float, settings: PublishSettings) -> bool:
    return abs(new_w - old_w) > settings.power_change_fraction * abs(old_w)


def _temperature_moved(old_c: float | None, new_c: float | None, settings: PublishSettings) -> bool:
    if old_c is None or new_c is None:
        return (old_c is None) != (new_c is None)
    return abs(new_c - old_c) >= settings.temperature_change_c
