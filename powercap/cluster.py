"""The cluster view: racks, node telemetry, assumed power and policies, as one immutable snapshot.

The scheduler extender and the budget controller both decide from a :class:`ClusterView`.
It is built by one pure function, :func:`build_cluster_view`, from what the API serves
(lists of Node, Pod and PowerCappingPolicy dicts), the time ``now`` and
:class:`ClusterSettings`. Everything a request needs is precomputed here, once per
rebuild, so that a filter call over 5000 node names does 5000 dictionary lookups and no
parsing. Callers rebuild only when their caches' versions moved (or the clock advanced
enough to age telemetry), passing the previous view so that unchanged objects are not
parsed again.

Layout: the parts (node, pod, rack and policy views) and their formulas are pure
functions in :mod:`powercap.clusterviews`; this module keeps the bookkeeping between
builds (what changed, what a change reaches) and composes them. The names below are
all importable from here.

Definitions (W = watts, °C = rack inlet air):

- **rack** of a node: the value of its label ``settings.rack_label`` (default
  ``powercapping.example.com/rack``); None when unlabelled.
- **telemetry** of a node: the ``status`` of its PowerCapNode, or without one the
  annotation ``powercapping.example.com/telemetry`` an older agent wrote (format:
  :mod:`powercap.telemetry`; callers merge the two with :mod:`powercap.nodeobjects`
  before the Nodes reach :func:`build_cluster_view`). It is *fresh* when ``now - timestamp <=
  stale_after_s``; otherwise *stale*; a node without the annotation has *missing*
  telemetry, one whose annotation cannot be read has *malformed* telemetry. Only fresh
  telemetry counts towards power and temperature.
- **assumed power** of a node: the sum of the power estimates of the active GPU pods
  bound to it after its last telemetry (PodScheduled time + 1 s > telemetry timestamp: the
  apiserver writes that time in whole seconds) and not
  listed in that telemetry's ``gpus[].pod``; for a node with no readable telemetry, of
  all its active GPU pods. Without it a burst of pods lands in one rack before telemetry
  catches up.
- **non-GPU power** of a GPU node (CPUs, memory, fans, NICs, supply losses): its
  telemetry's ``nodePower.watts - powerW`` when that whole-node reading is a measurement
  (Redfish, IPMI DCMI, Kepler), fresh (``telemetry age + ageS <= stale_after_s``) and
  plausible (at least 80 % of the GPUs' power, under 100 kW); otherwise an *estimate*:
  ``max(settings.node_overhead_w, nodePower.watts - powerW)`` (the agent's own estimate,
  or a stale reading, counts for as much as it says), ``node_overhead_w`` without a
  usable figure (no ``nodePower``, no fresh telemetry, an implausible reading).
  Formulas: :func:`powercap.clusterviews.non_gpu_power`.
- **node power** = measured GPU power (fresh telemetry's ``powerW``) + non-GPU power +
  assumed power: the whole node.
- **rack power** = sum of its nodes' power (GPUs measured + non-GPU + assumed); its
  **power source** is ``Measured`` when no node's non-GPU power is estimated,
  ``Estimated`` when every one is, ``PartlyEstimated`` between. Its **rise** is what its
  power beside the GPUs adds per watt its GPUs add: ``settings.non_gpu_rise`` with a
  measured node in it, else 0 (:func:`powercap.clusterviews.rack_rise`).
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
  measured/non-GPU/assumed power and assumed pods, GPU max, inlet temperature and its trend;
- ``ClusterView.racks[rack_id] -> RackView``: nodes, measured/non-GPU/assumed power, the
  nodes whose non-GPU power is estimated and why, temperature
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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import compress
from operator import not_
from types import MappingProxyType
from typing import Any

from powercap.algorithms import AlgorithmRegistry, NodeFacts
from powercap.clusterviews import (
    BINDING_TIME_RESOLUTION,
    BUDGET_REFUSAL,
    DEFAULT_GPU_MAX_W,
    DEFAULT_GPU_MIN_W,
    MIN_TREND_WINDOW_S,
    BoundPod,
    ClusterSettings,
    NodeView,
    NonGpuPower,
    ParsedNode,
    PodEntry,
    PodFacts,
    PolicyGpu,
    PolicySet,
    PolicyView,
    RackLimits,
    RackView,
    TelemetryStatus,
    cluster_warnings,
    estimate_pod_power_w,
    gpu_min_limits,
    match_policy,
    node_view,
    parse_node,
    pod_facts,
    policy_views,
    power_node,
    rack_rise,
    rack_view,
    reading_fresh_until,
    read_policies,
    scoring_facts,
)
from powercap.objects import KubeObject, labels_of
from powercap.policies import Policy

__all__ = [
    "BINDING_TIME_RESOLUTION",
    "BUDGET_REFUSAL",
    "DEFAULT_GPU_MAX_W",
    "DEFAULT_GPU_MIN_W",
    "MIN_TREND_WINDOW_S",
    "ClusterSettings",
    "ClusterView",
    "NodeView",
    "NonGpuPower",
    "PodFacts",
    "PolicyGpu",
    "PolicyView",
    "RackLimits",
    "RackView",
    "TelemetryStatus",
    "build_cluster_view",
    "estimate_pod_power_w",
    "pod_facts",
    "rack_rise",
]

@dataclass
class _State:
    """What a build leaves for the next one, so that the next parses and recomputes only
    what changed. Watch caches hand out the same dict until an object changes, so object
    identity is a cheap, exact "unchanged" test: a changed object is a new dict. Never
    changes a result, only skips work; updated in place only by the build that creates it,
    never once its view is handed out.
    """

    settings: ClusterSettings
    registry: AlgorithmRegistry
    policy_set: PolicySet
    gpu_min_w: float
    largest_gpu_min_w: float
    node_docs: dict[int, tuple[KubeObject, ParsedNode]] = field(default_factory=dict)
    parsed_nodes: dict[str, ParsedNode] = field(default_factory=dict)
    pod_docs: dict[int, PodEntry] = field(default_factory=dict)
    bound_by_node: dict[str, tuple[BoundPod, ...]] = field(default_factory=dict)  # node -> pods drawing power on it
    bound_gpus: dict[str, int] = field(default_factory=dict)  # policy -> GPUs of its active pods bound to a node
    node_views: dict[str, NodeView] = field(default_factory=dict)
    rack_views: dict[str, RackView] = field(default_factory=dict)
    node_facts: dict[str, NodeFacts] = field(default_factory=dict)
    fresh_until: dict[str, datetime] = field(default_factory=dict)  # nodes with fresh telemetry: when it goes stale
    assumed_policies: dict[str, frozenset[str]] = field(default_factory=dict)  # node -> policies of its assumed pods
    # node -> (timestamp, inlet °C, rise °C/min): the sample the next trend is measured from
    trend_anchors: dict[str, tuple[datetime, float, float | None]] = field(default_factory=dict)


class ClusterView:
    """An immutable snapshot of the cluster at ``now``; see the module docstring.

    Members: ``now``, ``settings``, ``nodes``, ``racks``, ``policies`` (computed on first
    use), ``invalid_policies`` (key -> why), ``node_facts`` (name -> :class:`NodeFacts`),
    ``gpu_min_w`` (smallest GPU minimum limit seen), ``largest_gpu_min_w`` (largest),
    ``has_constraints``, ``warnings``;
    ``find_node``/``find_rack``/``find_facts`` (fast ``get`` of those mappings for hot loops),
    ``node(name)``, ``rack_of(name)``, ``telemetry_age_s(name)``, ``policy_for_pod(pod)``, ``bound_gpus(policy_key)``,
    ``pod_bound(pod_key)``,
    ``policy_view_for_pod(pod)``.
    """

    __slots__ = (
        "now", "settings", "nodes", "racks", "invalid_policies", "node_facts",
        "gpu_min_w", "largest_gpu_min_w", "has_constraints", "warnings", "_policies", "_bound_pods", "_bound_by_policy", "_state",
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
    _bound_pods: frozenset[str] | None
    _bound_by_policy: dict[str, dict[str, int]] | None
    _state: _State

    def __init__(self, *, now: datetime, state: _State, warnings: tuple[str, ...]) -> None:
        object.__setattr__(self, "now", now)
        object.__setattr__(self, "settings", state.settings)
        object.__setattr__(self, "nodes", MappingProxyType(state.node_views))
        object.__setattr__(self, "racks", MappingProxyType(state.rack_views))
        object.__setattr__(self, "invalid_policies", MappingProxyType(state.policy_set.invalid))
        object.__setattr__(self, "node_facts", MappingProxyType(state.node_facts))
        object.__setattr__(self, "gpu_min_w", state.gpu_min_w)
        object.__setattr__(self, "largest_gpu_min_w", state.largest_gpu_min_w)
        object.__setattr__(self, "has_constraints", any(
            limits.constrained and rack_id in state.rack_views for rack_id, limits in state.policy_set.rack_limits.items()
        ))
        object.__setattr__(self, "warnings", warnings)
        object.__setattr__(self, "_policies", None)
        object.__setattr__(self, "_bound_pods", None)
        object.__setattr__(self, "_bound_by_policy", None)
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
            state = self._state
            views = policy_views(state.policy_set.valid, state.pod_docs.values(), state.parsed_nodes.values(), state.bound_gpus)
            object.__setattr__(self, "_policies", MappingProxyType(views))
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
            return match_policy(self._state.policy_set.by_namespace, pod.namespace, pod.labels)
        namespace = (pod.get("metadata") or {}).get("namespace") or "default"
        return match_policy(self._state.policy_set.by_namespace, namespace, labels_of(pod))

    def telemetry_age_s(self, node_name: str) -> float | None:
        """How old the node's last readable telemetry is at ``now`` (None: unknown node or none)."""
        node = self.nodes.get(node_name)
        if node is None or node.telemetry is None:
            return None
        return max(0.0, node.telemetry.age_s(self.now))

    def bound_gpus(self, policy_key: str) -> int:
        """GPUs requested by a policy's active pods bound to a node."""
        return self._state.bound_gpus.get(policy_key, 0)

    def bound_gpus_by_node(self, policy_key: str) -> Mapping[str, int]:
        """GPUs requested by a policy's active pods bound to each node (node name -> GPUs;
        built for every policy on the first call, once per view)."""
        by_policy = self._bound_by_policy
        if by_policy is None:
            by_policy = {}
            for node, pods in self._state.bound_by_node.items():
                for facts, policy in pods:
                    if policy is not None and facts.gpus:
                        by_node = by_policy.setdefault(policy.key, {})
                        by_node[node] = by_node.get(node, 0) + facts.gpus
            object.__setattr__(self, "_bound_by_policy", by_policy)
        return MappingProxyType(by_policy.get(policy_key, {}))

    def starting_minimums_w(self, policy_key: str, counted_by_node: Mapping[str, int], floor_w: float = 0.0,
                            unknown_w: float | None = None) -> float:
        """What the policy's bound GPUs beyond ``counted_by_node`` (node -> GPUs already
        counted there) hold until they have an allocation: each at its node's largest GPU
        minimum (its telemetry), never under ``floor_w``; on a node whose telemetry lists no
        GPU, at ``unknown_w`` (default: the default minimum). A GPU starts at its own minimum
        whatever the budget says."""
        total_w = 0.0
        unknown_w = self.settings.default_gpu_min_w if unknown_w is None else unknown_w
        for node, gpus in self.bound_gpus_by_node(policy_key).items():
            missing = gpus - counted_by_node.get(node, 0)
            if missing > 0:
                node_view = self.find_node(node)
                node_min_w = (node_view.new_gpu_min_w if node_view is not None and node_view.power_capacity_w is not None
                              else unknown_w)
                total_w += missing * max(floor_w, node_min_w)
        return total_w

    def pod_bound(self, pod_key: str) -> bool:
        """Whether the view has the pod (``namespace/name``) active and bound to a node (the
        set of bound pods is built on the first call, once per view)."""
        bound = self._bound_pods
        if bound is None:
            bound = frozenset(facts.key for pods in self._state.bound_by_node.values() for facts, _ in pods)
            object.__setattr__(self, "_bound_pods", bound)
        return pod_key in bound

    def policy_view_for_pod(self, pod: KubeObject | PodFacts) -> PolicyView | None:
        policy = self.policy_for_pod(pod)
        return self.policies.get(policy.key) if policy is not None else None


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

    Steps: reuse or re-read the policies (any change to them, rare, rebuilds every pod,
    node and rack); apply the node and pod objects added or gone; mark the nodes a change
    reaches; recompute those nodes, then their racks and scoring facts.
    """
    settings = settings or ClusterSettings()
    old, registry = _reusable_state(previous, settings, registry)
    node_list, pod_list, policy_list = list(nodes), list(pods), list(policies)
    policy_set = _policy_set(policy_list, old, registry)
    full = old is None or policy_set is not old.policy_set
    added_nodes, removed_node_ids = _diff(node_list, old.node_docs if old is not None else {})
    added_pods, removed_pod_ids = _diff(pod_list, old.pod_docs if old is not None and not full else {})
    state = _carried_state(old, full, settings, registry, policy_set)
    dirty = _apply_node_changes(state, added_nodes, removed_node_ids)
    touched_policies: set[str] = set()
    _forget_pods(state, removed_pod_ids, dirty, touched_policies)
    _record_pods(state, added_pods, old.pod_docs if old is not None else {}, dirty, touched_policies)
    if full:
        dirty = set(state.parsed_nodes) | set(state.node_views)
    else:
        clock_went_back = previous is not None and now < previous.now
        _mark_reached_nodes(state, dirty, touched_policies, now, clock_went_back)
    racks_touched = _recompute_nodes(state, dirty, now)
    _recompute_racks(state, _rack_members(state, racks_touched, dirty, full), dirty)
    if full or added_nodes or removed_node_ids or old is None:
        state.gpu_min_w, state.largest_gpu_min_w = gpu_min_limits(state.parsed_nodes.values(), settings.default_gpu_min_w)
    warnings = cluster_warnings(state.rack_views, policy_set.rack_limits, policy_set.invalid)
    return ClusterView(now=now, state=state, warnings=warnings)


def _reusable_state(
    previous: ClusterView | None,
    settings: ClusterSettings,
    registry: AlgorithmRegistry | None,
) -> tuple[_State | None, AlgorithmRegistry]:
    """The previous build's state when it was read with the same settings and registry (else
    None: everything is read anew), and the registry to use (given, else the previous one's,
    else the built-in algorithms only)."""
    old = previous._state if previous is not None else None
    if old is not None and old.settings != settings:
        old = None  # the rack label or staleness changed: everything is read anew
    registry = registry or (old.registry if old is not None else AlgorithmRegistry.default(discover=lambda: []))
    if old is not None and old.registry is not registry:
        old = None
    return old, registry


def _policy_set(policy_list: list[KubeObject], old: _State | None, registry: AlgorithmRegistry) -> PolicySet:
    """The previous build's policies when the same documents (by identity) are listed; else
    the documents read anew (reusing the parse of each one seen before): a full rebuild."""
    if old is not None and set(map(id, policy_list)) == set(old.policy_set.documents):
        return old.policy_set
    return read_policies(policy_list, old.policy_set.documents if old is not None else {}, registry)


def _carried_state(
    old: _State | None,
    full: bool,
    settings: ClusterSettings,
    registry: AlgorithmRegistry,
    policy_set: PolicySet,
) -> _State:
    """The state a build starts from: copies of ``old``'s containers (its view is handed out
    and never changes). When ``full`` (the policies changed: every pod's policy and every
    rack's limits may have moved) pods, racks and scoring facts start empty; nodes, their
    views and trend samples are kept, and every node is recomputed."""
    state = _State(
        settings=settings,
        registry=registry,
        policy_set=policy_set,
        gpu_min_w=settings.default_gpu_min_w,
        largest_gpu_min_w=settings.default_gpu_min_w,
        bound_gpus=dict.fromkeys(policy_set.valid, 0),
    )
    if old is None:
        return state
    state.node_docs, state.parsed_nodes = dict(old.node_docs), dict(old.parsed_nodes)
    state.node_views, state.fresh_until = dict(old.node_views), dict(old.fresh_until)
    state.assumed_policies, state.trend_anchors = dict(old.assumed_policies), dict(old.trend_anchors)
    state.gpu_min_w, state.largest_gpu_min_w = old.gpu_min_w, old.largest_gpu_min_w
    if not full:
        state.pod_docs, state.bound_by_node = dict(old.pod_docs), dict(old.bound_by_node)
        state.bound_gpus = dict(old.bound_gpus)
        state.rack_views, state.node_facts = dict(old.rack_views), dict(old.node_facts)
    return state


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


def _apply_node_changes(state: _State, added: Iterable[KubeObject], removed_ids: Iterable[int]) -> set[str]:
    """Parse the Node objects new since the previous build and drop those gone (by ``id``);
    returns the names of the nodes they are (dirty)."""
    node_docs, parsed_nodes, settings = state.node_docs, state.parsed_nodes, state.settings
    dirty: set[str] = set()
    for node_id in removed_ids:
        parsed = node_docs.pop(node_id)[1]
        parsed_nodes.pop(parsed.name, None)
        dirty.add(parsed.name)
    for node in added:
        parsed = parse_node(node, settings)
        node_docs[id(node)] = (node, parsed)
        parsed_nodes[parsed.name] = parsed
        dirty.add(parsed.name)
    return dirty


def _forget_pods(state: _State, removed_ids: Iterable[int], dirty: set[str], touched_policies: set[str]) -> None:
    """Drop the pods gone since the previous build: from the pods drawing power on their node (marked dirty) and from their policy's bound GPUs (the
    policy marked touched: its per-GPU budget moves)."""
    pod_docs, bound_by_node, bound_gpus = state.pod_docs, state.bound_by_node, state.bound_gpus
    for pod_id in removed_ids:
        _, facts, policy = pod_docs.pop(pod_id)
        node_name = power_node(facts)
        if node_name is not None:
            bound_by_node[node_name] = tuple(b for b in bound_by_node[node_name] if b[0] is not facts)
            dirty.add(node_name)
            if policy is not None:
                bound_gpus[policy.key] -= facts.gpus
                touched_policies.add(policy.key)


def _record_pods(
    state: _State,
    added: Iterable[KubeObject],
    reusable: Mapping[int, PodEntry],
    dirty: set[str],
    touched_policies: set[str],
) -> None:
    """Add the pods new since the previous build (their facts reused from ``reusable`` for
    an object seen there): the policy of an active pod (first match by name in its
    namespace); a pod drawing power is added to its node
    (marked dirty) and its GPUs to its policy's bound GPUs (the policy marked touched)."""
    pod_docs, bound_by_node, bound_gpus = state.pod_docs, state.bound_by_node, state.bound_gpus
    by_namespace = state.policy_set.by_namespace
    for pod in added:
        cached = reusable.get(id(pod))
        facts = cached[1] if cached is not None and cached[0] is pod else pod_facts(pod)
        policy = match_policy(by_namespace, facts.namespace, facts.labels) if facts.active else None
        pod_docs[id(pod)] = (pod, facts, policy)
        node_name = power_node(facts)
        if node_name is not None:
            bound_by_node[node_name] = (*bound_by_node.get(node_name, ()), (facts, policy))
            dirty.add(node_name)
            if policy is not None:
                bound_gpus[policy.key] = bound_gpus.get(policy.key, 0) + facts.gpus
                touched_policies.add(policy.key)


def _mark_reached_nodes(state: _State, dirty: set[str], touched_policies: set[str], now: datetime, clock_went_back: bool) -> None:
    """Add to ``dirty`` the nodes a change reaches besides its own: nodes with assumed pods of
    a touched policy (per-GPU budget = powerCapLimit / bound GPUs moved), nodes whose fresh
    telemetry went stale (``fresh_until < now``), stale nodes (the age in their problem
    moves), and every node when the clock went back (every age moves)."""
    if touched_policies:
        dirty.update(n for n, keys in state.assumed_policies.items() if keys & touched_policies)
    dirty.update(n for n, until in state.fresh_until.items() if until < now)
    dirty.update(n for n, v in state.node_views.items() if v.telemetry_status is TelemetryStatus.STALE)
    if clock_went_back:
        dirty.update(state.node_views)  # the clock went back: ages are all different


def _recompute_nodes(state: _State, dirty: Iterable[str], now: datetime) -> set[str]:
    """Recompute the view of every dirty node (dropping those gone) with when its telemetry
    goes stale (``timestamp + stale_after_s``) and its assumed pods' policies; returns the
    racks the nodes were or are in."""
    node_views, fresh_until, assumed_policies = state.node_views, state.fresh_until, state.assumed_policies
    parsed_nodes, bound_by_node, bound_gpus = state.parsed_nodes, state.bound_by_node, state.bound_gpus
    settings, trend_anchors = state.settings, state.trend_anchors
    stale_after = timedelta(seconds=settings.stale_after_s)
    racks_touched: set[str] = set()
    for name in dirty:
        before = node_views.pop(name, None)
        if before is not None and before.rack_id is not None:
            racks_touched.add(before.rack_id)
        fresh_until.pop(name, None)
        assumed_policies.pop(name, None)
        parsed = parsed_nodes.get(name)
        if parsed is None:
            trend_anchors.pop(name, None)
            continue
        view, assumed_keys = node_view(parsed, bound_by_node.get(name, ()), bound_gpus, now, settings, trend_anchors)
        node_views[name] = view
        if parsed.rack_id is not None:
            racks_touched.add(parsed.rack_id)
        until = reading_fresh_until(view, stale_after)
        if until is not None:
            fresh_until[name] = until
        if assumed_keys:
            assumed_policies[name] = assumed_keys
    return racks_touched


def _rack_members(state: _State, racks_touched: Iterable[str], dirty: set[str], full: bool) -> dict[str, list[NodeView]]:
    """The node views of each touched rack: on a full build from every node; else from the
    rack's previous members and the dirty nodes (a node may have moved in or out)."""
    members_of: dict[str, list[NodeView]] = {rack_id: [] for rack_id in racks_touched}
    node_views = state.node_views
    if full:
        for view in node_views.values():
            if view.rack_id in members_of:
                members_of[view.rack_id].append(view)
        return members_of
    for rack_id, members in members_of.items():
        before_rack = state.rack_views.get(rack_id)
        names = set(before_rack.nodes if before_rack is not None else ()) | dirty
        members.extend(v for v in map(node_views.get, names) if v is not None and v.rack_id == rack_id)
    return members_of


def _recompute_racks(state: _State, members_of: Mapping[str, list[NodeView]], dirty: Iterable[str]) -> None:
    """Rebuild each touched rack's view (drop a rack left without nodes) and its members'
    scoring facts; then the scoring facts of the dirty nodes without a rack (drop those gone)."""
    rack_views, node_facts, limits = state.rack_views, state.node_facts, state.policy_set.rack_limits
    for rack_id, members in members_of.items():
        if members:
            rack = rack_view(rack_id, members, limits.get(rack_id, RackLimits()))
            rack_views[rack_id] = rack
            for member in members:
                node_facts[member.name] = scoring_facts(member, rack)
        else:
            rack_views.pop(rack_id, None)
    for name in dirty:
        view = state.node_views.get(name)
        if view is None:
            node_facts.pop(name, None)
        elif view.rack_id is None:
            node_facts[name] = scoring_facts(view, None)
