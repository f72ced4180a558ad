"""How much energy each GPU used, for ``powercap_gpu_energy_joules_total``.

NVML's total energy counter (millijoules since the driver loaded; Volta and newer) is the
measurement, but reading it costs ~3 ms per GPU, so each GPU's is read at most every
``read_interval_s`` and the counter holds in between. A GPU whose NVML has no such counter
(``NotSupported``) has its power integrated over the ticks instead, by trapezoids between
consecutive readings; the agent logs once per GPU that it does. An NVML counter that went
backwards (the driver was reloaded) counts from zero again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nodeagent.gpus import GpuBackend, GpuError, GpuSnapshot, NotSupported

log = logging.getLogger(__name__)

ENERGY_READ_INTERVAL_S = 5.0


@dataclass
class _GpuEnergy:
    integrated: bool = False
    counter_j: float | None = None  # NVML's counter at its last read
    next_read_s: float = 0.0
    power_w: float | None = None  # the last reading, for the next trapezoid
    read_at_s: float = 0.0


class EnergyMeter:
    """Energy per GPU, as increments since the previous call."""

    def __init__(self, backend: GpuBackend, read_interval_s: float = ENERGY_READ_INTERVAL_S) -> None:
        self._backend = backend
        self._read_interval_s = read_interval_s
        self._gpus: dict[str, _GpuEnergy] = {}

    def used_since_last_j(self, reading: GpuSnapshot, now_s: float) -> float:
        """Joules the GPU used since the previous call for it (0 on the first)."""
        gpu = self._gpus.setdefault(reading.uuid, _GpuEnergy(next_read_s=now_s))
        used_j = 0.0
        if not gpu.integrated and now_s >= gpu.next_read_s:
            used_j = self._read_counter(reading, gpu, now_s)
        if gpu.integrated and gpu.power_w is not None:
            used_j = (gpu.power_w + reading.power_w) / 2 * max(0.0, now_s - gpu.read_at_s)
        gpu.power_w, gpu.read_at_s = reading.power_w, now_s
        return used_j

    def _read_counter(self, reading: GpuSnapshot, gpu: _GpuEnergy, now_s: float) -> float:
        gpu.next_read_s = now_s + self._read_interval_s
        try:
            counter_j = self._backend.total_energy_j(reading.index)
        except NotSupported:
            gpu.integrated = True
            log.info("GPU has no NVML energy counter: integrating its power over the ticks",
                     extra={"gpu": reading.uuid, "gpu_index": reading.index})
            return 0.0
        except GpuError as error:  # read again at the next interval; the counter holds meanwhile
            log.debug("NVML energy counter not read", extra={"gpu": reading.uuid, "error": str(error)})
            return 0.0
        previous_j, gpu.counter_j = gpu.counter_j, counter_j
        if previous_j is None:
            return 0.0
        return counter_j - previous_j if counter_j >= previous_j else counter_j
