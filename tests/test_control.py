"""The per-GPU cap control law: one row per situation an operator would ask about."""

from __future__ import annotations

from dataclasses import replace

import pytest

from powercap.control import CapReason, ControlSettings, ControlState, GpuMeasurement, next_cap
from powercap.policies import PerformanceTarget

H100 = GpuMeasurement(current_cap_w=400, min_w=200, max_w=700, allocation_w=400, temperature_c=60, slowdown_c=89)
TARGET = PerformanceTarget(target_tokens_per_joule=1.0, tolerance_pct=10)


@pytest.mark.parametrize(
    ("measurement", "state", "cap_w", "reason", "change"),
    [
        pytest.param(H100, ControlState(), 400, CapReason.ALLOCATION, False, id="at-allocation-holds"),
        pytest.param(replace(H100, allocation_w=500), ControlState(), 500, CapReason.ALLOCATION, True, id="allocation-raised"),
        pytest.param(replace(H100, allocation_w=398), ControlState(), 398, CapReason.ALLOCATION, True, id="small-cut-below-allocation-still-applied"),
        pytest.param(replace(H100, allocation_w=403), ControlState(), 400, CapReason.HOLD, False, id="small-raise-ignored-hysteresis"),
        pytest.param(replace(H100, allocation_w=405), ControlState(), 405, CapReason.ALLOCATION, True, id="raise-of-one-whole-hysteresis-step-applied"),
        pytest.param(replace(H100, allocation_w=900), ControlState(), 700, CapReason.ALLOCATION, True, id="allocation-clamped-to-max"),
        pytest.param(replace(H100, allocation_w=50), ControlState(), 200, CapReason.ALLOCATION, True, id="allocation-clamped-to-min"),
        pytest.param(replace(H100, allocation_w=None), ControlState(), 200, CapReason.NO_ALLOCATION, True, id="new-gpu-runs-at-minimum"),
        pytest.param(replace(H100, target=TARGET, tokens_per_joule=0.8), ControlState(), 390, CapReason.RATIO_DOWN, True, id="below-target-steps-down"),
        pytest.param(replace(H100, target=TARGET, tokens_per_joule=0.95), ControlState(), 400, CapReason.ALLOCATION, False, id="within-tolerance-holds"),
        pytest.param(replace(H100, current_cap_w=350, target=TARGET, tokens_per_joule=1.5), ControlState(ratio_offset_w=50), 360, CapReason.RATIO_UP, True, id="above-target-steps-up"),
        pytest.param(replace(H100, target=TARGET, tokens_per_joule=1.5), ControlState(), 400, CapReason.ALLOCATION, False, id="above-target-never-past-allocation"),
        pytest.param(replace(H100, current_cap_w=200, allocation_w=200, target=TARGET, tokens_per_joule=0.1), ControlState(), 200, CapReason.RATIO_DOWN, False, id="ratio-never-below-min"),
        pytest.param(replace(H100, temperature_c=87), ControlState(), 340, CapReason.THERMAL_CUT, True, id="gpu-near-slowdown-cuts"),
        pytest.param(replace(H100, inlet_c=30, max_inlet_c=30), ControlState(), 340, CapReason.THERMAL_CUT, True, id="rack-inlet-at-limit-cuts"),
        pytest.param(replace(H100, inlet_c=29.9, max_inlet_c=30), ControlState(), 400, CapReason.ALLOCATION, False, id="rack-inlet-below-limit"),
        pytest.param(replace(H100, current_cap_w=340, temperature_c=88), ControlState(thermal_limit_w=340, last_cut_at_s=98), 340, CapReason.THERMAL_CUT, False, id="no-second-cut-within-interval"),
        pytest.param(replace(H100, current_cap_w=340, temperature_c=88), ControlState(thermal_limit_w=340, last_cut_at_s=90), 289, CapReason.THERMAL_CUT, True, id="cut-again-after-interval"),
        pytest.param(replace(H100, current_cap_w=340), ControlState(thermal_limit_w=340, last_cut_at_s=90), 350, CapReason.THERMAL_RELEASE, True, id="release-additively"),
        pytest.param(replace(H100, current_cap_w=395), ControlState(thermal_limit_w=395, last_cut_at_s=90), 400, CapReason.THERMAL_RELEASE, True, id="release-ends-at-allocation"),
        pytest.param(replace(H100, current_cap_w=210, temperature_c=94), ControlState(thermal_limit_w=210, last_cut_at_s=0), 200, CapReason.THERMAL_CUT, True, id="cut-never-below-min"),
        pytest.param(replace(H100, allocation_w=600, policy_fresh=False), ControlState(), 400, CapReason.STALE_POLICY, False, id="stale-policy-never-raises"),
        pytest.param(replace(H100, allocation_w=None, policy_fresh=False), ControlState(), 400, CapReason.STALE_POLICY, False, id="stale-policy-keeps-caps"),
        pytest.param(replace(H100, temperature_c=90, policy_fresh=False), ControlState(), 340, CapReason.THERMAL_CUT, True, id="stale-policy-still-cuts-for-heat"),
        pytest.param(replace(H100, current_cap_w=700, allocation_w=400), ControlState(), 400, CapReason.ALLOCATION, True, id="cap-above-allocation-lowered"),
    ],
)
def test_control_law(measurement: GpuMeasurement, state: ControlState, cap_w: float, reason: CapReason, change: bool) -> None:
    decision = next_cap(measurement, state, now_s=100.0)
    assert decision.cap_w == pytest.approx(cap_w)
    assert decision.reason is reason
    assert decision.change is change


def test_thermal_emergency_converges_and_recovers() -> None:
    """A hot GPU is cut until it cools, then released back to its allocation, never below min."""
    settings = ControlSettings()
    measurement, state, now_s = H100, ControlState(), 0.0
    caps = []
    for tick in range(120):
        hot = tick < 30
        measurement = replace(measurement, temperature_c=90 if hot else 70)
        decision = next_cap(measurement, state, now_s, settings)
        state, now_s = decision.state, now_s + 1.0
        measurement = replace(measurement, current_cap_w=decision.cap_w)
        caps.append(decision.cap_w)
    assert min(caps) == 200
    assert caps[29] < caps[0]
    assert caps[-1] == 400
    assert state.thermal_limit_w is None


def test_ratio_loop_settles_inside_the_dead_band() -> None:
    """tokens/J rises as the cap falls (concave throughput): the loop stops inside the band."""
    measurement, state = replace(H100, allocation_w=700, current_cap_w=700, target=TARGET), ControlState()
    for tick in range(100):
        tokens_per_joule = 1.2 * (400 / measurement.current_cap_w) ** 0.5  # 1.2 tokens/J at 400 W
        decision = next_cap(replace(measurement, tokens_per_joule=tokens_per_joule), state, float(tick))
        state = decision.state
        measurement = replace(measurement, current_cap_w=decision.cap_w)
    final_ratio = 1.2 * (400 / measurement.current_cap_w) ** 0.5
    assert TARGET.low_tokens_per_joule <= final_ratio <= TARGET.high_tokens_per_joule


def test_a_lowered_allocation_is_the_reason_even_while_the_ratio_loop_steps() -> None:
    """A GPU under its tokens/J target whose allocation falls below its cap: the cap comes down
    because of the allocation (the loop's step rides along), and says so; the agent publishes
    such a lower at once (the controller's raises wait on it), not a loop's step."""
    below_target = GpuMeasurement(current_cap_w=500, min_w=200, max_w=700, allocation_w=300, tokens_per_joule=0.5,
                                  target=TARGET)
    decision = next_cap(below_target, ControlState(), 0.0)
    assert decision.change and decision.cap_w < 300
    assert decision.reason is CapReason.ALLOCATION
    # at the new allocation, the loop's next step is the loop's
    stepped = next_cap(replace(below_target, current_cap_w=decision.cap_w), decision.state, 1.0)
    assert stepped.reason is CapReason.RATIO_DOWN
