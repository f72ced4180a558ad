"""NVML GPU backend: real GPUs through pynvml. The only module in the project importing it.

Every pynvml call goes through :func:`translate_nvml_errors`, which maps pynvml's
``NVMLError_*`` classes to our :class:`~nodeagent.gpus.GpuError` hierarchy through one
table (``raise ... from e``) and attaches the GPU index.

Costs (H200, driver 580) and what this backend does about them:

- power ~1 us, limits ~140 us: read every :meth:`NvmlBackend.snapshot`;
- limit constraints, default limit and temperature thresholds never change while the
  driver is loaded: read once per GPU, on its first snapshot;
- the total energy counter (~3 ms) is read only by :meth:`NvmlBackend.total_energy_j`.

Limits are set in milliwatts with ``nvmlDeviceSetPowerManagementLimit`` (needs root or
CAP_SYS_ADMIN) and verified with ``nvmlDeviceGetEnforcedPowerLimit``: another limiter
(the BMC, a data-center power manager) may hold the GPU lower than we asked.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pynvml

from nodeagent.gpus import (
    DriverNotLoaded,
    GpuBackend,
    GpuError,
    GpuInfo,
    GpuLost,
    GpuSnapshot,
    InvalidArgument,
    LibraryNotFound,
    NoPermission,
    NotSupported,
    log_limit_change,
    validated_limit_mw,
)

log = logging.getLogger(__name__)

_ERROR_TABLE: dict[str, type[GpuError]] = {
    "NVMLError_NoPermission": NoPermission,
    "NVMLError_NotSupported": NotSupported,
    "NVMLError_FunctionNotFound": NotSupported,
    "NVMLError_GpuIsLost": GpuLost,
    "NVMLError_GpuNotFound": GpuLost,
    "NVMLError_ResetRequired": GpuLost,
    "NVMLError_InvalidArgument": InvalidArgument,
    "NVMLError_LibraryNotFound": LibraryNotFound,
    "NVMLError_DriverNotLoaded": DriverNotLoaded,
}
"""pynvml error class name -> our error; names missing from an older pynvml are skipped."""

ERRORS: dict[type[Exception], type[GpuError]] = {
    getattr(pynvml, name): ours for name, ours in _ERROR_TABLE.items() if hasattr(pynvml, name)
}

Method = TypeVar("Method", bound=Callable[..., Any])


def to_gpu_error(error: pynvml.NVMLError, index: int | None) -> GpuError:
    """Our exception for a pynvml error; unmapped codes become a plain GpuError."""
    try:
        message = str(error)
    except Exception:  # pragma: no cover - str() may call back into the library
        message = f"NVML error {getattr(error, 'value', '?')}"
    return ERRORS.get(type(error), GpuError)(message, index=index)


def translate_nvml_errors(method: Method) -> Method:
    """Decorate a backend method: a pynvml error becomes ours, for the GPU in ``args[0]``."""

    @functools.wraps(method)
    def wrapper(self: NvmlBackend, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except pynvml.NVMLError as error:
            index = args[0] if args and isinstance(args[0], int) else None
            raise to_gpu_error(error, index) from error

    return cast(Method, wrapper)


@dataclass(frozen=True, slots=True)
class _Constraints:
    """What does not change while the driver is loaded, per GPU."""

    min_mw: int
    max_mw: int
    default_mw: int
    slowdown_c: float | None
    shutdown_c: float | None


class NvmlBackend(GpuBackend):
    """Real GPUs. Construction initialises NVML and enumerates; :meth:`close` shuts it down.

    Raises :class:`LibraryNotFound` or :class:`DriverNotLoaded` (index None) when NVML
    cannot start. A GPU that fails enumeration (lost, no permission) is logged, left out
    of :meth:`devices` and listed by :meth:`unenumerated`; :meth:`rescan` tries it again.
    The others work.
    """

    def __init__(self) -> None:
        self._handles: dict[int, Any] = {}
        self._devices: dict[int, GpuInfo] = {}
        self._unenumerated: dict[int, str] = {}
        self._constraints: dict[int, _Constraints] = {}
        self._legacy_temperature = not hasattr(pynvml, "nvmlDeviceGetTemperatureV")
        self._open = False
        self._start()

    @translate_nvml_errors
    def _start(self) -> None:
        pynvml.nvmlInit()
        self._open = True
        count = self._enumerate()
        log.info(
            "NVML started",
            extra={
                "driver_version": pynvml.nvmlSystemGetDriverVersion(),
                "gpus_found": count,
                "gpus_usable": len(self._devices),
            },
        )

    def _enumerate(self) -> int:
        """Probe every index not enumerated yet; returns the GPU count. A GPU once
        enumerated stays (a lost one fails its reads, and is counted at its maximum)."""
        count = int(pynvml.nvmlDeviceGetCount())
        for index in range(count):
            if index in self._devices:
                continue
            try:
                self._devices[index] = self._probe(index)
            except GpuError as error:
                why = f"{type(error).__name__}: {error}"
                if self._unenumerated.get(index) != why:
                    log.warning(
                        "GPU left out: enumeration failed",
                        extra={"gpu_index": index, "error": str(error), "kind": type(error).__name__},
                    )
                self._unenumerated[index] = why
            else:
                if self._unenumerated.pop(index, None) is not None:
                    log.info("GPU enumerated", extra={"gpu_index": index, "gpu": self._devices[index].uuid})
        for index in [i for i in self._unenumerated if i >= count]:
            del self._unenumerated[index]
        return count

    @translate_nvml_errors
    def rescan(self) -> None:
        self._enumerate()

    def unenumerated(self) -> dict[int, str]:
        return dict(self._unenumerated)

    @translate_nvml_errors
    def power_limit_w(self, index: int) -> float:
        return float(pynvml.nvmlDeviceGetPowerManagementLimit(self._handle(index))) / 1000

    @translate_nvml_errors
    def _probe(self, index: int) -> GpuInfo:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = GpuInfo(
            index=index,
            uuid=pynvml.nvmlDeviceGetUUID(handle),
            name=pynvml.nvmlDeviceGetName(handle),
        )
        self._handles[index] = handle
        return info

    def _handle(self, index: int) -> Any:
        try:
            return self._handles[index]
        except KeyError:
            raise InvalidArgument("no such GPU", index=index) from None

    def _constraints_of(self, index: int) -> _Constraints:
        constraints = self._constraints.get(index)
        if constraints is None:
            handle = self._handle(index)
            min_mw, max_mw = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            constraints = _Constraints(
                min_mw=min_mw,
                max_mw=max_mw,
                default_mw=pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle),
                slowdown_c=self._threshold_c(
                    handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
                ),
                shutdown_c=self._threshold_c(
                    handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
                ),
            )
            self._constraints[index] = constraints
        return constraints

    @staticmethod
    def _threshold_c(handle: Any, threshold: int) -> float | None:
        """A temperature threshold, or None where the GPU does not report it."""
        try:
            return float(pynvml.nvmlDeviceGetTemperatureThreshold(handle, threshold))
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
            return None

    def _temperature_c(self, handle: Any) -> float:
        """GPU die temperature: ``nvmlDeviceGetTemperatureV``, or the deprecated
        ``nvmlDeviceGetTemperature`` on drivers without it (remembered after one miss)."""
        if not self._legacy_temperature:
            try:
                sensor = pynvml.NVML_TEMPERATURE_GPU
                return float(pynvml.nvmlDeviceGetTemperatureV(handle, sensor))
            except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_ArgumentVersionMismatch):
                log.info("nvmlDeviceGetTemperatureV unavailable; using nvmlDeviceGetTemperature")
                self._legacy_temperature = True
        return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))

    def devices(self) -> list[GpuInfo]:
        return list(self._devices.values())

    @translate_nvml_errors
    def snapshot(self, index: int) -> GpuSnapshot:
        handle = self._handle(index)
        constraints = self._constraints_of(index)
        return GpuSnapshot(
            index=index,
            uuid=self._devices[index].uuid,
            power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
            requested_limit_w=pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
            min_limit_w=constraints.min_mw / 1000,
            max_limit_w=constraints.max_mw / 1000,
            default_limit_w=constraints.default_mw / 1000,
            temperature_c=self._temperature_c(handle),
            slowdown_c=constraints.slowdown_c,
            shutdown_c=constraints.shutdown_c,
        )

    @translate_nvml_errors
    def set_power_limit_w(self, index: int, watts: float) -> float:
        handle = self._handle(index)
        constraints = self._constraints_of(index)
        limit_mw = validated_limit_mw(index, watts, constraints.min_mw, constraints.max_mw)
        current_mw = pynvml.nvmlDeviceGetPowerManagementLimit(handle)
        if current_mw != limit_mw:
            pynvml.nvmlDeviceSetPowerManagementLimit(handle, limit_mw)
        enforced_mw = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)
        if current_mw != limit_mw:
            log_limit_change(index, current_mw / 1000, limit_mw / 1000, enforced_mw / 1000)
        return float(enforced_mw) / 1000

    @translate_nvml_errors
    def compute_pids(self, index: int) -> list[int]:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle(index))
        return [process.pid for process in processes]

    @translate_nvml_errors
    def total_energy_j(self, index: int) -> float:
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle(index))) / 1000

    @translate_nvml_errors
    def close(self) -> None:
        if self._open:
            self._open = False
            pynvml.nvmlShutdown()
