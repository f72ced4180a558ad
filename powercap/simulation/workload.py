"""The request trace: offered generated tokens/s per service over simulated time.

Deterministic for a seed: every strategy of a run sees the very same trace. Per service
and simulated second ``k``::

    offered(k) = peakTokensS x shape(hour(k)) x burst(k) x noise(k)

- ``hour(k) = (dayStartHour + 24 x k / dayLengthS) mod 24``: one day compressed into
  ``dayLengthS`` simulated seconds; ``shape`` interpolates the 24 hourly factors linearly
  (cyclically, so 23:30 sits between the 23:00 and 00:00 factors);
- ``burst(k)``: the product of the factors of the bursts covering second ``k`` (the
  scenario's and ``randomBursts.count`` drawn from the seed: service, start, length and
  factor uniform in their ranges);
- ``noise(k) = exp(n_k - sigma^2 / 2)`` with ``n_k = rho x n_(k-1) + sigma x sqrt(1 - rho^2) x g_k``,
  ``g_k`` standard normal, ``rho = 0.9``: a log-normal AR(1) with mean 1 and standard
  deviation ``sigma = workload.noise`` of the log.

A service with a recorded ``trace`` offers ``scale x`` the trace's tokens of the trace
window the second plays (``Trace.offered_tokens``) times the bursts, with no noise and no
daily shape: the recording has its own.

Between whole seconds the synthetic rate is interpolated linearly
(:meth:`WorkloadTrace.offered_tokens_s`); a replayed trace's rate is constant within each
second, so that every simulated second offers exactly its window's tokens (interpolating
would move up to half of a second's requests into the next one, and the first second's out
of the run).

A service's traffic is split over its serving pods in proportion to ``weight x capacity``
where capacity is the pod's uncapped tokens/s and ``weight = exp(podSkew x g - podSkew^2 / 2)``
(:func:`pod_weight`), fixed per pod: session affinity and prefix caching send some pods
more than their share. The router bounds the imbalance the way consistent hashing with
bounded loads does: no pod gets more than ``loadBound`` times the service's mean
utilisation; the excess goes to the others in proportion to their weights
(:func:`bounded_shares`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from powercap.numeric import agreeing, counted
from powercap.simulation.scenario import (
    HOURS_PER_DAY,
    PEAK_WINDOW_S,
    Burst,
    Scenario,
    Service,
    busiest_window_mean,
    uncapped_capacity_tokens_s,
)

NOISE_AUTOCORRELATION = 0.9
"""``rho`` of the per-second AR(1) traffic noise."""


@dataclass(frozen=True)
class WorkloadTrace:
    """Offered tokens/s per service at every whole simulated second, and the bursts in it."""

    per_second: Mapping[str, tuple[float, ...]]
    bursts: tuple[Burst, ...]
    replayed: frozenset[str] = frozenset()
    """Services replaying a recorded trace: their rate is constant within each second."""

    def offered_tokens_s(self, service: str, t_s: float) -> float:
        """Linear interpolation between the whole seconds around ``t_s`` (a replayed
        service: the rate of the second holding ``t_s``)."""
        series = self.per_second[service]
        second = int(t_s)
        if second >= len(series) - 1:
            return series[-1]
        if service in self.replayed:
            return series[second]
        fraction = t_s - second
        return series[second] + (series[second + 1] - series[second]) * fraction


def daily_factor(shape: Sequence[float], hour: float) -> float:
    """``shape`` at a fractional hour, linear between hourly points, cyclic over the day."""
    hour %= HOURS_PER_DAY
    low = int(hour)
    high = (low + 1) % HOURS_PER_DAY
    fraction = hour - low
    return shape[low] + (shape[high] - shape[low]) * fraction


def hour_of_day(scenario: Scenario, t_s: float) -> float:
    """The hour of the compressed day at simulated time ``t_s``."""
    workload = scenario.workload
    return (workload.day_start_hour + HOURS_PER_DAY * t_s / workload.day_length_s) % HOURS_PER_DAY


def random_bursts(scenario: Scenario, rng: random.Random) -> tuple[Burst, ...]:
    """``randomBursts.count`` bursts drawn uniformly: service, length, start, factor."""
    spec = scenario.workload.random_bursts
    bursts = []
    for _ in range(spec.count):
        service = rng.choice(scenario.services).name
        duration_s = rng.uniform(spec.min_duration_s, spec.max_duration_s)
        at_s = rng.uniform(0.0, max(0.0, scenario.duration_s - duration_s))
        bursts.append(Burst(service, round(at_s, 1), round(duration_s, 1), round(rng.uniform(spec.min_factor, spec.max_factor), 2)))
    return tuple(bursts)


def build_trace(scenario: Scenario) -> WorkloadTrace:
    """The trace of a scenario for its seed (see the module docstring for the formula)."""
    rng = random.Random(f"powercap-workload:{scenario.seed}")
    bursts = scenario.workload.bursts + random_bursts(scenario, rng)
    seconds = int(math.ceil(scenario.duration_s)) + 1
    sigma = scenario.workload.noise
    innovation = sigma * math.sqrt(1.0 - NOISE_AUTOCORRELATION**2)
    per_second: dict[str, tuple[float, ...]] = {}
    for service in scenario.services:
        noise_rng = random.Random(f"powercap-noise:{scenario.seed}:{service.name}")
        level = noise_rng.gauss(0.0, sigma)
        values = []
        for second in range(seconds):
            if second:
                level = NOISE_AUTOCORRELATION * level + innovation * noise_rng.gauss(0.0, 1.0)
            factor = 1.0
            for burst in bursts:
                if (burst.service is None or burst.service == service.name) and burst.at_s <= second < burst.at_s + burst.duration_s:
                    factor *= burst.factor
            if service.trace is not None:
                values.append(service.trace.offered_tokens(second) * factor)
            else:
                factor *= daily_factor(service.daily_shape, hour_of_day(scenario, second))
                values.append(service.peak_tokens_s * factor * math.exp(level - sigma * sigma / 2.0))
        per_second[service.name] = tuple(values)
    replayed = frozenset(service.name for service in scenario.services if service.trace is not None)
    return WorkloadTrace(per_second=per_second, bursts=bursts, replayed=replayed)


def overload_notices(scenario: Scenario, trace: WorkloadTrace) -> list[str]:
    """A line per service whose busiest minute (``PEAK_WINDOW_S``, bursts included) offers more
    than its pods at time 0 serve with no cap at all: every strategy drops tokens there, so
    what a cap costs is hidden in what the service could never serve."""
    seconds = max(1, math.ceil(scenario.duration_s))
    notices = []
    for service in scenario.services:
        busiest = busiest_window_mean(trace.per_second[service.name][:seconds])
        capacity = uncapped_capacity_tokens_s(service, scenario.nodes)
        if capacity <= 0 or busiest <= capacity:
            continue
        if service.trace is not None:
            advice = "set trace.peakUtilisation (0.8: the busiest minute at 80 % of that) instead of scale"
        else:
            advice = "lower peakTokensS or add replicas"
        window = f"busiest {PEAK_WINDOW_S}-s window" if seconds >= PEAK_WINDOW_S else "run"
        notices.append(
            f"{service.name}: its {window} offers {busiest:,.0f} tokens/s, {busiest / capacity:.1f}x what its "
            f"{counted(service.replicas, 'pod')} {agreeing(service.replicas, 'serves', 'serve')} with no cap "
            f"({capacity:,.0f} tokens/s): every strategy will drop tokens; {advice}"
        )
    return notices


def pod_weight(seed: int, service: Service, pod_index: int) -> float:
    """The traffic weight of a pod: ``exp(podSkew x g - podSkew^2 / 2)``, g standard normal.

    Drawn from its own seeded generator, so a pod has the same weight in every strategy
    and whichever order pods are created in.
    """
    if service.pod_skew <= 0:
        return 1.0
    rng = random.Random(f"powercap-pod:{seed}:{service.namespace}/{service.name}:{pod_index}")
    return math.exp(service.pod_skew * rng.gauss(0.0, 1.0) - service.pod_skew**2 / 2.0)


def bounded_shares(weights: Sequence[float], capacities: Sequence[float], bound: float) -> list[float]:
    """Fractions of a service's traffic per pod (summing to 1), affinity with bounded load.

    Wanted share ``w_i c_i / sum(w c)``; no pod's utilisation may exceed ``bound`` times
    the mean, i.e. ``share_i <= bound x c_i / sum(c)``. Water-filling: pods over their
    bound get exactly their bound, the rest is shared by the others in proportion to
    ``w_i c_i``, repeated until no pod is over. ``bound >= 1`` always has a solution.
    """
    count = len(weights)
    if count == 0:
        return []
    total_capacity = math.fsum(capacities)
    if total_capacity <= 0:
        return [1.0 / count] * count
    limits = [bound * c / total_capacity for c in capacities]
    wanted = [w * c for w, c in zip(weights, capacities)]
    shares = [0.0] * count
    capped: set[int] = set()
    while True:
        free = 1.0 - math.fsum(limits[i] for i in capped)
        free_weight = math.fsum(wanted[i] for i in range(count) if i not in capped)
        newly = set()
        for i in range(count):
            if i in capped:
                shares[i] = limits[i]
            else:
                shares[i] = free * wanted[i] / free_weight if free_weight > 0 else 0.0
                if shares[i] > limits[i] + 1e-12:
                    newly.add(i)
        if not newly or len(capped) + len(newly) >= count:
            if newly:  # every pod at its bound: the bound is below 1 or rounding; fall back to capacity shares
                return [c / total_capacity for c in capacities]
            return shares
        capped |= newly
