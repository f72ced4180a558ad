"""Simulation scenarios: the YAML format, its validation, and typed, immutable scenario objects.

A scenario names racks (facility limits, cooling), nodes (rack, GPU model and count),
PowerCappingPolicy documents, services (replicas, GPUs per pod, model size, traffic) and
events (cap changes, scaling). The format is a JSON schema shipped with the package
(``powercap/data/scenario-schema.yaml``) checked by the CRD validator, followed by the
rules a schema cannot say: unique names, references between sections, policies validated
exactly as the admission webhook validates them. Every problem is reported at once, with
its path::

    nodes[2].rack: unknown rack "rack-9"; racks: rack-1, rack-2
    policies[0].spec.powerCapLimit: must be greater than 0

``load_scenario(text)`` returns a :class:`Scenario` or raises :class:`ScenarioError`
carrying every problem. ``default_scenario_text()`` is the built-in scenario.
docs/simulator.md documents every field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import yaml

from powercap import physics, schema
from powercap.algorithms import AlgorithmRegistry
from powercap.numeric import counted, is_finite_number
from powercap.objects import GPU_RESOURCE, POWER_ANNOTATION
from powercap.physics import GpuModel, NodePowerModel
from powercap.policies import POLICY_LABEL, Policy, parse_policy, validate_policy
from powercap.problems import Problem, join_path
from powercap.simulation.metrics import RECOVERY_HOLD_S, excluded_seconds
from powercap.simulation.tracefile import RecordedTokens, TraceError, parse_trace

SCHEMA_RESOURCE = "scenario-schema.yaml"
DEFAULT_SCENARIO_RESOURCE = "scenario-default.yaml"
SERVICE_LABEL = "app.kubernetes.io/name"
GPU_MODEL_LABEL = "nvidia.com/gpu.product"
REFERENCE_MODEL_B = 70.0
"""Model size (billions of parameters) the presets' ``peak_tokens_s`` are quoted for."""
HOURS_PER_DAY = 24

DAILY_SHAPES: Mapping[str, tuple[float, ...]] = {
    # Factors of the daily peak, one per hour from midnight.
    "flat": (1.0,) * 24,
    # Consumer chat: quiet at night, rising through the morning, peak in the evening.
    "chat": (0.35, 0.28, 0.24, 0.22, 0.22, 0.26, 0.35, 0.48, 0.62, 0.72, 0.8, 0.85,
             0.88, 0.9, 0.9, 0.92, 0.94, 0.97, 1.0, 1.0, 0.95, 0.82, 0.62, 0.45),
    # Coding assistant: office hours, lunch dip.
    "office": (0.12, 0.1, 0.1, 0.1, 0.1, 0.12, 0.2, 0.45, 0.8, 0.98, 1.0, 0.95,
               0.75, 0.92, 1.0, 0.97, 0.9, 0.7, 0.45, 0.3, 0.22, 0.18, 0.15, 0.13),
    # Batch jobs fill the night, when interactive traffic is low.
    "night": (1.0, 1.0, 1.0, 0.98, 0.95, 0.85, 0.6, 0.35, 0.25, 0.2, 0.2, 0.2,
              0.2, 0.2, 0.2, 0.2, 0.22, 0.25, 0.35, 0.5, 0.7, 0.85, 0.95, 1.0),
}


TraceReader = Callable[[str], Iterable[str]]
"""The lines of a trace file named in a scenario (relative to the scenario file); raises
OSError (or UnicodeDecodeError) when opening or reading it fails, or TraceError naming the
line that cannot be read."""


class ScenarioError(ValueError):
    """A scenario that cannot be used; ``problems`` lists every reason with its path."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Cooling:
    """Rack inlet model: ``inlet_ss = supply_c + rise_c_per_kw x P_rack_kW``, first order with ``time_constant_s``."""

    supply_c: float
    rise_c_per_kw: float
    time_constant_s: float


@dataclass(frozen=True)
class Rack:
    rack_id: str
    max_power_w: float | None
    max_temperature_c: float | None
    cooling: Cooling


@dataclass(frozen=True)
class NodeGroup:
    """``count`` identical nodes named ``name`` (count 1) or ``name-0 .. name-(count-1)``."""

    name: str
    count: int
    rack_id: str
    gpus: int
    gpu: GpuModel
    node_power: NodePowerModel = NodePowerModel(0.0, 0.0)  # beside the GPUs (physics.NodePowerModel)

    @property
    def node_names(self) -> tuple[str, ...]:
        return (self.name,) if self.count == 1 else tuple(f"{self.name}-{i}" for i in range(self.count))


@dataclass(frozen=True)
class Trace:
    """Recorded traffic replayed for a service: simulated second ``k`` offers
    ``scale x`` the tokens of trace time ``[start_s + k x speedup, start_s + (k + 1) x speedup)``."""

    file: str
    format: str
    start_s: float
    speedup: float
    scale: float
    recorded: RecordedTokens
    peak_utilisation: float | None = None
    """When set, ``scale`` was chosen from it (see :func:`scale_for_utilisation`)."""

    def playable_s(self) -> float:
        """Simulated seconds this trace can play from ``start_s`` at ``speedup``."""
        return max(0.0, self.recorded.duration_s - self.start_s) / self.speedup

    def needed_s(self, duration_s: float) -> float:
        """Trace seconds a run of ``duration_s`` plays, from the trace's start."""
        return self.start_s + duration_s * self.speedup

    def offered_tokens(self, second: int) -> float:
        """Tokens offered in simulated second ``second`` (before bursts)."""
        start = self.start_s + second * self.speedup
        return self.scale * self.recorded.tokens_between(start, start + self.speedup)

    def coverage_problem(self, duration_s: float, duration_name: str = "durationS") -> str | None:
        """Why a run of ``duration_s`` cannot be played from this trace (None: it can), in one
        line that says which ``duration_name`` (durationS or --duration) fits."""
        covered_s = self.recorded.duration_s
        if self.start_s >= covered_s:
            return f"startS {self.start_s:g} is at or after the end of the trace, which covers {covered_s:g} s"
        if self.needed_s(duration_s) <= covered_s:
            return None
        # a higher speedup plays more trace per simulated second, so the fix is a lower one
        longest_s = self.playable_s()  # a run is at least 1 s long (durationS, --duration)
        fix = f"{duration_name} {math.floor(longest_s):g} fits, or lower speedup or startS" if longest_s >= 1 else "lower speedup or startS"
        return (
            f"the trace covers {covered_s:g} s, and a {duration_s:g}-s run from startS "
            f"{self.start_s:g} at speedup {self.speedup:g} needs {self.needed_s(duration_s):g} s of it; {fix}"
        )

    def busiest_minute_tokens_s(self, duration_s: float) -> float:
        """Offered tokens/s (before bursts) of the busiest ``PEAK_WINDOW_S`` simulated seconds of
        a run of ``duration_s`` (the whole run when shorter)."""
        return busiest_window_mean([self.offered_tokens(k) for k in range(max(1, math.ceil(duration_s)))])


PEAK_WINDOW_S = 60
"""Simulated seconds over which "the busiest minute" of offered traffic is averaged: shorter
spikes wait in the queues (maxQueueS) rather than being dropped."""


def busiest_window_mean(per_second: Sequence[float], window_s: int = PEAK_WINDOW_S) -> float:
    """The highest mean of ``window_s`` consecutive values (of all of them when fewer)."""
    window = max(1, min(window_s, len(per_second)))
    running = math.fsum(per_second[:window])
    best = running
    for k in range(window, len(per_second)):
        running += per_second[k] - per_second[k - window]
        best = max(best, running)
    return best / window if per_second else 0.0


@dataclass(frozen=True)
class Service:
    """An inference service: its pods, the model it serves and the traffic it gets.

    ``tokens_scale = 70 / model_size_b``: decode is memory-bound, every generated token reads
    the weights once, so tokens/s per GPU scale inversely with model size.
    """

    name: str
    namespace: str
    policy_name: str | None
    labels: Mapping[str, str]
    replicas: int
    gpus_per_pod: int
    model_size_b: float
    gpu_models: tuple[str, ...] | None
    power_watts: float | None
    prefill_share: float
    peak_tokens_s: float
    daily_shape: tuple[float, ...]
    pod_skew: float
    load_bound: float
    base_latency_s: float
    max_queue_s: float
    trace: Trace | None = None
    """Recorded traffic; when set, ``peak_tokens_s``, ``daily_shape`` and the noise are unused."""

    @property
    def tokens_scale(self) -> float:
        return REFERENCE_MODEL_B / self.model_size_b

    def pod_labels(self) -> dict[str, str]:
        labels = {SERVICE_LABEL: self.name}
        if self.policy_name is not None:
            labels[POLICY_LABEL] = self.policy_name
        labels.update(self.labels)
        return labels

    def pod_object(self, pod_name: str) -> dict[str, Any]:
        """The Pod as the API would serve it before scheduling (what the extender is sent)."""
        metadata: dict[str, Any] = {
            "name": pod_name,
            "namespace": self.namespace,
            "labels": self.pod_labels(),
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": self.name, "controller": True},
            ],
        }
        if self.power_watts is not None:
            metadata["annotations"] = {POWER_ANNOTATION: f"{self.power_watts:g}"}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {
                "schedulerName": "power-aware-scheduler",
                "containers": [{
                    "name": "server",
                    "image": "vllm/vllm-openai",
                    "resources": {"limits": {GPU_RESOURCE: str(self.gpus_per_pod)}},
                }],
            },
            "status": {"phase": "Pending"},
        }


def uncapped_capacity_tokens_s(service: Service, nodes: Sequence[NodeGroup]) -> float:
    """Tokens/s the service's ``replicas`` pods generate flat out with no cap (as
    ``world.SimPod.bind`` computes a pod's): ``replicas x gpusPerPod x peak_tokens_s x
    (1 - prefillShare) x 70 / modelSizeB``, ``peak_tokens_s`` averaged over the GPUs its pods
    may run on (weighted by their count)."""
    groups = [g for g in nodes if service.gpu_models is None or g.gpu.name in service.gpu_models]
    gpus = sum(g.count * g.gpus for g in groups)
    if gpus == 0:
        return 0.0
    per_gpu = math.fsum(g.count * g.gpus * g.gpu.peak_tokens_s for g in groups) / gpus
    return service.replicas * service.gpus_per_pod * per_gpu * (1.0 - service.prefill_share) * service.tokens_scale


@dataclass(frozen=True)
class Burst:
    """Traffic of ``service`` (None: every service) times ``factor`` during [at_s, at_s + duration_s)."""

    service: str | None
    at_s: float
    duration_s: float
    factor: float


@dataclass(frozen=True)
class RandomBursts:
    """``count`` bursts drawn from the seed, factor and length uniform in their ranges."""

    count: int
    min_factor: float
    max_factor: float
    min_duration_s: float
    max_duration_s: float


@dataclass(frozen=True)
class Workload:
    day_length_s: float
    day_start_hour: float
    noise: float
    bursts: tuple[Burst, ...]
    random_bursts: RandomBursts


@dataclass(frozen=True)
class CapChange:
    """At ``at_s`` the policy ``policy_key`` (namespace/name) gets ``power_cap_w``."""

    at_s: float
    policy_key: str
    power_cap_w: int


@dataclass(frozen=True)
class Scale:
    """At ``at_s`` the service gets ``replicas`` pods (new pods arrive within that second)."""

    at_s: float
    service: str
    replicas: int


Event = CapChange | Scale


@dataclass(frozen=True)
class Timing:
    agent_interval_s: float
    controller_interval_s: float
    pod_startup_s: float
    warmup_s: float
    settle_s: float


@dataclass(frozen=True)
class Scheduler:
    """kube-scheduler's profile: ``gpu_scoring`` (LeastAllocated spreads, MostAllocated
    packs) and the weight of the extender's priorities."""

    gpu_scoring: str
    extender_weight: float


@dataclass(frozen=True)
class Scenario:
    """A valid scenario. ``policies`` are the raw documents (as the API serves them)."""

    name: str
    description: str
    duration_s: float
    step_s: float
    seed: int
    timing: Timing
    scheduler: Scheduler
    racks: tuple[Rack, ...]
    nodes: tuple[NodeGroup, ...]
    policies: tuple[Mapping[str, Any], ...]
    services: tuple[Service, ...]
    workload: Workload
    events: tuple[Event, ...]

    def with_overrides(
        self, *, duration_s: float | None = None, seed: int | None = None
    ) -> Scenario:
        """The same scenario with another duration (the day is compressed into it) or seed."""
        changes: dict[str, Any] = {}
        if duration_s is not None:
            problems = [
                Problem(f"services[{index}].trace", problem)
                for index, service in enumerate(self.services)
                if service.trace is not None and (problem := service.trace.coverage_problem(duration_s, "--duration")) is not None
            ]
            if problems:
                raise ScenarioError(problems)
            changes["duration_s"] = duration_s
            if self.workload.day_length_s == self.duration_s:
                changes["workload"] = dataclasses.replace(self.workload, day_length_s=duration_s)
        if seed is not None:
            changes["seed"] = seed
        changed = dataclasses.replace(self, **changes)
        return _scaled_to_utilisation(changed) if duration_s is not None else changed

    def rack(self, rack_id: str) -> Rack:
        return next(r for r in self.racks if r.rack_id == rack_id)

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    @property
    def gpu_count(self) -> int:
        return sum(group.count * group.gpus for group in self.nodes)


@lru_cache(maxsize=1)
def scenario_schema() -> schema.Schema:
    return yaml.safe_load(schema.package_data_text(SCHEMA_RESOURCE))


def default_scenario_text() -> str:
    """The built-in scenario (``powercap/data/scenario-default.yaml``)."""
    return schema.package_data_text(DEFAULT_SCENARIO_RESOURCE)


def load_scenario(
    text: str,
    registry: AlgorithmRegistry | None = None,
    read_trace: TraceReader | None = None,
    *,
    duration_s: float | None = None,
    seed: int | None = None,
) -> Scenario:
    """Parse and validate a scenario; raises :class:`ScenarioError` listing every problem.

    ``read_trace`` reads the files named by ``services[].trace.file``; without it a scenario
    naming one is refused (the built-in scenario has no file to be relative to).
    ``duration_s`` and ``seed`` override ``durationS`` and ``seed`` (the command line's
    --duration and --seed) before any check they affect.
    """
    try:
        document = yaml.load(text, Loader=schema.SAFE_LOADER)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ScenarioError([Problem("", f"invalid YAML{where}: {error.problem}")]) from None
    except yaml.YAMLError as error:
        raise ScenarioError([Problem("", f"invalid YAML: {error}")]) from None
    return scenario_from_document(document, registry, read_trace, duration_s=duration_s, seed=seed)


def scenario_from_document(
    document: Any,
    registry: AlgorithmRegistry | None = None,
    read_trace: TraceReader | None = None,
    *,
    duration_s: float | None = None,
    seed: int | None = None,
) -> Scenario:
    """A :class:`Scenario` from a parsed document; raises :class:`ScenarioError` listing every problem.

    The run lasts ``duration_s`` if given, else ``durationS``; a scenario that leaves
    ``durationS`` out and replays traces lasts as long as its shortest trace plays (from
    ``startS`` at ``speedup``), else 600 s. Events and bursts at or after the end of a
    ``durationS`` the file states are errors; past the end of a run shortened on the
    command line (or by a trace) they are left out, and :func:`run_notices` names them.
    """
    registry = registry or AlgorithmRegistry.default()
    if not isinstance(document, dict):
        raise ScenarioError([Problem("", f"a scenario must be an object, not {schema.json_type_of(document)}")])
    problems = schema.validate(document, scenario_schema())
    if problems:
        raise ScenarioError(problems)
    problems = _traffic_problems(document["services"])
    traced = any("trace" in service for service in document["services"])
    derived = duration_s is None and "durationS" not in document and traced
    defaulted = schema.apply_defaults(document, scenario_schema())
    file_end_s = None if duration_s is not None or derived else float(defaulted["durationS"])
    problems += semantic_problems(defaulted, registry, file_end_s)
    traces = _read_traces(defaulted, read_trace, problems)
    if derived and problems:
        raise ScenarioError(problems)
    if duration_s is None:
        duration_s = _played_duration_s(traces) if derived else float(defaulted["durationS"])
    duration_name = "--duration" if file_end_s is None and not derived else "durationS"
    problems += [
        Problem(join_path(join_path("services", index), "trace"), problem)
        for index, trace in sorted(traces.items())
        if (problem := trace.coverage_problem(duration_s, duration_name)) is not None
    ]
    if problems:
        raise ScenarioError(problems)
    if seed is not None:
        defaulted["seed"] = seed
    scenario = _build(defaulted, traces, duration_s)
    return _scaled_to_utilisation(scenario)


def _played_duration_s(traces: Mapping[int, Trace]) -> float:
    """The longest run every trace can play, in whole seconds (at least 1, at most the schema's 1e6)."""
    longest_s = min(trace.playable_s() for trace in traces.values())
    return float(min(1_000_000, max(1, math.floor(longest_s))))


def _scaled_to_utilisation(scenario: Scenario) -> Scenario:
    """Traces with ``peakUtilisation``: ``scale`` such that the busiest minute of the run
    offers that fraction of what the service's pods serve uncapped."""
    services = list(scenario.services)
    problems = []
    for index, service in enumerate(services):
        trace = service.trace
        if trace is None or trace.peak_utilisation is None:
            continue
        busiest = trace.busiest_minute_tokens_s(scenario.duration_s) / trace.scale
        capacity = uncapped_capacity_tokens_s(service, scenario.nodes)
        if busiest <= 0:
            problems.append(Problem(
                f"services[{index}].trace.peakUtilisation",
                f"the {scenario.duration_s:g} s of trace played from startS {trace.start_s:g} hold no tokens to scale",
            ))
            continue
        scale = trace.peak_utilisation * capacity / busiest
        services[index] = dataclasses.replace(service, trace=dataclasses.replace(trace, scale=scale))
    if problems:
        raise ScenarioError(problems)
    return dataclasses.replace(scenario, services=tuple(services))


def _traffic_problems(services: Sequence[Mapping[str, Any]]) -> list[Problem]:
    """A service's traffic is either peakTokensS (x dailyShape) or a trace (raw document: before defaults)."""
    problems = []
    for index, service in enumerate(services):
        path = join_path("services", index)
        if "trace" in service:
            problems += [
                Problem(join_path(path, field), "cannot be used with trace (the trace gives the traffic)")
                for field in ("peakTokensS", "dailyShape")
                if field in service
            ]
            if {"scale", "peakUtilisation"} <= set(service["trace"]):
                problems.append(Problem(
                    join_path(join_path(path, "trace"), "scale"),
                    "cannot be used with peakUtilisation (which chooses the scale); set one of them",
                ))
        elif "peakTokensS" not in service:
            problems.append(Problem(join_path(path, "peakTokensS"), "is required (or trace, to replay recorded traffic)"))
    return problems


def _read_traces(document: Mapping[str, Any], read_trace: TraceReader | None, problems: list[Problem]) -> dict[int, Trace]:
    """The trace of every service that names one, by service index; problems appended."""
    traces: dict[int, Trace] = {}
    for index, service in enumerate(document["services"]):
        spec = service.get("trace")
        if spec is None:
            continue
        path = join_path(join_path("services", index), "trace")
        file_path = join_path(path, "file")
        if read_trace is None:
            problems.append(Problem(file_path, "trace files are read relative to a scenario file; run with --scenario FILE"))
            continue
        try:
            recorded = parse_trace(read_trace(spec["file"]), spec["format"])
        except FileNotFoundError:
            problems.append(Problem(file_path, f"{spec['file']}: no such file (relative to the scenario file)"))
            continue
        except (OSError, UnicodeDecodeError) as error:
            reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else error.strerror or str(error)
            problems.append(Problem(file_path, f"{spec['file']}: {reason}"))
            continue
        except TraceError as error:
            problems.append(Problem(file_path, f"{spec['file']}: {error}"))
            continue
        trace = Trace(
            file=spec["file"],
            format=spec["format"],
            start_s=float(spec["startS"]),
            speedup=float(spec["speedup"]),
            scale=float(spec.get("scale", 1.0)),
            recorded=recorded,
            peak_utilisation=_optional_float(spec.get("peakUtilisation")),
        )
        busiest = max(recorded.per_second)
        if not math.isfinite(trace.scale * busiest * max(1.0, trace.speedup)):
            problems.append(Problem(join_path(path, "scale"), f"{trace.scale:g} times the trace's busiest second ({busiest:g} tokens) is too large to compute with"))
            continue
        if trace.start_s >= recorded.duration_s:
            problems.append(Problem(path, trace.coverage_problem(0.0) or ""))
            continue
        traces[index] = trace
    return traces


def semantic_problems(document: Mapping[str, Any], registry: AlgorithmRegistry, end_s: float | None = None) -> list[Problem]:
    """What the schema cannot say: names, references, policies, GPU models, times (events and
    bursts at or after ``end_s``, the file's durationS; None: the run's length comes from
    elsewhere, and those are left out with a notice)."""
    problems: list[Problem] = []
    step_s = float(document["stepS"])
    steps_per_second = 1.0 / step_s
    if abs(steps_per_second - round(steps_per_second)) > 1e-9:
        problems.append(Problem("stepS", f"{step_s:g} must divide 1 s (0.1, 0.2, 0.25, 0.5 or 1)"))
    timing = document["timing"]
    if timing["agentIntervalS"] < step_s:
        problems.append(Problem("timing.agentIntervalS", f"must be at least stepS ({step_s:g} s)"))

    rack_ids = _unique_names(document["racks"], "id", "racks", problems)
    node_names: dict[str, str] = {}
    gpu_models: set[str] = set()
    for index, group in enumerate(document["nodes"]):
        path = join_path("nodes", index)
        if group["rack"] not in rack_ids:
            problems.append(Problem(join_path(path, "rack"), f'unknown rack "{group["rack"]}"; racks: {", ".join(rack_ids)}'))
        model_problem = _gpu_model_problem(group)
        if model_problem is not None:
            problems.append(Problem(join_path(path, model_problem[0]), model_problem[1]))
        else:
            gpu_models.add(group["gpuModel"])
        count = group["count"]
        names = [group["name"]] if count == 1 else [f"{group['name']}-{i}" for i in range(count)]
        for name in names:
            if name in node_names:
                problems.append(Problem(join_path(path, "name"), f'node "{name}" is also defined by {node_names[name]}'))
            else:
                node_names[name] = path

    policies: dict[str, Policy] = {}
    for index, policy_document in enumerate(document["policies"]):
        path = join_path("policies", index)
        result = validate_policy(policy_document, registry)
        problems += [Problem(_prefixed(path, p.path), p.message) for p in result.errors]
        if result.ok:
            policy = parse_policy(policy_document, registry)
            if policy.key in policies:
                problems.append(Problem(join_path(path, "metadata.name"), f'policy "{policy.key}" is defined twice'))
            policies[policy.key] = policy

    service_names = _unique_names(document["services"], "name", "services", problems)
    for index, service in enumerate(document["services"]):
        problems += _service_problems(service, join_path("services", index), policies, gpu_models)

    bursts = document["workload"]["bursts"]
    for index, burst in enumerate(bursts):
        if "service" in burst and burst["service"] not in service_names:
            problems.append(Problem(f"workload.bursts[{index}].service", _unknown_service(burst["service"], service_names)))
        if end_s is not None and burst["atS"] >= end_s:
            problems.append(Problem(f"workload.bursts[{index}].atS", f"must be before durationS ({end_s:g} s)"))
    random_bursts = document["workload"]["randomBursts"]
    if random_bursts["minFactor"] > random_bursts["maxFactor"]:
        problems.append(Problem("workload.randomBursts.minFactor", "must not exceed maxFactor"))
    if random_bursts["minDurationS"] > random_bursts["maxDurationS"]:
        problems.append(Problem("workload.randomBursts.minDurationS", "must not exceed maxDurationS"))

    for index, event in enumerate(document["events"]):
        problems += _event_problems(event, join_path("events", index), end_s, policies, service_names)
    return problems


def _prefixed(path: str, child: str) -> str:
    if not child:
        return path
    return f"{path}{child}" if child.startswith("[") else f"{path}.{child}"


def _unique_names(items: Sequence[Mapping[str, Any]], key: str, section: str, problems: list[Problem]) -> list[str]:
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        name = item[key]
        if name in seen:
            problems.append(Problem(f"{section}[{index}].{key}", f'duplicate {key} "{name}" (also {section}[{seen[name]}])'))
        else:
            seen[name] = index
    return list(seen)


def _unknown_service(name: str, known: Sequence[str]) -> str:
    return f'unknown service "{name}"; services: {", ".join(known)}'


def _gpu_model_problem(group: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field, message) when the node group's GPU model cannot be built."""
    preset = physics.PRESETS.get(group["gpuModel"])
    if preset is None:
        return "gpuModel", f'unknown GPU model "{group["gpuModel"]}"; presets: {", ".join(sorted(physics.PRESETS))}'
    try:
        gpu_model(group)
    except ValueError as error:
        # physics names its fields in Python; say them as the scenario does
        message = str(error).removeprefix(f"GpuModel {preset.name!r}: ")
        for python_name, scenario_name in _LIMIT_FIELDS:
            message = message.replace(python_name, scenario_name)
        return "gpuModel", f"the limits do not fit the {preset.name} preset: {message}"
    return None


_LIMIT_FIELDS = (("default_limit_w", "defaultLimitW"), ("min_limit_w", "minLimitW"), ("max_limit_w", "maxLimitW"))


def node_power_model(group: Mapping[str, Any]) -> NodePowerModel:
    """The node group's power beside its GPUs: its ``nodePower`` fields over the GPU preset's
    server (:data:`powercap.physics.NODE_POWER_PRESETS`)."""
    preset = physics.NODE_POWER_PRESETS.get(group["gpuModel"], NodePowerModel(0.0, 0.0))
    given = group.get("nodePower") or {}
    return NodePowerModel(
        idle_w_per_gpu=float(given.get("idleWPerGpu", preset.idle_w_per_gpu)),
        load_w_per_gpu=float(given.get("loadWPerGpu", preset.load_w_per_gpu)),
    )


def gpu_model(group: Mapping[str, Any]) -> GpuModel:
    """The preset with the node group's limit overrides (``ValueError`` when inconsistent)."""
    preset = physics.PRESETS[group["gpuModel"]]
    if not {"minLimitW", "maxLimitW", "defaultLimitW"} & set(group):
        return preset
    max_limit_w = float(group.get("maxLimitW", preset.max_limit_w))
    return dataclasses.replace(
        preset,
        min_limit_w=float(group.get("minLimitW", preset.min_limit_w)),
        max_limit_w=max_limit_w,
        default_limit_w=float(group.get("defaultLimitW", max_limit_w if "maxLimitW" in group else preset.default_limit_w)),
    )


def _service_problems(
    service: Mapping[str, Any], path: str, policies: Mapping[str, Policy], gpu_models: set[str]
) -> list[Problem]:
    problems: list[Problem] = []
    shape = service["dailyShape"]
    shape_problem = _daily_shape_problem(shape)
    if shape_problem is not None:
        problems.append(Problem(join_path(path, "dailyShape"), shape_problem))
    for index, model in enumerate(service.get("gpuModels") or ()):
        if model not in physics.PRESETS:
            problems.append(Problem(f"{path}.gpuModels[{index}]", f'unknown GPU model "{model}"; presets: {", ".join(sorted(physics.PRESETS))}'))
        elif model not in gpu_models:
            problems.append(Problem(f"{path}.gpuModels[{index}]", f'no node has {model} GPUs, so these pods can never be placed'))
    policy_name = service.get("policy")
    if policy_name is not None:
        key = f"{service['namespace']}/{policy_name}"
        policy = policies.get(key)
        if policy is None:
            known = ", ".join(sorted(policies)) or "none"
            problems.append(Problem(join_path(path, "policy"), f'no valid policy "{key}" in policies; policies: {known}'))
        else:
            labels = {SERVICE_LABEL: service["name"], POLICY_LABEL: policy_name, **(service.get("labels") or {})}
            if not policy.selector.matches(labels):
                problems.append(Problem(
                    join_path(path, "policy"),
                    f"the selector of policy {key} does not match the pod labels {labels}; set services[].labels",
                ))
    return problems


def _daily_shape_problem(shape: Any) -> str | None:
    if isinstance(shape, str):
        return None if shape in DAILY_SHAPES else f'unknown shape "{shape}"; shapes: {", ".join(DAILY_SHAPES)}'
    if not isinstance(shape, list) or len(shape) != HOURS_PER_DAY:
        return f"must be a shape name or a list of {HOURS_PER_DAY} hourly factors"
    for value in shape:
        if not is_finite_number(value) or not 0 <= value <= 1:
            return f"hourly factors must be numbers in [0, 1], not {schema.describe_value(value)}"
    return None


def _event_problems(
    event: Mapping[str, Any], path: str, end_s: float | None, policies: Mapping[str, Policy], services: Sequence[str]
) -> list[Problem]:
    problems: list[Problem] = []
    if end_s is not None and event["atS"] >= end_s:
        problems.append(Problem(join_path(path, "atS"), f"must be before durationS ({end_s:g} s)"))
    is_cap = "policy" in event or "powerCapLimit" in event
    is_scale = "service" in event or "replicas" in event
    if is_cap == is_scale:
        problems.append(Problem(path, "must set either policy and powerCapLimit, or service and replicas"))
        return problems
    if is_cap:
        for field in ("policy", "powerCapLimit"):
            if field not in event:
                problems.append(Problem(join_path(path, field), "is required with " + ("powerCapLimit" if field == "policy" else "policy")))
        if "policy" in event and event["policy"] not in policies:
            known = ", ".join(sorted(policies)) or "none"
            problems.append(Problem(join_path(path, "policy"), f'unknown policy "{event["policy"]}" (namespace/name); policies: {known}'))
    else:
        for field in ("service", "replicas"):
            if field not in event:
                problems.append(Problem(join_path(path, field), "is required with " + ("replicas" if field == "service" else "service")))
        if "service" in event and event["service"] not in services:
            problems.append(Problem(join_path(path, "service"), _unknown_service(event["service"], services)))
    return problems


def _build(document: Mapping[str, Any], traces: Mapping[int, Trace], duration_s: float) -> Scenario:
    timing = document["timing"]
    workload = document["workload"]
    random_bursts = workload["randomBursts"]
    events: list[Event] = []
    for event in document["events"]:
        if "policy" in event:
            events.append(CapChange(float(event["atS"]), event["policy"], int(event["powerCapLimit"])))
        else:
            events.append(Scale(float(event["atS"]), event["service"], int(event["replicas"])))
    return Scenario(
        name=document["name"],
        description=document["description"],
        duration_s=duration_s,
        step_s=float(document["stepS"]),
        seed=int(document["seed"]),
        timing=Timing(
            agent_interval_s=float(timing["agentIntervalS"]),
            controller_interval_s=float(timing["controllerIntervalS"]),
            pod_startup_s=float(timing["podStartupS"]),
            warmup_s=float(timing["warmupS"]),
            settle_s=float(timing["settleS"]),
        ),
        scheduler=Scheduler(
            gpu_scoring=document["scheduler"]["gpuScoring"],
            extender_weight=float(document["scheduler"]["extenderWeight"]),
        ),
        racks=tuple(
            Rack(
                rack_id=rack["id"],
                max_power_w=_optional_float(rack.get("maxPower")),
                max_temperature_c=_optional_float(rack.get("maxTemperature")),
                cooling=Cooling(
                    supply_c=float(rack["cooling"]["supplyC"]),
                    rise_c_per_kw=float(rack["cooling"]["riseCPerKw"]),
                    time_constant_s=float(rack["cooling"]["timeConstantS"]),
                ),
            )
            for rack in document["racks"]
        ),
        nodes=tuple(
            NodeGroup(name=group["name"], count=int(group["count"]), rack_id=group["rack"], gpus=int(group["gpus"]), gpu=gpu_model(group),
                      node_power=node_power_model(group))
            for group in document["nodes"]
        ),
        policies=tuple(document["policies"]),
        services=tuple(
            Service(
                name=service["name"],
                namespace=service["namespace"],
                policy_name=service.get("policy"),
                labels=dict(service.get("labels") or {}),
                replicas=int(service["replicas"]),
                gpus_per_pod=int(service["gpusPerPod"]),
                model_size_b=float(service["modelSizeB"]),
                gpu_models=tuple(service["gpuModels"]) if "gpuModels" in service else None,
                power_watts=_optional_float(service.get("powerWatts")),
                prefill_share=float(service["prefillShare"]),
                peak_tokens_s=float(service.get("peakTokensS", 0.0)),
                daily_shape=_daily_shape(service["dailyShape"]),
                pod_skew=float(service["podSkew"]),
                load_bound=float(service["loadBound"]),
                base_latency_s=float(service["baseLatencyS"]),
                max_queue_s=float(service["maxQueueS"]),
                trace=traces.get(index),
            )
            for index, service in enumerate(document["services"])
        ),
        workload=Workload(
            day_length_s=float(workload.get("dayLengthS", duration_s)),
            day_start_hour=float(workload["dayStartHour"]),
            noise=float(workload["noise"]),
            bursts=tuple(
                Burst(burst.get("service"), float(burst["atS"]), float(burst["durationS"]), float(burst["factor"]))
                for burst in workload["bursts"]
            ),
            random_bursts=RandomBursts(
                count=int(random_bursts["count"]),
                min_factor=float(random_bursts["minFactor"]),
                max_factor=float(random_bursts["maxFactor"]),
                min_duration_s=float(random_bursts["minDurationS"]),
                max_duration_s=float(random_bursts["maxDurationS"]),
            ),
        ),
        events=tuple(sorted(events, key=lambda e: e.at_s)),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _daily_shape(shape: Any) -> tuple[float, ...]:
    return DAILY_SHAPES[shape] if isinstance(shape, str) else tuple(float(v) for v in shape)


def run_notices(scenario: Scenario) -> list[str]:
    """What a run of this length cannot contain, said before it starts: events and bursts at
    or after its end (left out), cap changes too close to the end to measure a recovery, and
    an "after convergence" window with no second in it."""
    end_s = scenario.duration_s
    notices = []
    for event in scenario.events:
        if event.at_s < end_s:
            continue
        if isinstance(event, CapChange):
            what = f"the cap change at {event.at_s:g} s ({event.policy_key} -> {event.power_cap_w} W)"
        else:
            what = f"the scaling at {event.at_s:g} s ({event.service} -> {counted(event.replicas, 'replica')})"
        notices.append(f"{what} is past the end of a {end_s:g}-s run: not simulated")
    for burst in scenario.workload.bursts:
        if burst.at_s >= end_s:
            notices.append(
                f"the burst at {burst.at_s:g} s ({burst.service or 'every service'} x{burst.factor:g}) "
                f"is past the end of a {end_s:g}-s run: not simulated"
            )
    changes = [event for event in scenario.events if isinstance(event, CapChange) and event.at_s < end_s]
    for event in changes:
        left_s = end_s - event.at_s
        if left_s < RECOVERY_HOLD_S:
            notices.append(
                f"the cap change at {event.at_s:g} s leaves {left_s:g} s of the run, less than the "
                f"{RECOVERY_HOLD_S:g} s a recovery is measured over"
            )
    seconds = math.ceil(end_s)
    skipped = excluded_seconds(seconds, scenario.timing.warmup_s, [e.at_s for e in changes], scenario.timing.settle_s)
    if len(skipped) >= seconds:
        notices.append(
            f"a {end_s:g}-s run has no second after warmupS ({scenario.timing.warmup_s:g} s) and the "
            "settling after its cap changes: the figures after convergence are not available"
        )
    return notices
