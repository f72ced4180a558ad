"""Second review of #14's defaults (the whole powerCapLimit shared out, the marginal-value
rebalancing on): the rebalancing beside a ``performancePowerRatio``, GPUs that cannot move,
and agents that apply an allocation late. Each test chains the real controller round
(:func:`powercap.budget.plan_round`) with the real agent side (the control law
:func:`powercap.control.next_cap`, or the agent's plan :func:`powercap.agentplan.plan_tick`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from nodeagent.gpus import GpuSnapshot
from powercap.agentplan import Action, TickInputs, plan_tick
from powercap.allocation import AllocationSettings
from powercap.budget import plan_round
from powercap.control import ControlState, GpuMeasurement, next_cap
from powercap.marginal import MarginalSettings
from powercap.physics import H200_LIKE, Workload, operating_point
from powercap.policies import PerformanceTarget, parse_policy
from powercap.status import published_allocations
from tests.fakes.clusters import Gpu, agents_apply, node, view, with_status
from tests.fakes.objects import NOW, gpu_pod, policy

LLAMA = {"app.kubernetes.io/name": "llama"}
KEY = "inference/llama"
PREFILL_SHARE = 0.2


def bound_pods(nodes_of_pods: list[str]) -> list[dict[str, Any]]:
    return [gpu_pod(f"llama-{i}", node=name, labels=LLAMA, bound_at=NOW - timedelta(minutes=10))
            for i, name in enumerate(nodes_of_pods)]


def enforced_reason(status: dict[str, Any]) -> str:
    [enforced] = [c for c in status["conditions"] if c["type"] == "Enforced"]
    return str(enforced["reason"])


# -- 1. performancePowerRatio with the rebalancing ---------------------------------------------


@dataclass
class RatioLoop:
    """One node of H200-like GPUs of one policy with a tokens/J target, closed in simulated time:
    every second the control law runs for each GPU on the allocation published and the tokens/J
    its load makes at its cap (:func:`powercap.physics.operating_point`); every 5 s a controller
    round reads the GPUs' power, limit and tokens/s at the caps in force."""

    loads: tuple[float, ...]
    cap_w: int
    target: PerformanceTarget
    marginal: bool = True
    caps: list[float] = field(default_factory=list)
    states: list[ControlState] = field(default_factory=list)
    allocation_changes: list[int] = field(default_factory=list)  # rounds (seconds) whose allocation differed
    worst_in_force_w: float = 0.0

    def run(self, seconds: int) -> dict[str, float]:
        n = len(self.loads)
        self.caps = [700.0] * n  # the default limit until the first allocation
        self.states = [ControlState() for _ in range(n)]
        settings = AllocationSettings(marginal=MarginalSettings(enabled=self.marginal))
        pods = bound_pods(["gpu-1"] * n)
        document = policy("llama", cap_w=self.cap_w)
        lagging: dict[str, Any] | None = None
        for second in range(seconds):
            allocation = published_allocations(document.get("status"))
            for i, load in enumerate(self.loads):
                point = operating_point(H200_LIKE, self.caps[i], Workload(load, PREFILL_SHARE))
                decision = next_cap(GpuMeasurement(
                    current_cap_w=self.caps[i], min_w=200, max_w=700, allocation_w=allocation.get(f"G{i}"),
                    tokens_per_joule=point.tokens_per_joule, target=self.target,
                ), self.states[i], float(second))
                self.caps[i], self.states[i] = decision.cap_w, decision.state
            if allocation:
                self.worst_in_force_w = max(self.worst_in_force_w, sum(self.caps))
            if second % 5:
                continue
            points = [operating_point(H200_LIKE, c, Workload(load, PREFILL_SHARE)) for c, load in zip(self.caps, self.loads)]
            now = NOW + timedelta(seconds=second)
            telemetry = [node("gpu-1", None, [
                Gpu(f"G{i}", round(p.power_w, 1), self.caps[i], f"inference/llama-{i}", tokens_s=round(p.tokens_s, 1))
                for i, p in enumerate(points)
            ], at=now)]
            plan = plan_round(view(telemetry, pods, [document], now=now), settings, lagging_before=lagging).policies[KEY]
            lagging = {KEY: plan.lagging}
            before = published_allocations(document.get("status"))
            document = with_status(document, dict(plan.status))
            if published_allocations(document["status"]) != before:
                self.allocation_changes.append(second)
        return published_allocations(document["status"])


def efficient_cap_w(load: float, target: PerformanceTarget) -> float:
    """The highest cap (5 W steps) at which a GPU at ``load`` still meets the target's low band."""
    caps = [c for c in range(200, 701, 5)
            if operating_point(H200_LIKE, c, Workload(load, PREFILL_SHARE)).tokens_per_joule >= target.low_tokens_per_joule]
    return max(caps, default=200)


@pytest.mark.parametrize(("loads", "cap_w", "target"), [
    pytest.param((1.0, 0.7, 0.3, 0.5, 1.0, 0.5), 2700, 5.0, id="budget-left-over"),
    pytest.param((0.5, 0.9, 0.7, 0.5, 1.0, 1.0), 1800, 6.5, id="budget-spent-target-below-allocations"),
    pytest.param((1.0, 0.8, 0.6, 0.4), 1400, 5.0, id="budget-spent-mixed-loads"),
])
def test_a_ratio_target_and_the_rebalancing_do_not_fight(loads: tuple[float, ...], cap_w: int, target: float) -> None:
    """The agent lowers a busy GPU's cap below its allocation for tokens/J; the controller then
    sees it pinned at that lower cap, asks ``cap + step`` for it and, with the rebalancing,
    weighs its tokens at that cap. Feared: the allocation follows the lowered cap down, the
    offset is taken again from the lower ceiling, and the GPU spirals to its minimum while busy;
    or the two keep rewriting the status. Measured: neither, with exact readings: every busy
    GPU ends at or above the cap its tokens/J target asks (or its share of a spent budget),
    the allocations stop changing within a minute, and the caps in force stay within the cap."""
    ratio = PerformanceTarget(target)
    loop = RatioLoop(loads, cap_w, ratio)
    allocation = loop.run(600)
    assert loop.worst_in_force_w <= cap_w
    assert not [s for s in loop.allocation_changes if s >= 120], loop.allocation_changes  # settled
    for i, load in enumerate(loads):
        wanted_w = min(efficient_cap_w(load, ratio), allocation[f"G{i}"])
        # within two of the law's 10 W steps of what the target asks, never spiralled below it
        assert loop.caps[i] >= wanted_w - 20, (i, load, loop.caps, allocation)
    # and the rebalancing does not cost tokens next to the fill alone under the same target
    fill = RatioLoop(loads, cap_w, ratio, marginal=False)
    fill.run(600)
    tokens = [sum(operating_point(H200_LIKE, c, Workload(load, PREFILL_SHARE)).tokens_s for c, load in zip(run.caps, loads))
              for run in (loop, fill)]
    assert tokens[0] >= tokens[1] * 0.99


# -- 2. a GPU that cannot move, alone on its node --------------------------------------------


def snapshot(uuid: str, index: int, limit_w: float, power_w: float) -> GpuSnapshot:
    return GpuSnapshot(index=index, uuid=uuid, power_w=power_w, limit_w=limit_w, requested_limit_w=limit_w,
                       min_limit_w=200.0, max_limit_w=700.0, default_limit_w=700.0,
                       temperature_c=60.0, slowdown_c=89.0, shutdown_c=95.0)


def test_a_gpu_stuck_at_its_default_alone_on_its_node_is_made_room_for_elsewhere() -> None:
    """GPU A (alone on gpu-1) is reset to its 700 W default and its setter answers NoPermission;
    B, C and D on gpu-2 are busy. Rounds every 5 s, both agents' plans every second. A's agent
    can make room only among its node's GPUs (none); the controller, seeing A above its
    allocation in two rounds running (0 s and 5 s), counts it at the 700 W it reports, so
    B, C and D get 300 W each from the second round on (1900 W in force before: 700 + 3 x 400)."""
    pods = bound_pods(["gpu-1", "gpu-2", "gpu-2", "gpu-2"])
    uuids = {"gpu-1": ["A"], "gpu-2": ["B", "C", "D"]}
    document = with_status(policy("llama", cap_w=1600), {"allocations": [
        {"node": "gpu-1", "gpus": [{"uuid": "A", "watts": 400}], "watts": 400},
        {"node": "gpu-2", "gpus": [{"uuid": u, "watts": 400} for u in uuids["gpu-2"]], "watts": 1200},
    ]})
    limits = {"A": 700.0, "B": 400.0, "C": 400.0, "D": 400.0}  # A: the driver reset, the setter fails from now on
    worst = []
    lagging: dict[str, Any] | None = None
    for second in range(60):
        now = NOW + timedelta(seconds=second)
        if second % 5 == 0:
            telemetry = [node(name, None, [Gpu(u, limits[u] - 5, limits[u], f"inference/llama-{'ABCD'.index(u)}")
                                           for u in gpus], at=now) for name, gpus in uuids.items()]
            plan = plan_round(view(telemetry, pods, [document], now=now), lagging_before=lagging).policies[KEY]
            lagging = {KEY: plan.lagging}
            document = with_status(document, dict(plan.status))
        parsed = parse_policy(document)
        for name, gpus in uuids.items():
            tick = TickInputs(node=name, now_s=float(second), policies=[parsed],
                              readings=[snapshot(u, i, limits[u], limits[u] - 5) for i, u in enumerate(gpus)],
                              stuck=frozenset({"A"}))
            for gpu_plan in plan_tick(tick):
                if gpu_plan.action is Action.SET and gpu_plan.uuid != "A":
                    limits[gpu_plan.uuid] = gpu_plan.cap_w
        worst.append(sum(limits.values()))
    assert enforced_reason(document["status"]) == "AgentsLagging"  # A's allocation stays what it was: still lagging
    assert published_allocations(document["status"])["A"] == 400
    assert max(worst[6:]) <= 1600, f"caps in force {limits}: {sum(limits.values()):g} W > 1600 W"
    assert worst[:5] == [1900.0] * 5  # the round at 0 s is the first to see A above its allocation


# -- 3. the rebalancing between nodes of a rack, and an agent that applies late --------------------


def rack_pair(tokens_a: float, tokens_b: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """GPU A on gpu-1 and GPU B on gpu-2, both in rack-1 (maxPower 900 W, the rack's other load
    none), both pinned at 400 W under powerCapLimit 800 W: the service and the rack are spent."""
    pods = bound_pods(["gpu-1", "gpu-2"])
    nodes = [node("gpu-1", "rack-1", [Gpu("A", 399, 400, "inference/llama-0", tokens_s=tokens_a)]),
             node("gpu-2", "rack-1", [Gpu("B", 399, 400, "inference/llama-1", tokens_s=tokens_b)])]
    document = with_status(policy("llama", cap_w=800, racks=[{"rackId": "rack-1", "maxPower": 800}]), {"allocations": [
        {"node": "gpu-1", "gpus": [{"uuid": "A", "watts": 400}], "watts": 400},
        {"node": "gpu-2", "gpus": [{"uuid": "B", "watts": 400}], "watts": 400},
    ]})
    return nodes, pods, document


def pinned(_: Any, limit_w: float) -> float:
    return limit_w - 1


def test_the_rebalancing_between_nodes_of_a_rack_lowers_first_and_raises_a_round_later() -> None:
    """A makes twice B's tokens at the same cap: the rebalancing moves 50 W from B to A across
    nodes. The lower goes out first, the raise a round later, so that with agents applying
    within a round the caps in force never pass the service's cap or the rack's maxPower, and
    ``sum max(previous, new)`` holds for the service and the rack every round."""
    nodes, pods, document = rack_pair(3000, 1000)  # 3x apart: beyond marginal.EQUAL_WITHIN after B is lowered too
    previous = published_allocations(document["status"])
    published = []
    for round_index in range(6):
        now = NOW + timedelta(seconds=5 * round_index)
        plan = plan_round(view(nodes, pods, [document], now=now)).policies[KEY]
        document = with_status(document, dict(plan.status))
        new = published_allocations(document["status"])
        assert sum(max(previous[u], new[u]) for u in new) <= 800  # the service, and the rack (the same GPUs)
        # each agent applies within the round (in either order): every mix of old and new fits
        for mix in ({"A": previous["A"], "B": new["B"]}, {"A": new["A"], "B": previous["B"]}):
            assert sum(mix.values()) <= 800
        published.append(new)
        previous = new
        nodes = agents_apply(nodes, [document], at=now + timedelta(seconds=1), draw_w=pinned)
    # the rack's raise keeps room for its overshoot (1 % of 450 W, ceil-ed): 445 W; the last
    # 5 W are within the deadband (5 % of the range) and stay unspent
    assert published[0] == {"A": 400, "B": 350}
    assert published[1:] == [{"A": 445, "B": 350}] * 5


def test_an_agent_lagging_past_a_round_is_counted_at_its_limit_a_round_later_and_reported() -> None:
    """The same move with gpu-2's agent never applying B's lower. The safe transitions count B
    at the 400 W its telemetry reports in force, not at the 350 W published for it, so A's
    raise never goes out: 800 W in force under an 800 W powerCapLimit and an 800 W rack in
    every round. (They used to count the published 350 W: 450 + 400 = 850 W in force for a
    round.) From round 3, B lagging in two rounds running is reported: Enforced=False,
    AgentsLagging."""
    nodes, pods, document = rack_pair(3000, 1000)  # 3x apart: beyond marginal.EQUAL_WITHIN after B is lowered too
    lagging: dict[str, Any] | None = {}
    reasons, in_force = [], []
    for round_index in range(4):
        now = NOW + timedelta(seconds=5 * round_index)
        plan = plan_round(view(nodes, pods, [document], now=now), lagging_before=lagging).policies[KEY]
        lagging = {KEY: plan.lagging}
        document = with_status(document, dict(plan.status))
        reasons.append(enforced_reason(document["status"]))
        applied = agents_apply(nodes, [document], at=now + timedelta(seconds=1), draw_w=pinned)
        nodes = [applied[0], nodes[1]]  # gpu-2's agent does not apply
        gpus = view(nodes, pods, [document], now=now).policies[KEY].gpus
        in_force.append(sum(g.gpu.limit_w for g in gpus))
    assert in_force == [800, 800, 800, 800]
    assert reasons[0] == "AllocationApplied" and reasons[2:] == ["AgentsLagging", "AgentsLagging"]
