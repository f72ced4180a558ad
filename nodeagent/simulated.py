"""Simulated GPU backend: GPUs modelled by ``powercap.physics``, driven by an injected clock.

For running the node agent without GPUs (demos, kind clusters, tests). Power follows the
load up to the enforced limit, temperature follows ``inlet + R * P`` with a first-order
lag, tokens/s is concave in power with prefill more power-hungry than decode (see
:mod:`powercap.physics`).

Time never sleeps: the state is advanced lazily to ``clock()`` on every call, in steps
of at most ``max_step_s``. Tests pass a :class:`ManualClock`; the agent passes
``time.monotonic``.

The caller controls what real hardware would decide on its own: the workload
(:meth:`SimulatedBackend.set_workload`), the inlet temperature, the compute PIDs, an
out-of-band limiter, and errors per operation and GPU
(:meth:`SimulatedBackend.inject_error`). A GPU reaching its shutdown temperature is lost:
every later call for it raises :class:`~nodeagent.gpus.GpuLost`, as on real hardware.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.gpus import (
    OPERATIONS,
    Clock,
    GpuBackend,
    GpuError,
    GpuInfo,
    GpuLost,
    GpuSnapshot,
    InvalidArgument,
    log_limit_change,
    validated_limit_mw,
)
from powercap import physics
from powercap.physics import GpuModel, GpuState, Workload

log = logging.getLogger(__name__)


def gpu_uuid(prefix: str, index: int) -> str:
    """A simulated GPU's UUID: ``GPU-sim-0003`` for prefix ``GPU-sim`` and index 3."""
    return f"{prefix}-{index:04d}"


class ManualClock:
    """A clock that moves only when told to: ``clock()`` returns seconds."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass
class _SimulatedGpu:
    info: GpuInfo
    model: GpuModel
    state: GpuState
    inlet_c: float
    workload: Workload = physics.IDLE
    requested_limit_w: float = 0.0
    limiter_w: float | None = None
    pids: list[int] = field(default_factory=list)
    lost: bool = False

    @property
    def enforced_limit_w(self) -> float:
        if self.limiter_w is None:
            return self.requested_limit_w
        return min(self.requested_limit_w, self.limiter_w)


class SimulatedBackend(GpuBackend):
    """GPUs of the given models (index = position), idle, at their default limit.

    Args:
        models: one GpuModel per GPU (mix them for a heterogeneous node).
        clock: monotonic seconds; :class:`ManualClock` in tests.
        inlet_c: initial inlet air temperature of every GPU.
        max_step_s: longest physics step when catching up with the clock.
        uuid_prefix: UUIDs are :func:`gpu_uuid` of it and the index.
    """

    def __init__(
        self,
        models: Sequence[GpuModel],
        *,
        clock: Clock,
        inlet_c: float = 25.0,
        max_step_s: float = 1.0,
        uuid_prefix: str = "GPU-sim",
    ) -> None:
        if max_step_s <= 0:
            raise ValueError("max_step_s: must be greater than 0")
        self._clock = clock
        self._max_step_s = max_step_s
        self._last_s = clock()
        self._errors: dict[tuple[str, int | None], type[GpuError]] = {}
        self.set_calls = 0
        """Power limit writes so far (the idempotent setter skips unchanged ones)."""
        self._workload_file: Path | None = None
        self._workload_stamp: tuple[int, int] | None = None
        self._workload_checked_s = float("-inf")
        self._gpus = [
            _SimulatedGpu(
                info=GpuInfo(index=i, uuid=gpu_uuid(uuid_prefix, i), name=model.name),
                model=model,
                state=physics.initial_state(model, inlet_c),
                inlet_c=inlet_c,
                requested_limit_w=model.default_limit_w,
            )
            for i, model in enumerate(models)
        ]

    # -- simulation control (the world's side) -------------------------------------
    def set_workload(self, index: int, workload: Workload) -> None:
        """From now on the GPU serves ``workload`` (load and prefill share)."""
        self._gpu(index).workload = workload

    def follow_workload_file(self, path: Path) -> None:
        """From now on the workloads come from the JSON file ``path``, re-read when it
        changes (looked at once a second of the clock): ``{"<GPU UUID>": {"load": 0.8,
        "prefillShare": 0.2}, ...}``. A GPU it does not name idles, as a GPU with no pod
        does; a missing file idles every GPU. A file that cannot be read or decoded is
        logged and the workloads stay as they were. scripts/local-cluster.sh's stand-in
        kubelets write it: a GPU runs a workload while a pod holds it."""
        self._workload_file = path
        self._workload_checked_s = float("-inf")
        self._refresh_workloads()

    def _refresh_workloads(self) -> None:
        now_s = self._clock()
        if self._workload_file is None or now_s - self._workload_checked_s < 1.0:
            return
        self._workload_checked_s = now_s
        try:
            try:
                stat = self._workload_file.stat()
                stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp is not None and stamp == self._workload_stamp:
                return
            wanted = parse_workloads(self._workload_file.read_text()) if stamp is not None else {}
        except (OSError, ValueError) as error:
            log.warning("cannot read the simulated workload file", extra={"path": str(self._workload_file), "error": str(error)})
            return
        self._workload_stamp = stamp
        for gpu in self._gpus:
            gpu.workload = wanted.get(gpu.info.uuid, physics.IDLE)

    def set_inlet_c(self, inlet_c: float, index: int | None = None) -> None:
        """Inlet air temperature of one GPU, or of all of them (``index=None``)."""
        self._advance()
        for gpu in self._gpus if index is None else [self._gpu(index)]:
            gpu.inlet_c = inlet_c

    def set_pids(self, index: int, pids: Iterable[int]) -> None:
        """Host PIDs reported as the GPU's compute processes."""
        self._gpu(index).pids = list(pids)

    def set_out_of_band_limit_w(self, index: int, watts: float | None) -> None:
        """Another limiter holds the enforced limit at most ``watts`` (None removes it)."""
        self._advance()
        self._gpu(index).limiter_w = watts

    def inject_error(
        self, operation: str, error: type[GpuError] | None, *, index: int | None = None
    ) -> None:
        """Make ``operation`` (a GpuBackend method name) raise ``error`` for GPU ``index``
        (None: every GPU, and ``devices``); ``error=None`` removes the injection.
        ``devices`` for one GPU: it fails enumeration (left out of :meth:`devices`, listed
        by :meth:`unenumerated`) until the injection is removed."""
        if operation not in OPERATIONS:
            raise ValueError(f"operation: must be one of {', '.join(OPERATIONS)}")
        if error is None:
            self._errors.pop((operation, index), None)
        else:
            self._errors[(operation, index)] = error

    def state(self, index: int) -> GpuState:
        """Physics state now: power, temperature, energy and generated tokens."""
        self._advance()
        return self._gpu(index).state

    def _gpu(self, index: int) -> _SimulatedGpu:
        if not 0 <= index < len(self._gpus):
            raise InvalidArgument("no such GPU", index=index)
        return self._gpus[index]

    def _advance(self) -> None:
        """Bring every GPU up to ``clock()`` in steps of at most ``max_step_s`` (under the
        workload file's workloads as of now: a change is seen when asked)."""
        self._refresh_workloads()
        now_s = self._clock()
        remaining_s = now_s - self._last_s
        while remaining_s > 1e-12:
            dt_s = min(remaining_s, self._max_step_s)
            for gpu in self._gpus:
                if not gpu.lost:
                    self._step(gpu, dt_s)
            remaining_s -= dt_s
        self._last_s = max(self._last_s, now_s)

    @staticmethod
    def _step(gpu: _SimulatedGpu, dt_s: float) -> None:
        gpu.state = physics.advance(
            gpu.model, gpu.state, gpu.enforced_limit_w, gpu.workload, gpu.inlet_c, dt_s
        )
        if gpu.state.temperature_c >= gpu.model.shutdown_c:
            gpu.lost = True
            log.error(
                "simulated GPU reached its shutdown temperature and is lost",
                extra={"gpu_index": gpu.info.index, "temperature_c": gpu.state.temperature_c},
            )

    def _enter(self, operation: str, index: int) -> _SimulatedGpu:
        """Advance time, then fail as real hardware would: injected error, lost GPU."""
        self._advance()
        gpu = self._gpu(index)
        error = self._errors.get((operation, index)) or self._errors.get((operation, None))
        if error is not None:
            raise error(f"injected {error.__name__} in {operation}", index=index)
        if gpu.lost:
            raise GpuLost("GPU is lost", index=index)
        return gpu

    # -- GpuBackend ------------------------------------------------------------------
    def devices(self) -> list[GpuInfo]:
        error = self._errors.get(("devices", None))
        if error is not None:
            raise error("injected error in devices")
        return [gpu.info for gpu in self._gpus if ("devices", gpu.info.index) not in self._errors]

    def unenumerated(self) -> dict[int, str]:
        return {
            index: f"{error.__name__}: injected" for (operation, index), error in self._errors.items()
            if operation == "devices" and index is not None
        }

    def power_limit_w(self, index: int) -> float:
        return self._enter("power_limit_w", index).requested_limit_w

    def snapshot(self, index: int) -> GpuSnapshot:
        gpu = self._enter("snapshot", index)
        return GpuSnapshot(
            index=index,
            uuid=gpu.info.uuid,
            power_w=gpu.state.power_w,
            limit_w=gpu.enforced_limit_w,
            requested_limit_w=gpu.requested_limit_w,
            min_limit_w=gpu.model.min_limit_w,
            max_limit_w=gpu.model.max_limit_w,
            default_limit_w=gpu.model.default_limit_w,
            temperature_c=gpu.state.temperature_c,
            slowdown_c=gpu.model.slowdown_c,
            shutdown_c=gpu.model.shutdown_c,
        )

    def set_power_limit_w(self, index: int, watts: float) -> float:
        gpu = self._enter("set_power_limit_w", index)
        limit_mw = validated_limit_mw(
            index, watts, round(gpu.model.min_limit_w * 1000), round(gpu.model.max_limit_w * 1000)
        )
        current_mw = round(gpu.requested_limit_w * 1000)
        if current_mw != limit_mw:
            gpu.requested_limit_w = limit_mw / 1000
            self.set_calls += 1
            log_limit_change(index, current_mw / 1000, limit_mw / 1000, gpu.enforced_limit_w)
        return gpu.enforced_limit_w

    def compute_pids(self, index: int) -> list[int]:
        return list(self._enter("compute_pids", index).pids)

    def total_energy_j(self, index: int) -> float:
        return self._enter("total_energy_j", index).state.energy_j


def parse_workloads(text: str) -> dict[str, Workload]:
    """A workload file's GPU UUID -> Workload; ValueError naming what is wrong."""
    document = json.loads(text)
    if not isinstance(document, Mapping):
        raise ValueError("expected a JSON object of GPU UUID -> {load, prefillShare}")
    workloads = {}
    for uuid, entry in document.items():
        load = entry.get("load") if isinstance(entry, Mapping) else None
        share = entry.get("prefillShare", 0.0) if isinstance(entry, Mapping) else None
        if not isinstance(load, (int, float)) or not 0 <= load <= 1:
            raise ValueError(f"{uuid}.load: expected a number from 0 to 1")
        if not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"{uuid}.prefillShare: expected a number from 0 to 1")
        workloads[uuid] = Workload(load=float(load), prefill_share=float(share))
    return workloads
