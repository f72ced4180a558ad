"""GPU physics model: power under a cap, die temperature, and LLM inference throughput.

Used by the node agent's simulated GPU backend and by the cluster simulator. Pure and
deterministic: plain floats, no I/O, no clock, no randomness. Every function clamps its
inputs to the model's domain instead of raising, so a simulator can feed it anything.

The model, per GPU (symbols used in the docstrings below):

- ``P_idle``: power of an idle GPU; ``P_pre``: power a compute-bound prefill phase draws
  with no cap (above the max limit: the limiter is what holds it at 700 W); ``P_dec``:
  power at which a memory-bound decode phase saturates (more power buys no tokens).
- ``u``: offered load, the fraction of time the GPU would be busy uncapped (0..1);
  ``p``: prefill share, the fraction of that busy time spent in prefill (0..1).
- ``C``: the effective cap in W (the power limit, lowered further by hardware thermal
  slowdown, see :func:`thermal_cap_w`).

Throughput is concave in power and each phase has its own sensitivity: a phase running
under a cap ``C`` runs at speed ``s(C) = min(1, ((C - P_idle) / (P_sat - P_idle)) ** a)``
of its uncapped speed, with a large exponent and ``P_sat = P_pre`` for compute-bound
prefill, and a small exponent and ``P_sat = P_dec`` (far below 700 W) for memory-bound
decode. A cap therefore costs prefill more than decode.

Dynamics are first order: power relaxes toward its steady state with a time constant of
tens of milliseconds (NVML refreshes its power reading every 100 ms), and may overshoot
the cap briefly when demand jumps above it (748 W was measured above a 700 W limit under a
matmul burst on an H200); temperature relaxes toward ``T_inlet + R * P`` with a time
constant of tens of seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from powercap.numeric import clamp


@dataclass(frozen=True, slots=True)
class GpuModel:
    """Specification of one GPU type. Immutable; share one instance between GPUs.

    Attributes (units in names):
        name: human-readable type, e.g. ``"H200-like"``.
        min_limit_w, max_limit_w, default_limit_w: NVML power limit constraints.
        idle_w: power drawn with no work (``P_idle``).
        peak_compute_w: uncapped demand of a compute-bound (prefill) phase (``P_pre``).
        decode_saturation_w: power at which memory-bound decode stops speeding up (``P_dec``).
        prefill_exponent, decode_exponent: concavity ``a`` of each phase's speed in power,
            in (0, 1]; smaller means less sensitive to a cap.
        peak_tokens_s: generated tokens/s at full load, pure decode, no cap.
        slowdown_c, shutdown_c: NVML temperature thresholds (hardware slowdown, shutdown).
        thermal_resistance_c_per_w: ``R``, steady die temperature rise per watt over inlet.
        thermal_time_constant_s: ``tau_T`` of the die + heat-sink response.
        power_time_constant_s: ``tau_P`` of the power response to a change of load or cap.
        overshoot_fraction: how far above the cap a transient may go, as a fraction of it.
    """

    name: str
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    idle_w: float
    peak_compute_w: float
    decode_saturation_w: float
    peak_tokens_s: float
    thermal_resistance_c_per_w: float
    thermal_time_constant_s: float
    prefill_exponent: float = 0.45
    decode_exponent: float = 0.3
    slowdown_c: float = 89.0
    shutdown_c: float = 95.0
    power_time_constant_s: float = 0.05
    overshoot_fraction: float = 0.07

    def __post_init__(self) -> None:
        problems = model_problems(self)
        if problems:
            raise ValueError(f"GpuModel {self.name!r}: " + "; ".join(problems))


def model_problems(model: GpuModel) -> list[str]:
    """Every inconsistency of a model's parameters, each naming its field."""
    problems: list[str] = []
    if not 0 < model.idle_w < model.min_limit_w:
        problems.append("idle_w: must be in (0, min_limit_w)")
    if not model.min_limit_w <= model.default_limit_w <= model.max_limit_w:
        problems.append("default_limit_w: must be in [min_limit_w, max_limit_w]")
    if not model.idle_w < model.decode_saturation_w <= model.peak_compute_w:
        problems.append("decode_saturation_w: must be in (idle_w, peak_compute_w]")
    for field in ("prefill_exponent", "decode_exponent"):
        if not 0 < getattr(model, field) <= 1:
            problems.append(f"{field}: must be in (0, 1] (throughput is concave in power)")
    for field in (
        "peak_tokens_s",
        "thermal_resistance_c_per_w",
        "thermal_time_constant_s",
        "power_time_constant_s",
    ):
        if not getattr(model, field) > 0:
            problems.append(f"{field}: must be greater than 0")
    if not model.slowdown_c < model.shutdown_c:
        problems.append("slowdown_c: must be below shutdown_c")
    if not 0 <= model.overshoot_fraction < 1:
        problems.append("overshoot_fraction: must be in [0, 1)")
    return problems


H200_LIKE = GpuModel(
    name="H200-like",
    min_limit_w=200.0,
    max_limit_w=700.0,
    default_limit_w=700.0,
    idle_w=90.0,
    peak_compute_w=760.0,
    decode_saturation_w=450.0,
    peak_tokens_s=3000.0,
    thermal_resistance_c_per_w=0.065,
    thermal_time_constant_s=20.0,
)
"""An H100/H200 SXM-like part: 200-700 W, 45 degC over inlet at 700 W."""

L40S_LIKE = GpuModel(
    name="L40S-like",
    min_limit_w=100.0,
    max_limit_w=350.0,
    default_limit_w=350.0,
    idle_w=35.0,
    peak_compute_w=370.0,
    decode_saturation_w=260.0,
    peak_tokens_s=1100.0,
    thermal_resistance_c_per_w=0.14,
    thermal_time_constant_s=25.0,
)
"""A smaller PCIe part (L40S-like): 100-350 W, for heterogeneous clusters."""

PRESETS: Mapping[str, GpuModel] = {m.name: m for m in (H200_LIKE, L40S_LIKE)}
"""Presets by name, for simulator configuration files."""


@dataclass(frozen=True)
class NodePowerModel:
    """What a GPU server draws beside its GPUs (CPUs, memory, NICs, NVSwitches, fans, the
    supplies' conversion losses), per GPU it holds: an idle floor and a part that follows
    the load, read as the GPUs' power against their maximum (the host CPUs feed the GPUs,
    the fans spin with their heat, the supplies lose a share of what passes)::

        P_beside = gpus x idle_w_per_gpu + gpus x load_w_per_gpu x min(1, P_gpus / (gpus x P_max))

    so it rises by ``load_w_per_gpu / P_max`` W per W the GPUs rise.
    """

    idle_w_per_gpu: float
    load_w_per_gpu: float

    def __post_init__(self) -> None:
        if not (self.idle_w_per_gpu >= 0 and self.load_w_per_gpu >= 0):
            raise ValueError("NodePowerModel: idle_w_per_gpu and load_w_per_gpu must not be negative")


def non_gpu_power_w(model: NodePowerModel, gpus: int, gpu_power_w: float, gpu_max_limit_w: float) -> float:
    """:class:`NodePowerModel`'s ``P_beside`` of a node with ``gpus`` GPUs drawing ``gpu_power_w``
    together, each limited to ``gpu_max_limit_w`` at most."""
    load = clamp(gpu_power_w / (gpus * gpu_max_limit_w), 0.0, 1.0) if gpus > 0 and gpu_max_limit_w > 0 else 0.0
    return gpus * (model.idle_w_per_gpu + model.load_w_per_gpu * load)


NODE_POWER_PRESETS: Mapping[str, NodePowerModel] = {
    # An 8-GPU HGX/DGX-class server: 1.52 kW idle beside its GPUs (two server CPUs, 2 TB of
    # DRAM, NVSwitches, ten NICs, fans at their floor), 3.0 kW with the GPUs at 8 x 700 W: the
    # "1.5-3 kW beside its GPUs" of an 8-GPU H200 server (issue #16), 8.6 kW in all, under
    # the 10.2 kW maximum system power NVIDIA gives for a DGX H100 (its datasheet; 5.6 kW of
    # that is the GPUs). Rises 185 / 700 = 0.26 W per GPU W. Stated, not measured here.
    H200_LIKE.name: NodePowerModel(idle_w_per_gpu=190.0, load_w_per_gpu=185.0),
    # An 8-GPU PCIe server (L40S-like at 350 W): 0.6 kW idle beside its GPUs, 1.08 kW at full
    # GPU power, 3.9 kW in all, within the 4 x 2.7 kW (N+N) supplies such 4U servers carry.
    # Rises 60 / 350 = 0.17 W per GPU W. Stated, not measured here.
    L40S_LIKE.name: NodePowerModel(idle_w_per_gpu=75.0, load_w_per_gpu=60.0),
}
"""What the nodes of each GPU preset draw beside their GPUs, for the simulator."""


@dataclass(frozen=True, slots=True)
class Workload:
    """What the inference server asks of one GPU.

    Attributes:
        load: ``u``, offered load as the fraction of time the GPU would be busy with no
            cap, 0..1 (clamped).
        prefill_share: ``p``, fraction of that busy time spent in compute-bound prefill;
            the rest is memory-bound decode, 0..1 (clamped).
    """

    load: float = 1.0
    prefill_share: float = 0.2


IDLE = Workload(load=0.0, prefill_share=0.0)


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Steady state of a GPU under a cap and a workload.

    Attributes:
        power_w: mean power drawn.
        tokens_s: generated (decode) tokens per second.
        relative_throughput: work done per second as a fraction of the uncapped,
            fully loaded rate (1.0 = no cap, full load).
        busy_fraction: fraction of time the GPU is busy (1.0 = saturated; a cap that
            slows work down raises it until the GPU cannot keep up with the load).
    """

    power_w: float
    tokens_s: float
    relative_throughput: float
    busy_fraction: float

    @property
    def tokens_per_joule(self) -> float:
        """``tokens_s / power_w``: tokens per joule, the policy's performancePowerRatio."""
        return self.tokens_s / self.power_w if self.power_w > 0 else 0.0


@dataclass(frozen=True, slots=True)
class GpuState:
    """Dynamic state of one simulated GPU, advanced by :func:`advance`.

    Attributes:
        power_w: power drawn now (what NVML would report).
        temperature_c: die temperature now.
        energy_j: energy consumed since the start (NVML's total energy counter).
        tokens: generated tokens since the start.
        tokens_s: generated tokens per second over the last step.
    """

    power_w: float
    temperature_c: float
    energy_j: float = 0.0
    tokens: float = 0.0
    tokens_s: float = 0.0


def clamp_limit_w(model: GpuModel, cap_w: float) -> float:
    """The cap NVML would accept: ``clamp(cap_w, min_limit_w, max_limit_w)``."""
    return clamp(cap_w, model.min_limit_w, model.max_limit_w)


def phase_speed(cap_w: float, idle_w: float, saturation_w: float, exponent: float) -> float:
    """Speed of one phase under a cap, as a fraction of its uncapped speed.

    ``s(C) = min(1, ((C - P_idle) / (P_sat - P_idle)) ** a)`` for ``C > P_idle``, else 0.
    Concave and non-decreasing in ``C`` for ``0 < a <= 1``.
    """
    if cap_w <= idle_w:
        return 0.0
    if cap_w >= saturation_w:
        return 1.0
    return math.pow((cap_w - idle_w) / (saturation_w - idle_w), exponent)


def demand_power_w(model: GpuModel, workload: Workload) -> float:
    """Power the workload would draw with no cap.

    ``P_demand = P_idle + u * (p * (P_pre - P_idle) + (1 - p) * (P_dec - P_idle))``
    """
    load = clamp(workload.load, 0.0, 1.0)
    share = clamp(workload.prefill_share, 0.0, 1.0)
    dynamic_w = share * (model.peak_compute_w - model.idle_w) + (1.0 - share) * (
        model.decode_saturation_w - model.idle_w
    )
    return model.idle_w + load * dynamic_w


def operating_point(model: GpuModel, cap_w: float, workload: Workload) -> OperatingPoint:
    """Steady-state power and throughput of a GPU under an effective cap.

    With ``C = clamp(cap_w, min_limit_w, max_limit_w)`` (a thermally throttled cap may be
    passed in; it is clamped the same way), phase speeds ``s_pre = s(C; P_pre, a_pre)``
    and ``s_dec = s(C; P_dec, a_dec)`` (:func:`phase_speed`):

    - time to do one uncapped busy-second of work: ``T = p / s_pre + (1 - p) / s_dec``
    - busy fraction: ``b = min(1, u * T)``
    - relative throughput: ``X = b / T = min(u, 1 / T)``, concave in ``C`` (the weighted
      harmonic mean of concave functions is concave)
    - generated tokens/s: ``peak_tokens_s * (1 - p) * X``
    - power: ``P = P_idle * (1 - b) + b * (p / s_pre * min(C, P_pre)
      + (1 - p) / s_dec * min(C, P_dec)) / T``

    Each phase draws ``min(its demand, C)``, so ``P <= min(P_demand, C)``; for a single
    phase at full load this is exactly ``min(P_demand, C)``.
    """
    cap = clamp_limit_w(model, cap_w)
    load = clamp(workload.load, 0.0, 1.0)
    share = clamp(workload.prefill_share, 0.0, 1.0)
    idle_w = model.idle_w
    speed_pre = phase_speed(cap, idle_w, model.peak_compute_w, model.prefill_exponent)
    speed_dec = phase_speed(cap, idle_w, model.decode_saturation_w, model.decode_exponent)
    time_pre = share / speed_pre
    time_dec = (1.0 - share) / speed_dec
    work_time = time_pre + time_dec
    busy = min(1.0, load * work_time)
    busy_power_w = (
        time_pre * min(cap, model.peak_compute_w) + time_dec * min(cap, model.decode_saturation_w)
    ) / work_time
    throughput = busy / work_time
    return OperatingPoint(
        power_w=idle_w * (1.0 - busy) + busy * busy_power_w,
        tokens_s=model.peak_tokens_s * (1.0 - share) * throughput,
        relative_throughput=throughput,
        busy_fraction=busy,
    )


def thermal_cap_w(model: GpuModel, cap_w: float, temperature_c: float) -> float:
    """Effective cap after the GPU's own thermal slowdown.

    Below ``slowdown_c`` the cap is unchanged; from ``slowdown_c`` to ``shutdown_c`` the
    hardware pulls it linearly down to ``min_limit_w``:
    ``C_eff = C - (C - P_min) * clamp((T - T_slow) / (T_shut - T_slow), 0, 1)``.
    """
    cap = clamp_limit_w(model, cap_w)
    if temperature_c <= model.slowdown_c:
        return cap
    depth = clamp(
        (temperature_c - model.slowdown_c) / (model.shutdown_c - model.slowdown_c), 0.0, 1.0
    )
    return cap - (cap - model.min_limit_w) * depth


RISING_EDGE_FRACTION = 0.02
"""Power more than this fraction of the cap below its steady state is on a rising edge."""


def step_power_w(
    model: GpuModel,
    power_w: float,
    target_w: float,
    demand_w: float,
    cap_w: float,
    dt_s: float,
) -> float:
    """Power after ``dt_s`` seconds, first order, with the limiter's transient overshoot.

    With ``e = exp(-dt / tau_P)``, ``P* = target_w`` (from :func:`operating_point`, so
    ``P* <= cap_w``), demand ``D`` and cap ``C``:

    - rising edge into the limiter (``D > C`` and ``P < P* - 0.02 * C``): the chip
      follows demand faster than the limiter reacts,
      ``P' = min(D + (P - D) * e, C * (1 + overshoot_fraction))``;
    - otherwise: ``P' = P* + (P - P*) * e``.

    A 100 ms step from idle into a matmul burst under a 700 W cap reads 669 W, then
    748 W (the overshoot measured on an H200), then relaxes back to 700 W. At a constant
    cap, power never exceeds ``C * (1 + overshoot_fraction)`` and settles at
    ``P* <= C``.
    """
    decay = math.exp(-max(dt_s, 0.0) / model.power_time_constant_s)
    if demand_w > cap_w and power_w < target_w - RISING_EDGE_FRACTION * cap_w:
        rising_w = demand_w + (power_w - demand_w) * decay
        return min(rising_w, cap_w * (1.0 + model.overshoot_fraction))
    return target_w + (power_w - target_w) * decay


def steady_temperature_c(model: GpuModel, inlet_c: float, power_w: float) -> float:
    """``T_ss = T_inlet + R * P``."""
    return inlet_c + model.thermal_resistance_c_per_w * power_w


def step_temperature_c(
    model: GpuModel, temperature_c: float, inlet_c: float, power_w: float, dt_s: float
) -> float:
    """Die temperature after ``dt_s`` seconds at constant power.

    ``T' = T_ss + (T - T_ss) * exp(-dt / tau_T)``, ``T_ss = T_inlet + R * P``.
    """
    target_c = steady_temperature_c(model, inlet_c, power_w)
    decay = math.exp(-max(dt_s, 0.0) / model.thermal_time_constant_s)
    return target_c + (temperature_c - target_c) * decay


def initial_state(model: GpuModel, inlet_c: float) -> GpuState:
    """An idle GPU in thermal equilibrium with its inlet air."""
    return GpuState(
        power_w=model.idle_w,
        temperature_c=steady_temperature_c(model, inlet_c, model.idle_w),
    )


def advance(
    model: GpuModel,
    state: GpuState,
    cap_w: float,
    workload: Workload,
    inlet_c: float,
    dt_s: float,
) -> GpuState:
    """One simulation step of ``dt_s`` seconds (keep ``dt_s`` <= a few seconds).

    1. effective cap ``C = thermal_cap_w(cap_w, T)`` (hardware slowdown);
    2. steady state ``operating_point(C, workload)``;
    3. power by :func:`step_power_w`, temperature by :func:`step_temperature_c` at the
       new power;
    4. energy ``E' = E + (P + P') / 2 * dt``; tokens ``N' = N + tokens_s * dt``.
    """
    cap = thermal_cap_w(model, cap_w, state.temperature_c)
    point = operating_point(model, cap, workload)
    power_w = step_power_w(
        model, state.power_w, point.power_w, demand_power_w(model, workload), cap, dt_s
    )
    return GpuState(
        power_w=power_w,
        temperature_c=step_temperature_c(model, state.temperature_c, inlet_c, power_w, dt_s),
        energy_j=state.energy_j + 0.5 * (state.power_w + power_w) * dt_s,
        tokens=state.tokens + point.tokens_s * dt_s,
        tokens_s=point.tokens_s,
    )
