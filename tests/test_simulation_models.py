"""The simulator's own models: traffic shape and split, rack inlet, and the figures' definitions."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from powercap import physics
from powercap.simulation.decisions import OracleGpu, oracle_greedy_w, oracle_split_w
from powercap.simulation.metrics import excluded_seconds, recovery_time_s, weighted_percentile
from powercap.simulation.scenario import Burst, Cooling, Rack, default_scenario_text, load_scenario
from powercap.simulation.workload import bounded_shares, build_trace, daily_factor, pod_weight
from powercap.simulation.world import GpuArrays, SimRack, steady_inlet_c


@pytest.mark.parametrize(
    "hour, expected",
    [
        pytest.param(0.0, 0.0, id="midnight"),
        pytest.param(12.5, 12.5, id="between two hours"),
        pytest.param(23.5, 11.5, id="wraps to midnight"),
        pytest.param(48.0, 0.0, id="the next day"),
    ],
)
def test_daily_factor_interpolates_the_hourly_shape(hour: float, expected: float) -> None:
    shape = [float(h) for h in range(24)]
    assert daily_factor(shape, hour) == pytest.approx(expected)


def test_the_trace_follows_the_compressed_day_and_the_bursts() -> None:
    scenario = load_scenario(default_scenario_text()).with_overrides(duration_s=240)
    workload = dataclasses.replace(
        scenario.workload, noise=0.0, bursts=(Burst("chat", 100.0, 10.0, 2.0),), random_bursts=dataclasses.replace(scenario.workload.random_bursts, count=0)
    )
    trace = build_trace(dataclasses.replace(scenario, workload=workload))
    chat, service = trace.per_second["chat"], scenario.service("chat")
    assert len(chat) == 241

    def expected(second: int) -> float:  # the day starts at 06:00 and lasts 240 s
        return service.peak_tokens_s * daily_factor(service.daily_shape, 6 + 24 * second / 240)

    assert chat[60] == pytest.approx(expected(60))  # 12:00
    assert chat[60] > 2 * chat[200]  # 02:00: the chat shape is busy by day, quiet at night
    assert chat[105] == pytest.approx(2 * expected(105))  # inside the burst
    assert chat[110] == pytest.approx(expected(110))  # after it
    assert trace.offered_tokens_s("chat", 10.5) == pytest.approx((chat[10] + chat[11]) / 2)


def test_noise_and_random_bursts_come_from_the_seed() -> None:
    scenario = load_scenario(default_scenario_text()).with_overrides(duration_s=120)
    assert build_trace(scenario) == build_trace(scenario)
    other = build_trace(scenario.with_overrides(seed=5))
    assert other.per_second["chat"] != build_trace(scenario).per_second["chat"]
    assert len(other.bursts) == len(scenario.workload.bursts) + scenario.workload.random_bursts.count


@pytest.mark.parametrize(
    "weights, capacities, bound, expected",
    [
        pytest.param([1, 1, 1, 1], [1, 1, 1, 1], 1.25, [0.25] * 4, id="equal"),
        pytest.param([1, 1], [3, 1], 2.0, [0.75, 0.25], id="in proportion to capacity"),
        pytest.param([4, 1, 1, 1], [1, 1, 1, 1], 1.25, [0.3125, 0.2291667, 0.2291667, 0.2291667], id="a hot pod held at its bound"),
        pytest.param([4, 1, 1, 1], [1, 1, 1, 1], 100.0, [4 / 7, 1 / 7, 1 / 7, 1 / 7], id="no bound in effect"),
        pytest.param([9, 9, 1], [1, 1, 1], 1.2, [0.4, 0.4, 0.2], id="two pods at the bound"),
        pytest.param([], [], 1.25, [], id="no pods"),
    ],
)
def test_bounded_shares(weights: list[float], capacities: list[float], bound: float, expected: list[float]) -> None:
    shares = bounded_shares(weights, capacities, bound)
    assert shares == pytest.approx(expected, abs=1e-6)
    if shares:
        assert math.fsum(shares) == pytest.approx(1.0)
        total = sum(capacities)
        assert all(share <= bound * c / total + 1e-9 for share, c in zip(shares, capacities))


def test_a_pod_keeps_its_weight_whatever_else_happens() -> None:
    service = load_scenario(default_scenario_text()).service("chat")
    assert pod_weight(1, service, 3) == pod_weight(1, service, 3)
    assert pod_weight(1, service, 3) != pod_weight(2, service, 3)


def test_rack_inlet_rises_with_rack_power_with_a_time_constant() -> None:
    spec = Rack("r", 10_000, 30, Cooling(supply_c=20, rise_c_per_kw=0.8, time_constant_s=60))
    rack = SimRack(spec=spec, inlet_c=20.0, power_w=10_000)
    assert steady_inlet_c(spec, 10_000) == pytest.approx(28.0)
    rack.step_inlet(60.0)
    assert rack.inlet_c == pytest.approx(28.0 - 8.0 * math.exp(-1))  # one time constant: 63 % of the way
    for _ in range(600):
        rack.step_inlet(1.0)
    assert rack.inlet_c == pytest.approx(28.0, abs=1e-3)


@pytest.mark.parametrize(
    "samples, fraction, expected",
    [
        pytest.param([(1.0, 1), (2.0, 1), (3.0, 98)], 0.99, 3.0, id="heavy tail"),
        pytest.param([(10.0, 1), (1.0, 99)], 0.99, 1.0, id="the rare slow sample is within the 1 %"),
        pytest.param([(10.0, 2), (1.0, 98)], 0.99, 10.0, id="2 % slow"),
        pytest.param([(5.0, 0.0)], 0.99, None, id="no weight"),
    ],
)
def test_weighted_percentile(samples: list[tuple[float, float]], fraction: float, expected: float | None) -> None:
    assert weighted_percentile(samples, fraction) == expected


def test_recovery_time_is_the_time_until_power_stays_under_the_cap() -> None:
    step_s = 0.1
    power = [900.0] * 100 + [850.0] * 12 + [790.0] * 300  # cap 800 from step 100 (10 s)
    assert recovery_time_s(power, step_s, 10.0, 800.0) == pytest.approx(1.2)
    flicker = [900.0] * 100 + [790.0] * 5 + [820.0] * 5 + [790.0] * 300
    assert recovery_time_s(flicker, step_s, 10.0, 800.0) == pytest.approx(1.0)
    assert recovery_time_s([900.0] * 300, step_s, 10.0, 800.0) is None


def test_convergence_leaves_out_the_warmup_and_each_settling_window() -> None:
    assert excluded_seconds(100, 10, [50.5], 3) == set(range(10)) | {50, 51, 52, 53, 54}


H200 = physics.H200_LIKE
L40S = physics.L40S_LIKE
FULL_CHAT = physics.Workload(1.0, 0.25)


def total_tokens(gpus: list[OracleGpu], caps: list[float]) -> float:
    return math.fsum(g.tokens_s(c) for g, c in zip(gpus, caps))


@pytest.mark.parametrize(
    "gpus, cap_w",
    [
        pytest.param([OracleGpu(H200, FULL_CHAT)] * 4, 1400, id="four equal saturated GPUs"),
        pytest.param([OracleGpu(H200, FULL_CHAT), OracleGpu(H200, physics.Workload(0.2, 0.25))] * 2, 1400, id="two busy, two light"),
        pytest.param([OracleGpu(H200, FULL_CHAT), OracleGpu(L40S, FULL_CHAT)] * 2, 1200, id="H200 and L40S"),
        pytest.param([OracleGpu(H200, physics.IDLE)] * 3, 1500, id="nothing to serve"),
    ],
)
def test_the_oracle_split_stays_within_the_cap_and_serves_at_least_the_equal_split(gpus: list[OracleGpu], cap_w: float) -> None:
    caps = oracle_split_w(gpus, cap_w)
    assert math.fsum(caps) <= cap_w + 1e-6
    assert all(g.model.min_limit_w <= c <= g.model.max_limit_w for g, c in zip(gpus, caps))
    equal = [physics.clamp_limit_w(g.model, cap_w / len(gpus)) for g in gpus]
    assert total_tokens(gpus, caps) >= total_tokens(gpus, equal) - 1e-6


def test_the_oracle_gives_the_watts_of_light_gpus_to_busy_ones() -> None:
    busy, light = OracleGpu(H200, FULL_CHAT), OracleGpu(H200, physics.Workload(0.2, 0.25))
    caps = oracle_split_w([busy, light, busy, light], 1400)
    assert caps[1] == caps[3] == H200.min_limit_w  # 200 W serve the light GPUs' whole load
    assert caps[0] == caps[2] == pytest.approx(500)
    assert light.tokens_s(caps[1]) == pytest.approx(light.tokens_s(H200.max_limit_w))


def test_the_oracle_favours_the_gpu_that_turns_watts_into_more_tokens() -> None:
    h200, l40s = OracleGpu(H200, FULL_CHAT), OracleGpu(L40S, FULL_CHAT)
    caps = oracle_split_w([h200, l40s], 600)
    assert caps[0] > 300 > caps[1]  # an equal split would give each 300 W
    assert total_tokens([h200, l40s], caps) > total_tokens([h200, l40s], [300, 300]) * 1.03


def test_the_oracle_spreads_watts_nobody_needs_and_keeps_minimums_under_a_tiny_cap() -> None:
    idle = [OracleGpu(H200, physics.IDLE)] * 3
    assert oracle_split_w(idle, 1500) == pytest.approx([500, 500, 500])
    assert oracle_split_w(idle, 300) == [200, 200, 200]


def test_the_gpu_arrays_advance_every_gpu_as_the_scalar_physics_does() -> None:
    """GpuArrays.advance is physics.advance on arrays: hot, throttled, idle, saturated and rising-edge GPUs alike."""
    rng = random.Random(7)
    models = [rng.choice([physics.H200_LIKE, physics.L40S_LIKE]) for _ in range(2000)]
    arrays = GpuArrays(models, [rng.uniform(15.0, 40.0) for _ in models])
    states = []
    for slot, model in enumerate(models):
        state = physics.GpuState(
            power_w=rng.uniform(model.idle_w, model.max_limit_w * 1.05),
            temperature_c=rng.uniform(30.0, model.shutdown_c + 3.0),  # some in thermal slowdown
            energy_j=rng.uniform(0.0, 1e6),
            tokens=rng.uniform(0.0, 1e7),
        )
        states.append(state)
        arrays.power_w[slot], arrays.temperature_c[slot] = state.power_w, state.temperature_c
        arrays.energy_j[slot], arrays.tokens[slot] = state.energy_j, state.tokens
        arrays.cap_w[slot] = rng.uniform(model.min_limit_w - 50.0, model.max_limit_w + 50.0)
        arrays.load[slot] = rng.choice([0.0, 1.0, rng.uniform(0.0, 1.2)])
        arrays.prefill_share[slot] = rng.uniform(0.0, 1.0)
    inlet_c = [rng.uniform(18.0, 35.0) for _ in models]
    expected = [
        physics.advance(model, state, float(arrays.cap_w[slot]),
                        physics.Workload(float(arrays.load[slot]), float(arrays.prefill_share[slot])), inlet_c[slot], 0.1)
        for slot, (model, state) in enumerate(zip(models, states))
    ]
    energy_step_j, token_step = arrays.advance(np.array(inlet_c), 0.1)
    for slot, (state, new) in enumerate(zip(states, expected)):
        assert float(arrays.power_w[slot]) == pytest.approx(new.power_w, rel=1e-12)
        assert float(arrays.temperature_c[slot]) == pytest.approx(new.temperature_c, rel=1e-12)
        assert float(arrays.tokens_s[slot]) == pytest.approx(new.tokens_s, rel=1e-12, abs=1e-9)
        assert float(energy_step_j[slot]) == pytest.approx(new.energy_j - state.energy_j, rel=1e-9)
        assert float(token_step[slot]) == pytest.approx(new.tokens - state.tokens, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_the_oracle_fills_by_classes_exactly_as_step_by_step(seed: int) -> None:
    """oracle_split_w (the fill by classes of equal gain) takes the very steps oracle_greedy_w pops one by one:
    mixed models, prefill shares, tokens scales and loads (idle, saturated, in between), caps from nothing to plenty."""
    rng = random.Random(seed)
    for _ in range(60):
        gpus = [
            OracleGpu(
                rng.choice([H200, L40S]),
                physics.Workload(rng.choice([0.0, 1.0, rng.uniform(0.0, 1.0), rng.uniform(0.9, 1.0)]), rng.choice([0.0, 0.1, 0.25, 0.5, 1.0])),
                rng.choice([1.0, 2.0588, 8.75]),
            )
            for _ in range(rng.randint(1, 40))
        ]
        cap_w = rng.uniform(0.0, 1.1 * sum(g.model.max_limit_w for g in gpus))
        assert oracle_split_w(gpus, cap_w) == pytest.approx(oracle_greedy_w(gpus, cap_w), abs=1e-9)
