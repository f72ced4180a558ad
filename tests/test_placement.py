"""Filter and prioritize decisions, table-driven over the edges a user would hit."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import pytest

from powercap.algorithms import AlgorithmRegistry, Candidate, PlacementAlgorithm
from powercap.cluster import ClusterView, build_cluster_view
from powercap.placement import RejectReason, filter_nodes, format_watts, prioritize_nodes
from tests.fakes.objects import NOW, gpu_node, gpu_pod, policy, telemetry

LIMITS = {"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 30}
LLAMA = policy("llama", cap_w=8000, racks=[LIMITS])
OTHER_LABELS = {"app": "web"}


def view_of(nodes: list[dict[str, Any]], pods: Sequence[dict[str, Any]] = (), policies: Sequence[dict[str, Any]] = (LLAMA,)) -> ClusterView:
    return build_cluster_view(nodes, pods, policies, NOW)


def pod_700w(**overrides: Any) -> dict[str, Any]:
    return gpu_pod("new", gpus=1, power_watts="700", **overrides)


ONE = [gpu_node("gpu-1", "rack-1", telemetry(4300))]


@pytest.mark.parametrize(
    ("nodes", "pods", "pod", "failed"),
    [
        pytest.param(ONE, [], pod_700w(), {}, id="exactly-at-the-limit"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(4301))], [], pod_700w(),
                     {"gpu-1": "rack-1: 4301 W in use + 700 W for this pod > maxPower 5000 W (set by policy inference/llama)"},
                     id="one-watt-over"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(4300.4))], [], pod_700w(),
                     {"gpu-1": "rack-1: 4300.4 W in use + 700 W for this pod > maxPower 5000 W (set by policy inference/llama)"},
                     id="fraction-of-a-watt-over-reads-right"),
        pytest.param([gpu_node("gpu-1", "rack-9", telemetry(9999))], [], pod_700w(), {}, id="unknown-rack-is-unconstrained"),
        pytest.param([gpu_node("gpu-1", None, telemetry(9999))], [], pod_700w(), {}, id="no-rack-label"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(100, at=NOW - timedelta(seconds=312)))], [], pod_700w(),
                     {"gpu-1": "rack-1: no telemetry from node gpu-1 for 312 s (stale after 90 s)"}, id="stale-telemetry"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(100)), gpu_node("gpu-3", "rack-1", None)], [], pod_700w(),
                     {n: "rack-1: no telemetry from node gpu-3 (no PowerCapNode gpu-3 with a status; "
                         "is the node agent running there?)" for n in ("gpu-1", "gpu-3")},
                     id="one-node-without-telemetry-closes-its-rack"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(100, inlet_c=29.9))], [], pod_700w(), {}, id="inlet-just-below"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(100, inlet_c=30.0))], [], pod_700w(),
                     {"gpu-1": "rack-1: inlet 30 °C >= maxTemperature 30 °C (set by policy inference/llama)"},
                     id="inlet-at-max-temperature"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(4800, inlet_c=31.5))], [], pod_700w(),
                     {"gpu-1": "rack-1: inlet 31.5 °C >= maxTemperature 30 °C (set by policy inference/llama); "
                               "rack-1: 4800 W in use + 700 W for this pod > maxPower 5000 W (set by policy inference/llama)"},
                     id="hot-and-full-says-both"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(9999))], [], gpu_pod("new", gpus=0), {}, id="no-gpu-requested"),
        pytest.param([gpu_node("gpu-1", "rack-1", telemetry(9999))], [], pod_700w(labels=OTHER_LABELS), {}, id="no-policy"),
        pytest.param(
            [gpu_node("gpu-1", "rack-1", telemetry(2901)), gpu_node("gpu-2", "rack-1", telemetry(0))],
            [gpu_pod(f"burst-{i}", gpus=1, labels=OTHER_LABELS, node="gpu-2", bound_at=NOW + timedelta(seconds=i + 1)) for i in range(2)],
            pod_700w(),
            {n: "rack-1: 4301 W in use (incl. 1400 W assumed for 2 pods bound since the last telemetry) + 700 W for this pod "
                "> maxPower 5000 W (set by policy inference/llama)" for n in ("gpu-1", "gpu-2")},
            id="burst-of-pods-before-telemetry-catches-up",
        ),
    ],
)
def test_filter(nodes: list[dict[str, Any]], pods: list[dict[str, Any]], pod: dict[str, Any], failed: dict[str, str]) -> None:
    names = [n["metadata"]["name"] for n in nodes]
    outcome = filter_nodes(view_of(nodes, pods), pod, names)
    assert outcome.failed == failed
    assert outcome.passed == [n for n in names if n not in failed]
    assert outcome.unresolvable == {}


def test_a_burst_fills_a_rack_then_spills_to_the_next() -> None:
    """kube-scheduler places pods one after another; each binding is assumed until telemetry shows it."""
    nodes = [gpu_node("a-1", "rack-1", telemetry(3000)), gpu_node("b-1", "rack-2", telemetry(3000))]
    policies = [policy("llama", cap_w=20000, racks=[{"rackId": "rack-1", "maxPower": 5000}, {"rackId": "rack-2", "maxPower": 5000}])]
    bound: list[dict[str, Any]] = []
    placements = []
    for i in range(6):
        view = build_cluster_view(nodes, bound, policies, NOW + timedelta(seconds=i + 1))
        passed = filter_nodes(view, gpu_pod(f"p{i}", gpus=1, power_watts="700"), ["a-1", "b-1"]).passed
        if not passed:
            placements.append(None)
            continue
        placements.append(passed[0])
        bound.append(gpu_pod(f"p{i}", gpus=1, power_watts="700", node=passed[0], bound_at=NOW + timedelta(seconds=i + 1)))
    assert placements == ["a-1", "a-1", "b-1", "b-1", None, None]


def test_the_strictest_of_two_policies_wins() -> None:
    policies = [
        policy("llama", cap_w=8000, racks=[{"rackId": "rack-1", "maxPower": 6000}]),
        policy("mistral", "other-team", cap_w=8000, racks=[{"rackId": "rack-1", "maxPower": 5000}], selector={"matchLabels": {"app": "mistral"}}),
    ]
    outcome = filter_nodes(view_of([gpu_node("gpu-1", "rack-1", telemetry(4800))], policies=policies), pod_700w(), ["gpu-1"])
    assert outcome.failed == {"gpu-1": "rack-1: 4800 W in use + 700 W for this pod > maxPower 5000 W (set by policy other-team/mistral)"}
    assert outcome.rejections == {RejectReason.POWER: 1}


@pytest.mark.parametrize(
    "status, budget",
    [
        # no status yet: the default margin, 0
        pytest.param(None, "1900 W (the whole powerCapLimit)", id="default"),
        # published by a controller run with --margin=0.03: floor(1900 x 0.97) = 1843
        pytest.param({"observedGeneration": 1, "budgetW": 1843},
                     "1843 W (powerCapLimit 1900 W less the controller's margin)", id="--margin=0.03"),
    ],
)
def test_an_infeasible_policy_fails_every_node_as_unresolvable(status: dict | None, budget: str) -> None:
    # 8 GPUs bound + 2 requested, each at least 200 W: 2000 W > the budget
    small = policy("llama", cap_w=1900)
    if status is not None:
        small = {**small, "status": status}
    bound = [gpu_pod(f"old-{i}", gpus=4, node="gpu-1", bound_at=NOW - timedelta(minutes=9)) for i in range(2)]
    view = view_of([gpu_node("gpu-1", None, telemetry(1600)), gpu_node("gpu-2", None, telemetry(0))], bound, [small])
    outcome = filter_nodes(view, gpu_pod("new", gpus=2), ["gpu-1", "gpu-2"])
    reason = ("policy inference/llama cannot power another GPU: (8 GPUs in use + 2 for this pod) x 200 W minimum limit "
              f"= 2000 W > its budget {budget}")
    assert outcome.unresolvable == {"gpu-1": reason, "gpu-2": reason}
    assert outcome.passed == [] and outcome.failed == {}
    assert outcome.rejections == {RejectReason.INFEASIBLE_POLICY: 2}
    assert filter_nodes(view, gpu_pod("new", gpus=1), ["gpu-1"]).passed == ["gpu-1"]  # 9 x 200 W = 1800 W fits either


def test_an_observe_policy_never_rejects() -> None:
    observing = policy("llama", racks=[LIMITS], mode="Observe")
    view = view_of([gpu_node("gpu-1", "rack-1", telemetry(9000, inlet_c=40))], policies=[observing])
    assert filter_nodes(view, pod_700w(), ["gpu-1"]).passed == ["gpu-1"]


def test_a_node_unknown_to_the_view_fails_only_while_racks_are_constrained() -> None:
    constrained = view_of(ONE)
    outcome = filter_nodes(constrained, pod_700w(), ["gpu-1", "gpu-new"])
    assert outcome.passed == ["gpu-1"]
    assert outcome.failed == {"gpu-new": "node gpu-new is not in the power-aware extender's view yet (rack and telemetry unknown)"}
    unconstrained = view_of(ONE, policies=[policy("llama")])
    assert filter_nodes(unconstrained, pod_700w(), ["gpu-1", "gpu-new"]).passed == ["gpu-1", "gpu-new"]


def test_rejections_are_counted_by_reason() -> None:
    nodes = [
        gpu_node("hot", "rack-1", telemetry(100, inlet_c=35)),
        gpu_node("full", "rack-2", telemetry(4900)),
        gpu_node("stale", "rack-3", telemetry(0, at=NOW - timedelta(hours=1))),
        gpu_node("fine", "rack-4", telemetry(0)),
    ]
    racks = [{**LIMITS, "rackId": f"rack-{i}"} for i in range(1, 5)]
    view = view_of(nodes, policies=[policy("llama", cap_w=8000, racks=racks)])
    outcome = filter_nodes(view, pod_700w(), ["hot", "full", "stale", "fine"])
    assert outcome.passed == ["fine"]
    assert outcome.rejections == {RejectReason.TEMPERATURE: 1, RejectReason.POWER: 1, RejectReason.STALE_TELEMETRY: 1}


@pytest.mark.parametrize(("watts", "text"), [(4800, "4800"), (4800.04, "4800"), (4800.4, "4800.4"), (0.5, "0.5")])
def test_format_watts(watts: float, text: str) -> None:
    assert format_watts(watts) == text


# -- prioritize

def scores_for(algorithm: dict[str, Any] | None, nodes: list[dict[str, Any]], pod: dict[str, Any] | None = None,
               registry: AlgorithmRegistry | None = None, racks: Sequence[dict[str, Any]] = ()) -> dict[str, int]:
    registry = registry or AlgorithmRegistry.default(discover=lambda: [])
    view = build_cluster_view(nodes, [], [policy("llama", cap_w=8000, racks=racks, algorithm=algorithm)], NOW, registry=registry)
    assert not view.invalid_policies
    names = [n["metadata"]["name"] for n in nodes]
    return dict(prioritize_nodes(view, pod or pod_700w(), names, registry))


RACKS_A_B = [{"rackId": "rack-a", "maxPower": 10000, "maxTemperature": 30}, {"rackId": "rack-b", "maxPower": 10000, "maxTemperature": 30}]


def test_headroom_prefers_the_rack_with_more_power_and_temperature_headroom() -> None:
    nodes = [gpu_node("a", "rack-a", telemetry(2300, inlet_c=20)), gpu_node("b", "rack-b", telemetry(7300, inlet_c=20)),
             gpu_node("c", None, telemetry(2100)), gpu_node("d", None, None)]
    # a: min((10000-2300-700)/10000, (30-20)/(30-18)) = 0.70 -> 7; b: (10000-7300-700)/10000 = 0.2 -> 2
    # c (no rack): (8 x 700 - 2100 - 700) / 5600 = 0.5 -> 5; d: no telemetry -> 0
    assert scores_for(None, nodes, racks=RACKS_A_B) == {"a": 7, "b": 2, "c": 5, "d": 0}


def test_energy_aware_packs_under_the_threshold() -> None:
    nodes = [gpu_node("idle", None, telemetry(0)), gpu_node("busy", None, telemetry(2100)),
             gpu_node("over", None, telemetry(3000)), gpu_node("dark", None, None)]
    # threshold 3500: idle 1 + 9 x 700/3500 = 2.8 -> 3; busy 1 + 9 x 2800/3500 = 8.2 -> 8; over 3700 > 3500 -> 0
    algorithm = {"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 3500}}
    assert scores_for(algorithm, nodes) == {"idle": 3, "busy": 8, "over": 0, "dark": 0}


def test_thermal_aware_prefers_cool_racks_and_penalises_rising_ones() -> None:
    nodes = [gpu_node("cool", "rack-a", telemetry(100, inlet_c=21)), gpu_node("warm", "rack-b", telemetry(100, inlet_c=27)),
             gpu_node("free", None, telemetry(100, inlet_c=25)), gpu_node("blind", None, telemetry(100, inlet_c=None))]
    # cool: 10 x (30-21)/(30-18) = 7.5 -> 8; warm: 10 x 3/12 = 2.5 -> 3; free (32 °C reference): 10 x 7/14 = 5
    assert scores_for({"name": "thermal-aware"}, nodes, racks=RACKS_A_B) == {"cool": 8, "warm": 3, "free": 5, "blind": 0}
    earlier = [gpu_node("cool", "rack-a", telemetry(100, inlet_c=20, at=NOW - timedelta(minutes=1))), *nodes[1:]]
    policies = [policy("llama", cap_w=8000, racks=RACKS_A_B, algorithm={"name": "thermal-aware"})]
    registry = AlgorithmRegistry.default(discover=lambda: [])
    view = build_cluster_view(nodes, [], policies, NOW, previous=build_cluster_view(earlier, [], policies, NOW))
    # rising 1 °C/min: 7.5 - 5 = 2.5 -> 3
    assert dict(prioritize_nodes(view, pod_700w(), ["cool"], registry)) == {"cool": 3}


class Raising(PlacementAlgorithm):
    """Test plugin whose scoring raises."""

    name = "raising"

    def score(self, candidates: Sequence[Candidate], parameters: Mapping[str, Any]) -> list[float]:
        raise ZeroDivisionError("division by zero")


class ShortList(PlacementAlgorithm):
    """Test plugin that returns too few scores."""

    name = "short"

    def score(self, candidates: Sequence[Candidate], parameters: Mapping[str, Any]) -> list[float]:
        return [10.0]


class ValidationOnly(PlacementAlgorithm):
    """Test plugin that declares parameters but does not score."""

    name = "validation-only"


@pytest.mark.parametrize(
    ("plugin", "problem"),
    [
        pytest.param(Raising(), "ZeroDivisionError: division by zero", id="raises"),
        pytest.param(ShortList(), "ValueError: returned 1 score for 2 nodes", id="wrong-length"),
        pytest.param(ValidationOnly(), "NotImplementedError", id="does-not-score"),
    ],
)
def test_a_failing_algorithm_falls_back_to_headroom_with_a_log_line(
    plugin: PlacementAlgorithm, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = AlgorithmRegistry.default(discover=lambda: [])
    registry.register(plugin)
    nodes = [gpu_node("a", "rack-a", telemetry(2300, inlet_c=20)), gpu_node("b", "rack-b", telemetry(7300, inlet_c=20))]
    with caplog.at_level(logging.WARNING, logger="powercap.placement"):
        scores = scores_for({"name": plugin.name}, nodes, registry=registry, racks=RACKS_A_B)
    assert scores == {"a": 7, "b": 2}
    assert f"placement algorithm {plugin.name} failed; scoring with headroom instead: {problem}" in caplog.text


def test_pods_no_policy_covers_score_zero_everywhere() -> None:
    nodes = [gpu_node("a", "rack-a", telemetry(2300)), gpu_node("b", "rack-b", telemetry(0))]
    assert scores_for(None, nodes, pod=pod_700w(labels=OTHER_LABELS)) == {"a": 0, "b": 0}
    assert scores_for(None, nodes, pod=gpu_pod("cpu", gpus=0)) == {"a": 0, "b": 0}


def test_scores_are_integers_from_0_to_10() -> None:
    nodes = [gpu_node(f"n{i}", None, telemetry(i * 500)) for i in range(12)]
    scores = scores_for(None, nodes)
    assert all(isinstance(s, int) and 0 <= s <= 10 for s in scores.values())
    assert scores["n0"] == 9 and scores["n11"] == 0  # (5600 - 0 - 700)/5600 = 0.875; n11 is over capacity


def test_an_algorithm_this_extender_does_not_have_falls_back_to_headroom(caplog: pytest.LogCaptureFixture) -> None:
    """A policy admitted by a webhook with a plugin the extender's image lacks."""
    with_plugin = AlgorithmRegistry.default(discover=lambda: [])
    with_plugin.register(ValidationOnly())
    nodes = [gpu_node("a", "rack-a", telemetry(2300, inlet_c=20))]
    view = build_cluster_view(nodes, [], [policy("llama", racks=RACKS_A_B, algorithm={"name": "validation-only"})], NOW, registry=with_plugin)
    with caplog.at_level(logging.WARNING, logger="powercap.placement"):
        scores = prioritize_nodes(view, pod_700w(), ["a"], AlgorithmRegistry.default(discover=lambda: []))
    assert scores == [("a", 7)]
    assert "placement algorithm validation-only failed; scoring with headroom instead: not registered in this extender" in caplog.text
