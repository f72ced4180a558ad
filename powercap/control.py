"""The per-GPU cap control law the node agent runs every tick (DESIGN.md section 6).

Pure: given what the agent measured and what it remembers from the last tick, say which
power limit the GPU should have and why. The agent does the I/O (NVML, Prometheus); the
simulator runs this very function in simulated time.

The law, per GPU and tick::

    ceiling  = clamp(allocation, min, max)           allocation: the controller's per-GPU cap;
                                                      a GPU with no allocation yet runs at min
    offset   = watts the performance-power ratio loop holds below the ceiling:
                 + step  while tokens/J < target x (1 - tolerance)   (inefficient: step down)
                 - step  while tokens/J > target x (1 + tolerance)   (efficient: step back up)
                 clamped to [0, ceiling - min]
    thermal  = a limit that is cut multiplicatively (x cut_factor, at most once per
               cut_interval_s) while rack inlet >= maxTemperature or the GPU is within
               gpu_margin_c of its NVML slowdown temperature, and released additively
               (+ release_w per tick) once both are clear; gone when it reaches the ceiling
    target   = clamp(min(ceiling - offset, thermal), min, max)

Safety rules on top:
- a cap above the ceiling is always lowered at once (no hysteresis on the way down to it):
  the sum of a service's caps must never exceed its powerCapLimit;
- other moves smaller than ``hysteresis_w`` are ignored (no NVML write for noise);
- without a fresh policy (API server unreachable) the cap is kept as it is; only a thermal
  cut may lower it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from powercap.numeric import clamp
from powercap.policies import PerformanceTarget


class CapReason(str, Enum):
    HOLD = "hold"
    ALLOCATION = "allocation"
    NO_ALLOCATION = "no-allocation"
    RATIO_DOWN = "ratio-down"
    RATIO_UP = "ratio-up"
    THERMAL_CUT = "thermal-cut"
    THERMAL_RELEASE = "thermal-release"
    STALE_POLICY = "stale-policy"


@dataclass(frozen=True)
class ControlSettings:
    """Tuning of the control law; the defaults suit 1 s ticks on 200-700 W GPUs."""

    hysteresis_w: float = 5.0
    ratio_step_w: float = 10.0
    thermal_cut_factor: float = 0.85
    thermal_cut_interval_s: float = 5.0
    thermal_release_w: float = 10.0
    gpu_margin_c: float = 3.0


@dataclass(frozen=True)
class GpuMeasurement:
    """What the agent knows about one GPU this tick."""

    current_cap_w: float
    min_w: float
    max_w: float
    allocation_w: float | None = None
    temperature_c: float | None = None
    slowdown_c: float | None = None
    inlet_c: float | None = None
    max_inlet_c: float | None = None
    tokens_per_joule: float | None = None
    target: PerformanceTarget | None = None
    policy_fresh: bool = True


@dataclass(frozen=True)
class ControlState:
    """What the law remembers about one GPU between ticks."""

    ratio_offset_w: float = 0.0
    thermal_limit_w: float | None = None
    last_cut_at_s: float | None = None


@dataclass(frozen=True)
class CapDecision:
    cap_w: float
    state: ControlState
    reason: CapReason
    change: bool

    @property
    def emergency(self) -> bool:
        return self.reason is CapReason.THERMAL_CUT


def thermal_emergency(measurement: GpuMeasurement, settings: ControlSettings) -> bool:
    """Rack inlet at or above its maxTemperature, or the GPU within the margin of slowdown."""
    inlet_hot = (
        measurement.inlet_c is not None
        and measurement.max_inlet_c is not None
        and measurement.inlet_c >= measurement.max_inlet_c
    )
    gpu_hot = (
        measurement.temperature_c is not None
        and measurement.slowdown_c is not None
        and measurement.temperature_c >= measurement.slowdown_c - settings.gpu_margin_c
    )
    return inlet_hot or gpu_hot


def next_cap(
    measurement: GpuMeasurement,
    state: ControlState,
    now_s: float,
    settings: ControlSettings = ControlSettings(),
) -> CapDecision:
    """The cap this GPU should have now, the state to remember, and the reason (module docstring)."""
    low, high = measurement.min_w, max(measurement.min_w, measurement.max_w)
    has_allocation = measurement.allocation_w is not None
    ceiling = clamp(measurement.allocation_w if has_allocation else low, low, high)  # type: ignore[arg-type]
    reason = CapReason.ALLOCATION if has_allocation else CapReason.NO_ALLOCATION

    offset = state.ratio_offset_w
    ratio = measurement.tokens_per_joule
    target = measurement.target
    if target is not None and ratio is not None:
        if ratio < target.low_tokens_per_joule:
            offset += settings.ratio_step_w
            reason = CapReason.RATIO_DOWN
        elif ratio > target.high_tokens_per_joule and offset > 0:
            offset -= settings.ratio_step_w
            reason = CapReason.RATIO_UP
    elif target is None:
        offset = 0.0
    offset = clamp(offset, 0.0, ceiling - low)

    thermal_limit = state.thermal_limit_w
    last_cut = state.last_cut_at_s
    if thermal_emergency(measurement, settings):
        cooled_down = last_cut is None or now_s - last_cut >= settings.thermal_cut_interval_s
        if cooled_down:
            base = min(measurement.current_cap_w, thermal_limit if thermal_limit is not None else high)
            thermal_limit = max(low, base * settings.thermal_cut_factor)
            last_cut = now_s
        reason = CapReason.THERMAL_CUT
    elif thermal_limit is not None:
        thermal_limit += settings.thermal_release_w
        reason = CapReason.THERMAL_RELEASE
        if thermal_limit >= ceiling - offset:
            thermal_limit, last_cut = None, None

    desired = ceiling - offset
    if thermal_limit is not None:
        desired = min(desired, thermal_limit)
    desired = clamp(desired, low, high)
    if reason in (CapReason.RATIO_DOWN, CapReason.RATIO_UP) and measurement.current_cap_w > ceiling:
        reason = CapReason.ALLOCATION  # the allocation fell below the cap: that is why it moves now

    if offset == state.ratio_offset_w and thermal_limit == state.thermal_limit_w and last_cut == state.last_cut_at_s:
        new_state = state  # most ticks: nothing to remember anew
    else:
        new_state = ControlState(ratio_offset_w=offset, thermal_limit_w=thermal_limit, last_cut_at_s=last_cut)
    current = measurement.current_cap_w
    if not measurement.policy_fresh and not (reason is CapReason.THERMAL_CUT and desired < current):
        # Without a fresh policy the agent keeps the caps it has: only a thermal cut moves them.
        return CapDecision(current, new_state, CapReason.STALE_POLICY, False)
    must_move = current > ceiling or current < low or current > high or reason is CapReason.THERMAL_CUT
    if desired == current or (abs(desired - current) < settings.hysteresis_w and not must_move):
        return CapDecision(current, new_state, reason if desired == current else CapReason.HOLD, False)
    return CapDecision(desired, new_state, reason, True)
