"""The agent's per-tick decisions: who owns a GPU, what to write, what never to write."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import pytest

from nodeagent.gpus import GpuSnapshot
from powercap import agentplan
from powercap.agentplan import Action, CapRecord, GpuMemory, PublishSettings, TickInputs, plan_tick, should_publish
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
    ("uuids", "cap_w", "expected"),
    [
        # the budget is powerCapLimit minus the controller's 3 % margin: floor(1000 x 0.97) = 970
        pytest.param(["a", "b", "c"], 1000, [323, 323, 323], id="floor-never-sums-above-budget"),
        pytest.param(["a"], 450, [436], id="single-gpu"),
        # the same policy on a cluster gets budgetW 2716 from the controller; not 4 x 700 = 2800
        pytest.param(["a", "b", "c", "d"], 2800, [679, 679, 679, 679], id="keeps-the-overshoot-margin"),
    ],
)
def test_split_allocation(uuids: list[str], cap_w: int, expected: list[int]) -> None:
    split = agentplan.split_allocation(replace(policy(), power_cap_w=cap_w), NODE, uuids)
    assert [agentplan.allocation_w(split, NODE, u, len(uuids)) for u in uuids] == expected
    assert agentplan.allocated_uuids(split, NODE) == frozenset(uuids)


def test_split_allocation_keeps_an_allocation_from_the_file() -> None:
    given = policy(gpus={UUID_A: 250})
    assert agentplan.split_allocation(given, NODE, [UUID_A, UUID_B]) is given


def telemetry(power_w: float = 350.0, temp_c: float = 60.0, limit_w: float = 400.0, pod: str | None = "inference/llama-0", inlet_c: float | None = 24.0, tokens_s: float | None = 420.0) -> NodeTelemetry:
    gpu = GpuTelemetry(UUID_A, 0, power_w, limit_w, 200, 700, temp_c, pod, tokens_s)
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
    ],
)
def test_should_publish(last: NodeTelemetry | None, candidate: NodeTelemetry, since_s: float, expected: bool) -> None:
    assert should_publish(last, candidate, since_s, PublishSettings()) is expected


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
