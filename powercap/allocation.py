"""Budget allocation: turn each service's ``powerCapLimit`` into per-GPU caps.

Pure functions over plain frozen dataclasses; the budget controller feeds them from the
cluster view and writes the result to ``status.allocations``. The formula:

1. **Budget.** ``budget_w = floor(powerCapLimit x (1 - margin))``, margin 0 by default:
   the promise is about the caps in force, and NVML holds a GPU's average power to its cap
   (instantaneous power overshoots it: 748 W was measured under a 700 W limit on an H200,
   but not on 1-second averages; a 3 % margin cost a third of the gain the allocation
   makes, docs/decisions.md "The budget is the whole powerCapLimit"). An operator whose
   breaker trips on sub-second peaks sets ``--margin``. GPUs of the service that have no
   telemetry yet (a pod just started) run at their minimum, so ``reserved_w`` (their
   minimums) comes off first:
   ``capacity_w = budget_w - ceil(reserved_w)``.
2. **Demand** per GPU (:func:`estimate_demand_w`): a GPU drawing within ``pinned_fraction``
   (5 %) of its cap, or whose pod has requests waiting (vLLM's queue: saturated, though a
   memory-bound decode draws below the cap), is *pinned* and asks for ``cap + step``
   (step = 10 % of its [min, max] range); any other GPU gives budget back and asks for
   ``power + headroom`` (headroom = 10 % of its range), except that it keeps asking for its
   previous cap while that cap is within ``headroom / 2`` of ``power + headroom`` (power
   readings move a few percent from one second to the next; without this the caps would
   follow the noise). Demand is clamped to the GPU's [min, max]. A GPU whose node reports
   no fresh telemetry is *held* at its last cap (its agent may still be enforcing it),
   neither raised nor lowered.
3. **Max-min fair fill toward demand.** Every GPU starts at its NVML minimum; a common
   water level ``L`` rises and each GPU's cap is ``clamp(L, min_i, demand_i)``. A service's
   GPUs stop rising when the service reaches ``capacity_w``; the GPUs of a constrained rack
   stop rising when the rack reaches ``floor(maxPower - unmanaged_power_w)``, whichever
   comes first for that GPU. Racks are shared: every service with GPUs in a rack counts
   against its ``maxPower`` (the strictest ``maxPower`` any policy names is the caller's
   to pick). This is progressive filling: each GPU's cap is
   ``clamp(min(L_service, L_rack), min_i, ceiling_i)`` where the levels are the fixed point
   of the two water-fills (:func:`water_level`), reached by alternating them from the top.
   Every intermediate point is feasible, so the invariants hold however few rounds run.
4. **Surplus.** When every demand of a service is met and budget is left, its pinned GPUs
   take up to one step more first (a fill from the first result with each pinned GPU's
   ceiling at ``cap + step``: a pinned GPU uses a watt now, where a traffic-limited one
   leaves it unused), a GPU whose pod has requests waiting up to its maximum (a queue is
   work the GPU cannot do at its cap: every watt it can take serves it, docs/decisions.md
   "A queue takes the surplus first"), then the same fill runs again up to each GPU's maximum: caps cost
   nothing while a GPU draws below them, and a GPU whose load rises then has room before
   the next round. (A common level alone gave a raised budget to the traffic-limited GPUs
   first, the static split's caps after a powerCapLimit raise.)
   **Marginal value** (on by default, ``AllocationSettings.marginal``): with token metrics
   (``GpuState.tokens_s``), the rounded caps of each (service, rack) group whose service
   budget or rack was spent are then re-split toward equal marginal tokens/s per watt
   (:func:`powercap.marginal.rebalance_w`): a trade within a group changes no sum. GPUs
   without a rate keep the fill's caps.
5. **Deadband.** A service keeps all its previous caps (so measurement noise does not
   rewrite status every round) when every new cap equals the previous one or is within
   ``deadband_fraction`` (5 %) of its GPU's [min, max] range (25 W on a 200-700 W GPU) of
   it, no new cap is a raise that meets its GPU's whole demand, every GPU has a previous
   cap, and the previous caps fit the budget and spend no less than the new ones less one
   band (of the service's widest range); else it takes all its new caps. Per service, not
   per GPU: a service with one GPU that moves is written anyway, and keeping its other
   GPUs' previous caps left watts unspent round after round (up to 3 % of the budget in the
   simulator: raises the safe transitions had cut and that then stayed within the band). A
   held GPU keeps its cap either way. Where the kept caps would pass a rack's sum, that
   rack's GPUs take the lower of the two.
6. **Safe transitions.** Node agents pick up a new allocation at different moments, so the
   caps in force mix old and new. Raises are cut so that
   ``sum_i max(previous_i, new_i) <= capacity_w`` and ``sum_i max(in_force_i, new_i) <=
   capacity_w``, for every service and then for every constrained rack
   (``floor(maxPower - unmanaged_power_w)``, over the GPUs of every service in it), where
   ``in_force_i`` is the higher of the GPU's previous cap and the limit its telemetry
   reports in force (``ceil``-ed, at most its maximum; a GPU raised since its power was
   read reports the raised limit beside, ``GpuState.raised_to_w``): a raise only spends
   watts that no GPU can still be holding, and watts a lowered GPU has not reported given
   up yet (its agent has not applied, or not published, the lower) are still held. Where
   the caps in force already pass the capacity, no cap rises above its previous one
   either, even under its reported limit: a report can be older than its agent's last
   write. A GPU without a previous cap counts at its minimum (an agent starts a new GPU
   there), in force at the higher of that and its reported limit; a held GPU at its hold.
   When the caps in force already fill the capacity (the cap was lowered, or the rack's
   other load rose), lowers go out first and raises wait until the lowers are reported
   (the controller then runs its next round early: ``budget.FOLLOW_UP_S``). In a rack, a
   raise of more than 2 % of a GPU's cap also needs 1 % of the new cap of room: a busy
   GPU's power overshoots a raised limit for about 100 ms (7 %), and a breaker sees that
   on the second's average; the first 2 % of each raise go first (they do not overshoot).

Rounding: caps are whole watts, ``floor``-ed, with minimums rounded up and maximums down,
so integer sums never pass an integer budget. (The watts the floors take, up to one a GPU,
stay unspent: docs/decisions.md, "Pods start on time", says why they are not given back.)

Infeasible: when the minimums (plus ``reserved_w``) exceed ``capacity_w`` every GPU of the
service stays at its minimum and :attr:`ServiceAllocation.infeasible_reason` says by how
much and what to change; likewise per rack in :attr:`RackAllocation.infeasible_reason`.

Properties (tests/test_allocation.py): when feasible the caps of a service sum to at most
its budget; every cap lies in [min, max]; more budget never lowers a cap of that service,
except a raise the safe transitions cut (step 6 shares the room in proportion to the raises
asked for, so a watt more that lets another GPU ask more can take a watt from its share:
tests/test_allocation.py, test_a_transition_share_can_fall_by_a_watt_with_more_budget);
the same input gives the same output.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import accumulate, compress, repeat
from operator import attrgetter, gt
from types import MappingProxyType
from typing import NamedTuple

from powercap.marginal import Member, MarginalSettings, is_pinned, marginal_value, rebalance_w
from powercap.numeric import clamp, counted

INF = math.inf
# Float slack when rounding a level back to whole watts: a cap computed as 399.9999999
# is 400 W. Safe for budgets: n GPUs add at most n x 1e-6 W < 1 W to an integer sum.
_ROUNDING_SLACK_W = 1e-6
RAISE_EDGE_FRACTION = 0.02
"""A raise of more than this share of a busy GPU's cap lets its power overshoot the new cap
(step 6, racks)."""
RAISE_TRANSIENT_FRACTION = 0.01
"""What such a raise adds to its rack's power on that second's average, as a share of the new
cap: NVML's limiter lets power pass a raised limit for about one 100-ms refresh (748 W under a
700 W limit measured on an H200, DESIGN.md section 6: 7 % for 0.1 s, 0.8 % of the second)."""
# Levels closer than this count as converged (caps are whole watts). A rack keeps its old,
# lower level then, and a service takes its new, lower one, so every sum still fits.
_LEVEL_TOLERANCE_W = 0.01
_NODE, _UUID = attrgetter("node"), attrgetter("uuid")


@dataclass(frozen=True)
class AllocationSettings:
    """Knobs of the allocation. Bad values fail at construction (start-up), never later."""

    margin: float = 0.0
    pinned_fraction: float = 0.05
    step_fraction: float = 0.10
    headroom_fraction: float = 0.10
    deadband_fraction: float = 0.05
    max_rounds: int = 30
    marginal: MarginalSettings = field(default_factory=MarginalSettings)

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.margin < 1:
            problems.append(f"margin must be in [0, 1), not {self.margin}")
        for name in ("pinned_fraction", "step_fraction", "headroom_fraction", "deadband_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if self.max_rounds < 1:
            problems.append(f"max_rounds must be >= 1, not {self.max_rounds}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class GpuState:
    """One GPU of a service as the node agent last reported it.

    ``previous_w`` is the cap the controller last published for it (None for a GPU that
    has none yet); ``fresh`` is False when its node's telemetry is stale. ``tokens_s`` is
    the tokens/s its agent measured at ``limit_w`` (None: no measurement), for the
    marginal-value rebalancing (:mod:`powercap.marginal`). ``requests_waiting`` is its pod's
    queue (None: unknown); a GPU of a pod with requests waiting counts as pinned.
    ``raised_to_w``: the limit its agent raised it to after reading ``power_w`` under
    ``limit_w`` (None: not raised since); it counts as in force (step 6).
    """

    uuid: str
    node: str
    rack: str | None
    min_w: float
    max_w: float
    power_w: float
    limit_w: float
    previous_w: float | None = None
    fresh: bool = True
    tokens_s: float | None = None
    requests_waiting: int | None = None
    raised_to_w: float | None = None


@dataclass(frozen=True)
class Service:
    """The GPUs of one policy's service and its cap.

    ``reserved_w``: watts held back for GPUs of the service that have no telemetry yet
    (they run at their minimum until their agent reports them).
    """

    key: str
    power_cap_w: float
    gpus: tuple[GpuState, ...]
    reserved_w: float = 0.0


@dataclass(frozen=True)
class RackLimit:
    """A constrained rack: its ``maxPower`` and the measured power of everything not allocated here."""

    rack_id: str
    max_power_w: float
    unmanaged_power_w: float = 0.0


class Bound(str, Enum):
    """Why a GPU's cap is not higher."""

    MAX = "max"                # at the GPU's maximum
    BUDGET = "budget"          # the service's budget is spent
    RACK = "rack"              # its rack's maxPower is reached
    MINIMUM = "minimum"        # infeasible: held at the minimum
    HELD = "held"              # no fresh telemetry: held at its last cap
    TRANSITION = "transition"  # raise postponed until lowered caps are in force


class GpuCap(NamedTuple):
    """The cap of one GPU (an immutable record; a NamedTuple because 10,000 are built per round)."""

    uuid: str
    node: str
    rack: str | None
    cap_w: int
    min_w: int
    max_w: int
    demand_w: float
    bound: Bound


@dataclass(frozen=True)
class ServiceAllocation:
    key: str
    power_cap_w: float
    budget_w: int
    reserved_w: float
    caps: tuple[GpuCap, ...]
    infeasible_reason: str | None = None

    @property
    def feasible(self) -> bool:
        return self.infeasible_reason is None

    @property
    def allocated_w(self) -> int:
        return sum(c.cap_w for c in self.caps)

    @property
    def minimum_w(self) -> int:
        return sum(c.min_w for c in self.caps)

    def by_node(self) -> dict[str, tuple[GpuCap, ...]]:
        """The caps grouped by node, nodes and GPUs in name order."""
        grouped: dict[str, list[GpuCap]] = {}
        for cap in self.caps:
            grouped.setdefault(cap.node, []).append(cap)
        return {node: tuple(grouped[node]) for node in sorted(grouped)}


@dataclass(frozen=True)
class RackAllocation:
    rack_id: str
    max_power_w: float
    unmanaged_power_w: float
    allocated_w: int
    minimum_w: int
    infeasible_reason: str | None = None

    @property
    def feasible(self) -> bool:
        return self.infeasible_reason is None


@dataclass(frozen=True)
class Allocation:
    services: Mapping[str, ServiceAllocation] = field(default_factory=lambda: MappingProxyType({}))
    racks: Mapping[str, RackAllocation] = field(default_factory=lambda: MappingProxyType({}))


def budget_w(power_cap_w: float, margin: float) -> int:
    """``floor(power_cap_w x (1 - margin))``: the watts shared out across a service's GPUs."""
    return max(0, math.floor(power_cap_w * (1 - margin) + 1e-9))


def budget_source(power_cap_w: float, margin: float) -> str:
    """Where a budget comes from, for messages: ``powerCapLimit 900 W minus the 3 % margin``."""
    if margin == 0:
        return f"the whole powerCapLimit, {power_cap_w:.0f} W"
    return f"powerCapLimit {power_cap_w:.0f} W minus the {margin * 100:g} % margin"


def minimum_cap_for_w(minimum_w: float, margin: float) -> int:
    """The smallest ``powerCapLimit`` whose budget covers ``minimum_w``: ``ceil(minimum_w / (1 - margin))``."""
    needed = math.ceil(minimum_w / (1 - margin) - 1e-9)
    return needed + 1 if budget_w(needed, margin) < minimum_w else needed


def estimate_demand_w(gpu: GpuState, settings: AllocationSettings) -> float:
    """What a GPU would use if given it, clamped to its [min, max].

    With ``headroom = headroom_fraction x (max - min)``:

    pinned (``power_w >= limit_w x (1 - pinned_fraction)``, or requests waiting):
        ``max(limit_w + step_fraction x (max - min), power_w + headroom)``
    otherwise: ``previous_w`` when ``|previous_w - (power_w + headroom)| <= headroom / 2``,
    else ``power_w + headroom``.
    """
    min_w, max_w = _bounds(gpu)
    pinned = is_pinned(gpu.power_w, gpu.limit_w, settings.pinned_fraction, gpu.requests_waiting)
    return _demands_w([gpu.power_w], [gpu.limit_w], [pinned], [gpu.previous_w], [min_w], [max_w], settings)[0]


def _demands_w(power_ws: Sequence[float], limit_ws: Sequence[float], pinned: Sequence[bool],
               previous_ws: Sequence[float | None], minima: Sequence[int], maxima: Sequence[int],
               settings: AllocationSettings) -> list[float]:
    """:func:`estimate_demand_w` for many GPUs at once, given as columns (10,000 GPUs per round)."""
    step, headroom = settings.step_fraction, settings.headroom_fraction
    demands: list[float] = []
    append = demands.append
    for power, limit, busy, last, low, high in zip(power_ws, limit_ws, pinned, previous_ws, minima, maxima):
        headroom_w = headroom * (high - low)
        wanted = power + headroom_w
        if busy:
            raised = limit + step * (high - low)
            if not wanted > raised:  # max(raised, wanted)
                wanted = raised
        elif last is not None and abs(last - wanted) <= headroom_w / 2:
            wanted = last
        append(low if wanted < low else high if wanted > high else wanted)
    return demands


_Columns = tuple[list[str], list[str], list[str | None], list[float], list[float], list[float], list[float],
                 list[float | None], list[bool], list[float | None], list[int | None]]


def _columns(gpus: Sequence[GpuState]) -> _Columns:
    """uuid, node, rack, min_w, max_w, power_w, limit_w, previous_w, fresh, tokens_s and
    requests_waiting of every GPU.

    One pass over the objects, not one per field: when services interleave, the GPUs of one
    service lie far apart in memory, and each pass would miss the cache on every GPU again.
    """
    uuids: list[str] = []
    nodes: list[str] = []
    racks: list[str | None] = []
    min_ws: list[float] = []
    max_ws: list[float] = []
    power_ws: list[float] = []
    limit_ws: list[float] = []
    previous_ws: list[float | None] = []
    fresh: list[bool] = []
    tokens: list[float | None] = []
    waiting: list[int | None] = []
    add_uuid, add_node, add_rack = uuids.append, nodes.append, racks.append
    add_min, add_max, add_power, add_limit = min_ws.append, max_ws.append, power_ws.append, limit_ws.append
    add_previous, add_fresh, add_tokens, add_waiting = previous_ws.append, fresh.append, tokens.append, waiting.append
    for g in gpus:
        add_uuid(g.uuid)
        add_node(g.node)
        add_rack(g.rack)
        add_min(g.min_w)
        add_max(g.max_w)
        add_power(g.power_w)
        add_limit(g.limit_w)
        add_previous(g.previous_w)
        add_fresh(g.fresh)
        add_tokens(g.tokens_s)
        add_waiting(g.requests_waiting)
    return uuids, nodes, racks, min_ws, max_ws, power_ws, limit_ws, previous_ws, fresh, tokens, waiting


def water_level(los: Sequence[float], his: Sequence[float], capacity_w: float) -> float:
    """The level ``L`` with ``sum_i clamp(L, lo_i, hi_i) = capacity_w`` (each ``lo_i <= hi_i``).

    ``+inf`` when ``sum(hi) <= capacity_w`` (every GPU reaches its ceiling), ``-inf`` when
    ``sum(lo) >= capacity_w`` (every GPU stays at its floor). O(n log n): two sorts, prefix
    sums, then a binary search over the breakpoints of the piecewise-linear fill.
    """
    lo_sorted = sorted(los)
    return _level(lo_sorted, [0.0, *accumulate(lo_sorted)], his, capacity_w)


def _level(lo_sorted: list[float], lo_prefix: list[float], his: Sequence[float], capacity_w: float) -> float:
    """:func:`water_level` with the floors already sorted and summed (they do not change
    between the rounds of a fill, the ceilings do)."""
    if sum(his) <= capacity_w:
        return INF
    total_lo = lo_prefix[-1]
    if total_lo >= capacity_w:
        return -INF
    hi_sorted = sorted(his)
    hi_prefix = [0.0, *accumulate(hi_sorted)]
    # The level lies right of the last breakpoint (a floor or a ceiling) whose fill is at most
    # the capacity. A floor search cannot move it when every floor is at or left of the
    # ceiling found: then max(floor found, ceiling found) is the ceiling found.
    at_hi = _last_at_most(hi_sorted, lo_sorted, lo_prefix, hi_sorted, hi_prefix, capacity_w)
    if lo_sorted[-1] <= at_hi:
        start = at_hi
    else:
        start = max(_last_at_most(lo_sorted, lo_sorted, lo_prefix, hi_sorted, hi_prefix, capacity_w), at_hi)
    rising = bisect_right(lo_sorted, start) - bisect_right(hi_sorted, start)
    if rising <= 0:  # the fill is flat at the capacity (up to float rounding) right of start
        return start
    below, capped = bisect_left(lo_sorted, start), bisect_right(hi_sorted, start)
    return start + (capacity_w - (total_lo - lo_prefix[below] + hi_prefix[capped] + start * (below - capped))) / rising


def _last_at_most(points: list[float], lo_sorted: list[float], lo_prefix: list[float], hi_sorted: list[float],
                  hi_prefix: list[float], capacity_w: float) -> float:
    """The last of ``points`` (sorted) whose fill is at most ``capacity_w`` (binary search), or ``-inf``.

    ``fill(L) = total_lo - lo_prefix[below] + hi_prefix[capped] + L x (below - capped)``, with
    ``below = #{lo < L}`` (not held up by their floor) and ``capped = #{hi <= L}`` (at their ceiling).
    """
    total_lo = lo_prefix[-1]
    low, high = 0, len(points)  # invariant: fill(points[i]) <= capacity for i < low
    while low < high:
        middle = (low + high) // 2
        level = points[middle]
        below, capped = bisect_left(lo_sorted, level), bisect_right(hi_sorted, level)
        if total_lo - lo_prefix[below] + hi_prefix[capped] + level * (below - capped) <= capacity_w:
            low = middle + 1
        else:
            high = middle
    return points[low - 1] if low else -INF


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
    columns = _GpuColumns.build(services, limits, settings)
    first = columns.fill(columns.floors, columns.wants)
    ceilings = columns.surplus_ceilings(first)
    pinned_first = columns.pinned_step_ceilings(first, ceilings)
    head = None if pinned_first is None else columns.fill(first.caps, pinned_first)
    second = columns.fill(first.caps if head is None else head.caps, ceilings)
    floor = math.floor
    caps = [floor(cap + _ROUNDING_SLACK_W) for cap in second.caps]
    caps = columns.rebalance(caps, first)
    caps = columns.apply_deadband(caps)
    caps, postponed = columns.limit_raises(caps)
    return columns.result(caps, first, head, second, postponed)


# A group (a service or a rack) as a fill solves it: floors, ceilings, the other group of
# each member, and the floors sorted with their prefix sums.
_Group = tuple[list[float], list[float], list[int], list[float], list[float]]


def _group(floors: list[float], ceilings: list[float], others: list[int]) -> _Group:
    lo_sorted = sorted(floors)
    return floors, ceilings, others, lo_sorted, [0.0, *accumulate(lo_sorted)]


@dataclass
class _Fill:
    caps: list[float]
    service_levels: list[float]
    rack_levels: list[float]
    starts: list[float]  # where the fill started each GPU


@dataclass
class _GpuColumns:
    """The GPUs of every service as flat columns, indexed 0..size-1, in (service, node, uuid) order.

    The GPUs of service ``s`` are ``spans[s] = (start, end)``, a contiguous run, so per-service
    work runs over slices. Everything the fills compare, sort and sum is a float (``floors``,
    ``wants``): the same values as the whole-watt ints, but lists of one type sort
    several times faster.
    """

    settings: AllocationSettings
    services: list[Service]
    uuids: Sequence[str]
    nodes: Sequence[str]
    racks: Sequence[str | None]
    spans: list[tuple[int, int]]
    service_of: list[int]
    rack_of: list[int]                  # index into rack_ids, or -1 for an unconstrained rack
    rack_ids: list[str]
    rack_limits: list[RackLimit]
    members_of_rack: list[list[int]]
    racks_of_service: list[set[int]]
    services_of_rack: list[set[int]]
    service_capacity_w: list[int]
    rack_capacity_w: list[int]
    minima: list[int]
    maxima: list[int]
    floors: list[float]                 # where the fill starts: the minimum, or the held cap
    demands: list[float]
    wants: list[float]                  # the demands as floats
    held: set[int]
    previous: list[int]                 # previous cap, or the minimum for a new GPU
    in_force: list[int]                 # the higher of previous and the limit reported in force
    sticky: list[bool]                  # fresh with a previous cap: the deadband applies
    power_ws: list[float]
    limit_ws: list[float]
    pinned: list[bool]                  # would serve more with more power (powercap.marginal.is_pinned)
    queued: list[bool]                  # its pod has requests waiting
    marginals: list[float | None]       # marginal tokens/s per W (powercap.marginal); None: no estimate

    @property
    def size(self) -> int:
        return len(self.uuids)

    @classmethod
    def build(cls, services: list[Service], limits: Mapping[str, RackLimit], settings: AllocationSettings) -> _GpuColumns:
        gpus: list[GpuState] = []
        spans: list[tuple[int, int]] = []
        service_of: list[int] = []
        for index, service in enumerate(services):
            start = len(gpus)
            # by (node, uuid): two stable sorts on string keys build no key tuple per GPU
            gpus.extend(sorted(sorted(service.gpus, key=_UUID), key=_NODE))
            spans.append((start, len(gpus)))
            service_of += [index] * (len(gpus) - start)
        uuids, nodes, racks, min_ws, max_ws, power_ws, limit_ws, previous_ws, fresh, tokens_ws, waiting = _columns(gpus)
        if len(set(uuids)) != len(uuids):
            _refuse_shared_gpus(services)
        rack_ids = sorted(rack for rack in set(racks) if rack is not None and rack in limits)
        rack_index: dict[str | None, int] = {rack: i for i, rack in enumerate(rack_ids)}
        rack_of = [rack_index.get(rack, -1) for rack in racks]
        members_of_rack: list[list[int]] = [[] for _ in rack_ids]
        for i, r in enumerate(rack_of):
            if r >= 0:
                members_of_rack[r].append(i)
        # Whole watts (as _bounds), computed once per distinct value: GPUs share a few models.
        minimum_of = {m: max(0, math.ceil(m - 1e-9)) for m in set(min_ws)}
        maximum_of = {m: math.floor(m + 1e-9) for m in set(max_ws)}
        minima = [minimum_of[m] for m in min_ws]
        maxima = [high if (high := maximum_of[m]) > low else low for m, low in zip(max_ws, minima)]
        float_of = {low: float(low) for low in minimum_of.values()}
        floors = [float_of[low] for low in minima]
        pinned_fraction = settings.pinned_fraction
        pinned = [is_pinned(p, lim, pinned_fraction, w) for p, lim, w in zip(power_ws, limit_ws, waiting)]
        demands = _demands_w(power_ws, limit_ws, pinned, previous_ws, minima, maxima, settings)
        whole_of = {last: int(last) for last in set(previous_ws) if last is not None}
        previous = [
            low if last is None else low if last < low else high if last > high else whole_of[last]
            for last, low, high in zip(previous_ws, minima, maxima)
        ]
        sticky = [last is not None for last in previous_ws]  # and fresh: the held ones are unset below
        held = {i for i, ok in enumerate(fresh) if not ok}
        marginals: list[float | None] = [None] * len(uuids)
        if settings.marginal.enabled and any(t is not None for t in tokens_ws):
            elasticity = settings.marginal.elasticity
            marginals = [None if not ok else marginal_value(t, lim, busy, elasticity)
                         for t, lim, busy, ok in zip(tokens_ws, limit_ws, pinned, fresh)]
        # What each GPU may be holding now: its previous cap, or the limit it reports when that
        # is higher (an agent that has not applied a lower yet, or not published it; a GPU
        # just raised reports the raised limit beside the one its power was read under)
        reported = (limit if (raised := g.raised_to_w) is None or not raised > limit else raised
                    for limit, g in zip(limit_ws, gpus))
        in_force = [
            last if limit <= last else high if not limit < high else math.ceil(limit - _ROUNDING_SLACK_W)
            for last, limit, high in zip(previous, reported, maxima)
        ]
        for i in held:
            # Its agent may still enforce whichever of the reported limit and our last cap is higher.
            last_w = previous_ws[i] or 0.0
            hold_w = math.floor(clamp(max(limit_ws[i], last_w), minima[i], maxima[i]))
            floors[i] = demands[i] = float(hold_w)
            previous[i] = in_force[i] = hold_w
            sticky[i] = False
        return cls(
            settings=settings,
            services=services,
            uuids=uuids,
            nodes=nodes,
            racks=racks,
            spans=spans,
            service_of=service_of,
            rack_of=rack_of,
            rack_ids=rack_ids,
            rack_limits=[limits[r] for r in rack_ids],
            members_of_rack=members_of_rack,
            racks_of_service=[set(rack_of[start:end]) - {-1} for start, end in spans],
            services_of_rack=[{service_of[i] for i in m} for m in members_of_rack],
            service_capacity_w=[
                budget_w(s.power_cap_w, settings.margin) - math.ceil(s.reserved_w - 1e-9) for s in services
            ],
            rack_capacity_w=[math.floor(limits[r].max_power_w - limits[r].unmanaged_power_w) for r in rack_ids],
            minima=minima,
            maxima=maxima,
            floors=floors,
            demands=demands,
            wants=[float(demand) for demand in demands],
            held=held,
            previous=previous,
            in_force=in_force,
            sticky=sticky,
            power_ws=power_ws,
            limit_ws=limit_ws,
            pinned=pinned,
            queued=[bool(w) for w in waiting],
            marginals=marginals,
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
        # not gathered. Nor is a group whose ceilings fit its capacity: its level is +inf
        # whatever the other levels, as a solve would find (each member is capped at most at
        # its ceiling, and float sums are monotone), so it never moves.
        rack_groups: dict[int, _Group] = {}
        for r, members in enumerate(self.members_of_rack):
            floors, ceilings = [los[i] for i in members], [his[i] for i in members]
            if floors != ceilings and sum(ceilings) > self.rack_capacity_w[r]:
                rack_groups[r] = _group(floors, ceilings, [service_of[i] for i in members])
        service_groups: dict[int, _Group] = {}
        for s, (start, end) in enumerate(self.spans):
            floors, ceilings = los[start:end], his[start:end]
            if floors != ceilings and sum(ceilings) > self.service_capacity_w[s]:
                service_groups[s] = _group(floors, ceilings, rack_of[start:end])
        rack_levels.append(INF)  # index -1: the level of "no constrained rack"
        # Only groups whose inputs moved are solved again: a rack when one of its services'
        # levels changed, a service when one of its racks' levels changed.
        movable_racks, movable_services = set(rack_groups), set(service_groups)
        services_to_redo = {r: self.services_of_rack[r] & movable_services for r in rack_groups}
        racks_to_redo = {s: self.racks_of_service[s] & movable_racks for s in service_groups}
        dirty_racks, dirty_services = set(movable_racks), set(movable_services)
        for _ in range(self.settings.max_rounds):
            for r in sorted(dirty_racks):
                floors, ceilings, others, lo_sorted, lo_prefix = rack_groups[r]
                capped = [lo if (v := service_levels[o]) < lo else hi if v > hi else v
                          for lo, hi, o in zip(floors, ceilings, others)]
                level = _level(lo_sorted, lo_prefix, capped, self.rack_capacity_w[r])
                if not _same_level(level, rack_levels[r]):  # else keep the old, lower level: still feasible
                    dirty_services |= services_to_redo[r]
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
                    dirty_racks |= racks_to_redo[s]
                service_levels[s] = level  # the new one even when close: it is the lower
            dirty_services = set()
            if not dirty_racks:
                break
        # cap = clamp(min(P, R), lo, hi), service by service: P is the same along a span, so
        # min(P, R) is looked up by rack (min(P, +inf) = P for "no constrained rack", index -1)
        caps: list[float] = []
        for s, ((start, end), p) in enumerate(zip(self.spans, service_levels)):
            levels = rack_levels
            if p != INF:
                levels = rack_levels.copy()
                levels[-1] = p
                for r in self.racks_of_service[s]:
                    if not levels[r] < p:
                        levels[r] = p
            caps += [lo if (v := levels[r]) < lo else hi if v > hi else v
                     for lo, hi, r in zip(los[start:end], his[start:end], rack_of[start:end])]
        rack_levels.pop()
        return _Fill(caps, service_levels, rack_levels, los)

    def pinned_step_ceilings(self, first: _Fill, ceilings: list[float]) -> list[float] | None:
        """Where the surplus goes first: a pinned GPU (:func:`powercap.marginal.is_pinned`) of
        a service that met every demand may take one more step above its first cap, and one
        whose pod has requests waiting up to its surplus ceiling (its maximum where nothing
        else binds); every other GPU stays at its first cap. None when no GPU may (the common
        level then lifts every cap at once)."""
        step = self.settings.step_fraction
        head = list(first.caps)
        moved = False
        for i, (cap, ceiling, busy, queued, low, high) in enumerate(zip(
                first.caps, ceilings, self.pinned, self.queued, self.minima, self.maxima)):
            if ceiling > cap and busy:
                head[i] = ceiling if queued else min(ceiling, cap + step * (high - low))
                moved = True
        return head if moved else None

    def surplus_ceilings(self, first: _Fill) -> list[float]:
        """Where the surplus fill may take each GPU: services that met every demand share what
        is left, up to each GPU's maximum. A GPU whose service budget or rack was already
        full cannot rise, nor can a held GPU: it stays fixed at its first cap."""
        caps, maxima, rack_of = first.caps, self.maxima, self.rack_of
        full_racks = [level != INF for level in first.rack_levels] + [False]  # index -1: no rack
        ceilings: list[float] = []
        for (start, end), level in zip(self.spans, first.service_levels):
            if level != INF:
                ceilings += caps[start:end]
            else:
                ceilings += [cap if full_racks[r] else float(high)
                             for cap, high, r in zip(caps[start:end], maxima[start:end], rack_of[start:end])]
        for i in self.held:
            ceilings[i] = caps[i]
        return ceilings

    def rebalance(self, caps: list[int], first: _Fill) -> list[int]:
        """Move watts toward the higher marginal tokens/W (:func:`powercap.marginal.rebalance_w`)
        within each (service, rack) group whose service budget or rack was spent in the first
        fill: trades inside a group change neither sum. Groups without an estimate keep the
        fill's caps (no token metrics: the demand-following fill alone)."""
        if not any(m is not None for m in self.marginals):
            return caps
        settings, marginal = self.settings, self.settings.marginal
        rebalanced = list(caps)
        for s, (start, end) in enumerate(self.spans):
            groups: dict[int, list[int]] = {}
            for i in range(start, end):
                if self.marginals[i] is not None:
                    groups.setdefault(self.rack_of[i], []).append(i)
            for r, members in groups.items():
                if first.service_levels[s] == INF and (r < 0 or first.rack_levels[r] == INF):
                    continue  # every demand was met: nothing to trade for
                group = [Member(cap_w=caps[i], min_w=self.minima[i], max_w=self.maxima[i], power_w=self.power_ws[i],
                                limit_w=self.limit_ws[i], marginal=self.marginals[i],
                                step_w=settings.step_fraction * (self.maxima[i] - self.minima[i]),
                                donor_headroom_w=marginal.donor_headroom_fraction * (self.maxima[i] - self.minima[i]))
                         for i in members]
                new_caps = rebalance_w(group, marginal.elasticity, marginal.outlier_ratio, marginal.equal_within)
                for i, cap in zip(members, new_caps):
                    rebalanced[i] = cap
        return rebalanced

    def apply_deadband(self, caps: list[int]) -> list[int]:
        """Keep a service's previous caps when every new one equals it or is within
        ``deadband_fraction x (max - min)`` of it (a raise that gives a GPU all it asks for is
        a move; a GPU without a previous cap is one), their sum fits the capacity and is more
        than the new caps' sum less one band (of the service's widest range), while every rack
        sum still fits. A service with any move takes all its new caps: its status is written
        anyway, and keeping some previous caps would leave budget unspent."""
        fraction = self.settings.deadband_fraction
        if fraction <= 0:
            return caps
        floor = math.floor
        held = self.held
        within = [
            cap == last and (known or i in held)
            or known and abs(cap - last) < fraction * (high - low) and not last < cap >= floor(demand)
            for i, (cap, last, known, low, high, demand) in enumerate(zip(
                caps, self.previous, self.sticky, self.minima, self.maxima, self.demands))
        ]
        kept = list(caps)
        for (start, end), capacity_w in zip(self.spans, self.service_capacity_w):
            previous = self.previous[start:end]
            band_w = fraction * max([high - low for low, high in zip(self.minima[start:end], self.maxima[start:end])],
                                    default=0)
            if all(within[start:end]) and sum(caps[start:end]) - band_w < sum(previous) <= capacity_w:
                kept[start:end] = previous
        for members, capacity_w in zip(self.members_of_rack, self.rack_capacity_w):
            if sum([kept[i] for i in members]) > capacity_w:
                for i in members:
                    kept[i] = min(kept[i], caps[i])
        return kept

    def limit_raises(self, caps: list[int]) -> tuple[list[int], set[int]]:
        """Cut raises so that ``sum_i max(previous_i, cap_i) <= capacity_w`` and
        ``sum_i max(in_force_i, cap_i) <= capacity_w``, for every service and then for every
        constrained rack; ``in_force_i`` is the higher of the GPU's previous cap and the limit
        it reports. The first sum holds the caps the agents were last told; the second the
        watts a GPU may still hold because its agent has not applied, or not reported, a
        lower. Where the second already passes the capacity, no cap rises above either: a
        report can be older than its agent's last write, so a cap under the reported limit
        may still be a rise.

        Each raise keeps ``floor((cap_i - base_i) x room / raises)`` where
        ``room = capacity_w - sum_i base_i`` (0 when negative), with ``base`` the previous
        caps, then the caps in force. In a rack, a raise of more than
        :data:`RAISE_EDGE_FRACTION` over the cap in force also needs :data:`RAISE_TRANSIENT_FRACTION` of
        its new cap (``ceil``-ed) of room, for the second its power overshoots the new cap:
        when raises and transients pass the room, each raise keeps its step
        (``min(raise, max(1, floor(RAISE_EDGE_FRACTION x base)))``, shared as above when the steps
        alone pass the room) and ``floor(rest x share)`` of the rest, ``share = (room - steps
        - transients) / rests`` (at least 0, at most 1).
        """
        limited = list(caps)
        postponed: set[int] = set()
        self._cut_raises(limited, self.previous, postponed, transients=False)
        self._cut_raises(limited, self.in_force, postponed, transients=True)
        return limited, postponed

    def _cut_raises(self, limited: list[int], base: list[int], postponed: set[int], transients: bool) -> None:
        """One pass of :meth:`limit_raises` from ``base``: services, then racks, in place;
        ``transients``: a rack's raises need room for their overshoot too (from the caps in
        force only: a cap over the previous one but not over what the GPU holds raises no
        power)."""
        floor = math.floor
        for (start, end), capacity_w in zip(self.spans, self.service_capacity_w):
            new, old = limited[start:end], base[start:end]
            raises_w = sum([cap - last for cap, last in zip(new, old) if cap > last])
            room_w = max(capacity_w - sum(old), 0)
            if raises_w <= room_w:
                continue
            share = room_w / raises_w
            limited[start:end] = [last + floor((cap - last) * share) if cap > last else cap for cap, last in zip(new, old)]
            postponed.update(compress(range(start, end), map(gt, new, old)))
        for members, capacity_w in zip(self.members_of_rack, self.rack_capacity_w):
            raised = [i for i in members if limited[i] > base[i]]
            if not raised:
                continue
            room_w = max(capacity_w - sum([base[i] for i in members]), 0)
            # a raise's step (up to RAISE_EDGE_FRACTION of the cap it leaves) and the rest of it,
            # which makes the limiter overshoot: that part needs its transient's room too
            steps = ([min(limited[i] - base[i], max(1, floor(RAISE_EDGE_FRACTION * base[i]))) for i in raised] if transients
                     else [limited[i] - base[i] for i in raised])
            rests = [limited[i] - base[i] - step for i, step in zip(raised, steps)]
            transients_w = sum([math.ceil(RAISE_TRANSIENT_FRACTION * limited[i]) for i, rest in zip(raised, rests) if rest > 0])
            steps_w, rests_w = sum(steps), sum(rests)
            if steps_w + rests_w + transients_w <= room_w:
                continue
            if steps_w >= room_w:  # not even every step fits: the steps share the room
                share = room_w / steps_w if steps_w else 0.0
                cut = [floor(step * share) for step in steps]
            else:
                share = min(1.0, max(room_w - steps_w - transients_w, 0) / rests_w)
                cut = [step + floor(rest * share) for step, rest in zip(steps, rests)]
            for i, raise_w in zip(raised, cut):
                limited[i] = base[i] + raise_w
            postponed.update(raised)

    def result(self, caps: list[int], first: _Fill, head: _Fill | None, second: _Fill, postponed: set[int]) -> Allocation:
        margin = self.settings.margin
        service_infeasible = []
        for service, (start, end) in zip(self.services, self.spans):
            floor_w = sum(self.floors[start:end]) + math.ceil(service.reserved_w - 1e-9)
            budget = budget_w(service.power_cap_w, margin)
            reason = None
            if floor_w > budget:
                reason = _service_infeasible_reason(service, end - start, floor_w, budget, margin)
            service_infeasible.append(reason)
        rack_floors_w = [sum([self.floors[i] for i in members]) for members in self.members_of_rack]
        rack_infeasible = []
        for r, limit in enumerate(self.rack_limits):
            members = self.members_of_rack[r]
            floor_w = rack_floors_w[r]
            reason = None
            if floor_w > self.rack_capacity_w[r]:
                reason = (
                    f"rack {limit.rack_id}: {counted(len(members), 'GPU')} {_need_minimums(len(members) == 1, floor_w)}, "
                    f"plus {limit.unmanaged_power_w:.0f} W of other load, over maxPower {limit.max_power_w:.0f} W; "
                    f"raise maxPower or move pods to other racks"
                )
            rack_infeasible.append(reason)

        # The fill that last let a service's GPUs rise: the surplus fill when every demand was
        # met, or the pinned GPUs' step before it when that step spent the budget.
        last_fill = [first if level != INF else head if head is not None and head.service_levels[s] != INF else second
                     for s, level in enumerate(first.service_levels)]
        bounds = self._bounds(caps, first, last_fill, service_infeasible, rack_infeasible, postponed)
        # GpuCap(*row) for every row, without a Python-level NamedTuple.__new__ call per GPU
        gpu_caps: list[GpuCap] = list(map(tuple.__new__, repeat(GpuCap), zip(
            self.uuids, self.nodes, self.racks, caps, self.minima, self.maxima, self.demands, bounds)))
        services = {
            service.key: ServiceAllocation(
                key=service.key,
                power_cap_w=service.power_cap_w,
                budget_w=budget_w(service.power_cap_w, margin),
                reserved_w=service.reserved_w,
                caps=tuple(gpu_caps[start:end]),
                infeasible_reason=service_infeasible[s],
            )
            for s, (service, (start, end)) in enumerate(zip(self.services, self.spans))
        }
        racks = {
            limit.rack_id: RackAllocation(
                rack_id=limit.rack_id,
                max_power_w=limit.max_power_w,
                unmanaged_power_w=limit.unmanaged_power_w,
                allocated_w=sum([caps[i] for i in self.members_of_rack[r]]),
                minimum_w=int(rack_floors_w[r]),
                infeasible_reason=rack_infeasible[r],
            )
            for r, limit in enumerate(self.rack_limits)
        }
        return Allocation(services=MappingProxyType(services), racks=MappingProxyType(racks))

    def full_from_start(self, fill: _Fill, r: int) -> bool:
        """Whether rack ``r``'s GPUs, where ``fill`` started them, already fill it."""
        return sum([fill.starts[i] for i in self.members_of_rack[r]]) >= self.rack_capacity_w[r]

    def _bounds(self, caps: list[int], first: _Fill, last_fill: list[_Fill], service_infeasible: list[str | None],
                rack_infeasible: list[str | None], postponed: set[int]) -> list[Bound]:
        """Why each cap is not higher, the first that applies: MAX (at the maximum), HELD,
        MINIMUM (its service or rack is infeasible), TRANSITION (postponed raise), RACK (its
        rack's level was below its service's in the first fill), BUDGET when the fill that last
        let the service rise started it with its budget spent, RACK (its rack's level was below
        its service's in that fill, or that fill started its rack full), else BUDGET. A group
        full where a fill starts stops its GPUs before any level rises."""
        rack_blocked = [reason is not None for reason in rack_infeasible]
        bounds: list[Bound] = []
        for s, (start, end) in enumerate(self.spans):
            # The bound of a GPU below its maximum depends only on its (service, rack): a table
            # by rack index, the last entry for "no constrained rack".
            by_rack = [Bound.MINIMUM if service_infeasible[s] is not None else Bound.BUDGET] * (len(self.rack_ids) + 1)
            if service_infeasible[s] is None:
                level, last = first.service_levels[s], last_fill[s]
                service_full_from_start = sum(last.starts[start:end]) >= self.service_capacity_w[s]
                for r in self.racks_of_service[s]:
                    if rack_blocked[r]:
                        by_rack[r] = Bound.MINIMUM
                    elif first.rack_levels[r] < level:
                        by_rack[r] = Bound.RACK
                    elif service_full_from_start:
                        continue
                    elif last.rack_levels[r] < last.service_levels[s] or self.full_from_start(last, r):
                        by_rack[r] = Bound.RACK
            bounds += [Bound.MAX if cap >= high else by_rack[r]
                       for cap, high, r in zip(caps[start:end], self.maxima[start:end], self.rack_of[start:end])]
        for i in postponed:
            if bounds[i] is Bound.RACK or bounds[i] is Bound.BUDGET:
                bounds[i] = Bound.TRANSITION
        for i in self.held:
            if bounds[i] is not Bound.MAX:
                bounds[i] = Bound.HELD
        return bounds


def _refuse_shared_gpus(services: Sequence[Service]) -> None:
    """Raise ``ValueError`` naming the first GPU listed by two services (a caller bug)."""
    seen: dict[str, str] = {}
    for service in services:
        for gpu in service.gpus:
            if gpu.uuid in seen:
                raise ValueError(f"GPU {gpu.uuid} is listed by both {seen[gpu.uuid]} and {service.key}")
            seen[gpu.uuid] = service.key


def _need_minimums(one_gpu: bool, floor_w: float) -> str:
    """'needs at least 200 W (its minimum power limit)' or the plural, after the GPUs named."""
    if one_gpu:
        return f"needs at least {floor_w:.0f} W (its minimum power limit)"
    return f"need at least {floor_w:.0f} W (their minimum power limits)"


def _service_infeasible_reason(service: Service, gpu_count: int, floor_w: float, budget: int, margin: float) -> str:
    if not service.reserved_w:
        who = counted(gpu_count, "GPU")
    elif gpu_count:
        who = f"{counted(gpu_count, 'GPU')} and those not reporting yet ({service.reserved_w:.0f} W at their minimum)"
    else:
        who = f"the GPUs not reporting yet ({service.reserved_w:.0f} W at their minimum)"
    return (
        f"{who} {_need_minimums(gpu_count == 1 and not service.reserved_w, floor_w)}, but the budget is "
        f"{budget} W ({budget_source(service.power_cap_w, margin)}); raise powerCapLimit to at least "
        f"{minimum_cap_for_w(floor_w, margin)} W or run fewer GPUs"
    )


def _bounds(gpu: GpuState) -> tuple[int, int]:
    """Whole-watt [min, max]: the minimum rounded up, the maximum down (never below the minimum).

    (``_GpuColumns.build`` computes the same for every GPU at once.)
    """
    min_w = max(0, math.ceil(gpu.min_w - 1e-9))
    return min_w, max(min_w, math.floor(gpu.max_w + 1e-9))


def _same_level(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= _LEVEL_TOLERANCE_W)
