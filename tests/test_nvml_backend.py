"""The NVML backend end to end: pynvml's real loading and ctypes calls into the fake library."""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pynvml
import pytest
from tests.fakes.nvml import FakeNvml, FakeNvmlBuild, NvmlReturn, SetCall

from nodeagent import gpus
from nodeagent.nvml import NvmlBackend


@pytest.fixture
def two_gpus(fake_nvml: FakeNvml) -> Iterator[NvmlBackend]:
    """An H200 (200-700 W) and an L40S (100-350 W), opened; closed after the test."""
    fake_nvml.set_count(2)
    fake_nvml.set_identity(0, uuid="GPU-11111111-2222-3333-4444-555555555555", name="NVIDIA H200")
    fake_nvml.set_identity(1, uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", name="NVIDIA L40S")
    fake_nvml.set_limits_w(1, min_w=100, max_w=350, default_w=350)
    with NvmlBackend() as backend:
        yield backend


def test_pynvml_resolves_libnvidia_ml_to_the_fake_by_soname(
    two_gpus: NvmlBackend, fake_nvml_lib: ctypes.CDLL, fake_nvml_build: FakeNvmlBuild
) -> None:
    assert pynvml.nvmlLib._handle == fake_nvml_lib._handle
    assert fake_nvml_build.path.name != "libnvidia-ml.so.1"
    assert str(fake_nvml_build.path.parent) not in os.environ.get("LD_LIBRARY_PATH", "")


def test_devices_lists_index_uuid_and_name(two_gpus: NvmlBackend) -> None:
    assert two_gpus.devices() == [
        gpus.GpuInfo(0, "GPU-11111111-2222-3333-4444-555555555555", "NVIDIA H200"),
        gpus.GpuInfo(1, "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "NVIDIA L40S"),
    ]


def test_snapshot_reads_watts_and_degrees(two_gpus: NvmlBackend, fake_nvml: FakeNvml) -> None:
    fake_nvml.set_power_w(1, 212.345).set_limit_w(1, 300).set_temperature_c(1, 71)
    fake_nvml.set_thresholds_c(1, slowdown_c=87, shutdown_c=92)
    assert two_gpus.snapshot(1) == gpus.GpuSnapshot(
        index=1,
        uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        power_w=212.345,
        limit_w=300.0,
        requested_limit_w=300.0,
        min_limit_w=100.0,
        max_limit_w=350.0,
        default_limit_w=350.0,
        temperature_c=71.0,
        slowdown_c=87.0,
        shutdown_c=92.0,
    )


def test_snapshots_leave_the_expensive_energy_counter_alone(
    two_gpus: NvmlBackend, fake_nvml: FakeNvml
) -> None:
    fake_nvml.set_energy_j(0, 123456.789)
    for _ in range(5):
        two_gpus.snapshot(0)
    assert fake_nvml.calls("nvmlDeviceGetTotalEnergyConsumption") == 0
    assert fake_nvml.calls("nvmlDeviceGetPowerManagementLimitConstraints") == 1
    assert two_gpus.total_energy_j(0) == pytest.approx(123456.789)
    assert fake_nvml.calls("nvmlDeviceGetTotalEnergyConsumption") == 1


def test_limit_is_written_in_milliwatts_and_verified(
    two_gpus: NvmlBackend, fake_nvml: FakeNvml
) -> None:
    assert two_gpus.set_power_limit_w(0, 450.5) == 450.5
    assert fake_nvml.limit_w(0) == 450.5
    assert fake_nvml.set_calls() == 1
    assert fake_nvml.calls("nvmlDeviceGetEnforcedPowerLimit") == 1


@pytest.mark.parametrize(
    "again_w",
    [pytest.param(450.0, id="same-watts"), pytest.param(450.0004, id="same-milliwatts")],
)
def test_unchanged_limit_is_not_written_again(
    two_gpus: NvmlBackend, fake_nvml: FakeNvml, again_w: float
) -> None:
    two_gpus.set_power_limit_w(0, 450.0)
    assert two_gpus.set_power_limit_w(0, again_w) == 450.0
    assert fake_nvml.set_calls() == 1


def test_limit_already_in_place_is_not_written(
    two_gpus: NvmlBackend, fake_nvml: FakeNvml
) -> None:
    fake_nvml.set_limit_w(1, 250)
    assert two_gpus.set_power_limit_w(1, 250) == 250.0
    assert fake_nvml.set_calls() == 0


def test_out_of_band_limiter_shows_in_the_result_and_the_snapshot(
    two_gpus: NvmlBackend, fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml.set_limiter_w(0, 300)
    with caplog.at_level(logging.WARNING, logger="nodeagent"):
        assert two_gpus.set_power_limit_w(0, 500) == 300.0
    snapshot = two_gpus.snapshot(0)
    assert (snapshot.limit_w, snapshot.requested_limit_w) == (300.0, 500.0)
    assert snapshot.held_by_other_limiter
    assert "held lower by another limiter" in caplog.text
    assert getattr(caplog.records[0], "gpu_index", None) == 0


@pytest.mark.parametrize(
    "watts",
    [
        pytest.param(199.0, id="below-min"),
        pytest.param(700.001, id="above-max"),
        pytest.param(float("nan"), id="nan"),
    ],
)
def test_limit_outside_constraints_raises_without_a_write(
    two_gpus: NvmlBackend, fake_nvml: FakeNvml, watts: float
) -> None:
    with pytest.raises(gpus.InvalidArgument) as raised:
        two_gpus.set_power_limit_w(0, watts)
    assert raised.value.index == 0
    assert fake_nvml.set_calls() == 0


@pytest.mark.parametrize(
    ("function", "code", "operation", "expected"),
    [
        pytest.param(
            "nvmlDeviceGetPowerUsage", NvmlReturn.GPU_IS_LOST, "snapshot", gpus.GpuLost,
            id="power-read-gpu-lost",
        ),
        pytest.param(
            "nvmlDeviceGetPowerManagementLimit", NvmlReturn.RESET_REQUIRED, "snapshot",
            gpus.GpuLost, id="limit-read-reset-required",
        ),
        pytest.param(
            "nvmlDeviceGetEnforcedPowerLimit", NvmlReturn.NOT_SUPPORTED, "snapshot",
            gpus.NotSupported, id="enforced-limit-not-supported",
        ),
        pytest.param(
            "nvmlDeviceSetPowerManagementLimit", NvmlReturn.NO_PERMISSION, "set_power_limit_w",
            gpus.NoPermission, id="set-no-permission",
        ),
        pytest.param(
            "nvmlDeviceSetPowerManagementLimit", NvmlReturn.INVALID_ARGUMENT,
            "set_power_limit_w", gpus.InvalidArgument, id="set-invalid-argument",
        ),
        pytest.param(
            "nvmlDeviceGetComputeRunningProcesses_v3", NvmlReturn.GPU_IS_LOST, "compute_pids",
            gpus.GpuLost, id="pids-gpu-lost",
        ),
        pytest.param(
            "nvmlDeviceGetTotalEnergyConsumption", NvmlReturn.NOT_SUPPORTED, "total_energy_j",
            gpus.NotSupported, id="energy-not-supported",
        ),
        pytest.param(
            "nvmlDeviceGetPowerUsage", NvmlReturn.UNKNOWN, "snapshot", gpus.GpuError,
            id="unknown-error-is-plain-gpu-error",
        ),
    ],
)
def test_injected_error_raises_our_exception_for_that_gpu_only(
    two_gpus: NvmlBackend,
    fake_nvml: FakeNvml,
    function: str,
    code: NvmlReturn,
    operation: str,
    expected: type[gpus.GpuError],
) -> None:
    call = {
        "snapshot": lambda i: two_gpus.snapshot(i),
        "set_power_limit_w": lambda i: two_gpus.set_power_limit_w(i, 250),
        "compute_pids": lambda i: two_gpus.compute_pids(i),
        "total_energy_j": lambda i: two_gpus.total_energy_j(i),
    }[operation]
    fake_nvml.inject_error(function, code, gpu=1)
    with pytest.raises(expected) as raised:
        call(1)
    assert type(raised.value) is expected
    assert raised.value.index == 1
    assert str(raised.value).startswith("GPU 1: ")
    assert isinstance(raised.value.__cause__, pynvml.NVMLError)
    call(0)


def test_gpu_failing_enumeration_is_left_out(fake_nvml: FakeNvml) -> None:
    fake_nvml.set_count(3).inject_error(
        "nvmlDeviceGetHandleByIndex_v2", NvmlReturn.GPU_IS_LOST, gpu=1
    )
    with NvmlBackend() as backend:
        assert [d.index for d in backend.devices()] == [0, 2]
        with pytest.raises(gpus.InvalidArgument):
            backend.snapshot(1)
        assert backend.snapshot(2).index == 2


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        pytest.param(NvmlReturn.DRIVER_NOT_LOADED, gpus.DriverNotLoaded, id="driver-not-loaded"),
        pytest.param(NvmlReturn.NO_PERMISSION, gpus.NoPermission, id="no-permission"),
    ],
)
def test_nvml_failing_to_start_raises_a_library_error(
    fake_nvml: FakeNvml, code: NvmlReturn, expected: type[gpus.GpuError]
) -> None:
    fake_nvml.inject_error("nvmlInitWithFlags", code)
    with pytest.raises(expected) as raised:
        NvmlBackend()
    assert raised.value.index is None
    assert str(raised.value).startswith("NVML: ")


def test_thresholds_the_gpu_does_not_report_read_as_none(fake_nvml: FakeNvml) -> None:
    fake_nvml.inject_error("nvmlDeviceGetTemperatureThreshold", NvmlReturn.NOT_SUPPORTED)
    with NvmlBackend() as backend:
        snapshot = backend.snapshot(0)
    assert (snapshot.slowdown_c, snapshot.shutdown_c) == (None, None)


def test_driver_without_temperature_v_falls_back_to_the_legacy_call(
    fake_nvml: FakeNvml,
) -> None:
    fake_nvml.set_temperature_c(0, 64)
    fake_nvml.inject_error("nvmlDeviceGetTemperatureV", NvmlReturn.FUNCTION_NOT_FOUND)
    with NvmlBackend() as backend:
        assert [backend.snapshot(0).temperature_c for _ in range(3)] == [64.0] * 3
    assert fake_nvml.calls("nvmlDeviceGetTemperatureV") == 1
    assert fake_nvml.calls("nvmlDeviceGetTemperature") == 3


def test_compute_pids_per_gpu(two_gpus: NvmlBackend, fake_nvml: FakeNvml) -> None:
    fake_nvml.set_pids(0, [4242, 4343])
    assert two_gpus.compute_pids(0) == [4242, 4343]
    assert two_gpus.compute_pids(1) == []


def test_close_shuts_nvml_down_once(fake_nvml: FakeNvml) -> None:
    backend = NvmlBackend()
    assert fake_nvml.init_refcount() == 1
    backend.close()
    backend.close()
    assert fake_nvml.init_refcount() == 0


CHILD = textwrap.dedent(
    """
    import json, sys
    from nodeagent.nvml import NvmlBackend
    with NvmlBackend() as backend:
        for line in sys.stdin:
            if line.strip():
                backend.set_power_limit_w(0, float(line))
            s = backend.snapshot(0)
            print(json.dumps([s.power_w, s.limit_w, s.requested_limit_w]), flush=True)
    """
)


def test_subprocess_uses_the_fake_through_ld_library_path_and_control_file(
    fake_nvml_subprocess: FakeNvml,
) -> None:
    fake = fake_nvml_subprocess
    fake.set_power_w(0, 100).set_limit_w(0, 400)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env={**os.environ, **fake.env()},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stdin, stdout = child.stdin, child.stdout
    assert stdin is not None and stdout is not None

    def ask(line: str) -> list[float]:
        stdin.write(line + "\n")
        stdin.flush()
        result: list[float] = json.loads(stdout.readline())
        return result

    try:
        assert ask("") == [100.0, 400.0, 400.0]
        fake.set_power_w(0, 250).set_limiter_w(0, 300)
        assert ask("") == [250.0, 300.0, 400.0]
        assert ask("400") == [250.0, 300.0, 400.0]
        assert ask("500") == [250.0, 300.0, 500.0]
    finally:
        stdin.close()
        assert child.wait(timeout=10) == 0
    assert fake.logged_set_calls() == [SetCall(gpu=0, limit_mw=500000, rc=0)]


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None,
    reason="a real libnvidia-ml is installed here; never touch real GPUs from tests",
)
def test_missing_library_is_reported_as_library_not_found() -> None:
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from nodeagent import gpus, nvml\n"
            "try:\n    nvml.NvmlBackend()\n"
            "except gpus.LibraryNotFound as e:\n    print(type(e).__name__, e.index)\n",
        ],
        env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"},
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert child.stdout.strip() == "LibraryNotFound None"
