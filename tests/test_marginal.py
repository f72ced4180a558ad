"""Marginal tokens per watt: the estimate, its failure modes, and the allocation's invariants with it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from powercap.allocation import AllocationSettings, GpuState, RackLimit, Service, allocate, budget_w
from powercap.marginal import MarginalSettings, Member, _bisected_fill, _weighted_fill, marginal_tokens_per_w, rebalance_w
from powercap.simulation import engine
from powercap.simulation.engine import POWERCAP, simulate
from powercap.simulation.scenario import default_scenario_text, scenario_from_document
from tests.test_allocation import caps_of, check_invariants, check_transitions, problems

PINNED = 0.05


@pytest.mark.parametrize(
    "tokens_s, power_w, limit_w, expected",
    [
        pytest.param(1000.0, 398.0, 400.0, 0.4 * 1000 / 400, id="power-limited: e x tokens/s / cap in force"),
        pytest.param(1000.0, 250.0, 400.0, 0.0, id="traffic-limited (draws well below its cap): another watt buys nothing"),
        pytest.param(None, 398.0, 400.0, None, id="no rate measured (a new pod): no estimate"),
        pytest.param(0.0, 398.0, 400.0, None, id="pinned yet 0 tokens/s (a counter just reset): no estimate"),
        pytest.param(-5.0, 398.0, 400.0, None, id="a negative rate is no rate"),
        pytest.param(math.nan, 398.0, 400.0, None, id="NaN rate: no estimate"),
        pytest.param(1000.0, 0.0, 0.0, None, id="a 0 W cap in force: no estimate"),
        pytest.param(0.0, 100.0, 400.0, 0.0, id="idle and traffic-limited: 0, not unknown"),
    ],
)
def test_marginal_estimate(tokens_s: float | None, power_w: float, limit_w: float, expected: float | None) -> None:
    assert marginal_tokens_per_w(tokens_s, power_w, limit_w, PINNED) == expected


@pytest.mark.parametrize(
    "requests_waiting, expected",
    [
        pytest.param(3, 0.4 * 1000 / 400, id="requests waiting: saturated, its prefill held at the cap, so a watt buys tokens"),
        pytest.param(0, 0.0, id="no request waiting: traffic-limited"),
        pytest.param(None, 0.0, id="queue unknown (no gauge): judged by its power alone"),
    ],
)
def test_a_pod_with_requests_waiting_counts_as_pinned_though_it_draws_below_its_cap(
        requests_waiting: int | None, expected: float) -> None:
    # 300 W under a 400 W cap: a memory-bound decode (450 W saturation on an H200) between prefills held at the cap
    assert marginal_tokens_per_w(1000.0, 300.0, 400.0, PINNED, requests_waiting=requests_waiting) == expected


def member(cap_w: int, marginal: float | None, *, power_w: float | None = None, min_w: int = 200,
           max_w: int = 700, limit_w: float | None = None) -> Member:
    return Member(cap_w=cap_w, min_w=min_w, max_w=max_w, power_w=cap_w if power_w is None else power_w,
                  limit_w=cap_w if limit_w is None else limit_w, marginal=marginal, step_w=0.1 * (max_w - min_w),
                  donor_headroom_w=0.05 * (max_w - min_w))


def test_watts_move_from_the_low_to_the_high_marginal_value_at_most_a_step() -> None:
    # a: 2 tokens/s per W at the margin, b: 1. Equal marginals need a far above b; the step (50 W) bounds the move.
    caps = rebalance_w([member(400, 2.0), member(400, 1.0)])
    assert caps == [450, 350]


def test_equal_marginal_values_leave_the_caps_as_they_are() -> None:
    assert rebalance_w([member(400, 1.0), member(380, 1.0)]) == [400, 380]


def test_a_traffic_limited_gpu_gives_its_headroom_to_a_power_limited_one() -> None:
    # b draws 250 W under a 320 W cap: it keeps 250 + 25 W (5 % of its range); a takes the 45 W.
    caps = rebalance_w([member(400, 1.0), member(320, 0.0, power_w=250)])
    assert caps == [445, 275]


def test_a_gpu_without_an_estimate_keeps_its_cap() -> None:
    caps = rebalance_w([member(400, 2.0), member(400, 1.0), member(330, None)])
    assert caps[2] == 330 and sum(caps) <= 1130


def test_no_receiver_no_change() -> None:
    """Only traffic-limited GPUs (or none with tokens): the demand-following caps stand."""
    assert rebalance_w([member(300, 0.0, power_w=150), member(320, 0.0, power_w=160)]) == [300, 320]
    assert rebalance_w([member(300, None), member(320, None)]) == [300, 320]


def test_a_reset_counter_does_not_take_a_gpus_watts() -> None:
    """A rate read across a counter reset is far under its peers': it counts as no estimate."""
    caps = rebalance_w([member(400, 1.0), member(400, 1.05), member(400, 0.01)])
    assert caps[2] == 400


def test_one_noisy_reading_moves_a_cap_at_most_one_step() -> None:
    caps = rebalance_w([member(400, 1.0), member(400, 1.0), member(400, 50.0)])
    assert caps[2] - 400 <= 50 and all(400 - c <= 50 for c in caps[:2])


_RANGES = st.lists(
    # weights as rebalance_w gives them: limit_w x (value / top)^(1 / (1 - e)), values
    # screened to within outlier_ratio of their median (or a donor's 1.0)
    st.tuples(st.one_of(st.just(0.0), st.floats(1e-3, 1000)), st.integers(0, 700), st.integers(0, 300)),
    min_size=1, max_size=40,
).filter(lambda members: any(w > 0 for w, _, _ in members))


@settings(max_examples=400, deadline=None)
@given(members=_RANGES, position=st.floats(-0.1, 1.1), whole=st.booleans())
def test_the_exact_fill_gives_the_caps_the_bisection_gives(
    members: list[tuple[float, int, int]], position: float, whole: bool,
) -> None:
    """The level solved on the sum's pieces floors to the caps 60 rounds of bisection give,
    and never sums over the watts to share (the fill the allocation's rebalancing runs on
    every (service, rack) group each round)."""
    weights = [w for w, _, _ in members]
    lo = [float(low) for _, low, _ in members]
    hi = [float(low + extra) for _, low, extra in members]
    total_w = sum(lo) + position * (sum(hi) - sum(lo))
    if whole:
        total_w = float(round(total_w))
    exact, bisected = _weighted_fill(weights, lo, hi, total_w), _bisected_fill(weights, lo, hi, total_w)
    assert [math.floor(c + 1e-6) for c in exact] == [math.floor(c + 1e-6) for c in bisected]
    assert all(low <= c <= high for c, low, high in zip(exact, lo, hi))
    assert sum(exact) <= total_w or sum(lo) >= total_w


def test_a_flat_stretch_of_the_sum_is_flat_not_a_rounding_rest() -> None:
    """A review's case: weights added and taken away left a slope of 5.7e-14 where no member
    was on its linear piece, and the level solved on it (8.0, not 8.19) left 1.6 W unshared."""
    weights = [39.451463385056435, 219.66225512603899, 334.57624736958763, 12.125090756338265, 18.39755150067321,
               16.32012449935964, 76.7070097449702, 73.32138600618474, 400.0, 141.6789956321935, 215.77035480803147,
               151.553100535468]
    lo = [61.8, 0, 100, 114.9, 150.7, 416.7, 514.7, 341.0, 183.0, 307.9, 202.0, 105.0]
    hi = [62, 0.2, 188.0, 155.1, 151.3, 483.3, 615.3, 431.0, 193.0, 348.1, 242.0, 110]
    caps = _weighted_fill(weights, lo, hi, 2871.9)
    assert sum(caps) == pytest.approx(2871.9, abs=1e-6)
    assert [math.floor(c + 1e-6) for c in caps] == [math.floor(c + 1e-6) for c in _bisected_fill(weights, lo, hi, 2871.9)]


def test_caps_stay_within_the_gpu_range() -> None:
    caps = rebalance_w([member(690, 3.0, max_w=700), member(210, 1.0)])
    assert caps == [700, 200]


def test_the_estimate_follows_the_tokens_per_watt_of_mixed_gpus() -> None:
    """An H200 and an L40S, both pinned: the one making more tokens per watt gets the watts."""
    h200 = marginal_tokens_per_w(1300.0, 299.0, 300.0, PINNED)
    l40s = marginal_tokens_per_w(500.0, 299.0, 300.0, PINNED)
    caps = rebalance_w([member(300, h200), member(300, l40s, min_w=100, max_w=350)])
    assert caps[0] > 300 > caps[1] and sum(caps) <= 600


# --- through the allocation -------------------------------------------------------------


def gpu(uuid: str, power_w: float, limit_w: float, tokens_s: float | None, **extra: object) -> GpuState:
    return GpuState(uuid=uuid, node="node-1", rack="rack-1", min_w=200, max_w=700, power_w=power_w,
                    limit_w=limit_w, previous_w=limit_w, tokens_s=tokens_s, **extra)  # type: ignore[arg-type]


BUSY_SERVICE = [  # powerCapLimit 1200 W, all of it the budget: they want 450 + 450 + 380 = 1280 W
    ("fast", 398, 400, 1400.0),  # pinned: 400 + 50
    ("slow", 398, 400, 700.0),
    ("light", 330, 400, 300.0),  # traffic-limited: 330 + 50
]


ON = AllocationSettings(marginal=MarginalSettings(enabled=True))  # the default
OFF = AllocationSettings(marginal=MarginalSettings(enabled=False))  # --no-marginal-rebalancing: the fill alone


def test_allocation_moves_watts_toward_the_higher_marginal_value() -> None:
    service = Service("ns/svc", 1200, tuple(gpu(*row) for row in BUSY_SERVICE))
    with_tokens = caps_of(allocate([service], settings=ON), "ns/svc")
    assert with_tokens["fast"] > with_tokens["slow"]
    assert with_tokens["light"] < 400 and sum(with_tokens.values()) <= budget_w(1200, ON.margin)


def test_without_token_metrics_the_demand_following_fill_stands() -> None:
    """No tokens/s anywhere (the default rebalancing on), or the rebalancing off: the fill's caps, watt for watt."""
    with_tokens = Service("ns/svc", 1200, tuple(gpu(*row) for row in BUSY_SERVICE))
    without = dataclasses.replace(with_tokens, gpus=tuple(dataclasses.replace(g, tokens_s=None) for g in with_tokens.gpus))
    assert allocate([with_tokens], settings=OFF) == allocate([without], settings=OFF) == allocate([without]) == (
        allocate([without], settings=ON))
    assert caps_of(allocate([with_tokens])) != caps_of(allocate([without]))


def test_a_service_with_budget_to_spare_is_not_rebalanced() -> None:
    service = Service("ns/svc", 6000, tuple(gpu(*row) for row in BUSY_SERVICE))
    assert allocate([service], settings=ON) == allocate([service], settings=OFF)


def test_a_stale_gpu_is_held_whatever_its_tokens() -> None:
    rows = [*BUSY_SERVICE[:2], ("stale", 398, 400, 5000.0)]
    service = Service("ns/svc", 1200, tuple(gpu(*row[:4], fresh=row[0] != "stale") for row in rows))
    assert caps_of(allocate([service], settings=ON))["stale"] == 400


def test_watts_never_move_across_racks() -> None:
    """A rack at its maxPower keeps its sum: watts are traded within a (service, rack) group only."""
    gpus = (gpu("a", 398, 400, 2000.0), dataclasses.replace(gpu("b", 398, 400, 500.0), rack="rack-2"))
    service = Service("ns/svc", 900, gpus)
    racks = [RackLimit("rack-1", 400), RackLimit("rack-2", 1000)]
    caps = caps_of(allocate([service], racks, ON))
    assert caps["a"] <= 400


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="elasticity must be in \\(0, 1\\), not 1.0; outlier_ratio must be >= 1"):
        MarginalSettings(elasticity=1.0, outlier_ratio=0.5)


# --- invariants under the new fill (hypothesis) -------------------------------------------


@st.composite
def problems_with_tokens(draw: st.DrawFn) -> tuple[list[Service], list[RackLimit], AllocationSettings]:
    """test_allocation's problems, each GPU with a rate (or none, or 0), most pinned at their limit,
    each service's budget between its GPUs' minimums and maximums: budgets to trade. With the
    rebalancing on and the default margin (the whole powerCapLimit) or a 3 % one."""
    services, racks = draw(problems(with_history=True))
    allocation_settings = draw(st.sampled_from([ON, dataclasses.replace(ON, margin=0.03)]))

    def with_tokens(state: GpuState) -> GpuState:
        max_w = math.ceil(state.min_w) + draw(st.integers(100, 600))  # a range to move caps in
        limit_w = draw(st.floats(state.min_w, max_w))
        pinned = draw(st.sampled_from([True, True, False]))
        return dataclasses.replace(state, max_w=max_w, limit_w=limit_w, power_w=limit_w if pinned else state.power_w,
                                   previous_w=draw(st.none() | st.integers(math.ceil(state.min_w), max_w)),
                                   fresh=state.fresh or draw(st.booleans()),
                                   tokens_s=draw(st.sampled_from([300.0, 800.0, 1500.0, 2500.0]) | st.none() | st.just(0.0)))

    def short(service: Service) -> Service:
        low, high = sum(g.min_w for g in service.gpus), sum(g.max_w for g in service.gpus)
        return dataclasses.replace(service, gpus=tuple(map(with_tokens, service.gpus)), reserved_w=0.0,
                                   power_cap_w=draw(st.integers(math.ceil(low), math.ceil(high) + 1))
                                   / (1 - allocation_settings.margin))

    return [short(s) for s in services], racks, allocation_settings


@settings(max_examples=500, deadline=None)
@given(problems_with_tokens())
def test_sum_of_caps_invariant_holds_with_marginal_rebalancing(problem) -> None:
    """DESIGN.md section 5: every cap in [min, max], each service within its budget, each rack within maxPower."""
    check_invariants(*problem)


@settings(max_examples=500, deadline=None)
@given(problems_with_tokens())
def test_transitions_never_pass_the_budget_with_marginal_rebalancing(problem) -> None:
    """Whichever agents have applied the new caps (old and new mixed), the caps in force fit the budget."""
    check_transitions(*problem)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(200, 700), st.none() | st.just(0.0) | st.floats(0.01, 50)), min_size=1, max_size=10))
def test_rebalance_never_raises_the_group_sum(rows: list[tuple[int, float | None]]) -> None:
    members = [member(cap, value, power_w=cap * (0.5 if value == 0 else 1.0)) for cap, value in rows]
    caps = rebalance_w(members)
    assert sum(caps) <= sum(cap for cap, _ in rows)
    assert all(200 <= c <= 700 for c in caps)


def test_values_within_the_noise_band_count_as_equal() -> None:
    """Three busy replicas alike, their rates read 1.0, 1.2 and 0.85 (within 30 % of the median,
    what one 5-s scrape to the next moves): the fill's caps stand, nothing to write. 2x apart
    (the median of a pair 33 % from each) they move a step."""
    alike = [member(400, 1.0), member(400, 1.2), member(400, 0.85)]
    assert rebalance_w(alike) == [400, 400, 400]
    assert rebalance_w(alike, equal_within=0.0) != [400, 400, 400]  # without the band: noise moves caps
    apart = rebalance_w([member(400, 2.0), member(400, 1.0)])
    assert apart[0] > 400 > apart[1] and sum(apart) <= 800


def test_a_steady_day_does_not_rewrite_the_allocations_round_after_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in scenario with every service at its peak all day (no cap change), through the
    simulator's real controller rounds (every 5 s, 3 policies: at most 36 writes a minute).
    Measured: 1-2 allocation changes a minute after the first 3 minutes with the default
    noise band, 7-10 without it (a 5-s rate moving 20-30 % between alike replicas)."""
    document = yaml.safe_load(default_scenario_text())
    for service in document["services"]:
        service["dailyShape"] = "flat"
    document["events"] = []
    changes_at: list[float] = []
    write = engine._Run._write_status

    def counting(run: Any, key: str, status: Any) -> None:
        if run.world.policies[key].get("status", {}).get("allocations") != status.get("allocations"):
            changes_at.append(run.clock_s)
        write(run, key, status)

    round_at = engine._Run._controller_round

    def timed(run: Any, t_s: float) -> None:
        run.clock_s = t_s
        round_at(run, t_s)

    monkeypatch.setattr(engine._Run, "_write_status", counting)
    monkeypatch.setattr(engine._Run, "_controller_round", timed)
    simulate(scenario_from_document(document).with_overrides(seed=1), [POWERCAP])
    steady = [t for t in changes_at if t >= 180]
    assert len(steady) / ((600 - 180) / 60) <= 4, f"{len(steady)} allocation changes in the last 7 minutes"
