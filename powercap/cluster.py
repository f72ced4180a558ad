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
  bound to it after its last telemetry (PodScheduled time + 1 s > telemetry timestamp: the
  apiserver writes that time in whole seconds) and not
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

- ``build_cluster_view(nodes, pods, policies, now, settings=None, *, registry=None, previous=None)``
- ``ClusterView.now``, ``.settings``: when and how it was built;
- ``ClusterView.nodes[name] -> NodeView``: rack, GPU capacity, telemetry status and the last
  readable telemetry (or ``telemetry_problem``: why it is missing/stale/malformed),
  measured/assumed power and assumed pods, GPU max, inlet temperature and its trend;
- ``ClusterView.racks[rack_id] -> RackView``: nodes, measured/assumed power, temperature
  and trend, ``limits`` (strictest maxPower/maxTemperature and the policy that set each),
  nodes without fresh telemetry and the problem to report;
- ``ClusterView.policies[ns/name] -> PolicyView``: the policy, its pods, its bound GPU
  count and its GPUs (from telemetry ``gpus[].pod``); computed on first use;
- ``ClusterView.invalid_policies[ns/name] -> why``; ``ClusterView.warnings``;
- ``ClusterView.node_facts[name] -> NodeFacts`` (the scoring input); ``gpu_min_w``;
  ``has_constraints``;
- ``ClusterView.rack_of(node)``, ``.telemetry_age_s(node)``, ``.policy_for_pod(pod)``,
  ``.bound_gpus(policy_key)``, ``.policy_view_for_pod(pod)``; ``find_node``,
  ``find_rack``, ``find_facts``: the mappings' ``get`` for hot loops;
- ``estimate_pod_power_w(...)``, ``pod_facts(pod)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import compress
from operator import not_
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
    telemetry_problem: str | None = None  # why it is not fresh, in words a person can act on
    measured_power_w: float = 0.0  # the telemetry's powerW when fresh, else 0
    assumed_power_w: float = 0.0
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


# The apiserver writes condition times in whole seconds: a pod whose PodScheduled time reads
# 5 s may have been bound at 5.9 s, after telemetry taken at 5.1 s. Only a binding at least
# this long before the telemetry is surely in its power.
BINDING_TIME_RESOLUTION = timedelta(seconds=1)


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


@dataclass(frozen=True, slots=True)
class _ParsedNode:
    name: str
    rack_id: str | None
    gpu_capacity: int
    telemetry: NodeTelemetry | None
    telemetry_error: str | None
    visible_pods: frozenset[str] = frozenset()  # telemetry gpus[].pod
    gpu_min_w: float | None = None  # smallest GPU minimum limit in its telemetry
    gpu_largest_min_w: float | None = None  # largest GPU minimum limit in its telemetry


BoundPod = tuple[PodFacts, Policy | None]


@dataclass
class _State:
    """What a build leaves for the next one, so that the next parses and recomputes only
    what changed. Watch caches hand out the same dict until an object changes, so object
    identity is a cheap, exact "unchanged" test: a changed object is a new dict. Never
    changes a result, only skips work; never mutated once its view is handed out.
    """

    settings: ClusterSettings
    registry: AlgorithmRegistry
    policy_docs: dict[int, tuple[KubeObject, Policy | str]]
    valid: dict[str, Policy]
    invalid: dict[str, str]
    by_namespace: dict[str, tuple[Policy, ...]]
    limits: dict[str, RackLimits]
    node_docs: dict[int, tuple[KubeObject, _ParsedNode]]
    parsed_nodes: dict[str, _ParsedNode]
    pod_docs: dict[int, tuple[KubeObject, PodFacts, Policy | None]]
    bound_by_node: dict[str, tuple[BoundPod, ...]]
    bound_gpus: dict[str, int]
    pending_pods: set[str]  # keys of the active pods not bound yet (few: copied every build)
    node_views: dict[str, NodeView]
    rack_views: dict[str, RackView]
    node_facts: dict[str, NodeFacts]
    fresh_until: dict[str, datetime]  # nodes with fresh telemetry: when it goes stale
    assumed_policies: dict[str, frozenset[str]]  # node -> policies of its assumed pods
    # node -> (timestamp, inlet °C, rise °C/min): the sample the next trend is measured from
    trend_anchors: dict[str, tuple[datetime, float, float | None]]
    gpu_min_w: float
    largest_gpu_min_w: float


class ClusterView:
    """An immutable snapshot of the cluster at ``now``; see the module docstring.

    Members: ``now``, ``settings``, ``nodes``, ``racks``, ``policies`` (computed on first
    use), ``invalid_policies`` (key -> why), ``node_facts`` (name -> :class:`NodeFacts`),
    ``gpu_min_w`` (smallest GPU minimum limit seen), ``largest_gpu_min_w`` (largest),
    ``has_constraints``, ``warnings``;
    ``find_node``/``find_rack``/``find_facts`` (fast ``get`` of those mappings for hot loops),
    ``node(name)``, ``rack_of(name)``, ``telemetry_age_s(name)``, ``policy_for_pod(pod)``, ``bound_gpus(policy_key)``,
    ``policy_view_for_pod(pod)``.
    """

    __slots__ = (
        "now", "settings", "nodes", "racks", "invalid_policies", "node_facts",
        "gpu_min_w", "largest_gpu_min_w", "has_constraints", "warnings", "_policies", "_state",
        "find_node", "find_rack", "find_facts",
    )

    now: datetime
    settings: ClusterSettings
    nodes: Mapping[str, NodeView]
    racks: Mapping[str, RackView]
    invalid_policies: Mapping[str, str]
    node_facts: Mapping[str, NodeFacts]
    gpu_min_w: float
    largest_gpu_min_w: float
    has_constraints: bool
    warnings: tuple[str, ...]
    find_node: Callable[[str], NodeView | None]
    find_rack: Callable[[str], RackView | None]
    find_facts: Callable[[str], NodeFacts | None]
    _policies: Mapping[str, PolicyView] | None
    _state: _State

    def __init__(self, *, now: datetime, state: _State, warnings: tuple[str, ...]) -> None:
        object.__setattr__(self, "now", now)
        object.__setattr__(self, "settings", state.settings)
        object.__setattr__(self, "nodes", MappingProxyType(state.node_views))
        object.__setattr__(self, "racks", MappingProxyType(state.rack_views))
        object.__setattr__(self, "invalid_policies", MappingProxyType(state.invalid))
        object.__setattr__(self, "node_facts", MappingProxyType(state.node_facts))
        object.__setattr__(self, "gpu_min_w", state.gpu_min_w)
        object.__setattr__(self, "largest_gpu_min_w", state.largest_gpu_min_w)
        object.__setattr__(self, "has_constraints", any(
            limits.constrained and rack_id in state.rack_views for rack_id, limits in state.limits.items()
        ))
        object.__setattr__(self, "warnings", warnings)
        object.__setattr__(self, "_policies", None)
        object.__setattr__(self, "_state", state)
        # the same lookups as nodes.get, racks.get and node_facts.get, without the proxy's cost
        object.__setattr__(self, "find_node", state.node_views.get)
        object.__setattr__(self, "find_rack", state.rack_views.get)
        object.__setattr__(self, "find_facts", state.node_facts.get)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ClusterView is immutable (tried to set {name})")

    @property
    def policies(self) -> Mapping[str, PolicyView]:
        """Every valid policy with its pods and GPUs (computed once per view, on first use)."""
        if self._policies is None:
            object.__setattr__(self, "_policies", MappingProxyType(_policy_views(self._state)))
        assert self._policies is not None
        return self._policies

    def node(self, name: str) -> NodeView | None:
        return self.nodes.get(name)

    def rack_of(self, node_name: str) -> RackView | None:
        """The rack of a node, or None when the node is unknown or unlabelled."""
        node = self.nodes.get(node_name)
        return self.racks.get(node.rack_id) if node is not None and node.rack_id else None

    def policy_for_pod(self, pod: KubeObject | PodFacts) -> Policy | None:
        """The valid policy matching the pod (its namespace, its selector; first by name on overlap)."""
        if isinstance(pod, PodFacts):
            return _match(self._state.by_namespace, pod.namespace, pod.labels)
        namespace = (pod.get("metadata") or {}).get("namespace") or "default"
        return _match(self._state.by_namespace, namespace, labels_of(pod))

    def telemetry_age_s(self, node_name: str) -> float | None:
        """How old the node's last readable telemetry is at ``now`` (None: unknown node or none)."""
        node = self.nodes.get(node_name)
        if node is None or node.telemetry is None:
            return None
        return max(0.0, node.telemetry.age_s(self.now))

    def bound_gpus(self, policy_key: str) -> int:
        """GPUs requested by a policy's active pods bound to a node."""
        return self._state.bound_gpus.get(policy_key, 0)

    def pod_pending(self, pod_key: str) -> bool:
        """Whether the view has the pod (``namespace/name``) active and not bound yet."""
        return pod_key in self._state.pending_pods

    def policy_view_for_pod(self, pod: KubeObject | PodFacts) -> PolicyView | None:
        policy = self.policy_for_pod(pod)
        return self.policies.get(policy.key) if policy is not None else None


def _match(by_namespace: Mapping[str, tuple[Policy, ...]], namespace: str, labels: Mapping[str, str]) -> Policy | None:
    for policy in by_namespace.get(namespace, ()):
        if policy.selector.matches(labels):
            return policy
    return None


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
    ``previous``, when given, lends its work: objects seen again (the same dict) are not
    parsed again, and only nodes and racks touched by a change (a changed node or pod, a
    pod's policy gaining GPUs, telemetry going stale) are recomputed; the result is the
    same as without it. It also holds the inlet samples the temperature trend is measured
    from. Cost with ``previous``: O(objects) identity checks at C speed plus O(changes)
    Python work; without it, O(nodes + pods + policies).
    """
    settings = settings or ClusterSettings()
    old = previous._state if previous is not None else None
    if old is not None and old.settings != settings:
        old = None  # the rack label or staleness changed: everything is read anew
    registry = registry or (old.registry if old is not None else AlgorithmRegistry.default(discover=lambda: []))
    if old is not None and old.registry is not registry:
        old = None
    node_list, pod_list, policy_list = list(nodes), list(pods), list(policies)

    # -- policies: any change (rare) makes a full rebuild
    policy_ids = set(map(id, policy_list))
    full = old is None or policy_ids != set(old.policy_docs)
    if not full:
        assert old is not None
        policy_docs, valid, invalid = old.policy_docs, old.valid, old.invalid
        by_namespace, limits = old.by_namespace, old.limits
    else:
        policy_docs, valid, invalid = _parse_policies(policy_list, old.policy_docs if old else {}, registry)
        grouped: dict[str, list[Policy]] = {}
        for valid_policy in sorted(valid.values(), key=lambda p: p.name):
            grouped.setdefault(valid_policy.namespace, []).append(valid_policy)
        by_namespace = {ns: tuple(group) for ns, group in grouped.items()}
        limits = _rack_limits(valid.values())

    # -- nodes: the objects that are new (changed) or gone since the previous build
    base_nodes = old.node_docs if old is not None else {}
    added_nodes, removed_node_ids = _diff(node_list, base_nodes)
    node_docs = dict(base_nodes)
    parsed_nodes = dict(old.parsed_nodes) if old is not None else {}
    dirty: set[str] = set()
    for node_id in removed_node_ids:
        parsed = node_docs.pop(node_id)[1]
        parsed_nodes.pop(parsed.name, None)
        dirty.add(parsed.name)
    for node in added_nodes:
        parsed = _parse_node(node, settings)
        node_docs[id(node)] = (node, parsed)
        parsed_nodes[parsed.name] = parsed
        dirty.add(parsed.name)

    # -- pods: who is bound where, and each bound GPU pod's policy
    base_pods = old.pod_docs if old is not None and not full else {}
    added_pods, removed_pod_ids = _diff(pod_list, base_pods)
    pod_docs = dict(base_pods)
    bound_by_node: dict[str, tuple[BoundPod, ...]] = dict(old.bound_by_node) if old is not None and not full else {}
    bound_gpus: dict[str, int] = dict(old.bound_gpus) if old is not None and not full else dict.fromkeys(valid, 0)
    pending_pods: set[str] = set(old.pending_pods) if old is not None and not full else set()
    touched_policies: set[str] = set()
    reuse_facts = old.pod_docs if old is not None else {}
    for pod_id in removed_pod_ids:
        _, facts, policy = pod_docs.pop(pod_id)
        if facts.active and facts.node_name is None:
            pending_pods.discard(facts.key)
        if _counts_power(facts):
            bound_by_node[facts.node_name] = tuple(b for b in bound_by_node[facts.node_name] if b[0] is not facts)  # type: ignore[index]
            dirty.add(facts.node_name)  # type: ignore[arg-type]
            if policy is not None:
                bound_gpus[policy.key] -= facts.gpus
                touched_policies.add(policy.key)
    for pod in added_pods:
        cached = reuse_facts.get(id(pod))
        facts = cached[1] if cached is not None and cached[0] is pod else pod_facts(pod)
        policy = _match(by_namespace, facts.namespace, facts.labels) if facts.active else None
        pod_docs[id(pod)] = (pod, facts, policy)
        if facts.active and facts.node_name is None:
            pending_pods.add(facts.key)
        if _counts_power(facts):
            bound_by_node[facts.node_name] = (*bound_by_node.get(facts.node_name, ()), (facts, policy))  # type: ignore[index,arg-type]
            dirty.add(facts.node_name)  # type: ignore[arg-type]
            if policy is not None:
                bound_gpus[policy.key] = bound_gpus.get(policy.key, 0) + facts.gpus
                touched_policies.add(policy.key)

    # -- what else a change reaches: pods whose per-GPU budget moved, telemetry going stale
    fresh_until = dict(old.fresh_until) if old is not None else {}
    node_views = dict(old.node_views) if old is not None else {}
    assumed_policies = dict(old.assumed_policies) if old is not None else {}
    if full:
        dirty = set(parsed_nodes) | set(node_views)
    else:
        if touched_policies:
            dirty.update(n for n, keys in assumed_policies.items() if keys & touched_policies)
        dirty.update(n for n, until in fresh_until.items() if until < now)
        dirty.update(n for n, v in node_views.items() if v.telemetry_status is TelemetryStatus.STALE)
        if previous is not None and now < previous.now:
            dirty.update(node_views)  # the clock went back: ages are all different
    trend_anchors = dict(old.trend_anchors) if old is not None else {}

    # -- recompute the dirty nodes
    racks_touched: set[str] = set()
    for name in dirty:
        before = node_views.pop(name, None)
        if before is not None and before.rack_id is not None:
            racks_touched.add(before.rack_id)
        fresh_until.pop(name, None)
        assumed_policies.pop(name, None)
        dirty_node = parsed_nodes.get(name)
        if dirty_node is None:
            trend_anchors.pop(name, None)
            continue
        view, assumed_keys = _node_view(dirty_node, bound_by_node.get(name, ()), bound_gpus, now, settings, trend_anchors)
        node_views[name] = view
        if dirty_node.rack_id is not None:
            racks_touched.add(dirty_node.rack_id)
        if view.fresh and view.telemetry is not None:
            fresh_until[name] = view.telemetry.timestamp + timedelta(seconds=settings.stale_after_s)
        if assumed_keys:
            assumed_policies[name] = assumed_keys

    # -- racks and scoring facts of the touched ones
    rack_views = dict(old.rack_views) if old is not None and not full else {}
    node_facts = dict(old.node_facts) if old is not None and not full else {}
    members_of: dict[str, list[NodeView]] = {rack_id: [] for rack_id in racks_touched}
    if full:
        for view in node_views.values():
            if view.rack_id in members_of:
                members_of[view.rack_id].append(view)
    else:
        for rack_id, members in members_of.items():
            before_rack = rack_views.get(rack_id)
            names = set(before_rack.nodes if before_rack is not None else ()) | dirty
            members.extend(v for v in map(node_views.get, names) if v is not None and v.rack_id == rack_id)
    for rack_id, members in members_of.items():
        if members:
            rack_views[rack_id] = _rack_view(rack_id, members, limits.get(rack_id, RackLimits()))
            for member in members:
                node_facts[member.name] = _node_facts(member, rack_views[rack_id])
        else:
            rack_views.pop(rack_id, None)
    for name in dirty:
        view_or_none = node_views.get(name)
        if view_or_none is None:
            node_facts.pop(name, None)
        elif view_or_none.rack_id is None:
            node_facts[name] = _node_facts(view_or_none, None)

    if full or added_nodes or removed_node_ids or old is None:
        mins = [p.gpu_min_w for p in parsed_nodes.values() if p.gpu_min_w is not None]
        gpu_min_w = min(mins) if mins else settings.default_gpu_min_w
        largest = [p.gpu_largest_min_w for p in parsed_nodes.values() if p.gpu_largest_min_w is not None]
        largest_gpu_min_w = max(largest) if largest else settings.default_gpu_min_w
    else:
        gpu_min_w, largest_gpu_min_w = old.gpu_min_w, old.largest_gpu_min_w

    state = _State(
        settings=settings, registry=registry, policy_docs=policy_docs, valid=valid, invalid=invalid,
        by_namespace=by_namespace, limits=limits, node_docs=node_docs, parsed_nodes=parsed_nodes,
        pod_docs=pod_docs, bound_by_node=bound_by_node, bound_gpus=bound_gpus, pending_pods=pending_pods,
        node_views=node_views,
        rack_views=rack_views, node_facts=node_facts, fresh_until=fresh_until,
        assumed_policies=assumed_policies, trend_anchors=trend_anchors, gpu_min_w=gpu_min_w,
        largest_gpu_min_w=largest_gpu_min_w,
    )
    return ClusterView(now=now, state=state, warnings=_warnings(rack_views, limits, invalid))


def _diff(objects: list[KubeObject], before: Mapping[int, tuple[Any, ...]]) -> tuple[list[KubeObject], set[int]]:
    """Objects not in ``before`` (by identity), and the ids in ``before`` no longer present.

    Runs at C speed (``map``, ``compress``, set operations). ``before`` keeps its objects
    alive, so their ids cannot have been reused by another object.
    """
    if not before:
        return list(objects), set()
    ids = list(map(id, objects))
    added = list(compress(objects, map(not_, map(before.__contains__, ids))))
    return added, set(before).difference(ids)


def _counts_power(facts: PodFacts) -> bool:
    """A pod that draws power on a node: bound, active, with GPUs or a power annotation."""
    return facts.node_name is not None and facts.active and (facts.gpus > 0 or facts.power_annotation_w is not None)


def _parse_policies(
    documents: list[KubeObject],
    before: Mapping[int, tuple[KubeObject, Policy | str]],
    registry: AlgorithmRegistry,
) -> tuple[dict[int, tuple[KubeObject, Policy | str]], dict[str, Policy], dict[str, str]]:
    docs: dict[int, tuple[KubeObject, Policy | str]] = {}
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


def _policy_views(state: _State) -> dict[str, PolicyView]:
    pods: dict[str, list[str]] = {key: [] for key in state.valid}
    owner: dict[str, str] = {}
    waiting: dict[str, int] = dict.fromkeys(state.valid, 0)
    for _, facts, policy in state.pod_docs.values():
        if policy is not None and facts.active:
            pods[policy.key].append(facts.key)
            owner[facts.key] = policy.key
            if facts.waits_for_budget:
                waiting[policy.key] += facts.gpus
    gpus: dict[str, list[PolicyGpu]] = {key: [] for key in state.valid}
    for parsed in state.parsed_nodes.values():
        if parsed.telemetry is not None:
            for gpu in parsed.telemetry.gpus:
                key = owner.get(gpu.pod) if gpu.pod is not None else None
                if key is not None:
                    gpus[key].append(PolicyGpu(node=parsed.name, gpu=gpu))
    return {
        key: PolicyView(
            policy=policy,
            pods=tuple(sorted(pods[key])),
            bound_gpus=state.bound_gpus.get(key, 0),
            gpus=tuple(sorted(gpus[key], key=lambda g: (g.node, g.gpu.index))),
            budget_waiting_gpus=waiting[key],
        )
        for key, policy in state.valid.items()
    }


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
    gpus = telemetry.gpus if telemetry is not None else ()
    return _ParsedNode(
        name=object_key(node),
        rack_id=rack if isinstance(rack, str) and rack else None,
        gpu_capacity=node_gpu_capacity(node),
        telemetry=telemetry,
        telemetry_error=error,
        visible_pods=frozenset(g.pod for g in gpus if g.pod is not None),
        gpu_min_w=min((g.min_w for g in gpus), default=None),
        gpu_largest_min_w=max((g.min_w for g in gpus), default=None),
    )


def _node_view(
    parsed: _ParsedNode,
    bound: Iterable[BoundPod],
    bound_gpus: Mapping[str, int],
    now: datetime,
    settings: ClusterSettings,
    trend_anchors: dict[str, tuple[datetime, float, float | None]],
) -> tuple[NodeView, frozenset[str]]:
    """The node's view, and the policies of its assumed pods (their budget moves its power)."""
    name, telemetry = parsed.name, parsed.telemetry
    gpu_max_w = max((g.max_w for g in telemetry.gpus), default=settings.default_gpu_max_w) if telemetry else settings.default_gpu_max_w
    capacity_w = sum(g.max_w for g in telemetry.gpus) if telemetry and telemetry.gpus else None
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
    assumed_policies: set[str] = set()
    for facts, policy in bound:
        if facts.key in parsed.visible_pods:
            continue
        if telemetry is not None and facts.bound_at is not None and facts.bound_at + BINDING_TIME_RESOLUTION <= telemetry.timestamp:
            continue  # bound before the last telemetry: already in its power
        service_gpus = bound_gpus.get(policy.key, facts.gpus) if policy is not None else facts.gpus
        assumed_w += estimate_pod_power_w(facts.gpus, facts.power_annotation_w, policy, service_gpus, gpu_max_w)
        assumed.append(facts.key)
        if policy is not None:
            assumed_policies.add(policy.key)

    inlet = telemetry.inlet_temperature_c if fresh and telemetry is not None else None
    rise = _inlet_rise(name, telemetry if fresh else None, trend_anchors)
    view = NodeView(
        name=name,
        rack_id=parsed.rack_id,
        gpu_capacity=parsed.gpu_capacity,
        telemetry_status=status,
        telemetry=telemetry,
        telemetry_problem=problem,
        measured_power_w=telemetry.power_w if fresh and telemetry is not None else 0.0,
        assumed_power_w=assumed_w,
        assumed_pods=tuple(sorted(assumed)),
        gpu_max_w=gpu_max_w,
        new_gpu_min_w=parsed.gpu_largest_min_w if parsed.gpu_largest_min_w is not None else settings.default_gpu_min_w,
        power_capacity_w=capacity_w,
        inlet_temperature_c=inlet,
        inlet_rise_c_per_min=rise,
    )
    return view, frozenset(assumed_policies)


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
        gpu_max_w=node.gpu_max_w,
    )
