"""One round of the budget controller, pure: cluster view in, allocations and statuses out.

:func:`plan_round` reads a :class:`~powercap.cluster.ClusterView` (the policies with the
status stored on each, node telemetry, racks) and returns, per policy, the allocation and
the status to store. ``powercap controller`` runs it every few seconds and writes what
changed; ``powercap controller --cluster-state FILE --once`` prints it.

Inputs of the allocation (:mod:`powercap.allocation`), per policy:

- its GPUs: those node telemetry attributes to its pods (``gpus[].pod``), with their
  power, limit and NVML range; a GPU on a node whose telemetry is stale is *held*; its
  previous cap is the one in the policy's stored ``status.allocations``; a GPU still
  reporting a limit above its allocation a round after it was first seen there (its
  setter fails, a reset restored its default, its agent is stuck: lagging in this round
  and the one before) is counted at the limit it reports, which is what is in force, so
  that the other GPUs of the service and of its rack, wherever they run, share only what is
  left (its own agent can make room only among its node's GPUs); its published allocation
  stays as it was, so the status goes on naming it lagging;
- ``reserved_w``: GPUs its bound pods requested that no telemetry lists yet (a pod just
  started) run at their minimum until their agent reports them:
  each bound GPU no telemetry lists yet at the largest minimum of its node's GPUs, never
  under the largest minimum among the service's GPUs (the default minimum when none
  reports); and the GPUs of its pending pods that the extender refused
  for want of budget (kube-scheduler says so in the pod's PodScheduled condition; a pod
  pending for another reason, such as no free GPU, reserves nothing), as many as the
  budget can hold beside the bound GPUs' minimums (:func:`reservable_waiting_gpus`), so
  that a new GPU starting at its minimum never lifts the caps' sum above the budget (the
  scale-up hand-off with the extender: docs/architecture.md);
- racks: every rack with a ``maxPower`` (the strictest over Enforce policies), with
  ``unmanaged_power_w = rack power - measured power of the GPUs allocated in it``, where
  rack power is the whole rack's (:mod:`powercap.cluster`: GPUs measured + the power
  beside them + assumed power). The power beside the GPUs (CPUs, fans, supplies) is thus
  unmanaged power: the fill gives the GPUs ``maxPower - unmanaged``, and when it rises
  the caps come down.

The status's ``ratio`` (:func:`service_ratio`) is the service's generated tokens per
joule: ``sum of tokensPerSecond / sum of powerW`` over its GPUs with fresh telemetry that
report tokens/s (a pod without a metrics endpoint neither adds tokens nor dilutes the
ratio with its power); absent when none does.

``Observe`` policies are allocated in a second pass, after the ``Enforce`` ones: their
GPUs are not capped, so for the Enforce pass they are ordinary load (measured power); for
their own pass the Enforce GPUs count at their new caps. An Observe policy thus reports
the caps it would get if it were enforced, and never takes rack power from an enforced one.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from datetime import datetime
from types import MappingProxyType
from typing import Any

from powercap.allocation import (
    Allocation,
    AllocationSettings,
    Bound,
    budget_w,
    GpuState,
    RackAllocation,
    RackLimit,
    Service,
    ServiceAllocation,
    allocate,
)
from powercap.cluster import ClusterView, PolicyView, RackView, rack_rise
from powercap.policies import Mode, Policy
from powercap.telemetry import GpuTelemetry
from powercap.status import (
    ENFORCED,
    LaggingGpu,
    RackReading,
    StatusInputs,
    find_lagging,
    published_allocations,
    render_status,
    stored_reason,
)


FOLLOW_UP_S = 1.5
"""How soon a round follows one that postponed raises (:attr:`RoundPlan.follow_up`): the
agents tick every second and publish a lowered limit at once."""

QUEUE_ROUND_S = 1.0
"""How soon after the last round ends one runs when a node's first queue forms
(the agents publish that at once): the queued GPU takes the surplus first
(:mod:`powercap.allocation`, step 4), seconds before a whole interval would have passed. At
most one such round a second, however many queues form."""

@dataclass(frozen=True)
class PolicyPlan:
    """What one round decided for a policy: its caps, what it measured, the status to store."""

    policy: Policy
    allocation: ServiceAllocation
    inputs: StatusInputs
    status: Mapping[str, Any]
    lagging: frozenset[str] = frozenset()  # UUIDs seen above their allocation this round
    published_before: Mapping[str, float] | None = field(default=None, compare=False, repr=False)
    """The stored status's allocations as the round read them (``published_allocations``), or
    None to read them again."""

    @property
    def changed(self) -> bool:
        """Whether ``status`` differs from the status stored on the policy."""
        return dict(self.status) != dict(self.policy.status)

    @cached_property
    def allocations_changed(self) -> bool:
        """Whether ``status`` changes the watts published for any GPU: its ``allocations``
        are ``allocation``'s caps (:func:`~powercap.status.allocations_field`), compared with
        the stored status's without parsing the new one (10,000 GPUs: 35 ms a round)."""
        before = self.published_before if self.published_before is not None else published_allocations(self.policy.status)
        return {cap.uuid: float(cap.cap_w) for cap in self.allocation.caps} != before


@dataclass(frozen=True)
class RoundPlan:
    now: datetime
    policies: Mapping[str, PolicyPlan] = field(default_factory=lambda: MappingProxyType({}))
    racks: Mapping[str, RackAllocation] = field(default_factory=lambda: MappingProxyType({}))

    @cached_property
    def follow_up_keys(self) -> frozenset[str]:
        """The policies whose status to write changes their allocations and postpones raises
        until lowered caps are in force (allocation step 6). The agents apply and publish such
        lowers within a tick or two; a round soon after (:data:`FOLLOW_UP_S`) spends the watts
        they freed instead of leaving them unspent for a whole interval. A status that changes
        only what was measured, or a round that writes nothing (a lower not reported yet, an
        agent that never applies it), asks for none."""
        return frozenset(
            key for key, plan in self.policies.items()
            if any(cap.bound is Bound.TRANSITION for cap in plan.allocation.caps)
            and plan.changed and plan.allocations_changed
        )

    @property
    def follow_up(self) -> bool:
        """Whether the next round should come early: some status to write postpones raises
        (:attr:`follow_up_keys`)."""
        return bool(self.follow_up_keys)


def plan_round(
    view: ClusterView,
    settings: AllocationSettings | None = None,
    *,
    lagging_before: Mapping[str, Collection[str]] | None = None,
) -> RoundPlan:
    """Allocations and statuses for every valid policy of ``view``, at ``view.now``.

    ``lagging_before``: per policy key, the GPUs found lagging in the previous round. When
    given, a GPU is reported lagging only when it lagged in both rounds (its agent has had a
    whole round to apply the allocation); when None (a one-off run), every lagging GPU is. A
    policy missing from it (no round yet in this process) keeps a stored ``AgentsLagging``.
    """
    settings = settings or AllocationSettings()
    published = {key: published_allocations(policy_view.policy.status) for key, policy_view in view.policies.items()}
    unreported_w = {key: _unreported_minimums_w(policy_view, view) for key, policy_view in view.policies.items()}
    waiting = {key: reservable_waiting_gpus(policy_view, view, settings.margin, unreported_w[key])
               for key, policy_view in view.policies.items()}
    lagging = {key: _lagging_now(policy_view, view, published[key]) for key, policy_view in view.policies.items()}
    stuck = {key: _stuck(gpus, None if lagging_before is None else lagging_before.get(key)) for key, gpus in lagging.items()}
    services = {key: _service(policy_view, view, published[key], unreported_w[key], waiting[key], stuck[key])
                for key, policy_view in sorted(view.policies.items())}
    enforce = [s for key, s in services.items() if view.policies[key].policy.mode is Mode.ENFORCE]
    observe = [s for key, s in services.items() if view.policies[key].policy.mode is Mode.OBSERVE]
    at_limit = frozenset().union(*stuck.values())
    first = allocate(enforce, _rack_limits(view, enforce, counted_at_caps=None, at_limit=at_limit), settings)
    second = Allocation()
    if observe:
        second = allocate(observe, _rack_limits(view, [*enforce, *observe], counted_at_caps=first, at_limit=at_limit), settings)
    allocations = {key: _published_for_stuck(allocation, published[key], stuck[key])
                   for key, allocation in {**first.services, **second.services}.items()}
    racks = {**second.racks, **first.racks}  # the enforced figures win for racks in both
    plans = {}
    for key, policy_view in sorted(view.policies.items()):
        before = None if lagging_before is None else lagging_before.get(key, _unknown_lagging(policy_view.policy))
        plans[key] = _plan(policy_view, allocations[key], racks, view, settings, before, waiting[key], lagging[key], published[key])
    return RoundPlan(now=view.now, policies=MappingProxyType(plans), racks=MappingProxyType(racks))


def _unknown_lagging(policy: Policy) -> Collection[str] | None:
    """``lagging_before`` for a policy with no previous round in this process (a new leader, a
    restart): None (report lagging GPUs at once) when the stored status already says
    ``AgentsLagging``, so that a takeover does not flip Enforced to AllocationApplied and back
    (two Events for nothing); else none lagged."""
    return None if stored_reason(policy.status, ENFORCED) == "AgentsLagging" else ()


def reservable_waiting_gpus(policy_view: PolicyView, view: ClusterView, margin: float, unreported_w: float) -> int:
    """How many of the GPUs waiting for budget the budget can keep a minimum free for, beside
    the minimums of its bound GPUs (their own for those telemetry lists, the new-GPU minimum
    each for the rest, ``unreported_w``: :func:`_unreported_minimums_w`). Pods beyond that
    cannot be placed anyway (the extender says so)."""
    minimum_w = _new_gpu_minimum_w(policy_view, view)
    if policy_view.budget_waiting_gpus <= 0 or minimum_w <= 0:
        return 0
    reported_min_w = sum(g.gpu.min_w for g in policy_view.gpus)
    room_w = budget_w(policy_view.policy.power_cap_w, margin) - reported_min_w - unreported_w
    return max(0, min(policy_view.budget_waiting_gpus, int(room_w // minimum_w)))


def _lagging_now(policy_view: PolicyView, view: ClusterView, published: Mapping[str, float]) -> tuple[LaggingGpu, ...]:
    """The policy's GPUs with fresh telemetry reporting a limit above their published allocation."""
    fresh = [g for g in policy_view.gpus if (node := view.nodes.get(g.node)) is not None and node.fresh]
    return find_lagging(((g.node, g.gpu.uuid, g.gpu.limit_w) for g in fresh), published)


def _stuck(lagging: tuple[LaggingGpu, ...], lagging_before: Collection[str] | None) -> frozenset[str]:
    """The GPUs lagging now that lagged in this process's round before too; none without a
    round before (a one-off run, a new leader: its next round judges them)."""
    if lagging_before is None:
        return frozenset()
    return frozenset(g.uuid for g in lagging if g.uuid in lagging_before)


def _published_for_stuck(allocation: ServiceAllocation, published: Mapping[str, float], stuck: frozenset[str]) -> ServiceAllocation:
    """A stuck GPU was counted at its limit; what is published for it stays its allocation."""
    if not stuck:
        return allocation
    caps = tuple(c._replace(cap_w=math.floor(published[c.uuid])) if c.uuid in stuck and c.uuid in published else c
                 for c in allocation.caps)
    return replace(allocation, caps=caps)


def _service(policy_view: PolicyView, view: ClusterView, published: Mapping[str, float], unreported_w: float,
             waiting_gpus: int, stuck: Collection[str] = ()) -> Service:
    gpus = []
    for entry in policy_view.gpus:
        node = view.nodes.get(entry.node)
        gpu = entry.gpu
        counted_at_limit = gpu.uuid in stuck
        gpus.append(GpuState(
            uuid=gpu.uuid, node=entry.node, rack=node.rack_id if node is not None else None,
            min_w=gpu.min_w, max_w=gpu.max_w, power_w=gpu.power_w, limit_w=gpu.limit_w,
            # held (not fresh) at the limit in force: neither raised nor lowered by the fill
            previous_w=min(math.ceil(gpu.limit_w), math.floor(gpu.max_w)) if counted_at_limit else published.get(gpu.uuid),
            fresh=node is not None and node.fresh and not counted_at_limit, tokens_s=gpu.tokens_s,
            requests_waiting=gpu.requests_waiting, raised_to_w=gpu.raised_to_w,
        ))
    reserved_w = unreported_w + waiting_gpus * _new_gpu_minimum_w(policy_view, view)
    return Service(policy_view.key, policy_view.policy.power_cap_w, tuple(gpus), reserved_w=reserved_w)


def _new_gpu_minimum_w(policy_view: PolicyView, view: ClusterView) -> float:
    """What a GPU joining the service runs at until it has an allocation: the largest
    minimum among its GPUs (the default minimum when none reports)."""
    return max((g.gpu.min_w for g in policy_view.gpus), default=view.settings.default_gpu_min_w)


def _unreported_minimums_w(policy_view: PolicyView, view: ClusterView) -> float:
    """What the bound GPUs that no telemetry lists yet run at: each node's GPUs not yet
    reported for the service at the largest minimum of that node's GPUs (its telemetry, else
    the default), never under the service's own new-GPU minimum. A service on 100 W GPUs
    that scales onto a node of 200 W GPUs holds 200 W for each of them, not 100 W: the GPU
    starts at its own minimum whatever the budget says."""
    reported: dict[str, int] = {}
    for entry in policy_view.gpus:
        reported[entry.node] = reported.get(entry.node, 0) + 1
    return view.starting_minimums_w(policy_view.key, reported, _new_gpu_minimum_w(policy_view, view))


def _rack_limits(view: ClusterView, services: Iterable[Service], counted_at_caps: Allocation | None,
                 at_limit: Collection[str] = frozenset()) -> list[RackLimit]:
    """Racks with a maxPower; their unmanaged power is what ``services`` do not account for.

    ``U = rack power - measured power of the fresh GPUs of services in it``, plus, when
    ``counted_at_caps`` is given, the caps that allocation gave the GPUs in the rack. Where
    the power beside the GPUs follows their load (``rise = rack_rise(rack) > 0``), the GPUs
    reaching their caps raise it by ``rise x (caps - managed)``; the caps must keep
    ``caps + U + rise x (caps - managed) <= maxPower``, which the fill's
    ``caps <= maxPower - unmanaged`` keeps with::

        unmanaged = max(U, (U + rise x (maxPower - managed)) / (1 + rise))

    (never below ``U``: caps under today's draw are not counted on to lower the power beside
    the GPUs). A GPU counted at the limit it reports (``at_limit``: stuck above its
    allocation) is managed too: its node's telemetry is fresh, and its cap is in the fill.
    """
    managed_w: dict[str, float] = {}
    for service in services:
        for gpu in service.gpus:
            if gpu.rack is not None and (gpu.fresh or gpu.uuid in at_limit):
                managed_w[gpu.rack] = managed_w.get(gpu.rack, 0.0) + gpu.power_w
    capped_w: dict[str, float] = {}
    for allocation in (counted_at_caps.services.values() if counted_at_caps is not None else ()):
        for cap in allocation.caps:
            if cap.rack is not None:
                capped_w[cap.rack] = capped_w.get(cap.rack, 0.0) + cap.cap_w
    limits = []
    for rack_id, rack in sorted(view.racks.items()):
        max_power_w = rack.limits.max_power_w
        if max_power_w is None:
            continue
        managed = managed_w.get(rack_id, 0.0)
        unmanaged_w = max(0.0, rack.power_w - managed) + capped_w.get(rack_id, 0.0)
        rise = rack_rise(rack, view.settings)
        unmanaged_w = max(unmanaged_w, (unmanaged_w + rise * (max_power_w - managed)) / (1 + rise))
        limits.append(RackLimit(rack_id, max_power_w, unmanaged_power_w=unmanaged_w))
    return limits


def _plan(
    policy_view: PolicyView,
    allocation: ServiceAllocation,
    racks: Mapping[str, RackAllocation],
    view: ClusterView,
    settings: AllocationSettings,
    lagging_before: Collection[str] | None,
    waiting_gpus: int,
    lagging: tuple[LaggingGpu, ...],
    published_before: Mapping[str, float] | None = None,
) -> PolicyPlan:
    policy = policy_view.policy
    fresh = [g for g in policy_view.gpus if (node := view.nodes.get(g.node)) is not None and node.fresh]
    service_racks = sorted({c.rack for c in allocation.caps if c.rack is not None})
    named = {r.rack_id for r in policy.racks}
    readings = tuple(
        rack_reading(view.racks[rack_id], view.settings.node_overhead_w)
        for rack_id in service_racks
        if rack_id in view.racks and (view.racks[rack_id].constrained or rack_id in named)
    )
    reported: tuple[LaggingGpu, ...] = lagging
    if lagging_before is not None:
        reported = tuple(g for g in lagging if g.uuid in lagging_before)
    unreported = max(0, policy_view.bound_gpus - len(policy_view.gpus))
    gpu_count = len(policy_view.gpus) + unreported
    inputs = StatusInputs(
        policy=policy,
        allocation=allocation,
        margin=settings.margin,
        gpus=gpu_count,
        power_w=sum(g.gpu.power_w for g in fresh) if fresh or gpu_count == 0 else None,
        ratio=service_ratio(g.gpu for g in fresh),
        racks=readings,
        rack_problems=tuple(
            reason for rack_id in service_racks
            if rack_id in racks and (reason := racks[rack_id].infeasible_reason) is not None
        ),
        lagging=reported,
        silent_nodes=_silent_nodes(policy_view, view),
        unreported_gpus=unreported,
        pending_reserved_gpus=waiting_gpus,
    )
    return PolicyPlan(
        policy=policy,
        allocation=allocation,
        inputs=inputs,
        status=render_status(inputs, policy.status, view.now),
        lagging=frozenset(g.uuid for g in lagging),
        published_before=published_before,
    )


def rack_reading(rack: RackView, node_overhead_w: float) -> RackReading:
    """What the status says of a rack: its whole power, the part beside the GPUs, and
    whether (and for which nodes) that part is estimated."""
    return RackReading(
        rack.rack_id, rack.power_w, rack.inlet_temperature_c,
        non_gpu_power_w=rack.non_gpu_power_w, power_source=rack.power_source,
        estimated_nodes=rack.estimated_nodes, estimate_problem=rack.estimate_problem, node_overhead_w=node_overhead_w,
    )


def service_ratio(gpus: Iterable[GpuTelemetry]) -> float | None:
    """Tokens per joule of these GPUs: ``sum(tokens/s) / sum(power W)`` over those that
    report tokens/s; None when none does or they draw no power."""
    tokens_s = power_w = 0.0
    reporting = False
    for gpu in gpus:
        if gpu.tokens_s is not None:
            tokens_s += gpu.tokens_s
            power_w += gpu.power_w
            reporting = True
    return tokens_s / power_w if reporting and power_w > 0 else None


def _silent_nodes(policy_view: PolicyView, view: ClusterView) -> tuple[str, ...]:
    """Why nodes hosting the policy's GPUs or pods have no fresh telemetry."""
    pods = set(policy_view.pods)
    names = {g.node for g in policy_view.gpus}
    names |= {node.name for node in view.nodes.values() if not node.fresh and pods.intersection(node.assumed_pods)}
    problems = []
    for name in sorted(names):
        node = view.nodes.get(name)
        if node is not None and not node.fresh:
            problems.append(node.telemetry_problem or f"no fresh telemetry from node {name}")
    return tuple(problems)
