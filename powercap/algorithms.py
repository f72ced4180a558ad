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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar

from powercap import schema
from powercap.problems import Problem

ENTRY_POINT_GROUP = "powercapping.algorithms"
DEFAULT_ALGORITHM = "headroom"

log = logging.getLogger(__name__)


class PlacementAlgorithm:
    """A way of ranking candidate nodes for a pod.

    Subclasses set ``name``, ``parameters_schema`` (a JSON-schema object; the registry
    validates a policy's parameters against it and fills in its ``default`` values) and
    state their semantics in the class docstring. Scoring is added by the extender issue.
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


def _name_allowed_parameters(problem: Problem, parameters_schema: Mapping[str, Any]) -> Problem:
    if problem.message.startswith("unknown field"):
        allowed = ", ".join(sorted(parameters_schema.get("properties", {}))) or "none"
        return Problem(problem.path, f"unknown parameter; allowed: {allowed}")
    return problem


class Headroom(PlacementAlgorithm):
    """Spread pods by headroom.

    A node's score grows with the smaller of its rack's power headroom and temperature
    headroom after the pod is placed, each as a fraction of the rack's limit:
    ``score = 10 x min((maxPower - power - pod) / maxPower, (maxTemperature - inlet) / maxTemperature)``,
    clamped to 0..10. Nodes in unconstrained racks score by their own GPU power headroom.
    Takes no parameters.
    """

    name = "headroom"


class EnergyAwareScheduling(PlacementAlgorithm):
    """Pack pods onto few nodes while they stay under ``energyThreshold`` watts.

    A node whose power plus the pod's estimate stays at or under ``energyThreshold`` scores
    higher the fuller it is (bin packing, so idle nodes can stay in low-power states); a
    node that would pass the threshold scores low. Every ``migrationInterval`` seconds the
    budget controller may move one pod off a node above the threshold onto a node below it.
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


class ThermalAware(PlacementAlgorithm):
    """Coolest racks first; racks whose inlet temperature is rising are penalised.

    ``score = 10 x (maxTemperature - inlet) / maxTemperature - risePenalty x max(0, dT/dt)``,
    clamped to 0..10. Takes no parameters.
    """

    name = "thermal-aware"


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
