"""The GPU physics model (powercap.physics): invariants a simulator user relies on."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from powercap import physics
from powercap.physics import H200_LIKE, L40S_LIKE, GpuModel, Workload

MODELS = [pytest.param(H200_LIKE, id="h200"), pytest.param(L40S_LIKE, id="l40s")]
WORKLOADS = [
    pytest.param(Workload(load=1.0, prefill_share=1.0), id="prefill-only"),
    pytest.param(Workload(load=1.0, prefill_share=0.0), id="decode-only"),
    pytest.param(Workload(load=1.0, prefill_share=0.2), id="mixed-full-load"),
    pytest.param(Workload(load=0.4, prefill_share=0.3), id="mixed-partial-load"),
    pytest.param(physics.IDLE, id="idle"),
]


def caps_w(model: GpuModel, steps: int = 20) -> list[float]:
    span = model.max_limit_w - model.min_limit_w
    return [model.min_limit_w + span * i / steps for i in range(steps + 1)]


def run(
    model: GpuModel,
    cap_w: float,
    workload: Workload,
    *,
    seconds: float,
    dt_s: float,
    inlet_c: float = 25.0,
    state: physics.GpuState | None = None,
) -> tuple[physics.GpuState, list[physics.GpuState]]:
    state = state or physics.initial_state(model, inlet_c)
    trace = []
    for _ in range(round(seconds / dt_s)):
        state = physics.advance(model, state, cap_w, workload, inlet_c, dt_s)
        trace.append(state)
    return state, trace


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_steady_power_is_min_of_demand_and_cap_at_most(
    model: GpuModel, workload: Workload
) -> None:
    demand_w = physics.demand_power_w(model, workload)
    for cap_w in caps_w(model):
        point = physics.operating_point(model, cap_w, workload)
        assert point.power_w <= min(demand_w, cap_w) + 1e-9
        assert point.power_w >= min(model.idle_w, cap_w) - 1e-9


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    "dt_s", [pytest.param(0.1, id="nvml-100ms"), pytest.param(1.0, id="tick-1s")]
)
def test_burst_overshoots_briefly_then_settles_at_the_cap(model: GpuModel, dt_s: float) -> None:
    burst = Workload(load=1.0, prefill_share=1.0)
    cap_w = model.max_limit_w
    final, trace = run(model, cap_w, burst, seconds=3.0, dt_s=dt_s)
    peak_w = max(s.power_w for s in trace)
    assert cap_w < peak_w <= cap_w * (1 + model.overshoot_fraction) + 1e-9
    assert final.power_w == pytest.approx(cap_w, abs=0.5)


def test_h200_burst_reproduces_the_measured_748_w() -> None:
    _, trace = run(H200_LIKE, 700.0, Workload(1.0, 1.0), seconds=0.5, dt_s=0.1)
    assert max(s.power_w for s in trace) == pytest.approx(748.0, abs=2.0)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_power_settles_to_its_steady_state_below_the_cap(
    model: GpuModel, workload: Workload
) -> None:
    cap_w = (model.min_limit_w + model.max_limit_w) / 2
    final, trace = run(model, cap_w, workload, seconds=5.0, dt_s=0.1)
    assert final.power_w == pytest.approx(physics.operating_point(model, cap_w, workload).power_w)
    settled = trace[len(trace) // 2 :]
    assert max(s.power_w for s in settled) <= cap_w + 1e-6


def test_lowering_the_cap_pulls_power_down_within_a_second() -> None:
    busy = Workload(1.0, 1.0)
    state, _ = run(H200_LIKE, 700.0, busy, seconds=2.0, dt_s=0.1)
    state, _ = run(H200_LIKE, 300.0, busy, seconds=1.0, dt_s=0.1, state=state)
    assert state.power_w == pytest.approx(300.0, abs=1.0)


@pytest.mark.parametrize(
    ("inlet_c", "power_w"),
    [
        pytest.param(20.0, 100.0, id="cool-idle"),
        pytest.param(25.0, 700.0, id="nominal-full"),
        pytest.param(35.0, 450.0, id="warm-decode"),
    ],
)
def test_temperature_converges_to_inlet_plus_r_times_p(inlet_c: float, power_w: float) -> None:
    model = H200_LIKE
    temp_c = 60.0
    for _ in range(round(10 * model.thermal_time_constant_s)):
        temp_c = physics.step_temperature_c(model, temp_c, inlet_c, power_w, 1.0)
    assert temp_c == pytest.approx(inlet_c + model.thermal_resistance_c_per_w * power_w, abs=0.01)


def test_temperature_lags_power_by_its_time_constant() -> None:
    model = H200_LIKE
    start_c, target_c = 30.0, physics.steady_temperature_c(model, 30.0, 700.0)
    after_c = physics.step_temperature_c(model, start_c, 30.0, 700.0, model.thermal_time_constant_s)
    assert (after_c - start_c) / (target_c - start_c) == pytest.approx(1 - 1 / math.e)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("workload", WORKLOADS[:4])
def test_throughput_is_concave_and_non_decreasing_in_the_cap(
    model: GpuModel, workload: Workload
) -> None:
    throughput = [
        physics.operating_point(model, c, workload).relative_throughput for c in caps_w(model)
    ]
    steps = [b - a for a, b in itertools.pairwise(throughput)]
    assert all(step >= -1e-12 for step in steps)
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(steps))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fraction_of_max", [0.45, 0.6, 0.75])
def test_a_cap_costs_prefill_more_than_decode(model: GpuModel, fraction_of_max: float) -> None:
    cap_w = model.max_limit_w * fraction_of_max
    prefill = physics.operating_point(model, cap_w, Workload(1.0, 1.0)).relative_throughput
    decode = physics.operating_point(model, cap_w, Workload(1.0, 0.0)).relative_throughput
    assert prefill < decode


@pytest.mark.parametrize("model", MODELS)
def test_decode_saturates_far_below_the_max_limit(model: GpuModel) -> None:
    decode = Workload(1.0, 0.0)
    at_max = physics.operating_point(model, model.max_limit_w, decode)
    at_saturation = physics.operating_point(model, model.decode_saturation_w, decode)
    assert at_saturation.tokens_s == at_max.tokens_s == model.peak_tokens_s
    assert at_max.power_w <= 0.75 * model.max_limit_w


@pytest.mark.parametrize("model", MODELS)
def test_lower_cap_buys_tokens_per_joule_for_decode_heavy_load(model: GpuModel) -> None:
    mix = Workload(1.0, 0.2)
    low = physics.operating_point(model, model.min_limit_w, mix)
    high = physics.operating_point(model, model.max_limit_w, mix)
    assert low.tokens_per_joule > high.tokens_per_joule
    assert low.tokens_s < high.tokens_s


def test_partial_load_keeps_its_throughput_under_a_moderate_cap() -> None:
    light = Workload(load=0.4, prefill_share=0.2)
    capped = physics.operating_point(H200_LIKE, 400.0, light)
    assert capped.relative_throughput == pytest.approx(0.4)
    assert capped.busy_fraction > 0.4


@pytest.mark.parametrize(
    ("temp_c", "expected_w"),
    [
        pytest.param(60.0, 700.0, id="cool"),
        pytest.param(89.0, 700.0, id="at-slowdown"),
        pytest.param(92.0, 450.0, id="halfway-to-shutdown"),
        pytest.param(95.0, 200.0, id="at-shutdown"),
        pytest.param(120.0, 200.0, id="beyond-shutdown"),
    ],
)
def test_thermal_slowdown_pulls_the_effective_cap_to_min(temp_c: float, expected_w: float) -> None:
    assert physics.thermal_cap_w(H200_LIKE, 700.0, temp_c) == pytest.approx(expected_w)


def test_hot_inlet_throttles_the_gpu_below_shutdown() -> None:
    final, trace = run(H200_LIKE, 700.0, Workload(1.0, 1.0), seconds=300.0, dt_s=1.0, inlet_c=45.0)
    assert max(s.temperature_c for s in trace) < H200_LIKE.shutdown_c
    assert final.temperature_c > H200_LIKE.slowdown_c
    assert final.power_w < 700.0


def test_advance_integrates_energy_and_tokens() -> None:
    decode = Workload(1.0, 0.0)
    point = physics.operating_point(H200_LIKE, 700.0, decode)
    start = dataclasses.replace(physics.initial_state(H200_LIKE, 25.0), power_w=point.power_w)
    final, _ = run(H200_LIKE, 700.0, decode, seconds=10.0, dt_s=0.5, state=start)
    assert final.energy_j == pytest.approx(point.power_w * 10.0)
    assert final.tokens == pytest.approx(point.tokens_s * 10.0)
    assert final.tokens_s == point.tokens_s


@pytest.mark.parametrize(
    ("workload", "clamped"),
    [
        pytest.param(Workload(-1.0, 0.2), Workload(0.0, 0.2), id="negative-load"),
        pytest.param(Workload(3.0, 0.2), Workload(1.0, 0.2), id="overload"),
        pytest.param(Workload(1.0, 1.5), Workload(1.0, 1.0), id="share-above-one"),
    ],
)
def test_out_of_range_workloads_are_clamped(workload: Workload, clamped: Workload) -> None:
    assert physics.operating_point(H200_LIKE, 500.0, workload) == physics.operating_point(
        H200_LIKE, 500.0, clamped
    )


@pytest.mark.parametrize(
    ("cap_w", "clamped_w"),
    [pytest.param(0.0, 200.0, id="below-min"), pytest.param(5000.0, 700.0, id="above-max")],
)
def test_out_of_range_caps_are_clamped_to_nvml_constraints(cap_w: float, clamped_w: float) -> None:
    mix = Workload(1.0, 0.5)
    assert physics.operating_point(H200_LIKE, cap_w, mix) == physics.operating_point(
        H200_LIKE, clamped_w, mix
    )


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        pytest.param({"idle_w": 250.0}, ["idle_w"], id="idle-above-min"),
        pytest.param({"default_limit_w": 800.0}, ["default_limit_w"], id="default-above-max"),
        pytest.param({"decode_exponent": 1.5}, ["decode_exponent"], id="convex"),
        pytest.param(
            {"shutdown_c": 80.0, "peak_tokens_s": 0.0},
            ["peak_tokens_s", "slowdown_c"],
            id="two-problems",
        ),
    ],
)
def test_inconsistent_model_names_every_bad_field(changes: dict, fields: list[str]) -> None:
    with pytest.raises(ValueError) as raised:
        dataclasses.replace(H200_LIKE, **changes)
    for field in fields:
        assert f"{field}:" in str(raised.value)


def test_presets_are_reachable_by_name() -> None:
    assert physics.PRESETS["H200-like"] is H200_LIKE
    assert physics.PRESETS["L40S-like"].max_limit_w == 350.0
