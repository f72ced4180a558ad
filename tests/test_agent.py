"""The agent's control loop through the real pynvml path (the fake libnvidia-ml.so): every
safety case of DESIGN.md section 6, tick by tick, without sleeping."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.agent import Agent, AgentSettings
from nodeagent.metrics import AgentMetrics
from nodeagent.nvml import NvmlBackend
from nodeagent.simulated import ManualClock
from nodeagent.state import StateFile
from powercap.agentplan import split_allocation
from tests.agenthelpers import NODE, RecordingPublisher, StaticSource, pod, policy, series_value
from tests.fakes.nvml import FakeNvml, NvmlReturn

GPU0, GPU1 = "GPU-fa4e0000-0000-4000-8000-000000000000", "GPU-fa4e0000-0000-4000-8000-000000000001"
POD_UID = "6f1d2c3b-0000-4000-8000-00000000abcd"


@pytest.fixture
def fake(fake_nvml: FakeNvml) -> FakeNvml:
    """Two H200-like GPUs (200-700 W, default 700 W) drawing 350 W at 60 degC."""
    fake_nvml.set_count(2)
    for index in (0, 1):
        fake_nvml.set_power_w(index, 350).set_temperature_c(index, 60)
    return fake_nvml


class Harness:
    """An agent on the fake NVML with a static source, a recording publisher and a state file."""

    def __init__(self, state_path: Path, *, dry_run: bool = False, proc_root: Path = Path("/nonexistent")) -> None:
        self.clock = ManualClock(1000.0)
        self.source = StaticSource()
        self.publisher = RecordingPublisher()
        self.metrics = AgentMetrics()
        self.state_path = state_path
        self.agent = Agent(
            NvmlBackend(),
            self.source,
            AgentSettings(node=NODE, dry_run=dry_run),
            publisher=self.publisher,
            state=StateFile(state_path, NODE),
            metrics=self.metrics,
            clock=self.clock,
            proc_root=proc_root,
        )

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        self.agent.tick()

    def sample(self, name: str, **labels: str) -> float | None:
        """The value of the one series of ``name`` with these labels (among others); None without one."""
        return series_value(self.metrics.registry, name, **labels)

    def state(self) -> dict[str, float]:
        document = json.loads(self.state_path.read_text())
        return {uuid: gpu["capW"] for uuid, gpu in document["gpus"].items()}


@pytest.fixture
def harness(fake: FakeNvml, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "state.json")
    yield h
    h.agent.close()


def test_caps_are_set_once_then_left_alone(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 400, GPU1: 450}))
    harness.tick()
    assert (fake.limit_w(0), fake.limit_w(1), fake.set_calls()) == (400, 450, 2)
    for _ in range(5):
        harness.tick()
    assert fake.set_calls() == 2
    assert harness.sample("powercap_cap_changes_total", reason="allocation") == 2
    assert harness.state() == {GPU0: 400, GPU1: 450}


def test_an_allocation_change_reaches_the_gpu_on_the_next_tick(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 400, GPU1: 400}))
    harness.tick()
    harness.source.set(policy(caps_w={GPU0: 300, GPU1: 400}))
    harness.tick()
    assert (fake.limit_w(0), fake.set_calls()) == (300, 3)


def test_each_change_is_one_structured_log_line(
    harness: Harness, fake: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    harness.source.set(policy(caps_w={GPU0: 400}))
    with caplog.at_level(logging.INFO):
        harness.tick()
    changes = [r for r in caplog.records if r.getMessage() == "power cap changed"]
    assert len(changes) == 1
    fields = {k: getattr(changes[0], k) for k in ("gpu", "policy", "old_w", "new_w", "reason")}
    assert fields == {"gpu": GPU0, "policy": "inference/llama", "old_w": 700, "new_w": 400, "reason": "allocation"}
    assert harness.publisher.reasons() == ["PowerCapChanged"]


def test_a_raised_gpu_is_published_at_the_limit_its_power_was_read_under(harness: Harness, fake: FakeNvml) -> None:
    """The power a tick reads was drawn under the limit before its writes: beside a raised
    limit it reads as a GPU that does not use its cap, and the controller took the raise back
    (docs/decisions.md, "Raises go to the pinned GPUs first"). A cut beside it goes out at
    once, and the raised limit with the next telemetry, beside a power read under it."""
    harness.source.set(policy(caps_w={GPU0: 400, GPU1: 450}))
    harness.tick()
    harness.source.set(policy(caps_w={GPU0: 300, GPU1: 550}))  # watts moved within the node
    harness.tick()
    assert (fake.limit_w(0), fake.limit_w(1)) == (300, 550)
    assert [g.limit_w for g in harness.publisher.telemetries[-1].gpus] == [300, 450]
    # the raised limit rides beside: the controller counts the GPU in force at it
    assert [g.raised_to_w for g in harness.publisher.telemetries[-1].gpus] == [None, 550]
    fake.set_power_w(1, 540)  # drawn under the raised limit
    harness.tick()
    assert [(g.power_w, g.limit_w) for g in harness.publisher.telemetries[-1].gpus][1] == (540, 550)


@pytest.mark.parametrize(
    ("caps_w", "gpu0_c", "set_fails", "lowered"),
    [
        pytest.param({GPU0: 300, GPU1: 450}, 60, False, True, id="allocation-lowered"),
        pytest.param({GPU0: 300, GPU1: 550}, 60, False, True, id="watts-moved-within-the-node"),
        pytest.param({GPU0: 400, GPU1: 550}, 60, False, False, id="allocation-raised"),
        pytest.param({GPU0: 400, GPU1: 450}, 87, False, False, id="thermal-cut: frees no watts the controller waits for"),
        pytest.param({GPU0: 300, GPU1: 450}, 60, True, False, id="lower-not-written"),
        pytest.param({GPU0: 400, GPU1: 450}, 60, False, False, id="nothing-changed"),
    ],
)
def test_a_lower_the_controller_waits_for_is_published_at_once(
    harness: Harness, fake: FakeNvml, caps_w: dict[str, int], gpu0_c: int, set_fails: bool, lowered: bool,
) -> None:
    """The controller holds the raises that spend a lowered GPU's watts until its telemetry
    shows the lower in force: a tick that wrote such a lower asks the publisher to send at
    once (the tokens/J loop's steps do not: tests/test_agent_tokens.py)."""
    harness.source.set(policy(caps_w={GPU0: 400, GPU1: 450}))
    harness.tick()
    assert harness.publisher.lowered == [True]  # from the 700 W default
    harness.source.set(policy(caps_w=caps_w))
    fake.set_temperature_c(0, gpu0_c)
    if set_fails:
        fake.inject_error("nvmlDeviceSetPowerManagementLimit", NvmlReturn.NO_PERMISSION, gpu=0)
    harness.tick()
    assert harness.publisher.lowered[-1] is lowered


def test_out_of_band_limiter_is_reported_not_fought(harness: Harness, fake: FakeNvml) -> None:
    fake.set_limiter_w(0, 300)
    harness.source.set(policy(caps_w={GPU0: 400}))
    harness.tick()
    harness.tick()
    assert (fake.limit_w(0), fake.enforced_limit_w(0), fake.set_calls()) == (400, 300, 1)
    assert harness.sample("powercap_gpu_limited_out_of_band", UUID=GPU0) == 1
    assert harness.sample("powercap_gpu_power_limit_watts", UUID=GPU0) == 300
    assert "PowerLimitHeldLower" in harness.publisher.reasons()
    assert harness.publisher.telemetries[-1].gpus[0].limit_w == 300


@pytest.mark.parametrize(
    ("code", "error"),
    [
        pytest.param(NvmlReturn.NO_PERMISSION, "NoPermission", id="no-permission"),
        pytest.param(NvmlReturn.NOT_SUPPORTED, "NotSupported", id="not-supported"),
        pytest.param(NvmlReturn.GPU_IS_LOST, "GpuLost", id="gpu-is-lost"),
        pytest.param(NvmlReturn.INVALID_ARGUMENT, "InvalidArgument", id="invalid-argument"),
    ],
)
def test_a_gpu_whose_set_fails_counts_at_its_limit_and_the_other_makes_room(
    harness: Harness, fake: FakeNvml, code: int, error: str,
) -> None:
    """800 W for two GPUs; GPU 0 cannot be set and keeps 700 W: GPU 1 gets what is left
    (100 W, so its 200 W minimum), /status and metrics show the limits in force."""
    fake.inject_error("nvmlDeviceSetPowerManagementLimit", code, gpu=0)
    harness.source.set(policy(caps_w={GPU0: 400, GPU1: 400}))
    harness.tick()
    assert (fake.limit_w(0), fake.limit_w(1)) == (700, 400)  # both lowers tried; GPU 0's failed
    assert harness.sample("powercap_nvml_errors_total", UUID=GPU0, error=error) == 1
    assert harness.sample("powercap_gpu_degraded", UUID=GPU0) == 1
    assert harness.sample("powercap_gpu_degraded", UUID=GPU1) == 0
    status = harness.agent.status()["gpus"]
    assert status[0]["degraded"] and error in status[0]["error"] and not status[1]["degraded"]
    assert (status[0]["capW"], status[0]["plannedW"]) == (700, 400)  # the limit in force, then the plan
    assert GPU0 not in harness.state()
    harness.tick()  # within the retry delay: not hammered, and counted at the 700 W it holds
    assert (fake.limit_w(0), fake.limit_w(1)) == (700, 200)
    assert harness.sample("powercap_nvml_errors_total", UUID=GPU0, error=error) == 1
    assert harness.sample("powercap_gpu_power_limit_watts", UUID=GPU0) == 700
    assert harness.agent.status()["gpus"][0]["reason"] == "setter-failing"
    fake.clear_errors()
    harness.tick(30.0)
    assert (fake.limit_w(0), fake.limit_w(1)) == (400, 400)  # GPU 0's lower went first, then GPU 1's raise
    assert harness.sample("powercap_gpu_degraded", UUID=GPU0) == 0


def test_a_raise_waits_while_a_lower_of_the_same_policy_fails(harness: Harness, fake: FakeNvml) -> None:
    """The controller moves 200 W from GPU 0 to GPU 1; GPU 0's setter fails: GPU 1 is not
    raised in that tick (the sum would pass 800 W), and makes room on the next."""
    harness.source.set(policy(caps_w={GPU0: 500, GPU1: 300}))
    harness.tick()
    fake.inject_error("nvmlDeviceSetPowerManagementLimit", NvmlReturn.NO_PERMISSION, gpu=0)
    harness.source.set(policy(caps_w={GPU0: 300, GPU1: 500}))
    harness.tick()
    assert (fake.limit_w(0), fake.limit_w(1)) == (500, 300)
    harness.tick()
    assert (fake.limit_w(0), fake.limit_w(1)) == (500, 300)  # room: 800 - 500 = 300 W


@pytest.mark.parametrize(
    "code", [NvmlReturn.NO_PERMISSION, NvmlReturn.NOT_SUPPORTED, NvmlReturn.GPU_IS_LOST, NvmlReturn.INVALID_ARGUMENT]
)
def test_a_failing_read_degrades_that_gpu_and_it_counts_at_its_limit(harness: Harness, fake: FakeNvml, code: int) -> None:
    fake.inject_error("nvmlDeviceGetPowerUsage", code, gpu=0)
    harness.source.set(policy(caps_w={GPU0: 400, GPU1: 400}))
    harness.tick()
    # GPU 0's limit is read alone (700 W): GPU 1 makes room, down to its minimum
    assert (fake.limit_w(0), fake.limit_w(1)) == (700, 200)
    assert [g.uuid for g in harness.publisher.telemetries[-1].gpus] == [GPU1]
    assert harness.sample("powercap_gpu_power_watts", UUID=GPU0) is None
    assert harness.sample("powercap_gpu_degraded", UUID=GPU0) == 1
    assert harness.agent.status()["gpus"][0]["countedW"] == 700
    fake.clear_errors()
    harness.tick()
    assert (fake.limit_w(0), fake.limit_w(1)) == (400, 400) and harness.sample("powercap_gpu_degraded", UUID=GPU0) == 0


def test_an_unreadable_gpu_whose_limit_cannot_be_read_counts_at_its_maximum(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 300, GPU1: 300}))
    harness.tick()
    fake.inject_error("nvmlDeviceGetPowerUsage", NvmlReturn.GPU_IS_LOST, gpu=0)
    fake.inject_error("nvmlDeviceGetPowerManagementLimit", NvmlReturn.GPU_IS_LOST, gpu=0)
    harness.tick()
    assert fake.limit_w(1) == 200  # 600 W less GPU 0's 700 W maximum: nothing left but the minimum
    assert harness.agent.status()["gpus"][0]["countedW"] == 700
    assert harness.agent.status()["policies"]["inference/llama"]["infeasible"] is True


def test_api_unreachable_keeps_caps_and_never_raises_one(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 400}))
    harness.tick()
    harness.source.set(policy(caps_w={GPU0: 600}), fresh=False)
    for _ in range(3):
        harness.tick()
    assert (fake.limit_w(0), fake.set_calls()) == (400, 1)
    assert harness.sample("powercap_agent_policy_fresh") == 0
    harness.source.set(fresh=False)  # the caches look empty too: nothing is restored
    harness.tick()
    assert (fake.limit_w(0), fake.set_calls()) == (400, 1)


def test_heat_still_cuts_while_the_api_is_unreachable(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 400}))
    harness.tick()
    harness.source.set(policy(caps_w={GPU0: 400}), fresh=False)
    fake.set_temperature_c(0, 88)
    harness.tick()
    assert fake.limit_w(0) == 340


def test_restart_adopts_the_state_file_without_a_single_write(fake: FakeNvml, tmp_path: Path) -> None:
    first = Harness(tmp_path / "state.json")
    first.source.set(policy(caps_w={GPU0: 400, GPU1: 450}))
    first.tick()
    first.agent.close()
    assert fake.set_calls() == 2
    second = Harness(tmp_path / "state.json")
    second.source.set(policy(caps_w={GPU0: 400, GPU1: 450}))
    second.tick()
    second.agent.close()
    assert fake.set_calls() == 2


def test_a_gpu_that_leaves_every_policy_gets_its_default_back(harness: Harness, fake: FakeNvml) -> None:
    fake.set_limit_w(1, 500)  # set by someone else: never ours to restore
    harness.source.set(policy(caps_w={GPU0: 400}))
    harness.tick()
    harness.source.set()
    harness.tick()
    assert (fake.limit_w(0), fake.limit_w(1)) == (700, 500)
    assert harness.state() == {}
    assert harness.sample("powercap_cap_changes_total", reason="left-policies") == 1


def test_the_default_is_restored_after_a_restart_too(fake: FakeNvml, tmp_path: Path) -> None:
    first = Harness(tmp_path / "state.json")
    first.source.set(policy(caps_w={GPU0: 400}))
    first.tick()
    first.agent.close()
    second = Harness(tmp_path / "state.json")
    second.source.set()  # the policy went away while the agent was down
    second.tick()
    second.agent.close()
    assert fake.limit_w(0) == 700


def test_caps_lost_to_a_driver_reload_are_reapplied(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 400}))
    harness.tick()
    fake.set_limit_w(0, 700)  # the driver came back with its default limit
    harness.tick()
    assert fake.limit_w(0) == 400
    assert harness.sample("powercap_cap_changes_total", reason="driver-reset") == 1


def test_dry_run_never_calls_a_setter(fake: FakeNvml, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"version": 1, "node": NODE, "gpus": {GPU1: {"capW": 300, "defaultW": 700, "policy": "inference/gone"}}}))
    fake.set_limit_w(1, 300)
    h = Harness(state, dry_run=True)
    h.source.set(policy(caps_w={GPU0: 400}))
    for _ in range(3):
        h.tick()
    assert fake.set_calls() == 0
    assert h.sample("powercap_gpu_planned_limit_watts", UUID=GPU0) == 400
    assert h.sample("powercap_gpu_planned_limit_watts", UUID=GPU1) == 700
    h.agent.close(restore=True)
    assert fake.set_calls() == 0


def test_observe_mode_never_calls_a_setter(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 400, GPU1: 300}, mode="Observe"))
    for _ in range(3):
        harness.tick()
    assert fake.set_calls() == 0
    assert harness.agent.status()["gpus"][0]["action"] == "observe"
    assert harness.sample("powercap_gpu_planned_limit_watts", UUID=GPU1) == 300


def test_exit_keeps_caps_unless_restore_on_exit(fake: FakeNvml, tmp_path: Path) -> None:
    kept = Harness(tmp_path / "kept.json")
    kept.source.set(policy(caps_w={GPU0: 400}))
    kept.tick()
    kept.agent.close()
    assert fake.limit_w(0) == 400
    restored = Harness(tmp_path / "restored.json")
    restored.source.set(policy(caps_w={GPU0: 350}))
    restored.tick()
    restored.agent.close(restore=True)
    assert fake.limit_w(0) == 700
    assert json.loads((tmp_path / "restored.json").read_text())["gpus"] == {}


def test_thermal_emergency_cuts_and_raises_an_event(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 400}))
    harness.tick()
    fake.set_temperature_c(0, 87)
    harness.tick()
    assert fake.limit_w(0) == 340
    assert ("inference/llama", "ThermalEmergency", "Warning") in [e[:3] for e in harness.publisher.events]


def test_pods_found_through_proc_own_their_gpus(fake: FakeNvml, tmp_path: Path) -> None:
    """GPU 1 runs a process of a pod of policy llama (systemd cgroup, containerd)."""
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    slice_uid = POD_UID.replace("-", "_")
    (proc / "4242" / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/"
        "cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n"
    )
    fake.set_pids(1, [4242])
    h = Harness(tmp_path / "state.json", proc_root=proc)
    h.source.set(policy(caps_w={GPU1: 380}), pods={POD_UID: pod(POD_UID)})
    h.tick()
    h.agent.close()
    assert (fake.limit_w(0), fake.limit_w(1)) == (700, 380)
    assert [g.pod for g in h.publisher.telemetries[-1].gpus] == [None, "inference/llama-0"]


def test_a_gpu_reset_while_the_view_is_stale_returns_to_its_recorded_cap(harness: Harness, fake: FakeNvml) -> None:
    harness.source.set(policy(caps_w={GPU0: 400}))
    harness.tick()
    harness.source.set(policy(caps_w={GPU0: 400}), fresh=False)
    fake.set_limit_w(0, 700)  # the driver came back with its default while the API server is away
    harness.tick()
    assert fake.limit_w(0) == 400 and harness.state() == {GPU0: 400}
    assert harness.sample("powercap_cap_changes_total", reason="driver-reset") == 1
    harness.source.set(fresh=False)  # the caches look empty too: still its record, never the default
    fake.set_limit_w(0, 700)
    harness.tick()
    assert fake.limit_w(0) == 400 and harness.state() == {GPU0: 400}


def test_a_gpu_failing_enumeration_counts_at_its_maximum_and_joins_when_it_answers(
    fake: FakeNvml, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """--policy FILE, 1000 W over two GPUs (500 W each); GPU 1 does not enumerate at start."""
    fake.inject_error("nvmlDeviceGetHandleByIndex_v2", NvmlReturn.GPU_IS_LOST, gpu=1)
    h = Harness(tmp_path / "state.json")
    try:
        assert [d.index for d in h.agent.devices] == [0]
        whole = split_allocation(policy(cap_w=1000), NODE)
        h.source.set(whole, node_policy=whole.key, apply_all_racks=True)
        h.tick()
        assert (fake.limit_w(0), fake.limit_w(1)) == (300, 700)  # the whole 1000 W less GPU 1 counted at 700 W
        status = h.agent.status()
        assert status["gpus"][1] == {**status["gpus"][1], "uuid": None, "index": 1, "degraded": True, "countedW": 700}
        fake.clear_errors()
        h.tick(1.0)  # not due yet
        assert len(h.agent.devices) == 1
        with caplog.at_level(logging.INFO, logger="nodeagent.agent"):
            h.tick(5.0)
        assert (fake.limit_w(0), fake.limit_w(1)) == (500, 500)
        assert [r.getMessage() for r in caplog.records].count("GPU joined") == 1
    finally:
        h.agent.close()
