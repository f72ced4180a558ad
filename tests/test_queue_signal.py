"""vLLM's queue (``requestsWaiting``) in the budget round: a saturated replica gets the watts.

A replica whose decode is memory-bound draws well below its cap even when it cannot keep up:
its compute-bound prefill is held at the cap, its decode saturates at 450 W on an H200. By
power alone it reads as traffic-limited, so the fill gave it ``power + headroom`` and took
the rest for GPUs that could not use it. With its pod's queue in the telemetry it counts as
pinned. Each test chains the real controller round (:func:`powercap.budget.plan_round`) with
GPUs that follow :func:`powercap.physics.operating_point` at the caps in force.
"""

from __future__ import annotations

from datetime import timedelta

from powercap.budget import plan_round
from powercap.physics import H200_LIKE, Workload, operating_point
from powercap.status import published_allocations
from tests.fakes.clusters import Gpu, node, view, with_status
from tests.fakes.objects import NOW, gpu_pod, policy

LLAMA = {"app.kubernetes.io/name": "llama"}
KEY = "inference/llama"
PREFILL_SHARE = 0.5
# Two replicas that cannot keep up (offered 1.5x what they serve uncapped) and two lightly loaded.
LOADS = {"G0": 1.5, "G1": 1.5, "G2": 0.3, "G3": 0.3}
CAP_W = 1800


def run_rounds(*, queue_gauge: bool, rounds: int = 12) -> tuple[dict[str, float], dict[str, float]]:
    """Controller rounds 5 s apart; between them the agents apply the allocation and the GPUs
    draw what their load draws under it. Returns the last allocation and tokens/s per GPU."""
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(minutes=10))
            for i in range(len(LOADS))]
    document = policy("llama", cap_w=CAP_W)
    caps = {uuid: 450.0 for uuid in LOADS}  # the static split, in force before the first round
    tokens: dict[str, float] = {}
    for round_index in range(rounds):
        gpus = []
        for i, (uuid, load) in enumerate(LOADS.items()):
            point = operating_point(H200_LIKE, caps[uuid], Workload(load, PREFILL_SHARE))
            tokens[uuid] = point.tokens_s
            saturated = point.busy_fraction >= 1.0
            gpus.append(Gpu(uuid, round(point.power_w, 1), caps[uuid], f"inference/llama-{i}", tokens_s=round(point.tokens_s, 1),
                            requests_waiting=(12 if saturated else 0) if queue_gauge else None))
        now = NOW + timedelta(seconds=5 * round_index)
        plan = plan_round(view([node("gpu-1", None, gpus, at=now)], pods, [document], now=now)).policies[KEY]
        document = with_status(document, dict(plan.status))
        caps.update(published_allocations(document["status"]))
        assert sum(caps.values()) <= CAP_W
    return caps, tokens


def test_saturated_replicas_drawing_below_their_caps_get_the_watts_their_queue_asks_for() -> None:
    by_power, by_power_tokens = run_rounds(queue_gauge=False)
    with_queue, with_queue_tokens = run_rounds(queue_gauge=True)
    saturated, light = ("G0", "G1"), ("G2", "G3")
    # by power alone the saturated replicas read as traffic-limited (483 W under a 600 W cap)
    # and are held near their draw; with the queue they take the light replicas' unused watts
    for uuid in saturated:
        assert with_queue[uuid] >= by_power[uuid] + 50, (by_power, with_queue)
    # the light replicas keep what their traffic draws plus headroom either way
    for uuid in light:
        assert with_queue[uuid] >= operating_point(H200_LIKE, with_queue[uuid], Workload(LOADS[uuid], PREFILL_SHARE)).power_w
    assert sum(with_queue_tokens.values()) > sum(by_power_tokens.values()) * 1.01
    # the light replicas serve all their traffic in both
    for uuid in light:
        assert with_queue_tokens[uuid] == by_power_tokens[uuid]


def test_an_empty_queue_is_judged_by_power_as_before() -> None:
    """A pod that reports 0 requests waiting is the same as one without the gauge."""
    LOADS_BEFORE = dict(LOADS)
    try:
        LOADS.update({"G0": 0.6, "G1": 0.6})  # nobody saturated: every queue empty
        assert run_rounds(queue_gauge=True) == run_rounds(queue_gauge=False)
    finally:
        LOADS.clear()
        LOADS.update(LOADS_BEFORE)
