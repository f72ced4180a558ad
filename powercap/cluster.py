"""The cluster view: racks, node telemetry, assumed power and policies, as one immutable snapshot.

The scheduler extender and the budget controller both decide from a :class:`ClusterView`.
It is built by one pure function, :func:`build_cluster_view`, from what the API serves
(lists of Node, Pod and PowerCappingPolicy dicts), the time ``now`` and
:class:`ClusterSettings`. Everything a request needs is precomputed here, once per
rebuild, so that a filter call over 5000 node names does 5000 dictionary lookups and no
parsing. Callers rebuild only when their caches' versions moved (or the clock advanced
enough to age telemetry), passing the previous view so that unchanged objects are not
parsed again.

Definitions (W = watts, °C = rack inlet air):

- **rack** of a node: the value of its label ``settings.rack_label`` (default
  ``powercapping.example.com/rack``); None when unlabelled.
- **telemetry** of a node: the annotation ``powercapping.example.com/telemetry``
  (format: :mod:`powercap.telemetry`). It is *fresh* when ``now - timestamp <=
  stale_after_s``; otherwise *stale*; a node without the annotation has *missing*
  telemetry, one whose annotation cannot be read has *malformed* telemetry. Only fresh
  telemetry counts towards power and temperature.
- **assumed power** of a node: the sum of the power estimates of the active GPU pods
  bound to it after its last telemetry (PodScheduled time > telemetry timestamp) and not
  listed in that telemetry's ``gpus[].pod``; for a node with no readable telemetry, of
  all its active GPU pods. Without it a burst of pods lands in one rack before telemetry
  catches up.
- **rack power** = sum of fresh node power + sum of node assumed power, over its nodes.
- **rack temperature** = max inlet temperature over its nodes with fresh telemetry
  (None when none reports one).
- **rack limits**: over every ``Enforce`` policy naming the rack, the smallest
  ``maxPower`` and the smallest ``maxTemperature`` (the strictest wins), with the policy
  that set each. A rack is *constrained* when it has either limit.
- **pod power estimate** (:func:`estimate_pod_power_w`): the pod's annotation
  ``powercapping.example.com/power-watts``; else GPUs x min(per-GPU budget of its policy,
  the node's GPU maximum limit); else GPUs x the node's GPU maximum limit.

API (stable; the budget controller uses it too):

- ``build_cluster_view(nodes, pods, policies, now, settings, registry=None, previous=None)``
- ``ClusterView.nodes[name] -> NodeView``: rack, GPU capacity, telemetry (or why it is
  missing/stale/malformed), measured/assumed power, inlet temperature and its trend;
- ``ClusterView.racks[rack_id] -> RackView``: measured/assumed power, temperature,
  limits, nodes without fresh telemetry;
- ``ClusterView.policies[ns/name] -> PolicyView``: the policy, its pods, its GPUs (from
  telemetry ``gpus[].pod``) and GPU count;
- ``ClusterView.rack_of(node)``, ``ClusterView.policy_for_pod(pod)``,
  ``ClusterView.node_facts[name]`` (scoring input), ``ClusterView.warnings``,
  ``ClusterView.invalid_policies``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from types import MappingProxyType
from typing import Any

from powercap.algorithms import AlgorithmRegistry, NodeFacts
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
    older than this is stale. ``default_gpu_max_w`` / ``default_gpu_min_w``: a GPU's
    power limits when no telemetry reports them.
    """

    rack_label: str = RACK_LABEL
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    default_gpu_max_w: float = DEFAULT_GPU_MAX_W
    default_gpu_min_w: float = DEFAULT_GPU_MIN_W


class TelemetryStatus(str, Enum):
    FRESH = "fresh"
    STALE = "stale"
    MISSING = "missing"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node. Power and temperature figures count only fresh telemetry."""

    name: str
    rack_id: str | None
    gpu_capacity: int
    telemetry_status: TelemetryStatus
    telemetry: NodeTelemetry | None = None  # the last readable telemetry, fresh or stale
    telemetry_age_s: float | None = None
    telemetry_problem: str | None = None  # why it is not fresh, in words a person can act on
    measured_power_w: float = 0.0  # the telemetry's powerW when fresh, else 0
    assumed_power_w: float = 0.0
    assumed_pods: tuple[str, ...] = ()
    gpu_max_w: float = DEFAULT_GPU_MAX_W  # largest GPU maximum limit (telemetry, else default)
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
        """measured + assumed, W."""
        return self.measured_power_w + self.assumed_power_w


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

    @property
    def power_w(self) -> float:
        """measured + assumed, W."""
        return self.measured_power_w + self.assumed_power_w

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
    requested by those of them bound to a node. ``gpus``: the GPUs node telemetry
    attributes to its pods (last readable telemetry of each node, fresh or not).
    """

    policy: Policy
    pods: tuple[str, ...] = ()
    bound_gpus: int = 0
    gpus: tuple[PolicyGpu, ...] = ()

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
    )


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


@dataclass(frozen=True, slots=True)
class _ParsedNode:
    rack_id: str | None
    gpu_capacity: int
    telemetry: NodeTelemetry | None
    telemetry_error: str | None


@dataclass
class _Memo:
    """Per-object parse results, reused while the very same object (identity) is seen again.

    Watch caches hand out the same dict until an object changes, so identity is a cheap,
    exact "unchanged" test. Never changes a result, only skips work.
    """

    settings: ClusterSettings
    nodes: dict[str, tuple[KubeObject, _ParsedNode]] = field(default_factory=dict)
    pods: dict[str, tuple[KubeObject, PodFacts]] = field(default_factory=dict)
    policies: dict[str, tuple[KubeObject, Policy | str]] = field(default_factory=dict)
    # node -> (timestamp, inlet °C, rise °C/min): the sample the next trend is measured from
    trend_anchors: dict[str, tuple[datetime, float, float | None]] = field(default_factory=dict)


class ClusterView:
    """An immutable snapshot of the cluster at ``now``; see the module docstring.

    Members: ``now``, ``settings``, ``nodes``, ``racks``, ``policies``,
    ``invalid_policies`` (key -> why), ``node_facts`` (name -> :class:`NodeFacts`),
    ``policies_by_namespace``, ``gpu_min_w`` (smallest GPU minimum limit seen),
    ``has_constraints``, ``warnings``; ``node(name)``, ``rack_of(name)``,
    ``policy_for_pod(pod)``, ``policy_view_for_pod(pod)``.
    """

    __slots__ = (
        "now", "settings", "nodes", "racks", "policies", "invalid_policies", "node_facts",
        "policies_by_namespace", "gpu_min_w", "has_constraints", "warnings", "_memo",
    )

    def __init__(
        self,
        *,
        now: datetime,
        settings: ClusterSettings,
        nodes: Mapping[str, NodeView],
        racks: Mapping[str, RackView],
        policies: Mapping[str, PolicyView],
        invalid_policies: Mapping[str, str],
        node_facts: Mapping[str, NodeFacts],
        gpu_min_w: float,
        warnings: tuple[str, ...],
        memo: _Memo | None = None,
    ) -> None:
        self.now = now
        self.settings = settings
        self.nodes: Mapping[str, NodeView] = MappingProxyType(dict(nodes))
        self.racks: Mapping[str, RackView] = MappingProxyType(dict(racks))
        self.policies: Mapping[str, PolicyView] = MappingProxyType(dict(policies))
        self.invalid_policies: Mapping[str, str] = MappingProxyType(dict(invalid_policies))
        self.node_facts: Mapping[str, NodeFacts] = MappingProxyType(dict(node_facts))
        by_namespace: dict[str, list[PolicyView]] = {}
        for view in sorted(policies.values(), key=lambda v: v.policy.name):
            by_namespace.setdefault(view.policy.namespace, []).append(view)
        self.policies_by_namespace: Mapping[str, tuple[PolicyView, ...]] = MappingProxyType(
            {ns: tuple(views) for ns, views in by_namespace.items()}
        )
        self.gpu_min_w = gpu_min_w
        self.has_constraints = any(rack.constrained for rack in racks.values())
        self.warnings = warnings
        self._memo = memo

    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(self, "_memo") or name not in self.__slots__:
            raise AttributeError(f"ClusterView is immutable (tried to set {name})")
        object.__setattr__(self, name, value)

    def node(self, name: str) -> NodeView | None:
        return self.nodes.get(name)

    def rack_of(self, node_name: str) -> RackView | None:
        """The rack of a node, or None when the node is unknown or unlabelled."""
        node = self.nodes.get(node_name)
        return self.racks.get(node.rack_id) if node is not None and node.rack_id else None

    def policy_view_for_pod(self, pod: KubeObject | PodFacts) -> PolicyView | None:
        """The policy matching the pod (its namespace, its selector; first by name on overlap)."""
        facts = pod if isinstance(pod, PodFacts) else None
        if facts is None:
            metadata = pod.get("metadata") or {}  # type: ignore[union-attr]
            namespace, labels = metadata.get("namespace") or "default", labels_of(pod)  # type: ignore[arg-type]
        else:
            namespace, labels = facts.namespace, facts.labels
        for view in self.policies_by_namespace.get(namespace, ()):
            if view.policy.selector.matches(labels):
                return view
        return None

    def policy_for_pod(self, pod: KubeObject | PodFacts) -> Policy | None:
        view = self.policy_view_for_pod(pod)
        return view.policy if view is not None else None


def build_cluster_view(
    nodes: Iterable[KubeObject],
    pods: Iterable[KubeObject],
    policies: Iterable[KubeObject],
    now: datetime,
    settings: ClusterSettings | None = None,
    *,
    registry: AlgorithmRegistry | None = None,
    previous: ClusterView | None = None,
) -> ClusterView:
    """The cluster view at ``now`` (an aware datetime) from raw API objects.

    Invalid policies are left out and listed in ``invalid_policies`` with the reason.
    ``previous``, when given, lends its parse results for objects seen again unchanged
    (the result is the same as without it) and the inlet samples the temperature trend
    is measured from. Cost: O(nodes + pods + policies) dictionary work, parsing only the
    objects that changed.
    """
    settings = settings or ClusterSettings()
    registry = registry or AlgorithmRegistry.default(discover=lambda: [])
    old = previous._memo if previous is not None and previous._memo is not None else None
    memo = _Memo(settings=settings)
    if old is not None and old.settings == settings:
        reuse = old
    else:
        reuse = _Memo(settings=settings)
    if old is not None:
        memo.trend_anchors = dict(old.trend_anchors)

    # -- policies
    valid: dict[str, Policy] = {}
    invalid: dict[str, str] = {}
    for document in policies:
        metadata = document.get("metadata") or {}
        key = f"{metadata.get('namespace') or 'default'}/{metadata.get('name', '')}"
        cached = reuse.policies.get(key)
        parsed: Policy | str
        if cached is not None and cached[0] is document:
            parsed = cached[1]
        else:
            try:
                parsed = parse_policy(document, registry)
            except (ValueError, TypeError, KeyError) as error:
                parsed = str(error)
        memo.policies[key] = (document, parsed)
        if isinstance(parsed, Policy):
            valid[parsed.key] = parsed
        else:
            invalid[key] = parsed
    policies_by_namespace: dict[str, list[Policy]] = {}
    for policy in sorted(valid.values(), key=lambda p: p.name):
        policies_by_namespace.setdefault(policy.namespace, []).append(policy)

    # -- nodes
    parsed_nodes: dict[str, _ParsedNode] = {}
    for node in nodes:
        name = object_key(node)
        cached_node = reuse.nodes.get(name)
        if cached_node is not None and cached_node[0] is node:
            parsed_node = cached_node[1]
        else:
            parsed_node = _parse_node(node, settings)
        memo.nodes[name] = (node, parsed_node)
        parsed_nodes[name] = parsed_node

    # -- pods: who is where, which policy they belong to
    policy_pods: dict[str, list[str]] = {key: [] for key in valid}
    policy_bound_gpus: dict[str, int] = dict.fromkeys(valid, 0)
    pod_policy: dict[str, Policy] = {}
    bound_by_node: dict[str, list[PodFacts]] = {}
    for pod in pods:
        key = object_key(pod)
        cached_pod = reuse.pods.get(key)
        if cached_pod is not None and cached_pod[0] is pod:
            facts = cached_pod[1]
        else:
            facts = pod_facts(pod)
        memo.pods[key] = (pod, facts)
        if not facts.active:
            continue
        candidates = policies_by_namespace.get(facts.namespace)
        if candidates:
            policy = next((p for p in candidates if p.selector.matches(facts.labels)), None)
            if policy is not None:
                pod_policy[key] = policy
                policy_pods[policy.key].append(key)
                if facts.node_name:
                    policy_bound_gpus[policy.key] += facts.gpus
        if facts.node_name and (facts.gpus > 0 or facts.power_annotation_w is not None):
            bound_by_node.setdefault(facts.node_name, []).append(facts)

    # -- node views with assumed power
    node_views: dict[str, NodeView] = {}
    policy_gpus: dict[str, list[PolicyGpu]] = {key: [] for key in valid}
    pod_to_policy_key = {pod_key: policy.key for pod_key, policy in pod_policy.items()}
    gpu_min_w = math.inf
    for name, parsed_node in parsed_nodes.items():
        telemetry = parsed_node.telemetry
        visible: set[str] = set()
        if telemetry is not None:
            for gpu in telemetry.gpus:
                gpu_min_w = min(gpu_min_w, gpu.min_w)
                if gpu.pod is not None:
                    visible.add(gpu.pod)
                    owner = pod_to_policy_key.get(gpu.pod)
                    if owner is not None:
                        policy_gpus[owner].append(PolicyGpu(node=name, gpu=gpu))
        node_views[name] = _node_view(
            name, parsed_node, visible, bound_by_node.get(name, ()), pod_policy, policy_bound_gpus,
            now, settings, memo.trend_anchors,
        )
    for name in set(memo.trend_anchors) - set(parsed_nodes):
        del memo.trend_anchors[name]

    # -- racks
    limits = _rack_limits(valid.values())
    rack_nodes: dict[str, list[NodeView]] = {}
    for view in node_views.values():
        if view.rack_id is not None:
            rack_nodes.setdefault(view.rack_id, []).append(view)
    racks = {rack_id: _rack_view(rack_id, members, limits.get(rack_id, RackLimits())) for rack_id, members in rack_nodes.items()}
    warnings = _warnings(racks, limits, invalid)

    policy_views = {
        key: PolicyView(
            policy=policy,
            pods=tuple(sorted(policy_pods[key])),
            bound_gpus=policy_bound_gpus[key],
            gpus=tuple(sorted(policy_gpus[key], key=lambda g: (g.node, g.gpu.index))),
        )
        for key, policy in valid.items()
    }
    node_facts = {name: _node_facts(view, racks.get(view.rack_id) if view.rack_id else None) for name, view in node_views.items()}
    return ClusterView(
        now=now,
        settings=settings,
        nodes=node_views,
        racks=racks,
        policies=policy_views,
        invalid_policies=invalid,
        node_facts=node_facts,
        gpu_min_w=settings.default_gpu_min_w if gpu_min_w is math.inf else gpu_min_w,
        warnings=warnings,
        memo=memo,
    )


def _parse_node(node: KubeObject, settings: ClusterSettings) -> _ParsedNode:
    rack = labels_of(node).get(settings.rack_label)
    text = annotations_of(node).get(TELEMETRY_ANNOTATION)
    telemetry: NodeTelemetry | None = None
    error: str | None = None
    if text is not None:
        try:
            telemetry = from_json(text)
        except TelemetryError as problem:
            error = str(problem)
    return _ParsedNode(
        rack_id=rack if isinstance(rack, str) and rack else None,
        gpu_capacity=node_gpu_capacity(node),
        telemetry=telemetry,
        telemetry_error=error,
    )


def _node_view(
    name: str,
    parsed: _ParsedNode,
    visible_pods: set[str],
    bound: Iterable[PodFacts],
    pod_policy: Mapping[str, Policy],
    policy_bound_gpus: Mapping[str, int],
    now: datetime,
    settings: ClusterSettings,
    trend_anchors: dict[str, tuple[datetime, float, float | None]],
) -> NodeView:
    telemetry = parsed.telemetry
    gpu_max_w = max((g.max_w for g in telemetry.gpus), default=settings.default_gpu_max_w) if telemetry else settings.default_gpu_max_w
    capacity_w = sum(g.max_w for g in telemetry.gpus) if telemetry and telemetry.gpus else None
    age_s: float | None = None
    problem: str | None = None
    if parsed.telemetry_error is not None:
        status = TelemetryStatus.MALFORMED
        problem = f"telemetry of node {name} is unreadable ({parsed.telemetry_error})"
    elif telemetry is None:
        status = TelemetryStatus.MISSING
        problem = f"no telemetry from node {name} (annotation {TELEMETRY_ANNOTATION} missing; is the node agent running there?)"
    else:
        age_s = max(0.0, telemetry.age_s(now))
        if age_s <= settings.stale_after_s:
            status = TelemetryStatus.FRESH
        else:
            status = TelemetryStatus.STALE
            problem = f"no telemetry from node {name} for {age_s:.0f} s (stale after {settings.stale_after_s:g} s)"
    fresh = status is TelemetryStatus.FRESH

    assumed_w = 0.0
    assumed: list[str] = []
    for facts in bound:
        if facts.key in visible_pods:
            continue
        if telemetry is not None and facts.bound_at is not None and facts.bound_at <= telemetry.timestamp:
            continue  # bound before the last telemetry: already in its power
        policy = pod_policy.get(facts.key)
        service_gpus = policy_bound_gpus.get(policy.key, facts.gpus) if policy is not None else facts.gpus
        assumed_w += estimate_pod_power_w(facts.gpus, facts.power_annotation_w, policy, service_gpus, gpu_max_w)
        assumed.append(facts.key)

    inlet = telemetry.inlet_temperature_c if fresh and telemetry is not None else None
    rise = _inlet_rise(name, telemetry if fresh else None, trend_anchors)
    return NodeView(
        name=name,
        rack_id=parsed.rack_id,
        gpu_capacity=parsed.gpu_capacity,
        telemetry_status=status,
        telemetry=telemetry,
        telemetry_age_s=age_s,
        telemetry_problem=problem,
        measured_power_w=telemetry.power_w if fresh and telemetry is not None else 0.0,
        assumed_power_w=assumed_w,
        assumed_pods=tuple(sorted(assumed)),
        gpu_max_w=gpu_max_w,
        power_capacity_w=capacity_w,
        inlet_temperature_c=inlet,
        inlet_rise_c_per_min=rise,
    )


def _inlet_rise(
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


def _rack_limits(policies: Iterable[Policy]) -> dict[str, RackLimits]:
    """Per rack, the smallest maxPower and maxTemperature over Enforce policies (ties: first by key)."""
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


def _rack_view(rack_id: str, members: list[NodeView], limits: RackLimits) -> RackView:
    members.sort(key=lambda n: n.name)
    fresh = [n for n in members if n.fresh]
    inlets = [n.inlet_temperature_c for n in fresh if n.inlet_temperature_c is not None]
    rises = [n.inlet_rise_c_per_min for n in fresh if n.inlet_rise_c_per_min is not None]
    unreliable = [n for n in members if n.needs_telemetry and not n.fresh]
    problem = None
    if unreliable:
        problem = unreliable[0].telemetry_problem
        if len(unreliable) > 1:
            problem = f"{problem}; and {len(unreliable) - 1} more node(s) without fresh telemetry"
    return RackView(
        rack_id=rack_id,
        nodes=tuple(n.name for n in members),
        measured_power_w=sum(n.measured_power_w for n in members),
        assumed_power_w=sum(n.assumed_power_w for n in members),
        inlet_temperature_c=max(inlets) if inlets else None,
        inlet_rise_c_per_min=max(rises) if rises else None,
        limits=limits,
        unreliable_nodes=tuple(n.name for n in unreliable),
        telemetry_problem=problem,
        assumed_pods=tuple(sorted(pod for n in members for pod in n.assumed_pods)),
    )


def _warnings(racks: Mapping[str, RackView], limits: Mapping[str, RackLimits], invalid: Mapping[str, str]) -> tuple[str, ...]:
    """Things an operator should know that do not stop scheduling."""
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


def _node_facts(node: NodeView, rack: RackView | None) -> NodeFacts:
    return NodeFacts(
        name=node.name,
        rack_id=node.rack_id,
        node_power_w=node.power_w if node.fresh else None,
        node_capacity_w=node.power_capacity_w,
        rack_power_w=rack.power_w if rack is not None else None,
        rack_max_power_w=rack.limits.max_power_w if rack is not None else None,
        inlet_c=rack.inlet_temperature_c if rack is not None else node.inlet_temperature_c,
        rack_max_temperature_c=rack.limits.max_temperature_c if rack is not None else None,
        inlet_rise_c_per_min=rack.inlet_rise_c_per_min if rack is not None else node.inlet_rise_c_per_min,
    )
