"""The services' decisions, called exactly as the services call them.

Nothing here decides anything of its own: each function builds the inputs a service
builds (Kubernetes objects, a :class:`~powercap.cluster.ClusterView`, measurements) and
calls the pure decision the service calls:

- placement: :func:`powercap.placement.filter_nodes` and
  :func:`powercap.placement.prioritize_nodes` (what the scheduler extender serves), combined
  the way kube-scheduler combines an extender with its own scoring;
- budgets: :func:`powercap.budget.plan_round` (one budget controller round: allocation and
  the policy status it writes, which the agents read their allocations from) and
  :func:`powercap.rebalance.plan_rebalance` (energy-aware evictions), called by the engine;
- caps: :func:`powercap.agentplan.plan_tick` (the node agent's tick, which runs the control
  law :func:`powercap.control.next_cap`) and its telemetry publishing rules, called by the
  engine with the readings, pods and policies the agent would see.

The baselines use no powercap code: :func:`gpu_fit_scores` stands in for kube-scheduler's
own scoring, :func:`static_split_w` for an operator dividing a service's cap evenly over
its GPUs, and :func:`oracle_split_w` is an upper bound no controller can reach: the split of
a cap that maximises tokens/s with perfect knowledge of every GPU's load and throughput curve.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from powercap.algorithms import MAX_SCORE, AlgorithmRegistry
from powercap.cluster import ClusterSettings, ClusterView, build_cluster_view
from powercap.objects import KubeObject
from powercap.numeric import clamp
from powercap.physics import GpuModel, Workload, operating_point
from powercap.placement import filter_nodes, placement_request, prioritize_nodes
from powercap.policies import Policy
from powercap.simulation.world import work_times

MAX_NODE_SCORE = 100
"""kube-scheduler's MaxNodeScore; an extender's 0..10 priority is scaled by 100 / 10."""


@dataclass(frozen=True)
class Candidate:
    """A node that fits the pod in kube-scheduler's own checks (free GPUs, node selector)."""

    name: str
    free_gpus: int
    total_gpus: int


LEAST_ALLOCATED = "LeastAllocated"
MOST_ALLOCATED = "MostAllocated"


def gpu_fit_scores(candidates: Sequence[Candidate], gpus: int, scoring: str) -> list[float]:
    """kube-scheduler's NodeResourcesFit score on ``nvidia.com/gpu`` after placing the pod.

    LeastAllocated (spread): ``100 x (free - gpus) / total``; MostAllocated (bin-pack, common
    on GPU clusters to keep whole nodes free): ``100 x (total - free + gpus) / total``.
    """
    if scoring == MOST_ALLOCATED:
        return [MAX_NODE_SCORE * (c.total_gpus - c.free_gpus + gpus) / c.total_gpus for c in candidates]
    return [MAX_NODE_SCORE * (c.free_gpus - gpus) / c.total_gpus for c in candidates]


def pick_best(names: Sequence[str], scores: Sequence[float], rng: random.Random) -> str | None:
    """The node with the highest score; ties broken at random, as kube-scheduler does."""
    if not names:
        return None
    best = max(scores)
    tied = [name for name, score in zip(names, scores) if score >= best - 1e-9]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


@dataclass(frozen=True)
class Placement:
    """Where a pod goes (None: it stays pending) and why nodes were refused."""

    node: str | None
    failed: Mapping[str, str]


def fit_error(node_count: int, failed: Mapping[str, str]) -> str:
    """kube-scheduler's message for a pod no node took (the PodScheduled condition's):
    ``0/12 nodes are available: 8 <reason>, 4 <reason>.``, reasons by count; nodes without
    a reason had no free GPU."""
    counts = Counter(failed.values())
    if len(failed) < node_count:
        counts["Insufficient nvidia.com/gpu"] += node_count - len(failed)
    parts = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return f"0/{node_count} nodes are available: {parts}."


def place_default(pod_gpus: int, candidates: Sequence[Candidate], rng: random.Random, scoring: str) -> Placement:
    """kube-scheduler without the extender: its GPU fit score alone."""
    names = [c.name for c in candidates]
    return Placement(pick_best(names, gpu_fit_scores(candidates, pod_gpus, scoring), rng), {})


def place_with_extender(
    view: ClusterView,
    pod: KubeObject,
    candidates: Sequence[Candidate],
    registry: AlgorithmRegistry,
    rng: random.Random,
    scoring: str,
    extender_weight: float,
) -> Placement:
    """kube-scheduler with the power-aware extender.

    The extender filters the candidates that passed kube-scheduler's own checks; each node
    left scores ``gpuFit + weight x extenderScore x (100 / 10)`` (kube-scheduler's
    combination of plugin scores and extender priorities).
    """
    request = placement_request(view, pod)
    by_name = {c.name: c for c in candidates}
    outcome = filter_nodes(view, request, list(by_name))
    failed = {**outcome.failed, **outcome.unresolvable}
    passed = [by_name[name] for name in outcome.passed]
    if not passed:
        return Placement(None, failed)
    names = [c.name for c in passed]
    extender = dict(prioritize_nodes(view, request, names, registry))
    fit = gpu_fit_scores(passed, request.gpus, scoring)
    scale = MAX_NODE_SCORE / MAX_SCORE
    scores = [s + extender_weight * extender[name] * scale for name, s in zip(names, fit)]
    return Placement(pick_best(names, scores, rng), failed)


def cluster_view(
    nodes: Iterable[KubeObject],
    pods: Iterable[KubeObject],
    policies: Iterable[KubeObject],
    now: datetime,
    registry: AlgorithmRegistry,
    previous: ClusterView | None,
) -> ClusterView:
    """The extender's and the controller's view of the simulated API objects."""
    return build_cluster_view(nodes, pods, policies, now, ClusterSettings(), registry=registry, previous=previous)


def static_split_w(policy: Policy, service_gpus: int, min_w: float, max_w: float) -> float:
    """The static baseline: ``clamp(powerCapLimit / GPUs of the service, min, max)``."""
    return clamp(policy.power_cap_w / max(service_gpus, 1), min_w, max_w)


@dataclass(frozen=True)
class OracleGpu:
    """What the oracle knows of one GPU: its model, its load now, and its service's tokens scale."""

    model: GpuModel
    workload: Workload
    tokens_scale: float = 1.0

    def tokens_s(self, cap_w: float) -> float:
        return operating_point(self.model, cap_w, self.workload).tokens_s * self.tokens_scale


ORACLE_STEP_W = 5.0
"""Granularity of the oracle's fill."""


def oracle_split_w(gpus: Sequence[OracleGpu], cap_w: float, step_w: float = ORACLE_STEP_W) -> list[float]:
    """The caps, summing to at most ``cap_w``, that maximise the GPUs' tokens/s at their loads now.

    Every GPU starts at its minimum limit; the rest of ``cap_w`` goes ``step_w`` at a time to
    the GPU whose tokens/s gains most from it. Throughput is concave in the cap
    (:func:`powercap.physics.operating_point`), so this greedy fill is optimal to within one
    step. Watts that no GPU turns into tokens (every GPU serves its whole load) are then
    shared as a common level up to each GPU's maximum, as headroom for the next second.
    With ``cap_w`` below the minimums every GPU stays at its minimum.

    Computed by :func:`oracle_split_arrays_w` (the same fill by classes of equal gain).
    """
    if not gpus:
        return []
    models = list({id(g.model): g.model for g in gpus}.values())
    model_index = np.array([next(i for i, m in enumerate(models) if m is g.model) for g in gpus], dtype=np.int64)
    caps_w = oracle_split_arrays_w(
        models, model_index,
        np.array([g.workload.load for g in gpus], dtype=float),
        np.array([g.workload.prefill_share for g in gpus], dtype=float),
        np.array([g.tokens_scale for g in gpus], dtype=float),
        cap_w, step_w,
    )
    return caps_w.tolist()


def oracle_greedy_w(gpus: Sequence[OracleGpu], cap_w: float, step_w: float = ORACLE_STEP_W) -> list[float]:
    """:func:`oracle_split_w` a step at a time (a heap of each GPU's next gain per watt):
    the definition, and what :func:`oracle_split_arrays_w` falls back to when a GPU's gains
    per step are not non-increasing (float noise on a flat curve)."""
    caps = [g.model.min_limit_w for g in gpus]
    left_w = cap_w - sum(caps)
    tokens = [g.tokens_s(c) for g, c in zip(gpus, caps)]
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        step = min(step_w, gpus[i].model.max_limit_w - caps[i])
        if step > 1e-9:
            gain = gpus[i].tokens_s(caps[i] + step) - tokens[i]
            if gain > 1e-9:
                heapq.heappush(heap, (-gain / step, i))

    for i in range(len(gpus)):
        push(i)
    while heap and left_w > 1e-9:
        _, i = heapq.heappop(heap)
        step = min(step_w, gpus[i].model.max_limit_w - caps[i], left_w)
        caps[i] += step
        left_w -= step
        tokens[i] = gpus[i].tokens_s(caps[i])
        push(i)
    return _water_level(np.array(caps), np.array([g.model.max_limit_w for g in gpus]), left_w).tolist()


_GAIN_EPSILON = 1e-9
"""A gain of tokens/s at or below this ends a GPU's fill (as in :func:`oracle_greedy_w`)."""


def oracle_split_arrays_w(
    models: Sequence[GpuModel],
    model_index: np.ndarray,
    load: np.ndarray,
    prefill_share: np.ndarray,
    tokens_scale: np.ndarray,
    cap_w: float,
    step_w: float = ORACLE_STEP_W,
) -> np.ndarray:
    """:func:`oracle_split_w` of GPUs given as arrays (``models[model_index[i]]`` is GPU i's).

    The greedy fill takes steps in decreasing order of gain per watt (ties: the lower GPU
    index first), so when every GPU's gains are non-increasing step after step, what it
    takes is every step above the gain where ``cap_w`` runs out. The steps are sorted by
    class instead of popped one by one: at cap ``C`` a GPU with load ``u`` is busy all the
    time while ``u x T(C) >= 1`` (``T``: :func:`~powercap.simulation.world.work_times`),
    and then serves ``peak x (1 - p) / T(C)`` tokens/s, the same for every GPU of its
    (model, prefill share, tokens scale): its steps up to that point have its group's
    gains, then one step of its own (to its load), then none. Where that does not hold
    (gains rising from one step to the next by float noise) it falls back to
    :func:`oracle_greedy_w`.
    """
    min_w = np.array([m.min_limit_w for m in models])[model_index]
    max_w = np.array([m.max_limit_w for m in models])[model_index]
    left_w = cap_w - sum(min_w.tolist())
    caps_w = min_w.copy()
    if len(caps_w) == 0:
        return caps_w
    load = np.minimum(np.maximum(load, 0.0), 1.0)
    keys = np.stack([model_index.astype(float), np.minimum(np.maximum(prefill_share, 0.0), 1.0), tokens_scale], axis=1)
    group_keys, group_of = np.unique(keys, axis=0, return_inverse=True)
    group_of = group_of.reshape(-1)
    groups: list[_FillGroup] = []
    for group, (model_number, share, scale) in enumerate(group_keys.tolist()):
        model = models[int(model_number)]
        fill = _FillGroup.of(model, share, scale, np.flatnonzero(group_of == group), load, step_w)
        if fill is None:
            return _greedy_fallback(models, model_index, load, prefill_share, tokens_scale, cap_w, step_w)
        groups.append(fill)
    # Every class of steps as (gain per watt, watts it takes): a group's step k for all its
    # GPUs still busy after it, and each GPU's own step.
    rates = np.concatenate([np.concatenate([g.rates[: g.common_steps], g.own_rate]) for g in groups])
    watts = np.concatenate([np.concatenate([g.common_watts(), g.own_step_w]) for g in groups])
    if not len(rates) or left_w <= 1e-9:
        return _water_level(caps_w, max_w, left_w)
    order = np.argsort(-rates, kind="stable")
    left_after = left_w - np.cumsum(watts[order])
    crossing = np.flatnonzero(left_after <= 1e-9)
    if not len(crossing):  # every step taken, watts left
        for g in groups:
            caps_w[g.members] = g.grid_w[g.common_taken + g.own_taken(-math.inf)]
        return _water_level(caps_w, max_w, float(left_after[-1]))
    cut_rate = rates[order[crossing[0]]]
    left_w -= float(np.sum(watts[rates > cut_rate]))
    for g in groups:  # the steps above the cut
        taken = np.minimum(g.common_taken, int(np.count_nonzero(g.rates[: g.common_steps] > cut_rate)))
        own = g.own_taken(cut_rate) & (taken == g.common_taken)
        caps_w[g.members] = g.grid_w[taken + own]
    # the steps at the cut, one GPU after the other (the lower index first) until the watts run out
    at_cut = [g.steps_at(cut_rate) for g in groups]
    gpus_at = np.concatenate([gpus for gpus, _, _ in at_cut])
    order = np.argsort(gpus_at, kind="stable")
    gpus_at = gpus_at[order]
    from_w = np.concatenate([start for _, start, _ in at_cut])[order]
    steps_w = np.concatenate([step for _, _, step in at_cut])[order]
    left_before = left_w - np.concatenate([[0.0], np.cumsum(steps_w)[:-1]])
    last = int(np.count_nonzero(left_before > 1e-9)) - 1
    np.maximum.at(caps_w, gpus_at[:last], from_w[:last] + steps_w[:last])
    final_step = min(steps_w[last], left_before[last])
    caps_w[gpus_at[last]] = from_w[last] + final_step
    return _water_level(caps_w, max_w, left_before[last] - final_step)


@dataclass
class _FillGroup:
    """The greedy fill's steps for the GPUs of one (model, prefill share, tokens scale).

    ``grid_w``: the caps a GPU goes through (its minimum, ``step_w`` at a time, its maximum);
    ``rates``: gain per watt of each step while busy all the time, the same for every GPU of
    the group, valid for the first ``common_steps`` (then a gain at or below the epsilon ends
    the fill); per member: ``common_taken`` of those steps before its load is served, then
    its own step to its load (``own_rate``, over ``own_step_w``, from grid point ``own_from``).
    """

    members: np.ndarray
    grid_w: np.ndarray
    step_w: np.ndarray
    rates: np.ndarray
    common_steps: int
    common_taken: np.ndarray
    has_own: np.ndarray  # per member
    own_rate: np.ndarray  # per member with an own step
    own_step_w: np.ndarray
    own_from: np.ndarray

    @classmethod
    def of(cls, model: GpuModel, share: float, scale: float, members: np.ndarray, load: np.ndarray, step_w: float) -> _FillGroup | None:
        """None when the gains do not fall step after step (the class fill would differ from the greedy one)."""
        grid = [model.min_limit_w]
        steps: list[float] = []
        while (step := min(step_w, model.max_limit_w - grid[-1])) > 1e-9:
            steps.append(step)
            grid.append(grid[-1] + step)
        grid_w, step_array = np.array(grid), np.array(steps)
        _, _, _, work_time = work_times(model, grid_w, share)
        if np.any(np.diff(work_time) > 0):
            return None
        busy_tokens = model.peak_tokens_s * (1.0 - share) * (1.0 / work_time) * scale
        gains = np.diff(busy_tokens)
        rates = gains / step_array if len(steps) else np.zeros(0)
        stops = np.flatnonzero(gains <= _GAIN_EPSILON)
        common_steps = int(stops[0]) if len(stops) else len(steps)
        if np.any(np.diff(rates[:common_steps]) > 0):
            return None
        member_load = load[members]
        busy_points = np.count_nonzero(member_load[:, None] * work_time[None, :] >= 1.0, axis=1)  # a prefix of the grid

        def load_tokens(point: np.ndarray) -> np.ndarray:
            at = work_time[point]
            return model.peak_tokens_s * (1.0 - share) * ((member_load * at) / at) * scale

        last_point = len(steps)
        reaches_own = (busy_points >= 1) & (busy_points <= last_point) & (busy_points - 1 <= common_steps)
        own_from = np.maximum(busy_points - 1, 0)
        own_gain = load_tokens(np.minimum(busy_points, last_point)) - busy_tokens[own_from]
        has_own = reaches_own & (own_gain > _GAIN_EPSILON)
        own_rate = own_gain[has_own] / step_array[own_from[has_own]] if len(steps) else np.zeros(0)
        before_own = own_from[has_own] - 1
        if np.any((before_own >= 0) & (own_rate > rates[np.maximum(before_own, 0)] if len(steps) else False)):
            return None
        # past the point where its load is served a GPU's gains must be float noise
        served = np.minimum(busy_points, last_point)
        after = np.minimum(served + 1, last_point)
        reaches_served = (served < last_point) & (busy_points <= common_steps + 1)
        if np.any(reaches_served & (load_tokens(after) - load_tokens(served) > _GAIN_EPSILON)):
            return None
        return cls(
            members=members, grid_w=grid_w, step_w=step_array, rates=rates, common_steps=common_steps,
            common_taken=np.minimum(own_from, common_steps), has_own=has_own, own_rate=own_rate,
            own_step_w=step_array[own_from[has_own]] if len(steps) else np.zeros(0), own_from=own_from[has_own],
        )

    def common_watts(self) -> np.ndarray:
        """Watts of each common step: its size times the members that take it."""
        takers = np.count_nonzero(self.common_taken[None, :] > np.arange(self.common_steps)[:, None], axis=1)
        return self.step_w[: self.common_steps] * takers

    def own_taken(self, cut_rate: float) -> np.ndarray:
        """Per member, 1 where its own step's rate is above ``cut_rate``."""
        taken = np.zeros(len(self.members), dtype=np.int64)
        taken[np.flatnonzero(self.has_own)[self.own_rate > cut_rate]] = 1
        return taken

    def steps_at(self, cut_rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The steps whose rate is exactly ``cut_rate``: (GPU, cap it starts from, watts)."""
        gpus, starts, sizes = [], [], []
        for k in np.flatnonzero(self.rates[: self.common_steps] == cut_rate).tolist():
            takers = self.members[self.common_taken > k]
            gpus.append(takers)
            starts.append(np.full(len(takers), self.grid_w[k]))
            sizes.append(np.full(len(takers), self.step_w[k]))
        own = self.own_rate == cut_rate
        gpus.append(self.members[self.has_own][own])
        starts.append(self.grid_w[self.own_from[own]])
        sizes.append(self.own_step_w[own])
        return np.concatenate(gpus), np.concatenate(starts), np.concatenate(sizes)


def _greedy_fallback(
    models: Sequence[GpuModel], model_index: np.ndarray, load: np.ndarray, prefill_share: np.ndarray,
    tokens_scale: np.ndarray, cap_w: float, step_w: float,
) -> np.ndarray:
    gpus = [
        OracleGpu(models[m], Workload(u, p), s)
        for m, u, p, s in zip(model_index.tolist(), load.tolist(), prefill_share.tolist(), tokens_scale.tolist())
    ]
    return np.array(oracle_greedy_w(gpus, cap_w, step_w))


def _water_level(caps_w: np.ndarray, max_w: np.ndarray, left_w: float) -> np.ndarray:
    """Headroom: raise the lowest caps together (a water level) with the ``left_w`` watts left."""
    order = np.argsort(caps_w, kind="stable")
    while left_w > 1e-9 and len(order):
        order = order[caps_w[order] < max_w[order] - 1e-9]
        if not len(order):
            break
        level = caps_w[order].min()
        is_low = caps_w[order] <= level + 1e-9
        low, higher = order[is_low], caps_w[order[~is_low]]
        ceiling = min(max_w[low].min(), higher.min()) if len(higher) else max_w[low].min()
        raise_w = min(ceiling - level, left_w / len(low))
        caps_w[low] += raise_w
        left_w -= raise_w * len(low)
    return caps_w
