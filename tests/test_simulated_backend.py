"""The simulated GPU backend: physics-driven readings under an injected clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodeagent import gpus
from nodeagent.simulated import ManualClock, SimulatedBackend
from powercap.physics import H200_LIKE, L40S_LIKE, Workload

PREFILL = Workload(load=1.0, prefill_share=1.0)
DECODE = Workload(load=1.0, prefill_share=0.0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start_s=1000.0)


@pytest.fixture
def node(clock: ManualClock) -> SimulatedBackend:
    """An H200-like GPU (index 0) and an L40S-like GPU (index 1) at 25 degC inlet."""
    return SimulatedBackend([H200_LIKE, L40S_LIKE], clock=clock, inlet_c=25.0)


def test_devices_and_limits_follow_each_gpu_model(node: SimulatedBackend) -> None:
    assert [(d.index, d.name) for d in node.devices()] == [(0, "H200-like"), (1, "L40S-like")]
    assert len({d.uuid for d in node.devices()}) == 2
    small = node.snapshot(1)
    assert (small.min_limit_w, small.max_limit_w, small.limit_w) == (100.0, 350.0, 350.0)
    assert (small.slowdown_c, small.shutdown_c) == (89.0, 95.0)


def test_nothing_changes_until_the_clock_moves(node: SimulatedBackend) -> None:
    node.set_workload(0, PREFILL)
    assert node.snapshot(0).power_w == H200_LIKE.idle_w


def test_power_follows_load_up_to_the_limit(node: SimulatedBackend, clock: ManualClock) -> None:
    node.set_workload(0, PREFILL)
    clock.advance(5)
    assert node.snapshot(0).power_w == pytest.approx(700.0, abs=0.5)
    node.set_power_limit_w(0, 400)
    clock.advance(2)
    assert node.snapshot(0).power_w == pytest.approx(400.0, abs=0.5)
    node.set_workload(0, Workload(load=0.0))
    clock.advance(2)
    assert node.snapshot(0).power_w == pytest.approx(H200_LIKE.idle_w, abs=0.5)


def test_decode_draws_far_less_than_the_limit(node: SimulatedBackend, clock: ManualClock) -> None:
    node.set_workload(0, DECODE)
    clock.advance(5)
    assert node.snapshot(0).power_w == pytest.approx(H200_LIKE.decode_saturation_w, abs=0.5)


def test_temperature_rises_toward_inlet_plus_r_times_p(
    node: SimulatedBackend, clock: ManualClock
) -> None:
    node.set_workload(0, PREFILL)
    clock.advance(H200_LIKE.thermal_time_constant_s)
    halfway_c = node.snapshot(0).temperature_c
    clock.advance(10 * H200_LIKE.thermal_time_constant_s)
    settled_c = node.snapshot(0).temperature_c
    assert settled_c == pytest.approx(25.0 + H200_LIKE.thermal_resistance_c_per_w * 700, abs=0.1)
    assert 25.0 < halfway_c < settled_c


def test_a_cap_trades_tokens_for_tokens_per_joule(
    node: SimulatedBackend, clock: ManualClock
) -> None:
    mix = Workload(load=1.0, prefill_share=0.2)
    node.set_workload(0, mix)
    results = []
    for cap_w in (700, 300):
        node.set_power_limit_w(0, cap_w)
        clock.advance(5)
        before = node.state(0)
        clock.advance(60)
        after = node.state(0)
        tokens = after.tokens - before.tokens
        results.append((tokens / 60, tokens / (after.energy_j - before.energy_j)))
    (fast_tokens_s, fast_tokens_j), (slow_tokens_s, slow_tokens_j) = results
    assert slow_tokens_s < fast_tokens_s
    assert slow_tokens_j > fast_tokens_j


def test_energy_counter_integrates_power(node: SimulatedBackend, clock: ManualClock) -> None:
    node.set_workload(1, DECODE)
    clock.advance(5)
    start_j = node.total_energy_j(1)
    clock.advance(100)
    assert node.total_energy_j(1) - start_j == pytest.approx(
        L40S_LIKE.decode_saturation_w * 100, rel=1e-6
    )


def test_one_long_catch_up_equals_many_ticks(clock: ManualClock) -> None:
    def run(ticks: int) -> gpus.GpuSnapshot:
        start = ManualClock(0.0)
        backend = SimulatedBackend([H200_LIKE], clock=start)
        backend.set_workload(0, PREFILL)
        for _ in range(ticks):
            start.advance(120 / ticks)
            backend.snapshot(0)
        return backend.snapshot(0)

    assert run(1) == run(120)


def test_setter_writes_only_on_change(node: SimulatedBackend) -> None:
    assert node.set_power_limit_w(0, 500) == 500.0
    assert node.set_power_limit_w(0, 500.0004) == 500.0
    assert node.set_power_limit_w(0, 700) == 700.0
    assert node.set_calls == 2


@pytest.mark.parametrize(
    ("index", "watts"),
    [
        pytest.param(1, 400.0, id="above-l40s-max"),
        pytest.param(0, 150.0, id="below-h200-min"),
        pytest.param(5, 300.0, id="no-such-gpu"),
    ],
)
def test_invalid_limit_is_rejected_without_a_write(
    node: SimulatedBackend, index: int, watts: float
) -> None:
    with pytest.raises(gpus.InvalidArgument) as raised:
        node.set_power_limit_w(index, watts)
    assert raised.value.index == index
    assert node.set_calls == 0


def test_out_of_band_limiter_holds_power_and_shows_in_snapshot(
    node: SimulatedBackend, clock: ManualClock
) -> None:
    node.set_workload(0, PREFILL)
    node.set_out_of_band_limit_w(0, 300)
    assert node.set_power_limit_w(0, 500) == 300.0
    clock.advance(5)
    snapshot = node.snapshot(0)
    assert snapshot.held_by_other_limiter
    assert snapshot.power_w == pytest.approx(300.0, abs=0.5)
    node.set_out_of_band_limit_w(0, None)
    assert node.snapshot(0).limit_w == 500.0


@pytest.mark.parametrize(
    ("operation", "error"),
    [
        pytest.param("snapshot", gpus.GpuLost, id="snapshot-lost"),
        pytest.param("set_power_limit_w", gpus.NoPermission, id="set-no-permission"),
        pytest.param("compute_pids", gpus.NotSupported, id="pids-not-supported"),
        pytest.param("total_energy_j", gpus.NotSupported, id="energy-not-supported"),
    ],
)
def test_injected_error_hits_that_gpu_only_until_removed(
    node: SimulatedBackend, operation: str, error: type[gpus.GpuError]
) -> None:
    args = (250.0,) if operation == "set_power_limit_w" else ()
    node.inject_error(operation, error, index=1)
    with pytest.raises(error) as raised:
        getattr(node, operation)(1, *args)
    assert raised.value.index == 1
    getattr(node, operation)(0, *args)
    node.inject_error(operation, None, index=1)
    getattr(node, operation)(1, *args)


def test_injected_error_without_index_hits_every_gpu(node: SimulatedBackend) -> None:
    node.inject_error("devices", gpus.DriverNotLoaded)
    with pytest.raises(gpus.DriverNotLoaded):
        node.devices()
    node.inject_error("compute_pids", gpus.GpuLost)
    for index in (0, 1):
        with pytest.raises(gpus.GpuLost):
            node.compute_pids(index)


def test_unknown_operation_is_refused(node: SimulatedBackend) -> None:
    with pytest.raises(ValueError, match="operation: must be one of"):
        node.inject_error("reboot", gpus.GpuLost)


def run_hot(node: SimulatedBackend, clock: ManualClock, inlet_c: float) -> None:
    """Ten minutes of prefill on GPU 0 with its inlet at ``inlet_c``."""
    node.set_workload(0, PREFILL)
    node.set_inlet_c(inlet_c, index=0)
    clock.advance(600)


def test_hot_inlet_is_throttled_by_hardware_slowdown(
    node: SimulatedBackend, clock: ManualClock
) -> None:
    run_hot(node, clock, inlet_c=70.0)
    snapshot = node.snapshot(0)
    assert H200_LIKE.slowdown_c < snapshot.temperature_c < H200_LIKE.shutdown_c
    assert snapshot.power_w < snapshot.limit_w - 100


def test_cooling_failure_loses_the_gpu_and_the_other_keeps_working(
    node: SimulatedBackend, clock: ManualClock
) -> None:
    run_hot(node, clock, inlet_c=85.0)
    with pytest.raises(gpus.GpuLost) as raised:
        node.snapshot(0)
    assert raised.value.index == 0
    assert node.snapshot(1).temperature_c == pytest.approx(25.0 + 0.14 * 35.0, abs=0.1)


def test_compute_pids_are_what_the_world_set(node: SimulatedBackend) -> None:
    node.set_pids(1, [31337])
    assert node.compute_pids(0) == []
    assert node.compute_pids(1) == [31337]


def test_a_workload_file_runs_the_gpus_it_names_and_idles_the_others(tmp_path: Path, clock: ManualClock,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    backend = SimulatedBackend([H200_LIKE] * 3, clock=clock, uuid_prefix="GPU-n1")
    workload = tmp_path / "workload.json"
    backend.follow_workload_file(workload)  # absent: every GPU idles
    clock.advance(30)
    idle_w = [backend.snapshot(i).power_w for i in range(3)]
    workload.write_text(json.dumps({"GPU-n1-0001": {"load": 1.0, "prefillShare": 0.5}}))
    clock.advance(30)
    power_w = [backend.snapshot(i).power_w for i in range(3)]
    assert power_w[1] > 3 * max(idle_w), (idle_w, power_w)
    assert power_w[0] == pytest.approx(idle_w[0]) and power_w[2] == pytest.approx(idle_w[2])

    workload.write_text('{"GPU-n1-0001": {"load": 7}}')  # refused: the GPU keeps its workload
    clock.advance(30)
    assert backend.snapshot(1).power_w == pytest.approx(power_w[1], rel=0.05)
    assert "GPU-n1-0001.load: expected a number from 0 to 1" in caplog.records[-1].error  # type: ignore[attr-defined]

    workload.unlink()  # the pod left: the GPU idles again
    clock.advance(30)
    assert backend.snapshot(1).power_w == pytest.approx(idle_w[1], rel=0.05)
