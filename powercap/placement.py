"""Placement decisions: which candidate nodes a GPU pod may go to, and how good each one is.

Pure functions of a :class:`~powercap.cluster.ClusterView` and the pod; the extender only
translates kube-scheduler's wire format around them.

**Filter** (:func:`filter_nodes`). A pod is *covered* when it requests at least one GPU
and an ``Enforce`` policy's selector matches it. Everything else passes every node
untouched. For a covered pod with estimate ``E`` W (:func:`powercap.cluster.estimate_pod_power_w`),
a candidate node in a constrained rack fails when

- the rack has a node that needs telemetry and has no fresh one (``stale_telemetry``; the
  default is to fail closed: the rack's power is unknown, and a rack power limit protects a
  breaker) -- this check comes first, since the other two read that telemetry;
- ``rackInlet >= maxTemperature`` (``temperature``);
- ``rackPower + E > maxPower``, rackPower = the whole rack's power: its nodes' GPUs
  measured + the power beside them (measured from the node's whole-node reading, or
  estimated: :mod:`powercap.cluster`) + assumed (``power``); exactly at the limit passes.
  In a rack with a node whose power beside the GPUs is measured, the pod counts
  ``E x (1 + rise)`` (``--non-gpu-rise``, 0.3: its GPUs' load raises the power beside
  them too); elsewhere ``E`` (an estimated figure is meant for full load).

Nodes in no rack, or in a rack no Enforce policy limits, pass. A node the view does not know
(added a moment ago) fails while any rack is constrained, since its rack is unknown.
When the policy cannot power another GPU at all,
``(policy's bound GPUs + pod's GPUs) x smallest GPU minimum limit > budget`` (the budget
the controller shares out: powerCapLimit less the default margin, or the ``status.budgetW``
it published when smaller), every node fails as unresolvable
(``infeasible_policy``): no node, and no preemption of other workloads, can help; the fix
is a larger powerCapLimit or fewer replicas. When it can, but the allocations the
controller published leave less than the pod's GPUs' minimums free,
``allocated + (bound GPUs without an allocation) x minimum + pod's GPUs x minimum > budget``,
every node fails, resolvably (``budget``): a new GPU starts at its minimum on top of the
caps in force, so placing it now would lift their sum above the budget. ``allocated``
comes from ``PlacementRequest.allocated_w``; the minimums of pods passed a moment ago and
not yet bound, from ``PlacementRequest.admitted_w`` (how the extender and the controller
take turns on a scale-up: docs/architecture.md).

Reasons are per rack, so kube-scheduler's summary ("0/12 nodes are available: 4 rack-1:
...") groups the nodes of one rack into one line.

**Prioritize** (:func:`prioritize_nodes`). Covered pods are scored by their policy's
algorithm (``spec.customAlgorithm``, default ``headroom``), clamped to 0..10 and rounded
half up; an algorithm that raises, is unknown, or returns anything but one finite number
per node is replaced by ``headroom`` with a log line. Other pods score 0 everywhere, which
leaves kube-scheduler's own ranking unchanged.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple, TypeGuard

from powercap.algorithms import (
    DEFAULT_ALGORITHM,
    MAX_SCORE,
    AlgorithmRegistry,
    Candidate,
    Headroom,
    NodeFacts,
    PlacementAlgorithm,
)
from powercap.allocation import AllocationSettings, budget_w
from powercap.cluster import BUDGET_REFUSAL, ClusterView, RackView, estimate_pod_power_w, pod_facts, rack_rise
from powercap.numeric import counted, is_finite_number
from powercap.objects import KubeObject
from powercap.policies import Policy
from powercap.status import published_gpus

log = logging.getLogger(__name__)


class RejectReason(str, Enum):
    """Why a node was rejected; the bounded label values of the rejection metric."""

    POWER = "power"
    TEMPERATURE = "temperature"
    STALE_TELEMETRY = "stale_telemetry"
    INFEASIBLE_POLICY = "infeasible_policy"
    BUDGET = "budget"


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """The pod being placed, read once per call."""

    pod_key: str
    gpus: int
    power_annotation_w: float | None
    policy: Policy | None
    bound_gpus: int = 0  # GPUs the policy's pods already hold
    allocated_w: float = 0.0  # the policy's published allocations: watts ...
    allocated_gpus: int = 0  # ... and the GPUs they name (see published_totals)
    starting_w: float = 0.0  # minimums of the bound GPUs no allocation names yet (see placement_request)
    admitted_w: float = 0.0  # minimums of the policy's pods this filter passed that the view shows pending still

    @property
    def covered(self) -> bool:
        """Requests a GPU and is matched by an Enforce policy (only these are ever filtered)."""
        return self.gpus > 0 and self.policy is not None and self.policy.enforced

    @property
    def scored(self) -> bool:
        """Requests a GPU and is matched by a policy (Observe too: scores only advise)."""
        return self.gpus > 0 and self.policy is not None

    def estimate_w(self, node_gpu_max_w: float) -> float:
        """This pod's power on a node whose GPUs max out at ``node_gpu_max_w`` (see cluster)."""
        service_gpus = self.bound_gpus + self.gpus
        return estimate_pod_power_w(self.gpus, self.power_annotation_w, self.policy, service_gpus, node_gpu_max_w)


class Published(NamedTuple):
    """What a policy's status publishes, read once per status (:func:`published_totals`)."""

    watts: float  # the allocations' watts
    gpus: int  # the GPUs they name (each UUID once)
    gpus_by_node: Mapping[str, int]  # ... per node


PublishedTotals = Callable[[Policy], Published]


def placement_request(view: ClusterView, pod: KubeObject, totals: PublishedTotals | None = None) -> PlacementRequest:
    """The pod's facts, its policy and what that policy holds; ``totals`` reads the policy's
    published allocations (:func:`published_totals`, or a caller's memo of it).

    ``starting_w``: the policy's bound GPUs that no published allocation names (pods started
    since the controller's last round) run at their minimum, each at the largest minimum of
    its own node's GPUs (:meth:`ClusterView.starting_minimums_w`): a batch service on 100 W
    GPUs counts its starting GPUs at 100 W, not at the 200 W of another service's nodes. On
    a node whose telemetry lists no GPU, at the largest minimum seen.
    """
    facts = pod_facts(pod)
    policy = view.policy_for_pod(facts) if facts.gpus > 0 else None
    if policy is None:
        return PlacementRequest(pod_key=facts.key, gpus=facts.gpus, power_annotation_w=facts.power_annotation_w, policy=None)
    published = (totals or published_totals)(policy)
    return PlacementRequest(
        pod_key=facts.key,
        gpus=facts.gpus,
        power_annotation_w=facts.power_annotation_w,
        policy=policy,
        bound_gpus=view.bound_gpus(policy.key),
        allocated_w=published.watts,
        allocated_gpus=published.gpus,
        starting_w=view.starting_minimums_w(policy.key, published.gpus_by_node, unknown_w=view.largest_gpu_min_w),
    )


@dataclass(frozen=True)
class FilterOutcome:
    """Nodes that pass (in request order), nodes that fail and why, and rejection counts."""

    passed: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    unresolvable: dict[str, str] = field(default_factory=dict)
    rejections: Counter[RejectReason] = field(default_factory=Counter)


def format_watts(watts: float) -> str:
    """``4800`` for whole watts, ``4800.4`` otherwise, so a message never reads 5000 > 5000."""
    return f"{watts:.0f}" if abs(watts - round(watts)) < 0.05 else f"{watts:.1f}"


def policy_budget_w(policy: Policy) -> int:
    """The budget the controller shares out: the ``status.budgetW`` it published for the
    policy's current spec (``status.observedGeneration`` is the policy's generation: a
    controller run with any ``--margin``); while the spec is newer than the status (the cap
    was just changed), the smaller of that and ``powerCapLimit`` less the default margin;
    ``powerCapLimit`` less the default margin before the first status. Never above
    ``powerCapLimit``."""
    default = budget_w(policy.power_cap_w, AllocationSettings.margin)
    status = policy.status or {}
    published = status.get("budgetW")
    if not _finite_watts(published):
        return default
    observed = status.get("observedGeneration")
    if isinstance(observed, int) and not isinstance(observed, bool) and observed == policy.generation:
        return min(int(published), budget_w(policy.power_cap_w, 0.0))
    return min(default, int(published))


def infeasible_reason(request: PlacementRequest, gpu_min_w: float) -> str | None:
    """Why the pod's policy cannot power another GPU at all, or None.

    Infeasible when ``(boundGpus + podGpus) x gpuMinW > budget``: even with every GPU of
    the service at its minimum limit the budget would be exceeded (the controller would
    find the policy infeasible and hold every GPU at its minimum).
    """
    policy = request.policy
    if policy is None or request.gpus <= 0:
        return None
    bound = request.bound_gpus
    needed_w = (bound + request.gpus) * gpu_min_w
    budget = policy_budget_w(policy)
    if needed_w <= budget:
        return None
    return (
        f"policy {policy.key} cannot power another GPU: ({counted(bound, 'GPU')} in use + {request.gpus} for this pod) "
        f"x {format_watts(gpu_min_w)} W minimum limit = {format_watts(needed_w)} W > its budget {budget} W "
        + ("(the whole powerCapLimit)" if budget >= budget_w(policy.power_cap_w, 0.0)
           else f"(powerCapLimit {policy.power_cap_w} W less the controller's margin)")
    )


def budget_room_rejection(request: PlacementRequest, pod_gpu_min_w: float) -> str | None:
    """Why the pod must wait for the controller to free its GPUs' minimums, or None.

    ``allocated + starting + admitted + podGpus x podGpuMinW > budget``, where ``allocated``
    is the sum of the published allocations, ``starting`` the minimums of the bound GPUs
    beyond those allocated (pods started since the last round, each GPU at its node's
    minimum: :attr:`PlacementRequest.starting_w`), ``admitted`` the minimums of the pods
    this extender let through that the view shows pending still, and ``podGpuMinW`` what
    the pod's GPUs start at on the node judged.
    """
    policy = request.policy
    if policy is None or request.gpus <= 0:
        return None
    allocated_w = request.allocated_w
    budget = policy_budget_w(policy)
    waiting_w = request.starting_w
    needed_w = request.gpus * pod_gpu_min_w
    if allocated_w + waiting_w + request.admitted_w + needed_w <= budget:
        return None
    held = f"{format_watts(allocated_w)} W allocated"
    if waiting_w:
        held += f" + {format_watts(waiting_w)} W for GPUs of starting pods"
    if request.admitted_w:
        held += f" + {format_watts(request.admitted_w)} W for pods placed a moment ago"
    return (
        f"policy {policy.key} {BUDGET_REFUSAL}: {held} + {request.gpus} x "
        f"{format_watts(pod_gpu_min_w)} W minimum for this pod > its budget {budget} W; the budget controller "
        "frees it in its next round, then kube-scheduler retries the pod"
    )


def published_totals(policy: Policy) -> Published:
    """Watts and GPUs of the allocations in the policy's status, and the GPUs per node (each
    UUID once, its watts the last entry's as :func:`~powercap.status.published_allocations`
    reads them, its node the first naming it).

    A node entry without a ``gpus`` list counts its ``watts`` (its agent splits them over
    the policy's GPUs there) and no GPU: the GPUs it covers are unknown here, so they are
    counted again among the bound GPUs without an allocation, on the safe side."""
    status = policy.status
    if not status:
        return Published(0.0, 0, {})
    watts_of: dict[str, float] = {}
    node_of: dict[str, str] = {}  # each UUID on the first node naming it
    for node, uuid, watts in published_gpus(status):
        watts_of[uuid] = watts
        if node is not None:
            node_of.setdefault(uuid, node)
    node_only_w = [
        float(entry["watts"]) for entry in status.get("allocations") or ()
        if isinstance(entry, Mapping) and not entry.get("gpus") and _finite_watts(entry.get("watts"))
    ]
    return Published(math.fsum([*watts_of.values(), *node_only_w]), len(watts_of), Counter(node_of.values()))


def _finite_watts(value: object) -> TypeGuard[float]:
    return is_finite_number(value) and value >= 0


def rack_in_use(rack: RackView) -> str:
    """``4301 W in use (incl. 1200 W beside the GPUs, estimated on 2 nodes, and 700 W assumed
    for 1 pod bound since the last telemetry)``: the rack's whole power and the parts a
    person would question; just ``4301 W in use`` when it is all GPU power measured."""
    parts = []
    if rack.non_gpu_power_w > 0:
        beside = f"{format_watts(rack.non_gpu_power_w)} W beside the GPUs"
        if rack.estimated_nodes:
            beside += f", estimated on {counted(len(rack.estimated_nodes), 'node')}"
        parts.append(beside)
    if rack.assumed_power_w > 0:
        parts.append(f"{format_watts(rack.assumed_power_w)} W assumed for {counted(len(rack.assumed_pods), 'pod')} "
                     "bound since the last telemetry")
    details = f" (incl. {', and '.join(parts)})" if parts else ""
    return f"{format_watts(rack.power_w)} W in use{details}"


def pod_in_rack(estimate_w: float, rise: float) -> tuple[float, str]:
    """What a pod adds to a rack: its GPUs' ``estimate_w`` plus ``rise x estimate_w`` beside
    them (:func:`powercap.cluster.rack_rise`), and the words for it."""
    if rise <= 0:
        return estimate_w, f"{format_watts(estimate_w)} W for this pod"
    beside_w = rise * estimate_w
    return estimate_w + beside_w, (
        f"{format_watts(estimate_w + beside_w)} W for this pod ({format_watts(estimate_w)} W on its GPUs + "
        f"{format_watts(beside_w)} W beside them)"
    )


def rack_rejection(rack: RackView, estimate_w: float, rise: float = 0.0) -> tuple[str, tuple[RejectReason, ...]] | None:
    """Why a pod with estimate ``estimate_w`` may not go into ``rack``, or None when it may;
    ``rise``: the rack's :func:`powercap.cluster.rack_rise` (the pod's GPUs raise the power
    beside them too).

    Stale or missing telemetry in the rack alone is reported (the figures it would be
    checked against are unknown); otherwise every limit passed is reported, joined by "; ".
    """
    if rack.telemetry_problem is not None:
        return f"{rack.rack_id}: {rack.telemetry_problem}", (RejectReason.STALE_TELEMETRY,)
    limits = rack.limits
    problems: list[str] = []
    reasons: list[RejectReason] = []
    inlet_c = rack.inlet_temperature_c
    if limits.max_temperature_c is not None and inlet_c is not None and inlet_c >= limits.max_temperature_c:
        problems.append(
            f"{rack.rack_id}: inlet {inlet_c:g} °C >= maxTemperature {limits.max_temperature_c:g} °C "
            f"(set by policy {limits.max_temperature_policy})"
        )
        reasons.append(RejectReason.TEMPERATURE)
    pod_w, pod_words = pod_in_rack(estimate_w, rise)
    if limits.max_power_w is not None and rack.power_w + pod_w > limits.max_power_w:
        problems.append(
            f"{rack.rack_id}: {rack_in_use(rack)} + {pod_words} > maxPower {limits.max_power_w} W "
            f"(set by policy {limits.max_power_policy})"
        )
        reasons.append(RejectReason.POWER)
    if not problems:
        return None
    return "; ".join(problems), tuple(reasons)


def filter_nodes(view: ClusterView, pod: KubeObject | PlacementRequest, node_names: Sequence[str]) -> FilterOutcome:
    """Split ``node_names`` into passing and failing nodes for ``pod`` (see the module doc).

    Cost: O(len(node_names)) dictionary lookups; the rack checks run once per distinct
    (rack, GPU maximum) pair.
    """
    request = pod if isinstance(pod, PlacementRequest) else placement_request(view, pod)
    if not request.covered:
        return FilterOutcome(passed=list(node_names))
    infeasible = infeasible_reason(request, view.gpu_min_w)
    if infeasible is not None:
        unresolvable = dict.fromkeys(node_names, infeasible)
        return FilterOutcome(
            passed=[], unresolvable=unresolvable,
            rejections=Counter({RejectReason.INFEASIBLE_POLICY: len(unresolvable)}),
        )
    no_room = budget_room_rejection(request, view.gpu_min_w)
    if no_room is not None:
        return FilterOutcome(
            passed=[], failed=dict.fromkeys(node_names, no_room),
            rejections=Counter({RejectReason.BUDGET: len(node_names)}),
        )
    failed: dict[str, str] = {}
    rejections: Counter[RejectReason] = Counter()
    if view.largest_gpu_min_w > view.gpu_min_w and budget_room_rejection(request, view.largest_gpu_min_w) is not None:
        # room for the pod's GPUs at the cheapest minimum, not at every node's: judge each node
        node_names = _nodes_with_room(view, request, node_names, failed)
        rejections[RejectReason.BUDGET] = len(failed)
    if not view.has_constraints:
        return FilterOutcome(passed=list(node_names), failed=failed, rejections=rejections)

    passed: list[str] = []
    # (rack, GPU maximum) -> None (pass) or (reason, reasons); racks without limits pass
    checked: dict[tuple[str | None, float], tuple[str, tuple[RejectReason, ...]] | None] = {}
    find_node, find_rack = view.find_node, view.find_rack
    for name in node_names:
        node = find_node(name)
        if node is None:
            failed[name] = f"node {name} is not in the power-aware extender's view yet (rack and telemetry unknown)"
            rejections[RejectReason.STALE_TELEMETRY] += 1
            continue
        key = (node.rack_id, node.gpu_max_w)
        try:
            rejection = checked[key]
        except KeyError:
            rack = find_rack(node.rack_id) if node.rack_id is not None else None
            constrained = rack is not None and rack.limits.constrained
            rejection = checked[key] = (
                rack_rejection(rack, request.estimate_w(node.gpu_max_w), rack_rise(rack, view.settings))  # type: ignore[arg-type]
                if constrained else None
            )
        if rejection is None:
            passed.append(name)
        else:
            failed[name] = rejection[0]
            rejections.update(rejection[1])
    return FilterOutcome(passed=passed, failed=failed, rejections=rejections)


def _nodes_with_room(view: ClusterView, request: PlacementRequest, node_names: Sequence[str], failed: dict[str, str]) -> list[str]:
    """The nodes where the budget leaves room for the pod's GPUs at their minimum there (a
    node the view does not know: the largest minimum seen); the others go into ``failed``."""
    room: list[str] = []
    by_minimum: dict[float, str | None] = {}
    find_node, unknown_w = view.find_node, view.largest_gpu_min_w
    for name in node_names:
        node = find_node(name)
        minimum_w = node.new_gpu_min_w if node is not None else unknown_w
        try:
            rejection = by_minimum[minimum_w]
        except KeyError:
            rejection = by_minimum[minimum_w] = budget_room_rejection(request, minimum_w)
        if rejection is None:
            room.append(name)
        else:
            failed[name] = rejection
    return room


def prioritize_nodes(
    view: ClusterView,
    pod: KubeObject | PlacementRequest,
    node_names: Sequence[str],
    registry: AlgorithmRegistry,
) -> list[tuple[str, int]]:
    """``(node, score 0..10)`` for each of ``node_names``, in order (see the module doc)."""
    request = pod if isinstance(pod, PlacementRequest) else placement_request(view, pod)
    if not request.scored or request.policy is None:
        return [(name, 0) for name in node_names]
    choice = request.policy.algorithm
    estimates: dict[float, float] = {}
    candidates: list[Candidate] = []
    find_facts, default_max_w = view.find_facts, view.settings.default_gpu_max_w
    for name in node_names:
        facts = find_facts(name) or NodeFacts(name=name, gpu_max_w=default_max_w)
        try:
            estimate_w = estimates[facts.gpu_max_w]
        except KeyError:
            estimate_w = estimates[facts.gpu_max_w] = request.estimate_w(facts.gpu_max_w)
        candidates.append(Candidate(facts, estimate_w))
    scores = _score_with_fallback(registry.get(choice.name), choice.name, choice.parameters, candidates, request.pod_key)
    # clamp to 0..10 and round half up (int() truncates, and the value is >= 0)
    top = float(MAX_SCORE)
    return [(name, int(min(top, max(0.0, score)) + 0.5)) for name, score in zip(node_names, scores)]


def _score_with_fallback(
    algorithm: PlacementAlgorithm | None,
    name: str,
    parameters: Mapping[str, object],
    candidates: Sequence[Candidate],
    pod_key: str,
) -> Sequence[float]:
    if algorithm is not None:
        try:
            scores = list(algorithm.score(candidates, algorithm.effective_parameters(parameters)))
            if len(scores) != len(candidates):
                raise ValueError(f"returned {counted(len(scores), 'score')} for {counted(len(candidates), 'node')}")
            if not math.isfinite(math.fsum(scores)):  # fsum raises TypeError on a non-number
                raise ValueError("returned a score that is not a finite number")
            return scores
        except Exception as error:  # a plugin's bug must not fail the scheduling attempt
            problem = f"{type(error).__name__}: {error}"
    else:
        problem = "not registered in this extender"
    log.warning(
        "placement algorithm %s failed; scoring with %s instead: %s", name, DEFAULT_ALGORITHM, problem,
        extra={"algorithm": name, "pod": pod_key, "error": problem},
    )
    return Headroom().score(candidates, {})
