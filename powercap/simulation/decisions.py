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
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from powercap.algorithms import MAX_SCORE, AlgorithmRegistry
from powercap.cluster import ClusterSettings, ClusterView, build_cluster_view
from powercap.objects import KubeObject
from powercap.numeric import clamp
from powercap.physics import GpuModel, Workload, operating_point
from powercap.placement import filter_nodes, placement_request, prioritize_nodes
from powercap.policies import Policy

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
    """
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
    # Headroom: raise the lowest caps together (a water level) with what is left.
    order = sorted(range(len(gpus)), key=lambda i: caps[i])
    while left_w > 1e-9 and order:
        order = [i for i in order if caps[i] < gpus[i].model.max_limit_w - 1e-9]
        if not order:
            break
        level = min(caps[i] for i in order)
        low = [i for i in order if caps[i] <= level + 1e-9]
        higher = [caps[i] for i in order if caps[i] > level + 1e-9]
        ceiling = min([gpus[i].model.max_limit_w for i in low] + higher)
        raise_w = min(ceiling - level, left_w / len(low))
        for i in low:
            caps[i] += raise_w
        left_w -= raise_w * len(low)
    return caps
