"""Node telemetry: the JSON the node agent writes to its Node and the extender reads.

Annotation ``powercapping.example.com/telemetry`` on the Node, one JSON object::

    {"timestamp": "2026-11-27T23:19:01.250Z",   RFC 3339, UTC, when the agent read the GPUs
     "powerW": 2810.5,                          sum of the node's GPU power, W
     "inletTemperatureC": 24.5,                 rack inlet air at this node, °C, or null
     "gpus": [{"uuid": "GPU-...", "index": 0,
               "powerW": 351.2, "limitW": 400, "minW": 200, "maxW": 700,
               "temperatureC": 61, "pod": "inference/llama-0",   pod is null when idle
               "tokensPerSecond": 912.4,                          generated tokens/s, or null
               "requestsWaiting": 0}],                            the pod's queue; absent when unknown
     "nodePower": {"watts": 4210, "source": "redfish", "ageS": 2.4}}   whole node; absent from older agents

``powerW`` stays the sum of the GPUs' power. ``nodePower`` is the whole node's power (GPUs,
CPUs, fans, everything behind its power supplies) from ``source``: ``redfish`` (the BMC),
``ipmi-dcmi`` (DCMI power reading), ``kepler`` (Kepler's exporter) or ``estimate`` (the
GPUs' power plus a configured per-node overhead: not a measurement); ``ageS`` is how old
the reading was at ``timestamp``, so it was taken at ``timestamp - ageS``
(:mod:`powercap.nodepower`). A reader that knows a newer source name keeps it as written.

``tokensPerSecond`` is the share of the named pod's generated tokens/s that this GPU
produces: a pod on several GPUs (tensor parallel) has its tokens/s split across them in
proportion to their power, ``pod tokens/s x GPU power / power of the pod's GPUs`` (evenly
when they all draw 0 W), so that summing the GPUs of a service gives the service's
tokens/s and the power it takes to make them. It is null (or absent, from an older agent)
when ``pod`` is null, no policy owns the pod, the pod exposes no metrics, or no rate was
scraped yet; it is never negative. The budget controller divides the sum by the same GPUs'
power for the policy's ``status.ratio`` (tokens per joule).

``requestsWaiting`` is the number of requests the named pod holds in its queue, not yet
running (vLLM's ``vllm:num_requests_waiting`` gauge, summed over its label sets), the same
for each GPU of the pod. It is absent when unknown (no pod, no policy, no metrics, no
scrape yet, or an agent older than this field). A pod with requests waiting is saturated:
every GPU of it would serve more with more power, even while drawing below its cap (a
replica whose decode is memory-bound draws less than a compute-bound prefill); the
budget controller counts its GPUs as pinned (:mod:`powercap.allocation`, step 2).

``raisedToW`` is set on the one publish right after the agent raised a GPU's limit: the
limit now in force, while ``limitW`` still gives the limit the power beside it was read
under (the controller judges "pinned" by the two; :func:`powercap.agentplan.raised_caps`).
The controller counts the GPU at the higher of the two as in force. Absent otherwise.

Unknown keys are ignored when reading, so a newer agent can add fields without breaking an
older extender. A malformed annotation is reported as :class:`TelemetryError`; the reader
treats that node as having no telemetry (and says why), never as a crash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeGuard

from powercap import API_GROUP
from powercap.numeric import LARGEST_FLOAT_INT, is_finite_number
from powercap.nodepower import NodePower

TELEMETRY_ANNOTATION = f"{API_GROUP}/telemetry"
# A node's telemetry is stale when older than this (the agent publishes at least every 30 s).
DEFAULT_STALE_AFTER_S = 90.0


class TelemetryError(ValueError):
    """The telemetry annotation cannot be read; the message says what is wrong."""


@dataclass(frozen=True)
class GpuTelemetry:
    uuid: str
    index: int
    power_w: float
    limit_w: float
    min_w: float
    max_w: float
    temperature_c: float | None = None
    pod: str | None = None
    tokens_s: float | None = None
    requests_waiting: int | None = None
    raised_to_w: float | None = None


@dataclass(frozen=True)
class NodeTelemetry:
    timestamp: datetime
    power_w: float
    inlet_temperature_c: float | None
    gpus: tuple[GpuTelemetry, ...] = ()
    node_power: NodePower | None = None  # None: an agent without a node power source (older)

    def age_s(self, now: datetime) -> float:
        return (now - self.timestamp).total_seconds()

    def is_fresh(self, now: datetime, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> bool:
        return self.age_s(now) <= stale_after_s


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with millisecond precision: ``2026-11-27T23:19:01.250Z``."""
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 date-time (``Z`` or an offset, any fraction of a second) as a
    datetime; naive when the text has no zone. Raises ``ValueError`` on anything else."""
    normalised = text.strip()
    if normalised.endswith(("Z", "z")):
        normalised = normalised[:-1] + "+00:00"
    head, dot, tail = normalised.partition(".")
    if dot:  # Python 3.10's fromisoformat takes exactly 3 or 6 fractional digits; Go writes up to 9
        digits = len(tail) - len(tail.lstrip("0123456789"))
        normalised = f"{head}.{(tail[:digits] + '000000')[:6]}{tail[digits:]}"
    return datetime.fromisoformat(normalised)


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp (``Z`` or an offset, any fraction of a second) as an aware datetime."""
    if not isinstance(text, str):
        raise TelemetryError(f"timestamp must be an RFC 3339 string, not {type(text).__name__}")
    try:
        moment = parse_rfc3339(text)
    except ValueError:
        raise TelemetryError(f"timestamp {text!r} is not RFC 3339") from None
    if moment.tzinfo is None:
        raise TelemetryError(f"timestamp {text!r} has no time zone")
    return moment


def to_json(telemetry: NodeTelemetry) -> str:
    """The compact annotation value: :func:`to_document` as JSON."""
    return json.dumps(to_document(telemetry), separators=(",", ":"))


def to_document(telemetry: NodeTelemetry) -> dict[str, Any]:
    """The telemetry document as a JSON-able mapping: the annotation's object, and the
    ``status`` of the node's PowerCapNode (:mod:`powercap.nodeobjects`)."""
    document: dict[str, Any] = {
        "timestamp": format_timestamp(telemetry.timestamp),
        "powerW": _round(telemetry.power_w),
        "inletTemperatureC": None if telemetry.inlet_temperature_c is None else _round(telemetry.inlet_temperature_c),
        "gpus": [_gpu_document(gpu) for gpu in telemetry.gpus],
    }
    if telemetry.node_power is not None:
        document["nodePower"] = {
            "watts": _round(telemetry.node_power.watts),
            "source": telemetry.node_power.source,
            "ageS": _round(telemetry.node_power.age_s),
        }
    return document


def _gpu_document(gpu: GpuTelemetry) -> dict[str, Any]:
    document = {
        "uuid": gpu.uuid,
        "index": gpu.index,
        "powerW": _round(gpu.power_w),
        "limitW": _round(gpu.limit_w),
        "minW": _round(gpu.min_w),
        "maxW": _round(gpu.max_w),
        "temperatureC": None if gpu.temperature_c is None else _round(gpu.temperature_c),
        "pod": gpu.pod,
        "tokensPerSecond": None if gpu.tokens_s is None else _round(gpu.tokens_s),
    }
    if gpu.requests_waiting is not None:
        document["requestsWaiting"] = gpu.requests_waiting
    if gpu.raised_to_w is not None:
        document["raisedToW"] = _round(gpu.raised_to_w)
    return document


def _round(value: float) -> float | int:
    rounded = round(float(value), 1)
    return int(rounded) if rounded.is_integer() else rounded


def from_json(text: str) -> NodeTelemetry:
    """Parse the annotation value; raises :class:`TelemetryError` naming the bad field."""
    try:
        document = json.loads(text)
    except (TypeError, ValueError) as error:
        raise TelemetryError(f"not JSON: {error}") from None
    return from_document(document)


def queued_uuids(document: Any) -> frozenset[str]:
    """The UUIDs of the GPUs a telemetry document shows with requests waiting (a positive
    whole ``requestsWaiting``), read without parsing the rest: the budget controller asks
    this of every PowerCapNode event to run a round early when a queue forms. Whatever is
    malformed counts as no queue (the round's full parse reports it)."""
    gpus = document.get("gpus") if isinstance(document, Mapping) else None
    if not isinstance(gpus, list):
        return frozenset()
    return frozenset(
        gpu["uuid"] for gpu in gpus
        if isinstance(gpu, Mapping) and isinstance(gpu.get("uuid"), str)
        and type(gpu.get("requestsWaiting")) is int and gpu["requestsWaiting"] > 0
    )


def from_document(document: Any) -> NodeTelemetry:
    """Parse a telemetry document (the annotation's JSON object, or a PowerCapNode's
    ``status``); raises :class:`TelemetryError` naming the bad field."""
    if not isinstance(document, Mapping):
        raise TelemetryError("must be a JSON object")
    gpus_raw = document.get("gpus", [])
    if not isinstance(gpus_raw, list):
        raise TelemetryError("gpus must be a list")
    gpus = tuple(_parse_gpu(gpu, index) for index, gpu in enumerate(gpus_raw))
    return NodeTelemetry(
        timestamp=parse_timestamp(document.get("timestamp")),  # type: ignore[arg-type]
        power_w=_number(document, "powerW", "powerW"),
        inlet_temperature_c=_optional_number(document, "inletTemperatureC", "inletTemperatureC"),
        gpus=gpus,
        node_power=_parse_node_power(document.get("nodePower")),
    )


def _parse_node_power(raw: Any) -> NodePower | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise TelemetryError("nodePower must be an object")
    source = raw.get("source")
    if not isinstance(source, str) or not source:
        raise TelemetryError("nodePower.source must be a non-empty string")
    watts = _number(raw, "watts", "nodePower.watts")
    age_s = _number(raw, "ageS", "nodePower.ageS")
    for value, where in ((watts, "nodePower.watts"), (age_s, "nodePower.ageS")):
        if value < 0:
            raise TelemetryError(f"{where} must not be negative")
    return NodePower(watts=watts, source=source, age_s=age_s)


def _parse_gpu(raw: Any, position: int) -> GpuTelemetry:
    """One ``gpus[]`` entry: a well-formed one (as every agent writes it) is checked in one
    expression; any other goes through :func:`_parse_gpu_checked`, which names what is wrong.
    The controller parses each node that published, every round (10,000 GPUs: 80,000
    fields a round)."""
    if type(raw) is dict:
        get = raw.get
        uuid, index, pod = get("uuid"), get("index", position), get("pod")
        power_w, limit_w, min_w, max_w = get("powerW"), get("limitW"), get("minW"), get("maxW")
        temperature_c, tokens_s, waiting, raised_to_w = get("temperatureC"), get("tokensPerSecond"), get("requestsWaiting"), get("raisedToW")
        if (
            type(uuid) is str and uuid and type(index) is int and index >= 0
            and (pod is None or type(pod) is str and "/" in pod)
            and _plain(power_w) and _plain(limit_w) and _plain(min_w) and _plain(max_w)
            and (temperature_c is None or _plain(temperature_c))
            and (tokens_s is None or _plain(tokens_s) and tokens_s >= 0)
            and (waiting is None or type(waiting) is int and waiting >= 0)
            and (raised_to_w is None or _plain(raised_to_w) and raised_to_w >= 0)
        ):
            return GpuTelemetry(
                uuid, index, float(power_w), float(limit_w), float(min_w), float(max_w),
                None if temperature_c is None else float(temperature_c), pod,
                None if tokens_s is None else float(tokens_s), waiting,
                None if raised_to_w is None else float(raised_to_w),
            )
    return _parse_gpu_checked(raw, position)


def _plain(value: Any) -> TypeGuard[float]:
    """A JSON number :func:`_checked_number` accepts (int or float, finite, not below absolute zero)."""
    if type(value) is float:
        return math.isfinite(value) and value >= -273.15
    return type(value) is int and -273.15 <= value <= LARGEST_FLOAT_INT


def _parse_gpu_checked(raw: Any, position: int) -> GpuTelemetry:
    where = f"gpus[{position}]"
    if not isinstance(raw, Mapping):
        raise TelemetryError(f"{where} must be an object")
    uuid = raw.get("uuid")
    if not isinstance(uuid, str) or not uuid:
        raise TelemetryError(f"{where}.uuid must be a non-empty string")
    index = raw.get("index", position)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise TelemetryError(f"{where}.index must be a non-negative integer")
    pod = raw.get("pod")
    if pod is not None and (not isinstance(pod, str) or "/" not in pod):
        raise TelemetryError(f"{where}.pod must be \"namespace/name\" or null")
    return GpuTelemetry(
        uuid=uuid,
        index=index,
        power_w=_number(raw, "powerW", f"{where}.powerW"),
        limit_w=_number(raw, "limitW", f"{where}.limitW"),
        min_w=_number(raw, "minW", f"{where}.minW"),
        max_w=_number(raw, "maxW", f"{where}.maxW"),
        temperature_c=_optional_number(raw, "temperatureC", f"{where}.temperatureC"),
        pod=pod,
        tokens_s=_optional_rate(raw, "tokensPerSecond", f"{where}.tokensPerSecond"),
        requests_waiting=_optional_count(raw, "requestsWaiting", f"{where}.requestsWaiting"),
        raised_to_w=_optional_rate(raw, "raisedToW", f"{where}.raisedToW"),
    )


def _number(raw: Mapping[str, Any], key: str, where: str) -> float:
    value = raw.get(key)
    if value is None:
        raise TelemetryError(f"{where} is required")
    return _checked_number(value, where)


def _optional_number(raw: Mapping[str, Any], key: str, where: str) -> float | None:
    value = raw.get(key)
    return None if value is None else _checked_number(value, where)


def _optional_rate(raw: Mapping[str, Any], key: str, where: str) -> float | None:
    """A non-negative number or null/absent (a rate: tokens/s)."""
    value = _optional_number(raw, key, where)
    if value is not None and value < 0:
        raise TelemetryError(f"{where} must not be negative")
    return value


def _optional_count(raw: Mapping[str, Any], key: str, where: str) -> int | None:
    """A non-negative whole number or null/absent (a gauge of requests)."""
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TelemetryError(f"{where} must be a non-negative integer")
    return value


def _checked_number(value: Any, where: str) -> float:
    if not is_finite_number(value):
        raise TelemetryError(f"{where} must be a finite number")
    if value < -273.15:
        raise TelemetryError(f"{where} is out of range")
    return float(value)


def node_telemetry(node: Mapping[str, Any]) -> NodeTelemetry | None:
    """The telemetry of a Node object, or None when it has none.

    Raises :class:`TelemetryError` when the annotation is present but malformed.
    """
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(TELEMETRY_ANNOTATION)
    if text is None:
        return None
    return from_json(text)
