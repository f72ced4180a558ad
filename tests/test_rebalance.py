"""Energy-aware rebalancing: which pod to evict, if any."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from powercap.rebalance import plan_rebalance
from tests.fakes.clusters import Gpu, node, view
from tests.fakes.objects import NOW, gpu_pod, policy

LLAMA = {"app.kubernetes.io/name": "llama"}
ENERGY_AWARE = {"name": "energy-aware-scheduling", "parameters": {"energyThreshold": 3500, "migrationInterval": 600}}


def pods(**changes: Any) -> list[dict[str, Any]]:
    """llama-0 (2 GPUs, 1200 W) and llama-1 (2 GPUs, 1000 W) on the hot gpu-1; llama-2 on gpu-2."""
    result = [
        gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA),
        gpu_pod("llama-1", gpus=2, node="gpu-1", labels=LLAMA),
        gpu_pod("llama-2", gpus=2, node="gpu-2", labels=LLAMA),
    ]
    for pod in result:
        for change in changes.get(pod["metadata"]["name"].replace("-", "_"), ()):
            change(pod)
    return result


def nodes(*, hot_extra_w: float = 1900, cool_extra_w: float = 0, cool_capacity: int = 8,
          cool_rack: str = "rack-1") -> list[dict[str, Any]]:
    return [
        node("gpu-1", "rack-1", [Gpu("A0", 600, 700, "inference/llama-0"), Gpu("A1", 600, 700, "inference/llama-0"),
                                 Gpu("A2", 500, 700, "inference/llama-1"), Gpu("A3", 500, 700, "inference/llama-1")],
             extra_power_w=hot_extra_w),
        node("gpu-2", cool_rack, [Gpu("B0", 500, 700, "inference/llama-2"), Gpu("B1", 500, 700, "inference/llama-2")],
             extra_power_w=cool_extra_w, capacity=cool_capacity),
    ]


def decide(node_list=None, pod_list=None, *, algorithm=ENERGY_AWARE, mode=None, racks=(), last_move_at=None):
    node_list = nodes() if node_list is None else node_list
    pod_list = pods() if pod_list is None else pod_list
    cluster = view(node_list, pod_list, [policy("llama", cap_w=8000, algorithm=algorithm, mode=mode, racks=racks)])
    return plan_rebalance(cluster.policies["inference/llama"], cluster, pod_list, node_list, last_move_at)


def test_moves_the_smallest_pod_that_brings_the_hot_node_under_the_threshold() -> None:
    decision = decide()
    assert decision.move is not None
    assert (decision.move.pod, decision.move.node, decision.move.target) == ("inference/llama-1", "gpu-1", "gpu-2")
    assert decision.move.message == (
        "node gpu-1 draws 4100 W, above energyThreshold 3500 W; evicting inference/llama-1 (1000 W) so that the "
        "scheduler can place it on a node under the threshold, such as gpu-2 (1000 W + 1000 W)"
    )
    assert decision.move.pod_note == (
        "evicted for policy inference/llama (energy-aware-scheduling): node gpu-1 in rack rack-1 draws 4100 W, "
        "above energyThreshold 3500 W; this pod (1000 W) fits under it on another node, such as gpu-2 "
        "(1000 W + 1000 W), where the scheduler can place its replacement"
    )


def test_moves_the_largest_pod_when_none_is_enough() -> None:
    decision = decide(nodes(hot_extra_w=4000))
    assert decision.move is not None and decision.move.pod == "inference/llama-0"


def test_pods_no_controller_recreates_are_left_alone() -> None:
    bare = pods(llama_1=[lambda p: p["metadata"].pop("ownerReferences")])
    decision = decide(pod_list=bare)
    assert decision.move is not None and decision.move.pod == "inference/llama-0"


def cordon(node_object: dict[str, Any]) -> dict[str, Any]:
    node_object["spec"]["unschedulable"] = True
    return node_object


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        pytest.param(dict(mode="Observe"), "mode is Observe", id="never in Observe mode"),
        pytest.param(dict(algorithm=None), "algorithm is headroom", id="only for energy-aware-scheduling"),
        pytest.param(dict(last_move_at=NOW - timedelta(seconds=100)), "last move 100 s ago; migrationInterval is 600 s",
                     id="at most one move per migrationInterval"),
        pytest.param(dict(node_list=nodes(hot_extra_w=0)), "no node of the service is above energyThreshold 3500 W",
                     id="no hot node"),
        pytest.param(dict(node_list=nodes(cool_capacity=2)), "fits on another node", id="no free GPU elsewhere"),
        pytest.param(dict(node_list=nodes(cool_extra_w=2000)), "fits on another node",
                     id="the other node would pass the threshold"),
        pytest.param(dict(node_list=[nodes()[0], cordon(nodes()[1])]), "fits on another node", id="cordoned target"),
        pytest.param(dict(node_list=nodes(cool_rack="rack-2"), racks=[{"rackId": "rack-2", "maxPower": 1800}]),
                     "fits on another node", id="the target's rack is full"),
        pytest.param(dict(pod_list=pods(llama_2=[lambda p: p["spec"].pop("nodeName")])),
                     "waiting for inference/llama-2", id="a pod of the service is pending"),
        pytest.param(dict(pod_list=pods(llama_2=[lambda p: p["metadata"].update(deletionTimestamp="2026-11-27T23:19:00Z")])),
                     "waiting for inference/llama-2", id="a pod of the service is terminating"),
    ],
)
def test_no_move(kwargs: dict[str, Any], reason: str) -> None:
    decision = decide(**kwargs)
    assert decision.move is None
    assert reason in decision.reason


def test_moves_again_after_the_interval() -> None:
    assert decide(last_move_at=NOW - timedelta(seconds=600)).move is not None
