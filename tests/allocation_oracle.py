"""A test oracle for :mod:`powercap.allocation`, written from its module docstring (steps 1-6,
"Rounding", "Infeasible", the :class:`Bound` comments) and DESIGN.md section 5. It shares no
code with it: plain dicts in (the fields of Service, GpuState, RackLimit, AllocationSettings),
plain dicts out. Naive on purpose: the fill is progressive filling done literally, one group
filling up at a time, and every sum, level and floor is exact (``Fraction``, each number read
as the decimal it prints as: margin 0.03 is 3/100). Only step 2, a per-GPU formula with
thresholds, is evaluated as written, in floats: 1e-13 W under "pinned" is no case for exactness.
The marginal-value rebalancing of step 4 works on token metrics only; the oracle takes GPUs
without them (``tokens_s`` None), whose caps the docstring leaves as the fill made them.
"""

from __future__ import annotations

import math
from fractions import Fraction

DEFAULTS = dict(margin=0.0, pinned_fraction=0.05, step_fraction=0.10, headroom_fraction=0.10, deadband_fraction=0.05)
# Where allocation.py does not do what its docstring says (tests/test_allocation.py has an
# xfail test for each); ``as_implemented`` names those to follow allocation.py in.
SURPLUS_PAST_RACKS = "the surplus fill runs when budget is left, even if a rack held back a demand"
STRICT_DEADBAND = "the deadband keeps a cap strictly less than deadband_fraction x range away"
FLOATS = "budget floor(x + 1e-9), caps floor(x + 1e-6), rack capacity and raise shares in floats"
LEVEL_TOLERANCE = "the fill stops when no level moves by more than 0.01 W (see short_racks)"


def exact(x: float | int) -> Fraction:
    return Fraction(repr(x)) if isinstance(x, float) else Fraction(x)


def clamp(x, low, high):
    return min(max(x, low), high)


def first_full_level(fixed: Fraction, free: list[tuple[Fraction, Fraction]], capacity: Fraction):
    """The lowest level L at which ``fixed + sum(clamp(L, lo, hi) for lo, hi in free)`` reaches
    ``capacity``: -inf when the floors already do, None when even the ceilings do not pass it."""
    def filled(level):
        return fixed + sum(clamp(level, lo, hi) for lo, hi in free)
    if filled(math.inf) <= capacity:
        return None
    points = sorted({v for pair in free for v in pair})
    if filled(points[0]) >= capacity:
        return -math.inf
    low, high = 0, len(points) - 1  # filled(points[low]) < capacity <= filled(points[high])
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if filled(points[middle]) < capacity else (low, middle)
    a, b = points[low], points[high]  # filled() is linear between neighbouring breakpoints
    return a + (capacity - filled(a)) * (b - a) / (filled(b) - filled(a))


def fill(lo: dict, hi: dict, groups: list[tuple[list, int]], short: set[int]) -> tuple[dict, dict]:
    """Progressive filling: a common level rises and every GPU not yet frozen sits at
    ``clamp(level, lo, hi)``; when a group (a service or a rack) reaches its capacity, its
    GPUs freeze where they are (those of a ``short`` group 0.01 W lower). Returns the caps
    and, per frozen GPU, the groups that froze it (two when both fill up at the same level)."""
    caps, frozen_by = {}, {}
    while True:
        levels = {}
        for index, (members, capacity) in enumerate(groups):
            free = [i for i in members if i not in frozen_by]
            fixed = sum(caps[i] for i in members if i in frozen_by)
            if free and (level := first_full_level(fixed, [(lo[i], hi[i]) for i in free], capacity)) is not None:
                levels[index] = level
        if not levels:
            return {i: caps.get(i, hi[i]) for i in lo}, frozen_by
        lowest = min(levels.values())
        full = {index for index, level in levels.items() if level == lowest}
        for i in {i for index in full for i in groups[index][0] if i not in frozen_by}:
            frozen_by[i] = {index for index in full if i in groups[index][0]}
            caps[i] = clamp(lowest - (Fraction(1, 100) if frozen_by[i] & short else 0), lo[i], hi[i])


def pinned(g: dict, s: dict) -> bool:
    """Step 2: drawing within pinned_fraction of its cap, or its pod has requests waiting."""
    return g["power_w"] >= g["limit_w"] * (1 - s["pinned_fraction"]) or (g.get("requests_waiting") or 0) > 0


def demand(g: dict, low: int, high: int, s: dict) -> float:
    """Step 2 as estimate_demand_w's docstring writes it, clamped to [min, max]."""
    power, limit, last, headroom = g["power_w"], g["limit_w"], g["previous_w"], s["headroom_fraction"] * (high - low)
    if pinned(g, s):
        wanted = max(limit + s["step_fraction"] * (high - low), power + headroom)
    elif last is not None and abs(last - (power + headroom)) <= headroom / 2:
        wanted = last
    else:
        wanted = power + headroom
    return clamp(wanted, low, high)


def allocate(services: list[dict], racks: list[dict] = (), settings: dict | None = None,
             as_implemented: frozenset[str] = frozenset(), short_racks: frozenset[str] = frozenset()) -> dict:
    """Caps, bounds and sums. ``short_racks``: racks whose GPUs stop 0.01 W under the level at
    which the rack fills up, as allocation.py may leave them (LEVEL_TOLERANCE)."""
    s = {k: v for k, v in {**DEFAULTS, **(settings or {})}.items() if k in DEFAULTS}
    if any(g.get("tokens_s") is not None for svc in services for g in svc["gpus"]):
        raise ValueError("the oracle does not model the marginal-value rebalancing: give it GPUs without tokens_s")
    floats = FLOATS in as_implemented
    gpu, service_of, members, capacity, budget = {}, {}, {}, {}, {}
    for svc in services:                                                                   # step 1
        key = svc["key"]
        budget[key] = max(0, math.floor(svc["power_cap_w"] * (1 - s["margin"]) + 1e-9) if floats
                          else math.floor(exact(svc["power_cap_w"]) * (1 - exact(s["margin"]))))
        capacity[key] = budget[key] - math.ceil(exact(svc["reserved_w"]))
        members[key] = [g["uuid"] for g in svc["gpus"]]
        for g in svc["gpus"]:
            low = max(0, math.ceil(exact(g["min_w"])))                     # minimums up, maximums down
            high = max(low, math.floor(exact(g["max_w"])))
            last = None if g["previous_w"] is None else math.floor(clamp(exact(g["previous_w"]), low, high))
            if not g["fresh"]:  # held at its last cap: the higher of its reported limit and its published cap
                last = math.floor(clamp(max(exact(g["limit_w"]), exact(g["previous_w"] or 0)), low, high))
            want = exact(demand(g, low, high, s)) if g["fresh"] else Fraction(last)
            gpu[g["uuid"]] = dict(g, low=low, high=high, last=last, demand=want,
                                  floor=Fraction(low) if g["fresh"] else want)
            service_of[g["uuid"]] = key
    limits = {r["rack_id"]: math.floor(r["max_power_w"] - r["unmanaged_power_w"]) if floats
              else math.floor(exact(r["max_power_w"]) - exact(r["unmanaged_power_w"])) for r in racks}
    in_rack = {rack: [u for u, g in gpu.items() if g["rack"] == rack] for rack in limits}
    in_rack = {rack: m for rack, m in in_rack.items() if m}
    groups = [(members[k], capacity[k]) for k in members] + [(m, limits[r]) for r, m in in_rack.items()]
    short = {len(members) + index for index, rack in enumerate(in_rack) if rack in short_racks}

    floors = {u: g["floor"] for u, g in gpu.items()}
    first, first_by = fill(floors, {u: g["demand"] for u, g in gpu.items()}, groups, short)      # step 3
    surplus = {k for k in members if sum(first[u] for u in members[k]) < capacity[k]             # step 4
               and (SURPLUS_PAST_RACKS in as_implemented or all(first[u] == gpu[u]["demand"] for u in members[k]))}
    ceilings = {u: Fraction(g["high"]) if service_of[u] in surplus and g["fresh"] else first[u] for u, g in gpu.items()}
    pinned_gpus = {u for u, g in gpu.items() if service_of[u] in surplus and g["fresh"]           # step 4, pinned first
                   and pinned(g, s) and ceilings[u] > first[u]}
    head = {u: first[u] if u not in pinned_gpus                                                  # a queue: to its ceiling
            else ceilings[u] if (g.get("requests_waiting") or 0) > 0
            else min(ceilings[u], first[u] + exact(s["step_fraction"]) * (g["high"] - g["low"]))
            for u, g in gpu.items()}
    first_surplus, head_by = fill(first, head, groups, short)
    second, second_by = fill(first_surplus, ceilings, groups, short)
    second_by = {u: head_by.get(u, set()) | second_by.get(u, set()) for u in gpu}
    new = {u: math.floor(cap + (Fraction(1, 10**6) if floats else 0)) for u, cap in second.items()}  # whole watts

    def within_band(u: str) -> bool:
        g = gpu[u]
        last, band = g["last"], exact(s["deadband_fraction"]) * (g["high"] - g["low"])
        if last is None or not g["fresh"]:
            return last is not None and new[u] == last  # a held GPU keeps its cap
        if new[u] > last and new[u] >= math.floor(g["demand"]):
            return False
        gap = abs(new[u] - last)
        return gap == 0 or gap < band or (STRICT_DEADBAND not in as_implemented and gap == band)

    kept = dict(new)                                                                       # step 5
    for key, group in members.items():  # a service keeps all its previous caps, or takes all its new ones
        band = exact(s["deadband_fraction"]) * max((gpu[u]["high"] - gpu[u]["low"] for u in group), default=0)
        previous_sum = sum(gpu[u]["last"] or 0 for u in group)
        if all(within_band(u) for u in group) and sum(new[u] for u in group) - band < previous_sum <= capacity[key]:
            kept.update({u: gpu[u]["last"] for u in group})
    for group, limit in groups:  # services, then racks: a sum broken by caps kept above the new ones
        if sum(kept[u] for u in group) > limit:
            kept.update({u: min(kept[u], new[u]) for u in group})

    def previous(u: str) -> int:
        """Step 6: its previous cap, its minimum when new."""
        g = gpu[u]
        return g["low"] if g["last"] is None else g["last"]

    def in_force(u: str) -> int:
        """Step 6: the higher of its previous cap and the limit it reports."""
        g, last = gpu[u], previous(u)
        limit = max(exact(g["limit_w"]), exact(g.get("raised_to_w") or 0))
        if not g["fresh"] or limit <= last:
            return last
        return min(g["high"], math.ceil(limit - Fraction(1, 10**6)))

    caps, postponed = dict(kept), set()                                                    # step 6
    for base in (previous, in_force):  # the caps last published, then the caps in force
        for key, group in members.items():
            before = {u: base(u) for u in group}
            raises = sum(max(0, caps[u] - before[u]) for u in group)
            room = max(0, capacity[key] - sum(before.values()))
            share = room / raises if floats and raises else Fraction(room, raises or 1)
            if raises > room:
                raised = {u for u in group if caps[u] > before[u]}
                postponed |= raised
                caps.update({u: before[u] + math.floor((caps[u] - before[u]) * share) for u in raised})
        for rack, group in in_rack.items():  # then every constrained rack, over every service's GPUs in it
            before = {u: base(u) for u in group}
            raised = {u for u in group if caps[u] > before[u]}
            room = max(0, limits[rack] - sum(before.values()))
            # the first 2 % of each raise, the rest, and the rest's overshoot: 1 % of the new cap
            edge, transient = (0.02, 0.01) if floats else (exact(0.02), exact(0.01))
            if base is previous:  # overshoot counts from the caps in force only
                edge = math.inf
            step = {u: min(caps[u] - before[u], max(1, math.floor(edge * before[u]))) if edge != math.inf
                    else caps[u] - before[u] for u in raised}
            rest = {u: caps[u] - before[u] - step[u] for u in raised}
            transients = sum(math.ceil(transient * caps[u]) for u in raised if rest[u] > 0)
            steps, rests = sum(step.values()), sum(rest.values())
            if steps + rests + transients > room:
                postponed |= raised
                if steps >= room:
                    share = (room / steps if floats else Fraction(room, steps)) if steps else 0
                    caps.update({u: before[u] + math.floor(step[u] * share) for u in raised})
                else:
                    left = max(0, room - steps - transients)
                    share = min(1, left / rests if floats else Fraction(left, rests))
                    caps.update({u: before[u] + step[u] + math.floor(rest[u] * share) for u in raised})

    infeasible_services = {k for k in members if sum(floors[u] for u in members[k]) > capacity[k]}
    infeasible_racks = {r for r, m in in_rack.items() if sum(floors[u] for u in m) > limits[r]}

    def bound(u: str, g: dict) -> set[str]:
        """Why the cap is not higher: the first that applies (either, when both filled up together)."""
        stopped_by = first_by.get(u, set()) | (second_by.get(u, set()) if service_of[u] in surplus else set())
        stopped_by = {"rack" if index >= len(members) else "budget" for index in stopped_by}
        if caps[u] >= g["high"]:
            return {"max"}
        if not g["fresh"]:
            return {"held"}
        if service_of[u] in infeasible_services or (g["rack"] in in_rack and g["rack"] in infeasible_racks):
            return {"minimum"}
        return {"transition"} if u in postponed else {"rack"} if stopped_by == {"rack"} else stopped_by | {"budget"}

    return dict(
        services={k: dict(budget_w=budget[k], feasible=k not in infeasible_services,
                          caps={u: caps[u] for u in members[k]}) for k in members},
        racks={r: dict(allocated_w=sum(caps[u] for u in m), minimum_w=int(sum(floors[u] for u in m)),
                       feasible=r not in infeasible_racks) for r, m in in_rack.items()},
        gpus={u: dict(min_w=g["low"], max_w=g["high"], demand_w=g["demand"], bound=bound(u, g))
              for u, g in gpu.items()},
    )
