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
   counts its GPU, and the GPU keeps its cap instead of bouncing to its default);
3. else, with ``--policy FILE``, the file's policy (``node_policy``): it owns every GPU.

**Allocation** (the control law's ceiling) is that entry's per-GPU ``watts``; a node entry
without a ``gpus`` list splits its ``watts`` evenly over the policy's GPUs on this node,
those the agent cannot see included: ``allocation = floor(node watts / n)``. A GPU with no
allocation runs at its minimum.

**What a policy may hold on this node** (:func:`share_out`, every tick, per policy): the
allocations are never taken on trust. With ``B`` the policy's budget
(:func:`powercap.placement.policy_budget_w`: ``status.budgetW`` for the current spec, else
``floor(powerCapLimit x (1 - margin))``, margin 0 by default), ``E`` this node's allocated watts, ``S`` the sum of
every node's (:func:`entry_total_w`) and ``U`` the minimums of this node's GPUs of the
policy that have no allocation yet::

    allowance = min(B, E x min(1, B / S) + U)
    room      = allowance - sum(held)        held: the GPUs that cannot move (below)
    ceiling_i = ask_i                        when sum(ask) <= room, else
                max(min_i, floor(ask_i x s)) with the largest s in [0, 1] that fits (:func:`fit_w`);
                every GPU at its minimum when the minimums alone pass ``room`` (*infeasible*)

``ask_i`` is the GPU's allocation (its minimum without one) within its [min, max]. A GPU
the agent cannot move counts at the limit it holds: a GPU whose setter fails
(``stuck``) at its management limit; a GPU it cannot read (``unseen``: a failed read, or
a failed enumeration with no UUID) at the limit read alone, else its NVML maximum
(:func:`held_w`), attributed to a policy by its last owner, its state-file record, an
allocation naming it, an allocation or record naming a UUID the node does not show, or the
file's policy.

Safety rules encoded here (each has a test row in tests/test_agentplan.py):

- the current cap fed to the law is the *requested* (management) limit, not the
  enforced one: an out-of-band limiter holding the GPU lower does not make us rewrite;
- without a fresh view of a policy (the API server unreachable, a watch down, or the
  policy unreadable: ``unreadable_policies``, its last good version kept) nothing is
  raised: the law holds (only a thermal cut moves), a GPU that seems to have left every
  policy is not restored, and no record is raised or created without a write; a cap is
  still lowered to its recorded value (a GPU reset put its default back) or to a clamped
  ceiling (another GPU of the policy cannot move): going down is always safe;
- only GPUs the agent capped (a :class:`CapRecord`, persisted in the host state file) are
  ever restored; a GPU whose management limit went back to its default while a record
  says we capped it lower lost its cap to a driver reload or GPU reset: re-applied, with
  reason ``driver-reset``;
- a GPU whose setter fails keeps its record (its lower cap is what to go back to);
- a restart adopts the recorded caps and control state (ratio offset, thermal limit), so
  the first tick after a restart writes nothing when the caps already match.

A policy the agent's validator refuses is read leniently (:func:`enforceable_policy`): the
agent needs the cap, the selector, the mode and the allocations, not the algorithm.

Telemetry (:func:`build_telemetry`) and its rate limiting (:func:`should_publish`) are
here too: publish when any GPU's or the node's power moved by more than 5 %, a
temperature by 2 degC or more, a limit or pod changed, or a heartbeat is due; never more
often than a minimum interval. A GPU's ``tokensPerSecond`` (its pod's tokens/s split
across the pod's GPUs by power, :func:`gpu_tokens_s`) never triggers a publish by
itself: a rate moves on every scrape, and the ratio it feeds (``status.ratio``) may lag
by a heartbeat; it goes out with whatever publish comes next. Its ``requestsWaiting`` (the
pod's queue) triggers one when it goes from none to some or back (the controller counts a
queued pod's GPUs as pinned), and rides along otherwise. A GPU a tick raised is
published at its limit before the write (:func:`raised_caps`): its power was read under it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, TypeGuard

from powercap.allocation import AllocationSettings, budget_w
from powercap.control import CapReason, ControlSettings, ControlState, GpuMeasurement, next_cap
from powercap.objects import KubeObject, object_key, pod_is_active, policy_for_pod
from powercap.numeric import is_finite_number
from powercap.placement import policy_budget_w
from powercap.policies import (
    LabelSelector,
    Mode,
    PerformanceTarget,
    Policy,
    RackConstraint,
    SelectorRequirement,
    default_selector,
)
from powercap.nodepower import NodePower
from powercap.telemetry import GpuTelemetry, NodeTelemetry

DRIVER_RESET = "driver-reset"
LEFT_POLICIES = "left-policies"
RECORDED_CAP = "recorded-cap"
"""Lowered to the cap the state file records while the view is stale."""
BUDGET_CLAMP = "budget-clamp"
"""Lowered to a ceiling :func:`share_out` clamped under the allocation."""
STUCK = "setter-failing"
"""Held: the GPU's setter fails; it counts at the limit it holds."""
POLICY_UNREADABLE = "policy-unreadable"
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
class UnseenGpu:
    """A GPU of this node the agent cannot read this tick: a read failed, or enumeration
    did (``uuid`` None). ``held_w``: its management limit read alone, None when that failed
    too; ``max_w``: its NVML maximum from an earlier reading, None when never read."""

    index: int
    uuid: str | None = None
    held_w: float | None = None
    max_w: float | None = None


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
        unseen: GPUs of this node that could not be read (or enumerated) this tick.
        stuck: UUIDs of readable GPUs whose setter fails: held, counted at their limit.
        unreadable_policies: policy key -> why it cannot be read; ``policies`` holds its
            last good version, if the agent had one.
        node_policy: the key of the policy that owns every GPU of the node
            (``--policy FILE``), else None.
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
    unseen: Sequence[UnseenGpu] = ()
    stuck: frozenset[str] = frozenset()
    unreadable_policies: Mapping[str, str] = field(default_factory=dict)
    node_policy: str | None = None


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
    """The policy's ``status.allocations`` entry for ``node`` (the first one naming it), or None."""
    return _node_entry(policy, node).entry


@dataclass(frozen=True)
class _Allocations:
    """A policy's ``status`` read once: each node's allocation entry, :func:`service_allocated_w`,
    :func:`~powercap.placement.policy_budget_w`;
    ``read_nodes`` holds what :func:`_node_entry` read of an entry, filled as nodes ask."""

    by_node: Mapping[str, Mapping[str, Any]]
    service_w: float
    budget_w: int
    read_nodes: dict[str, _NodeEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class _NodeEntry:
    """One node's ``status.allocations`` entry read once per policy object: ``entry`` (None:
    no entry), its :func:`entry_total_w`, the UUIDs its ``gpus`` list names
    (:func:`allocated_uuids`), each named GPU's watts (the first valid one per UUID), and,
    without a ``gpus`` list, its ``watts`` when they are a number."""

    entry: Mapping[str, Any] | None
    total_w: float = 0.0
    uuids: frozenset[str] = frozenset()
    gpu_watts: Mapping[str, float] | None = None
    node_watts: float | None = None


_NO_ENTRY = _NodeEntry(None)


_ALLOCATIONS: dict[int, tuple[weakref.ref[Policy], _Allocations]] = {}
"""Each live policy object's :class:`_Allocations`, by ``id``; an entry goes with its policy
(at 10,000 GPUs a status and what its nodes read of it are megabytes: a cache of the last
few hundred policies held gigabytes)."""


def _allocations_of(policy: Policy) -> _Allocations:
    """Read once per policy object, not once per GPU and tick: a node agent's tick stays
    proportional to its node, not to every node the policy's status lists (1,250 at 10,000
    GPUs). A Policy never changes (its status is a read-only copy): a new status is a new Policy."""
    kept = _ALLOCATIONS.get(id(policy))
    if kept is not None and kept[0]() is policy:
        return kept[1]
    allocations = policy.status.get("allocations") or ()
    entries = [e for e in allocations if isinstance(e, Mapping)] if isinstance(allocations, (list, tuple)) else []
    by_node: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        node = entry.get("node")
        if isinstance(node, str):
            by_node.setdefault(node, entry)
    read = _Allocations(by_node=by_node, service_w=sum(entry_total_w(e) for e in entries), budget_w=policy_budget_w(policy))
    key = id(policy)
    _ALLOCATIONS[key] = (weakref.ref(policy, lambda _: _forget_allocations(key)), read)
    return read


def _forget_allocations(key: int) -> None:
    kept = _ALLOCATIONS.get(key)
    if kept is not None and kept[0]() is None:  # not a new policy at the same address
        _ALLOCATIONS.pop(key, None)


def _node_entry(policy: Policy, node: str) -> _NodeEntry:
    """What a node's agent reads of its entry, once per policy object and node (every tick
    would read the same: a new status is a new Policy)."""
    allocations = _allocations_of(policy)
    read = allocations.read_nodes.get(node)
    if read is not None:
        return read
    entry = allocations.by_node.get(node)
    if entry is None:
        read = _NO_ENTRY
    else:
        gpus = entry.get("gpus")
        gpu_watts: dict[str, float] | None = None
        uuids: frozenset[str] = frozenset()
        if isinstance(gpus, (list, tuple)):
            gpu_watts = {}
            for gpu in gpus:
                if isinstance(gpu, Mapping) and isinstance(gpu.get("uuid"), str) and _is_number(gpu.get("watts")):
                    gpu_watts.setdefault(gpu["uuid"], float(gpu["watts"]))
            uuids = frozenset(str(gpu["uuid"]) for gpu in gpus if isinstance(gpu, Mapping) and gpu.get("uuid"))
        watts = entry.get("watts")
        read = _NodeEntry(entry, entry_total_w(entry), uuids, gpu_watts, float(watts) if _is_number(watts) else None)
    allocations.read_nodes[node] = read
    return read


def allocated_uuids(policy: Policy, node: str) -> frozenset[str]:
    """GPU UUIDs that the policy's allocation for ``node`` names."""
    return _node_entry(policy, node).uuids


def allocation_w(policy: Policy, node: str, uuid: str, gpus_on_node: int) -> float | None:
    """The watts the budget controller allocated to one GPU, or None (runs at minimum).

    The per-GPU entry wins; a node entry with no ``gpus`` list is split evenly:
    ``floor(watts / gpus_on_node)``, so the split never sums above the node's share.
    """
    return _gpu_allocation_w(_node_entry(policy, node), uuid, gpus_on_node)


def _gpu_allocation_w(read: _NodeEntry, uuid: str, gpus_on_node: int) -> float | None:
    """:func:`allocation_w` from the node's entry."""
    if read.entry is None:
        return None
    if read.gpu_watts is not None:
        return read.gpu_watts.get(uuid)
    if read.node_watts is None or gpus_on_node <= 0:
        return None
    return float(math.floor(read.node_watts / gpus_on_node))


def _is_number(value: Any) -> TypeGuard[float]:
    return is_finite_number(value)


def entry_total_w(entry: Mapping[str, Any]) -> float:
    """The watts one ``status.allocations`` entry gives its node: the sum of its per-GPU
    ``watts`` (negative ones as 0), or its ``watts`` without a ``gpus`` list; the smaller
    of the two when both are there and disagree (contradictory input: believe the lower)."""
    totals = []
    gpus = entry.get("gpus")
    if isinstance(gpus, (list, tuple)):
        totals.append(sum(max(0.0, float(g["watts"])) for g in gpus if isinstance(g, Mapping) and _is_number(g.get("watts"))))
    watts = entry.get("watts")
    if _is_number(watts):
        totals.append(max(0.0, float(watts)))
    return min(totals) if totals else 0.0


def service_allocated_w(policy: Policy) -> float:
    """The sum of :func:`entry_total_w` over every node of the policy's ``status.allocations``."""
    return _allocations_of(policy).service_w


def split_allocation(policy: Policy, node: str, margin: float = AllocationSettings().margin) -> Policy:
    """``--policy FILE`` mode: every local GPU belongs to ``policy``.

    Keeps an allocation the file's ``status`` already has for ``node``; otherwise writes a
    node entry without a ``gpus`` list, ``watts = floor(powerCapLimit x (1 - margin))``
    (the budget controller's budget, the whole powerCapLimit at its default margin 0), which
    the plan splits evenly over the GPUs of the node, those it cannot see included:
    ``floor(budget / n)`` each, clamped to each GPU's [min, max] by the law.
    """
    if node_allocation(policy, node) is not None:
        return policy
    entry = {"node": node, "watts": budget_w(policy.power_cap_w, margin)}
    status = dict(policy.status)
    status["allocations"] = [*(status.get("allocations") or ()), entry]
    return replace(policy, status=MappingProxyType(status))


def enforceable_policy(document: Any) -> Policy:
    """What the agent needs of a policy its validator refuses: the cap, the selector, the
    mode, the rack limits it can read and the status (the allocations).

    A policy may pass the webhook and fail here (an algorithm installed in the webhook's
    image and not in the agent's, or a rule tightened by an upgrade); the agent does not need
    the algorithm, so ``customAlgorithm`` is not looked at. A rack constraint or a ratio
    target that cannot be read is left out (neither can raise a cap above its allocation);
    a ``mode`` other than ``Observe`` is enforced. Raises ``ValueError`` naming the field
    when the policy truly cannot be enforced: no name, no ``spec``, no positive
    ``powerCapLimit``, or a selector that cannot be read (which pods are its own?).
    """
    if not isinstance(document, Mapping):
        raise ValueError("a policy must be an object")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("metadata.name: is required")
    assert isinstance(metadata, Mapping)
    spec = document.get("spec")
    if not isinstance(spec, Mapping):
        raise ValueError("spec: is required")
    cap = spec.get("powerCapLimit")
    if not _is_number(cap) or cap <= 0:
        raise ValueError("spec.powerCapLimit: " + ("is required" if cap is None else "must be watts greater than 0"))
    namespace = metadata.get("namespace")
    generation = metadata.get("generation")
    status = document.get("status")
    return Policy(
        namespace=namespace if isinstance(namespace, str) and namespace else "default",
        name=name,
        uid=str(metadata.get("uid") or ""),
        generation=generation if isinstance(generation, int) and not isinstance(generation, bool) else 0,
        power_cap_w=math.floor(cap),
        racks=_readable_racks(spec.get("rackConstraints")),
        performance=_readable_target(spec.get("performancePowerRatio")),
        selector=_readable_selector(spec.get("selector"), name),
        mode=Mode.OBSERVE if spec.get("mode") == Mode.OBSERVE.value else Mode.ENFORCE,
        status=MappingProxyType(dict(status) if isinstance(status, Mapping) else {}),
    )


def _readable_selector(raw: Any, name: str) -> LabelSelector:
    if raw is None:
        return LabelSelector.from_dict(default_selector(name))
    if not isinstance(raw, Mapping):
        raise ValueError("spec.selector: must be an object")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError("spec.selector.matchLabels: must map strings to strings")
    expressions = raw.get("matchExpressions") or []
    requirements = []
    for index, expression in enumerate(expressions if isinstance(expressions, list) else [None]):
        path = f"spec.selector.matchExpressions[{index}]"
        if not isinstance(expression, Mapping) or not isinstance(expression.get("key"), str):
            raise ValueError(f"{path}: must be an object with a key")
        operator, values = expression.get("operator"), expression.get("values") or []
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"{path}.operator: must be In, NotIn, Exists or DoesNotExist")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{path}.values: must be a list of strings")
        requirements.append(SelectorRequirement(expression["key"], operator, tuple(values)))
    return LabelSelector(MappingProxyType(dict(labels)), tuple(requirements))


def _readable_racks(raw: Any) -> tuple[RackConstraint, ...]:
    racks = []
    for rack in raw if isinstance(raw, list) else ():
        if not isinstance(rack, Mapping) or not isinstance(rack.get("rackId"), str):
            continue
        power, temperature = rack.get("maxPower"), rack.get("maxTemperature")
        racks.append(RackConstraint(
            rack["rackId"],
            max_power_w=int(power) if _is_number(power) and power > 0 else None,
            max_temperature_c=float(temperature) if _is_number(temperature) else None,
        ))
    return tuple(racks)


def _readable_target(raw: Any) -> PerformanceTarget | None:
    if not isinstance(raw, Mapping) or not _is_number(raw.get("targetRatio")) or raw["targetRatio"] <= 0:
        return None
    tolerance = raw.get("tolerancePercentage")
    return PerformanceTarget(float(raw["targetRatio"]), float(tolerance) if _is_number(tolerance) and 0 <= tolerance <= 100 else 5.0)


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


class _Owner(NamedTuple):
    policy: Policy | None
    pod: KubeObject | None
    pod_key: str | None = None  # the pod's namespace/name
    pod_uid: str | None = None  # its metadata.uid


def _owners(inputs: TickInputs) -> dict[str, _Owner]:
    """Each reading's owner (module docstring, in order: its pods' policy, an allocation naming
    it, the file's policy) and its pod; a GPU's pods are looked up once per tick, however many
    GPUs they span (a tensor-parallel pod spans up to 8)."""
    by_pods: dict[frozenset[str], _Owner] = {}
    owners: dict[str, _Owner] = {}
    for reading in inputs.readings:
        uids = frozenset(inputs.pod_uids_by_gpu.get(reading.uuid, frozenset()))
        owner = by_pods.get(uids)
        if owner is None:
            policy, pod = _pods_owner(inputs, uids)
            pod_uid = (pod.get("metadata") or {}).get("uid") if pod else None
            owner = by_pods[uids] = _Owner(policy, pod, object_key(pod) if pod else None, pod_uid)
        if owner.policy is None:
            owner = owner._replace(policy=_allocated_to(inputs, reading.uuid) or _policy_by_key(inputs, inputs.node_policy))
        owners[reading.uuid] = owner
    return owners


def _pods_owner(inputs: TickInputs, uids: frozenset[str]) -> tuple[Policy | None, KubeObject | None]:
    """The policy of the first of these active pods (by key) that one matches, and that pod;
    else None and the first pod (None without one)."""
    pods = sorted(
        (inputs.pods_by_uid[uid] for uid in uids if uid in inputs.pods_by_uid and pod_is_active(inputs.pods_by_uid[uid])),
        key=object_key,
    )
    for pod in pods:
        policy = policy_for_pod(pod, inputs.policies)
        if policy is not None:
            return policy, pod
    return None, pods[0] if pods else None


def _allocated_to(inputs: TickInputs, uuid: str) -> Policy | None:
    """The policy (first by key) whose allocation for this node names ``uuid``."""
    named = sorted((p for p in inputs.policies if uuid in allocated_uuids(p, inputs.node)), key=lambda p: p.key)
    return named[0] if named else None


def _policy_by_key(inputs: TickInputs, key: str | None) -> Policy | None:
    return next((p for p in inputs.policies if p.key == key), None) if key is not None else None


def held_w(gpu: UnseenGpu, readings: Sequence[GpuReading]) -> float:
    """The limit an unreadable GPU counts at: the management limit read alone; else its
    maximum from an earlier reading; else the largest maximum of the node's readable GPUs
    (a node's GPUs are nearly always one model); 0 when no GPU of the node can be read
    (then there is nothing to make room on)."""
    if gpu.held_w is not None:
        return gpu.held_w
    if gpu.max_w is not None:
        return gpu.max_w
    return max((r.max_limit_w for r in readings), default=0.0)


def _unseen_owners(inputs: TickInputs) -> dict[int, str | None]:
    """The policy key each unseen GPU counts against (module docstring), by NVML index.

    A GPU with a UUID: its owner last tick (memory), its state-file record, an allocation
    naming it, else the file's policy. One that failed enumeration (no UUID): the owner of
    a UUID that an allocation for this node or a record names and the node does not show
    (one such UUID per GPU, in UUID order), else the file's policy.
    """
    known = {r.uuid for r in inputs.readings} | {g.uuid for g in inputs.unseen if g.uuid}
    orphans: dict[str, str] = {}
    for uuid, recorded in inputs.records.items():
        if uuid not in known:
            orphans.setdefault(uuid, recorded.policy)
    for policy in sorted(inputs.policies, key=lambda p: p.key):
        for uuid in allocated_uuids(policy, inputs.node) - known:
            orphans.setdefault(uuid, policy.key)
    unclaimed = sorted(orphans)
    owners: dict[int, str | None] = {}
    for gpu in sorted(inputs.unseen, key=lambda g: g.index):
        key: str | None = None
        if gpu.uuid is not None:
            memory, record = inputs.memories.get(gpu.uuid), inputs.records.get(gpu.uuid)
            allocated = _allocated_to(inputs, gpu.uuid)
            key = memory.policy if memory else record.policy if record else allocated.key if allocated else None
        elif unclaimed:
            key = orphans[unclaimed.pop(0)]
        owners[gpu.index] = key or inputs.node_policy
    return owners


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


# -- what a policy may hold on this node ---------------------------------------------------


def fit_w(asks_w: Sequence[float], mins_w: Sequence[float], room_w: float) -> list[float]:
    """Ceilings that sum to at most ``room_w``, proportional to the asks.

    ``asks_w`` as they are when they fit. Otherwise ``c_i = max(min_i, floor(ask_i x s))``
    with the largest ``s`` in [0, 1] that fits (GPUs whose share falls under their minimum
    are held there and the others share what is left); every GPU at its minimum when the
    minimums alone pass ``room_w``. Each ``ask_i`` must already lie in [min_i, max_i].
    """
    asks, mins = list(asks_w), list(mins_w)
    if sum(asks) <= room_w + 1e-9:
        return asks
    if sum(mins) >= room_w:
        return mins
    pinned: set[int] = set()
    scale = 1.0
    for _ in range(len(asks) + 1):
        free = [i for i in range(len(asks)) if i not in pinned]
        wanted = sum(asks[i] for i in free)
        if wanted <= 0:
            break
        scale = min(1.0, (room_w - sum(mins[i] for i in pinned)) / wanted)
        newly = {i for i in free if asks[i] * scale < mins[i]}
        if not newly:
            break
        pinned |= newly
    return [mins[i] if i in pinned else max(mins[i], math.floor(asks[i] * scale + 1e-9)) for i in range(len(asks))]


@dataclass(frozen=True)
class PolicyShare:
    """What one policy may hold on this node this tick, and what its GPUs got (:func:`share_out`).

    All in W: ``budget_w`` (B), ``allocated_w`` (E, this node's allocation),
    ``service_w`` (S, every node's), ``allowance_w``, ``asked_w`` (the asks of the GPUs
    that can move), ``held_w`` (the GPUs that cannot, at the limit they hold) and
    ``ceilings_w`` (what the movable ones got). ``clamped``: the asks were cut;
    ``infeasible``: their minimums alone pass the room. ``unreadable``: why the policy
    cannot be read (its caps are held), else None.
    """

    policy: str
    budget_w: float
    allocated_w: float
    service_w: float
    allowance_w: float
    asked_w: float
    held_w: float
    ceilings_w: float
    minimums_w: float
    gpus: int
    clamped: bool
    infeasible: bool
    power_cap_w: float = 0.0
    unreadable: str | None = None

    @property
    def over_budget(self) -> bool:
        """The published allocations alone pass the budget (the controller's input is wrong)."""
        return self.service_w > self.budget_w + 1e-9 or self.allocated_w > self.budget_w + 1e-9

    @property
    def problem(self) -> str | None:
        """One line for ``/status`` and the logs, None when all is well."""
        if self.unreadable is not None:
            return f"unreadable, caps held: {self.unreadable}"
        if self.infeasible:
            held = f" + {_w(self.held_w)} W held by GPUs that cannot move" if self.held_w > 0 else ""
            return (f"infeasible: minimums {_w(self.minimums_w)} W{held} > budget {_w(self.allowance_w)} W"
                    f" (powerCapLimit {_w(self.power_cap_w)} W)")
        if self.over_budget:
            return (f"allocations {_w(self.service_w)} W pass the budget {_w(self.budget_w)} W:"
                    f" clamped to {_w(self.ceilings_w + self.held_w)} W on this node")
        if self.clamped:
            return (f"{_w(self.held_w)} W held by GPUs that cannot move: the others clamped from"
                    f" {_w(self.asked_w)} W to {_w(self.ceilings_w)} W")
        return None


def _w(watts: float) -> str:
    return f"{watts:.0f}" if abs(watts - round(watts)) < 0.05 else f"{watts:.1f}"


class _Member(NamedTuple):
    """One movable GPU of a policy on this node: its limits and its allocation."""

    uuid: str
    min_w: float
    max_w: float
    allocation_w: float | None


def share_out(
    policy: Policy, node: str, members: Sequence[_Member], held: Sequence[float], gpus_on_node: int,
) -> tuple[PolicyShare, dict[str, float]]:
    """The ceilings of a policy's movable GPUs on ``node`` (module docstring: allowance,
    room, :func:`fit_w`) and the share's summary."""
    read = _allocations_of(policy)
    budget = float(read.budget_w)
    allocated = _node_entry(policy, node).total_w
    service = read.service_w
    scale = min(1.0, budget / service) if service > 0 else 1.0
    unallocated = sum(m.min_w for m in members if m.allocation_w is None)
    allowance = min(budget, allocated * scale + unallocated)
    asks = [min(max(m.allocation_w if m.allocation_w is not None else m.min_w, m.min_w), max(m.min_w, m.max_w))
            for m in members]
    mins = [m.min_w for m in members]
    room = allowance - sum(held)
    ceilings = fit_w(asks, mins, room)
    summary = PolicyShare(
        policy=policy.key,
        budget_w=budget,
        allocated_w=allocated,
        service_w=service,
        allowance_w=allowance,
        asked_w=sum(asks),
        held_w=sum(held),
        ceilings_w=sum(ceilings),
        minimums_w=sum(mins),
        gpus=gpus_on_node,
        clamped=sum(ceilings) < sum(asks) - 1e-9,
        infeasible=sum(mins) > room + 1e-9,
        power_cap_w=float(policy.power_cap_w),
    )
    return summary, {m.uuid: c for m, c in zip(members, ceilings)}


# -- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePlan:
    """One tick's decisions: a :class:`GpuPlan` per reading (in reading order), a
    :class:`PolicyShare` per policy owning a GPU of the node (or an unreadable one), and the
    unseen GPUs no policy could be found for (counted nowhere; left alone)."""

    gpus: tuple[GpuPlan, ...]
    policies: Mapping[str, PolicyShare]
    unattributed: tuple[UnseenGpu, ...] = ()


def plan_tick(inputs: TickInputs) -> tuple[GpuPlan, ...]:
    """One :class:`GpuPlan` per reading, in reading order (module docstring)."""
    return plan_node(inputs).gpus


class _Layout(NamedTuple):
    """What a tick decides before it looks at power, temperature or tokens: each GPU's owner,
    each policy's share of the node and its GPUs' ceilings and allocations."""

    owners: Mapping[str, _Owner]
    shares: Mapping[str, PolicyShare]
    ceilings: Mapping[str, float]
    allocations: Mapping[str, float | None]
    unattributed: tuple[UnseenGpu, ...]


_LAYOUTS: dict[str, tuple[tuple[Any, ...], tuple[Any, ...], _Layout]] = {}
"""Per node, the last layout and what it was planned from (:func:`_node_layout`)."""
_LAYOUTS_KEPT = 65536


def _node_layout(inputs: TickInputs) -> _Layout:
    """:func:`_plan_layout`, kept between ticks of a node while what it reads is the same:
    the same policy objects and pod objects (neither changes in place: a new version is a
    new object, as the agent's view and the simulator give them), the same GPUs with the
    same limits and pods, nothing unseen or stuck. Most ticks (a node's pods and the
    policies' allocations change every few seconds at most) then skip the ownership and
    share-out."""
    if inputs.unseen or inputs.stuck:
        return _plan_layout(inputs)
    pod_uids = inputs.pod_uids_by_gpu
    gpus = tuple((r.uuid, r.min_limit_w, r.max_limit_w, pod_uids.get(r.uuid)) for r in inputs.readings)
    pods_by_uid = inputs.pods_by_uid
    objects = (*inputs.policies, *(pods_by_uid.get(uid) for gpu in gpus for uid in sorted(gpu[3] or ())))
    values = (gpus, inputs.policy_fresh, inputs.node_policy, tuple(inputs.unreadable_policies.items()))
    kept = _LAYOUTS.get(inputs.node)
    if (
        kept is not None
        and len(kept[0]) == len(objects)
        and all(a is b for a, b in zip(kept[0], objects))
        and kept[1] == values
    ):
        return kept[2]
    layout = _plan_layout(inputs)
    if len(_LAYOUTS) >= _LAYOUTS_KEPT:
        _LAYOUTS.clear()
    _LAYOUTS[inputs.node] = (objects, values, layout)
    return layout


def _plan_layout(inputs: TickInputs) -> _Layout:
    """Ownership (with the unseen GPUs'), then each owning policy's share of the node."""
    owners = _owners(inputs)
    unseen_owners = _unseen_owners(inputs) if inputs.unseen else {}
    owned: dict[str, list[GpuReading]] = {}
    for reading in inputs.readings:
        policy = owners[reading.uuid].policy
        if policy is not None:
            owned.setdefault(policy.key, []).append(reading)
    unseen_by_policy: dict[str, list[UnseenGpu]] = {}
    unattributed = []
    for gpu in inputs.unseen:
        key = unseen_owners.get(gpu.index)
        if key is not None and _policy_by_key(inputs, key) is not None:
            unseen_by_policy.setdefault(key, []).append(gpu)
        else:
            unattributed.append(gpu)
    shares: dict[str, PolicyShare] = {}
    ceilings: dict[str, float] = {}
    allocations: dict[str, float | None] = {}
    for key in sorted(set(owned) | set(unseen_by_policy)):
        policy = _policy_by_key(inputs, key)
        assert policy is not None
        readings = owned.get(key, [])
        unseen = unseen_by_policy.get(key, [])
        n = len(readings) + len(unseen)
        movable, held = [], [held_w(g, inputs.readings) for g in unseen]
        entry = _node_entry(policy, inputs.node)
        for reading in readings:
            allocations[reading.uuid] = _gpu_allocation_w(entry, reading.uuid, n)
            if reading.uuid in inputs.stuck:
                held.append(reading.requested_limit_w)
            else:
                movable.append(_Member(reading.uuid, reading.min_limit_w, reading.max_limit_w, allocations[reading.uuid]))
        share, policy_ceilings = share_out(policy, inputs.node, movable, held, n)
        unreadable = inputs.unreadable_policies.get(key)
        shares[key] = share if unreadable is None else replace(share, unreadable=unreadable)
        ceilings.update(policy_ceilings)
    for key, why in inputs.unreadable_policies.items():
        if key not in shares:
            shares[key] = PolicyShare(key, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, False, False, unreadable=why)
    return _Layout(owners, shares, ceilings, allocations, tuple(unattributed))


def plan_node(inputs: TickInputs) -> NodePlan:
    """The whole tick: ownership, each policy's share of the node, then each GPU's plan."""
    layout = _node_layout(inputs)
    owners, ceilings, allocations = layout.owners, layout.ceilings, layout.allocations
    pod_loads = _pod_loads(inputs)
    policy_ticks: dict[int, _PolicyTick] = {}
    plans = []
    for reading in inputs.readings:
        owner = owners[reading.uuid]
        record = inputs.records.get(reading.uuid)
        if owner.policy is None:
            plans.append(_plan_unowned(inputs, reading, owner.pod, record))
        else:
            policy_tick = policy_ticks.get(id(owner.policy))
            if policy_tick is None:
                policy_tick = policy_ticks[id(owner.policy)] = _policy_tick(inputs, owner.policy)
            ceiling = ceilings.get(reading.uuid)
            allocation = allocations.get(reading.uuid)
            plans.append(_plan_owned(inputs, reading, owner, record, allocation, ceiling, pod_loads, policy_tick))
    return NodePlan(tuple(plans), MappingProxyType(layout.shares), layout.unattributed)


def _plan_unowned(inputs: TickInputs, reading: GpuReading, pod: KubeObject | None, record: CapRecord | None) -> GpuPlan:
    current_w = reading.requested_limit_w
    # The pod is named even when no policy matches it: telemetry and logs show who uses the GPU.
    base = GpuPlan(reading.uuid, reading.index, Action.NONE, current_w, current_w, "unowned", pod=object_key(pod) if pod else None)
    if record is None:
        return base
    unreadable = record.policy in inputs.unreadable_policies
    if not inputs.policy_fresh or unreadable:
        # The GPU may only look unowned because the view is stale or its policy unreadable:
        # never raise now, but going down to the recorded cap is always safe.
        reason = POLICY_UNREADABLE if unreadable and inputs.policy_fresh else CapReason.STALE_POLICY.value
        held = replace(base, action=Action.HOLD, reason=reason, record=record)
        if reading.uuid in inputs.stuck or current_w <= record.cap_w + DEFAULT_LIMIT_TOLERANCE_W:
            return held
        reason = DRIVER_RESET if _lost_to_reset(reading, record) else RECORDED_CAP
        action = Action.SET if inputs.enforce else Action.OBSERVE
        return replace(held, action=action, cap_w=record.cap_w, reason=reason)
    if abs(current_w - reading.default_limit_w) <= DEFAULT_LIMIT_TOLERANCE_W:
        return replace(base, reason=LEFT_POLICIES)  # already at its default: just forget it
    action = Action.RESTORE if inputs.enforce else Action.OBSERVE
    kept = None if inputs.enforce else record
    return replace(base, action=action, cap_w=reading.default_limit_w, reason=LEFT_POLICIES, record=kept)


class _PolicyTick(NamedTuple):
    """What one tick's plan of every GPU of a policy shares."""

    key: str
    fresh: bool
    max_inlet_c: float | None
    enforcing: bool


def _policy_tick(inputs: TickInputs, policy: Policy) -> _PolicyTick:
    key = policy.key
    return _PolicyTick(
        key=key,
        fresh=inputs.policy_fresh and key not in inputs.unreadable_policies,
        max_inlet_c=max_inlet_c(policy, inputs.node_rack, inputs.apply_all_racks),
        enforcing=inputs.enforce and policy.enforced,
    )


_NO_CONTROL_STATE = ControlState()


def _plan_owned(
    inputs: TickInputs,
    reading: GpuReading,
    owner: _Owner,
    record: CapRecord | None,
    allocation: float | None,
    ceiling: float | None,
    pod_loads: Mapping[str, _PodLoad],
    policy_tick: _PolicyTick,
) -> GpuPlan:
    policy = owner.policy
    assert policy is not None
    policy_key = policy_tick.key
    fresh = policy_tick.fresh
    pod_uid, pod_key = owner.pod_uid, owner.pod_key
    ratio: float | None = None
    tokens_s: float | None = None
    if pod_uid is not None:
        pod_tokens_s = inputs.tokens_s_by_pod.get(pod_uid)
        load = pod_loads.get(pod_uid, _PodLoad())
        tokens_s = gpu_tokens_s(pod_tokens_s, reading.power_w, load.power_w, load.gpus)
        if policy.performance is not None:
            ratio = tokens_per_joule(pod_tokens_s, load.power_w)
    memory = inputs.memories.get(reading.uuid)
    if memory is not None and memory.policy == policy_key:
        state = memory.control
    elif record is not None and record.policy == policy_key:
        state = record.control_state()
    else:
        state = _NO_CONTROL_STATE
    min_w, max_w, current_w = reading.min_limit_w, reading.max_limit_w, reading.requested_limit_w
    ask_w = min(max(allocation if allocation is not None else min_w, min_w), max(min_w, max_w))
    clamped = ceiling is not None and ceiling < ask_w - 1e-9
    law_allocation = ceiling if clamped else allocation
    measurement = GpuMeasurement(
        current_cap_w=current_w,
        min_w=min_w,
        max_w=max_w,
        allocation_w=law_allocation,
        temperature_c=reading.temperature_c,
        slowdown_c=reading.slowdown_c,
        inlet_c=inputs.inlet_c,
        max_inlet_c=policy_tick.max_inlet_c,
        tokens_per_joule=ratio,
        target=policy.performance,
        policy_fresh=fresh,
    )
    decision = next_cap(measurement, state, inputs.now_s, inputs.settings)
    reason = decision.reason.value
    if clamped and decision.reason is CapReason.ALLOCATION:
        reason = BUDGET_CLAMP
    if decision.change and _lost_to_reset(reading, record):
        reason = DRIVER_RESET
    cap_w, change = decision.cap_w, decision.change
    if not fresh:
        if not change:
            reason = CapReason.STALE_POLICY.value if not inputs.policy_fresh else POLICY_UNREADABLE
        # Going down is always safe: to the recorded cap (a reset put the default back), or to
        # a ceiling clamped to make room for a GPU that cannot move.
        for target_w, why in ((record.cap_w if record else None, RECORDED_CAP), (ceiling if clamped else None, BUDGET_CLAMP)):
            if target_w is not None and target_w < min(cap_w, current_w) - DEFAULT_LIMIT_TOLERANCE_W:
                cap_w, change = target_w, True
                reason = DRIVER_RESET if why == RECORDED_CAP and _lost_to_reset(reading, record) else why
    enforcing = policy_tick.enforcing
    if reading.uuid in inputs.stuck:
        # Its setter fails: it counts at the limit it holds (the others made room) and its
        # record keeps the lower cap to go back to once the setter answers.
        return GpuPlan(
            uuid=reading.uuid, index=reading.index, action=Action.HOLD, cap_w=current_w, previous_w=current_w,
            reason=STUCK, policy=policy, pod=pod_key, pod_uid=pod_uid,
            tokens_per_joule=ratio, tokens_s=tokens_s, record=record, memory=GpuMemory(policy_key, state),
        )
    if change:
        action = Action.SET if enforcing else Action.OBSERVE
    else:
        action = Action.HOLD
    if not enforcing:
        next_record = record
    elif fresh:
        next_record = _next_record(reading, policy, cap_w, decision.state, record)
    else:
        # Stale: a record is never raised nor created without a write.
        next_record = _next_record(reading, policy, cap_w, decision.state, record) if change else record
    return GpuPlan(
        uuid=reading.uuid,
        index=reading.index,
        action=action,
        cap_w=cap_w,
        previous_w=current_w,
        reason=reason,
        policy=policy,
        pod=pod_key,
        pod_uid=pod_uid,
        tokens_per_joule=ratio,
        tokens_s=tokens_s,
        emergency=decision.emergency,
        record=next_record,
        memory=memory if memory is not None and memory.policy == policy_key and memory.control is decision.state
        else GpuMemory(policy_key, decision.state),
    )


def _lost_to_reset(reading: GpuReading, record: CapRecord | None) -> bool:
    """A record says we capped the GPU below its default, and it is back at its default."""
    return (
        record is not None
        and record.cap_w < reading.default_limit_w - DEFAULT_LIMIT_TOLERANCE_W
        and abs(reading.requested_limit_w - reading.default_limit_w) <= DEFAULT_LIMIT_TOLERANCE_W
    )


def _next_record(
    reading: GpuReading, policy: Policy, cap_w: float, state: ControlState, record: CapRecord | None
) -> CapRecord:
    """What the state file holds for a GPU an enforced policy owns (adopted when we find it)."""
    if (
        record is not None
        and record.uuid == reading.uuid
        and record.cap_w == cap_w
        and record.policy == policy.key
        and record.ratio_offset_w == state.ratio_offset_w
        and record.thermal_limit_w == state.thermal_limit_w
    ):
        return record  # most ticks: the record as it was
    default_w = record.default_w if record is not None else reading.default_limit_w
    return CapRecord(
        uuid=reading.uuid,
        cap_w=cap_w,
        default_w=default_w,
        policy=policy.key,
        ratio_offset_w=state.ratio_offset_w,
        thermal_limit_w=state.thermal_limit_w,
    )


# -- telemetry ----------------------------------------------------------------------------


def build_telemetry(
    timestamp: datetime,
    readings: Iterable[GpuReading],
    inlet_c: float | None,
    pods_by_gpu: Mapping[str, str | None] | None = None,
    enforced_w_by_gpu: Mapping[str, float] | None = None,
    tokens_s_by_gpu: Mapping[str, float | None] | None = None,
    node_power: NodePower | None = None,
    requests_waiting_by_gpu: Mapping[str, int | None] | None = None,
    raised_to_w_by_gpu: Mapping[str, float] | None = None,
) -> NodeTelemetry:
    """The node annotation's content: ``powerW = sum of GPU power``, ``nodePower`` the
    whole node's (:func:`powercap.nodepower.choose_node_power`); a GPU's ``limitW``
    is its enforced limit (after this tick's writes when ``enforced_w_by_gpu`` has it);
    its ``tokensPerSecond`` is ``tokens_s_by_gpu``'s (:attr:`GpuPlan.tokens_s`) and its
    ``requestsWaiting`` its pod's queue from ``requests_waiting_by_gpu``, both reported
    only beside a pod (null, and absent, otherwise); ``raised_to_w_by_gpu`` gives the limit
    now in force of a GPU published at its limit before this tick's raise (``raisedToW``)."""
    pods = pods_by_gpu or {}
    enforced = enforced_w_by_gpu or {}
    tokens = tokens_s_by_gpu or {}
    waiting = requests_waiting_by_gpu or {}
    raised_to = raised_to_w_by_gpu or {}
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
            requests_waiting=waiting.get(r.uuid) if pods.get(r.uuid) is not None else None,
            raised_to_w=raised_to.get(r.uuid),
        )
        for r in readings
    )
    return NodeTelemetry(timestamp=timestamp, power_w=sum(g.power_w for g in gpus), inlet_temperature_c=inlet_c, gpus=gpus,
                         node_power=node_power)


@dataclass(frozen=True)
class PublishSettings:
    """Telemetry rate limits: ``min_interval_s`` between two annotations at least,
    ``heartbeat_s`` at most (the extender calls telemetry stale after 90 s)."""

    power_change_fraction: float = 0.05
    temperature_change_c: float = 2.0
    min_interval_s: float = 5.0
    heartbeat_s: float = 30.0


def raised_caps(plans: Iterable[GpuPlan]) -> dict[str, float]:
    """The GPUs a tick raised, each with its limit before the write: the ``limitW`` to publish
    beside this tick's power, which was read under that limit. Beside the raised limit it
    would read as a GPU that does not use its cap, and the controller took such raises back
    round after round; the raised limit goes out with the next publish, beside a power read
    under it. A lowered cap is published after its write (the controller's view of the caps
    in force must not lag a cut)."""
    return {
        plan.uuid: plan.previous_w
        for plan in plans
        if plan.writes and plan.cap_w > plan.previous_w + DEFAULT_LIMIT_TOLERANCE_W
    }


_AWAITED_LOWERS = frozenset({CapReason.ALLOCATION.value, CapReason.NO_ALLOCATION.value, BUDGET_CLAMP})


def lowers_to_publish_now(plans: Iterable[GpuPlan]) -> bool:
    """Whether this tick lowered a GPU's limit to follow a lowered allocation, to start a new
    GPU at its minimum, or to clamp to the budget. The controller holds the raises that wait
    on those watts until the telemetry shows the lower in force (allocation step 6), so such
    a tick is published without waiting for the minimum interval. Other lowers (the tokens/J
    loop's 10-W steps, one a tick while a GPU is under its target; a thermal cut; a limit put
    back after something outside the agent raised it) free no watts the controller waits
    for: they go out on the interval, as any other change."""
    return any(
        plan.writes and plan.cap_w < plan.previous_w - DEFAULT_LIMIT_TOLERANCE_W and plan.reason in _AWAITED_LOWERS
        for plan in plans
    )


def should_publish(
    last: NodeTelemetry | None,
    candidate: NodeTelemetry,
    since_last_s: float,
    settings: PublishSettings = PublishSettings(),
    lowered: bool = False,
) -> bool:
    """Whether ``candidate`` is worth a node patch, ``since_last_s`` after ``last`` went out.

    True when nothing was published yet, when ``lowered`` (the tick lowered a limit the
    controller waits to see in force, :func:`lowers_to_publish_now`) or the node's first
    queue formed (:func:`queue_formed`: the controller gives a queued GPU the surplus first
    and runs a round early, so a replica falling behind gets watts within seconds, not a
    minimum interval later), whatever the interval, or when ``since_last_s >=
    min_interval_s`` and one of:
    heartbeat due (``since_last_s >= heartbeat_s``); the set of GPUs, a limit or a pod
    changed; ``|P' - P| > fraction x P`` for the node (its GPUs' sum or its whole-node
    power) or a GPU; the whole-node power's source changed; ``|T' - T| >= 2 degC`` for a
    GPU or the inlet; the inlet became known or unknown; a GPU's pod began or stopped
    having requests waiting (the controller counts it as pinned while it has). Tokens/s,
    the number of requests waiting and the reading's age are not compared: they ride along
    (module docstring).
    """
    if last is None or lowered or queue_formed(last, (g.requests_waiting for g in candidate.gpus)):
        return True
    if since_last_s < settings.min_interval_s:
        return False
    if since_last_s >= settings.heartbeat_s:
        return True
    if _power_moved(last.power_w, candidate.power_w, settings) or _temperature_moved(
        last.inlet_temperature_c, candidate.inlet_temperature_c, settings
    ):
        return True
    if _node_power_moved(last.node_power, candidate.node_power, settings):
        return True
    before = {g.uuid: g for g in last.gpus}
    if set(before) != {g.uuid for g in candidate.gpus}:
        return True
    for gpu in candidate.gpus:
        old = before[gpu.uuid]
        if (gpu.limit_w, gpu.pod, gpu.min_w, gpu.max_w) != (old.limit_w, old.pod, old.min_w, old.max_w):
            return True
        if _queued(gpu.requests_waiting) != _queued(old.requests_waiting):
            return True
        if _power_moved(old.power_w, gpu.power_w, settings) or _temperature_moved(
            old.temperature_c, gpu.temperature_c, settings
        ):
            return True
    return False


def queue_formed(last: NodeTelemetry | None, requests_waiting: Iterable[int | None]) -> bool:
    """Whether the node's first queue formed: a GPU has requests waiting now (its pod's
    ``requests_waiting``, one per GPU) where ``last`` showed none on any GPU. Per node, not
    per GPU: after such a publish, the next one needs a publish showing no queue at all
    first, which waits for the minimum interval like any drain, so queues that come and go
    (on one GPU or taking turns on several) cost at most one patch more per interval."""
    if last is None or any(g.requests_waiting for g in last.gpus):
        return False
    return any(requests_waiting)


def _queued(requests_waiting: int | None) -> bool | None:
    return None if requests_waiting is None else requests_waiting > 0


def _power_moved(old_w: float, new_w: float, settings: PublishSettings) -> bool:
    return abs(new_w - old_w) > settings.power_change_fraction * abs(old_w)


def _node_power_moved(old: NodePower | None, new: NodePower | None, settings: PublishSettings) -> bool:
    if old is None or new is None:
        return (old is None) != (new is None)
    return old.source != new.source or _power_moved(old.watts, new.watts, settings)


def _temperature_moved(old_c: float | None, new_c: float | None, settings: PublishSettings) -> bool:
    if old_c is None or new_c is None:
        return (old_c is None) != (new_c is None)
    return abs(new_c - old_c) >= settings.temperature_change_c
