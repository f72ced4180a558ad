"""Marginal tokens per watt: move a service's watts from where they buy few tokens to where they buy many.

Pure functions; :func:`powercap.allocation.allocate` calls :func:`rebalance_w` after its
demand-following fill (docs/controller.md, "Marginal-value rebalancing"). The oracle bound of
the simulator splits a cap so that every GPU not at a bound has the same marginal tokens/s
per watt (the KKT condition of maximising ``sum_i tokens_i(cap_i)`` under ``sum_i cap_i <=
budget``, with each ``tokens_i`` concave). A real controller does not know the curves; it
knows, per GPU, the tokens/s its node agent measured (vLLM's counter, split over the pod's
GPUs by power) and the cap in force when it measured them.

**Estimate.** Near the cap in force ``C`` a power-limited GPU's tokens/s follow
``t(c) = t x (c / C) ** e`` (a local power law; ``e``, the elasticity of tokens/s in the
cap, is ``a x C / (C - P_idle)``, 0.4-0.65, on docs/simulator.md's curves at the default
scenario's caps; the published sweeps it cites are flatter near the top). Within a group
only the ratio of two GPUs' ``m`` counts, so ``e`` sets how far a round moves the caps
(the exponent ``1 / (1 - e)`` below), not which way. Its marginal value is then::

    m = dt/dc at C = e x t / C          (tokens/s per watt)

A GPU drawing below ``C x (1 - pinned_fraction)`` whose pod has no requests waiting is
limited by its traffic, not its cap: ``m = 0`` (another watt buys it nothing). A pod with
requests waiting (vLLM's queue, ``GpuState.requests_waiting``) is saturated, so its GPUs
count as pinned whatever they draw: a replica whose decode is memory-bound draws below its
cap while its prefill is held at it, and another watt speeds that prefill. No estimate
(``None``) without a measured rate, at a cap of 0 W, or for a pinned GPU that reports 0 tokens/s (a counter just reset, a pod not
serving yet): such a GPU keeps the demand-following cap.

**Rebalance** (:func:`rebalance_w`), within a group of GPUs whose caps may be traded without
changing any sum (the GPUs of one service in one rack, so that neither the service's budget
nor the rack's ``maxPower`` moves): with ``W`` the group's watts after the fill,

- *donors*, GPUs with ``m = 0``, go down to ``max(min, power + donor_headroom)``
  (never up);
- *receivers*, GPUs with ``m > 0``, share the rest as the KKT point of the power-law
  model: ``c_i = clamp(C_i x (m_i / lambda) ** (1 / (1 - e)), lo_i, hi_i)``, with
  ``lambda`` (the common marginal value) found by bisection so that the caps sum to
  what the donors left, ``lo_i = max(min_i, cap_i - step_i)`` and
  ``hi_i = min(max_i, cap_i + step_i)``: a noisy estimate moves a cap at most one step a
  round from the fill's cap (not from the cap in force: caps do not walk further round after
  round, a damping that measured better than a walk), and each round measures again;
- what the receivers cannot take (all at ``hi``) goes back to the donors as a common
  level, up to their caps from the fill.

Every cap stays in ``[min, max]``; the group's sum never rises (whole watts, ``floor``-ed),
so every service and rack sum the fill met still holds. A group with no receiver, or with
no donor and receivers of equal value, is left as the fill made it.

**Noise and outliers.** A receiver whose ``m`` is under ``1 / outlier_ratio`` of the
group's median (a rate read across a counter reset, a stale scrape) counts as having no
estimate; one over ``outlier_ratio x`` the median is clipped to it. Values within
``equal_within`` (30 %) of the median count as the median: a rate over a 5-s scrape, split
over a pod's GPUs by power, moves that much from round to round on replicas that are alike,
and chasing it cost tokens and status writes (on the simulator, seeds 1-3: the share of the
oracle's gain 57 / 45 / 49 / 75 % -> 69 / 64 / 60 / 79 % on default / saturated / cap-steps /
mixed GPU types, allocation writes 8-10 -> 1-7 per minute for 3 policies), while values 2x
apart (two GPUs of which one makes twice the tokens per watt: the median of a pair sits 33 %
from each) and GPU types that differ (an H200-like GPU makes 2-3x the tokens per watt of an
L40S-like one) stay apart. 40 % measured alike (71 / 65 / 62 / 75 %) but would make a pair
2x apart equal.
The watts a group moves then mostly come from its traffic-limited GPUs (``m = 0``), shared
among its busy ones in proportion to their caps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_ELASTICITY = 0.4
OUTLIER_RATIO = 4.0
EQUAL_WITHIN = 0.3
_BISECTION_ROUNDS = 60


@dataclass(frozen=True)
class MarginalSettings:
    """Knobs of the marginal-value rebalancing; bad values fail at construction.

    ``enabled``: True (the default); False keeps the demand-following fill alone
    (``powercap controller --no-marginal-rebalancing``).
    ``elasticity``: ``e`` of the local power law, in (0, 1).
    ``donor_headroom_fraction``: what a traffic-limited GPU keeps above its power when a
    receiver of the same group wants watts, as a fraction of its [min, max] range.
    ``outlier_ratio``, ``equal_within``: the screening of the values (module docstring).
    """

    enabled: bool = True
    elasticity: float = DEFAULT_ELASTICITY
    donor_headroom_fraction: float = 0.05
    outlier_ratio: float = OUTLIER_RATIO
    equal_within: float = EQUAL_WITHIN

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.elasticity < 1:
            problems.append(f"elasticity must be in (0, 1), not {self.elasticity}")
        if not 0 <= self.donor_headroom_fraction <= 1:
            problems.append(f"donor_headroom_fraction must be in [0, 1], not {self.donor_headroom_fraction}")
        if not self.outlier_ratio >= 1:
            problems.append(f"outlier_ratio must be >= 1, not {self.outlier_ratio}")
        if not 0 <= self.equal_within < 1:
            problems.append(f"equal_within must be in [0, 1), not {self.equal_within}")
        if problems:
            raise ValueError("; ".join(problems))


def is_pinned(power_w: float, limit_w: float, pinned_fraction: float, requests_waiting: int | None = None) -> bool:
    """Whether a GPU would serve more with more power: it draws within ``pinned_fraction`` of
    its cap, or its pod has requests waiting (saturated, though a memory-bound decode may
    draw well below the cap while a compute-bound prefill is held at it)."""
    return power_w >= limit_w * (1 - pinned_fraction) or bool(requests_waiting)


def marginal_tokens_per_w(tokens_s: float | None, power_w: float, limit_w: float, pinned_fraction: float,
                          elasticity: float = DEFAULT_ELASTICITY, requests_waiting: int | None = None) -> float | None:
    """``e x tokens_s / limit_w`` for a pinned GPU (:func:`is_pinned`), 0.0 for any other
    (traffic-limited), None without an estimate (module docstring)."""
    return marginal_value(tokens_s, limit_w, is_pinned(power_w, limit_w, pinned_fraction, requests_waiting), elasticity)


def marginal_value(tokens_s: float | None, limit_w: float, pinned: bool, elasticity: float) -> float | None:
    """:func:`marginal_tokens_per_w` for a GPU already judged pinned or not (the allocation
    judges each GPU once, for its demand, its surplus step and this)."""
    if tokens_s is None or not math.isfinite(tokens_s) or tokens_s < 0 or not limit_w > 0:
        return None
    if not pinned:
        return 0.0
    if tokens_s <= 0:
        return None
    value = elasticity * tokens_s / limit_w
    return value if math.isfinite(value) else None  # an absurd rate at a near-zero limit overflows


@dataclass(frozen=True)
class Member:
    """One GPU of a group as :func:`rebalance_w` sees it: its cap after the fill (whole watts),
    its bounds, its power, the cap in force when its tokens were measured and its marginal
    value (None: no estimate, the GPU keeps its cap)."""

    cap_w: int
    min_w: int
    max_w: int
    power_w: float
    limit_w: float
    marginal: float | None
    step_w: float
    donor_headroom_w: float


def rebalance_w(members: Sequence[Member], elasticity: float = DEFAULT_ELASTICITY,
                outlier_ratio: float = OUTLIER_RATIO, equal_within: float = EQUAL_WITHIN) -> list[int]:
    """New whole-watt caps for ``members``, summing to at most the sum of their caps (module docstring)."""
    caps = [m.cap_w for m in members]
    values = _screened([m.marginal for m in members], outlier_ratio, equal_within)
    receivers = [i for i, v in enumerate(values) if v is not None and v > 0]
    donors = [i for i, v in enumerate(values) if v == 0]
    if not receivers or (not donors and len({values[i] for i in receivers}) == 1):
        return caps
    donor_floor = {i: min(caps[i], max(members[i].min_w, math.ceil(members[i].power_w + members[i].donor_headroom_w)))
                   for i in donors}
    total_w = sum(caps[i] for i in (*receivers, *donors))
    lo = [max(members[i].min_w, min(caps[i], caps[i] - members[i].step_w)) for i in receivers]
    hi = [min(members[i].max_w, max(caps[i], caps[i] + members[i].step_w)) for i in receivers]
    room_w = total_w - sum(donor_floor.values())
    top = max(values[i] for i in receivers)  # type: ignore[type-var]
    weights = [members[i].limit_w * (values[i] / top) ** (1 / (1 - elasticity)) for i in receivers]  # type: ignore[operator]
    given = _weighted_fill(weights, lo, hi, room_w)
    new = list(caps)
    for i, cap in zip(receivers, given):
        new[i] = math.floor(cap + 1e-6)
    left_w = total_w - sum(new[i] for i in receivers)
    if donors:
        floors = [float(donor_floor[i]) for i in donors]
        ceilings = [float(caps[i]) for i in donors]
        for i, cap in zip(donors, _weighted_fill([1.0] * len(donors), floors, ceilings, left_w)):
            new[i] = math.floor(cap + 1e-6)
    return new


def _screened(values: Sequence[float | None], outlier_ratio: float, equal_within: float = 0.0) -> list[float | None]:
    """Positive values under ``median / outlier_ratio`` become None, over ``median x outlier_ratio`` are clipped,
    within ``equal_within x median`` of the median become the median; values that are not
    finite become None (no estimate)."""
    values = [v if v is None or math.isfinite(v) else None for v in values]
    positive = [v for v in values if v is not None and v > 0]
    if not positive:
        return values
    median = statistics.median(positive)
    low, high = median / outlier_ratio, median * outlier_ratio
    near = equal_within * median
    return [v if v is None or v == 0 else None if v < low else median if abs(v - median) <= near else min(v, high)
            for v in values]


def _weighted_fill(weights: Sequence[float], lo: Sequence[float], hi: Sequence[float], total_w: float) -> list[float]:
    """``clamp(w_i x L, lo_i, hi_i)`` with the level ``L`` whose caps sum to ``total_w``
    (``lo`` when ``sum(lo) >= total_w``, ``hi`` when ``sum(hi) <= total_w``).

    ``L`` is solved exactly on the sum's pieces (:func:`_fill_level`: it is linear between
    the levels where a member leaves its ``lo`` or reaches its ``hi``), then stepped down by
    an ulp while rounding leaves the sum over ``total_w``; :func:`_bisected_fill` is the
    reference it agrees with (tests/test_marginal.py) and the fallback."""
    if sum(lo) >= total_w:
        return list(lo)
    if sum(hi) <= total_w:
        return list(hi)
    level = _fill_level(weights, lo, hi, total_w)
    if level is not None and math.isfinite(level):
        for _ in range(_ULP_STEPS):
            caps = [min(max(w * level, low), high) for w, low, high in zip(weights, lo, hi)]
            spent = sum(caps)
            if spent <= total_w:
                if spent >= total_w - _SHORTFALL_W:
                    return caps
                break  # a level that leaves watts unshared: bisect instead
            level = math.nextafter(level, 0.0)
    return _bisected_fill(weights, lo, hi, total_w)


_SHORTFALL_W = 1e-6
"""Watts the solved level may leave unshared (rounding); more means it is wrong."""


_ULP_STEPS = 8


def _fill_level(weights: Sequence[float], lo: Sequence[float], hi: Sequence[float], total_w: float) -> float | None:
    """The level ``L >= 0`` at which ``sum(clamp(w_i x L, lo_i, hi_i)) = total_w``: the sum is
    ``constant + slope x L`` between the levels where a member leaves its ``lo``
    (``lo_i / w_i``) or reaches its ``hi`` (``hi_i / w_i``), walked in order. None (bisect
    instead) for a weight that is negative or not finite."""
    constant = slope = 0.0
    linear = 0  # members on their w x L piece: with none, the slope is exactly 0, not a rounding rest
    events: list[tuple[float, int, float, float]] = []  # (level, +1 enters / -1 leaves the piece, w, constant change)
    for w, low, high in zip(weights, lo, hi):
        if not (w >= 0 and math.isfinite(w)):
            return None
        if low >= high:
            constant += high  # min(max(x, low), high) is high whatever x
        elif w == 0:
            constant += min(max(0.0, low), high)
        elif high <= 0:
            constant += high
        elif low <= 0:
            slope += w
            linear += 1
            events.append((high / w, -1, w, high))
        else:
            constant += low
            events.append((low / w, 1, w, -low))
            events.append((high / w, -1, w, high))
    if constant >= total_w:
        return 0.0
    events.sort()
    level = 0.0
    for at, direction, w, constant_change in events:
        if constant + slope * at >= total_w:
            return (total_w - constant) / slope if slope > 0 else level
        level = at
        linear += direction
        slope = slope + direction * w if linear else 0.0
        constant += constant_change
    return (total_w - constant) / slope if slope > 0 else None


def _bisected_fill(weights: Sequence[float], lo: Sequence[float], hi: Sequence[float], total_w: float) -> list[float]:
    """:func:`_weighted_fill` by bisection on the level (the reference; also the fallback)."""
    def fill(level: float) -> list[float]:
        return [min(max(w * level, low), high) for w, low, high in zip(weights, lo, hi)]

    if sum(lo) >= total_w:
        return list(lo)
    if sum(hi) <= total_w:
        return list(hi)
    low_level, high_level = 0.0, max(h / w for w, h in zip(weights, hi) if w > 0)
    for _ in range(_BISECTION_ROUNDS):
        middle = (low_level + high_level) / 2
        if sum(fill(middle)) > total_w:
            high_level = middle
        else:
            low_level = middle
    return fill(low_level)
