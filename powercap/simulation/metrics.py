"""What a run measures, per simulated second, and the figures computed from it.

The engine adds every physics step's energy and tokens into 1-second buckets, so a
per-second "power" is an energy divided by one second: the series integrate exactly to
the energy the GPUs' counters report (the trapezoid rule of
:func:`powercap.physics.advance`).

Figures (all pure functions of the recorded series):

- **cap violation**: a second whose average service power exceeds the service's
  ``powerCapLimit`` in force at the end of that second;
- **after convergence**: leaving out the first ``warmupS`` seconds and ``settleS`` seconds
  after each cap change (the time allowed to get back under a lowered cap);
- **rack violation**: a second whose average rack power exceeds the rack's ``maxPower``,
  or whose average inlet temperature exceeds its ``maxTemperature``;
- **recovery time** after a cap change: from the change to the first physics step from
  which the service's power stays at or under the new cap for ``RECOVERY_HOLD_S``;
- **p99 latency proxy**: the 99th percentile over (second, pod) samples, weighted by the
  tokens offered to the pod in that second, of
  ``baseLatencyS / speed + backlog / serviceRate`` (``speed``: the pod's relative
  throughput under its caps at full load; the second term: Little's law for the queue);
- **tokens per joule**: generated tokens / GPU energy (every GPU of the cluster, idle
  ones included, for the cluster; the service's GPUs for a service).
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LATENCY_PERCENTILE = 0.99
"""The latency proxy's percentile, over the run (summary.json) and over each second (the plots)."""
RECOVERY_HOLD_S = 10.0
"""Power must stay under the new cap this long to count as recovered."""


@dataclass
class Recorder:
    """Per-second sums of one strategy run (index = simulated second)."""

    seconds: int
    step_s: float
    services: tuple[str, ...]
    racks: tuple[str, ...]
    service_energy_j: list[list[float]] = field(default_factory=list)
    service_tokens: list[list[float]] = field(default_factory=list)
    service_offered_tokens: list[list[float]] = field(default_factory=list)
    service_dropped_tokens: list[list[float]] = field(default_factory=list)
    service_cap_w: list[list[float | None]] = field(default_factory=list)
    service_caps_sum_w: list[list[float]] = field(default_factory=list)  # most the GPUs' caps summed to in the second
    service_step_power_w: list[list[float]] = field(default_factory=list)
    service_latency: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)  # (latencies, weights) per second
    service_latency_p99_s: list[list[float | None]] = field(default_factory=list)  # per second, over the serving pods
    rack_energy_j: list[list[float]] = field(default_factory=list)
    rack_inlet_c_s: list[list[float]] = field(default_factory=list)  # integral of inlet over the second
    cluster_energy_j: list[float] = field(default_factory=list)  # whole nodes: GPUs and beside them
    non_gpu_energy_j: list[float] = field(default_factory=list)  # the part beside the GPUs
    pending_pods: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n, s, r = self.seconds, len(self.services), len(self.racks)
        self.service_energy_j = [[0.0] * n for _ in range(s)]
        self.service_tokens = [[0.0] * n for _ in range(s)]
        self.service_offered_tokens = [[0.0] * n for _ in range(s)]
        self.service_dropped_tokens = [[0.0] * n for _ in range(s)]
        self.service_cap_w = [[None] * n for _ in range(s)]
        self.service_caps_sum_w = [[0.0] * n for _ in range(s)]
        self.service_step_power_w = [[] for _ in range(s)]
        self.service_latency = [[] for _ in range(s)]
        self.service_latency_p99_s = [[None] * n for _ in range(s)]
        self.rack_energy_j = [[0.0] * n for _ in range(r)]
        self.rack_inlet_c_s = [[0.0] * n for _ in range(r)]
        self.cluster_energy_j = [0.0] * n
        self.non_gpu_energy_j = [0.0] * n
        self.pending_pods = [0] * n

    def rack_inlet_c(self, rack: int) -> list[float]:
        """Average inlet temperature of each second, degC."""
        return list(self.rack_inlet_c_s[rack])

    def total_energy_j(self) -> float:
        return math.fsum(self.cluster_energy_j)

    def latency_percentile_s(self, service: int, fraction: float) -> float | None:
        """The weighted percentile of the service's latency samples over the whole run."""
        chunks = self.service_latency[service]
        if not chunks:
            return None
        return weighted_percentile_of(
            np.concatenate([values for values, _ in chunks]), np.concatenate([weights for _, weights in chunks]), fraction
        )


def weighted_percentile(samples: Sequence[tuple[float, float]], fraction: float) -> float | None:
    """The smallest value v with ``weight(values <= v) >= fraction x total weight``; None when empty."""
    values = np.array([value for value, _ in samples], dtype=float)
    weights = np.array([weight for _, weight in samples], dtype=float)
    return weighted_percentile_of(values, weights, fraction)


def weighted_percentile_of(values: np.ndarray, weights: np.ndarray, fraction: float) -> float | None:
    """:func:`weighted_percentile` of (value, weight) samples given as two arrays: the samples
    of positive weight sorted by (value, weight), the first whose running weight reaches
    ``fraction x total`` (less a relative 1e-12 for rounding)."""
    positive = weights > 0
    values, weights = values[positive], weights[positive]
    total = math.fsum(weights.tolist())
    if total <= 0:
        return None
    order = np.lexsort((weights, values))
    values = values[order]
    reached = np.flatnonzero(np.cumsum(weights[order]) >= fraction * total - 1e-12 * total)
    return float(values[reached[0]] if len(reached) else values[-1])


def excluded_seconds(seconds: int, warmup_s: float, changes_s: Sequence[float], settle_s: float) -> set[int]:
    """Seconds left out of "after convergence": ``[0, warmup)`` and ``[change, change + settle]`` per change."""
    excluded = set(range(min(seconds, math.ceil(warmup_s))))
    for change_s in changes_s:
        first = int(math.floor(change_s))
        last = int(math.ceil(change_s + settle_s))
        excluded.update(s for s in range(first, last + 1) if 0 <= s < seconds)
    return excluded


POWER_RESOLUTION_W = 0.001
"""NVML reads and sets power in milliwatts."""


def cap_violation_seconds(
    power_w: Sequence[float], cap_w: Sequence[float | None], skip: AbstractSet[int] = frozenset()
) -> list[int]:
    """Seconds (not in ``skip``) whose average power exceeds the cap in force by more than
    NVML's resolution (1 mW): GPUs held exactly at caps that sum to the cap add up, step by
    step in floats, to a few nW more."""
    return [s for s, (power, cap) in enumerate(zip(power_w, cap_w))
            if cap is not None and s not in skip and power > cap + POWER_RESOLUTION_W]


def limit_violation_seconds(values: Sequence[float], limit: float | None) -> list[int]:
    """Seconds whose average exceeds ``limit`` (none when there is no limit)."""
    return [] if limit is None else [s for s, value in enumerate(values) if value > limit]


def recovery_time_s(step_power_w: Sequence[float], step_s: float, change_s: float, cap_w: float, hold_s: float = RECOVERY_HOLD_S) -> float | None:
    """Seconds from ``change_s`` until power stays ``<= cap_w`` for ``hold_s`` (None: never)."""
    first = int(round(change_s / step_s))
    hold = max(1, int(round(hold_s / step_s)))
    last = len(step_power_w)
    run_start: int | None = None
    for index in range(first, last):
        if step_power_w[index] <= cap_w:
            if run_start is None:
                run_start = index
            if index - run_start + 1 >= hold:
                return max(0.0, run_start * step_s - change_s)
        else:
            run_start = None
    if run_start is not None and last - run_start >= 1:
        return max(0.0, run_start * step_s - change_s)
    return None


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def rounded(value: Any, digits: int = 3) -> Any:
    """Floats rounded for summary.json; None, ints and strings unchanged."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value
