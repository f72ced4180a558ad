"""Budget allocation: table-driven cases and the invariants as hypothesis properties."""

from __future__ import annotations

import dataclasses
import math
import random
from itertools import accumulate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from powercap.allocation import (
    AllocationSettings,
    Bound,
    GpuState,
    RackLimit,
    Service,
    allocate,
    budget_w,
    estimate_demand_w,
    minimum_cap_for_w,
    water_level,
)
from powercap.allocation import _level
from tests import reference_allocation


def gpu(uuid: str, power_w: float, limit_w: float, *, node: str = "node-1", rack: str | None = "rack-1",
        min_w: float = 200, max_w: float = 700, **extra: object) -> GpuState:
    return GpuState(uuid=uuid, node=node, rack=rack, min_w=min_w, max_w=max_w, power_w=power_w,
                    limit_w=limit_w, **extra)  # type: ignore[arg-type]


def caps_of(allocation, key: str = "ns/svc") -> dict[str, int]:
    return {c.uuid: c.cap_w for c in allocation.services[key].caps}


PINNED_AT_500 = dict(power_w=498, limit_w=500)   # within 5 % of its cap: wants 550 W
IDLE = dict(power_w=80, limit_w=500)             # well below: gives back down to its minimum


@pytest.mark.parametrize(
    "power_cap_w, gpus, racks, expected_caps, expected_bounds",
    [
        pytest.param(
            700, [gpu("a", 650, 700)], [], {"a": 679}, {"a": Bound.BUDGET},
            id="one GPU gets the cap minus the 3 % margin",
        ),
        pytest.param(
            1000, [gpu("a", 650, 700)], [], {"a": 700}, {"a": Bound.MAX},
            id="one GPU never above its maximum",
        ),
        pytest.param(
            800,
            [gpu("h200", 690, 700), gpu("l40s", 340, 350, min_w=100, max_w=350)],
            [],
            {"h200": 426, "l40s": 350},
            {"h200": Bound.BUDGET, "l40s": Bound.MAX},
            id="heterogeneous GPUs: the small one is filled to its maximum, the big one takes the rest",
        ),
        pytest.param(
            2000, [gpu(u, **PINNED_AT_500) for u in "abcd"], [],
            {u: 485 for u in "abcd"}, {u: Bound.BUDGET for u in "abcd"},
            id="all pinned: equal shares of the budget",
        ),
        pytest.param(
            2000, [gpu(u, **IDLE) for u in "abcd"], [],
            {u: 485 for u in "abcd"}, {u: Bound.BUDGET for u in "abcd"},
            id="all idle: the surplus is shared equally",
        ),
        pytest.param(
            2000, [gpu("busy1", **PINNED_AT_500), gpu("busy2", **PINNED_AT_500), gpu("idle1", **IDLE), gpu("idle2", **IDLE)],
            [],
            {"busy1": 550, "busy2": 550, "idle1": 420, "idle2": 420},
            {u: Bound.BUDGET for u in ("busy1", "busy2", "idle1", "idle2")},
            id="busy GPUs get their demand first, idle ones share what is left",
        ),
        pytest.param(
            700, [gpu(u, 600, 700) for u in "abcd"], [],
            {u: 200 for u in "abcd"}, {u: Bound.MINIMUM for u in "abcd"},
            id="infeasible: every GPU stays at its minimum",
        ),
        pytest.param(
            4200,
            [gpu("r1-a", 690, 700), gpu("r1-b", 690, 700), gpu("r2-a", 690, 700, rack="rack-2")],
            [RackLimit("rack-1", max_power_w=1500, unmanaged_power_w=300)],
            {"r1-a": 600, "r1-b": 600, "r2-a": 700},
            {"r1-a": Bound.RACK, "r1-b": Bound.RACK, "r2-a": Bound.MAX},
            id="a constrained rack holds its GPUs, the budget goes elsewhere",
        ),
        pytest.param(
            4200,
            [gpu("a", 690, 700), gpu("b", 690, 700)],
            [RackLimit("rack-1", max_power_w=1000, unmanaged_power_w=700)],
            {"a": 200, "b": 200},
            {"a": Bound.MINIMUM, "b": Bound.MINIMUM},
            id="infeasible rack: its GPUs stay at their minimum",
        ),
    ],
)
def test_allocation_cases(power_cap_w, gpus, racks, expected_caps, expected_bounds) -> None:
    allocation = allocate([Service("ns/svc", power_cap_w, tuple(gpus))], racks)
    result = allocation.services["ns/svc"]
    assert caps_of(allocation) == expected_caps
    assert {c.uuid: c.bound for c in result.caps} == expected_bounds
    assert result.allocated_w <= budget_w(power_cap_w, 0.03) or not result.feasible


def test_two_policies_sharing_a_rack_are_scaled_together() -> None:
    """rack-1 fits 1800 W of caps; both services' GPUs in it share that, max-min fair."""
    chat = Service("ns/chat", 2000, (gpu("c1", 690, 700), gpu("c2", 690, 700)))
    batch = Service("ns/batch", 2800, (
        gpu("b1", 690, 700, node="node-2"), gpu("b2", 690, 700, node="node-2"),
        gpu("b3", 80, 700, node="node-9", rack="rack-2"), gpu("b4", 80, 700, node="node-9", rack="rack-2"),
    ))
    allocation = allocate([chat, batch], [RackLimit("rack-1", max_power_w=2000, unmanaged_power_w=200)])
    assert caps_of(allocation, "ns/chat") == {"c1": 450, "c2": 450}
    assert caps_of(allocation, "ns/batch") == {"b1": 450, "b2": 450, "b3": 700, "b4": 700}
    assert allocation.racks["rack-1"].allocated_w == 1800
    assert allocation.racks["rack-1"].feasible


def test_infeasible_reason_says_what_to_change() -> None:
    allocation = allocate([Service("ns/svc", 700, tuple(gpu(u, 600, 700) for u in "abcd"))])
    reason = allocation.services["ns/svc"].infeasible_reason
    assert reason is not None
    assert "4 GPUs need at least 800 W" in reason
    assert "budget is 679 W (powerCapLimit 700 W minus the 3 % margin)" in reason
    assert "raise powerCapLimit to at least 825 W" in reason
    assert budget_w(825, 0.03) >= 800 > budget_w(824, 0.03)


@pytest.mark.parametrize(
    ("reporting", "who"),
    [
        pytest.param(2, "2 GPUs and those not reporting yet (400 W at their minimum) need at least 800 W", id="some-reporting"),
        pytest.param(0, "the GPUs not reporting yet (400 W at their minimum) need at least 400 W", id="none-reporting"),
    ],
)
def test_infeasible_reason_counts_gpus_not_reporting_yet(reporting: int, who: str) -> None:
    """A new pod's GPUs have no telemetry yet; the reason must not read '0 GPUs need 800 W'."""
    service = Service("ns/svc", 300, tuple(gpu(u, 300, 400) for u in "ab"[:reporting]), reserved_w=400)
    reason = allocate([service]).services["ns/svc"].infeasible_reason
    assert reason is not None and reason.startswith(who)


def test_infeasible_rack_reason_names_the_rack_and_its_load() -> None:
    allocation = allocate(
        [Service("ns/svc", 4200, (gpu("a", 690, 700), gpu("b", 690, 700)))],
        [RackLimit("rack-1", max_power_w=1000, unmanaged_power_w=700)],
    )
    reason = allocation.racks["rack-1"].infeasible_reason
    assert reason == (
        "rack rack-1: 2 GPUs need at least 400 W (their minimum power limits), plus 700 W of other load, "
        "over maxPower 1000 W; raise maxPower or move pods to other racks"
    )
    assert allocation.services["ns/svc"].feasible  # the service's own budget is fine


def test_gpus_without_telemetry_reserve_their_minimum() -> None:
    """Two GPUs of the service are not reported yet: their agents run them at 200 W each."""
    allocation = allocate([Service("ns/svc", 2000, (gpu("a", 690, 700), gpu("b", 690, 700)), reserved_w=400)])
    assert caps_of(allocation) == {"a": 700, "b": 700}
    assert allocation.services["ns/svc"].allocated_w + 400 <= budget_w(2000, 0.03)
    squeezed = allocate([Service("ns/svc", 1500, (gpu("a", 690, 700), gpu("b", 690, 700)), reserved_w=400)])
    assert caps_of(squeezed) == {"a": 527, "b": 527}  # (1455 - 400) / 2


def test_stale_gpu_is_held_at_its_last_cap() -> None:
    """Its agent may still enforce 600 W: the others must not count on that budget."""
    stale = gpu("stale", 100, 550, previous_w=600, fresh=False)
    allocation = allocate([Service("ns/svc", 1500, (stale, gpu("a", 690, 700), gpu("b", 690, 700)))])
    caps = caps_of(allocation)
    assert caps == {"stale": 600, "a": 427, "b": 427}  # (1455 - 600) / 2
    assert {c.uuid: c.bound for c in allocation.services["ns/svc"].caps}["stale"] is Bound.HELD


@pytest.mark.parametrize(
    "previous_w, expected_w",
    [
        pytest.param(465, 465, id="20 W below the new fair share (under 5 % of 200-700 W): keep 465"),
        pytest.param(490, 485, id="5 W above: keeping it would pass the budget, take 485"),
        pytest.param(455, 485, id="30 W away: move"),
    ],
)
def test_small_changes_keep_the_previous_cap(previous_w: int, expected_w: int) -> None:
    """Measurement noise moves the fair share by a few watts; the published caps stay put."""
    gpus = tuple(gpu(u, previous_w - 2, previous_w, previous_w=previous_w) for u in "abcd")
    assert caps_of(allocate([Service("ns/svc", 2000, gpus)])) == {u: expected_w for u in "abcd"}


def test_raises_wait_for_lowered_caps() -> None:
    """b's 200 W raise is paid for by a's 200 W lower: while a's agent may still hold 600 W,
    only the free 36 W of the budget can go to b."""
    before = (gpu("a", 100, 600, previous_w=600), gpu("b", 590, 600, previous_w=600))
    allocation = allocate([Service("ns/svc", 1275, before)])  # budget 1236 = 600 + 600 + 36
    caps = caps_of(allocation)
    assert caps["a"] < 600 and caps["b"] == 636
    assert max(600, caps["a"]) + max(600, caps["b"]) <= budget_w(1275, 0.03)
    assert {c.uuid: c.bound for c in allocation.services["ns/svc"].caps}["b"] is Bound.TRANSITION


def test_caps_follow_demand_over_rounds() -> None:
    """Two busy and two idle GPUs, each round fed the caps the agents applied: the busy
    ones climb a step per round to their maximum; the idle ones keep the rest."""
    limits = {"busy1": 485, "busy2": 485, "idle1": 485, "idle2": 485}
    for _ in range(10):
        gpus = tuple(
            gpu(u, limit if u.startswith("busy") else 80, limit, previous_w=limit) for u, limit in limits.items()
        )
        limits = caps_of(allocate([Service("ns/svc", 2000, gpus)]))
    assert limits == {"busy1": 700, "busy2": 700, "idle1": 270, "idle2": 270}


def test_lowering_the_cap_lowers_first_and_then_settles() -> None:
    limits = {u: 700 for u in "abcd"}
    rounds = []
    for _ in range(3):
        gpus = tuple(gpu(u, limit - 5, limit, previous_w=limit) for u, limit in limits.items())
        limits = caps_of(allocate([Service("ns/svc", 2000, gpus)]))
        rounds.append(limits)
    assert rounds[0] == {u: 485 for u in "abcd"}
    assert rounds[-1] == rounds[0]


@pytest.mark.parametrize(
    "state, expected_w",
    [
        pytest.param(dict(power_w=690, limit_w=700), 700, id="pinned at the maximum stays there"),
        pytest.param(dict(power_w=480, limit_w=500), 550, id="pinned asks for one step more"),
        pytest.param(dict(power_w=300, limit_w=500), 350, id="well below gives back down to power + headroom"),
        pytest.param(dict(power_w=50, limit_w=500), 200, id="idle asks for its minimum"),
        pytest.param(dict(power_w=748, limit_w=700), 700, id="overshoot over the limit is pinned"),
    ],
)
def test_demand_estimate(state: dict, expected_w: float) -> None:
    assert estimate_demand_w(gpu("a", **state), AllocationSettings()) == expected_w


@pytest.mark.parametrize(
    "los, his, capacity_w, expected",
    [
        pytest.param([0, 0], [10, 10], 20, float("inf"), id="everyone reaches the ceiling"),
        pytest.param([5, 5], [10, 10], 10, float("-inf"), id="floors use the whole capacity"),
        pytest.param([0, 0], [10, 10], 10, 5.0, id="even split"),
        pytest.param([0, 0], [2, 10], 10, 8.0, id="one capped early, the other takes the rest"),
        pytest.param([6, 0], [10, 10], 10, 4.0, id="one held up by its floor"),
        pytest.param([3, 3, 3], [3, 3, 9], 12, 6.0, id="fixed members count at their floor"),
    ],
)
def test_water_level(los, his, capacity_w, expected) -> None:
    assert water_level(los, his, capacity_w) == pytest.approx(expected)


def test_minimum_cap_for_covers_the_minimum() -> None:
    for minimum_w in range(1, 5000, 7):
        cap = minimum_cap_for_w(minimum_w, 0.03)
        assert budget_w(cap, 0.03) >= minimum_w > budget_w(cap - 1, 0.03)


@pytest.mark.parametrize(
    "field, value",
    [("margin", 1.0), ("margin", -0.1), ("pinned_fraction", 2), ("deadband_fraction", -1), ("max_rounds", 0)],
)
def test_bad_settings_fail_at_start_up(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        AllocationSettings(**{field: value})


def test_a_gpu_in_two_services_is_refused() -> None:
    with pytest.raises(ValueError, match="GPU a is listed by both ns/one and ns/two"):
        allocate([Service("ns/one", 1000, (gpu("a", 1, 1),)), Service("ns/two", 1000, (gpu("a", 1, 1),))])


# --- properties ---------------------------------------------------------------------------

RACKS = ("rack-1", "rack-2", "rack-3")


@st.composite
def gpu_states(draw: st.DrawFn, uuid: str, with_history: bool) -> GpuState:
    min_w = draw(st.sampled_from([100, 150, 200, 200.5]))
    max_w = math.ceil(min_w) + draw(st.integers(0, 600))  # NVML ranges hold whole watts
    limit_w = draw(st.floats(min_w, max_w))
    return GpuState(
        uuid=uuid,
        node=f"node-{draw(st.integers(0, 5))}",
        rack=draw(st.sampled_from((*RACKS, None))),
        min_w=min_w,
        max_w=max_w,
        power_w=draw(st.floats(0, max_w * 1.1)),
        limit_w=limit_w,
        # published caps are whole watts
        previous_w=draw(st.none() | st.integers(math.ceil(min_w), int(max_w))) if with_history else None,
        fresh=draw(st.booleans()) if with_history else True,
    )


@st.composite
def problems(draw: st.DrawFn, services: int = 3, with_history: bool = False) -> tuple[list[Service], list[RackLimit]]:
    result = []
    for s in range(draw(st.integers(1, services))):
        count = draw(st.integers(1, 8))
        gpus = tuple(draw(gpu_states(f"GPU-{s}-{i}", with_history)) for i in range(count))
        result.append(Service(f"ns/svc-{s}", draw(st.integers(1, 6000)), gpus, reserved_w=draw(st.sampled_from([0, 0, 200]))))
    racks = [
        RackLimit(rack, max_power_w=draw(st.integers(100, 6000)), unmanaged_power_w=draw(st.floats(0, 1000)))
        for rack in draw(st.sets(st.sampled_from(RACKS)))
    ]
    return result, racks


def check_invariants(services: list[Service], racks: list[RackLimit], margin: float = 0.03) -> None:
    allocation = allocate(services, racks)
    for service in services:
        result = allocation.services[service.key]
        for cap, state in zip(sorted(result.caps, key=lambda c: c.uuid), sorted(service.gpus, key=lambda g: g.uuid)):
            assert state.min_w <= cap.cap_w <= state.max_w
        if result.feasible:
            assert result.allocated_w + service.reserved_w <= budget_w(service.power_cap_w, margin)
    for rack in racks:
        result = allocation.racks.get(rack.rack_id)
        if result is not None and result.feasible:
            assert result.allocated_w + rack.unmanaged_power_w <= rack.max_power_w


@settings(max_examples=300, deadline=None)
@given(problems())
def test_feasible_caps_fit_the_budget_the_racks_and_each_gpu(problem) -> None:
    check_invariants(*problem)


@settings(max_examples=300, deadline=None)
@given(problems(with_history=True))
def test_invariants_hold_with_previous_caps_and_stale_gpus(problem) -> None:
    check_invariants(*problem)


@settings(max_examples=300, deadline=None)
@given(problems(with_history=True))
def test_transitions_never_pass_the_budget(problem) -> None:
    """Whichever agents have applied the new caps, the caps in force fit the budget."""
    services, racks = problem
    allocation = allocate(services, racks)
    for service in services:
        result = allocation.services[service.key]
        before = {g.uuid: g for g in service.gpus}
        previous_w = 0
        worst_w = 0
        for cap in result.caps:
            state = before[cap.uuid]
            old_w = cap.min_w if state.previous_w is None else min(max(state.previous_w, cap.min_w), cap.max_w)
            if not state.fresh:
                old_w = cap.cap_w
            previous_w += old_w
            worst_w += max(old_w, cap.cap_w)
        if result.feasible and previous_w + service.reserved_w <= budget_w(service.power_cap_w, 0.03):
            assert worst_w + service.reserved_w <= budget_w(service.power_cap_w, 0.03)


@settings(max_examples=300, deadline=None)
@given(problems(services=1, with_history=True), st.integers(1, 3000))
def test_more_budget_never_lowers_a_cap(problem, extra_w: int) -> None:
    (service,), racks = problem
    richer = dataclasses.replace(service, power_cap_w=service.power_cap_w + extra_w)
    before = caps_of(allocate([service], racks), service.key)
    after = caps_of(allocate([richer], racks), service.key)
    assert all(after[uuid] >= before[uuid] for uuid in before)


@settings(max_examples=150, deadline=None)
@given(problems(with_history=True), st.randoms(use_true_random=False))
def test_same_input_same_output_in_any_order(problem, shuffler: random.Random) -> None:
    services, racks = problem
    shuffled = [dataclasses.replace(s, gpus=tuple(shuffler.sample(s.gpus, len(s.gpus)))) for s in services]
    shuffler.shuffle(shuffled)
    assert allocate(services, racks) == allocate(shuffled, list(reversed(racks)))


# --- the same results as before the optimisation ---------------------------------------------
# tests/reference_allocation.py is the allocator as it was before it was made faster; every
# output must stay the same, watt for watt and type for type (repr tells 200 from 200.0).

WATTS = st.integers(0, 800) | st.floats(0, 800)  # whole watts make exact sums and ties likely


def assert_same_as_reference(services: list[Service], racks: list[RackLimit],
                             settings: AllocationSettings | None = None) -> None:
    new = allocate(services, racks, settings)
    old = reference_allocation.allocate(services, racks, settings)
    assert new == old
    assert repr(new) == repr(old)


@st.composite
def varied_gpus(draw: st.DrawFn, uuid: str, racks: tuple[str, ...]) -> GpuState:
    min_w = draw(st.sampled_from([0, 100, 150, 200, 200.5]))
    max_w = math.ceil(min_w) + draw(st.sampled_from([0, 50, 500]) | st.integers(0, 600))
    limit_w = draw(st.integers(math.ceil(min_w), max_w) | st.floats(min_w, max_w))
    return GpuState(
        uuid=uuid,
        node=f"node-{draw(st.integers(0, 7))}",
        rack=draw(st.sampled_from((*racks, None))),
        min_w=min_w,
        max_w=max_w,
        # or right at the "pinned" threshold of each pinned_fraction drawn below
        power_w=draw(WATTS | st.sampled_from([limit_w, limit_w * 0.95, limit_w * 0.5])),
        limit_w=limit_w,
        previous_w=draw(st.none() | st.integers(0, max_w + 50) | st.floats(0, max_w + 50)),
        fresh=draw(st.booleans() | st.just(True)),
    )


@st.composite
def varied_problems(draw: st.DrawFn) -> tuple[list[Service], list[RackLimit]]:
    """More services, GPUs and racks than ``problems``, GPUs with min = max, previous caps
    outside [min, max], services without GPUs, racks no GPU is in."""
    racks = tuple(f"rack-{r}" for r in range(draw(st.integers(1, 5))))
    services = []
    for s in range(draw(st.integers(1, 6))):
        gpus = tuple(draw(varied_gpus(f"GPU-{s}-{i}", racks)) for i in range(draw(st.integers(0, 25))))
        services.append(Service(f"ns/svc-{s}", draw(st.integers(0, 12000) | st.floats(0, 12000)), gpus,
                                reserved_w=draw(st.sampled_from([0, 0, 200, 350.5]))))
    limits = [
        RackLimit(rack, max_power_w=draw(st.integers(0, 8000)), unmanaged_power_w=draw(WATTS))
        for rack in draw(st.sets(st.sampled_from((*racks, "rack-empty"))))
    ]
    return services, limits


allocation_settings = st.builds(
    AllocationSettings,
    margin=st.sampled_from([0.0, 0.03, 0.25]),
    pinned_fraction=st.sampled_from([0.0, 0.05, 0.5]),
    step_fraction=st.sampled_from([0.0, 0.1, 1.0]),
    headroom_fraction=st.sampled_from([0.0, 0.1, 0.4]),
    deadband_fraction=st.sampled_from([0.0, 0.05, 0.3]),
    max_rounds=st.sampled_from([1, 2, 3, 30]),
)


@settings(max_examples=300, deadline=None)
@given(problems(with_history=True) | problems())
def test_same_caps_as_before_the_optimisation(problem) -> None:
    assert_same_as_reference(*problem)


@settings(max_examples=300, deadline=None)
@given(varied_problems(), allocation_settings)
def test_same_caps_as_before_the_optimisation_on_varied_input(problem, allocation_settings) -> None:
    assert_same_as_reference(*problem, allocation_settings)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(WATTS, WATTS), min_size=1, max_size=40), WATTS | st.integers(0, 30000))
def test_same_water_level_as_before_the_optimisation(bounds: list[tuple[float, float]], capacity_w: float) -> None:
    los = [float(min(pair)) for pair in bounds]
    his = [float(max(pair)) for pair in bounds]
    lo_sorted = sorted(los)
    lo_prefix = [0.0, *accumulate(lo_sorted)]
    expected = reference_allocation._level(lo_sorted, lo_prefix, his, capacity_w)
    assert repr(_level(lo_sorted, lo_prefix, his, capacity_w)) == repr(expected)


def cluster(rng: random.Random, gpus: int, services: int, racks: int) -> tuple[list[Service], list[RackLimit]]:
    """A cluster like the benchmark's: ``services`` dealt round-robin over 8-GPU nodes, half
    the racks limited, 60 % of the GPUs busy, most GPUs with a previous cap, 1 % stale."""
    per_service: list[list[GpuState]] = [[] for _ in range(services)]
    for index in range(gpus):
        node, rack = index // 8, f"rack-{index // 8 % racks:02d}"
        min_w, max_w = rng.choice([(200, 700), (100, 350), (150.5, 400)])
        limit_w = rng.choice([min_w, max_w, round(rng.uniform(min_w, max_w))])
        busy = rng.random() < 0.6
        per_service[index % services].append(GpuState(
            uuid=f"GPU-{index:05d}", node=f"gpu-{node:04d}", rack=rack, min_w=min_w, max_w=max_w,
            power_w=limit_w * rng.uniform(0.96, 1.0) if busy else rng.uniform(50, 250),
            limit_w=limit_w, previous_w=rng.choice([limit_w, None, round(rng.uniform(min_w, max_w))]),
            fresh=rng.random() > 0.01,
        ))
    for gpu_states in per_service:
        rng.shuffle(gpu_states)
    result = [Service(f"bench/svc-{s:03d}", len(g) * rng.uniform(150, 600), tuple(g)) for s, g in enumerate(per_service)]
    limits = [RackLimit(f"rack-{r:02d}", gpus / racks * rng.uniform(300, 500), rng.uniform(0, 2000))
              for r in range(0, racks, 2)]
    return result, limits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(3000, 1, 10), (3000, 30, 10), (2000, 200, 25)], ids=lambda s: "x".join(map(str, s)))
def test_same_caps_as_before_the_optimisation_at_scale(seed: int, shape: tuple[int, int, int]) -> None:
    """Thousands of GPUs, racks shared between services: many fill rounds, every bound."""
    services, racks = cluster(random.Random(seed), *shape)
    assert_same_as_reference(services, racks)
