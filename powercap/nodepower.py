"""Whole-node power: what each source's document says, and which reading a tick uses.

Pure: the node agent's edge (:mod:`nodeagent.nodepower`) fetches the documents and runs
the commands; everything here turns their text into watts or chooses among readings.

Sources, by name (the ``source`` of the telemetry's ``nodePower``):

- ``redfish``: the BMC's chassis. ``EnvironmentMetrics.PowerWatts.Reading`` where the
  chassis links an ``EnvironmentMetrics`` (Redfish 2021.2 and later), else the first
  ``Power.PowerControl[]`` entry with a ``PowerConsumedWatts`` (the deprecated but
  universal ``Power`` resource; its first entry is the chassis input power on every
  mockup and server seen; later entries are sub-domains of it, so they are never summed).
- ``ipmi-dcmi``: DCMI Get Power Reading as ``ipmitool dcmi power reading`` prints it:
  ``Instantaneous power reading: 332 Watts``; a reading whose ``Power reading state is:
  deactivated`` is refused (the BMC does not measure, the number means nothing).
- ``kepler``: Kepler's exporter. ``kepler_node_platform_joules_total`` (Kepler before
  0.10, summed over its ``mode`` label: idle + dynamic) is a counter in joules, turned
  into watts by the rate between two scrapes; ``kepler_platform_watts`` (Kepler 0.10 and
  later, a gauge per Redfish ``PowerControl``) is read directly, taking the largest
  sample, since sub-domain entries are parts of the chassis entry. A Kepler whose
  ``kepler_node_info`` says ``platform_power_source="none"`` only models the platform:
  refused.
- ``estimate``: the GPUs' power plus a configured per-node overhead, always available,
  never a measurement.

Choosing (:func:`choose_node_power`), per tick, over the configured sources in priority
order: the first whose latest reading is no older than ``max_age_s`` and not below
``GPU_FLOOR_FRACTION`` of the GPUs' own power (a node draws at least what its GPUs draw:
a lower reading is the wrong chassis or a broken sensor, and using it would let a rack
look emptier than it is); otherwise the estimate ``sum of GPU power + overhead_w``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REDFISH = "redfish"
IPMI_DCMI = "ipmi-dcmi"
KEPLER = "kepler"
ESTIMATE = "estimate"
MEASURED_SOURCES = (REDFISH, IPMI_DCMI, KEPLER)
SOURCES = (*MEASURED_SOURCES, ESTIMATE)

MAX_PLAUSIBLE_W = 100_000.0
"""No one server draws 100 kW: a reading above is a unit error (mW) or garbage."""
GPU_FLOOR_FRACTION = 0.8
"""A node reading under this share of the GPUs' power is refused (module docstring). Not
1.0: the BMC averages over a second or more, NVML over 100 ms."""

KEPLER_PLATFORM_JOULES = "kepler_node_platform_joules_total"
KEPLER_PLATFORM_WATTS = "kepler_platform_watts"
KEPLER_NODE_INFO = "kepler_node_info"


class PowerDocumentError(ValueError):
    """A source's document holds no usable power reading; the message says why."""


@dataclass(frozen=True)
class NodePower:
    """Whole-node power as the telemetry carries it: ``watts`` from ``source``, read
    ``age_s`` seconds before the telemetry's timestamp."""

    watts: float
    source: str
    age_s: float

    @property
    def estimated(self) -> bool:
        return self.source == ESTIMATE


@dataclass(frozen=True)
class SourceReading:
    """The latest reading of one source: ``watts`` read at ``at_s`` (monotonic), or
    ``problem`` when its last attempt failed (``watts`` is then None)."""

    source: str
    watts: float | None
    at_s: float
    problem: str | None = None


@dataclass(frozen=True)
class NodePowerChoice:
    """The node power a tick uses, and why each source before it was passed over."""

    power: NodePower
    passed_over: tuple[tuple[str, str], ...] = ()


def checked_watts(value: Any, where: str) -> float:
    """``value`` as watts: a finite number in [0, 100 kW]; :class:`PowerDocumentError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = "null" if value is None else repr(value)
        raise PowerDocumentError(f"{where} is {shown}, not a number of watts")
    if not 0 <= value <= MAX_PLAUSIBLE_W:  # NaN and infinities fail it too; an int of any size compares
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise PowerDocumentError(f"{where} = {shown} W is out of range (0..{MAX_PLAUSIBLE_W:g})")
    return float(value)


# -- Redfish ---------------------------------------------------------------------------------
def _odata_id(link: Any) -> str | None:
    if isinstance(link, Mapping) and isinstance(link.get("@odata.id"), str) and link["@odata.id"]:
        return str(link["@odata.id"])
    return None


def redfish_members(collection: Mapping[str, Any]) -> list[str]:
    """The ``@odata.id`` of every member of a Redfish collection (``/redfish/v1/Chassis``)."""
    members = collection.get("Members")
    if not isinstance(members, list):
        raise PowerDocumentError("the collection has no Members list")
    return [uri for uri in (_odata_id(member) for member in members) if uri]


@dataclass(frozen=True)
class ChassisPowerLinks:
    """Where a chassis keeps its power reading; None where it has no such resource."""

    environment_metrics: str | None
    power: str | None

    def in_preference_order(self) -> list[str]:
        return [uri for uri in (self.environment_metrics, self.power) if uri]


def redfish_chassis_links(chassis: Mapping[str, Any]) -> ChassisPowerLinks:
    """The ``EnvironmentMetrics`` and ``Power`` links of a Chassis resource."""
    return ChassisPowerLinks(_odata_id(chassis.get("EnvironmentMetrics")), _odata_id(chassis.get("Power")))


def redfish_power_watts(document: Mapping[str, Any]) -> float:
    """Watts of an ``EnvironmentMetrics`` (``PowerWatts.Reading``) or a ``Power``
    resource (the first ``PowerControl[]`` with ``PowerConsumedWatts``), whichever
    ``document`` is (module docstring)."""
    if "PowerWatts" in document:
        power_watts = document.get("PowerWatts")
        if not isinstance(power_watts, Mapping):
            raise PowerDocumentError("EnvironmentMetrics PowerWatts is not an object")
        return checked_watts(power_watts.get("Reading"), "EnvironmentMetrics PowerWatts.Reading")
    controls = document.get("PowerControl")
    if not isinstance(controls, list) or not controls:
        raise PowerDocumentError("neither EnvironmentMetrics PowerWatts nor Power PowerControl[] in the document")
    problems = []
    for position, control in enumerate(controls):
        where = f"Power PowerControl[{position}].PowerConsumedWatts"
        if not isinstance(control, Mapping):
            problems.append(f"PowerControl[{position}] is not an object")
            continue
        try:
            return checked_watts(control.get("PowerConsumedWatts"), where)
        except PowerDocumentError as error:
            problems.append(str(error))
    raise PowerDocumentError("; ".join(problems))


# -- IPMI DCMI (ipmitool) ----------------------------------------------------------------------
_DCMI_READING = re.compile(r"^\s*Instantaneous power reading:\s*(\S+)\s+Watts\s*$", re.MULTILINE)
_DCMI_STATE = re.compile(r"^\s*Power reading state is:\s*(\w+)", re.MULTILINE)


def dcmi_power_watts(output: str) -> float:
    """The instantaneous power of ``ipmitool dcmi power reading``'s output (module docstring)."""
    state = _DCMI_STATE.search(output)
    if state is not None and state.group(1).lower() != "activated":
        raise PowerDocumentError(f"the BMC's power reading state is {state.group(1)!r}: it does not measure")
    match = _DCMI_READING.search(output)
    if match is None:
        raise PowerDocumentError("no 'Instantaneous power reading: N Watts' line in ipmitool's output")
    try:
        value: Any = int(match.group(1))
    except ValueError:
        value = match.group(1)
    return checked_watts(value, "DCMI instantaneous power reading")


# -- Kepler ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpositionSample:
    """One sample of a Prometheus exposition (the edge parses the text)."""

    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class KeplerPlatform:
    """What a Kepler exposition says of the whole node: a counter in joules (turned into
    watts by a rate) or a gauge in watts; exactly one is set."""

    joules: float | None = None
    watts: float | None = None


def kepler_platform(samples: Iterable[ExpositionSample]) -> KeplerPlatform:
    """The platform figure of a Kepler exposition (module docstring)."""
    joules: list[float] = []
    watts: list[float] = []
    for sample in samples:
        if sample.name == KEPLER_NODE_INFO and sample.labels.get("platform_power_source") == "none":
            raise PowerDocumentError('Kepler measures no platform power on this node (platform_power_source="none")')
        if sample.name == KEPLER_PLATFORM_JOULES:
            joules.append(_finite(sample, "joules"))
        elif sample.name == KEPLER_PLATFORM_WATTS:
            watts.append(checked_watts(sample.value, KEPLER_PLATFORM_WATTS))
    if watts:
        return KeplerPlatform(watts=max(watts))
    if joules:
        return KeplerPlatform(joules=sum(joules))
    raise PowerDocumentError(f"neither {KEPLER_PLATFORM_JOULES} nor {KEPLER_PLATFORM_WATTS} in Kepler's metrics")


def _finite(sample: ExpositionSample, unit: str) -> float:
    if not math.isfinite(sample.value) or sample.value < 0:
        raise PowerDocumentError(f"{sample.name} = {sample.value!r} {unit} is not a counter value")
    return sample.value


def joules_rate_watts(previous_j: float, previous_at_s: float, current_j: float, current_at_s: float) -> float | None:
    """Watts from two readings of an energy counter: ``(E2 - E1) / (t2 - t1)``; None when
    no time passed or the counter went down (Kepler restarted: wait for the next pair)."""
    elapsed_s = current_at_s - previous_at_s
    if elapsed_s <= 0 or current_j < previous_j:
        return None
    return checked_watts((current_j - previous_j) / elapsed_s, f"{KEPLER_PLATFORM_JOULES} rate")


# -- choosing ----------------------------------------------------------------------------------
def choose_node_power(
    readings: Sequence[SourceReading],
    now_s: float,
    *,
    max_age_s: float,
    gpu_power_w: float,
    overhead_w: float,
) -> NodePowerChoice:
    """The first usable reading of ``readings`` (priority order), else the estimate::

        usable:    watts is not None, now_s - at_s <= max_age_s,
                   watts >= GPU_FLOOR_FRACTION x gpu_power_w
        estimate:  gpu_power_w + overhead_w, age 0
    """
    passed_over: list[tuple[str, str]] = []
    for reading in readings:
        age_s = max(0.0, now_s - reading.at_s)
        if reading.watts is None:
            passed_over.append((reading.source, reading.problem or "no reading yet"))
        elif age_s > max_age_s:
            passed_over.append((reading.source, f"reading {age_s:.0f} s old (limit {max_age_s:g} s)"))
        elif reading.watts < GPU_FLOOR_FRACTION * gpu_power_w:
            passed_over.append(
                (reading.source, f"{reading.watts:g} W is below the GPUs' own {gpu_power_w:g} W")
            )
        else:
            return NodePowerChoice(NodePower(reading.watts, reading.source, age_s), tuple(passed_over))
    return NodePowerChoice(NodePower(gpu_power_w + overhead_w, ESTIMATE, 0.0), tuple(passed_over))
