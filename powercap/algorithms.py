"""The placement-algorithm registry.

A policy's ``spec.customAlgorithm`` names the algorithm the scheduler extender scores
nodes with for the policy's pods, and gives its parameters. Every algorithm declares a
JSON schema for its parameters; the webhook and ``powercap validate`` enforce it (unknown
keys rejected, naming the allowed ones).

Built-ins: ``headroom`` (the default), ``energy-aware-scheduling`` and ``thermal-aware``.
Third-party packages register more through the entry-point group
``powercapping.algorithms``: each entry point names a :class:`PlacementAlgorithm`
subclass (or a zero-argument factory returning an instance)::

    [project.entry-points."powercapping.algorithms"]
    my-algorithm = "mypackage.placement:MyAlgorithm"

The registry is an object the caller builds and injects (``AlgorithmRegistry.default()``),
never a module-level singleton.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar

from powercap import schema
from powercap.problems import Problem

ENTRY_POINT_GROUP = "powercapping.algorithms"
DEFAULT_ALGORITHM = "headroom"
MAX_SCORE = 10  # kube-scheduler's MaxExtenderPriority
# ASHRAE's recommended lowest inlet temperature: temperature headroom is measured over the
# span [COOL_INLET_C, limit], so that 24 °C and 26 °C under a 30 °C limit score apart.
COOL_INLET_C = 18.0
# The limit thermal-aware measures against in a rack that sets no maxTemperature
# (ASHRAE class A1's highest allowable inlet temperature).
DEFAULT_REFERENCE_INLET_C = 32.0
# Points thermal-aware takes off per °C/min of inlet rise.
RISE_PENALTY_PER_C_PER_MIN = 5.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What a placement algorithm knows about one candidate node, from the cluster view.

    Powers in W, temperatures in °C of rack inlet air. ``None`` means unknown: no fresh
    telemetry, no rack, or no such limit. ``node_power_w`` and ``rack_power_w`` are
    whole-node and whole-rack power: GPUs, the power beside them (CPUs, fans, supplies:
    measured, or estimated where no reading can be trusted) and the assumed power of pods
    bound but not yet visible in telemetry. ``node_non_gpu_power_w`` is the node's part
    beside its GPUs.
    """

    name: str
    rack_id: str | None = None
    node_power_w: float | None = None
    node_non_gpu_power_w: float = 0.0
    node_capacity_w: float | None = None  # sum of the node's GPU maximum limits
    rack_power_w: float | None = None
    rack_max_power_w: float | None = None
    inlet_c: float | None = None  # the rack's (hottest node's) inlet temperature
    rack_max_temperature_c: float | None = None
    inlet_rise_c_per_min: float | None = None
    gpu_max_w: float = 700.0  # the node's largest GPU maximum limit (for the pod's estimate)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node to score, with the power the pod being placed would draw there (W)."""

    node: NodeFacts
    pod_power_w: float


def clamp_score(value: float) -> float:
    """``value`` clamped to ``0..MAX_SCORE``."""
    return min(float(MAX_SCORE), max(0.0, value))


class PlacementAlgorithm:
    """A way of ranking candidate nodes for a pod.

    Subclasses set ``name``, ``parameters_schema`` (a JSON-schema object; the registry
    validates a policy's parameters against it and fills in its ``default`` values) and
    state their semantics in the class docstring; :meth:`score` ranks the candidates.
    """

    name: ClassVar[str] = ""
    parameters_schema: ClassVar[Mapping[str, Any]] = {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }

    def validate_parameters(self, parameters: Any, path: str) -> list[Problem]:
        """Every problem of ``parameters`` against this algorithm's schema, paths under ``path``."""
        problems = schema.validate(parameters, self.parameters_schema, path)
        return [_name_allowed_parameters(p, self.parameters_schema) for p in problems]

    def effective_parameters(self, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
        """The parameters with this algorithm's defaults filled in."""
        return schema.apply_defaults(dict(parameters or {}), self.parameters_schema)

    def score(self, candidates: Sequence[Candidate], parameters: Mapping[str, Any]) -> Sequence[float]:
        """One score per candidate, in order, higher is better; the caller clamps to 0..10 and
        rounds. ``parameters`` are the policy's, defaults filled in. Must be pure and quick
        (thousands of candidates per call). The extender falls back to ``headroom`` when this
        raises or returns something else than one finite number per candidate."""
        raise NotImplementedError(f"placement algorithm {self.name!r} does not score nodes")


def _name_allowed_parameters(problem: Problem, parameters_schema: Mapping[str, Any]) -> Problem:
    if problem.message.startswith("unknown field"):
        allowed = ", ".join(sorted(parameters_schema.get("properties", {}))) or "none"
        return Problem(problem.path, f"unknown parameter; allowed: {allowed}")
    return problem


class Headroom(PlacementAlgorithm):
    """Spread pods by headroom.

    A node's score grows with the smaller of its rack's power headroom and temperature
    headroom after the pod is placed, each as a fraction::

        power       = (maxPower - rackPower - pod) / maxPower
        temperature = (maxTemperature - inlet) / (maxTemperature - 18 °C)
        score       = 10 x min(the terms the rack has), clamped to 0..10

    18 °C is ASHRAE's recommended lowest inlet; rackPower is the whole rack's (GPUs and the
    power beside them). A node in a rack with neither limit scores by its own GPU power
    headroom, ``10 x (capacity - (nodePower - nonGpuPower) - pod) / capacity`` with
    capacity = the sum of its GPUs' maximum limits. Unknown figures (no fresh telemetry)
    fail soft: that term is left out, and a node with no term left scores 0.
    Takes no parameters.
    """

    name = "headroom"

    def score(self, candidates: Sequence[Candidate], parameters: Mapping[str, Any]) -> list[float]:
        return [MAX_SCORE * fraction for fraction in map(headroom_fraction, candidates)]


def headroom_fraction(candidate: Candidate) -> float:
    """The smallest headroom fraction of :class:`Headroom` (0 when nothing is known)."""
    node = candidate.node
    terms: list[float] = []
    if node.rack_max_power_w and node.rack_power_w is not None:
        terms.append((node.rack_max_power_w - node.rack_power_w - candidate.pod_power_w) / node.rack_max_power_w)
    if node.rack_max_temperature_c is not None and node.inlet_c is not None:
        span_c = max(node.rack_max_temperature_c - COOL_INLET_C, 1.0)
        terms.append((node.rack_max_temperature_c - node.inlet_c) / span_c)
    if terms:
        return min(terms)
    if node.rack_max_power_w is None and node.rack_max_temperature_c is None and node.node_capacity_w and node.node_power_w is not None:
        gpu_power_w = node.node_power_w - node.node_non_gpu_power_w
        return (node.node_capacity_w - gpu_power_w - candidate.pod_power_w) / node.node_capacity_w
    return 0.0


class EnergyAwareScheduling(PlacementAlgorithm):
    """Pack pods onto few nodes while they stay under ``energyThreshold`` watts.

    A node whose whole power (GPUs and the power beside them) plus the pod's estimate
    stays at or under ``energyThreshold`` scores
    higher the fuller it is (bin packing, so idle nodes can stay in low-power states); a
    node that would pass the threshold scores low::

        after = nodePower + pod
        score = 1 + 9 x after / energyThreshold   when after <= energyThreshold
              = 0                                  otherwise, or with no fresh telemetry

    Every ``migrationInterval`` seconds the budget controller may move one pod off a node
    above the threshold onto a node below it (placement does not use it).
    """

    name = "energy-aware-scheduling"
    parameters_schema = {
        "type": "object",
        "required": ["energyThreshold"],
        "properties": {
            "energyThreshold": {
                "type": "number",
                "minimum": 0,
                "exclusiveMinimum": True,
                "description": "Node power in watts to pack up to.",
            },
            "migrationInterval": {
                "type": "integer",
                "minimum": 30,
                "default": 300,
                "description": "Seconds between rebalancing moves.",
            },
        },
        "additionalProperties": False,
    }

    def score(self, candidates: Sequence[Candidate], parameters: Mapping[str, Any]) -> list[float]:
        threshold_w = float(parameters["energyThreshold"])
        scores = []
        for candidate in candidates:
            power_w = candidate.node.node_power_w
            if power_w is None:
                scores.append(0.0)
                continue
            after_w = power_w + candidate.pod_power_w
            scores.append(clamp_score(1 + 9 * after_w / threshold_w) if after_w <= threshold_w else 0.0)
        return scores


class ThermalAware(PlacementAlgorithm):
    """Coolest racks first; racks whose inlet temperature is rising are penalised::

        limit = the rack's maxTemperature, else 32 °C (ASHRAE A1's highest allowable inlet)
        score = 10 x (limit - inlet) / (limit - 18 °C) - 5 x max(0, rise in °C/min)

    clamped to 0..10. The rise is the rack's fastest-rising node's inlet trend over at least
    30 s of telemetry. A node whose rack inlet is unknown scores 0 (fail soft).
    Takes no parameters.
    """

    name = "thermal-aware"

    def score(self, candidates: Sequence[Candidate], parameters: Mapping[str, Any]) -> list[float]:
        scores = []
        for candidate in candidates:
            node = candidate.node
            if node.inlet_c is None:
                scores.append(0.0)
                continue
            limit_c = node.rack_max_temperature_c if node.rack_max_temperature_c is not None else DEFAULT_REFERENCE_INLET_C
            coolness = (limit_c - node.inlet_c) / max(limit_c - COOL_INLET_C, 1.0)
            penalty = RISE_PENALTY_PER_C_PER_MIN * max(0.0, node.inlet_rise_c_per_min or 0.0)
            scores.append(clamp_score(MAX_SCORE * coolness - penalty))
        return scores


BUILT_IN_ALGORITHMS: tuple[type[PlacementAlgorithm], ...] = (Headroom, EnergyAwareScheduling, ThermalAware)


@dataclass
class AlgorithmRegistry:
    """Placement algorithms by name."""

    algorithms: dict[str, PlacementAlgorithm] = field(default_factory=dict)

    @classmethod
    def default(
        cls, discover: Callable[[], Iterable[EntryPoint]] | None = None
    ) -> AlgorithmRegistry:
        """The built-ins plus every algorithm installed under the entry-point group.

        A third-party entry point that fails to load is logged and skipped: one broken
        plugin must not take the webhook or the extender down.
        """
        registry = cls()
        for algorithm_class in BUILT_IN_ALGORITHMS:
            registry.register(algorithm_class())
        found = discover() if discover else entry_points(group=ENTRY_POINT_GROUP)
        for entry_point in found:
            try:
                loaded = entry_point.load()
                algorithm = loaded() if callable(loaded) else loaded
                if not isinstance(algorithm, PlacementAlgorithm):
                    raise TypeError(f"{entry_point.value} is not a PlacementAlgorithm")
                if not algorithm.name:
                    algorithm.name = entry_point.name  # type: ignore[misc]
                registry.register(algorithm)
            except Exception as error:  # a plugin's bug must not stop us
                log.warning(
                    "skipping placement algorithm plugin",
                    extra={"entry_point": entry_point.name, "error": str(error)},
                )
        return registry

    def register(self, algorithm: PlacementAlgorithm) -> None:
        self.algorithms[algorithm.name] = algorithm

    def get(self, name: str) -> PlacementAlgorithm | None:
        return self.algorithms.get(name)

    def names(self) -> list[str]:
        return sorted(self.algorithms)

    def __contains__(self, name: object) -> bool:
        return name in self.algorithms

    def __iter__(self) -> Iterator[PlacementAlgorithm]:
        return iter(self.algorithms.values())
