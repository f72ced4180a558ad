"""The node agent's GPU backend interface, its data types and its one error hierarchy.

Backends (one module each; only ``nodeagent.nvml`` imports pynvml):

- :class:`nodeagent.nvml.NvmlBackend`: real GPUs through NVML.
- :class:`nodeagent.simulated.SimulatedBackend`: GPUs simulated with ``powercap.physics``.

The agent's main loop is written against :class:`GpuBackend` only, and receives a backend
instance (no module-level singleton). Every per-GPU failure raises a :class:`GpuError`
subclass carrying the GPU index, so the loop can degrade that GPU and carry on.

Cost model (H200, driver 580): reading power is ~1 us, a power limit ~140 us, the total
energy counter ~3 ms. :meth:`GpuBackend.snapshot` therefore leaves the energy counter
out; read it with :meth:`GpuBackend.total_energy_j` every few seconds at most and
integrate ``power_w`` in between.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

log = logging.getLogger(__name__)

Backend = TypeVar("Backend", bound="GpuBackend")

Clock = Callable[[], float]
"""Monotonic seconds, e.g. ``time.monotonic``; tests inject a manual clock."""


class GpuError(Exception):
    """A GPU operation failed. ``index`` is the GPU's NVML index, or None for the library."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        self.index = index
        self.message = message
        prefix = "NVML" if index is None else f"GPU {index}"
        super().__init__(f"{prefix}: {message}")


class NoPermission(GpuError):
    """The caller may not do this (setting a power limit needs root or CAP_SYS_ADMIN)."""


class NotSupported(GpuError):
    """This GPU or driver does not support the operation (or the function is missing)."""


class GpuLost(GpuError):
    """The GPU fell off the bus or needs a reset; it answers nothing until then."""


class InvalidArgument(GpuError):
    """A bad index or value, e.g. a power limit outside the GPU's [min, max] constraints."""


class LibraryNotFound(GpuError):
    """``libnvidia-ml.so.1`` could not be loaded (no driver installed or not mounted)."""


class DriverNotLoaded(GpuError):
    """The NVIDIA kernel driver is not running."""


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Identity of one GPU: its NVML index, UUID (``GPU-...``) and product name."""

    index: int
    uuid: str
    name: str


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One reading of a GPU, in W and degC.

    Attributes:
        index, uuid: which GPU.
        power_w: power drawn now (NVML refreshes it every 100 ms).
        limit_w: the *enforced* power limit: the lowest of every limiter, ours included.
        requested_limit_w: the power management limit last set (by us or anyone);
            ``limit_w < requested_limit_w`` means an out-of-band limiter holds it lower.
        min_limit_w, max_limit_w: constraints a new limit must respect.
        default_limit_w: the limit to restore when a GPU leaves every policy.
        temperature_c: die temperature.
        slowdown_c, shutdown_c: hardware thresholds, None where the GPU does not say.
    """

    index: int
    uuid: str
    power_w: float
    limit_w: float
    requested_limit_w: float
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    temperature_c: float
    slowdown_c: float | None
    shutdown_c: float | None

    @property
    def held_by_other_limiter(self) -> bool:
        """True when the enforced limit is below what was requested."""
        return self.limit_w < self.requested_limit_w


class GpuBackend(abc.ABC):
    """Reads and caps the GPUs of one node.

    A backend is opened by its constructor or factory and released by :meth:`close`
    (or a ``with`` block). Methods taking ``index`` raise :class:`GpuError` subclasses
    with that index; :class:`InvalidArgument` for an index not in :meth:`devices`.
    """

    @abc.abstractmethod
    def devices(self) -> list[GpuInfo]:
        """The usable GPUs, by index (a GPU that failed enumeration is left out and logged)."""

    @abc.abstractmethod
    def snapshot(self, index: int) -> GpuSnapshot:
        """Power, limits and temperature of one GPU. Cheap: no energy counter."""

    @abc.abstractmethod
    def set_power_limit_w(self, index: int, watts: float) -> float:
        """Make ``watts`` the GPU's power limit; return the limit enforced afterwards, in W.

        Idempotent: reads the current limit and writes only when it differs (at
        milliwatt resolution). A return value below ``watts`` means an out-of-band
        limiter holds the GPU lower. Raises :class:`InvalidArgument` outside
        [min_limit_w, max_limit_w] and :class:`NoPermission` without privileges.
        """

    @abc.abstractmethod
    def compute_pids(self, index: int) -> list[int]:
        """Host PIDs of the compute processes running on the GPU (map them to pods)."""

    @abc.abstractmethod
    def total_energy_j(self, index: int) -> float:
        """Energy the GPU consumed since the driver loaded, in J.

        Expensive on real hardware (~3 ms per GPU): call it every few seconds at most.
        """

    def rescan(self) -> None:  # noqa: B027 - optional hook: a fixed device list by default
        """Enumerate again, so that a GPU that failed enumeration joins :meth:`devices`
        once it answers. Raises :class:`GpuError` when the library itself fails."""

    def unenumerated(self) -> dict[int, str]:
        """GPUs present but left out of :meth:`devices` because enumeration failed:
        index -> why. They hold a limit nobody can read: the agent counts them at a maximum."""
        return {}

    def power_limit_w(self, index: int) -> float:
        """The power management limit alone, in W: what a GPU whose full
        :meth:`snapshot` fails still holds, where it can be read."""
        return self.snapshot(index).requested_limit_w

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the backend. Further calls are undefined."""

    def __enter__(self: Backend) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


OPERATIONS = ("devices", "snapshot", "set_power_limit_w", "compute_pids", "total_energy_j", "power_limit_w")
"""The backend operations, by method name (used to inject errors into test backends)."""


def validated_limit_mw(index: int, watts: float, min_mw: int, max_mw: int) -> int:
    """``round(watts * 1000)``, the milliwatts to ask for, or InvalidArgument outside [min, max]."""
    if not math.isfinite(watts):
        raise InvalidArgument(f"power limit {watts} W is not a number", index=index)
    limit_mw = round(watts * 1000)
    if not min_mw <= limit_mw <= max_mw:
        raise InvalidArgument(
            f"power limit {watts:g} W outside [{min_mw / 1000:g} W, {max_mw / 1000:g} W]",
            index=index,
        )
    return limit_mw


def log_limit_change(index: int, from_w: float, to_w: float, enforced_w: float) -> None:
    """Log a power limit write (debug: the agent logs the change with its pod and policy),
    and a warning when another limiter holds the GPU lower."""
    fields = {"gpu_index": index, "from_w": from_w, "to_w": to_w, "enforced_w": enforced_w}
    log.debug("power limit set", extra=fields)
    if enforced_w < to_w:
        log.warning("power limit held lower by another limiter", extra=fields)
