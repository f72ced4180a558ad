"""The status the budget controller writes on a PowerCappingPolicy, and its conditions.

Pure: :func:`render_status` turns a :class:`StatusInputs` (what one controller round
computed and measured for a policy) and the status currently stored into the status to
store. It is built so that a steady cluster produces the *same* status round after round,
and the controller writes only when something an operator would care about changed:

- **Measurements settle.** ``powerW``, ``ratio`` and each rack's ``powerW`` and
  ``temperatureC`` keep their stored value while the new reading is within a tolerance of
  it (power: ``max(10 W, 2 %)`` of the policy's cap or the rack's reading; ratio: 2 % of
  the stored ratio; temperature: 0.5 °C). Readings move on every tick; a status write on
  every tick would be a write storm. Power is whole watts, temperature one decimal, the
  ratio (tokens per joule) three significant digits (``2.47``, ``0.0815``).
- **Conditions** (metav1.Condition) are ``Ready``, ``Feasible`` and ``Enforced``;
  ``lastTransitionTime`` moves only when a condition's ``status`` changes. Messages use
  the settled figures, so they do not change with every reading either.
- Allocations are those of :mod:`powercap.allocation` (whose deadband keeps caps steady).

Reasons, and what a person does about them:

========== ===================== =========================================================
condition  reason                meaning
========== ===================== =========================================================
Feasible   BudgetCoversMinimums  the budget covers every GPU's NVML minimum
Feasible   NoGPUs                no pod of the service runs on a GPU yet
Feasible   Infeasible            minimums exceed the budget: raise powerCapLimit or run
                                 fewer GPUs (the message says by how much)
Feasible   RackInfeasible        a rack cannot hold its GPUs' minimums plus its other load
Enforced   AllocationApplied     every reporting GPU runs at or under its allocation
Enforced   ObserveMode           mode is Observe: nothing is set (False, by design)
Enforced   AgentsLagging         GPUs run above their allocation: look at those agents
Enforced   TelemetryStale        nodes of the service do not report: their GPUs are held
                                 at their last caps; look at those agents
Ready      WithinCap             feasible, enforced, measured power within powerCapLimit
Ready      OverCap               measured power above powerCapLimit
Ready      (Feasible's or Enforced's reason when that one is False)
========== ===================== =========================================================

**Events** (:func:`transitions`): one per condition that changed, Warning unless the new
condition is healthy. Its reason is the condition's, except for Ready: ``Ready`` or
``NotReady`` (with the condition's reason in the note), so that an infeasible policy shows
one ``Infeasible`` Warning (Feasible) and one ``NotReady`` Warning (Ready), not two
``Infeasible`` ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from powercap.allocation import ServiceAllocation, budget_source
from powercap.numeric import agreeing, counted, is_finite_number
from powercap.policies import Mode, Policy

READY, FEASIBLE, ENFORCED = "Ready", "Feasible", "Enforced"
CONDITION_TYPES = (READY, FEASIBLE, ENFORCED)
# A reported limit this far above the published allocation counts as not applied:
# ``limit > allocation x (1 + LAG_TOLERANCE) + 1 W``.
LAG_TOLERANCE = 0.05
# Measurements settle within these tolerances (see the module docstring).
POWER_TOLERANCE = 0.02
POWER_TOLERANCE_FLOOR_W = 10.0
RATIO_TOLERANCE = 0.02
RATIO_DIGITS = 3  # significant digits of status.ratio
TEMPERATURE_TOLERANCE_C = 0.5
_LISTED = 3  # items named in a message before "and N more"


@dataclass(frozen=True)
class RackReading:
    """A constrained rack the service runs in, as measured: ``power_w`` is the whole rack
    (GPUs, the power beside them and assumed power), ``non_gpu_power_w`` the part beside
    the GPUs; ``power_source`` is ``Measured``, ``Estimated`` or ``PartlyEstimated``,
    ``estimated_nodes`` the nodes whose non-GPU power is estimated and ``estimate_problem``
    why (the first node's reason), ``node_overhead_w`` what a node without a usable reading
    counts beside its GPUs (see :func:`powercap.clusterviews.non_gpu_power`)."""

    rack_id: str
    power_w: float
    temperature_c: float | None
    non_gpu_power_w: float = 0.0
    power_source: str = "Measured"
    estimated_nodes: tuple[str, ...] = ()
    estimate_problem: str | None = None
    node_overhead_w: float = 0.0

    @property
    def warning(self) -> str | None:
        """Why the rack's powerW is (partly) an estimate and what to do; None when measured."""
        if not self.estimated_nodes:
            return None
        how = "an estimate" if self.power_source == "Estimated" else "partly an estimate"
        return (
            f"powerW is {how}: {self.estimate_problem}; such a node counts the larger of its reading and "
            f"{_w(self.node_overhead_w)} (--node-overhead-w) beside its GPUs. Give the node agents a node power "
            "source (Redfish, IPMI or Kepler: docs/nodeagent.md, Node power)"
        )


@dataclass(frozen=True)
class LaggingGpu:
    """A GPU whose reported limit is above the allocation its agent was given."""

    node: str
    uuid: str
    limit_w: float
    allocated_w: float


@dataclass(frozen=True)
class StatusInputs:
    """What one controller round knows about a policy.

    ``allocation``: this round's caps; ``power_w``: the service's measured power (fresh
    telemetry only; None when nothing reports); ``ratio``: its generated tokens per joule
    (fresh GPUs that report tokens/s; None when none does); ``gpus``: GPUs its bound pods use, reported
    or not; ``unreported_gpus``: those no telemetry lists yet; ``pending_reserved_gpus``:
    GPUs of its pods waiting for budget whose minimums the budget keeps free; ``silent_nodes``: why
    nodes hosting its GPUs have no fresh telemetry; ``rack_problems``: infeasible racks it
    runs in.
    """

    policy: Policy
    allocation: ServiceAllocation
    margin: float
    gpus: int
    power_w: float | None = None
    ratio: float | None = None
    racks: tuple[RackReading, ...] = ()
    rack_problems: tuple[str, ...] = ()
    lagging: tuple[LaggingGpu, ...] = ()
    silent_nodes: tuple[str, ...] = ()
    unreported_gpus: int = 0
    pending_reserved_gpus: int = 0


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str

    @property
    def healthy(self) -> bool:
        """True when nothing is wrong: a True condition, or Enforced=False in Observe mode."""
        return self.status == "True" or self.reason == "ObserveMode"


@dataclass(frozen=True)
class Transition:
    """A condition that changed (see :func:`transitions`): the controller records one Event for it."""

    condition: Condition
    previous_status: str | None
    previous_reason: str | None

    @property
    def event_type(self) -> str:
        return "Normal" if self.condition.healthy else "Warning"

    @property
    def event_reason(self) -> str:
        """The condition's reason; for Ready, ``Ready`` or ``NotReady``: Ready borrows the reason
        of Feasible or Enforced when one of them is False, and that one records its own Event."""
        if self.condition.type == READY:
            return "Ready" if self.condition.status == "True" else "NotReady"
        return self.condition.reason

    @property
    def note(self) -> str:
        """``Feasible is False: <message>``; the condition's reason in brackets where the Event's differs."""
        condition = self.condition
        reason = f" ({condition.reason})" if condition.reason != self.event_reason else ""
        return f"{condition.type} is {condition.status}{reason}: {condition.message}"


def format_time(moment: datetime) -> str:
    """metav1.Time: RFC 3339 in UTC, whole seconds."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def find_lagging(
    gpus: Iterable[tuple[str, str, float]], published_w: Mapping[str, float]
) -> tuple[LaggingGpu, ...]:
    """GPUs ``(node, uuid, reported limit W)`` running above the allocation published for
    them: ``limit > allocation x (1 + LAG_TOLERANCE) + 1 W``. GPUs with no published
    allocation are not judged (their agent may not have read one yet)."""
    lagging = []
    for node, uuid, limit_w in gpus:
        allocated_w = published_w.get(uuid)
        if allocated_w is not None and limit_w > allocated_w * (1 + LAG_TOLERANCE) + 1:
            lagging.append(LaggingGpu(node, uuid, limit_w, allocated_w))
    return tuple(sorted(lagging, key=lambda g: (g.node, g.uuid)))


def published_gpus(status: Mapping[str, Any] | None) -> Iterator[tuple[str | None, str, float]]:
    """``(node, uuid, watts)`` of each well-formed GPU entry of a stored status's
    ``allocations``, in order (``node`` None where its node entry names none); malformed
    entries are left out."""
    for entry in (status or {}).get("allocations") or ():
        if not isinstance(entry, Mapping):
            continue
        node = entry.get("node")
        node = node if isinstance(node, str) else None
        for gpu in entry.get("gpus") or ():
            if isinstance(gpu, Mapping) and isinstance(uuid := gpu.get("uuid"), str) and _is_number(gpu.get("watts")):
                yield node, uuid, float(gpu["watts"])


def published_allocations(status: Mapping[str, Any] | None) -> dict[str, float]:
    """``uuid -> watts`` of a stored status's ``allocations`` (ignores malformed entries)."""
    return {uuid: watts for _, uuid, watts in published_gpus(status)}


def allocations_field(allocation: ServiceAllocation) -> list[dict[str, Any]]:
    """``status.allocations``: per node (by name), its GPUs' caps (by UUID) and their sum."""
    return [
        {
            "node": node,
            "gpus": [{"uuid": cap.uuid, "watts": cap.cap_w} for cap in sorted(caps, key=lambda c: c.uuid)],
            "watts": sum(cap.cap_w for cap in caps),
        }
        for node, caps in allocation.by_node().items()
    ]


def render_status(inputs: StatusInputs, stored: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The status to store, given the one stored now (None or {} for a new policy)."""
    stored = stored or {}
    policy = inputs.policy
    power_w = _settle(_round_or_none(inputs.power_w, 0), stored.get("powerW"),
                      max(POWER_TOLERANCE_FLOOR_W, POWER_TOLERANCE * policy.power_cap_w))
    ratio = _settle(_significant_or_none(inputs.ratio, RATIO_DIGITS), stored.get("ratio"),
                    RATIO_TOLERANCE * abs(stored.get("ratio") or 0) if _is_number(stored.get("ratio")) else 0)
    conditions = build_conditions(inputs, power_w)
    status: dict[str, Any] = {
        "observedGeneration": policy.generation,
        "conditions": [
            _condition_field(c, _stored_condition(stored, c.type), policy.generation, now) for c in conditions
        ],
        "gpus": inputs.gpus,
    }
    if power_w is not None:
        status["powerW"] = power_w
    status["budgetW"] = inputs.allocation.budget_w
    if ratio is not None:
        status["ratio"] = ratio
    status["allocations"] = allocations_field(inputs.allocation)
    status["racks"] = _settled_racks(inputs.racks, stored.get("racks"))
    return status


def build_conditions(inputs: StatusInputs, power_w: float | None) -> tuple[Condition, Condition, Condition]:
    """Ready, Feasible and Enforced for these inputs, ``power_w`` being the (settled) measured power."""
    feasible = _feasible(inputs)
    enforced = _enforced(inputs)
    policy = inputs.policy
    if feasible.status != "True":
        ready = Condition(READY, "False", feasible.reason, feasible.message)
    elif policy.mode is Mode.ENFORCE and enforced.status != "True":
        ready = Condition(READY, "False", enforced.reason, enforced.message)
    elif power_w is not None and power_w > policy.power_cap_w:
        observe = "; mode is Observe, so no GPU is capped" if policy.mode is Mode.OBSERVE else (
            "; the node agents are lowering the caps (brief overshoot above a limit is normal)"
        )
        ready = Condition(READY, "False", "OverCap",
                          f"the service draws {_w(power_w)} above powerCapLimit {_w(policy.power_cap_w)}{observe}")
    elif inputs.gpus == 0:
        ready = Condition(READY, "True", "NoGPUs", "no pod of the service runs on a GPU yet: nothing to cap")
    else:
        drawn = f"the service draws {_w(power_w)}" if power_w is not None else "no GPU reports its power yet"
        suffix = " (Observe mode: caps are reported, not set)" if policy.mode is Mode.OBSERVE else ""
        ready = Condition(READY, "True", "WithinCap", f"{drawn} of powerCapLimit {_w(policy.power_cap_w)} across "
                                                      f"{counted(inputs.gpus, 'GPU')}{suffix}")
    return ready, feasible, enforced


def _feasible(inputs: StatusInputs) -> Condition:
    allocation = inputs.allocation
    if not allocation.feasible:
        return Condition(FEASIBLE, "False", "Infeasible", allocation.infeasible_reason or "")
    if inputs.rack_problems:
        return Condition(FEASIBLE, "False", "RackInfeasible", _listing(inputs.rack_problems))
    if inputs.gpus == 0:
        return Condition(FEASIBLE, "True", "NoGPUs",
                         f"no pod of the service runs on a GPU yet; the budget is {_w(allocation.budget_w)}")
    minimum_w = allocation.minimum_w + allocation.reserved_w
    return Condition(
        FEASIBLE, "True", "BudgetCoversMinimums",
        f"budget {_w(allocation.budget_w)} ({budget_source(inputs.policy.power_cap_w, inputs.margin)}) covers the "
        f"minimum power limits of {counted(inputs.gpus, 'GPU')} "
        f"({_w(minimum_w)})",
    )


def _enforced(inputs: StatusInputs) -> Condition:
    if inputs.policy.mode is Mode.OBSERVE:
        return Condition(ENFORCED, "False", "ObserveMode",
                         "mode is Observe: allocations are computed and reported, node agents do not set them")
    if inputs.lagging:
        named = [f"{g.node}/{g.uuid} at {_w(g.limit_w)} (allocated {_w(g.allocated_w)})" for g in inputs.lagging]
        nodes = sorted({g.node for g in inputs.lagging})
        return Condition(
            ENFORCED, "False", "AgentsLagging",
            f"{counted(len(inputs.lagging), 'GPU')} {agreeing(len(inputs.lagging), 'runs above its', 'run above their')} "
            f"allocation: {_listing(named)}; "
            f"check the node agent on {_listing(nodes)}",
        )
    if inputs.silent_nodes:
        return Condition(
            ENFORCED, "False", "TelemetryStale",
            f"{_listing(inputs.silent_nodes)}; their GPUs are held at their last caps until the agents report again",
        )
    if inputs.gpus == 0:
        return Condition(ENFORCED, "True", "NoGPUs", "no pod of the service runs on a GPU yet")
    reported = inputs.gpus - inputs.unreported_gpus
    message = f"node agents hold {counted(reported, 'GPU')} at or under their allocation"
    if inputs.unreported_gpus:
        message += (f"; {counted(inputs.unreported_gpus, 'GPU')} of starting pods not reported yet "
                    "(they run at their minimum)")
    if inputs.pending_reserved_gpus:
        message += (f"; the minimums of {counted(inputs.pending_reserved_gpus, 'GPU')} of pods waiting for budget "
                    "are kept free, so they can be scheduled")
    return Condition(ENFORCED, "True", "AllocationApplied", message)


def transitions(stored: Mapping[str, Any] | None, written: Mapping[str, Any]) -> list[Transition]:
    """Conditions of ``written`` that changed from ``stored``, one :class:`Transition` each.

    A condition changed when its status differs, or its reason differs and the old or the new
    one is not healthy (``AgentsLagging`` -> ``TelemetryStale`` is a new problem;
    ``NoGPUs`` -> ``BudgetCoversMinimums`` is nothing to act on). A condition seen for the
    first time changed only when it is not healthy (a new policy that is fine needs no Event;
    one that is infeasible does). A message that changes alone (new figures) is no change.
    ``stored`` is the status read back from the API server, so a restarted or new leader
    records nothing for a condition that already held.
    """
    result = []
    for raw in written.get("conditions") or ():
        condition = Condition(raw["type"], raw["status"], raw["reason"], raw["message"])
        before = _stored_condition(stored or {}, condition.type)
        if before is None:
            if not condition.healthy:
                result.append(Transition(condition, None, None))
            continue
        status, reason = before.get("status"), before.get("reason")
        was_healthy = Condition(condition.type, str(status), str(reason), "").healthy
        if status != condition.status or (reason != condition.reason and not (was_healthy and condition.healthy)):
            result.append(Transition(condition, status, reason))
    return result


def stored_reason(status: Mapping[str, Any] | None, kind: str) -> str | None:
    """The reason of condition ``kind`` in a stored status, None when it has none."""
    condition = _stored_condition(status or {}, kind)
    return condition.get("reason") if condition is not None else None


def _condition_field(condition: Condition, before: Mapping[str, Any] | None, generation: int, now: datetime) -> dict[str, Any]:
    since = before.get("lastTransitionTime") if before is not None and before.get("status") == condition.status else None
    return {
        "type": condition.type,
        "status": condition.status,
        "observedGeneration": generation,
        "lastTransitionTime": since if isinstance(since, str) else format_time(now),
        "reason": condition.reason,
        "message": condition.message,
    }


def _stored_condition(stored: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in stored.get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return condition
    return None


def _settled_racks(readings: Sequence[RackReading], stored: Any) -> list[dict[str, Any]]:
    before = {
        r.get("rackId"): r for r in (stored if isinstance(stored, list) else ()) if isinstance(r, Mapping)
    }
    racks = []
    for reading in sorted(readings, key=lambda r: r.rack_id):
        old = before.get(reading.rack_id) or {}
        power_w = round(reading.power_w)
        old_power = old.get("powerW")
        tolerance_w = max(POWER_TOLERANCE_FLOOR_W, POWER_TOLERANCE * power_w)
        non_gpu_w = round(reading.non_gpu_power_w)
        entry: dict[str, Any] = {
            "rackId": reading.rack_id,
            "powerW": _settle(power_w, old_power, tolerance_w),
            "nonGpuPowerW": _settle(non_gpu_w, old.get("nonGpuPowerW"), max(POWER_TOLERANCE_FLOOR_W, POWER_TOLERANCE * non_gpu_w)),
            "powerSource": reading.power_source,
            "temperatureC": _settle(_round_or_none(reading.temperature_c, 1), old.get("temperatureC"),
                                    TEMPERATURE_TOLERANCE_C - 1e-9),
        }
        warning = reading.warning
        if warning is not None:
            entry["estimatedNodes"] = list(reading.estimated_nodes)
            entry["warning"] = warning
        racks.append(entry)
    return racks


def _settle(new: float | None, old: Any, tolerance: float) -> float | None:
    """``old`` while ``|new - old| <= tolerance``, else ``new``."""
    if new is None or not _is_number(old):
        return new
    return old if abs(new - old) <= tolerance else new


def _round_or_none(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    rounded = round(value, digits)
    return int(rounded) if digits == 0 else rounded


def _significant_or_none(value: float | None, digits: int) -> float | None:
    """``value`` rounded to ``digits`` significant digits (None for None, NaN or infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _is_number(value: Any) -> bool:
    return is_finite_number(value)


def _w(watts: float | None) -> str:
    if watts is None:
        return "? W"
    return f"{watts:.0f} W" if abs(watts - round(watts)) < 0.05 else f"{watts:.1f} W"


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_LISTED]) if any(";" in i or "," in i for i in items[:_LISTED]) else ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
