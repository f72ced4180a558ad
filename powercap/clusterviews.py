"""The parts of the cluster view and their formulas: nodes, pods, racks, policies.

Pure functions over one object or one rack at a time, and the frozen values they return;
:mod:`powercap.cluster` keeps the bookkeeping (what changed since the previous build, what
that change reaches) and composes these into a :class:`~powercap.cluster.ClusterView`.
Definitions (fresh telemetry, assumed power, rack power and temperature, rack limits, pod
power estimate) are in :mod:`powercap.cluster`'s docstring; each function here states the
formula it computes. W = watts, °C = rack inlet air.

- nodes: :func:`parse_node` (a Node object and its telemetry, read once per object),
  :func:`telemetry_status`, :func:`non_gpu_power`, :func:`assumed_power`,
  :func:`inlet_rise`, :func:`node_view`, :func:`gpu_min_limits`;
- pods: :func:`pod_facts`, :func:`power_node`, :func:`estimate_pod_power_w`;
- racks: :func:`rack_view`, :func:`rack_power_source`, :func:`rack_rise`, :func:`scoring_facts`;
- policies: :func:`read_policies` (parse, group by namespace, strictest rack limits),
  :func:`match_policy`, :func:`policy_views`, :func:`cluster_warnings`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from powercap.algorithms import AlgorithmRegistry, NodeFacts
from powercap.numeric import counted
from powercap.objects import (
    RACK_LABEL,
    KubeObject,
    annotations_of,
    labels_of,
    node_gpu_capacity,
    object_key,
    pod_gpus_requested,
    pod_is_active,
    pod_power_annotation_w,
)
from powercap.nodepower import ESTIMATE, GPU_FLOOR_FRACTION, MAX_PLAUSIBLE_W
from powercap.policies import Policy, parse_policy
from powercap.telemetry import (
    DEFAULT_STALE_AFTER_S,
    TELEMETRY_ANNOTATION,
    GpuTelemetry,
    NodeTelemetry,
    TelemetryError,
    from_json,
    parse_timestamp,
)

# A GPU's power limits when no telemetry says otherwise (H100/H200 SXM: 200-700 W).
DEFAULT_GPU_MAX_W = 700.0
DEFAULT_GPU_MIN_W = 200.0
# The inlet trend is measured over at least this many seconds of telemetry, so that a
# 0.5 °C sensor step between two samples one second apart is not read as 30 °C/min.
MIN_TREND_WINDOW_S = 30.0


@dataclass(frozen=True)
class ClusterSettings:
    """How the view reads the cluster.

    ``rack_label``: node label whose value is the rack id. ``stale_after_s``: telemetry
    (and a whole-node power reading) older than this is stale. ``node_overhead_w``: the
    power beside its GPUs assumed for a GPU node without a trustworthy whole-node reading
    (:func:`non_gpu_power`), W. ``non_gpu_rise``: watts a node's *measured* power beside
    its GPUs is taken to rise per watt its GPUs rise (fans, host CPUs, supply losses follow
    the GPUs' load), so that a rack filled up to its limit at today's load stays under it
    when the GPUs reach their caps (:func:`rack_rise`). ``default_gpu_max_w`` /
    ``default_gpu_min_w``: a GPU's power limits when no telemetry reports them.
    """

    rack_label: str = RACK_LABEL
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    node_overhead_w: float = 0.0
    non_gpu_rise: float = 0.3
    default_gpu_max_w: float = DEFAULT_GPU_MAX_W
    default_gpu_min_w: float = DEFAULT_GPU_MIN_W


class TelemetryStatus(str, Enum):
    FRESH = "fresh"
    STALE = "stale"
    MISSING = "missing"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class NonGpuPower:
    """A node's power beside its GPUs (CPUs, memory, fans, NICs, supply losses), W.

    ``source``: the whole-node reading it comes from (``redfish``, ``ipmi-dcmi``,
    ``kepler``) when measured, ``estimate`` otherwise; ``problem``: why it is an estimate,
    in words a person can act on (None when measured). See :func:`non_gpu_power`.
    """

    watts: float = 0.0
    source: str = ESTIMATE
    problem: str | None = None

    @property
    def measured(self) -> bool:
        return self.problem is None


NOT_PUBLISHING = NonGpuPower()
"""The non-GPU power of a node that neither has GPUs nor publishes telemetry: not counted."""


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node. Power and temperature figures count only fresh telemetry, except
    ``non_gpu``, which is estimated for a GPU node without fresh telemetry (it still draws)."""

    name: str
    rack_id: str | None
    gpu_capacity: int
    telemetry_status: TelemetryStatus
    telemetry: NodeTelemetry | None = None  # the last readable telemetry, fresh or stale
    telemetry_problem: str | None = None  # why it is not fresh, in words a person can act on
    measured_power_w: float = 0.0  # the telemetry's powerW (its GPUs) when fresh, else 0
    assumed_power_w: float = 0.0
    non_gpu: NonGpuPower = NOT_PUBLISHING  # power beside its GPUs (non_gpu_power)
    assumed_pods: tuple[str, ...] = ()
    gpu_max_w: float = DEFAULT_GPU_MAX_W  # largest GPU maximum limit (telemetry, else default)
    # largest GPU minimum limit (telemetry, else default): what a GPU given to a new pod starts at
    new_gpu_min_w: float = DEFAULT_GPU_MIN_W
    power_capacity_w: float | None = None  # sum of its GPUs' maximum limits (telemetry only)
    inlet_temperature_c: float | None = None  # fresh only
    inlet_rise_c_per_min: float | None = None

    @property
    def fresh(self) -> bool:
        return self.telemetry_status is TelemetryStatus.FRESH

    @property
    def needs_telemetry(self) -> bool:
        """GPU nodes (and nodes that publish anyway) must report; CPU-only nodes need not."""
        return self.gpu_capacity > 0 or self.telemetry_status is not TelemetryStatus.MISSING

    @property
    def power_w(self) -> float:
        """Whole-node power: measured (GPUs) + non-GPU + assumed, W."""
        return self.measured_power_w + self.non_gpu.watts + self.assumed_power_w

    @property
    def non_gpu_estimated(self) -> bool:
        """Whether its non-GPU power counts and is an estimate, not a measurement."""
        return self.needs_telemetry and not self.non_gpu.measured


@dataclass(frozen=True, slots=True)
class RackLimits:
    """The strictest limits over the Enforce policies naming a rack, and who set them."""

    max_power_w: int | None = None
    max_power_policy: str | None = None
    max_temperature_c: float | None = None
    max_temperature_policy: str | None = None

    @property
    def constrained(self) -> bool:
        return self.max_power_w is not None or self.max_temperature_c is not None


@dataclass(frozen=True, slots=True)
class RackView:
    """One rack (nodes sharing a rack label value)."""

    rack_id: str
    nodes: tuple[str, ...]
    measured_power_w: float
    assumed_power_w: float
    inlet_temperature_c: float | None
    inlet_rise_c_per_min: float | None
    limits: RackLimits
    unreliable_nodes: tuple[str, ...] = ()  # nodes that need telemetry and have no fresh one
    telemetry_problem: str | None = None  # the first unreliable node's problem (+ "and N more")
    assumed_pods: tuple[str, ...] = ()  # pods whose power is assumed, not yet measured
    non_gpu_power_w: float = 0.0  # sum of its nodes' power beside their GPUs
    gpu_nodes: int = 0  # nodes whose non-GPU power counts (they need telemetry)
    estimated_nodes: tuple[str, ...] = ()  # those whose non-GPU power is estimated
    estimate_problem: str | None = None  # the first such node's problem (+ "and N more")

    @property
    def power_w(self) -> float:
        """Whole-rack power: measured (GPUs) + non-GPU + assumed, W."""
        return self.measured_power_w + self.non_gpu_power_w + self.assumed_power_w

    @property
    def power_source(self) -> str:
        """``Measured``, ``Estimated`` or ``PartlyEstimated`` (:func:`rack_power_source`)."""
        return rack_power_source(len(self.estimated_nodes), self.gpu_nodes)

    @property
    def measured_nodes(self) -> int:
        """Nodes whose power beside the GPUs is measured (it follows their GPUs' load)."""
        return self.gpu_nodes - len(self.estimated_nodes)

    @property
    def constrained(self) -> bool:
        return self.limits.constrained


@dataclass(frozen=True, slots=True)
class PolicyGpu:
    """A GPU that node telemetry attributes to one of a policy's pods."""

    node: str
    gpu: GpuTelemetry


@dataclass(frozen=True, slots=True)
class PolicyView:
    """A valid policy and what it holds now.

    ``pods``: keys of its active pods (bound or pending), sorted. ``bound_gpus``: GPUs
    requested by those of them bound to a node; ``budget_waiting_gpus``: by those not bound
    yet that kube-scheduler reports refused for want of budget (:attr:`PodFacts.waits_for_budget`).
    ``gpus``: the GPUs node telemetry attributes to its pods (last readable telemetry of
    each node, fresh or not).
    """

    policy: Policy
    pods: tuple[str, ...] = ()
    bound_gpus: int = 0
    gpus: tuple[PolicyGpu, ...] = ()
    budget_waiting_gpus: int = 0

    @property
    def key(self) -> str:
        return self.policy.key


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What the view reads off a Pod object (see :func:`pod_facts`)."""

    key: str
    namespace: str
    labels: Mapping[str, str]
    node_name: str | None
    gpus: int
    power_annotation_w: float | None
    bound_at: datetime | None
    active: bool
    waits_for_budget: bool = False


# -- pods


# The apiserver writes condition times in whole seconds: a pod whose PodScheduled time reads
# 5 s may have been bound at 5.9 s, after telemetry taken at 5.1 s. Only a binding at least
# this long before the telemetry is surely in its power.
BINDING_TIME_RESOLUTION = timedelta(seconds=1)
MAX_CLOCK_AHEAD_S = 5.0
"""How far in the future a node's telemetry may be stamped and still count (clock skew)."""


def clock_ahead(telemetry: NodeTelemetry, now: datetime) -> bool:
    """Whether ``telemetry`` is stamped more than ``MAX_CLOCK_AHEAD_S`` after ``now``."""
    return telemetry.age_s(now) < -MAX_CLOCK_AHEAD_S


def pod_facts(pod: KubeObject) -> PodFacts:
    """The facts of a Pod object the view and the filter need.

    ``bound_at``: the PodScheduled condition's lastTransitionTime (set by the apiserver
    at binding), else ``status.startTime``, else ``metadata.creationTimestamp``; None
    when none can be read.
    """
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    node_name = spec.get("nodeName") if isinstance(spec, Mapping) else None
    return PodFacts(
        key=object_key(pod),
        namespace=metadata.get("namespace") or "default",
        labels=labels_of(pod),
        node_name=node_name if isinstance(node_name, str) and node_name else None,
        gpus=pod_gpus_requested(pod),
        power_annotation_w=pod_power_annotation_w(pod),
        bound_at=_bound_at(pod) if node_name else None,
        active=pod_is_active(pod),
        waits_for_budget=not node_name and _refused_for_budget(pod),
    )


BUDGET_REFUSAL = "has no budget free for this pod yet"
"""Words of the extender's budget refusal (:func:`powercap.placement.budget_room_rejection`).
kube-scheduler copies the extender's reasons into the message of the pod's PodScheduled
condition (``0/12 nodes are available: 12 policy ns/p has no budget free ...``), which is
how the budget controller learns that a pending pod waits for budget, and nothing else."""


def _refused_for_budget(pod: KubeObject) -> bool:
    for condition in (pod.get("status") or {}).get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            message = condition.get("message")
            return isinstance(message, str) and BUDGET_REFUSAL in message
    return False


def _bound_at(pod: KubeObject) -> datetime | None:
    status = pod.get("status") or {}
    candidates = [
        c.get("lastTransitionTime")
        for c in status.get("conditions") or ()
        if isinstance(c, Mapping) and c.get("type") == "PodScheduled" and c.get("status") == "True"
    ]
    candidates += [status.get("startTime"), (pod.get("metadata") or {}).get("creationTimestamp")]
    for text in candidates:
        if isinstance(text, str):
            try:
                return parse_timestamp(text)
            except TelemetryError:
                continue
    return None


def estimate_pod_power_w(
    gpus: int,
    power_annotation_w: float | None,
    policy: Policy | None,
    service_gpus: int,
    node_gpu_max_w: float,
) -> float:
    """The power a pod will draw on a node, W.

    ``power_annotation_w`` when set; else, for a pod of ``policy``,
    ``gpus x min(powerCapLimit / service_gpus, node_gpu_max_w)`` where ``service_gpus`` is
    every GPU of the service counting this pod's (the budget controller splits the cap
    evenly before demand moves it; a GPU never draws above its maximum limit); else
    ``gpus x node_gpu_max_w``. 0 for a pod with no GPU and no annotation.
    """
    if power_annotation_w is not None:
        return power_annotation_w
    if gpus <= 0:
        return 0.0
    if policy is not None:
        per_gpu_budget_w = policy.power_cap_w / max(service_gpus, gpus)
        return gpus * min(per_gpu_budget_w, node_gpu_max_w)
    return gpus * node_gpu_max_w


BoundPod = tuple[PodFacts, Policy | None]
"""A pod drawing power on a node, with the policy that owns it (None: no policy)."""

PodEntry = tuple[KubeObject, PodFacts, Policy | None]
"""A pod of a build: its object, its facts, and its policy (None: inactive or no policy)."""


def power_node(facts: PodFacts) -> str | None:
    """The node a pod draws power on: its ``node_name`` when it is bound, active and has
    GPUs or a power annotation; else None."""
    if facts.active and (facts.gpus > 0 or facts.power_annotation_w is not None):
        return facts.node_name
    return None


# -- nodes


@dataclass(frozen=True, slots=True)
class ParsedNode:
    """What a Node object says, read once per object: its rack, GPUs and telemetry.

    ``gpu_max_w`` = max over its GPUs of ``maxW`` (the default without telemetry GPUs);
    ``power_capacity_w`` = sum of ``maxW`` (None without telemetry GPUs);
    ``gpu_min_w`` / ``gpu_largest_min_w`` = min / max of ``minW`` (None without).
    """

    name: str
    rack_id: str | None
    gpu_capacity: int
    telemetry: NodeTelemetry | None
    telemetry_error: str | None
    gpu_max_w: float
    power_capacity_w: float | None = None
    visible_pods: frozenset[str] = frozenset()  # telemetry gpus[].pod
    gpu_min_w: float | None = None
    gpu_largest_min_w: float | None = None


def parse_node(node: KubeObject, settings: ClusterSettings) -> ParsedNode:
    """The rack (label ``settings.rack_label``; None when absent or empty), GPU capacity and
    telemetry (annotation; ``telemetry_error`` says why it is unreadable) of a Node object."""
    rack = labels_of(node).get(settings.rack_label)
    text = annotations_of(node).get(TELEMETRY_ANNOTATION)
    telemetry: NodeTelemetry | None = None
    error: str | None = None
    if text is not None:
        try:
            telemetry = from_json(text)
        except TelemetryError as problem:
            error = str(problem)
    gpus = telemetry.gpus if telemetry is not None else ()
    return ParsedNode(
        name=object_key(node),
        rack_id=rack if isinstance(rack, str) and rack else None,
        gpu_capacity=node_gpu_capacity(node),
        telemetry=telemetry,
        telemetry_error=error,
        gpu_max_w=max((g.max_w for g in gpus), default=settings.default_gpu_max_w),
        power_capacity_w=sum(g.max_w for g in gpus) if gpus else None,
        visible_pods=frozenset(g.pod for g in gpus if g.pod is not None),
        gpu_min_w=min((g.min_w for g in gpus), default=None),
        gpu_largest_min_w=max((g.min_w for g in gpus), default=None),
    )


def telemetry_status(node: ParsedNode, now: datetime, stale_after_s: float) -> tuple[TelemetryStatus, str | None]:
    """The node's telemetry status, and unless FRESH the problem in words a person can act on.

    MALFORMED: the annotation is unreadable; MISSING: there is none; STALE when it is
    stamped more than ``MAX_CLOCK_AHEAD_S`` after ``now`` (the node's clock is ahead: its
    age is unknown, and a clock hours ahead must not keep telemetry fresh for hours); else,
    with ``age_s = max(0, now - timestamp)``, FRESH when ``age_s <= stale_after_s``, STALE
    otherwise.
    """
    name, telemetry = node.name, node.telemetry
    if node.telemetry_error is not None:
        return TelemetryStatus.MALFORMED, f"telemetry of node {name} is unreadable ({node.telemetry_error})"
    if telemetry is None:
        return TelemetryStatus.MISSING, (
            f"no telemetry from node {name} (no PowerCapNode {name} with a status; is the node agent running there?)"
        )
    if clock_ahead(telemetry, now):
        ahead_s = -telemetry.age_s(now)
        return TelemetryStatus.STALE, (
            f"telemetry of node {name} is stamped {ahead_s:.0f} s in the future (its clock is ahead; "
            f"more than {MAX_CLOCK_AHEAD_S:g} s counts as stale)"
        )
    age_s = max(0.0, telemetry.age_s(now))
    if age_s <= stale_after_s:
        return TelemetryStatus.FRESH, None
    return TelemetryStatus.STALE, f"no telemetry from node {name} for {age_s:.0f} s (stale after {stale_after_s:g} s)"


def non_gpu_power(
    name: str, telemetry: NodeTelemetry | None, now: datetime, settings: ClusterSettings, *, fresh: bool = True,
) -> NonGpuPower:
    """A GPU node's power beside its GPUs, W: measured when its whole-node reading can be
    trusted, else an estimate that is never below what any reading at hand says.

    ``telemetry`` is the node's last readable telemetry (None without), ``fresh`` whether it
    is fresh. Its ``nodePower`` is *usable* when

    - the telemetry is fresh and its ``source`` is a measurement (not ``estimate``),
    - the reading is fresh: ``telemetry age + ageS <= stale_after_s`` (the rule telemetry
      itself is held to, counted from when the reading was taken),
    - it is plausible: ``GPU_FLOOR_FRACTION x powerW <= watts <= MAX_PLAUSIBLE_W`` (a
      node draws at least what its GPUs draw, and no server draws 100 kW);

    then ``non-GPU = max(0, watts - powerW)``, measured. Otherwise it is estimated::

        non-GPU = max(node_overhead_w, watts - powerW)   with a plausible reading (stale,
                                                         the agent's estimate, or the last
                                                         one of a node gone silent)
                = node_overhead_w                        otherwise (no nodePower, no
                                                         telemetry, implausible)

    so a reading still counts for as much as it says: never less. A node whose agent stopped
    publishing still draws what it drew.
    """
    overhead_w = settings.node_overhead_w
    reading = telemetry.node_power if telemetry is not None else None
    if telemetry is None or reading is None:
        if telemetry is None or not fresh:
            return NonGpuPower(overhead_w, ESTIMATE, f"node {name} has no fresh telemetry")
        return NonGpuPower(overhead_w, ESTIMATE, f"node {name} reports no whole-node power (a node agent older than nodePower)")
    gpus_w = telemetry.power_w
    if reading.watts > MAX_PLAUSIBLE_W:
        return NonGpuPower(overhead_w, ESTIMATE, f"node {name}'s {reading.source} reading {reading.watts:g} W is implausible (over {MAX_PLAUSIBLE_W:g} W)")
    if reading.watts < GPU_FLOOR_FRACTION * gpus_w:
        return NonGpuPower(overhead_w, ESTIMATE, f"node {name}'s {reading.source} reading {reading.watts:g} W is below its GPUs' {gpus_w:g} W")
    beside_w = reading.watts - gpus_w
    estimate_w = max(overhead_w, beside_w)
    if not fresh:
        return NonGpuPower(estimate_w, ESTIMATE, f"node {name} has no fresh telemetry (its last reading counts)")
    if reading.estimated:
        return NonGpuPower(estimate_w, ESTIMATE, f"node {name} has no node power source (its agent estimates GPUs + a configured overhead)")
    if max(0.0, telemetry.age_s(now)) + reading.age_s > settings.stale_after_s:
        return NonGpuPower(estimate_w, ESTIMATE, (
            f"node {name}'s {reading.source} reading is stale (taken {reading.age_s:g} s before its telemetry; "
            f"stale after {settings.stale_after_s:g} s)"
        ))
    return NonGpuPower(max(0.0, beside_w), reading.source)


def reading_fresh_until(view: NodeView, stale_after: timedelta) -> datetime | None:
    """When the node's view goes stale by the clock alone: its telemetry at ``timestamp +
    stale_after_s``, and a measured whole-node reading ``ageS`` earlier (None when the
    telemetry is not fresh now)."""
    telemetry = view.telemetry
    if not view.fresh or telemetry is None:
        return None
    until = telemetry.timestamp + stale_after
    if view.non_gpu.measured and telemetry.node_power is not None:
        until -= timedelta(seconds=telemetry.node_power.age_s)
    return until


def assumed_power(
    node: ParsedNode,
    bound: Iterable[BoundPod],
    bound_gpus: Mapping[str, int],
    now: datetime,
) -> tuple[float, tuple[str, ...], frozenset[str]]:
    """The power of the node's pods that its telemetry does not show yet: ``(W, pod keys
    sorted, keys of their policies)``.

    A bound pod is assumed unless its key is in the telemetry's ``gpus[].pod`` or
    ``bound_at + BINDING_TIME_RESOLUTION <= timestamp`` (every pod is, without readable
    telemetry or with telemetry stamped in the future: :func:`clock_ahead`). ``W = sum of estimate_pod_power_w(gpus, annotation, policy,
    bound_gpus[policy] (else its own GPUs), node.gpu_max_w)`` over the assumed pods.
    """
    telemetry, visible, gpu_max_w = node.telemetry, node.visible_pods, node.gpu_max_w
    if telemetry is not None and clock_ahead(telemetry, now):
        telemetry, visible = None, frozenset()
    assumed_w = 0.0
    assumed: list[str] = []
    policies: set[str] = set()
    for facts, policy in bound:
        if facts.key in visible:
            continue
        if telemetry is not None and facts.bound_at is not None and facts.bound_at + BINDING_TIME_RESOLUTION <= telemetry.timestamp:
            continue  # bound before the last telemetry: already in its power
        service_gpus = bound_gpus.get(policy.key, facts.gpus) if policy is not None else facts.gpus
        assumed_w += estimate_pod_power_w(facts.gpus, facts.power_annotation_w, policy, service_gpus, gpu_max_w)
        assumed.append(facts.key)
        if policy is not None:
            policies.add(policy.key)
    return assumed_w, tuple(sorted(assumed)), frozenset(policies)


def inlet_rise(
    name: str,
    telemetry: NodeTelemetry | None,
    anchors: dict[str, tuple[datetime, float, float | None]],
) -> float | None:
    """Inlet trend, °C/min: ``(inlet - inlet_anchor) / (t - t_anchor)`` once ``t - t_anchor >=
    MIN_TREND_WINDOW_S``; the newer sample then becomes the anchor. None until measured."""
    if telemetry is None or telemetry.inlet_temperature_c is None:
        anchors.pop(name, None)
        return None
    anchor = anchors.get(name)
    inlet, moment = telemetry.inlet_temperature_c, telemetry.timestamp
    if anchor is None or moment < anchor[0]:
        anchors[name] = (moment, inlet, None)
        return None
    window_s = (moment - anchor[0]).total_seconds()
    if window_s < MIN_TREND_WINDOW_S:
        return anchor[2]
    rise = (inlet - anchor[1]) / (window_s / 60.0)
    anchors[name] = (moment, inlet, rise)
    return rise


def node_view(
    node: ParsedNode,
    bound: Iterable[BoundPod],
    bound_gpus: Mapping[str, int],
    now: datetime,
    settings: ClusterSettings,
    trend_anchors: dict[str, tuple[datetime, float, float | None]],
) -> tuple[NodeView, frozenset[str]]:
    """The node's view, and the policies of its assumed pods (their budget moves its power).

    ``measured_power_w`` = telemetry ``powerW`` (its GPUs) when fresh, else 0; ``non_gpu``
    = :func:`non_gpu_power` for a node that needs telemetry (has GPUs or publishes), else
    nothing; ``inlet_temperature_c`` and the trend count fresh telemetry only;
    ``new_gpu_min_w`` = largest GPU ``minW`` (default without). Updates ``trend_anchors``
    (see :func:`inlet_rise`).
    """
    status, problem = telemetry_status(node, now, settings.stale_after_s)
    fresh_telemetry = node.telemetry if status is TelemetryStatus.FRESH else None
    assumed_w, assumed_pods, assumed_policies = assumed_power(node, bound, bound_gpus, now)
    counts = node.gpu_capacity > 0 or status is not TelemetryStatus.MISSING
    view = NodeView(
        name=node.name,
        rack_id=node.rack_id,
        gpu_capacity=node.gpu_capacity,
        telemetry_status=status,
        telemetry=node.telemetry,
        telemetry_problem=problem,
        measured_power_w=fresh_telemetry.power_w if fresh_telemetry is not None else 0.0,
        assumed_power_w=assumed_w,
        non_gpu=non_gpu_power(node.name, node.telemetry, now, settings, fresh=fresh_telemetry is not None) if counts else NOT_PUBLISHING,
        assumed_pods=assumed_pods,
        gpu_max_w=node.gpu_max_w,
        new_gpu_min_w=node.gpu_largest_min_w if node.gpu_largest_min_w is not None else settings.default_gpu_min_w,
        power_capacity_w=node.power_capacity_w,
        inlet_temperature_c=fresh_telemetry.inlet_temperature_c if fresh_telemetry is not None else None,
        inlet_rise_c_per_min=inlet_rise(node.name, fresh_telemetry, trend_anchors),
    )
    return view, assumed_policies


def gpu_min_limits(nodes: Collection[ParsedNode], default_w: float) -> tuple[float, float]:
    """``(min, max)`` of the GPU ``minW`` limits over the nodes' telemetry; ``default_w`` for
    either when no telemetry reports one."""
    smallest = [n.gpu_min_w for n in nodes if n.gpu_min_w is not None]
    largest = [n.gpu_largest_min_w for n in nodes if n.gpu_largest_min_w is not None]
    return (min(smallest) if smallest else default_w), (max(largest) if largest else default_w)


# -- racks


def rack_view(rack_id: str, members: list[NodeView], limits: RackLimits) -> RackView:
    """One rack from its member nodes (sorted by name in place).

    ``measured_power_w`` = sum of the members' measured (GPU) power; ``non_gpu_power_w`` =
    sum of their non-GPU power; ``assumed_power_w`` = sum of their assumed power (so
    ``power_w``, the whole rack, is the sum of whole-node power); ``inlet_temperature_c``
    / ``inlet_rise_c_per_min`` = max over fresh members reporting one (None when none
    does); ``unreliable_nodes``: members that need telemetry and have no fresh one;
    ``estimated_nodes``: members whose non-GPU power is estimated.
    """
    members.sort(key=lambda n: n.name)
    fresh = [n for n in members if n.fresh]
    inlets = [n.inlet_temperature_c for n in fresh if n.inlet_temperature_c is not None]
    rises = [n.inlet_rise_c_per_min for n in fresh if n.inlet_rise_c_per_min is not None]
    unreliable = [n for n in members if n.needs_telemetry and not n.fresh]
    estimated = [n for n in members if n.non_gpu_estimated]
    return RackView(
        rack_id=rack_id,
        nodes=tuple(n.name for n in members),
        measured_power_w=sum(n.measured_power_w for n in members),
        assumed_power_w=sum(n.assumed_power_w for n in members),
        inlet_temperature_c=max(inlets) if inlets else None,
        inlet_rise_c_per_min=max(rises) if rises else None,
        limits=limits,
        unreliable_nodes=tuple(n.name for n in unreliable),
        telemetry_problem=_rack_telemetry_problem(unreliable),
        assumed_pods=tuple(sorted(pod for n in members for pod in n.assumed_pods)),
        non_gpu_power_w=sum(n.non_gpu.watts for n in members),
        gpu_nodes=sum(1 for n in members if n.needs_telemetry),
        estimated_nodes=tuple(n.name for n in estimated),
        estimate_problem=_first_and_more([n.non_gpu.problem for n in estimated], "whose power beside the GPUs is estimated"),
    )


def rack_rise(rack: RackView, settings: ClusterSettings) -> float:
    """Watts the rack's power beside its GPUs rises per watt its GPUs rise:
    ``settings.non_gpu_rise`` when the rack has a node whose power beside the GPUs is
    measured (a measurement follows the load), else 0 (an estimate is a fixed figure, meant
    for full load: ``--node-overhead-w``)."""
    return settings.non_gpu_rise if rack.measured_nodes > 0 else 0.0


def rack_power_source(estimated_nodes: int, gpu_nodes: int) -> str:
    """``Measured`` when no node's non-GPU power is estimated, ``Estimated`` when every
    node's is, ``PartlyEstimated`` between."""
    if estimated_nodes == 0:
        return "Measured"
    return "Estimated" if estimated_nodes >= gpu_nodes else "PartlyEstimated"


def _rack_telemetry_problem(unreliable: list[NodeView]) -> str | None:
    """The first unreliable node's problem, then ``; and N more nodes without fresh
    telemetry`` when N > 0 others; None when every node is reliable."""
    return _first_and_more([n.telemetry_problem for n in unreliable], "without fresh telemetry")


def _first_and_more(problems: list[str | None], what: str) -> str | None:
    """The first problem, then ``; and N more nodes <what>`` when N > 0 others; None when
    there is none."""
    if not problems:
        return None
    problem = problems[0]
    if len(problems) > 1:
        problem = f"{problem}; and {counted(len(problems) - 1, 'more node')} {what}"
    return problem


def scoring_facts(node: NodeView, rack: RackView | None) -> NodeFacts:
    """What a placement algorithm scores a node by: node power = whole-node power
    (measured + non-GPU + assumed) when fresh (else None), and its non-GPU part; rack
    power (whole rack), limits, inlet and trend from its rack (inlet and trend from the
    node itself when it has no rack)."""
    return NodeFacts(
        name=node.name,
        rack_id=node.rack_id,
        node_power_w=node.power_w if node.fresh else None,
        node_non_gpu_power_w=node.non_gpu.watts,
        node_capacity_w=node.power_capacity_w,
        rack_power_w=rack.power_w if rack is not None else None,
        rack_max_power_w=rack.limits.max_power_w if rack is not None else None,
        inlet_c=rack.inlet_temperature_c if rack is not None else node.inlet_temperature_c,
        rack_max_temperature_c=rack.limits.max_temperature_c if rack is not None else None,
        inlet_rise_c_per_min=rack.inlet_rise_c_per_min if rack is not None else node.inlet_rise_c_per_min,
        gpu_max_w=node.gpu_max_w,
    )


# -- policies


PolicyDocuments = dict[int, tuple[KubeObject, Policy | str]]
"""``id(document) -> (document, its Policy or why it is invalid)``: a parse cache keyed by
object identity (the document is kept, so its id cannot be reused)."""


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every PowerCappingPolicy document of a build, read.

    ``valid``: key -> Policy; ``invalid``: key -> why; ``by_namespace``: the valid policies
    of each namespace sorted by name (the first match wins); ``rack_limits``: see
    :func:`strictest_rack_limits`.
    """

    documents: PolicyDocuments
    valid: dict[str, Policy]
    invalid: dict[str, str]
    by_namespace: dict[str, tuple[Policy, ...]]
    rack_limits: dict[str, RackLimits]


def read_policies(documents: list[KubeObject], before: PolicyDocuments, registry: AlgorithmRegistry) -> PolicySet:
    """Parse the documents (reusing ``before``'s result for a document seen there), group the
    valid ones by namespace and compute the strictest limits of every rack."""
    parsed, valid, invalid = parse_policies(documents, before, registry)
    grouped: dict[str, list[Policy]] = {}
    for policy in sorted(valid.values(), key=lambda p: p.name):
        grouped.setdefault(policy.namespace, []).append(policy)
    by_namespace = {namespace: tuple(group) for namespace, group in grouped.items()}
    return PolicySet(parsed, valid, invalid, by_namespace, strictest_rack_limits(valid.values()))


def parse_policies(
    documents: list[KubeObject],
    before: PolicyDocuments,
    registry: AlgorithmRegistry,
) -> tuple[PolicyDocuments, dict[str, Policy], dict[str, str]]:
    """Each document's Policy, or why it is invalid (keyed ``namespace/name``, namespace
    ``default`` when unset); ``before``'s result for a document it holds."""
    docs: PolicyDocuments = {}
    valid: dict[str, Policy] = {}
    invalid: dict[str, str] = {}
    for document in documents:
        cached = before.get(id(document))
        parsed: Policy | str
        if cached is not None and cached[0] is document:
            parsed = cached[1]
        else:
            try:
                parsed = parse_policy(document, registry)
            except (ValueError, TypeError, KeyError) as error:
                parsed = str(error)
        docs[id(document)] = (document, parsed)
        if isinstance(parsed, Policy):
            valid[parsed.key] = parsed
        else:
            metadata = document.get("metadata") or {}
            invalid[f"{metadata.get('namespace') or 'default'}/{metadata.get('name', '')}"] = parsed
    return docs, valid, invalid


def match_policy(by_namespace: Mapping[str, tuple[Policy, ...]], namespace: str, labels: Mapping[str, str]) -> Policy | None:
    """The first policy of the namespace (by name) whose selector matches the labels."""
    for policy in by_namespace.get(namespace, ()):
        if policy.selector.matches(labels):
            return policy
    return None


def strictest_rack_limits(policies: Iterable[Policy]) -> dict[str, RackLimits]:
    """Per rack, ``min(maxPower)`` and ``min(maxTemperature)`` over the Enforce policies
    naming it, with the policy that set each (ties: the first by key)."""
    result: dict[str, RackLimits] = {}
    for policy in sorted(policies, key=lambda p: p.key):
        if not policy.enforced:
            continue
        for rack in policy.racks:
            current = result.get(rack.rack_id, RackLimits())
            power, power_by = current.max_power_w, current.max_power_policy
            if rack.max_power_w is not None and (power is None or rack.max_power_w < power):
                power, power_by = rack.max_power_w, policy.key
            temperature, temperature_by = current.max_temperature_c, current.max_temperature_policy
            if rack.max_temperature_c is not None and (temperature is None or rack.max_temperature_c < temperature):
                temperature, temperature_by = rack.max_temperature_c, policy.key
            result[rack.rack_id] = RackLimits(power, power_by, temperature, temperature_by)
    return result


def policy_views(
    valid: Mapping[str, Policy],
    pods: Iterable[PodEntry],
    nodes: Iterable[ParsedNode],
    bound_gpus: Mapping[str, int],
) -> dict[str, PolicyView]:
    """Every valid policy with its active pods, its bound GPUs (``bound_gpus``), the GPUs
    telemetry attributes to its pods (``gpus[].pod``), and ``budget_waiting_gpus`` = sum of
    the GPUs of its pods waiting for budget."""
    owned: dict[str, list[str]] = {key: [] for key in valid}
    owner: dict[str, str] = {}
    waiting: dict[str, int] = dict.fromkeys(valid, 0)
    for _, facts, policy in pods:
        if policy is not None and facts.active:
            owned[policy.key].append(facts.key)
            owner[facts.key] = policy.key
            if facts.waits_for_budget:
                waiting[policy.key] += facts.gpus
    gpus: dict[str, list[PolicyGpu]] = {key: [] for key in valid}
    claimed: set[str] = set()
    for node in sorted(nodes, key=lambda n: n.name):
        if node.telemetry is not None:
            for gpu in node.telemetry.gpus:
                key = owner.get(gpu.pod) if gpu.pod is not None else None
                if key is not None and gpu.uuid not in claimed:
                    # a UUID reported by a second node (a cloned machine image, a buggy agent)
                    # is counted once, on the first node by name: the other node's agent finds
                    # no allocation for it and holds it at its minimum, and one bad report
                    # cannot stop the round for every policy
                    claimed.add(gpu.uuid)
                    gpus[key].append(PolicyGpu(node=node.name, gpu=gpu))
    return {
        key: PolicyView(
            policy=policy,
            pods=tuple(sorted(owned[key])),
            bound_gpus=bound_gpus.get(key, 0),
            gpus=tuple(sorted(gpus[key], key=lambda g: (g.node, g.gpu.index))),
            budget_waiting_gpus=waiting[key],
        )
        for key, policy in valid.items()
    }


def cluster_warnings(racks: Mapping[str, RackView], limits: Mapping[str, RackLimits], invalid: Mapping[str, str]) -> tuple[str, ...]:
    """Things an operator should know that do not stop scheduling: invalid policies, racks
    named by a policy with no node, maxTemperature over a rack whose nodes report no inlet."""
    warnings = [f"policy {key} is invalid and ignored: {why}" for key, why in sorted(invalid.items())]
    for rack_id, rack_limits in sorted(limits.items()):
        rack = racks.get(rack_id)
        if rack is None:
            warnings.append(f"rack {rack_id} (policy {rack_limits.max_power_policy or rack_limits.max_temperature_policy}) has no nodes with that rack label")
        elif rack_limits.max_temperature_c is not None and rack.inlet_temperature_c is None and not rack.unreliable_nodes:
            warnings.append(
                f"rack {rack_id}: no node reports an inlet temperature, so maxTemperature "
                f"{rack_limits.max_temperature_c:g} °C cannot be checked"
            )
    return tuple(warnings)
