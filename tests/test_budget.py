"""One controller round on a cluster view: what each policy's status will say."""

from __future__ import annotations

from datetime import timedelta

from powercap.budget import plan_round
from powercap.status import published_allocations
from tests.fakes.clusters import Gpu, node, view, with_status
from tests.fakes.objects import NOW, gpu_pod, policy

LLAMA = {"app.kubernetes.io/name": "llama"}
MISTRAL = {"app.kubernetes.io/name": "mistral"}


def caps(plan, key: str = "inference/llama") -> dict[str, int]:
    return {c.uuid: c.cap_w for c in plan.policies[key].allocation.caps}


def reasons(plan, key: str = "inference/llama") -> dict[str, str]:
    return {c["type"]: c["reason"] for c in plan.policies[key].status["conditions"]}


def test_a_service_on_two_nodes_gets_its_budget_split_by_demand() -> None:
    plan = plan_round(view(
        [
            node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0"), Gpu("A1", 690, 700, "inference/llama-0")]),
            node("gpu-2", "rack-1", [Gpu("B0", 90, 700, "inference/llama-1"), Gpu("B1", 90, 700, "inference/llama-1")]),
        ],
        [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("llama-1", gpus=2, node="gpu-2", labels=LLAMA)],
        [policy("llama", cap_w=2000)],
    ))
    # budget 2000 (the whole powerCapLimit): A0, A1 pinned -> 700 (max); B0, B1 idle (90 + 50 -> 200)
    # get the surplus: (2000 - 2 x 700) / 2 = 300
    assert caps(plan) == {"A0": 700, "A1": 700, "B0": 300, "B1": 300}
    status = plan.policies["inference/llama"].status
    assert status["gpus"] == 4 and status["powerW"] == 1560 and status["budgetW"] == 2000
    assert [(a["node"], a["watts"]) for a in status["allocations"]] == [("gpu-1", 1400), ("gpu-2", 600)]
    assert reasons(plan) == {"Ready": "WithinCap", "Feasible": "BudgetCoversMinimums", "Enforced": "AllocationApplied"}
    assert plan.policies["inference/llama"].changed


def test_a_starting_pod_reserves_its_minimum() -> None:
    """llama-1's GPUs are not in any telemetry yet: its agent runs them at 200 W each."""
    plan = plan_round(view(
        [node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0")]), node("gpu-2", "rack-1", [])],
        [gpu_pod("llama-0", gpus=1, node="gpu-1", labels=LLAMA),
         gpu_pod("llama-1", gpus=2, node="gpu-2", labels=LLAMA, bound_at=NOW + timedelta(seconds=1))],
        [policy("llama", cap_w=1000)],
    ))
    assert caps(plan) == {"A0": 600}  # 1000 - 2 x 200
    assert plan.policies["inference/llama"].status["gpus"] == 3


def test_the_strictest_rack_limit_binds_every_policy_in_the_rack() -> None:
    """mistral's rack-1 maxPower 3000 W also holds llama's GPUs there: 3000 - 1000 W of other load."""
    plan = plan_round(view(
        [
            node("gpu-1", "rack-1", [Gpu("L0", 690, 700, "inference/llama-0"), Gpu("L1", 690, 700, "inference/llama-0")],
                 extra_power_w=1000),
            node("gpu-2", "rack-1", [Gpu("M0", 690, 700, "inference/mistral-0"), Gpu("M1", 690, 700, "inference/mistral-0")]),
        ],
        [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("mistral-0", gpus=2, node="gpu-2", labels=MISTRAL)],
        [policy("llama", cap_w=4000),
         policy("mistral", cap_w=4000, selector={"matchLabels": MISTRAL}, racks=[{"rackId": "rack-1", "maxPower": 3000}])],
    ))
    assert caps(plan, "inference/llama") == {"L0": 500, "L1": 500}
    assert caps(plan, "inference/mistral") == {"M0": 500, "M1": 500}
    assert plan.racks["rack-1"].allocated_w == 2000
    racks = plan.policies["inference/llama"].status["racks"]
    assert [(r["rackId"], r["powerW"], r["nonGpuPowerW"], r["powerSource"], r["temperatureC"]) for r in racks] == [
        ("rack-1", 3760, 0, "Estimated", 24.0)  # the nodes send no whole-node power: 0 W (--node-overhead-w) beside the GPUs
    ]


def test_an_observe_policy_never_takes_rack_power_from_an_enforced_one() -> None:
    """watch (Observe) draws 1400 W uncapped in rack-1; llama gets what the rack has left."""
    plan = plan_round(view(
        [
            node("gpu-1", "rack-1", [Gpu("L0", 690, 700, "inference/llama-0"), Gpu("L1", 690, 700, "inference/llama-0")]),
            node("gpu-2", "rack-1", [Gpu("W0", 700, 700, "inference/watch-0"), Gpu("W1", 700, 700, "inference/watch-0")]),
        ],
        [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("watch-0", gpus=2, node="gpu-2", labels=MISTRAL)],
        [policy("llama", cap_w=4000, racks=[{"rackId": "rack-1", "maxPower": 2600}]),
         policy("watch", cap_w=4000, selector={"matchLabels": MISTRAL}, mode="Observe")],
    ))
    assert caps(plan, "inference/llama") == {"L0": 600, "L1": 600}
    assert caps(plan, "inference/watch") == {"W0": 700, "W1": 700}  # the rack's 2600 W minus llama's 1200 W
    assert reasons(plan, "inference/watch")["Enforced"] == "ObserveMode"


def test_a_stale_node_keeps_its_caps_and_is_reported() -> None:
    stored = {"allocations": [{"node": "gpu-2", "gpus": [{"uuid": "B0", "watts": 600}], "watts": 600}]}
    plan = plan_round(view(
        [
            node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0")]),
            node("gpu-2", "rack-1", [Gpu("B0", 90, 500, "inference/llama-1")], at=NOW - timedelta(seconds=300)),
        ],
        [gpu_pod("llama-0", gpus=1, node="gpu-1", labels=LLAMA), gpu_pod("llama-1", gpus=1, node="gpu-2", labels=LLAMA)],
        [with_status(policy("llama", cap_w=1200), stored)],
    ))
    assert caps(plan) == {"A0": 600, "B0": 600}  # 1200 - 600
    assert reasons(plan)["Enforced"] == "TelemetryStale"
    assert "no telemetry from node gpu-2 for 300 s" in next(
        c["message"] for c in plan.policies["inference/llama"].status["conditions"] if c["type"] == "Enforced")


def test_lagging_is_reported_only_when_seen_in_two_rounds() -> None:
    stored = {"allocations": [{"node": "gpu-1", "gpus": [{"uuid": "A0", "watts": 400}], "watts": 400}]}
    cluster = view(
        [node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0")])],
        [gpu_pod("llama-0", gpus=1, node="gpu-1", labels=LLAMA)],
        [with_status(policy("llama", cap_w=412), stored)],
    )
    first = plan_round(cluster, lagging_before={})
    assert first.policies["inference/llama"].lagging == {"A0"}
    assert reasons(first)["Enforced"] == "AllocationApplied"
    second = plan_round(cluster, lagging_before={"inference/llama": first.policies["inference/llama"].lagging})
    assert reasons(second)["Enforced"] == "AgentsLagging"
    assert reasons(plan_round(cluster))["Enforced"] == "AgentsLagging"  # a one-off run reports at once


def test_a_new_leader_keeps_a_stored_agents_lagging() -> None:
    """A restarted controller (or a new leader) has no previous round: where the stored
    status already says AgentsLagging it goes on saying so, instead of AllocationApplied for
    one round and AgentsLagging again the next (two Events for nothing)."""
    first = plan_round(view(
        [node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0")])],
        [gpu_pod("llama-0", gpus=1, node="gpu-1", labels=LLAMA)],
        [with_status(policy("llama", cap_w=412),
                     {"allocations": [{"node": "gpu-1", "gpus": [{"uuid": "A0", "watts": 400}], "watts": 400}]})],
    ))
    assert reasons(first)["Enforced"] == "AgentsLagging"
    stored = dict(first.policies["inference/llama"].status)
    taken_over = plan_round(view(
        [node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0")])],
        [gpu_pod("llama-0", gpus=1, node="gpu-1", labels=LLAMA)],
        [with_status(policy("llama", cap_w=412), stored)],
    ), lagging_before={})
    assert reasons(taken_over)["Enforced"] == "AgentsLagging"
    held = [(c["type"], c["status"], c["reason"], c["lastTransitionTime"]) for c in stored["conditions"]]
    assert [(c["type"], c["status"], c["reason"], c["lastTransitionTime"])
            for c in taken_over.policies["inference/llama"].status["conditions"]] == held


def test_a_steady_cluster_plans_no_change() -> None:
    nodes = [node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0"), Gpu("A1", 300, 700, "inference/llama-0")])]
    pods = [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA)]
    first = plan_round(view(nodes, pods, [policy("llama", cap_w=1200)]))
    assert caps(first) == {"A0": 700, "A1": 500}  # A0 pinned -> 700 (max); A1 (300 + 50) gets the rest of 1200
    stored = dict(first.policies["inference/llama"].status)
    applied = {uuid: watts for uuid, watts in published_allocations(stored).items()}
    nodes = [node("gpu-1", "rack-1", [Gpu("A0", applied["A0"] - 3, applied["A0"], "inference/llama-0"),
                                      Gpu("A1", 310, applied["A1"], "inference/llama-0")], at=NOW + timedelta(seconds=5))]
    second = plan_round(view(nodes, pods, [with_status(policy("llama", cap_w=1200), stored)], now=NOW + timedelta(seconds=5)))
    assert not second.policies["inference/llama"].changed


def test_ratio_is_tokens_over_power_of_the_fresh_gpus_that_report_tokens() -> None:
    """llama-0 (2 GPUs, 1380 W) makes 3000 tokens/s, llama-1 (90 W) 135: 3135 / 1470 W = 2.13
    tokens/J. llama-2 exposes no metrics: its 500 W do not dilute the ratio. llama-3's node
    went stale: its tokens/s are not counted either."""
    plan = plan_round(view(
        [
            node("gpu-1", "rack-1", [Gpu("A0", 690, 700, "inference/llama-0", tokens_s=1500),
                                     Gpu("A1", 690, 700, "inference/llama-0", tokens_s=1500),
                                     Gpu("A2", 90, 700, "inference/llama-1", tokens_s=135)]),
            node("gpu-2", "rack-1", [Gpu("B0", 500, 700, "inference/llama-2")]),
            node("gpu-3", "rack-1", [Gpu("C0", 100, 700, "inference/llama-3", tokens_s=9000)],
                 at=NOW - timedelta(seconds=300)),
        ],
        [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("llama-1", gpus=1, node="gpu-1", labels=LLAMA),
         gpu_pod("llama-2", gpus=1, node="gpu-2", labels=LLAMA), gpu_pod("llama-3", gpus=1, node="gpu-3", labels=LLAMA)],
        [policy("llama", cap_w=4000)],
    ))
    status = plan.policies["inference/llama"].status
    assert status["ratio"] == 2.13
    assert status["powerW"] == 1970  # power still counts every fresh GPU


def test_no_ratio_until_a_gpu_reports_tokens_and_small_moves_write_nothing() -> None:
    pods = [gpu_pod("llama-0", gpus=1, node="gpu-1", labels=LLAMA)]
    silent = plan_round(view([node("gpu-1", "rack-1", [Gpu("A0", 400, 700, "inference/llama-0")])], pods,
                             [policy("llama", cap_w=1200)]))
    assert "ratio" not in silent.policies["inference/llama"].status
    stored = dict(silent.policies["inference/llama"].status)

    def round_with(tokens_s: float, stored: dict) -> dict:
        nodes = [node("gpu-1", "rack-1", [Gpu("A0", 400, 700, "inference/llama-0", tokens_s=tokens_s)],
                      at=NOW + timedelta(seconds=5))]
        plan = plan_round(view(nodes, pods, [with_status(policy("llama", cap_w=1200), stored)], now=NOW + timedelta(seconds=5)))
        return dict(plan.policies["inference/llama"].status)

    reporting = round_with(1000, stored)
    assert reporting["ratio"] == 2.5 and reporting != stored
    assert round_with(1015, reporting) == reporting  # 2.54 tokens/J: within 2 %, no status write
    assert round_with(1100, reporting)["ratio"] == 2.75


def test_a_gpu_uuid_reported_by_two_nodes_does_not_stop_the_round() -> None:
    """Seen against the real API server: two nodes' telemetry naming the same GPU UUID (a
    cloned machine image, a buggy agent) made every round fail for every policy. The UUID is
    counted once, on the first node by name; the other policies are allocated as usual."""
    plan = plan_round(view(
        [
            node("gpu-1", "rack-1", [Gpu("A0", 600, 700, "inference/llama-0"), Gpu("A1", 600, 700, "inference/llama-0")]),
            node("gpu-2", "rack-1", [Gpu("A0", 600, 700, "inference/llama-1"), Gpu("B1", 600, 700, "inference/mistral-0")]),
        ],
        [gpu_pod("llama-0", gpus=2, node="gpu-1", labels=LLAMA), gpu_pod("llama-1", gpus=1, node="gpu-2", labels=LLAMA),
         gpu_pod("mistral-0", gpus=1, node="gpu-2", labels=MISTRAL)],
        [policy("llama", cap_w=1000), policy("mistral", cap_w=500, selector={"matchLabels": MISTRAL})],
    ))
    assert set(caps(plan)) == {"A0", "A1"} and sum(caps(plan).values()) <= 970
    assert [a["node"] for a in plan.policies["inference/llama"].status["allocations"]] == ["gpu-1"]
    assert set(caps(plan, "inference/mistral")) == {"B1"}
