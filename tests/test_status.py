"""The policy status: fields, conditions, settling measurements, transitions."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from powercap import schema
from powercap.allocation import AllocationSettings, GpuState, Service, allocate
from powercap.policies import Mode, parse_policy
from powercap.status import (
    LaggingGpu,
    RackReading,
    StatusInputs,
    allocations_field,
    find_lagging,
    published_allocations,
    render_status,
    transitions,
)
from tests.fakes.objects import NOW, policy as policy_document

LATER = NOW + timedelta(seconds=30)


def the_policy(cap_w: int = 4200, mode: str | None = None, generation: int = 3):
    document = policy_document("llama", cap_w=cap_w, mode=mode)
    document["metadata"]["generation"] = generation
    return parse_policy(document)


def inputs(cap_w: int = 4200, *, gpus: int = 4, power_w: float | None = 1600.0, mode: str | None = None,
           margin: float = AllocationSettings().margin, **extra: Any) -> StatusInputs:
    """A round's inputs as the controller builds them, allocated with its ``--margin``."""
    states = tuple(
        GpuState(f"GPU-{i}", f"node-{i // 2}", "rack-1", 200, 700, 400, 700) for i in range(gpus)
    )
    allocation = allocate([Service("inference/llama", cap_w, states)], settings=AllocationSettings(margin=margin))
    return StatusInputs(policy=the_policy(cap_w, mode), allocation=allocation.services["inference/llama"],
                        margin=margin, gpus=gpus, power_w=power_w, **extra)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def message(status: dict[str, Any], kind: str) -> str:
    return next(c["message"] for c in status["conditions"] if c["type"] == kind)


@pytest.mark.parametrize(
    "margin, budget_w, source",
    [
        pytest.param(AllocationSettings().margin, 4200, "the whole powerCapLimit, 4200 W", id="default"),
        pytest.param(0.03, 4074, "powerCapLimit 4200 W minus the 3 % margin", id="--margin=0.03"),  # floor(4200 x 0.97)
    ],
)
def test_a_healthy_policy_shows_cap_power_gpus_and_ready(margin: float, budget_w: int, source: str) -> None:
    status = render_status(inputs(margin=margin), None, NOW)
    assert status["observedGeneration"] == 3
    assert status["gpus"] == 4
    assert status["powerW"] == 1600
    assert status["budgetW"] == budget_w
    assert status["allocations"] == [
        {"node": "node-0", "gpus": [{"uuid": "GPU-0", "watts": 700}, {"uuid": "GPU-1", "watts": 700}], "watts": 1400},
        {"node": "node-1", "gpus": [{"uuid": "GPU-2", "watts": 700}, {"uuid": "GPU-3", "watts": 700}], "watts": 1400},
    ]
    assert conditions(status) == {
        "Ready": ("True", "WithinCap"),
        "Feasible": ("True", "BudgetCoversMinimums"),
        "Enforced": ("True", "AllocationApplied"),
    }
    assert message(status, "Ready") == "the service draws 1600 W of powerCapLimit 4200 W across 4 GPUs"
    assert message(status, "Feasible") == (
        f"budget {budget_w} W ({source}) covers the minimum power limits of 4 GPUs (800 W)"
    )
    assert all(c["lastTransitionTime"] == "2026-11-27T23:20:00Z" and c["observedGeneration"] == 3
               for c in status["conditions"])


def test_status_matches_the_crd_schema() -> None:
    status_schema = schema.policy_schema()["properties"]["status"]
    status = render_status(inputs(racks=(RackReading("rack-1", 3900.4, 24.25), RackReading("rack-2", 100, None)),
                                  ratio=2.4681), None, NOW)
    assert schema.validate(status, status_schema) == []
    assert status["racks"] == [
        {"rackId": "rack-1", "powerW": 3900, "nonGpuPowerW": 0, "powerSource": "Measured", "temperatureC": 24.2},
        {"rackId": "rack-2", "powerW": 100, "nonGpuPowerW": 0, "powerSource": "Measured", "temperatureC": None},
    ]


def test_same_inputs_render_the_same_status() -> None:
    first = render_status(inputs(), None, NOW)
    assert render_status(inputs(), first, LATER) == first


@pytest.mark.parametrize(
    "power_w, shown_w",
    [
        pytest.param(1650, 1600, id="within 2 % of the cap (84 W): the stored reading stays"),
        pytest.param(1530, 1600, id="also downwards"),
        pytest.param(1700, 1700, id="beyond it: the new reading is written"),
    ],
)
def test_power_readings_settle(power_w: float, shown_w: float) -> None:
    stored = render_status(inputs(power_w=1600), None, NOW)
    status = render_status(inputs(power_w=power_w), stored, LATER)
    assert status["powerW"] == shown_w
    assert (status == stored) == (shown_w == 1600)


@pytest.mark.parametrize(
    "ratio, shown",
    [
        pytest.param(2.4681, 2.47, id="three significant digits"),
        pytest.param(0.081549, 0.0815, id="small ratios keep their digits"),
        pytest.param(1234.5, 1230.0, id="large ones too"),
        pytest.param(None, None, id="no GPU reports tokens/s: no ratio"),
    ],
)
def test_ratio_is_rounded_to_three_significant_digits(ratio: float | None, shown: float | None) -> None:
    status = render_status(inputs(ratio=ratio), None, NOW)
    assert status.get("ratio") == shown
    assert ("ratio" in status) is (shown is not None)


@pytest.mark.parametrize(
    "ratio, shown",
    [
        pytest.param(2.54, 2.5, id="within 2 % of the stored 2.5: it stays"),
        pytest.param(2.45, 2.5, id="also downwards"),
        pytest.param(2.56, 2.56, id="beyond it: the new ratio is written"),
        pytest.param(None, None, id="tokens/s no longer reported: the ratio goes"),
    ],
)
def test_ratio_settles(ratio: float | None, shown: float | None) -> None:
    stored = render_status(inputs(ratio=2.5), None, NOW)
    status = render_status(inputs(ratio=ratio), stored, LATER)
    assert status.get("ratio") == shown
    assert (status == stored) == (shown == 2.5)


def test_rack_readings_settle() -> None:
    stored = render_status(inputs(racks=(RackReading("rack-1", 4000, 24.0),)), None, NOW)
    noisy = render_status(inputs(racks=(RackReading("rack-1", 4060, 24.4),)), stored, LATER)
    assert noisy == stored
    moved = render_status(inputs(racks=(RackReading("rack-1", 4200, 25.0),)), stored, LATER)
    assert moved["racks"] == [{"rackId": "rack-1", "powerW": 4200, "nonGpuPowerW": 0, "powerSource": "Measured", "temperatureC": 25.0}]


def test_last_transition_time_moves_only_when_the_status_changes() -> None:
    stored = render_status(inputs(power_w=1600), None, NOW)
    busier = render_status(inputs(power_w=2400), stored, LATER)  # message changes, status does not
    assert message(busier, "Ready") != message(stored, "Ready")
    assert [c["lastTransitionTime"] for c in busier["conditions"]] == [c["lastTransitionTime"] for c in stored["conditions"]]
    over = render_status(inputs(power_w=4300), busier, LATER)
    ready = next(c for c in over["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["lastTransitionTime"]) == ("False", "OverCap", "2026-11-27T23:20:30Z")


def test_infeasible_policy_says_what_to_change() -> None:
    status = render_status(inputs(cap_w=700), None, NOW)
    assert conditions(status)["Feasible"] == ("False", "Infeasible")
    assert conditions(status)["Ready"] == ("False", "Infeasible")
    assert "raise powerCapLimit to at least 800 W" in message(status, "Ready")  # 4 x 200 W, all of it the budget
    assert [g["watts"] for a in status["allocations"] for g in a["gpus"]] == [200, 200, 200, 200]


def test_infeasible_rack_is_reported() -> None:
    status = render_status(inputs(rack_problems=("rack rack-1: 4 GPUs need at least 800 W",)), None, NOW)
    assert conditions(status)["Feasible"] == ("False", "RackInfeasible")
    assert message(status, "Feasible") == "rack rack-1: 4 GPUs need at least 800 W"


def test_observe_mode_is_reported_not_enforced() -> None:
    status = render_status(inputs(mode="Observe"), None, NOW)
    assert conditions(status) == {
        "Ready": ("True", "WithinCap"),
        "Feasible": ("True", "BudgetCoversMinimums"),
        "Enforced": ("False", "ObserveMode"),
    }
    assert message(status, "Ready").endswith("(Observe mode: caps are reported, not set)")
    over = render_status(inputs(mode="Observe", power_w=4500), None, NOW)
    assert conditions(over)["Ready"] == ("False", "OverCap")
    assert message(over, "Ready") == "the service draws 4500 W above powerCapLimit 4200 W; mode is Observe, so no GPU is capped"


@pytest.mark.parametrize(
    "count, expected",
    [
        pytest.param(1, "1 GPU runs above its allocation: node-1/GPU-2 at 700 W (allocated 450 W); "
                        "check the node agent on node-1", id="one"),
        pytest.param(2, "2 GPUs run above their allocation: node-1/GPU-2 at 700 W (allocated 450 W), "
                        "node-1/GPU-3 at 700 W (allocated 450 W); check the node agent on node-1", id="two"),
    ],
)
def test_lagging_agents_are_named(count: int, expected: str) -> None:
    lagging = (LaggingGpu("node-1", "GPU-2", 700, 450), LaggingGpu("node-1", "GPU-3", 700, 450))[:count]
    status = render_status(inputs(lagging=lagging), None, NOW)
    assert conditions(status)["Enforced"] == ("False", "AgentsLagging")
    assert conditions(status)["Ready"] == ("False", "AgentsLagging")
    assert message(status, "Enforced") == expected


def test_silent_nodes_are_named() -> None:
    status = render_status(inputs(silent_nodes=("no telemetry from node gpu-3 for 312 s (stale after 90 s)",)), None, NOW)
    assert conditions(status)["Enforced"] == ("False", "TelemetryStale")
    assert message(status, "Enforced") == (
        "no telemetry from node gpu-3 for 312 s (stale after 90 s); their GPUs are held at their last caps "
        "until the agents report again"
    )


def test_a_service_without_gpus() -> None:
    status = render_status(inputs(gpus=0, power_w=0), None, NOW)
    assert status["allocations"] == [] and status["gpus"] == 0 and status["powerW"] == 0
    assert conditions(status) == {"Ready": ("True", "NoGPUs"), "Feasible": ("True", "NoGPUs"), "Enforced": ("True", "NoGPUs")}


def test_unreported_gpus_are_mentioned() -> None:
    status = render_status(inputs(unreported_gpus=1, gpus=4), None, NOW)
    assert message(status, "Enforced") == (
        "node agents hold 3 GPUs at or under their allocation; 1 GPU of starting pods not reported yet "
        "(they run at their minimum)"
    )


@pytest.mark.parametrize(
    "limit_w, allocated_w, lagging",
    [
        pytest.param(450, 450, False, id="at its allocation"),
        pytest.param(300, 450, False, id="under it (the agent's own loop)"),
        pytest.param(473, 450, False, id="within 5 % + 1 W"),
        pytest.param(475, 450, True, id="beyond"),
        pytest.param(700, None, False, id="no allocation published yet"),
    ],
)
def test_find_lagging(limit_w: float, allocated_w: float | None, lagging: bool) -> None:
    published = {} if allocated_w is None else {"GPU-1": allocated_w}
    assert bool(find_lagging([("node-1", "GPU-1", limit_w)], published)) is lagging


def test_published_allocations_reads_back_what_was_written() -> None:
    status = render_status(inputs(), None, NOW)
    assert published_allocations(status) == {"GPU-0": 700, "GPU-1": 700, "GPU-2": 700, "GPU-3": 700}
    assert published_allocations({"allocations": [{"node": "x", "gpus": [{"uuid": 3}, "junk"]}, "junk"]}) == {}
    assert published_allocations(None) == {}
    # an integer no float holds is malformed like any other (it raised OverflowError)
    assert published_allocations({"allocations": [{"node": "x", "gpus": [{"uuid": "GPU-0", "watts": 10**400}]}]}) == {}


def test_transitions_are_status_or_reason_changes() -> None:
    healthy = render_status(inputs(), None, NOW)
    assert transitions(None, healthy) == []  # a new, healthy policy needs no Event
    over = render_status(inputs(power_w=4300), healthy, LATER)
    changed = transitions(healthy, over)
    assert [(t.condition.type, t.previous_status, t.condition.status, t.event_type) for t in changed] == [
        ("Ready", "True", "False", "Warning"),
    ]
    assert changed[0].note == "Ready is False (OverCap): the service draws 4300 W above powerCapLimit 4200 W; " \
                              "the node agents are lowering the caps (brief overshoot above a limit is normal)"
    back = render_status(inputs(), over, LATER)
    assert [(t.event_reason, t.event_type) for t in transitions(over, back)] == [("Ready", "Normal")]
    assert transitions(back, render_status(inputs(power_w=2000), back, LATER)) == []


def event_reasons(before: dict[str, Any] | None, after: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(condition, Event type, Event reason) of every Event the change from ``before`` records."""
    return [(t.condition.type, t.event_type, t.event_reason) for t in transitions(before, after)]


LAGGING = (LaggingGpu("node-1", "GPU-2", 700, 450),)
STALE = ("no telemetry from node node-1 for 312 s (stale after 90 s)",)


@pytest.mark.parametrize(
    "before, after, expected",
    [
        pytest.param(None, {"cap_w": 700}, [("Ready", "Warning", "NotReady"), ("Feasible", "Warning", "Infeasible")],
                     id="new and infeasible: one Warning per condition, each its own reason"),
        pytest.param({}, {"cap_w": 700}, [("Ready", "Warning", "NotReady"), ("Feasible", "Warning", "Infeasible")],
                     id="infeasible: Ready and Feasible do not both say Infeasible"),
        pytest.param({"cap_w": 700}, {}, [("Ready", "Normal", "Ready"), ("Feasible", "Normal", "BudgetCoversMinimums")],
                     id="feasible again"),
        pytest.param({}, {"lagging": LAGGING}, [("Ready", "Warning", "NotReady"),
                                                ("Enforced", "Warning", "AgentsLagging")], id="lagging"),
        pytest.param({"lagging": LAGGING}, {"silent_nodes": STALE}, [("Ready", "Warning", "NotReady"),
                                                                     ("Enforced", "Warning", "TelemetryStale")],
                     id="another problem: Ready stays False with a new reason"),
        pytest.param({"cap_w": 700}, {"cap_w": 700, "power_w": 900}, [], id="same problem, new figures: nothing"),
        pytest.param({"gpus": 0, "power_w": 0}, {}, [], id="healthy to healthy (NoGPUs to running): nothing"),
        pytest.param({}, {"mode": "Observe"}, [("Enforced", "Normal", "ObserveMode")], id="switched to Observe"),
        pytest.param({"lagging": LAGGING}, {"mode": "Observe"}, [("Ready", "Normal", "Ready"),
                                                                 ("Enforced", "Normal", "ObserveMode")],
                     id="a problem ends in Observe mode"),
    ],
)
def test_each_condition_change_is_one_event_with_its_own_reason(
    before: dict[str, Any] | None, after: dict[str, Any], expected: list[tuple[str, str, str]],
) -> None:
    stored = None if before is None else render_status(inputs(**before), None, NOW)
    assert event_reasons(stored, render_status(inputs(**after), stored, LATER)) == expected
    reasons = [reason for _, _, reason in expected]
    assert len(reasons) == len(set(reasons))


def test_a_not_ready_event_says_which_condition_is_why() -> None:
    status = render_status(inputs(cap_w=700), None, NOW)
    ready, feasible = transitions(None, status)
    # budget floor(700 x (1 - 0)) = 700 < 4 x 200 W; a powerCapLimit of 800 W covers them
    why = ("4 GPUs need at least 800 W (their minimum power limits), but the budget is 700 W (the whole powerCapLimit, "
           "700 W); raise powerCapLimit to at least 800 W or run fewer GPUs")
    assert feasible.note == f"Feasible is False: {why}"
    assert ready.note == f"Ready is False (Infeasible): {why}"


def test_observe_mode_is_not_a_warning() -> None:
    status = render_status(inputs(mode="Observe"), None, NOW)
    assert transitions(None, status) == []
    assert the_policy(mode="Observe").mode is Mode.OBSERVE


def test_allocations_field_groups_by_node() -> None:
    states = (GpuState("b", "node-2", None, 200, 700, 0, 700), GpuState("a", "node-2", None, 200, 700, 0, 700),
              GpuState("c", "node-1", None, 200, 700, 0, 700))
    allocation = allocate([Service("ns/s", 900, states)]).services["ns/s"]  # 900 / 3 each
    assert allocations_field(allocation) == [
        {"node": "node-1", "gpus": [{"uuid": "c", "watts": 300}], "watts": 300},
        {"node": "node-2", "gpus": [{"uuid": "a", "watts": 300}, {"uuid": "b", "watts": 300}], "watts": 600},
    ]
