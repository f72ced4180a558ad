"""The allocation algorithm as it was before it was optimised (main at ce8b4bb), kept as a
reference oracle: tests/test_allocation.py checks that :func:`powercap.allocation.allocate`
gives exactly what :func:`allocate` here gives, watt for watt, on random inputs.

Not used outside the tests; do not optimise it. The records (inputs and outputs) and the
message helpers are the module's own, so results compare with ``==``.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import attrgetter
from types import MappingProxyType

from powercap.allocation import (
    Allocation,
    AllocationSettings,
    Bound,
    GpuCap,
    GpuState,
    RackAllocation,
    RackLimit,
    Service,
    ServiceAllocation,
    _refuse_shared_gpus,
    _service_infeasible_reason,
    budget_w,
)

INF = math.inf
_ROUNDING_SLACK_W = 1e-6
_LEVEL_TOLERANCE_W = 0.01
_NODE_AND_UUID = attrgetter("node", "uuid")


def _demands_w(gpus: Sequence[GpuState], minima: Sequence[int], maxima: Sequence[int],
               settings: AllocationSettings) -> list[float]:
    """:func:`estimate_demand_w` for many GPUs at once (one comprehension: 10,000 GPUs per round)."""
    pinned_ratio = 1 - settings.pinned_fraction
    step, headroom = settings.step_fraction, settings.headroom_fraction
    wanted = [
        max(g.limit_w + step * (high - low), g.power_w + headroom * (high - low))
        if g.power_w >= g.limit_w * pinned_ratio else g.power_w + headroom * (high - low)
        for g, low, high in zip(gpus, minima, maxima)
    ]
    wanted = [
        g.previous_w if g.previous_w is not None and g.power_w < g.limit_w * pinned_ratio
        and abs(g.previous_w - w) <= headroom * (high - low) / 2 else w
        for g, w, low, high in zip(gpus, wanted, minima, maxima)
    ]
    return [low if w < low else high if w > high else w for w, low, high in zip(wanted, minima, maxima)]


def _level(lo_sorted: list[float], lo_prefix: list[float], his: Sequence[float], capacity_w: float) -> float:
    """:func:`water_level` with the floors already sorted and summed (they do not change
    between the rounds of a fill, the ceilings do)."""
    if sum(his) <= capacity_w:
        return INF
    total_lo = lo_prefix[-1]
    if total_lo >= capacity_w:
        return -INF
    count = len(lo_sorted)
    hi_sorted = sorted(his)
    hi_prefix = [0.0, *accumulate(hi_sorted)]

    def fill(level: float) -> float:
        below = bisect_left(lo_sorted, level)   # GPUs with lo < level are not held up by lo
        capped = bisect_right(hi_sorted, level)  # GPUs with hi <= level are at hi
        return total_lo - lo_prefix[below] + hi_prefix[capped] + level * (below - capped)

    def last_at_most(points: list[float]) -> float:
        low, high = 0, count  # invariant: fill(points[i]) <= capacity for i < low
        while low < high:
            middle = (low + high) // 2
            if fill(points[middle]) <= capacity_w:
                low = middle + 1
            else:
                high = middle
        return points[low - 1] if low else -INF

    start = max(last_at_most(lo_sorted), last_at_most(hi_sorted))
    rising = bisect_right(lo_sorted, start) - bisect_right(hi_sorted, start)
    if rising <= 0:  # the fill is flat at the capacity (up to float rounding) right of start
        return start
    return start + (capacity_w - fill(start)) / rising


def allocate(
    services: Iterable[Service],
    racks: Iterable[RackLimit] = (),
    settings: AllocationSettings | None = None,
) -> Allocation:
    """Per-GPU caps for every service at once (racks are shared between services).

    See the module docstring for the formula. A GPU's ``rack`` counts only when ``racks``
    lists it; a GPU listed by two services is a caller bug and raises ``ValueError``.
    """
    settings = settings or AllocationSettings()
    services = sorted(services, key=lambda s: s.key)
    limits = {r.rack_id: r for r in sorted(racks, key=lambda r: r.rack_id)}
    problem = _Problem.build(services, limits, settings)
    first = problem.fill(problem.floors, problem.demands)
    # Surplus: services that met every demand share what is left, up to each GPU's maximum.
    # A GPU whose service budget or rack was already full cannot rise: it stays fixed.
    full_racks = [level != INF for level in first.rack_levels] + [False]  # index -1: no rack
    surplus_ceilings = [
        cap if first.service_levels[s] != INF or full_racks[r] else high
        for cap, high, s, r in zip(first.caps, problem.maxima, problem.service_of, problem.rack_of)
    ]
    for i in problem.held:
        surplus_ceilings[i] = first.caps[i]
    second = problem.fill(first.caps, surplus_ceilings)
    caps = [math.floor(cap + _ROUNDING_SLACK_W) for cap in second.caps]
    caps = problem.apply_deadband(caps)
    caps, postponed = problem.limit_raises(caps)
    return problem.result(caps, first, second, postponed)


# A group (a service or a rack) as a fill solves it: floors, ceilings, the other group of
# each member, and the floors sorted with their prefix sums.
_Group = tuple[list[float], list[float], list[int], list[float], list[float]]


@dataclass
class _Fill:
    caps: list[float]
    service_levels: list[float]
    rack_levels: list[float]


@dataclass
class _Problem:
    """The GPUs of every service as flat lists, indexed 0..size-1, in (service, node, uuid) order."""

    settings: AllocationSettings
    services: list[Service]
    gpus: list[GpuState]
    service_of: list[int]
    rack_of: list[int]                  # index into rack_ids, or -1 for an unconstrained rack
    rack_ids: list[str]
    rack_limits: list[RackLimit]
    members_of_service: list[list[int]]
    members_of_rack: list[list[int]]
    racks_of_service: list[set[int]]
    services_of_rack: list[set[int]]
    service_capacity_w: list[int]
    rack_capacity_w: list[int]
    minima: list[int]
    maxima: list[int]
    floors: list[float]                 # where the fill starts: the minimum, or the held cap
    demands: list[float]
    held: set[int]
    previous: list[int]                 # previous cap, or the minimum for a new GPU
    sticky: list[bool]                  # fresh with a previous cap: the deadband applies

    @property
    def size(self) -> int:
        return len(self.gpus)

    @classmethod
    def build(cls, services: list[Service], limits: Mapping[str, RackLimit], settings: AllocationSettings) -> _Problem:
        gpus: list[GpuState] = []
        service_of: list[int] = []
        members_of_service: list[list[int]] = []
        for index, service in enumerate(services):
            start = len(gpus)
            gpus.extend(sorted(service.gpus, key=_NODE_AND_UUID))
            service_of.extend([index] * (len(gpus) - start))
            members_of_service.append(list(range(start, len(gpus))))
        uuids = [g.uuid for g in gpus]
        if len(set(uuids)) != len(uuids):
            _refuse_shared_gpus(services)
        rack_ids = sorted({g.rack for g in gpus if g.rack is not None and g.rack in limits})
        rack_index = {rack: i for i, rack in enumerate(rack_ids)}
        rack_of = [rack_index.get(g.rack, -1) if g.rack is not None else -1 for g in gpus]
        members_of_rack: list[list[int]] = [[] for _ in rack_ids]
        for i, r in enumerate(rack_of):
            if r >= 0:
                members_of_rack[r].append(i)
        minima = [max(0, math.ceil(g.min_w - 1e-9)) for g in gpus]
        maxima = [max(low, math.floor(g.max_w + 1e-9)) for g, low in zip(gpus, minima)]
        floors = [float(low) for low in minima]
        demands = _demands_w(gpus, minima, maxima, settings)
        previous = [
            low if g.previous_w is None else int(_clamp(g.previous_w, low, high))
            for g, low, high in zip(gpus, minima, maxima)
        ]
        held = {i for i, g in enumerate(gpus) if not g.fresh}
        for i in held:
            # Its agent may still enforce whichever of the reported limit and our last cap is higher.
            gpu = gpus[i]
            last_w = 0.0 if gpu.previous_w is None else gpu.previous_w
            hold_w = math.floor(_clamp(max(gpu.limit_w, last_w), minima[i], maxima[i]))
            floors[i] = demands[i] = float(hold_w)
            previous[i] = hold_w
        return cls(
            settings=settings,
            services=services,
            gpus=gpus,
            service_of=service_of,
            rack_of=rack_of,
            rack_ids=rack_ids,
            rack_limits=[limits[r] for r in rack_ids],
            members_of_service=members_of_service,
            members_of_rack=members_of_rack,
            racks_of_service=[{rack_of[i] for i in m if rack_of[i] >= 0} for m in members_of_service],
            services_of_rack=[{service_of[i] for i in m} for m in members_of_rack],
            service_capacity_w=[
                budget_w(s.power_cap_w, settings.margin) - math.ceil(s.reserved_w - 1e-9) for s in services
            ],
            rack_capacity_w=[math.floor(limits[r].max_power_w - limits[r].unmanaged_power_w) for r in rack_ids],
            minima=minima,
            maxima=maxima,
            floors=floors,
            demands=demands,
            held=held,
            previous=previous,
            sticky=[gpu.fresh and gpu.previous_w is not None for gpu in gpus],
        )

    def fill(self, los: list[float], his: list[float]) -> _Fill:
        """Progressive filling of every GPU from ``los`` toward ``his`` under both sums.

        Alternates rack levels ``R = F(P)`` and service levels ``P = G(R)``. Starting from
        ``P = +inf``, R only rises and P only falls, so after each service step the caps
        ``clamp(min(P, R), lo, hi)`` satisfy every service sum (by construction) and every
        rack sum (they are below the caps the rack level was computed for). Rounds stop when
        no level moves by more than 0.01 W (a single round for a service alone).
        """
        service_of, rack_of = self.service_of, self.rack_of
        service_levels = [INF] * len(self.services)
        rack_levels = [INF] * len(self.rack_ids)
        # Per group, gathered once: floors (sorted, with prefix sums), ceilings, and the
        # other group (service of a rack member, rack of a service member) of each member.
        # A group whose members are all fixed (floor = ceiling) has nothing to solve and is
        # not gathered.
        fixed = [lo == hi for lo, hi in zip(los, his)]

        def group(members: list[int], other: list[int]) -> _Group | None:
            if all(fixed[i] for i in members):
                return None
            floors = [los[i] for i in members]
            lo_sorted = sorted(floors)
            return floors, [his[i] for i in members], [other[i] for i in members], lo_sorted, [0.0, *accumulate(lo_sorted)]

        rack_groups = {r: g for r, m in enumerate(self.members_of_rack) if (g := group(m, service_of)) is not None}
        service_groups = {s: g for s, m in enumerate(self.members_of_service) if (g := group(m, rack_of)) is not None}
        rack_levels.append(INF)  # index -1: the level of "no constrained rack"
        # Only groups whose inputs moved are solved again: a rack when one of its services'
        # levels changed, a service when one of its racks' levels changed.
        movable_racks, movable_services = set(rack_groups), set(service_groups)
        dirty_racks, dirty_services = set(movable_racks), set(movable_services)
        for _ in range(self.settings.max_rounds):
            for r in sorted(dirty_racks):
                floors, ceilings, others, lo_sorted, lo_prefix = rack_groups[r]
                capped = [lo if (v := service_levels[o]) < lo else hi if v > hi else v
                          for lo, hi, o in zip(floors, ceilings, others)]
                level = _level(lo_sorted, lo_prefix, capped, self.rack_capacity_w[r])
                if not _same_level(level, rack_levels[r]):  # else keep the old, lower level: still feasible
                    dirty_services |= self.services_of_rack[r] & movable_services
                    rack_levels[r] = level
            if not dirty_services:
                break
            dirty_racks = set()
            for s in sorted(dirty_services):
                floors, ceilings, others, lo_sorted, lo_prefix = service_groups[s]
                capped = [lo if (v := rack_levels[o]) < lo else hi if v > hi else v
                          for lo, hi, o in zip(floors, ceilings, others)]
                level = _level(lo_sorted, lo_prefix, capped, self.service_capacity_w[s])
                if not _same_level(level, service_levels[s]):
                    dirty_racks |= self.racks_of_service[s] & movable_racks
                service_levels[s] = level  # the new one even when close: it is the lower
            dirty_services = set()
            if not dirty_racks:
                break
        levels = [min(service_levels[s], rack_levels[r]) for s, r in zip(service_of, rack_of)]
        caps = [lo if v < lo else hi if v > hi else v for lo, hi, v in zip(los, his, levels)]
        rack_levels.pop()
        return _Fill(caps, service_levels, rack_levels)

    def apply_deadband(self, caps: list[int]) -> list[int]:
        """Keep a GPU's previous cap when the new one is within ``deadband_fraction x (max - min)``
        of it, while every sum still fits; a raise that gives a GPU all it asks for goes through."""
        fraction = self.settings.deadband_fraction
        if fraction <= 0:
            return caps
        kept = [
            last if known and abs(cap - last) < fraction * (high - low) and not last < cap >= math.floor(demand) else cap
            for cap, last, known, low, high, demand in zip(
                caps, self.previous, self.sticky, self.minima, self.maxima, self.demands)
        ]
        groups = [(m, c) for m, c in zip(self.members_of_service, self.service_capacity_w)]
        groups += [(m, c) for m, c in zip(self.members_of_rack, self.rack_capacity_w)]
        for members, capacity_w in groups:
            if sum(kept[i] for i in members) > capacity_w:
                for i in members:
                    kept[i] = min(kept[i], caps[i])
        return kept

    def limit_raises(self, caps: list[int]) -> tuple[list[int], set[int]]:
        """Cut raises so that ``sum_i max(previous_i, cap_i) <= capacity_w`` for every service.

        Each raise keeps ``floor((cap_i - previous_i) x room / raises)`` where
        ``room = capacity_w - sum_i previous_i`` (0 when negative).
        """
        limited = list(caps)
        postponed: set[int] = set()
        for members, capacity_w in zip(self.members_of_service, self.service_capacity_w):
            previous = [self.previous[i] for i in members]
            raises_w = sum(max(0, caps[i] - last) for i, last in zip(members, previous))
            room_w = capacity_w - sum(previous)
            if raises_w <= max(room_w, 0):
                continue
            share = max(room_w, 0) / raises_w
            for i in members:
                if caps[i] > self.previous[i]:
                    limited[i] = self.previous[i] + math.floor((caps[i] - self.previous[i]) * share)
                    postponed.add(i)
        return limited, postponed

    def result(self, caps: list[int], first: _Fill, second: _Fill, postponed: set[int]) -> Allocation:
        margin = self.settings.margin
        service_infeasible = []
        for s, service in enumerate(self.services):
            members = self.members_of_service[s]
            floor_w = sum(self.floors[i] for i in members) + math.ceil(service.reserved_w - 1e-9)
            budget = budget_w(service.power_cap_w, margin)
            reason = None
            if floor_w > budget:
                reason = _service_infeasible_reason(service, len(members), floor_w, budget, margin)
            service_infeasible.append(reason)
        rack_infeasible = []
        for r, limit in enumerate(self.rack_limits):
            members = self.members_of_rack[r]
            floor_w = sum(self.floors[i] for i in members)
            reason = None
            if floor_w > self.rack_capacity_w[r]:
                reason = (
                    f"rack {limit.rack_id}: {len(members)} GPUs need at least {floor_w:.0f} W (their minimum power limits), "
                    f"plus {limit.unmanaged_power_w:.0f} W of other load, over maxPower {limit.max_power_w:.0f} W; "
                    f"raise maxPower or move pods to other racks"
                )
            rack_infeasible.append(reason)

        # The fill that last let a service's GPUs rise: the surplus fill when every demand was met.
        last_fill = [second if level == INF else first for level in first.service_levels]
        blocked = [reason is not None for reason in service_infeasible]
        rack_blocked = [reason is not None for reason in rack_infeasible]
        gpu_caps = []
        for i, gpu in enumerate(self.gpus):
            s, r, cap_w = self.service_of[i], self.rack_of[i], caps[i]
            if cap_w >= self.maxima[i]:
                bound = Bound.MAX
            elif i in self.held:
                bound = Bound.HELD
            elif blocked[s] or (r >= 0 and rack_blocked[r]):
                bound = Bound.MINIMUM
            elif i in postponed:
                bound = Bound.TRANSITION
            elif r >= 0 and (first.rack_levels[r] < first.service_levels[s]
                             or last_fill[s].rack_levels[r] < last_fill[s].service_levels[s]):
                bound = Bound.RACK
            else:
                bound = Bound.BUDGET
            gpu_caps.append(GpuCap(gpu.uuid, gpu.node, gpu.rack, cap_w, self.minima[i], self.maxima[i],
                                   self.demands[i], bound))
        services = {
            service.key: ServiceAllocation(
                key=service.key,
                power_cap_w=service.power_cap_w,
                budget_w=budget_w(service.power_cap_w, margin),
                reserved_w=service.reserved_w,
                caps=tuple(gpu_caps[i] for i in self.members_of_service[s]),
                infeasible_reason=service_infeasible[s],
            )
            for s, service in enumerate(self.services)
        }
        racks = {
            limit.rack_id: RackAllocation(
                rack_id=limit.rack_id,
                max_power_w=limit.max_power_w,
                unmanaged_power_w=limit.unmanaged_power_w,
                allocated_w=sum(caps[i] for i in self.members_of_rack[r]),
                minimum_w=int(sum(self.floors[i] for i in self.members_of_rack[r])),
                infeasible_reason=rack_infeasible[r],
            )
            for r, limit in enumerate(self.rack_limits)
        }
        return Allocation(services=MappingProxyType(services), racks=MappingProxyType(racks))


def _clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def _same_level(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= _LEVEL_TOLERANCE_W)
