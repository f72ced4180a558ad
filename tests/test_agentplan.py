"""The agent's per-tick decisions: who owns a GPU, what to write, what never to write."""

from __future__ import annotations

import re

from dataclasses import replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import pytest

from nodeagent.gpus import GpuSnapshot
from powercap import agentplan
from powercap.agentplan import (
    Action, CapRecord, GpuMemory, GpuPlan, PublishSettings, TickInputs, plan_tick, should_publish,
)
from powercap.control import ControlState
from powercap.policies import Mode, Policy, parse_policy
from powercap.telemetry import GpuTelemetry, NodeTelemetry

NODE = "gpu-node-1"
UUID_A, UUID_B = "GPU-aaaa", "GPU-bbbb"
POD_UID, OTHER_POD_UID = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


def reading(uuid: str = UUID_A, index: int = 0, **changes: Any) -> GpuSnapshot:
    """An H200-like GPU (200-700 W, default 700 W) at 400 W requested and enforced."""
    base = GpuSnapshot(
        index=index, uuid=uuid, power_w=350.0, limit_w=400.0, requested_limit_w=400.0,
        min_limit_w=200.0, max_limit_w=700.0, default_limit_w=700.0,
        temperature_c=60.0, slowdown_c=89.0, shutdown_c=95.0,
    )
    return replace(base, **changes)


def policy(name: str = "llama", *, gpus: dict[str, int] | None = None, node_watts: int | None = None, **spec: Any) -> Policy:
    """A policy in namespace ``inference`` whose allocation on NODE gives ``gpus`` {uuid: W}."""
    document = {
        "apiVersion": "powercapping.example.com/v1alpha1",
        "kind": "PowerCappingPolicy",
        "metadata": {"name": name, "namespace": "inference", "uid": f"uid-{name}"},
        "spec": {"powerCapLimit": 2000, **spec},
    }
    parsed = parse_policy(document)
    allocation: dict[str, Any] = {"node": NODE}
    if gpus is not None:
        allocation.update(gpus=[{"uuid": u, "watts": w} for u, w in gpus.items()], watts=sum(gpus.values()))
    elif node_watts is not None:
        allocation["watts"] = node_watts
    else:
        return parsed
    return replace(parsed, status=MappingProxyType({"allocations": [allocation]}))


def pod(uid: str = POD_UID, name: str = "llama-0", policy_name: str = "llama", **extra: Any) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "inference", "uid": uid, "labels": {"powercapping.example.com/policy": policy_name}}
    return {"metadata": metadata, "status": {"phase": "Running", **extra}}


def inputs(**changes: Any) -> TickInputs:
    """One GPU (UUID_A) running POD_UID of policy llama, allocated 400 W."""
    base = TickInputs(
        node=NODE,
        now_s=100.0,
        readings=[reading()],
        pod_uids_by_gpu={UUID_A: frozenset({POD_UID})},
        pods_by_uid={POD_UID: pod()},
        policies=[policy(gpus={UUID_A: 400})],
    )
    return replace(base, **changes)


def only(tick: TickInputs) -> agentplan.GpuPlan:
    (plan,) = plan_tick(tick)
    return plan


RECORD_400 = CapRecord(UUID_A, cap_w=400, default_w=700, policy="inference/llama")


@pytest.mark.parametrize(
    ("tick", "action", "cap_w", "reason"),
    [
        pytest.param(inputs(), Action.HOLD, 400, "allocation", id="cap-matches-allocation-no-write"),
        pytest.param(inputs(policies=[policy(gpus={UUID_A: 500})]), Action.SET, 500, "allocation", id="allocation-raised"),
        pytest.param(inputs(policies=[policy(gpus={UUID_A: 300})]), Action.SET, 300, "allocation", id="allocation-lowered"),
        pytest.param(inputs(policies=[policy(gpus={UUID_A: 402})]), Action.HOLD, 400, "hold", id="move-under-hysteresis-ignored"),
        pytest.param(inputs(policies=[policy()]), Action.SET, 200, "no-allocation", id="no-allocation-runs-at-minimum"),
        pytest.param(inputs(policies=[policy(node_watts=900)], readings=[reading(), reading(UUID_B, 1)], pod_uids_by_gpu={UUID_A: frozenset({POD_UID}), UUID_B: frozenset({POD_UID})}), Action.SET, 450, "allocation", id="node-share-split-over-its-gpus"),
        pytest.param(inputs(policies=[policy(gpus={UUID_A: 500}, mode="Observe")]), Action.OBSERVE, 500, "allocation", id="observe-mode-never-sets"),
        pytest.param(inputs(policies=[policy(gpus={UUID_A: 500})], enforce=False), Action.OBSERVE, 500, "allocation", id="dry-run-never-sets"),
        pytest.param(inputs(policies=[policy(gpus={UUID_A: 600})], policy_fresh=False), Action.HOLD, 400, "stale-policy", id="stale-view-never-raises"),
        pytest.param(inputs(policies=[policy(gpus={UUID_A: 600})], policy_fresh=False, readings=[reading(temperature_c=88)]), Action.SET, 340, "thermal-cut", id="stale-view-still-cuts-for-heat"),
        pytest.param(inputs(pod_uids_by_gpu={}), Action.HOLD, 400, "allocation", id="no-process-yet-allocation-names-gpu"),
        pytest.param(inputs(pod_uids_by_gpu={}, policies=[policy()]), Action.NONE, 400, "unowned", id="unowned-gpu-left-alone"),
        pytest.param(inputs(pod_uids_by_gpu={}, policies=[policy()], records={UUID_A: RECORD_400}), Action.RESTORE, 700, "left-policies", id="left-every-policy-restored"),
        pytest.param(inputs(pod_uids_by_gpu={}, policies=[], records={UUID_A: RECORD_400}, enforce=False), Action.OBSERVE, 700, "left-policies", id="dry-run-never-restores"),
        pytest.param(inputs(pod_uids_by_gpu={}, policies=[], records={UUID_A: RECORD_400}, policy_fresh=False), Action.HOLD, 400, "stale-policy", id="stale-view-never-restores"),
        pytest.param(inputs(pod_uids_by_gpu={}, policies=[], records={UUID_A: RECORD_400}, readings=[reading(requested_limit_w=700, limit_w=700)]), Action.NONE, 700, "left-policies", id="already-default-just-forgotten"),
        pytest.param(inputs(records={UUID_A: RECORD_400}, readings=[reading(requested_limit_w=700, limit_w=700)]), Action.SET, 400, "driver-reset", id="driver-reset-reapplied"),
        pytest.param(inputs(readings=[reading(limit_w=300)]), Action.HOLD, 400, "allocation", id="out-of-band-limiter-not-fought"),
        pytest.param(inputs(pods_by_uid={POD_UID: pod(phase="Succeeded")}, pod_uids_by_gpu={UUID_A: frozenset({POD_UID})}, policies=[policy()], records={UUID_A: RECORD_400}), Action.RESTORE, 700, "left-policies", id="finished-pod-releases-gpu"),
        pytest.param(inputs(pods_by_uid={POD_UID: pod(policy_name="other")}, policies=[policy(gpus={UUID_A: 300})]), Action.SET, 300, "allocation", id="pod-of-no-policy-falls-back-to-allocation"),
    ],
)
def test_plan(tick: TickInputs, action: Action, cap_w: float, reason: str) -> None:
    plan = plan_tick(tick)[0]
    assert (plan.action, plan.reason) == (action, reason)
    assert plan.cap_w == pytest.approx(cap_w)
    assert plan.writes is (action in (Action.SET, Action.RESTORE))


def test_restart_adopts_recorded_ratio_offset_without_raising() -> None:
    """The ratio loop held the GPU 30 W under its 400 W allocation before the restart."""
    record = replace(RECORD_400, cap_w=370, ratio_offset_w=30)
    ratio_policy = policy(gpus={UUID_A: 400}, performancePowerRatio={"targetRatio": 1.0})
    tick = inputs(readings=[reading(requested_limit_w=370, limit_w=370)], records={UUID_A: record}, policies=[ratio_policy])
    plan = only(tick)
    assert (plan.action, plan.cap_w) == (Action.HOLD, 370)
    assert plan.memory == GpuMemory("inference/llama", ControlState(ratio_offset_w=30))


def test_without_the_record_a_restart_would_raise_the_cap() -> None:
    ratio_policy = policy(gpus={UUID_A: 400}, performancePowerRatio={"targetRatio": 1.0})
    plan = only(inputs(readings=[reading(requested_limit_w=370, limit_w=370)], policies=[ratio_policy]))
    assert (plan.action, plan.cap_w) == (Action.SET, 400)


def test_record_follows_an_enforced_cap_and_is_adopted_when_found() -> None:
    raised = only(inputs(policies=[policy(gpus={UUID_A: 500})]))
    assert raised.record == CapRecord(UUID_A, cap_w=500, default_w=700, policy="inference/llama")
    adopted = only(inputs())
    assert adopted.record == RECORD_400
    observed = only(inputs(policies=[policy(gpus={UUID_A: 500}, mode="Observe")]))
    assert observed.record is None and observed.policy is not None and observed.policy.mode is Mode.OBSERVE


def test_control_state_of_another_policy_is_not_carried_over() -> None:
    memory = GpuMemory("inference/old", ControlState(ratio_offset_w=100))
    plan = only(inputs(memories={UUID_A: memory}))
    assert plan.action is Action.HOLD and plan.memory == GpuMemory("inference/llama", ControlState())


def test_ratio_uses_the_pod_tokens_over_all_its_gpus() -> None:
    """A tensor-parallel pod on two GPUs at 350 W each making 560 tokens/s: 0.8 tokens/J."""
    target: dict[str, Any] = {"performancePowerRatio": {"targetRatio": 1.0, "tolerancePercentage": 10}}
    tick = inputs(
        readings=[reading(), reading(UUID_B, 1)],
        pod_uids_by_gpu={UUID_A: frozenset({POD_UID}), UUID_B: frozenset({POD_UID})},
        policies=[policy(gpus={UUID_A: 400, UUID_B: 400}, **target)],
        tokens_s_by_pod={POD_UID: 560.0},
    )
    plans = plan_tick(tick)
    assert [p.tokens_per_joule for p in plans] == [pytest.approx(0.8)] * 2
    assert [(p.action, p.cap_w, p.reason) for p in plans] == [(Action.SET, 390, "ratio-down")] * 2


def test_no_tokens_measurement_means_no_ratio_step() -> None:
    target: dict[str, Any] = {"performancePowerRatio": {"targetRatio": 1.0}}
    plan = only(inputs(policies=[policy(gpus={UUID_A: 400}, **target)]))
    assert plan.tokens_per_joule is None and plan.action is Action.HOLD


@pytest.mark.parametrize(
    ("racks", "node_rack", "apply_all", "expected"),
    [
        pytest.param([{"rackId": "r1", "maxTemperature": 30}, {"rackId": "r2", "maxTemperature": 27}], "r1", False, 30, id="own-rack"),
        pytest.param([{"rackId": "r1", "maxTemperature": 30}], None, False, None, id="unlabelled-node"),
        pytest.param([{"rackId": "r1", "maxTemperature": 30}, {"rackId": "r2", "maxTemperature": 27}], None, True, 27, id="unknown-rack-strictest"),
        pytest.param([{"rackId": "r1", "maxPower": 5000}], None, True, None, id="no-temperature-limit"),
    ],
)
def test_max_inlet(racks: list[dict[str, Any]], node_rack: str | None, apply_all: bool, expected: float | None) -> None:
    assert agentplan.max_inlet_c(policy(rackConstraints=racks), node_rack, apply_all) == expected


def test_hot_inlet_cuts_the_cap_and_flags_an_emergency() -> None:
    racks = [{"rackId": "r1", "maxTemperature": 30}]
    plan = only(inputs(policies=[policy(gpus={UUID_A: 400}, rackConstraints=racks)], node_rack="r1", inlet_c=31.0))
    assert (plan.action, plan.cap_w, plan.reason, plan.emergency) == (Action.SET, 340, "thermal-cut", True)


@pytest.mark.parametrize(
    ("gpus", "cap_w", "margin", "expected"),
    [
        # the budget is the whole powerCapLimit (the controller's default margin is 0): floor(1000 / 3) = 333
        pytest.param(3, 1000, None, 333, id="floor-never-sums-above-budget"),
        pytest.param(1, 450, None, 450, id="single-gpu"),
        # the same policy on a cluster gets budgetW 2800 from the controller: 4 x 700 W
        pytest.param(4, 2800, None, 700, id="whole-power-cap-limit"),
        # with a 3 % margin the controller publishes budgetW floor(2800 x 0.97) = 2716; not 4 x 700 = 2800
        pytest.param(4, 2800, 0.03, 679, id="keeps-an-overshoot-margin"),
    ],
)
def test_split_allocation(gpus: int, cap_w: int, margin: float | None, expected: int) -> None:
    """--policy FILE: one node entry of the whole budget, split over the GPUs found each tick."""
    given = {} if margin is None else {"margin": margin}
    split = agentplan.split_allocation(replace(policy(), power_cap_w=cap_w), NODE, **given)
    assert agentplan.allocation_w(split, NODE, "GPU-any", gpus) == expected
    assert agentplan.allocated_uuids(split, NODE) == frozenset()


def test_split_allocation_keeps_an_allocation_from_the_file() -> None:
    given = policy(gpus={UUID_A: 250})
    assert agentplan.split_allocation(given, NODE) is given


def telemetry(power_w: float = 350.0, temp_c: float = 60.0, limit_w: float = 400.0, pod: str | None = "inference/llama-0",
              inlet_c: float | None = 24.0, tokens_s: float | None = 420.0, waiting: int | None = 0) -> NodeTelemetry:
    gpu = GpuTelemetry(UUID_A, 0, power_w, limit_w, 200, 700, temp_c, pod, tokens_s, waiting)
    return NodeTelemetry(datetime(2026, 11, 27, tzinfo=timezone.utc), power_w, inlet_c, (gpu,))


@pytest.mark.parametrize(
    ("last", "candidate", "since_s", "expected"),
    [
        pytest.param(None, telemetry(), 0.0, True, id="first-always"),
        pytest.param(telemetry(), telemetry(), 10.0, False, id="unchanged"),
        pytest.param(telemetry(), telemetry(power_w=366), 10.0, False, id="power-within-5pct"),
        pytest.param(telemetry(), telemetry(power_w=368), 10.0, True, id="power-over-5pct"),
        pytest.param(telemetry(), telemetry(power_w=500), 2.0, False, id="min-interval"),
        pytest.param(telemetry(), telemetry(temp_c=61.9), 10.0, False, id="temperature-under-2c"),
        pytest.param(telemetry(), telemetry(temp_c=62), 10.0, True, id="temperature-2c"),
        pytest.param(telemetry(), telemetry(inlet_c=26.5), 10.0, True, id="inlet-2c"),
        pytest.param(telemetry(), telemetry(inlet_c=None), 10.0, True, id="inlet-lost"),
        pytest.param(telemetry(), telemetry(limit_w=390), 10.0, True, id="limit-changed"),
        pytest.param(telemetry(), telemetry(pod=None), 10.0, True, id="pod-left"),
        pytest.param(telemetry(), telemetry(), 30.0, True, id="heartbeat"),
        pytest.param(telemetry(), telemetry(tokens_s=900.0), 10.0, False, id="tokens-alone-waits-for-heartbeat"),
        pytest.param(telemetry(), telemetry(tokens_s=None), 29.9, False, id="tokens-lost-waits-for-heartbeat"),
        pytest.param(telemetry(tokens_s=None), telemetry(tokens_s=420.0), 10.0, False, id="tokens-found-waits-for-heartbeat"),
        pytest.param(telemetry(), telemetry(tokens_s=900.0), 30.0, True, id="tokens-go-out-with-the-heartbeat"),
        pytest.param(telemetry(), telemetry(waiting=3), 10.0, True, id="a-queue-forms: the controller counts the GPU pinned"),
        pytest.param(telemetry(waiting=3), telemetry(waiting=0), 10.0, True, id="the-queue-drains"),
        pytest.param(telemetry(waiting=3), telemetry(waiting=9), 10.0, False, id="a-longer-queue-rides-along"),
        pytest.param(telemetry(), telemetry(waiting=3), 2.0, True, id="a-queue-forming-goes-out-inside-the-min-interval"),
        pytest.param(telemetry(waiting=None), telemetry(waiting=3), 0.5, True, id="a-queue-found-goes-out-at-once"),
        pytest.param(telemetry(waiting=3), telemetry(waiting=0), 2.0, False, id="a-drained-queue-waits-for-the-min-interval"),
        pytest.param(telemetry(waiting=3), telemetry(waiting=9), 2.0, False, id="a-longer-queue-waits-for-the-min-interval"),
        pytest.param(telemetry(waiting=None), telemetry(waiting=3), 10.0, True, id="a-gauge-found-with-a-queue"),
        pytest.param(telemetry(waiting=3), telemetry(waiting=None), 10.0, True, id="the-gauge-lost"),
    ],
)
def test_should_publish(last: NodeTelemetry | None, candidate: NodeTelemetry, since_s: float, expected: bool) -> None:
    assert should_publish(last, candidate, since_s, PublishSettings()) is expected


def test_queues_that_come_and_go_cost_at_most_one_patch_more_per_interval() -> None:
    """Two GPUs whose queues take turns every tick: a queue forming goes out at once only
    when the node showed none, so the node is patched once per minimum interval (5 s), not
    every tick; a drained node's next queue goes out at once again."""
    def node(a: int, b: int) -> NodeTelemetry:
        gpus = tuple(GpuTelemetry(uuid, index, 350.0, 400.0, 200, 700, 60.0, f"inference/p{index}", 420.0, waiting)
                     for index, (uuid, waiting) in enumerate(((UUID_A, a), (UUID_B, b))))
        return NodeTelemetry(datetime(2026, 11, 27, tzinfo=timezone.utc), 700.0, 24.0, gpus)

    last, last_s, patches = node(0, 0), 0.0, []
    for tick in range(1, 31):
        candidate = node(3, 0) if tick % 2 else node(0, 3)
        if should_publish(last, candidate, tick - last_s, PublishSettings()):
            patches.append(tick)
            last, last_s = candidate, float(tick)
    assert patches == [1, 6, 11, 16, 21, 26]
    assert should_publish(node(0, 0), node(0, 1), 1.0, PublishSettings())  # drained, then a new queue


def test_raised_caps_names_the_raised_gpus_at_their_limit_before_the_write() -> None:
    plans = [
        GpuPlan(UUID_A, 0, Action.SET, 500, 400, "allocation"),
        GpuPlan(UUID_B, 1, Action.SET, 300, 400, "allocation"),  # a cut: published after its write
        GpuPlan("GPU-cccc", 2, Action.OBSERVE, 600, 400, "allocation"),  # dry run: nothing written
        GpuPlan("GPU-dddd", 3, Action.RESTORE, 700, 300, "left-policies"),
        GpuPlan("GPU-eeee", 4, Action.SET, 400.3, 400, "allocation"),  # within the limit's tolerance
    ]
    assert agentplan.raised_caps(plans) == {UUID_A: 400, "GPU-dddd": 300}


def test_build_telemetry_reports_enforced_limits_after_writes() -> None:
    stamp = datetime(2026, 11, 27, tzinfo=timezone.utc)
    built = agentplan.build_telemetry(stamp, [reading(), reading(UUID_B, 1, power_w=100)], 23.5, {UUID_A: "inference/llama-0"}, {UUID_B: 300.0})
    assert built.power_w == 450.0 and built.inlet_temperature_c == 23.5
    assert [(g.limit_w, g.pod) for g in built.gpus] == [(400.0, "inference/llama-0"), (300.0, None)]


TENSOR_PARALLEL = {UUID_A: frozenset({POD_UID}), UUID_B: frozenset({POD_UID})}


def test_a_pods_tokens_are_split_across_its_gpus_by_power_and_published() -> None:
    """A tensor-parallel pod making 600 tokens/s on GPUs drawing 450 W and 150 W: the
    annotation says 450 and 150 tokens/s, which sum to the pod's rate (no ratio target
    needed: the Ratio column is for every policy)."""
    tick = inputs(
        readings=[reading(power_w=450.0), reading(UUID_B, 1, power_w=150.0)],
        pod_uids_by_gpu=TENSOR_PARALLEL,
        policies=[policy(gpus={UUID_A: 400, UUID_B: 400})],
        tokens_s_by_pod={POD_UID: 600.0},
    )
    plans = plan_tick(tick)
    assert [p.tokens_s for p in plans] == [pytest.approx(450.0), pytest.approx(150.0)]
    built = agentplan.build_telemetry(datetime(2026, 11, 27, tzinfo=timezone.utc), tick.readings, None,
                                      {p.uuid: p.pod for p in plans}, None, {p.uuid: p.tokens_s for p in plans})
    assert [(g.pod, g.tokens_s) for g in built.gpus] == [("inference/llama-0", pytest.approx(450.0)),
                                                         ("inference/llama-0", pytest.approx(150.0))]


@pytest.mark.parametrize(
    ("tick", "expected"),
    [
        pytest.param(inputs(tokens_s_by_pod={POD_UID: 700.0}), [700.0], id="one-gpu-pod-gets-it-all"),
        pytest.param(inputs(), [None], id="no-metrics-scraped"),
        pytest.param(inputs(readings=[reading(power_w=0.0), reading(UUID_B, 1, power_w=0.0)], pod_uids_by_gpu=TENSOR_PARALLEL,
                            tokens_s_by_pod={POD_UID: 10.0}), [5.0, 5.0], id="idle-gpus-split-evenly"),
        pytest.param(inputs(pods_by_uid={POD_UID: pod(policy_name="other")}, policies=[policy()], tokens_s_by_pod={POD_UID: 700.0}),
                     [None], id="pod-of-no-policy-not-reported"),
        pytest.param(inputs(tokens_s_by_pod={OTHER_POD_UID: 700.0}), [None], id="another-pods-rate-not-used"),
    ],
)
def test_gpu_tokens_per_second(tick: TickInputs, expected: list[float | None]) -> None:
    assert [p.tokens_s for p in plan_tick(tick)] == [pytest.approx(e) if e is not None else None for e in expected]


def test_build_telemetry_reports_tokens_only_beside_a_pod() -> None:
    stamp = datetime(2026, 11, 27, tzinfo=timezone.utc)
    built = agentplan.build_telemetry(stamp, [reading(), reading(UUID_B, 1)], None,
                                      {UUID_A: "inference/llama-0", UUID_B: None}, None, {UUID_A: 300.0, UUID_B: 99.0})
    assert [g.tokens_s for g in built.gpus] == [300.0, None]
    assert [g.tokens_s for g in agentplan.build_telemetry(stamp, [reading()], None, {UUID_A: "inference/llama-0"}).gpus] == [None]


def test_a_gpu_whose_pod_no_policy_matches_is_left_alone_but_named() -> None:
    """kubectl-visible: the telemetry says which pod uses an unmanaged GPU, and its cap is untouched."""
    tick = inputs(pods_by_uid={POD_UID: pod(name="embedder-0", policy_name="other")}, policies=[policy()])
    plan = only(tick)
    assert (plan.action, plan.reason, plan.pod, plan.policy) == (Action.NONE, "unowned", "inference/embedder-0", None)
    built = agentplan.build_telemetry(datetime(2026, 11, 27, tzinfo=timezone.utc), tick.readings, None, {plan.uuid: plan.pod})
    assert built.gpus[0].pod == "inference/embedder-0"
    assert only(inputs(pod_uids_by_gpu={}, policies=[policy()])).pod is None  # no process: nobody to name


# -- the fail-safe rule: stale views, GPUs that cannot move, allocations over the budget ----

RECORD_242 = CapRecord(UUID_A, cap_w=242, default_w=700, policy="inference/llama")
UUID_C, UUID_D = "GPU-cccc", "GPU-dddd"
FOUR = [UUID_A, UUID_B, UUID_C, UUID_D]


def four(caps_w: list[float], cap_w: int = 1000, **changes: Any) -> TickInputs:
    """Four GPUs of policy llama (cap ``cap_w``), owned through its allocation of 242 W each."""
    readings = [reading(u, i, requested_limit_w=w, limit_w=w) for i, (u, w) in enumerate(zip(FOUR, caps_w))]
    base = TickInputs(node=NODE, now_s=100.0, readings=readings, policies=[policy(gpus=dict.fromkeys(FOUR, 242), powerCapLimit=cap_w)])
    return replace(base, **changes)


def caps(tick: TickInputs) -> list[tuple[str, float, str]]:
    return [(p.action.value, p.cap_w, p.reason) for p in plan_tick(tick)]


@pytest.mark.parametrize(
    ("tick", "action", "cap_w", "reason", "record_w"),
    [
        pytest.param(inputs(records={UUID_A: RECORD_242}, policy_fresh=False, readings=[reading(requested_limit_w=700, limit_w=700)]),
                     Action.SET, 242, "driver-reset", 242, id="reset-while-stale-returns-to-record"),
        pytest.param(inputs(records={UUID_A: RECORD_242}, policy_fresh=False, readings=[reading(requested_limit_w=500, limit_w=500)]),
                     Action.SET, 242, "recorded-cap", 242, id="above-record-while-stale-lowered"),
        pytest.param(inputs(records={UUID_A: RECORD_242}, policy_fresh=False, readings=[reading(requested_limit_w=700, limit_w=700)], pod_uids_by_gpu={}, policies=[]),
                     Action.SET, 242, "driver-reset", 242, id="reset-of-unowned-while-stale-returns-to-record"),
        pytest.param(inputs(records={UUID_A: RECORD_242}, policy_fresh=False, readings=[reading(requested_limit_w=700, limit_w=700)], enforce=False),
                     Action.OBSERVE, 242, "driver-reset", 242, id="dry-run-only-observes-the-reset"),
        pytest.param(inputs(records={UUID_A: RECORD_242}, policy_fresh=False, readings=[reading(requested_limit_w=200, limit_w=200)]),
                     Action.HOLD, 200, "stale-policy", 242, id="below-record-while-stale-held-never-raised"),
        pytest.param(inputs(policy_fresh=False, readings=[reading(requested_limit_w=700, limit_w=700)]),
                     Action.HOLD, 700, "stale-policy", None, id="stale-never-creates-a-record"),
        pytest.param(inputs(records={UUID_A: RECORD_242}, readings=[reading(requested_limit_w=700, limit_w=700)], unreadable_policies={"inference/llama": "spec.powerCapLimit: is required"}),
                     Action.SET, 242, "driver-reset", 242, id="unreadable-policy-reset-returns-to-record"),
        pytest.param(inputs(records={UUID_A: RECORD_400}, policies=[policy(gpus={UUID_A: 600})], unreadable_policies={"inference/llama": "x"}),
                     Action.HOLD, 400, "policy-unreadable", 400, id="unreadable-policy-never-raises"),
        pytest.param(inputs(records={UUID_A: RECORD_400}, pod_uids_by_gpu={}, policies=[], unreadable_policies={"inference/llama": "x"}),
                     Action.HOLD, 400, "policy-unreadable", 400, id="unreadable-without-last-good-never-restores"),
        pytest.param(inputs(records={UUID_A: RECORD_400}, readings=[reading(requested_limit_w=700, limit_w=700)], stuck=frozenset({UUID_A})),
                     Action.HOLD, 700, "setter-failing", 400, id="setter-failing-keeps-its-lower-record"),
    ],
)
def test_fail_safe(tick: TickInputs, action: Action, cap_w: float, reason: str, record_w: float | None) -> None:
    plan = only(tick)
    assert (plan.action, plan.cap_w, plan.reason) == (action, cap_w, reason)
    assert (plan.record.cap_w if plan.record else None) == record_w


@pytest.mark.parametrize(
    ("tick", "expected"),
    [
        pytest.param(four([242] * 4), [("hold", 242, "allocation")] * 4, id="all-well"),
        # allocations of 4 x 700 W under a 1000 W cap: scaled by 1000 / 2800, floored
        pytest.param(four([700] * 4, policies=[policy(gpus=dict.fromkeys(FOUR, 700), powerCapLimit=1000)]),
                     [("set", 250, "budget-clamp")] * 4, id="allocations-over-budget-clamped"),
        # 2 x 400 W here and 2 x 400 W on another node: the service passes 1000 W; 400 x 1000 / 1600
        pytest.param(four([400, 400, 400, 400], readings=[reading(UUID_A, 0), reading(UUID_B, 1)],
                          policies=[replace(policy(gpus={UUID_A: 400, UUID_B: 400}, powerCapLimit=1000), status=MappingProxyType({"allocations": [
                              {"node": NODE, "gpus": [{"uuid": UUID_A, "watts": 400}, {"uuid": UUID_B, "watts": 400}], "watts": 800},
                              {"node": "gpu-node-2", "gpus": [{"uuid": "GPU-x", "watts": 400}, {"uuid": "GPU-y", "watts": 400}], "watts": 800},
                          ]}))]),
                     [("set", 250, "budget-clamp")] * 2, id="service-over-budget-clamped-on-each-node"),
        # budgetW published by a controller run with --margin 0.1 wins over the default margin
        pytest.param(four([242] * 4, policies=[replace(policy(gpus=dict.fromkeys(FOUR, 242), powerCapLimit=1000),
                                                       status=MappingProxyType({"budgetW": 900, "allocations": [{"node": NODE, "gpus": [{"uuid": u, "watts": 242} for u in FOUR]}]}))]),
                     [("set", 225, "budget-clamp")] * 4, id="published-budget-followed"),
        # an entry whose watts say less than its GPUs: believe the lower
        pytest.param(four([242] * 4, policies=[replace(policy(powerCapLimit=1000), status=MappingProxyType(
            {"allocations": [{"node": NODE, "gpus": [{"uuid": u, "watts": 242} for u in FOUR], "watts": 880}]}))]),
                     [("set", 220, "budget-clamp")] * 4, id="contradictory-entry-the-lower-believed"),
        # minimums 4 x 200 W > the 4 x 170 = 680 W allocated (budget 700 W): everything at the minimum
        pytest.param(four([700] * 4, policies=[policy(gpus=dict.fromkeys(FOUR, 170), powerCapLimit=700)]),
                     [("set", 200, "allocation")] * 4, id="infeasible-all-at-minimum"),
        # GPU D cannot be set and holds 700 W: the others share 1552 - 700 = 852 W
        pytest.param(four([388, 388, 388, 700], policies=[policy(gpus=dict.fromkeys(FOUR, 388), powerCapLimit=1600)], stuck=frozenset({UUID_D})),
                     [("set", 284, "budget-clamp")] * 3 + [("hold", 700, "setter-failing")], id="stuck-gpu-counted-at-its-limit"),
        # GPU D could not be read, its limit neither: counted at its maximum
        pytest.param(four([388, 388, 388], readings=[reading(u, i, requested_limit_w=388, limit_w=388) for i, u in enumerate(FOUR[:3])],
                          policies=[policy(gpus=dict.fromkeys(FOUR, 388), powerCapLimit=1600)], unseen=[agentplan.UnseenGpu(3, UUID_D)]),
                     [("set", 284, "budget-clamp")] * 3, id="unreadable-gpu-counted-at-maximum"),
        # GPU D's limit could be read alone: counted at what it holds
        pytest.param(four([388, 388, 388], readings=[reading(u, i, requested_limit_w=388, limit_w=388) for i, u in enumerate(FOUR[:3])],
                          policies=[policy(gpus=dict.fromkeys(FOUR, 388), powerCapLimit=1600)], unseen=[agentplan.UnseenGpu(3, UUID_D, held_w=388)]),
                     [("hold", 388, "allocation")] * 3, id="unreadable-gpu-counted-at-its-limit-read-alone"),
        # a GPU that failed enumeration (no UUID) takes the allocation's UUID the node does not show
        pytest.param(four([388, 388, 388], readings=[reading(u, i, requested_limit_w=388, limit_w=388) for i, u in enumerate(FOUR[:3])],
                          policies=[policy(gpus=dict.fromkeys(FOUR, 388), powerCapLimit=1600)], unseen=[agentplan.UnseenGpu(3)]),
                     [("set", 284, "budget-clamp")] * 3, id="unenumerated-gpu-attributed-by-allocation"),
        # --policy FILE: the budget split over four GPUs, the unenumerated one counted at 700 W
        pytest.param(four([242] * 3, readings=[reading(u, i, requested_limit_w=242, limit_w=242) for i, u in enumerate(FOUR[:3])],
                          policies=[agentplan.split_allocation(policy(powerCapLimit=1000), NODE)], node_policy="inference/llama",
                          unseen=[agentplan.UnseenGpu(3)]),
                     [("set", 200, "budget-clamp")] * 3, id="file-policy-unenumerated-gpu-counted"),
        # stale, and GPU D stuck at 700 W: the others still go down to make room
        pytest.param(four([388, 388, 388, 700], policies=[policy(gpus=dict.fromkeys(FOUR, 388), powerCapLimit=1600)],
                          stuck=frozenset({UUID_D}), policy_fresh=False),
                     [("set", 284, "budget-clamp")] * 3 + [("hold", 700, "setter-failing")], id="stale-still-makes-room"),
        # a new GPU of the policy, no allocation yet, on a node whose allocations use the budget
        # (3 x floor(1000 / 3)): the others share 1000 - 200 = 800 W, floor(800 / 3) = 266
        pytest.param(four([333, 333, 333, 700], policies=[policy(gpus=dict.fromkeys(FOUR[:3], 333), powerCapLimit=1000)],
                          pod_uids_by_gpu={UUID_D: frozenset({POD_UID})}, pods_by_uid={POD_UID: pod()}),
                     [("set", 266, "budget-clamp")] * 3 + [("set", 200, "no-allocation")], id="new-gpu-minimum-fits-in-the-budget"),
    ],
)
def test_share_of_the_node(tick: TickInputs, expected: list[tuple[str, float, str]]) -> None:
    assert caps(tick) == expected
    planned = {p.uuid: p.cap_w for p in plan_tick(tick)}
    unseen = sum(agentplan.held_w(g, tick.readings) for g in tick.unseen)
    held = sum(p.cap_w for p in plan_tick(tick) if p.uuid in tick.stuck)
    # within the budget, or (infeasible) every GPU that can move at its 200 W minimum
    assert sum(planned.values()) + unseen <= max(agentplan.policy_budget_w(tick.policies[0]), 200 * (len(planned) - len(tick.stuck)) + held + unseen)


def test_unseen_gpu_without_an_owner_is_counted_nowhere() -> None:
    node = agentplan.plan_node(inputs(unseen=[agentplan.UnseenGpu(5)]))
    assert node.unattributed == (agentplan.UnseenGpu(5),)
    assert [p.cap_w for p in node.gpus] == [400]


def test_policy_shares_say_what_is_wrong() -> None:
    over = agentplan.plan_node(four([700] * 4, policies=[policy(gpus=dict.fromkeys(FOUR, 700), powerCapLimit=1000)])).policies["inference/llama"]
    assert over.problem == "allocations 2800 W pass the budget 1000 W: clamped to 1000 W on this node"  # 4 x 250 W
    infeasible = agentplan.plan_node(four([200] * 4, policies=[policy(gpus=dict.fromkeys(FOUR, 170), powerCapLimit=700)])).policies["inference/llama"]
    # the room is the node's allocations, 4 x 170 = 680 W, under the 700 W budget
    assert infeasible.infeasible and infeasible.problem == "infeasible: minimums 800 W > budget 680 W (powerCapLimit 700 W)"
    fine = agentplan.plan_node(four([242] * 4)).policies["inference/llama"]
    assert fine.problem is None and (fine.allowance_w, fine.ceilings_w, fine.gpus) == (968, 968, 4)


@pytest.mark.parametrize(
    ("asks", "mins", "room", "expected"),
    [
        pytest.param([300, 300], [200, 200], 700, [300, 300], id="fits"),
        pytest.param([400, 200], [200, 200], 450, [250, 200], id="a-share-under-its-minimum-is-held-there"),
        pytest.param([700, 700, 700, 700], [200] * 4, 970, [242] * 4, id="proportional-floored"),
        pytest.param([300, 300], [200, 200], 300, [200, 200], id="minimums-pass-the-room"),
        pytest.param([300, 300], [200, 200], -100, [200, 200], id="negative-room"),
        pytest.param([], [], 0, [], id="no-gpu"),
    ],
)
def test_fit(asks: list[float], mins: list[float], room: float, expected: list[float]) -> None:
    fitted = agentplan.fit_w(asks, mins, room)
    assert fitted == expected
    assert sum(fitted) <= max(room, sum(mins)) + 1e-9


def document(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCappingPolicy",
            "metadata": {"name": "llama", "namespace": "inference", "uid": "u1", "generation": 3},
            "spec": {"powerCapLimit": 1000, **spec}, "status": {"allocations": [{"node": NODE, "watts": 800}]}}


@pytest.mark.parametrize(
    ("raw", "check"),
    [
        pytest.param(document(customAlgorithm={"name": "vendor-packing", "parameters": {"density": 3}}),
                     lambda p: p.power_cap_w == 1000 and p.enforced, id="unknown-algorithm-ignored"),
        pytest.param(document(mode="Shadow"), lambda p: p.enforced, id="unknown-mode-enforced"),
        pytest.param(document(mode="Observe"), lambda p: not p.enforced, id="observe-kept"),
        pytest.param(document(powerCapLimit=999.9), lambda p: p.power_cap_w == 999, id="fractional-cap-floored"),
        pytest.param(document(rackConstraints=[{"rackId": "r1", "maxTemperature": 30}, {"maxPower": "x"}]),
                     lambda p: [r.rack_id for r in p.racks] == ["r1"], id="unreadable-rack-left-out"),
        pytest.param(document(performancePowerRatio={"targetRatio": -1}), lambda p: p.performance is None, id="bad-target-left-out"),
        pytest.param(document(), lambda p: p.selector.matches({"powercapping.example.com/policy": "llama"}), id="default-selector"),
        pytest.param(document(selector={"matchExpressions": [{"key": "app", "operator": "In", "values": ["a"]}]}),
                     lambda p: p.selector.matches({"app": "a"}) and not p.selector.matches({"app": "b"}), id="expressions"),
        pytest.param(document(), lambda p: agentplan.allocation_w(p, NODE, "GPU-x", 2) == 400 and p.generation == 3, id="status-kept"),
    ],
)
def test_enforceable_policy_reads_what_the_agent_needs(raw: dict[str, Any], check: Any) -> None:
    assert check(agentplan.enforceable_policy(raw))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param({k: v for k, v in document().items() if k != "spec"}, "spec: is required", id="no-spec"),
        pytest.param(document(powerCapLimit=None), "spec.powerCapLimit: is required", id="no-cap"),
        pytest.param(document(powerCapLimit=0), "spec.powerCapLimit: must be watts greater than 0", id="zero-cap"),
        pytest.param(document(powerCapLimit="1kW"), "spec.powerCapLimit: must be watts greater than 0", id="text-cap"),
        pytest.param(document(selector={"matchLabels": {"app": 5}}), "spec.selector.matchLabels: must map strings to strings", id="bad-labels"),
        pytest.param(document(selector={"matchExpressions": [{"key": "app", "operator": "Near"}]}),
                     "spec.selector.matchExpressions[0].operator: must be In, NotIn, Exists or DoesNotExist", id="bad-operator"),
        pytest.param({"spec": {"powerCapLimit": 1000}}, "metadata.name: is required", id="no-name"),
    ],
)
def test_enforceable_policy_refuses_what_cannot_be_enforced(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        agentplan.enforceable_policy(raw)


def test_a_new_status_is_read_anew_and_the_first_entry_of_a_node_counts() -> None:
    """The allocations are read once per policy object: the next status (a new Policy) is not
    answered from the last one; a node listed twice gets its first entry, the total counts both."""
    before = policy(gpus={UUID_A: 400})
    after = replace(before, status=MappingProxyType({"allocations": [
        {"node": NODE, "gpus": [{"uuid": UUID_A, "watts": 300}]}, {"node": NODE, "watts": 250}, {"node": "other", "watts": 100},
    ]}))
    assert agentplan.allocation_w(before, NODE, UUID_A, 1) == 400
    assert agentplan.allocation_w(after, NODE, UUID_A, 1) == 300
    assert agentplan.service_allocated_w(before) == 400
    assert agentplan.service_allocated_w(after) == 650
    assert agentplan.allocated_uuids(after, "other") == frozenset()


@pytest.mark.parametrize(
    ("cap_w", "reason", "expected"),
    [
        pytest.param(300.0, "allocation", True, id="a lowered allocation: the controller waits to see it"),
        pytest.param(300.0, "budget-clamp", True, id="a clamp to the budget"),
        pytest.param(200.0, "no-allocation", True, id="a new GPU started at its minimum"),
        pytest.param(490.0, "ratio-down", False, id="the tokens/J loop's step"),
        pytest.param(425.0, "thermal-cut", False, id="a thermal cut frees no watts the controller waits for"),
        pytest.param(650.0, "allocation", False, id="a raise"),
    ],
)
def test_which_lowers_are_published_at_once(cap_w: float, reason: str, expected: bool) -> None:
    plan = agentplan.GpuPlan(uuid=UUID_A, index=0, action=Action.SET, cap_w=cap_w, previous_w=500.0, reason=reason)
    assert agentplan.lowers_to_publish_now([plan]) is expected
    held = replace(plan, action=Action.HOLD)
    assert agentplan.lowers_to_publish_now([held]) is False
