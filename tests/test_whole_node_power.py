"""Rack decisions on whole-node power (#16): each node's power beside its GPUs, measured
from its whole-node reading when that can be trusted, else estimated on the safe side; the
rack's power, the extender's filter and score, the controller's rack fill and the status
all count it."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import pytest

from powercap.algorithms import AlgorithmRegistry
from powercap.allocation import Bound, GpuState, RackLimit, Service, allocate
from powercap.budget import plan_round
from powercap.cluster import ClusterSettings, NonGpuPower, build_cluster_view
from powercap.clusterviews import non_gpu_power, rack_power_source
from powercap.nodepower import NodePower
from powercap.placement import filter_nodes, prioritize_nodes
from powercap.runtime.cliargs import add_cluster_view_arguments, cluster_view_settings
from powercap.telemetry import NodeTelemetry
from tests.fakes.clusters import Gpu, node, view
from tests.fakes.objects import NOW, gpu_node, gpu_pod, policy, telemetry

LLAMA = {"app.kubernetes.io/name": "llama"}
GPUS_W = 4000.0


def reading(watts: float, source: str = "redfish", age_s: float = 2.0) -> NodePower:
    return NodePower(watts=watts, source=source, age_s=age_s)


def gpu_telemetry(node_power: NodePower | None, *, age_s: float = 5.0) -> NodeTelemetry:
    return NodeTelemetry(timestamp=NOW - timedelta(seconds=age_s), power_w=GPUS_W, inlet_temperature_c=24.0,
                         node_power=node_power)


@pytest.mark.parametrize(
    ("telemetry_", "overhead_w", "expected"),
    [
        pytest.param(gpu_telemetry(reading(5500)), 800, NonGpuPower(1500, "redfish"),
                     id="fresh-plausible-reading-measures-it"),
        pytest.param(gpu_telemetry(reading(5500, "kepler")), 2000, NonGpuPower(1500, "kepler"),
                     id="a-measurement-wins-over-a-larger-configured-overhead"),
        pytest.param(gpu_telemetry(reading(3500)), 0, NonGpuPower(0, "redfish"),
                     id="between-80-and-100-percent-of-the-gpus-is-0-beside-them"),
        pytest.param(gpu_telemetry(None), 800,
                     NonGpuPower(800, "estimate", "node n1 reports no whole-node power (a node agent older than nodePower)"),
                     id="nodePower-missing-counts-the-overhead"),
        pytest.param(gpu_telemetry(reading(5500, "estimate", 0)), 800,
                     NonGpuPower(1500, "estimate", "node n1 has no node power source (its agent estimates GPUs + a configured overhead)"),
                     id="agents-estimate-above-the-overhead-counts-for-what-it-says"),
        pytest.param(gpu_telemetry(reading(4300, "estimate", 0)), 800,
                     NonGpuPower(800, "estimate", "node n1 has no node power source (its agent estimates GPUs + a configured overhead)"),
                     id="agents-estimate-below-the-overhead-counts-the-overhead"),
        pytest.param(gpu_telemetry(reading(6000, age_s=88), age_s=5), 800,
                     NonGpuPower(2000, "estimate",
                                 "node n1's redfish reading is stale (taken 88 s before its telemetry; stale after 90 s)"),
                     id="stale-reading-is-an-estimate-never-below-it"),
        pytest.param(gpu_telemetry(reading(4400, age_s=88), age_s=5), 800,
                     NonGpuPower(800, "estimate",
                                 "node n1's redfish reading is stale (taken 88 s before its telemetry; stale after 90 s)"),
                     id="stale-reading-below-the-overhead-counts-the-overhead"),
        pytest.param(gpu_telemetry(reading(3000)), 800,
                     NonGpuPower(800, "estimate", "node n1's redfish reading 3000 W is below its GPUs' 4000 W"),
                     id="implausibly-low-reading-is-not-used"),
        pytest.param(gpu_telemetry(reading(250_000)), 800,
                     NonGpuPower(800, "estimate", "node n1's redfish reading 250000 W is implausible (over 100000 W)"),
                     id="implausibly-high-reading-is-not-used"),
        pytest.param(None, 800, NonGpuPower(800, "estimate", "node n1 has no fresh telemetry"),
                     id="no-telemetry-counts-the-overhead"),
    ],
)
def test_non_gpu_power_of_a_node(telemetry_: NodeTelemetry | None, overhead_w: float, expected: NonGpuPower) -> None:
    assert non_gpu_power("n1", telemetry_, NOW, ClusterSettings(node_overhead_w=overhead_w)) == expected


@pytest.mark.parametrize(
    ("telemetry_", "expected_w"),
    [
        pytest.param(gpu_telemetry(reading(6000), age_s=300), 2000, id="its-last-reading-counts"),
        pytest.param(gpu_telemetry(reading(4300), age_s=300), 800, id="never-below-the-overhead"),
        pytest.param(gpu_telemetry(None, age_s=300), 800, id="no-reading-the-overhead"),
    ],
)
def test_a_node_gone_silent_still_draws_what_it_last_drew(telemetry_: NodeTelemetry, expected_w: float) -> None:
    """Its agent stopped publishing, not its server: the rack fill must not hand the other
    GPUs the watts the silent node was last seen drawing beside its GPUs."""
    power = non_gpu_power("n1", telemetry_, NOW, ClusterSettings(node_overhead_w=800), fresh=False)
    assert power.watts == expected_w and not power.measured
    assert power.problem is not None and power.problem.startswith("node n1 has no fresh telemetry")


@pytest.mark.parametrize(
    ("estimated", "nodes", "source"),
    [
        pytest.param(0, 3, "Measured", id="none-estimated"),
        pytest.param(1, 3, "PartlyEstimated", id="some-estimated"),
        pytest.param(3, 3, "Estimated", id="all-estimated"),
    ],
)
def test_rack_power_source(estimated: int, nodes: int, source: str) -> None:
    assert rack_power_source(estimated, nodes) == source


def test_rack_power_is_the_sum_of_whole_node_power_and_names_the_estimated_nodes() -> None:
    """gpu-1 measures 1500 W beside 4000 W of GPUs; gpu-2 sends no nodePower (an older agent):
    the configured 1000 W; a CPU node without an agent is not counted."""
    nodes = [
        gpu_node("gpu-1", "rack-1", telemetry(4000, node_power=reading(5500))),
        gpu_node("gpu-2", "rack-1", telemetry(3000)),
        gpu_node("cpu-1", "rack-1", None, gpus=0),
    ]
    rack = build_cluster_view(nodes, [], [], NOW, ClusterSettings(node_overhead_w=1000)).racks["rack-1"]
    assert (rack.measured_power_w, rack.non_gpu_power_w, rack.power_w) == (7000, 2500, 9500)
    assert rack.power_source == "PartlyEstimated" and rack.estimated_nodes == ("gpu-2",)
    assert rack.estimate_problem == "node gpu-2 reports no whole-node power (a node agent older than nodePower)"


def test_a_node_without_fresh_telemetry_still_counts_beside_its_gpus() -> None:
    """gpu-2's agent went silent 300 s ago, when it read 1500 W beside its GPUs: that counts
    (over the 1000 W overhead); gpu-3 never published: the overhead."""
    stale = NOW - timedelta(seconds=300)
    nodes = [gpu_node("gpu-1", "rack-1", telemetry(4000, node_power=reading(5500))),
             gpu_node("gpu-2", "rack-1", telemetry(3000, at=stale, node_power=reading(4500))),
             gpu_node("gpu-3", "rack-1", None)]
    rack = build_cluster_view(nodes, [], [], NOW, ClusterSettings(node_overhead_w=1000)).racks["rack-1"]
    assert (rack.non_gpu_power_w, rack.estimated_nodes) == (4000, ("gpu-2", "gpu-3"))
    assert rack.estimate_problem == (
        "node gpu-2 has no fresh telemetry (its last reading counts); and 1 more node whose power beside the GPUs is estimated"
    )


def test_a_measured_reading_going_stale_is_seen_by_an_incremental_build() -> None:
    """The reading was taken 60 s before telemetry stamped at NOW: at NOW + 31 s it is 91 s
    old and the node falls back to the estimate, although its telemetry is still fresh and
    nothing changed in the API."""
    nodes = [gpu_node("gpu-1", "rack-1", telemetry(4000, node_power=reading(5500, age_s=60)))]
    settings = ClusterSettings(node_overhead_w=1000)
    first = build_cluster_view(nodes, [], [], NOW, settings)
    assert first.racks["rack-1"].power_source == "Measured"
    later = build_cluster_view(nodes, [], [], NOW + timedelta(seconds=31), settings, previous=first)
    assert later.nodes["gpu-1"].fresh
    assert later.racks["rack-1"].power_source == "Estimated"
    assert later.racks["rack-1"].non_gpu_power_w == 1500  # the stale reading still counts: never less
    again = build_cluster_view(nodes, [], [], NOW + timedelta(seconds=31), settings)
    assert later.racks["rack-1"] == again.racks["rack-1"]


RACK_LIMIT = [{"rackId": "rack-1", "maxPower": 10000}]


def placement_view(gpu_1_node_w: float) -> Any:
    """rack-1 (maxPower 10 kW): gpu-1 draws 4000 W on its GPUs and ``gpu_1_node_w`` in all;
    gpu-2 4000 W on its GPUs and 4300 W in all; rack-2 has no limit."""
    nodes = [
        gpu_node("gpu-1", "rack-1", telemetry(4000, node_power=reading(gpu_1_node_w))),
        gpu_node("gpu-2", "rack-1", telemetry(4000, node_power=reading(4300))),
        gpu_node("gpu-3", "rack-2", telemetry(4000, node_power=reading(6000))),
    ]
    return build_cluster_view(nodes, [], [policy("llama", cap_w=40000, racks=RACK_LIMIT)], NOW)


def test_the_filter_refuses_a_rack_with_gpu_headroom_but_not_whole_node_headroom() -> None:
    """A 1-GPU pod (700 W, and 30 % of it beside the GPUs: the rack's nodes are measured): the
    GPUs' 8000 W + 700 W fit under 10 kW; with the 2300 W the nodes draw beside their GPUs
    they do not. With 300 W beside them, they do."""
    pod = gpu_pod("llama-9", gpus=1, labels=LLAMA)
    roomy = filter_nodes(placement_view(4000), pod, ["gpu-1", "gpu-2", "gpu-3"])
    assert roomy.passed == ["gpu-1", "gpu-2", "gpu-3"]
    full = filter_nodes(placement_view(6000), pod, ["gpu-1", "gpu-2", "gpu-3"])
    assert full.passed == ["gpu-3"]
    assert full.failed["gpu-1"] == (
        "rack-1: 10300 W in use (incl. 2300 W beside the GPUs) + 910 W for this pod (700 W on its GPUs + 210 W "
        "beside them) > maxPower 10000 W (set by policy inference/llama)"
    )


def test_an_estimated_rack_counts_the_pod_without_a_rise() -> None:
    """The estimate (--node-overhead-w) is meant for full load: a pod adds its GPUs' power only."""
    nodes = [gpu_node("gpu-1", "rack-1", telemetry(4000)), gpu_node("gpu-2", "rack-1", telemetry(3300))]
    view_ = build_cluster_view(nodes, [], [policy("llama", cap_w=40000, racks=RACK_LIMIT)], NOW,
                               ClusterSettings(node_overhead_w=1000))
    assert filter_nodes(view_, gpu_pod("llama-9", gpus=1, labels=LLAMA), ["gpu-1"]).passed == ["gpu-1"]  # 9300 + 700


def test_an_estimated_rack_says_so_in_the_refusal() -> None:
    nodes = [gpu_node(f"gpu-{i}", "rack-1", telemetry(4000)) for i in (1, 2)]
    view_ = build_cluster_view(nodes, [], [policy("llama", cap_w=40000, racks=RACK_LIMIT)], NOW,
                               ClusterSettings(node_overhead_w=1000))
    outcome = filter_nodes(view_, gpu_pod("llama-9", gpus=1, labels=LLAMA), ["gpu-1"])
    assert outcome.failed["gpu-1"].startswith("rack-1: 10000 W in use (incl. 2000 W beside the GPUs, estimated on 2 nodes)")


def test_headroom_scores_a_rack_lower_when_its_nodes_draw_more_beside_their_gpus() -> None:
    registry = AlgorithmRegistry.default(discover=lambda: [])
    pod = gpu_pod("llama-9", gpus=1, labels=LLAMA)
    light = dict(prioritize_nodes(placement_view(4100), pod, ["gpu-1"], registry))
    heavy = dict(prioritize_nodes(placement_view(5000), pod, ["gpu-1"], registry))
    # headroom = 10 x (10000 - rack power - 700) / 10000 with rack power = 8000 W of GPUs and
    # 400 W beside them (0.9 -> 1), or 1300 W beside them (-0.0 -> 0)
    assert (light["gpu-1"], heavy["gpu-1"]) == (1, 0)


def rack_fill(beside_w: float, *, source: str = "redfish") -> Any:
    """One round: llama's four GPUs want 700 W each in rack-1 (maxPower 4500 W); its two nodes
    draw ``beside_w`` each beside their GPUs."""
    gpus_1 = [Gpu("A0", 690, 700, "inference/llama-0"), Gpu("A1", 690, 700, "inference/llama-0")]
    gpus_2 = [Gpu("B0", 690, 700, "inference/llama-1"), Gpu("B1", 690, 700, "inference/llama-1")]
    return plan_round(view(
        [node("gpu-1", "rack-1", gpus_1, node_power=reading(1380 + beside_w, source, 0)),
         node("gpu-2", "rack-1", gpus_2, node_power=reading(1380 + beside_w, source, 0))],
        [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("llama-1", gpus=2, node="gpu-2", labels=LLAMA)],
        [policy("llama", cap_w=4000, racks=[{"rackId": "rack-1", "maxPower": 4500}])],
        settings=ClusterSettings(node_overhead_w=300),
    ))


def test_the_rack_fill_lowers_the_caps_when_the_power_beside_the_gpus_rises() -> None:
    """maxPower 4500 W less what the nodes draw beside their GPUs is what the four GPUs share:
    3700 W (each GPU its 700 W maximum) with 400 W per node, 2500 W (625 W each) with 1000 W."""
    quiet, busy = rack_fill(400), rack_fill(1000)
    assert {c.cap_w for c in quiet.policies["inference/llama"].allocation.caps} == {700}
    assert {c.cap_w for c in busy.policies["inference/llama"].allocation.caps} == {625}
    assert busy.racks["rack-1"].allocated_w == 2500


def test_the_rack_fill_leaves_room_for_the_power_beside_the_gpus_to_rise_with_them() -> None:
    """Four GPUs draw 200 W each, their two nodes 400 W each beside them, maxPower 3000 W:
    2200 W left for the GPUs at today's load, but as they rise to their caps the measured
    power beside them rises by 0.3 W per W (--non-gpu-rise): caps + 800 + 0.3 x (caps - 800)
    <= 3000 W gives 1877 W (469 W each)."""
    gpus_1 = [Gpu("A0", 200, 700, "inference/llama-0"), Gpu("A1", 200, 700, "inference/llama-0")]
    gpus_2 = [Gpu("B0", 200, 700, "inference/llama-1"), Gpu("B1", 200, 700, "inference/llama-1")]
    nodes = [node("gpu-1", "rack-1", gpus_1, node_power=reading(800, age_s=0)),
             node("gpu-2", "rack-1", gpus_2, node_power=reading(800, age_s=0))]
    pods = [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("llama-1", gpus=2, node="gpu-2", labels=LLAMA)]
    policies = [policy("llama", cap_w=4000, racks=[{"rackId": "rack-1", "maxPower": 3000}])]
    rising = plan_round(view(nodes, pods, policies))
    assert sum(c.cap_w for c in rising.policies["inference/llama"].allocation.caps) == 1876
    flat = plan_round(view(nodes, pods, policies, settings=ClusterSettings(non_gpu_rise=0.0)))
    assert sum(c.cap_w for c in flat.policies["inference/llama"].allocation.caps) == 2200


def test_the_status_names_the_racks_power_source_and_warns_when_estimated() -> None:
    measured = rack_fill(1000).policies["inference/llama"].status["racks"]
    assert measured == [{"rackId": "rack-1", "powerW": 4760, "nonGpuPowerW": 2000, "powerSource": "Measured",
                         "temperatureC": 24.0}]
    estimated = rack_fill(100, source="estimate").policies["inference/llama"].status["racks"]
    assert estimated[0]["powerSource"] == "Estimated"
    assert estimated[0]["nonGpuPowerW"] == 600  # each node: max(its agent's 100 W, the configured 300 W)
    assert estimated[0]["estimatedNodes"] == ["gpu-1", "gpu-2"]
    assert estimated[0]["warning"] == (
        "powerW is an estimate: node gpu-1 has no node power source (its agent estimates GPUs + a configured "
        "overhead); and 1 more node whose power beside the GPUs is estimated; such a node counts the larger of its "
        "reading and 300 W (--node-overhead-w) beside its GPUs. Give the node agents a node power source (Redfish, "
        "IPMI or Kepler: docs/nodeagent.md, Node power)"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param([], ClusterSettings(), id="defaults"),
        pytest.param(["--node-overhead-w", "1800", "--non-gpu-rise", "0.25"],
                     ClusterSettings(node_overhead_w=1800, non_gpu_rise=0.25), id="set"),
    ],
)
def test_the_programs_read_the_node_power_settings_from_their_flags(argv: list[str], expected: ClusterSettings) -> None:
    parser = argparse.ArgumentParser()
    add_cluster_view_arguments(parser)
    assert cluster_view_settings(parser.parse_args(argv)) == expected


@pytest.mark.parametrize("argv", [["--node-overhead-w", "-5"], ["--non-gpu-rise", "3"], ["--non-gpu-rise", "a lot"]])
def test_a_bad_node_power_setting_stops_the_program(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_cluster_view_arguments(parser)
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(argv)


def test_a_rack_full_of_previous_caps_takes_its_lowers_first_and_its_raises_a_round_later() -> None:
    """Agents apply a new allocation at different moments: in a rack filled to its capacity
    (maxPower 1000 W) by the caps in force, a raise on one node while the other node still
    holds its old, higher cap would pass maxPower. The raise waits a round; the lower goes out."""
    idle = GpuState(uuid="A", node="n1", rack="rack-1", min_w=100, max_w=700, power_w=100, limit_w=700, previous_w=700)
    pinned = GpuState(uuid="B", node="n2", rack="rack-1", min_w=100, max_w=700, power_w=300, limit_w=300, previous_w=300)
    rack = [RackLimit("rack-1", 1000, unmanaged_power_w=0)]
    first = allocate([Service("ns/svc", 4000, (idle, pinned))], rack)
    caps = {c.uuid: c for c in first.services["ns/svc"].caps}
    assert caps["A"].cap_w < 700 and caps["B"].cap_w == 300 and caps["B"].bound is Bound.TRANSITION
    then = GpuState(uuid="A", node="n1", rack="rack-1", min_w=100, max_w=700, power_w=100, limit_w=caps["A"].cap_w,
                    previous_w=caps["A"].cap_w)
    second = allocate([Service("ns/svc", 4000, (then, pinned))], rack)
    raised = {c.uuid: c.cap_w for c in second.services["ns/svc"].caps}
    assert raised["B"] > 300 and raised["A"] + raised["B"] <= 1000


def test_an_agent_going_silent_does_not_free_its_nodes_power_for_the_rest_of_the_rack() -> None:
    """gpu-2 (another workload: 500 W on its GPUs, 2500 W beside them) stops publishing: the
    rack fill (maxPower 5600 W) stops counting its GPUs' 500 W, which are not powercap's to
    know any more, but keeps the 2500 W it last read beside them, so llama's four GPUs on
    gpu-1 (400 W beside them) get 5600 - 400 - 2500 = 2700 W, not 5200 W."""
    gpus_1 = [Gpu(f"A{i}", 690, 700, "inference/llama-0") for i in range(4)]
    pods = [gpu_pod("llama-0", gpus=4, node="gpu-1", labels=LLAMA)]
    policies = [policy("llama", cap_w=4000, racks=[{"rackId": "rack-1", "maxPower": 5600}])]

    def caps_with_gpu_2_at(at: Any) -> int:
        nodes = [node("gpu-1", "rack-1", gpus_1, node_power=reading(3160, age_s=0)),
                 node("gpu-2", "rack-1", [], extra_power_w=500, at=at, node_power=reading(3000, age_s=0))]
        plan = plan_round(view(nodes, pods, policies, settings=ClusterSettings(non_gpu_rise=0.0)))
        return sum(c.cap_w for c in plan.policies["inference/llama"].allocation.caps)

    assert caps_with_gpu_2_at(NOW) == 5600 - 400 - 500 - 2500
    assert caps_with_gpu_2_at(NOW - timedelta(seconds=300)) == 5600 - 400 - 2500
