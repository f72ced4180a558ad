"""The cluster view: racks, telemetry freshness, assumed power, strictest limits, policy GPUs."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from powercap.cluster import (
    ClusterSettings,
    TelemetryStatus,
    build_cluster_view,
    estimate_pod_power_w,
)
from powercap.policies import Policy
from tests.fakes.objects import NOW, gpu_node, gpu_pod, policy, telemetry

RACK_1 = [{"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 30}]


def view_of(nodes: list[dict[str, Any]], pods: list[dict[str, Any]] = (), policies: list[dict[str, Any]] = (), **settings: Any):  # type: ignore[assignment]
    return build_cluster_view(nodes, pods, policies, NOW, ClusterSettings(**settings))


@pytest.mark.parametrize(
    "stale, expected",
    [
        pytest.param(2, "no telemetry from node gpu-1 for 312 s (stale after 90 s); and 1 more node without fresh "
                        "telemetry", id="one more"),
        pytest.param(3, "no telemetry from node gpu-1 for 312 s (stale after 90 s); and 2 more nodes without fresh "
                        "telemetry", id="two more"),
    ],
)
def test_a_rack_names_its_first_silent_node_and_counts_the_others(stale: int, expected: str) -> None:
    at = NOW - timedelta(seconds=312)
    view = view_of([gpu_node(f"gpu-{i}", "rack-1", telemetry(1000, at=at)) for i in range(1, stale + 1)],
                   policies=[policy("llama", racks=RACK_1)])
    assert view.racks["rack-1"].telemetry_problem == expected


def test_rack_power_is_fresh_node_power_and_temperature_the_hottest_inlet() -> None:
    view = view_of(
        [
            gpu_node("gpu-1", "rack-1", telemetry(2000, inlet_c=24.5)),
            gpu_node("gpu-2", "rack-1", telemetry(1500, inlet_c=26.0)),
            gpu_node("gpu-3", "rack-1", telemetry(3000, inlet_c=35.0, at=NOW - timedelta(seconds=312))),
            gpu_node("gpu-4", "rack-2", telemetry(900, inlet_c=None)),
        ],
        policies=[policy("llama", racks=RACK_1)],
    )
    rack = view.racks["rack-1"]
    assert rack.measured_power_w == 3500  # the stale node's 3000 W is not counted
    assert rack.inlet_temperature_c == 26.0  # nor its 35 °C
    assert rack.nodes == ("gpu-1", "gpu-2", "gpu-3")
    assert rack.unreliable_nodes == ("gpu-3",)
    assert rack.telemetry_problem == "no telemetry from node gpu-3 for 312 s (stale after 90 s)"
    assert rack.constrained and rack.limits.max_power_w == 5000 and rack.limits.max_power_policy == "inference/llama"
    assert view.racks["rack-2"].inlet_temperature_c is None and not view.racks["rack-2"].constrained
    assert view.rack_of("gpu-4") is view.racks["rack-2"]
    assert view.rack_of("no-such-node") is None
    assert view.has_constraints


@pytest.mark.parametrize(
    ("annotation", "gpus", "status", "problem"),
    [
        pytest.param(telemetry(100), 8, TelemetryStatus.FRESH, None, id="fresh"),
        pytest.param(telemetry(100, at=NOW - timedelta(seconds=90)), 8, TelemetryStatus.FRESH, None, id="exactly-stale-after-is-fresh"),
        pytest.param(telemetry(100, at=NOW - timedelta(seconds=91)), 8, TelemetryStatus.STALE,
                     "no telemetry from node n for 91 s (stale after 90 s)", id="one-second-late"),
        pytest.param(telemetry(100, at=NOW + timedelta(seconds=5)), 8, TelemetryStatus.FRESH, None, id="clock-skew-ahead"),
        pytest.param(telemetry(100, at=NOW + timedelta(hours=2)), 8, TelemetryStatus.STALE,
                     "telemetry of node n is stamped 7200 s in the future (its clock is ahead; more than 5 s counts as stale)",
                     id="clock-hours-ahead-is-stale-not-fresh-for-hours"),
        pytest.param(None, 8, TelemetryStatus.MISSING,
                     "no telemetry from node n (no PowerCapNode n with a status; "
                     "is the node agent running there?)", id="missing"),
        pytest.param('{"timestamp": "2026-11-27T23:20:00Z", "powerW": "lots"}', 8, TelemetryStatus.MALFORMED,
                     "telemetry of node n is unreadable (powerW must be a finite number)", id="malformed"),
    ],
)
def test_telemetry_status_of_a_node(annotation: str | None, gpus: int, status: TelemetryStatus, problem: str | None) -> None:
    node = view_of([gpu_node("n", "rack-1", annotation, gpus=gpus)]).nodes["n"]
    assert node.telemetry_status is status
    assert node.telemetry_problem == problem
    assert node.needs_telemetry


def test_a_cpu_node_without_telemetry_does_not_make_its_rack_unreliable() -> None:
    view = view_of([gpu_node("cpu-1", "rack-1", None, gpus=0), gpu_node("gpu-1", "rack-1", telemetry(700))])
    assert view.racks["rack-1"].unreliable_nodes == ()
    assert not view.nodes["cpu-1"].needs_telemetry


LLAMA = {"app.kubernetes.io/name": "llama"}
OTHER = {"app": "other"}


@pytest.mark.parametrize(
    ("pods", "assumed_w", "assumed_pods"),
    [
        pytest.param([gpu_pod("a", gpus=2, node="gpu-1", bound_at=NOW - timedelta(seconds=30))], 0, (),
                     id="bound-before-telemetry-is-measured"),
        pytest.param([gpu_pod("a", gpus=2, node="gpu-1", bound_at=NOW + timedelta(seconds=1))], 2 * 700, ("inference/a",),
                     id="bound-after-telemetry-is-assumed"),
        pytest.param([gpu_pod("a", gpus=2, node="gpu-1", bound_at=NOW + timedelta(seconds=0.7))], 2 * 700, ("inference/a",),
                     id="bound-in-the-same-whole-second-as-telemetry-is-assumed"),
        pytest.param([gpu_pod("a", gpus=2, node="gpu-1", bound_at=NOW - timedelta(seconds=1))], 0, (),
                     id="bound-a-whole-second-before-telemetry-is-measured"),
        pytest.param([gpu_pod(f"p{i}", gpus=1, labels=OTHER, node="gpu-1", bound_at=NOW + timedelta(seconds=i + 1))
                      for i in range(4)], 4 * 700, ("inference/p0", "inference/p1", "inference/p2", "inference/p3"),
                     id="burst-of-pods-before-telemetry-catches-up"),
        pytest.param([gpu_pod("a", gpus=1, labels=OTHER, node="gpu-1", bound_at=NOW + timedelta(seconds=1), power_watts="350")],
                     350, ("inference/a",), id="annotation-wins"),
        pytest.param([gpu_pod("seen", gpus=1, node="gpu-1", bound_at=NOW + timedelta(seconds=1))], 0, (),
                     id="already-visible-in-telemetry"),
        pytest.param([gpu_pod("a", gpus=1, labels=OTHER, node="gpu-1", bound_at=NOW + timedelta(seconds=1), phase="Succeeded")],
                     0, (), id="finished-pod"),
        pytest.param([gpu_pod("a", gpus=0, labels=OTHER, node="gpu-1", bound_at=NOW + timedelta(seconds=1))], 0, (),
                     id="no-gpu-requested"),
    ],
)
def test_assumed_power_of_pods_bound_after_the_last_telemetry(pods: list[dict[str, Any]], assumed_w: float, assumed_pods: tuple[str, ...]) -> None:
    view = view_of(
        [gpu_node("gpu-1", "rack-1", telemetry(1000, pods=["inference/seen"]))],
        pods,
        [policy("llama", cap_w=8000, racks=RACK_1)],
    )
    node = view.nodes["gpu-1"]
    assert (node.assumed_power_w, node.assumed_pods) == (assumed_w, assumed_pods)
    assert view.racks["rack-1"].power_w == 1000 + assumed_w


def test_policy_pods_are_assumed_at_their_per_gpu_budget() -> None:
    # 4000 W over the service's 4 bound GPUs = 1000 W per GPU, above the GPU's 700 W maximum
    # -> 700 W; with a 2000 W cap, 500 W each.
    pods = [gpu_pod(f"p{i}", gpus=2, node="gpu-1", bound_at=NOW + timedelta(seconds=1)) for i in range(2)]
    for cap_w, expected_w in ((4000, 4 * 700), (2000, 4 * 500)):
        view = view_of([gpu_node("gpu-1", "rack-1", telemetry(0))], pods, [policy("llama", cap_w=cap_w)])
        assert view.nodes["gpu-1"].assumed_power_w == expected_w


def test_telemetry_stamped_in_the_future_hides_no_pod_from_assumed_power() -> None:
    """A node clock an hour ahead stamps telemetry after every binding; the pods bound since
    the real last reading (and those it lists) still count as assumed power."""
    ahead = telemetry(1000, at=NOW + timedelta(hours=1), pods=["inference/seen"])
    pods = [gpu_pod("new", gpus=1, labels=OTHER, node="gpu-1", bound_at=NOW - timedelta(seconds=2)),
            gpu_pod("seen", gpus=1, labels=OTHER, node="gpu-1", bound_at=NOW - timedelta(seconds=60))]
    view = view_of([gpu_node("gpu-1", "rack-1", ahead)], pods, [policy("llama", cap_w=8000, racks=RACK_1)])
    node = view.nodes["gpu-1"]
    assert node.assumed_pods == ("inference/new", "inference/seen") and node.assumed_power_w == 2 * 700
    assert not node.fresh and view.racks["rack-1"].telemetry_problem is not None


def test_every_gpu_pod_on_a_node_without_telemetry_is_assumed() -> None:
    view = view_of([gpu_node("gpu-1", "rack-1", None)], [gpu_pod("a", gpus=1, labels=OTHER, node="gpu-1", bound_at=NOW - timedelta(hours=1))])
    assert view.nodes["gpu-1"].assumed_power_w == 700
    assert view.nodes["gpu-1"].measured_power_w == 0


@pytest.mark.parametrize(
    ("gpus", "annotation_w", "cap_w", "service_gpus", "node_max_w", "expected_w"),
    [
        pytest.param(2, 550.0, 4200, 4, 700, 550.0, id="annotation"),
        pytest.param(2, None, 4200, 8, 700, 2 * 525.0, id="policy-budget"),
        pytest.param(2, None, 4200, 2, 700, 2 * 700.0, id="budget-above-gpu-max"),
        pytest.param(2, None, None, 2, 400, 2 * 400.0, id="no-policy-node-max"),
        pytest.param(0, None, 4200, 0, 700, 0.0, id="no-gpu"),
    ],
)
def test_estimate_pod_power(gpus: int, annotation_w: float | None, cap_w: int | None, service_gpus: int, node_max_w: float, expected_w: float) -> None:
    owner = Policy(namespace="ns", name="p", power_cap_w=cap_w) if cap_w else None
    assert estimate_pod_power_w(gpus, annotation_w, owner, service_gpus, node_max_w) == expected_w


def test_the_strictest_limit_over_enforced_policies_wins() -> None:
    view = view_of(
        [gpu_node("gpu-1", "rack-1", telemetry(100))],
        policies=[
            policy("a", "team-a", racks=[{"rackId": "rack-1", "maxPower": 6000, "maxTemperature": 27}]),
            policy("b", "team-b", racks=[{"rackId": "rack-1", "maxPower": 5000, "maxTemperature": 29}]),
            policy("c", "team-c", racks=[{"rackId": "rack-1", "maxPower": 100, "maxTemperature": 1}], mode="Observe"),
        ],
    )
    limits = view.racks["rack-1"].limits
    assert (limits.max_power_w, limits.max_power_policy) == (5000, "team-b/b")
    assert (limits.max_temperature_c, limits.max_temperature_policy) == (27.0, "team-a/a")


def test_policy_view_lists_its_pods_and_the_gpus_telemetry_attributes_to_them() -> None:
    view = view_of(
        [
            gpu_node("gpu-1", "rack-1", telemetry(1400, pods=["inference/llama-0", "inference/llama-0", "inference/web"])),
            # another moment: the helper derives GPU UUIDs from it, and no two nodes share a GPU
            gpu_node("gpu-2", "rack-1", telemetry(700, at=NOW - timedelta(milliseconds=1), pods=[None, "inference/llama-1"])),
        ],
        [
            gpu_pod("llama-0", gpus=2, node="gpu-1", bound_at=NOW - timedelta(minutes=5)),
            gpu_pod("llama-1", gpus=1, node="gpu-2", bound_at=NOW - timedelta(minutes=5)),
            gpu_pod("llama-2", gpus=1),  # pending
            gpu_pod("web", gpus=1, labels=OTHER, node="gpu-1"),
        ],
        [policy("llama")],
    )
    llama = view.policies["inference/llama"]
    assert llama.pods == ("inference/llama-0", "inference/llama-1", "inference/llama-2")
    assert llama.bound_gpus == 3
    assert [(g.node, g.gpu.index) for g in llama.gpus] == [("gpu-1", 0), ("gpu-1", 1), ("gpu-2", 1)]
    assert view.policy_for_pod(gpu_pod("llama-3")) is llama.policy
    assert view.policy_for_pod(gpu_pod("x", labels=OTHER)) is None
    assert view.policy_for_pod(gpu_pod("llama-3", namespace="elsewhere")) is None


def test_an_invalid_policy_is_ignored_and_reported() -> None:
    broken = policy("broken", racks=[{"rackId": "rack-1", "maxPower": -5}])
    view = view_of([gpu_node("gpu-1", "rack-1", telemetry(100))], policies=[broken, policy("ok")])
    assert list(view.policies) == ["inference/ok"]
    assert view.invalid_policies == {"inference/broken": "spec.rackConstraints[0].maxPower: must be greater than 0"}
    assert any("inference/broken is invalid" in w for w in view.warnings)
    assert not view.racks["rack-1"].constrained


def test_a_temperature_limit_no_node_can_check_is_a_warning() -> None:
    view = view_of([gpu_node("gpu-1", "rack-1", telemetry(100, inlet_c=None))], policies=[policy("llama", racks=RACK_1)])
    assert "rack rack-1: no node reports an inlet temperature, so maxTemperature 30 °C cannot be checked" in view.warnings


def test_rack_label_is_configurable() -> None:
    node = gpu_node("gpu-1", "row-7", telemetry(100), rack_label="topology.example.com/rack")
    assert view_of([node]).nodes["gpu-1"].rack_id is None
    assert view_of([node], rack_label="topology.example.com/rack").nodes["gpu-1"].rack_id == "row-7"


def test_rebuilding_from_a_previous_view_gives_the_same_view_and_measures_the_inlet_trend() -> None:
    nodes = [gpu_node(f"gpu-{i}", "rack-1", telemetry(1000, inlet_c=24.0, at=NOW - timedelta(seconds=60))) for i in range(3)]
    pods = [gpu_pod("a", gpus=1, node="gpu-0", bound_at=NOW)]
    policies = [policy("llama", racks=RACK_1)]
    first = build_cluster_view(nodes, pods, policies, NOW)
    again = build_cluster_view(nodes, pods, policies, NOW, previous=first)
    assert again.nodes == first.nodes and again.racks == first.racks and again.policies == first.policies
    # gpu-0's inlet rises 1.5 °C over the next 30 s of telemetry: 3 °C/min
    warmer = [gpu_node("gpu-0", "rack-1", telemetry(1000, inlet_c=25.5, at=NOW - timedelta(seconds=30))), *nodes[1:]]
    later = build_cluster_view(warmer, pods, policies, NOW, previous=again)
    assert later.nodes["gpu-0"].inlet_rise_c_per_min == pytest.approx(3.0)
    assert later.racks["rack-1"].inlet_rise_c_per_min == pytest.approx(3.0)
    assert later.node_facts["gpu-1"].inlet_rise_c_per_min == pytest.approx(3.0)  # a rack-level figure
    assert first.nodes["gpu-0"].inlet_rise_c_per_min is None


def test_the_view_is_immutable() -> None:
    view = view_of([gpu_node("gpu-1", "rack-1", telemetry(100))])
    with pytest.raises(AttributeError):
        view.now = NOW  # type: ignore[misc]
    with pytest.raises(TypeError):
        view.nodes["x"] = view.nodes["gpu-1"]  # type: ignore[index]


def _comparable(view: Any) -> tuple[Any, ...]:
    """Everything in a view except the inlet trend, which only a chain of builds measures."""
    from dataclasses import replace

    nodes = {k: replace(v, inlet_rise_c_per_min=None) for k, v in view.nodes.items()}
    racks = {k: replace(v, inlet_rise_c_per_min=None) for k, v in view.racks.items()}
    facts = {k: replace(v, inlet_rise_c_per_min=None) for k, v in view.node_facts.items()}
    return nodes, racks, facts, dict(view.policies), dict(view.invalid_policies), view.gpu_min_w, view.warnings, view.has_constraints


@pytest.mark.parametrize("seed", range(8))
def test_a_rebuild_from_the_previous_view_equals_a_build_from_scratch(seed: int) -> None:
    """Random event streams (telemetry, bindings, deletions, nodes joining and leaving, policy
    edits, the clock moving): the incremental rebuild must always match a fresh build."""
    import random

    rng = random.Random(seed)
    racks = [{"rackId": f"rack-{r}", "maxPower": rng.choice([3000, 6000]), "maxTemperature": 28} for r in range(3)]
    policies = [policy("llama", cap_w=6000, racks=racks), policy("web", cap_w=900, selector={"matchLabels": {"app": "web"}})]
    nodes = {f"n{i}": gpu_node(f"n{i}", f"rack-{i % 4}" if i % 4 < 3 else None, telemetry(1000, at=NOW - timedelta(seconds=10)))
             for i in range(8)}
    pods: dict[str, dict[str, Any]] = {}
    now = NOW
    view = build_cluster_view(nodes.values(), pods.values(), policies, now)
    for step in range(40):
        action = rng.randrange(7)
        name = f"n{rng.randrange(10)}"
        if action == 0:  # the agent publishes
            nodes[name] = gpu_node(name, f"rack-{rng.randrange(4)}", telemetry(rng.uniform(0, 5000), at=now, inlet_c=rng.uniform(20, 30),
                                                                             pods=rng.sample(sorted(pods), k=min(2, len(pods)))))
        elif action == 1 and nodes:  # a node leaves
            nodes.pop(rng.choice(sorted(nodes)))
        elif action in (2, 3):  # a binding
            labels = {"app": "web"} if rng.random() < 0.3 else {"app.kubernetes.io/name": "llama"}
            key = f"p{rng.randrange(12)}"
            pods[key] = gpu_pod(key, gpus=rng.randrange(0, 3), labels=labels, node=name,
                                bound_at=now + timedelta(seconds=rng.choice([-60, 1])))
        elif action == 4 and pods:  # a pod goes
            pods.pop(rng.choice(sorted(pods)))
        elif action == 5:  # time passes: telemetry ages, some goes stale
            now += timedelta(seconds=rng.choice([1, 45, 120]))
        else:  # a policy is edited
            policies = [policy("llama", cap_w=rng.choice([1000, 6000]), racks=racks), policies[1]]
        view = build_cluster_view(nodes.values(), pods.values(), policies, now, previous=view)
        fresh = build_cluster_view(nodes.values(), pods.values(), policies, now)
        assert _comparable(view) == _comparable(fresh), f"step {step}, action {action}"
