"""The PowerCappingPolicy model: validation, defaults and typed, immutable policy objects.

One validator serves ``powercap validate``, the admission webhook and every service that
reads policies, so a user sees the same message wherever a policy is refused:

    spec.rackConstraints[1].maxPower: must be greater than 0

``validate_policy`` checks a raw document against the CRD's own schema, then the rules a
schema cannot say (unique rackId, a registered algorithm and its parameters, selector
syntax, apiVersion/kind), and reports every problem at once. ``default_policy`` fills in
what the mutating webhook fills in. ``parse_policy`` turns a valid document into a
:class:`Policy`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from types import MappingProxyType
from typing import Any

from powercap import API_GROUP, API_VERSION, KIND, schema
from powercap.algorithms import DEFAULT_ALGORITHM, AlgorithmRegistry
from powercap.problems import Problem, ValidationResult, join_path

API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
POLICY_LABEL = f"{API_GROUP}/policy"
# The smallest power limit of the GPUs we target (H100/H200 SXM: 200-700 W).
TYPICAL_GPU_MIN_LIMIT_W = 200
# ASHRAE A4, the widest allowable class, permits 45 °C inlet air; above that the number is
# more likely a GPU die temperature than a rack inlet temperature.
MAX_PLAUSIBLE_INLET_C = 45

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_DNS1123_LABEL_RE = re.compile(rf"^{_DNS1123_LABEL}$")


def is_dns1123_label(text: str) -> bool:
    """A Kubernetes name such as a namespace or a Service: a-z, 0-9, '-', at most 63."""
    return len(text) <= 63 and bool(_DNS1123_LABEL_RE.match(text))


def is_dns1123_subdomain(text: str) -> bool:
    """A Kubernetes object name such as a Node's: labels joined by '.', at most 253."""
    return len(text) <= 253 and bool(_DNS1123_SUBDOMAIN_RE.match(text))
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")


class Mode(str, Enum):
    ENFORCE = "Enforce"
    OBSERVE = "Observe"


@dataclass(frozen=True)
class RackConstraint:
    """Limits of one rack; ``None`` means that limit is not set."""

    rack_id: str
    max_power_w: int | None = None
    max_temperature_c: float | None = None


@dataclass(frozen=True)
class PerformanceTarget:
    """Aim for ``target_tokens_per_joule`` within ``tolerance_pct`` percent."""

    target_tokens_per_joule: float
    tolerance_pct: float = 5.0

    @property
    def low_tokens_per_joule(self) -> float:
        return self.target_tokens_per_joule * (1 - self.tolerance_pct / 100)

    @property
    def high_tokens_per_joule(self) -> float:
        return self.target_tokens_per_joule * (1 + self.tolerance_pct / 100)


@dataclass(frozen=True)
class AlgorithmChoice:
    name: str = DEFAULT_ALGORITHM
    parameters: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class SelectorRequirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector. An empty selector matches every pod, as in Kubernetes."""

    match_labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            requirement.matches(labels) for requirement in self.match_expressions
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> LabelSelector:
        raw = raw or {}
        return cls(
            match_labels=MappingProxyType(dict(raw.get("matchLabels") or {})),
            match_expressions=tuple(
                SelectorRequirement(e["key"], e["operator"], tuple(e.get("values") or ()))
                for e in raw.get("matchExpressions") or ()
            ),
        )


@dataclass(frozen=True)
class Policy:
    """A valid, defaulted PowerCappingPolicy."""

    namespace: str
    name: str
    power_cap_w: int
    racks: tuple[RackConstraint, ...] = ()
    performance: PerformanceTarget | None = None
    algorithm: AlgorithmChoice = field(default_factory=AlgorithmChoice)
    selector: LabelSelector = field(default_factory=LabelSelector)
    mode: Mode = Mode.ENFORCE
    uid: str = ""
    generation: int = 0
    status: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @cached_property
    def key(self) -> str:
        """``namespace/name``, the key used in caches and messages."""
        return f"{self.namespace}/{self.name}"

    @property
    def enforced(self) -> bool:
        return self.mode is Mode.ENFORCE

    def rack(self, rack_id: str) -> RackConstraint | None:
        return self._racks_by_id.get(rack_id)

    @cached_property
    def _racks_by_id(self) -> Mapping[str, RackConstraint]:
        # every node agent looks its rack up each tick; a policy may name a hundred racks
        by_id: dict[str, RackConstraint] = {}
        for rack in self.racks:
            by_id.setdefault(rack.rack_id, rack)
        return MappingProxyType(by_id)


def default_selector(name: str) -> dict[str, Any]:
    """The selector a policy gets when it names none: pods labelled with the policy's name."""
    return {"matchLabels": {POLICY_LABEL: name}}


def default_policy(document: Mapping[str, Any], registry: AlgorithmRegistry | None = None) -> dict[str, Any]:
    """A copy of ``document`` with every default filled in; values the user set never change.

    Defaults: the CRD schema's (``tolerancePercentage: 5``, ``mode: Enforce``), the
    selector ``matchLabels: {powercapping.example.com/policy: <metadata.name>}``, and the
    chosen algorithm's parameter defaults. Applying it twice gives the same result.
    The status is the document's own, not a copy: nothing in it has a default, and the
    controller's holds an allocation per node (1,250 entries deep-copied per parse).
    """
    result = schema.apply_defaults({k: v for k, v in document.items() if k != "status"}, schema.policy_schema())
    if "status" in document:
        result["status"] = document["status"]
    spec = result.get("spec")
    if not isinstance(spec, dict):
        return result
    name = (result.get("metadata") or {}).get("name") if isinstance(result.get("metadata"), dict) else None
    if "selector" not in spec and isinstance(name, str) and 0 < len(name) <= 63:  # longer: not a label value
        spec["selector"] = default_selector(name)
    algorithm = spec.get("customAlgorithm")
    if registry is not None and isinstance(algorithm, dict) and isinstance(algorithm.get("name"), str):
        chosen = registry.get(algorithm["name"])
        parameters = algorithm.get("parameters", {})
        if chosen is not None and isinstance(parameters, dict):
            defaulted = chosen.effective_parameters(parameters)
            if defaulted != parameters:
                algorithm["parameters"] = defaulted
    return result


def validate_policy(document: Any, registry: AlgorithmRegistry) -> ValidationResult:
    """Every error and warning of a PowerCappingPolicy document."""
    if not isinstance(document, Mapping):
        return ValidationResult(errors=(Problem("", f"a policy must be an object, not {schema.json_type_of(document)}"),))
    errors: list[Problem] = _check_type_meta(document)
    if document.get("kind") not in (KIND, None):
        return ValidationResult(errors=tuple(errors))  # another kind of object: the rest is noise
    errors += _check_metadata(document.get("metadata"))
    # status is written by the controller through its subresource; a user's copy is ignored
    body = {k: v for k, v in document.items() if k != "status"}
    errors += schema.validate(body, schema.policy_schema())
    spec = document.get("spec")
    warnings: list[Problem] = []
    if isinstance(spec, Mapping):
        errors += _check_racks(spec.get("rackConstraints"))
        errors += _check_algorithm(spec.get("customAlgorithm"), registry)
        errors += _check_selector(spec.get("selector"), "spec.selector")
        errors += _check_default_selector(spec, document.get("metadata"))
        warnings += _warnings(spec)
    return ValidationResult(errors=tuple(_dedupe(errors)), warnings=tuple(warnings))


def _check_default_selector(spec: Mapping[str, Any], metadata: Any) -> list[Problem]:
    """Without a selector the policy selects ``powercapping.example.com/policy: <name>``, and a
    name longer than a label value (63 characters) cannot be one: say so here, where the
    user wrote no selector, not at the selector the mutating webhook fills in."""
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if spec.get("selector") is not None or not isinstance(name, str) or len(name) <= 63:
        return []
    return [Problem("spec.selector", f"is required when metadata.name is longer than 63 characters ({len(name)}): "
                                     f"the default selector {POLICY_LABEL}: <metadata.name> needs a valid label value")]


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """``problems`` without repeats, in their first order."""
    return list(dict.fromkeys(problems))


def _check_type_meta(document: Mapping[str, Any]) -> list[Problem]:
    problems = []
    api_version = document.get("apiVersion")
    if api_version != API_GROUP_VERSION:
        shown = schema.describe_value(api_version) if "apiVersion" in document else "missing"
        problems.append(Problem("apiVersion", f"must be {API_GROUP_VERSION}, not {shown}"))
    kind = document.get("kind")
    if kind != KIND:
        shown = schema.describe_value(kind) if "kind" in document else "missing"
        problems.append(Problem("kind", f"must be {KIND}, not {shown}"))
    return problems


INT64_MAX = 2**63 - 1


def _check_metadata(metadata: Any) -> list[Problem]:
    if metadata is None:
        return [Problem("metadata.name", "is required")]
    if not isinstance(metadata, Mapping):
        return [Problem("metadata", f"must be an object, not {schema.json_type_of(metadata)}")]
    problems = []
    name = metadata.get("name")
    if name is None and not metadata.get("generateName"):
        problems.append(Problem("metadata.name", "is required"))
    elif name is not None:
        if not isinstance(name, str) or not is_dns1123_subdomain(name):
            problems.append(Problem(
                "metadata.name",
                f"{schema.describe_value(name)} must be a lowercase RFC 1123 subdomain "
                "(a-z, 0-9, '-' and '.', starting and ending with a letter or digit, at most 253 characters)",
            ))
    namespace = metadata.get("namespace")
    if namespace is not None and (
        not isinstance(namespace, str) or not is_dns1123_label(namespace)
    ):
        problems.append(Problem(
            "metadata.namespace",
            f"{schema.describe_value(namespace)} must be a lowercase RFC 1123 label (a-z, 0-9 and '-', at most 63 characters)",
        ))
    for field_name in ("labels", "annotations"):
        if field_name in metadata and not isinstance(metadata[field_name], Mapping):
            problems.append(Problem(f"metadata.{field_name}", "must be a map of strings"))
    generation = metadata.get("generation")
    if generation is not None and not (
        isinstance(generation, int) and not isinstance(generation, bool) and 0 <= generation <= INT64_MAX
    ):
        # the API server sets it; a file or a hand-written request may carry anything
        problems.append(Problem("metadata.generation", f"{schema.describe_value(generation)} must be a non-negative int64"))
    return problems


def _check_racks(racks: Any) -> list[Problem]:
    if not isinstance(racks, list):
        return []
    problems = []
    first_seen: dict[str, int] = {}
    for index, rack in enumerate(racks):
        if not isinstance(rack, Mapping) or not isinstance(rack.get("rackId"), str) or not rack["rackId"]:
            continue
        path = join_path(join_path("spec.rackConstraints", index), "rackId")
        rack_id = rack["rackId"]
        if rack_id in first_seen:
            problems.append(Problem(path, f'duplicate rackId "{rack_id}" (also spec.rackConstraints[{first_seen[rack_id]}])'))
        else:
            first_seen[rack_id] = index
        if label_value_problem(rack_id):
            problems.append(Problem(path, f"{label_value_problem(rack_id)}; it is matched against the node label value"))
    return problems


def _check_algorithm(choice: Any, registry: AlgorithmRegistry) -> list[Problem]:
    if not isinstance(choice, Mapping) or not isinstance(choice.get("name"), str) or not choice["name"]:
        return []
    algorithm = registry.get(choice["name"])
    if algorithm is None:
        return [Problem(
            "spec.customAlgorithm.name",
            f'unknown algorithm "{choice["name"]}"; registered: {", ".join(registry.names())}',
        )]
    parameters = choice.get("parameters", {})
    if not isinstance(parameters, Mapping):
        return []  # the CRD schema already reported the type
    return algorithm.validate_parameters(dict(parameters), "spec.customAlgorithm.parameters")


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key (``[prefix/]name``), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and not is_dns1123_subdomain(prefix):
        return f'label key prefix "{prefix}" must be a lowercase DNS subdomain'
    if not name or len(name) > 63 or not _LABEL_NAME_RE.match(name):
        return (f'label key "{key}" must be at most 63 characters of letters, digits, '
                "'-', '_' or '.', starting and ending with a letter or digit")
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or None."""
    if value and (len(value) > 63 or not _LABEL_NAME_RE.match(value)):
        return (f'"{value}" is not a valid label value (at most 63 characters of letters, digits, '
                "'-', '_' or '.', starting and ending with a letter or digit)")
    return None


def _check_selector(selector: Any, path: str) -> list[Problem]:
    if not isinstance(selector, Mapping):
        return []
    problems = []
    labels = selector.get("matchLabels")
    if isinstance(labels, Mapping):
        for key, value in labels.items():
            key_path = f"{path}.matchLabels[{key}]"
            if isinstance(key, str) and label_key_problem(key):
                problems.append(Problem(key_path, label_key_problem(key) or ""))
            if isinstance(value, str) and label_value_problem(value):
                problems.append(Problem(key_path, label_value_problem(value) or ""))
    expressions = selector.get("matchExpressions")
    if isinstance(expressions, list):
        for index, expression in enumerate(expressions):
            if not isinstance(expression, Mapping):
                continue
            expression_path = join_path(join_path(path, "matchExpressions"), index)
            key = expression.get("key")
            if isinstance(key, str) and label_key_problem(key):
                problems.append(Problem(join_path(expression_path, "key"), label_key_problem(key) or ""))
            operator, values = expression.get("operator"), expression.get("values")
            values_path = join_path(expression_path, "values")
            for value_index, value in enumerate(values if isinstance(values, list) else []):
                if isinstance(value, str) and label_value_problem(value):
                    problems.append(Problem(join_path(values_path, value_index), label_value_problem(value) or ""))
            if operator in ("In", "NotIn") and not values:
                problems.append(Problem(values_path, f"must have at least one value when operator is {operator}"))
            elif operator in ("Exists", "DoesNotExist") and values:
                problems.append(Problem(values_path, f"must be empty when operator is {operator}"))
    return problems


def _warnings(spec: Mapping[str, Any]) -> list[Problem]:
    """Legal but suspicious settings. Each message stays under 120 characters."""
    warnings = []
    raw_cap = spec.get("powerCapLimit")
    cap = raw_cap if isinstance(raw_cap, int) and not isinstance(raw_cap, bool) and raw_cap > 0 else None
    if cap is not None and cap < TYPICAL_GPU_MIN_LIMIT_W:
        warnings.append(Problem(
            "spec.powerCapLimit",
            f"{cap} W is below one GPU's minimum limit ({TYPICAL_GPU_MIN_LIMIT_W} W on H100/H200): no pod can get a GPU",
        ))
    racks = spec.get("rackConstraints")
    for index, rack in enumerate(racks if isinstance(racks, list) else []):
        if not isinstance(rack, Mapping):
            continue
        path = join_path("spec.rackConstraints", index)
        max_power = rack.get("maxPower")
        if cap is not None and isinstance(max_power, int) and not isinstance(max_power, bool) and 0 < max_power < cap:
            warnings.append(Problem(
                join_path(path, "maxPower"),
                f"{max_power} W is below powerCapLimit {cap} W: this rack alone cannot hold the whole service",
            ))
        temperature = rack.get("maxTemperature")
        if isinstance(temperature, (int, float)) and MAX_PLAUSIBLE_INLET_C < temperature <= 60:
            warnings.append(Problem(
                join_path(path, "maxTemperature"),
                f"{temperature} °C is above any ASHRAE inlet class; this is inlet air, not GPU temperature",
            ))
        if "maxPower" not in rack and "maxTemperature" not in rack:
            warnings.append(Problem(path, "sets neither maxPower nor maxTemperature, so it constrains nothing"))
    ratio = spec.get("performancePowerRatio")
    if isinstance(ratio, Mapping) and ratio.get("tolerancePercentage") == 0:
        warnings.append(Problem(
            "spec.performancePowerRatio.tolerancePercentage",
            "0 leaves no dead band: caps will move on every measurement",
        ))
    return warnings


def parse_policy(document: Mapping[str, Any], registry: AlgorithmRegistry | None = None) -> Policy:
    """The typed policy of a *valid* document, with every default applied.

    Raises ``ValueError`` naming the problems when the document is invalid.
    """
    if registry is None:
        registry = AlgorithmRegistry.default()
    result = validate_policy(document, registry)
    if not result.ok:
        raise ValueError("; ".join(str(p) for p in result.errors))
    return policy_from_valid(default_policy(document, registry))


def policy_from_valid(document: Mapping[str, Any]) -> Policy:
    """Build a :class:`Policy` from an already validated and defaulted document (no checks)."""
    metadata = document.get("metadata") or {}
    spec = document["spec"]
    ratio = spec.get("performancePowerRatio")
    algorithm = spec.get("customAlgorithm")
    name = metadata.get("name", "")
    return Policy(
        namespace=metadata.get("namespace") or "default",
        name=name,
        uid=metadata.get("uid", ""),
        generation=int(metadata.get("generation") or 0),
        power_cap_w=int(spec["powerCapLimit"]),
        racks=tuple(
            RackConstraint(
                rack_id=r["rackId"],
                max_power_w=int(r["maxPower"]) if "maxPower" in r else None,
                max_temperature_c=float(r["maxTemperature"]) if "maxTemperature" in r else None,
            )
            for r in spec.get("rackConstraints") or ()
        ),
        performance=PerformanceTarget(
            target_tokens_per_joule=float(ratio["targetRatio"]),
            tolerance_pct=float(ratio.get("tolerancePercentage", 5)),
        ) if ratio else None,
        algorithm=AlgorithmChoice(
            name=algorithm["name"],
            parameters=MappingProxyType(copy.deepcopy(dict(algorithm.get("parameters") or {}))),
        ) if algorithm else AlgorithmChoice(),
        # an explicit empty selector selects every pod, as in Kubernetes; only a missing one is defaulted
        selector=LabelSelector.from_dict(spec["selector"] if spec.get("selector") is not None else default_selector(name)),
        mode=Mode(spec.get("mode", Mode.ENFORCE.value)),
        status=MappingProxyType(dict(document.get("status") or {})),
    )
