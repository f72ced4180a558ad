"""Scaling a service up never lifts the sum of its caps above its budget (DESIGN.md section 5).

A GPU that joins a service starts at its NVML minimum, on top of the caps in force. So the
extender places a pod of the policy only when the published allocations leave its GPUs'
minimums free, and the controller keeps free the minimums of pending pods that kube-scheduler
reports refused for budget (in their PodScheduled condition).
These tests run the real cluster view, controller round (:func:`powercap.budget.plan_round`)
and extender filter (:func:`powercap.placement.filter_nodes`) in turn, as the services do.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from powercap.allocation import AllocationSettings
from powercap.budget import plan_round
from extender.state import PublishedTotalsCache, RecentAdmissions
from powercap.placement import RejectReason, filter_nodes, placement_request, published_totals
from powercap.status import published_allocations
from tests.fakes.clusters import Gpu, agents_apply, node, view, with_status
from tests.fakes.objects import NOW, gpu_pod, policy

LLAMA = {"app.kubernetes.io/name": "llama"}
BUDGET_W = 2000  # the whole powerCapLimit (the controller's default margin is 0)
MIN_W = 200
WAITING = "policy inference/llama has no budget free for this pod yet: 2000 W allocated + 1 x 200 W minimum ..."


def busy_service() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Four busy one-GPU pods of llama on gpu-1 (four GPUs free there) and the policy."""
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(minutes=10)) for i in range(4)]
    nodes = [node("gpu-1", None, [Gpu(f"A{i}", 690, 700, f"inference/llama-{i}") for i in range(4)])]
    return nodes, pods, policy("llama", cap_w=2000)


def refused_by_scheduler(pod: dict[str, Any], reason: str) -> dict[str, Any]:
    """The pending pod after a failed attempt: kube-scheduler's PodScheduled condition,
    whose message counts the nodes per reason (the extender's reasons verbatim)."""
    condition = {
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastProbeTime": None,
        "lastTransitionTime": "2026-11-27T23:20:03Z",
        "message": f"0/1 nodes are available: 1 {reason}. preemption: 0/1 nodes are available: "
                   "1 Preemption is not helpful for scheduling.",
    }
    return {**pod, "status": {**pod["status"], "conditions": [condition]}}


def allocated_w(document: dict[str, Any]) -> float:
    return sum(published_allocations(document.get("status")).values())


def round_at(nodes: list[dict[str, Any]], pods: list[dict[str, Any]], document: dict[str, Any], seconds: int) -> dict[str, Any]:
    """The policy with the status one controller round ``seconds`` after NOW would store."""
    plan = plan_round(view(nodes, pods, [document], now=NOW + timedelta(seconds=seconds)))
    return with_status(document, plan.policies["inference/llama"].status)


def test_a_new_pod_waits_until_the_controller_frees_its_minimum() -> None:
    nodes, pods, document = busy_service()
    document = round_at(nodes, pods, document, 0)
    nodes = agents_apply(nodes, [document], at=NOW + timedelta(seconds=1))
    assert allocated_w(document) == BUDGET_W  # the busy GPUs hold the whole budget

    # a fifth replica: placing it now would run its GPU at 200 W on top of 2000 W of caps
    new = gpu_pod("llama-4", labels=LLAMA)
    refused = filter_nodes(view(nodes, [*pods, new], [document]), new, ["gpu-1"])
    assert refused.passed == [] and refused.unresolvable == {}
    assert refused.failed == {"gpu-1": (
        "policy inference/llama has no budget free for this pod yet: 2000 W allocated + 1 x 200 W minimum for "
        "this pod > its budget 2000 W; the budget controller frees it in its next round, then kube-scheduler "
        "retries the pod"
    )}
    assert refused.rejections == {RejectReason.BUDGET: 1}

    # the next round sees the pod refused for budget and keeps its minimum free
    new = refused_by_scheduler(new, refused.failed["gpu-1"])
    document = round_at(nodes, [*pods, new], document, 5)
    assert allocated_w(document) == BUDGET_W - MIN_W
    [enforced] = [c for c in document["status"]["conditions"] if c["type"] == "Enforced"]
    assert enforced["message"].endswith("the minimums of 1 GPU of pods waiting for budget are kept free, so they can be scheduled")
    nodes = agents_apply(nodes, [document], at=NOW + timedelta(seconds=6))
    assert filter_nodes(view(nodes, [*pods, new], [document]), new, ["gpu-1"]).passed == ["gpu-1"]

    # bound, not reported yet: its GPU runs at its minimum and the caps in force still fit
    bound = gpu_pod("llama-4", node="gpu-1", labels=LLAMA, bound_at=NOW + timedelta(seconds=7))
    pods = [*pods, bound]
    document = round_at(nodes, pods, document, 10)
    assert allocated_w(document) + MIN_W <= BUDGET_W

    # and a sixth replica waits again
    sixth = gpu_pod("llama-5", labels=LLAMA)
    again = filter_nodes(view(nodes, [*pods, sixth], [document]), sixth, ["gpu-1"])
    assert again.rejections == {RejectReason.BUDGET: 1}
    # 2000 - 200 W allocated (the bound GPU not reported yet kept at its minimum)
    assert "1800 W allocated + 200 W for GPUs of starting pods + 1 x 200 W minimum" in again.failed["gpu-1"]


def test_the_caps_in_force_never_exceed_the_budget_while_a_service_scales_up() -> None:
    """Three replicas added one by one, rounds every 5 s, agents applying within a second."""
    nodes, pods, document = busy_service()
    document = round_at(nodes, pods, document, 0)
    nodes = agents_apply(nodes, [document], at=NOW)
    waiting = [gpu_pod(f"llama-{i}", labels=LLAMA) for i in range(4, 7)]
    for second in range(1, 60):
        now = NOW + timedelta(seconds=second)
        current = view(nodes, [*pods, *waiting], [document], now=now)
        for pod in list(waiting):
            outcome = filter_nodes(current, pod, ["gpu-1"])
            if outcome.passed:
                waiting.remove(pod)
                pods.append(gpu_pod(pod["metadata"]["name"], node="gpu-1", labels=LLAMA, bound_at=now))
            else:
                waiting[waiting.index(pod)] = refused_by_scheduler(pod, outcome.failed["gpu-1"])
        if second % 5 == 0:
            document = round_at(nodes, [*pods, *waiting], document, second)
            nodes = agents_apply(nodes, [document], at=now)
        # caps in force: the applied allocations, and every GPU no telemetry lists yet at its minimum
        in_force = view(nodes, pods, [document], now=now).policies["inference/llama"]
        reported = {g.gpu.uuid: g.gpu.limit_w for g in in_force.gpus}
        new_gpus = in_force.bound_gpus - len(reported)
        assert sum(reported.values()) + new_gpus * MIN_W <= BUDGET_W, f"at {second} s"
    assert waiting == [] and len(pods) == 7  # all placed, each within a round or two


def test_the_controller_keeps_free_only_what_the_budget_can_hold() -> None:
    """Twenty pods refused for budget: the four bound GPUs keep their minimums; six of the
    waiting ones fit beside them ((2000 - 4 x 200) / 200 = 6)."""
    nodes, pods, document = busy_service()
    pending = [refused_by_scheduler(gpu_pod(f"llama-{i}", labels=LLAMA), WAITING) for i in range(4, 24)]
    plan = plan_round(view(nodes, [*pods, *pending], [document]))
    result = plan.policies["inference/llama"]
    assert [c.cap_w for c in result.allocation.caps] == [200] * 4  # (2000 - 6 x 200) / 4
    conditions = {c["type"]: c for c in result.status["conditions"]}
    assert conditions["Feasible"]["reason"] == "BudgetCoversMinimums"
    assert "the minimums of 6 GPUs of pods waiting for budget are kept free" in conditions["Enforced"]["message"]


def test_a_pod_pending_for_another_reason_reserves_nothing() -> None:
    """No free GPU anywhere, or never tried yet: the running GPUs keep the whole budget."""
    nodes, pods, document = busy_service()
    no_gpu = refused_by_scheduler(gpu_pod("llama-4", labels=LLAMA), "Insufficient nvidia.com/gpu")
    untried = gpu_pod("llama-5", labels=LLAMA)
    plan = plan_round(view(nodes, [*pods, no_gpu, untried], [document]))
    assert [c.cap_w for c in plan.policies["inference/llama"].allocation.caps] == [500] * 4  # 2000 / 4


def test_a_pod_the_budget_can_never_hold_is_unresolvable() -> None:
    """9 GPUs x 200 W = 1800 W pass powerCapLimit 1750 W, the whole budget: the controller
    would find the policy infeasible, so the pod is refused for good."""
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(minutes=10)) for i in range(8)]
    nodes = [node("gpu-1", None, [Gpu(f"A{i}", 210, 225, f"inference/llama-{i}") for i in range(8)])]
    new = gpu_pod("llama-8", labels=LLAMA)
    outcome = filter_nodes(view(nodes, [*pods, new], [policy("llama", cap_w=1750)]), new, ["gpu-1"])
    assert list(outcome.unresolvable) == ["gpu-1"]
    assert outcome.unresolvable["gpu-1"].startswith(
        "policy inference/llama cannot power another GPU: (8 GPUs in use + 1 for this pod) x 200 W minimum limit "
        "= 1800 W > its budget 1750 W"
    )


def test_a_pod_the_budget_of_a_controller_with_a_margin_can_never_hold_is_unresolvable() -> None:
    """9 GPUs x 200 W = 1800 W fit powerCapLimit 1850 W but not the budgetW 1794 W
    (floor(1850 x 0.97)) a controller run with --margin 0.03 published: the pod is refused for good."""
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(minutes=10)) for i in range(8)]
    nodes = [node("gpu-1", None, [Gpu(f"A{i}", 210, 225, f"inference/llama-{i}") for i in range(8)])]
    document = policy("llama", cap_w=1850)
    plan = plan_round(view(nodes, pods, [document]), AllocationSettings(margin=0.03))
    document = with_status(document, plan.policies["inference/llama"].status)
    assert document["status"]["budgetW"] == 1794
    new = gpu_pod("llama-8", labels=LLAMA)
    outcome = filter_nodes(view(nodes, [*pods, new], [document]), new, ["gpu-1"])
    assert outcome.unresolvable == {"gpu-1": (
        "policy inference/llama cannot power another GPU: (8 GPUs in use + 1 for this pod) x 200 W minimum limit "
        "= 1800 W > its budget 1794 W (powerCapLimit 1850 W less the controller's margin)"
    )}


def test_the_budget_follows_a_lowered_cap_before_the_controller_writes_again() -> None:
    """The status still says budgetW 2000 from powerCapLimit 2000; the cap is now 900 W
    (the apiserver counts the spec change as a new generation)."""
    nodes, pods, document = busy_service()
    document = round_at(nodes, pods, document, 0)
    assert document["status"]["budgetW"] == 2000
    lowered = {**document, "metadata": {**document["metadata"], "generation": 2},
               "spec": {**document["spec"], "powerCapLimit": 900}}
    new = gpu_pod("llama-4", labels=LLAMA)
    outcome = filter_nodes(view(nodes, [*pods, new], [lowered]), new, ["gpu-1"])
    assert list(outcome.unresolvable) == ["gpu-1"]
    assert outcome.unresolvable["gpu-1"].startswith(
        "policy inference/llama cannot power another GPU: (4 GPUs in use + 1 for this pod) x 200 W minimum limit "
        "= 1000 W > its budget 900 W"
    )


def test_a_controller_with_its_own_margin_does_not_keep_new_pods_pending_forever() -> None:
    """A controller run with --margin 0.01 shares out 1980 W of powerCapLimit 2000 W and
    publishes budgetW 1980: the extender measures the room against that budget, the one
    the controller keeps the new GPU's minimum free in, and places the new replica."""
    settings = AllocationSettings(margin=0.01)
    nodes, pods, document = busy_service()
    new = refused_by_scheduler(gpu_pod("llama-4", labels=LLAMA), WAITING)
    for second in (0, 5, 10, 15):
        plan = plan_round(view(nodes, [*pods, new], [document], now=NOW + timedelta(seconds=second)), settings)
        document = with_status(document, plan.policies["inference/llama"].status)
        nodes = agents_apply(nodes, [document], at=NOW + timedelta(seconds=second + 1))
    assert document["status"]["budgetW"] == 1980
    assert allocated_w(document) == 1980 - MIN_W  # the controller keeps the new GPU's minimum free
    outcome = filter_nodes(view(nodes, [*pods, new], [document], now=NOW + timedelta(seconds=17)), new, ["gpu-1"])
    assert outcome.passed == ["gpu-1"], outcome.failed


def test_a_raised_or_lowered_cap_is_judged_against_the_new_spec_until_the_controller_writes() -> None:
    """budgetW 1980 was published for powerCapLimit 2000 by a --margin 0.01 controller; the
    cap is lowered to 900 W (a new generation): the extender takes the smaller budget,
    min(1980, 900) = 900 W, which 5 x 200 W minimums pass."""
    nodes, pods, document = busy_service()
    plan = plan_round(view(nodes, pods, [document]), AllocationSettings(margin=0.01))
    document = with_status(document, plan.policies["inference/llama"].status)
    assert document["status"]["budgetW"] == 1980
    lowered = {**document, "metadata": {**document["metadata"], "generation": 2},
               "spec": {**document["spec"], "powerCapLimit": 900}}
    new = gpu_pod("llama-4", labels=LLAMA)
    outcome = filter_nodes(view(nodes, [*pods, new], [lowered]), new, ["gpu-1"])
    assert "= 1000 W > its budget 900 W" in outcome.unresolvable["gpu-1"]


def test_a_pod_is_measured_at_the_minimum_of_the_gpus_of_the_node_it_would_get() -> None:
    """The service runs on 200 W-minimum GPUs; an L4 node (60 W minimum) elsewhere in the
    cluster must not make a two-GPU pod look cheap: on gpu-1 its GPUs start at 2 x 200 W.
    powerCapLimit 1940 W: the eight bound GPUs' minimums (1600 W) leave 340 W, room for
    2 x 60 W but not 2 x 200 W."""
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(minutes=10)) for i in range(8)]
    nodes = [
        node("gpu-1", None, [Gpu(f"A{i}", 690, 700, f"inference/llama-{i}") for i in range(8)], capacity=16),
        node("l4-1", None, [Gpu(f"L{i}", 30, 72, min_w=60, max_w=72) for i in range(4)], capacity=4),
    ]
    budget_w = 1940
    document = policy("llama", cap_w=budget_w)
    new = refused_by_scheduler(gpu_pod("llama-8", gpus=2, labels=LLAMA), WAITING)
    for second in (0, 5):
        plan = plan_round(view(nodes, [*pods, new], [document], now=NOW + timedelta(seconds=second)))
        document = with_status(document, plan.policies["inference/llama"].status)
        nodes = agents_apply(nodes, [document], at=NOW + timedelta(seconds=second + 1))
    outcome = filter_nodes(view(nodes, [*pods, new], [document], now=NOW + timedelta(seconds=7)), new, ["gpu-1", "l4-1"])
    # on gpu-1 its GPUs would start at 2 x 200 W on top of 1736 W allocated
    assert outcome.passed == ["l4-1"]
    assert "1736 W allocated + 2 x 200 W minimum for this pod > its budget 1940 W" in outcome.failed["gpu-1"]
    in_force = allocated_w(document) + 2 * 60
    assert in_force <= budget_w


def test_allocations_published_per_node_only_count_against_the_budget() -> None:
    """A status whose allocations name only a node's watts (the CRD allows it; agents split
    them evenly over the node's GPUs) still holds the budget: a fifth replica waits."""
    nodes, pods, document = busy_service()
    document = with_status(document, {"observedGeneration": 1, "budgetW": BUDGET_W,
                                      "allocations": [{"node": "gpu-1", "watts": BUDGET_W}]})
    new = gpu_pod("llama-4", labels=LLAMA)
    outcome = filter_nodes(view(nodes, [*pods, new], [document]), new, ["gpu-1"])
    assert outcome.rejections == {RejectReason.BUDGET: 1}
    assert outcome.failed["gpu-1"].startswith("policy inference/llama has no budget free for this pod yet: 2000 W allocated")


def test_a_pod_let_through_counts_until_the_view_shows_it_bound_or_it_is_old() -> None:
    """RecentAdmissions: the extender's memory of pods it passed and kube-scheduler has not bound yet."""
    nodes, pods, document = busy_service()
    first, second = gpu_pod("llama-4", labels=LLAMA), gpu_pod("llama-5", labels=LLAMA)
    admissions = RecentAdmissions(ttl_s=30)
    pending_view = view(nodes, [*pods, first, second], [document])
    admissions.passed(pending_view, placement_request(pending_view, first), now_s=100.0)

    second_request = placement_request(pending_view, second)
    assert admissions.admitted_w(pending_view, second_request, now_s=101.0) == MIN_W
    assert admissions.admitted_w(pending_view, placement_request(pending_view, first), now_s=101.0) == 0  # not itself

    # bound now: the view's bound GPUs count it, the memory lets go
    bound = gpu_pod("llama-4", node="gpu-1", labels=LLAMA, bound_at=NOW)
    bound_view = view(nodes, [*pods, bound, second], [document])
    assert admissions.admitted_w(bound_view, placement_request(bound_view, second), now_s=102.0) == 0
    assert placement_request(bound_view, second).bound_gpus == 5

    # never bound (kube-scheduler chose no node): forgotten after ttl_s
    admissions.passed(pending_view, placement_request(pending_view, first), now_s=200.0)
    assert admissions.admitted_w(pending_view, second_request, now_s=229.0) == MIN_W
    assert admissions.admitted_w(pending_view, second_request, now_s=231.0) == 0


def test_the_extenders_memo_of_published_totals_follows_each_new_status() -> None:
    nodes, pods, document = busy_service()
    per_gpu = [{"uuid": f"A{i}", "watts": 485} for i in range(4)]
    published = with_status(document, {"allocations": [{"node": "gpu-1", "gpus": per_gpu, "watts": 1940}]})
    totals = PublishedTotalsCache(max_entries=2)
    first = view(nodes, pods, [published])
    request = placement_request(first, gpu_pod("llama-4", labels=LLAMA), totals)
    policy = first.policies["inference/llama"].policy
    assert (request.allocated_w, request.allocated_gpus) == published_totals(policy)[:2] == (1940.0, 4)

    # the controller writes a new status: the new object is read, not the memo of the old one
    rewritten = with_status(document, {"allocations": [{"node": "gpu-1", "watts": 1000}]})
    second = view(nodes, pods, [rewritten])
    assert totals(second.policies["inference/llama"].policy) == (1000.0, 0, {})
    assert totals(policy) == (1940.0, 4, {"gpu-1": 4})


def test_two_pods_let_through_back_to_back_do_not_share_one_free_minimum_with_a_bound_pods_only_cache() -> None:
    """In a cluster the extender's pod cache lists bound pods only, so its view never shows a
    pending pod: the memory of what it let through must hold until the view shows the pod
    bound, not drop it because the view does not list it pending."""
    nodes, pods, document = busy_service()
    document = round_at(nodes, pods, document, 0)
    first, second = gpu_pod("llama-4", labels=LLAMA), gpu_pod("llama-5", labels=LLAMA)
    # the controller kept one minimum free for a waiting pod (one, not two)
    document = round_at(nodes, [*pods, refused_by_scheduler(first, "policy inference/llama has no budget free for this pod yet")],
                        document, 5)
    nodes = agents_apply(nodes, [document], at=NOW + timedelta(seconds=6))
    bound_only = view(nodes, pods, [document])  # the production cache: no pending pod in it
    admissions = RecentAdmissions(ttl_s=30)

    request = placement_request(bound_only, first)
    assert filter_nodes(bound_only, request, ["gpu-1"]).passed == ["gpu-1"]
    admissions.passed(bound_only, request, now_s=100.0)

    request = placement_request(bound_only, second)
    request = replace(request, admitted_w=admissions.admitted_w(bound_only, request, now_s=100.2))
    assert request.admitted_w == MIN_W
    outcome = filter_nodes(bound_only, request, ["gpu-1"])
    assert outcome.passed == [] and outcome.rejections == {RejectReason.BUDGET: 1}
    assert f"+ {MIN_W} W for pods placed a moment ago" in outcome.failed["gpu-1"]

    # once the view shows the first pod bound, its GPUs count there and the memory lets go
    bound = gpu_pod("llama-4", node="gpu-1", labels=LLAMA, bound_at=NOW + timedelta(seconds=7))
    after = view(nodes, [*pods, bound], [document])
    assert admissions.admitted_w(after, placement_request(after, second), now_s=101.0) == 0


def mixed_minimum_service() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Four busy llama GPUs with a 100 W minimum on gpu-1, and a fifth replica just bound on
    gpu-2, whose GPUs' minimum is 200 W; no telemetry lists the fifth one's GPU yet."""
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(minutes=10)) for i in range(4)]
    pods.append(gpu_pod("llama-4", node="gpu-2", labels=LLAMA, bound_at=NOW - timedelta(seconds=2)))
    nodes = [
        node("gpu-1", None, [Gpu(f"A{i}", 690, 700, f"inference/llama-{i}", min_w=100) for i in range(4)]),
        node("gpu-2", None, [Gpu("B0", 60, 700, None, min_w=200)]),
    ]
    return nodes, pods, policy("llama", cap_w=2000)


def test_a_starting_gpu_is_held_at_the_minimum_of_its_own_node() -> None:
    """The fifth replica's GPU runs at 200 W (gpu-2's minimum) until it has an allocation, not
    at the 100 W of the service's other GPUs: the round keeps 200 W free for it, so the caps in
    force stay within powerCapLimit (with 100 W kept free they reached 1900 + 200 = 2100 W)."""
    nodes, pods, document = mixed_minimum_service()
    document = round_at(nodes, pods, document, 0)
    assert allocated_w(document) == BUDGET_W - 200  # 4 x 450
    assert allocated_w(document) + 200 <= BUDGET_W


def test_the_extender_counts_a_starting_gpu_at_its_own_nodes_minimum() -> None:
    """With 1800 W allocated and the fifth replica's GPU starting at 200 W, a sixth replica's
    100 W GPU on gpu-1 would make 2100 W in force: it waits for the next round. Counted at
    the cheapest minimum seen (100 W) the starting GPU left it room (1800 + 100 + 100 = 2000)."""
    nodes, pods, document = mixed_minimum_service()
    document = round_at(nodes, pods, document, 0)
    nodes = agents_apply(nodes, [document], at=NOW + timedelta(seconds=1))
    sixth = gpu_pod("llama-5", labels=LLAMA)
    outcome = filter_nodes(view(nodes, [*pods, sixth], [document]), sixth, ["gpu-1"])
    assert outcome.passed == []
    assert "1800 W allocated + 200 W for GPUs of starting pods + 1 x 100 W minimum for this pod > its budget 2000 W" in (
        outcome.failed["gpu-1"])


def test_starting_gpus_on_cheap_gpus_are_not_counted_at_another_services_minimum() -> None:
    """A batch service on 100 W-minimum GPUs (l40s-1, l40s-2) in a cluster that also has a
    node of 200 W-minimum GPUs (h200-1, another service's). Six batch pods just bound, none
    allocated yet, hold 6 x 100 W; a seventh fits its 1000 W budget (600 + 100 <= 1000) and is
    placed now. Counted at the cluster's largest minimum (6 x 200 + 100 = 1300 W) it waited for
    a controller round, and every batch GPU of a new deployment started a round late."""
    batch = {"app.kubernetes.io/name": "batch"}
    nodes = [
        node("h200-1", None, [Gpu(f"H{i}", 60, 700, None, min_w=200) for i in range(8)]),
        node("l40s-1", None, [Gpu(f"A{i}", 30, 350, None, min_w=100, max_w=350) for i in range(8)]),
        node("l40s-2", None, [Gpu(f"B{i}", 30, 350, None, min_w=100, max_w=350) for i in range(8)]),
    ]
    bound = [gpu_pod(f"batch-{i}", node=f"l40s-{1 + i % 2}", labels=batch, bound_at=NOW - timedelta(seconds=1))
             for i in range(6)]
    document = policy("batch", cap_w=1000, selector={"matchLabels": batch})
    seventh = gpu_pod("batch-6", labels=batch)
    current = view(nodes, [*bound, seventh], [document])
    request = placement_request(current, seventh)
    assert request.starting_w == 6 * 100
    assert filter_nodes(current, request, ["l40s-1", "l40s-2"]).passed == ["l40s-1", "l40s-2"]


def test_a_starting_gpu_on_a_node_without_gpu_telemetry_counts_at_the_largest_minimum_seen() -> None:
    """The service's GPUs have a 400 W minimum; a fourth replica is bound to gpu-2, whose agent
    has not listed its GPUs yet (the extender cannot tell its minimum). Counted at the default
    200 W, a fifth replica passed on gpu-1 (1500 + 200 + 400 <= 2250) while the GPUs in force
    would be 1500 + 400 + 400 = 2300 W; at the largest minimum seen (400 W) it waits."""
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(minutes=10)) for i in range(3)]
    pods.append(gpu_pod("llama-3", node="gpu-2", labels=LLAMA, bound_at=NOW - timedelta(seconds=2)))
    nodes = [node("gpu-1", None, [*(Gpu(f"A{i}", 490, 500, f"inference/llama-{i}", min_w=400, max_w=500) for i in range(3)),
                                  Gpu("A3", 60, 500, None, min_w=400, max_w=500)]),
             node("gpu-2", None, [])]
    document = round_at(nodes, pods, policy("llama", cap_w=2250), 0)
    assert allocated_w(document) == 1500
    fifth = gpu_pod("llama-4", labels=LLAMA)
    current = view(nodes, [*pods, fifth], [document])
    assert placement_request(current, fifth).starting_w == 400
    outcome = filter_nodes(current, fifth, ["gpu-1"])
    assert outcome.passed == [] and outcome.rejections == {RejectReason.BUDGET: 1}


def test_a_uuid_published_twice_counts_once_against_the_starting_gpus() -> None:
    """A malformed status names A0 twice on gpu-1 (500 W, counted once): of the two bound
    GPUs only one has an allocation, so the other starts at its 200 W minimum and a third
    replica (200 W) would make 900 W in force under an 800 W cap: it waits."""
    pods = [gpu_pod(f"llama-{i}", node="gpu-1", labels=LLAMA, bound_at=NOW - timedelta(seconds=3)) for i in range(2)]
    nodes = [node("gpu-1", None, [Gpu(f"A{i}", 60, 700, None) for i in range(4)])]
    twice = [{"uuid": "A0", "watts": 500}, {"uuid": "A0", "watts": 500}]
    document = with_status(policy("llama", cap_w=800), {"allocations": [{"node": "gpu-1", "watts": 1000, "gpus": twice}]})
    third = gpu_pod("llama-2", labels=LLAMA)
    current = view(nodes, [*pods, third], [document])
    request = placement_request(current, third)
    assert (request.allocated_w, request.allocated_gpus, request.starting_w) == (500.0, 1, 200.0)
    assert filter_nodes(current, request, ["gpu-1"]).passed == []
