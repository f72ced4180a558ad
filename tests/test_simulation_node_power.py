"""The simulator's nodes draw power beside their GPUs (#16): an idle floor plus a part that
follows the GPUs, reported through the agents' nodePower, counted by the racks and by
powercap's rack decisions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from powercap import physics
from powercap.physics import NodePowerModel, non_gpu_power_w
from powercap.simulation.engine import POWERCAP, STATIC_SPLIT, simulate
from powercap.simulation.scenario import default_scenario_text, load_scenario, scenario_from_document
from powercap.simulation.summary import summarize
from powercap.simulation.world import World

H200_SERVER = physics.NODE_POWER_PRESETS["H200-like"]


@pytest.mark.parametrize(
    ("gpu_power_w", "expected_w"),
    [
        pytest.param(0.0, 1520.0, id="idle-floor"),
        pytest.param(2800.0, 1520.0 + 740.0, id="half-of-the-gpus-maximum"),
        pytest.param(5600.0, 3000.0, id="full-gpu-power"),
        pytest.param(6000.0, 3000.0, id="an-overshoot-adds-no-more"),
    ],
)
def test_an_8_gpu_h200_server_draws_1_5_to_3_kw_beside_its_gpus(gpu_power_w: float, expected_w: float) -> None:
    assert non_gpu_power_w(H200_SERVER, 8, gpu_power_w, 700.0) == pytest.approx(expected_w)


def test_every_node_at_once_agrees_with_the_formula() -> None:
    world = World.build(load_scenario(default_scenario_text()), {})
    rng = np.random.default_rng(1)
    gpu_w = rng.uniform(30, 700, len(world.gpus))
    each = [
        non_gpu_power_w(node.node_power, len(node.gpus), float(gpu_w[[g.slot for g in node.gpus]].sum()), node.gpus[0].model.max_limit_w)
        for node in world.nodes
    ]
    assert world.non_gpu_power_w(gpu_w) == pytest.approx(each)


def one_rack(max_power_w: float, node_power: dict[str, float] | None = None) -> dict[str, Any]:
    """Two 8-GPU H200-like nodes in one rack serving one service flat out, maxPower ``max_power_w``."""
    group: dict[str, Any] = {"name": "gpu", "count": 2, "rack": "rack-1", "gpus": 8, "gpuModel": "H200-like"}
    if node_power is not None:
        group["nodePower"] = node_power
    return {
        "name": "one-rack", "durationS": 120, "seed": 1, "timing": {"warmupS": 30},
        "racks": [{"id": "rack-1", "maxPower": max_power_w}],
        "nodes": [group],
        "policies": [{
            "apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCappingPolicy",
            "metadata": {"name": "chat", "namespace": "inference"},
            "spec": {"powerCapLimit": 11200, "rackConstraints": [{"rackId": "rack-1", "maxPower": max_power_w}]},
        }],
        "services": [{"name": "chat", "namespace": "inference", "policy": "chat", "replicas": 8, "gpusPerPod": 2,
                      "peakTokensS": 60000, "dailyShape": "flat"}],
    }


def test_a_node_power_override_replaces_the_presets_server() -> None:
    scenario = scenario_from_document(one_rack(12000, {"idleWPerGpu": 50, "loadWPerGpu": 0}))
    assert scenario.nodes[0].node_power == NodePowerModel(50.0, 0.0)
    assert scenario_from_document(one_rack(12000)).nodes[0].node_power == H200_SERVER


def test_powercap_keeps_a_rack_under_max_power_counting_what_its_nodes_draw_beside_the_gpus() -> None:
    """maxPower 10 kW: the 16 GPUs flat out (11.2 kW) and the 3-6 kW beside them pass it; the
    static split (700 W each under an 11.2 kW cap) is blind to the rack and passes it; powercap
    reads each node's whole power from its agents' nodePower and holds the rack."""
    result = simulate(scenario_from_document(one_rack(10000)), [STATIC_SPLIT, POWERCAP])
    figures = summarize(result)["strategies"]
    assert figures["static-split"]["rackPowerViolationSeconds"] > 60
    assert figures["powercap"]["rackPowerViolationSeconds"] == 0
    assert figures["powercap"]["racks"]["rack-1"]["peakPowerW"] > 9000  # it uses the rack, not a margin of half
    # the energy beside the GPUs: two nodes, at least their 1.52 kW idle floor, at most 3 kW, for 120 s
    assert 2 * 1520 * 120 <= figures["powercap"]["nonGpuEnergyJ"] <= 2 * 3000 * 120


def test_the_controller_reads_the_agents_whole_node_readings_as_measured() -> None:
    run = simulate(scenario_from_document(one_rack(10000)), [POWERCAP]).runs[0]
    [rack] = run.statuses["inference/chat"]["racks"]
    assert rack["powerSource"] == "Measured" and "warning" not in rack
    assert 2 * 1520 <= rack["nonGpuPowerW"] <= 2 * 3000
    assert rack["powerW"] <= 10000
