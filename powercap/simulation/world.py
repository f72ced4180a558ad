"""The simulated hardware and what the API server holds: GPUs, nodes, racks, pods.

Mutable engine state, one :class:`World` per strategy run. GPUs are advanced with
:func:`powercap.physics.advance` (the physics the node agent's simulated backend uses);
racks add the inlet model below; nodes and pods render themselves as the Kubernetes
objects the extender and the controller read (Node with the telemetry annotation written
by :func:`powercap.telemetry.to_json`, Pod with ``spec.nodeName`` and a PodScheduled
condition).

Rack inlet air, first order (documented in docs/simulator.md)::

    inlet_ss = supplyC + riseCPerKw x P_rack / 1000
    inlet'   = inlet_ss + (inlet - inlet_ss) x exp(-dt / timeConstantS)

where ``P_rack`` is the rack's power, its GPUs' and what its nodes draw beside them: hot
exhaust recirculating into the cold aisle warms the inlet in proportion to the heat the
rack rejects.

Beside its GPUs each node draws :func:`powercap.physics.non_gpu_power_w` (an idle floor
plus a part following its GPUs' power, per the node group's
:class:`~powercap.physics.NodePowerModel`); its agent reports it as the whole-node reading
of a BMC (:meth:`World.non_gpu_power_w` for every node at once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from powercap import physics
from powercap.objects import GPU_RESOURCE, RACK_LABEL
from powercap.physics import GpuModel, GpuState
from powercap.policies import Policy
from powercap.simulation.scenario import GPU_MODEL_LABEL, Rack, Scenario, Service
from powercap.status import format_time
from powercap.nodeobjects import node_object, object_document, with_telemetry
from powercap.telemetry import NodeTelemetry, to_document

EPOCH = datetime(2026, 1, 5, 0, 0, 0, tzinfo=timezone.utc)
"""Simulated time 0 as a wall-clock moment (timestamps in telemetry and pods)."""


def moment(t_s: float) -> datetime:
    """The wall-clock moment of simulated time ``t_s``."""
    return EPOCH + timedelta(seconds=t_s)


def api_time(t_s: float) -> str:
    """A ``metav1.Time`` as the API server writes it: RFC 3339, whole seconds (truncated)."""
    return format_time(moment(math.floor(t_s)))


def steady_inlet_c(rack: Rack, power_w: float) -> float:
    """``supplyC + riseCPerKw x P / 1000``."""
    return rack.cooling.supply_c + rack.cooling.rise_c_per_kw * power_w / 1000.0


@dataclass(eq=False)
class SimRack:
    spec: Rack
    inlet_c: float
    power_w: float = 0.0
    step_energy_j: float = 0.0
    nodes: list[SimNode] = field(default_factory=list)

    def step_inlet(self, dt_s: float) -> None:
        """First-order response of the inlet to the rack's power (module docstring)."""
        target_c = steady_inlet_c(self.spec, self.power_w)
        self.inlet_c = target_c + (self.inlet_c - target_c) * math.exp(-dt_s / self.spec.cooling.time_constant_s)


class ModelColumns:
    """The :class:`~powercap.physics.GpuModel` parameters of many GPUs, one array per field:
    the vector functions below take it where the scalar ones take a model (a model itself
    also works, its floats broadcasting)."""

    FIELDS = (
        "min_limit_w", "max_limit_w", "idle_w", "peak_compute_w", "decode_saturation_w", "prefill_exponent",
        "decode_exponent", "peak_tokens_s", "slowdown_c", "shutdown_c", "thermal_resistance_c_per_w", "overshoot_fraction",
    )
    min_limit_w: np.ndarray
    max_limit_w: np.ndarray
    idle_w: np.ndarray
    peak_compute_w: np.ndarray
    decode_saturation_w: np.ndarray
    prefill_exponent: np.ndarray
    decode_exponent: np.ndarray
    peak_tokens_s: np.ndarray
    slowdown_c: np.ndarray
    shutdown_c: np.ndarray
    thermal_resistance_c_per_w: np.ndarray
    overshoot_fraction: np.ndarray

    def __init__(self, models: Sequence[GpuModel]) -> None:
        for name in self.FIELDS:
            setattr(self, name, np.array([getattr(model, name) for model in models], dtype=float))

    def take(self, indices: np.ndarray) -> ModelColumns:
        """The columns of the GPUs at ``indices``."""
        taken = ModelColumns([])
        for name in self.FIELDS:
            setattr(taken, name, getattr(self, name)[indices])
        return taken


def _phase_speeds(cap_w: np.ndarray, idle_w: Any, saturation_w: Any, exponent: Any) -> np.ndarray:
    """:func:`powercap.physics.phase_speed` of arrays (``cap_w`` above ``idle_w``, as every clamped cap is)."""
    return np.where(cap_w >= saturation_w, 1.0, np.power((cap_w - idle_w) / (saturation_w - idle_w), exponent))


def work_times(model: ModelColumns | GpuModel, cap_w: np.ndarray, prefill_share: Any) -> tuple[np.ndarray, ...]:
    """Of :func:`powercap.physics.operating_point`: the clamped cap ``C``, the prefill and decode
    times ``p / s_pre`` and ``(1 - p) / s_dec`` and their sum ``T``, the time one uncapped
    busy-second of work takes under ``C``."""
    cap = np.minimum(np.maximum(cap_w, model.min_limit_w), model.max_limit_w)
    share = np.minimum(np.maximum(prefill_share, 0.0), 1.0)
    speed_pre = _phase_speeds(cap, model.idle_w, model.peak_compute_w, model.prefill_exponent)
    speed_dec = _phase_speeds(cap, model.idle_w, model.decode_saturation_w, model.decode_exponent)
    time_pre = share / speed_pre
    time_dec = (1.0 - share) / speed_dec
    return cap, time_pre, time_dec, time_pre + time_dec


def operating_points(
    model: ModelColumns | GpuModel, cap_w: np.ndarray, load: Any, prefill_share: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`powercap.physics.operating_point` of arrays: (power W, tokens/s, relative throughput),
    the same operations in the same order (``np.power`` may differ from ``math.pow`` in the last bit)."""
    cap, time_pre, time_dec, work_time = work_times(model, cap_w, prefill_share)
    load = np.minimum(np.maximum(load, 0.0), 1.0)
    share = np.minimum(np.maximum(prefill_share, 0.0), 1.0)
    busy = np.minimum(1.0, load * work_time)
    busy_power_w = (
        time_pre * np.minimum(cap, model.peak_compute_w) + time_dec * np.minimum(cap, model.decode_saturation_w)
    ) / work_time
    throughput = busy / work_time
    power_w = model.idle_w * (1.0 - busy) + busy * busy_power_w
    return power_w, model.peak_tokens_s * (1.0 - share) * throughput, throughput


def thermal_caps_w(model: ModelColumns | GpuModel, cap_w: np.ndarray, temperature_c: np.ndarray) -> np.ndarray:
    """:func:`powercap.physics.thermal_cap_w` of arrays."""
    cap = np.minimum(np.maximum(cap_w, model.min_limit_w), model.max_limit_w)
    depth = np.minimum(np.maximum((temperature_c - model.slowdown_c) / (model.shutdown_c - model.slowdown_c), 0.0), 1.0)
    return np.where(temperature_c <= model.slowdown_c, cap, cap - (cap - model.min_limit_w) * depth)


class GpuArrays:
    """Every GPU of a world: its model's parameters, its physics state, the limit NVML
    enforces and its load, one array each (index = :attr:`SimGpu.slot`).

    :meth:`advance` is :func:`powercap.physics.advance` for all of them at once, element by
    element the same operations in the same order, so a run gives the figures the scalar
    physics gives (up to ``np.power``'s last bit).
    """

    def __init__(self, models: Sequence[GpuModel], inlet_c: Sequence[float]) -> None:
        self.models = list(models)
        self.columns = ModelColumns(self.models)
        self.distinct_models = list({id(model): model for model in self.models}.values())
        number = {id(model): index for index, model in enumerate(self.distinct_models)}
        self.model_index = np.array([number[id(model)] for model in self.models], dtype=np.int64)  # in distinct_models
        states = [physics.initial_state(model, inlet) for model, inlet in zip(self.models, inlet_c)]
        self.power_w = np.array([state.power_w for state in states], dtype=float)
        self.temperature_c = np.array([state.temperature_c for state in states], dtype=float)
        self.energy_j = np.zeros(len(states))
        self.tokens = np.zeros(len(states))
        self.tokens_s = np.zeros(len(states))
        self.cap_w = np.array([model.default_limit_w for model in self.models], dtype=float)
        self.load = np.zeros(len(states))
        self.prefill_share = np.zeros(len(states))
        self.pod_slot = np.full(len(states), -1, dtype=np.int64)  # the PodArrays slot of its pod, -1: none
        self._decays: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def _step_decays(self, dt_s: float) -> tuple[np.ndarray, np.ndarray]:
        """``exp(-dt / tau_P)`` and ``exp(-dt / tau_T)`` per GPU, by ``math.exp`` as the scalar physics."""
        if dt_s not in self._decays:
            step = max(dt_s, 0.0)
            self._decays[dt_s] = (
                np.array([math.exp(-step / m.power_time_constant_s) for m in self.models]),
                np.array([math.exp(-step / m.thermal_time_constant_s) for m in self.models]),
            )
        return self._decays[dt_s]

    def advance(self, inlet_c: np.ndarray, dt_s: float) -> tuple[np.ndarray, np.ndarray]:
        """One step of every GPU (:func:`powercap.physics.advance`); returns each GPU's energy (J)
        and tokens of the step, as the differences of its counters."""
        model = self.columns
        power_decay, temperature_decay = self._step_decays(dt_s)
        cap = thermal_caps_w(model, self.cap_w, self.temperature_c)
        target_w, tokens_s, _ = operating_points(model, cap, self.load, self.prefill_share)
        load = np.minimum(np.maximum(self.load, 0.0), 1.0)
        share = np.minimum(np.maximum(self.prefill_share, 0.0), 1.0)
        demand_w = model.idle_w + load * (
            share * (model.peak_compute_w - model.idle_w) + (1.0 - share) * (model.decode_saturation_w - model.idle_w)
        )
        old_power_w = self.power_w
        rising = (demand_w > cap) & (old_power_w < target_w - physics.RISING_EDGE_FRACTION * cap)
        power_w = np.where(
            rising,
            np.minimum(demand_w + (old_power_w - demand_w) * power_decay, cap * (1.0 + model.overshoot_fraction)),
            target_w + (old_power_w - target_w) * power_decay,
        )
        steady_c = inlet_c + model.thermal_resistance_c_per_w * power_w
        self.temperature_c = steady_c + (self.temperature_c - steady_c) * temperature_decay
        energy_j = self.energy_j + 0.5 * (old_power_w + power_w) * dt_s
        tokens = self.tokens + tokens_s * dt_s
        energy_step_j, token_step = energy_j - self.energy_j, tokens - self.tokens
        self.power_w, self.energy_j, self.tokens, self.tokens_s = power_w, energy_j, tokens, tokens_s
        return energy_step_j, token_step


@dataclass(eq=False)
class SimGpu:
    """One GPU: its model, node, pod, and its slot in the world's :class:`GpuArrays`, which hold
    its physics state, the limit NVML enforces and its load.

    Reads like an NVML snapshot (:class:`powercap.agentplan.GpuReading`): the agent's plan
    and telemetry take the GPU itself, unchanged while they run.
    """

    uuid: str
    index: int
    model: GpuModel
    node: SimNode
    arrays: GpuArrays
    slot: int
    pod: SimPod | None = None

    @property
    def state(self) -> GpuState:
        arrays, slot = self.arrays, self.slot
        return GpuState(
            power_w=float(arrays.power_w[slot]),
            temperature_c=float(arrays.temperature_c[slot]),
            energy_j=float(arrays.energy_j[slot]),
            tokens=float(arrays.tokens[slot]),
            tokens_s=float(arrays.tokens_s[slot]),
        )

    @property
    def cap_w(self) -> float:
        return float(self.arrays.cap_w[self.slot])

    @cap_w.setter
    def cap_w(self, value: float) -> None:
        self.arrays.cap_w[self.slot] = value

    @property
    def workload(self) -> physics.Workload:
        return physics.Workload(float(self.arrays.load[self.slot]), float(self.arrays.prefill_share[self.slot]))

    @property
    def power_w(self) -> float:
        return float(self.arrays.power_w[self.slot])

    @property
    def temperature_c(self) -> float:
        return float(self.arrays.temperature_c[self.slot])

    @property
    def limit_w(self) -> float:
        """The enforced limit (no out-of-band limiter here: the requested one)."""
        return self.cap_w

    @property
    def requested_limit_w(self) -> float:
        return self.cap_w

    @property
    def min_limit_w(self) -> float:
        return self.model.min_limit_w

    @property
    def max_limit_w(self) -> float:
        return self.model.max_limit_w

    @property
    def default_limit_w(self) -> float:
        return self.model.default_limit_w

    @property
    def slowdown_c(self) -> float:
        return self.model.slowdown_c


@dataclass(eq=False)
class SimNode:
    name: str
    rack: SimRack
    gpus: list[SimGpu] = field(default_factory=list)
    telemetry: NodeTelemetry | None = None
    free_gpu_count: int = 0  # kept by SimPod.bind and unbind
    node_power: physics.NodePowerModel = physics.NodePowerModel(0.0, 0.0)  # beside its GPUs
    index: int = 0  # its place in World.nodes (and the node arrays)
    _object: dict[str, Any] | None = None

    @property
    def free_gpus(self) -> list[SimGpu]:
        return [gpu for gpu in self.gpus if gpu.pod is None]

    @property
    def gpu_model(self) -> GpuModel:
        return self.gpus[0].model

    def set_telemetry(self, telemetry: NodeTelemetry) -> None:
        """The agent published the status of the node's PowerCapNode."""
        self.telemetry = telemetry
        self._object = None

    def telemetry_object(self) -> dict[str, Any] | None:
        """The node's PowerCapNode as its agent published it (None before the first publish)."""
        if self.telemetry is None:
            return None
        return {**node_object(self.name), "status": to_document(self.telemetry)}

    def api_object(self) -> dict[str, Any]:
        """The Node as the cluster view reads it: merged with its PowerCapNode, as the
        extender and controller merge them (:mod:`powercap.nodeobjects`); a new dict only
        when the telemetry changed."""
        if self._object is None:
            published = self.telemetry_object()
            document = object_document(published) if published is not None else None
            node: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.name,
                    "labels": {RACK_LABEL: self.rack.spec.rack_id, GPU_MODEL_LABEL: self.gpu_model.name},
                },
                "status": {
                    "capacity": {GPU_RESOURCE: str(len(self.gpus))},
                    "allocatable": {GPU_RESOURCE: str(len(self.gpus))},
                },
            }
            self._object = node if document is None else with_telemetry(node, document)
        return self._object


class PodArrays:
    """Every pod ever created in a world (index = :attr:`SimPod.slot`), the figures the physics
    step updates for all serving pods at once: queue, tokens served, rates, service.

    ``layout_changes`` counts binds and unbinds, so that what depends on which GPU serves
    which pod is recomputed only when that changes.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.count = 0
        self.layout_changes = 0
        self.backlog_tokens = np.zeros(capacity)
        self.served_tokens = np.zeros(capacity)
        self.rate_tokens_s = np.zeros(capacity)  # served over the last physics step
        self.offered_tokens_s = np.zeros(capacity)  # its share of the service's traffic now
        self.uncapped_tokens_s = np.zeros(capacity)  # set at binding (see SimPod.bind)
        self.service_index = np.zeros(capacity, dtype=np.int64)

    _COLUMNS = ("backlog_tokens", "served_tokens", "rate_tokens_s", "offered_tokens_s", "uncapped_tokens_s", "service_index")

    def add(self, service_index: int) -> int:
        """A slot for a new pod of the service."""
        if self.count == len(self.backlog_tokens):
            for name in self._COLUMNS:
                column = getattr(self, name)
                setattr(self, name, np.concatenate([column, np.zeros_like(column)]))
        slot = self.count
        self.count += 1
        self.service_index[slot] = service_index
        return slot


def _pod_column(name: str) -> property:
    def get(pod: SimPod) -> float:
        return float(getattr(pod.arrays, name)[pod.slot])

    def set_(pod: SimPod, value: float) -> None:
        getattr(pod.arrays, name)[pod.slot] = value

    return property(get, set_)


@dataclass(eq=False)
class SimPod:
    """A pod of a service: where it runs, when it serves, its queue (in the world's :class:`PodArrays`)."""

    name: str
    index: int
    service: Service
    weight: float
    created_s: float
    service_index: int
    arrays: PodArrays
    gpus: list[SimGpu] = field(default_factory=list)
    node: SimNode | None = None
    bound_s: float | None = None
    next_attempt_s: float = 0.0  # when the scheduler tries it (again)
    tick_served_tokens: float = 0.0  # at the agent's last tick, for its tokens/s
    tick_s: float | None = None
    key: str = ""  # namespace/name
    uid: str = ""
    unschedulable: str | None = None  # kube-scheduler's message of its last failed attempt
    slot: int = -1
    _object: dict[str, Any] | None = None

    backlog_tokens = _pod_column("backlog_tokens")
    served_tokens = _pod_column("served_tokens")
    rate_tokens_s = _pod_column("rate_tokens_s")
    offered_tokens_s = _pod_column("offered_tokens_s")
    uncapped_tokens_s = _pod_column("uncapped_tokens_s")

    def __post_init__(self) -> None:
        self.key = f"{self.service.namespace}/{self.name}"
        self.uid = f"uid-{self.service.namespace}-{self.name}"
        self.next_attempt_s = self.created_s
        self.slot = self.arrays.add(self.service_index)

    def serving(self, t_s: float, startup_s: float) -> bool:
        return self.bound_s is not None and t_s >= self.bound_s + startup_s

    def bind(self, node: SimNode, t_s: float) -> None:
        """Take the node's first free GPUs. ``uncapped_tokens_s``: tokens/s flat out with no
        cap, ``sum peak_tokens_s x (1 - prefillShare) x tokens_scale`` over its GPUs."""
        gpus = node.free_gpus[: self.service.gpus_per_pod]
        for gpu in gpus:
            gpu.pod = self
            gpu.arrays.pod_slot[gpu.slot] = self.slot
        self.gpus, self.node, self.bound_s = gpus, node, t_s
        node.free_gpu_count -= len(gpus)
        share = self.service.prefill_share
        self.uncapped_tokens_s = sum(g.model.peak_tokens_s for g in gpus) * (1.0 - share) * self.service.tokens_scale
        self.arrays.layout_changes += 1
        self._object = None

    def refuse(self, message: str) -> None:
        """A failed scheduling attempt: kube-scheduler writes PodScheduled False with ``message``."""
        if message != self.unschedulable:
            self.unschedulable, self._object = message, None

    def unbind(self) -> None:
        for gpu in self.gpus:
            gpu.pod = None
            gpu.arrays.pod_slot[gpu.slot] = -1
            gpu.arrays.load[gpu.slot] = gpu.arrays.prefill_share[gpu.slot] = 0.0  # idle
        if self.node is not None:
            self.node.free_gpu_count += len(self.gpus)
        self.gpus, self.node = [], None
        self.arrays.layout_changes += 1
        self._object = None

    def api_object(self, t_s: float, startup_s: float) -> dict[str, Any]:
        """The Pod as the API serves it now (Pending, then bound, then Running)."""
        running = self.serving(t_s, startup_s)
        if self._object is None or (running and self._object["status"]["phase"] != "Running"):
            pod = self.service.pod_object(self.name)
            pod["metadata"]["uid"] = self.uid
            pod["metadata"]["creationTimestamp"] = api_time(self.created_s)
            if self.node is not None and self.bound_s is not None:
                pod["spec"]["nodeName"] = self.node.name
                pod["status"] = {
                    "phase": "Running" if running else "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": api_time(self.bound_s)}],
                }
            elif self.unschedulable is not None:
                pod["status"]["conditions"] = [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": self.unschedulable,
                }]
            self._object = pod
        return self._object


class RackArrays:
    """Every rack's inlet, one array each (index = the rack's place in the scenario):
    :meth:`SimRack.step_inlet` for all racks at once."""

    def __init__(self, racks: Sequence[SimRack]) -> None:
        self.racks = list(racks)
        self.supply_c = np.array([rack.spec.cooling.supply_c for rack in racks], dtype=float)
        self.rise_c_per_kw = np.array([rack.spec.cooling.rise_c_per_kw for rack in racks], dtype=float)
        self.inlet_c = np.array([rack.inlet_c for rack in racks], dtype=float)
        self._decays: dict[float, np.ndarray] = {}

    def step_inlet(self, power_w: np.ndarray, dt_s: float) -> None:
        """The module docstring's first-order inlet, each rack at its own power; the racks'
        ``power_w`` and ``inlet_c`` are updated too (the agents read them)."""
        if dt_s not in self._decays:
            self._decays[dt_s] = np.array([math.exp(-dt_s / rack.spec.cooling.time_constant_s) for rack in self.racks])
        target_c = self.supply_c + self.rise_c_per_kw * power_w / 1000.0
        self.inlet_c = target_c + (self.inlet_c - target_c) * self._decays[dt_s]
        for rack, rack_power_w, inlet_c in zip(self.racks, power_w.tolist(), self.inlet_c.tolist()):
            rack.power_w, rack.inlet_c = rack_power_w, inlet_c


@dataclass(eq=False)
class World:
    """Everything of one strategy run that changes over simulated time."""

    racks: dict[str, SimRack]
    nodes: list[SimNode]
    gpus: list[SimGpu]
    policies: dict[str, dict[str, Any]]  # namespace/name -> PowerCappingPolicy document
    gpu_arrays: GpuArrays
    rack_arrays: RackArrays
    gpu_rack: np.ndarray  # each GPU's rack, as an index of rack_arrays
    pod_arrays: PodArrays = field(default_factory=PodArrays)
    node_rack: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # each node's rack index
    gpu_node: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # each GPU's node index
    node_idle_w: np.ndarray = field(default_factory=lambda: np.zeros(0))  # gpus x idle_w_per_gpu
    node_load_w: np.ndarray = field(default_factory=lambda: np.zeros(0))  # gpus x load_w_per_gpu
    node_gpu_max_w: np.ndarray = field(default_factory=lambda: np.zeros(0))  # sum of its GPUs' maximum limits
    node_non_gpu_w: np.ndarray = field(default_factory=lambda: np.zeros(0))  # beside the GPUs, the last step
    parsed_policies: dict[str, Policy] = field(default_factory=dict)
    pods: dict[str, SimPod] = field(default_factory=dict)  # key -> pod, active only
    pending: list[SimPod] = field(default_factory=list)
    next_pod_index: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, scenario: Scenario, policies: dict[str, Policy]) -> World:
        racks = {spec.rack_id: SimRack(spec=spec, inlet_c=spec.cooling.supply_c) for spec in scenario.racks}
        rack_index = {rack_id: index for index, rack_id in enumerate(racks)}
        members: list[tuple[SimNode, int, GpuModel]] = []
        nodes: list[SimNode] = []
        for group in scenario.nodes:
            rack = racks[group.rack_id]
            for name in group.node_names:
                node = SimNode(name=name, rack=rack, node_power=group.node_power, index=len(nodes))
                members += [(node, index, group.gpu) for index in range(group.gpus)]
                rack.nodes.append(node)
                nodes.append(node)
        node_rack = np.array([rack_index[node.rack.spec.rack_id] for node in nodes], dtype=np.int64)
        gpu_node = np.array([node.index for node, _, _ in members], dtype=np.int64)
        gpu_counts = np.bincount(gpu_node, minlength=len(nodes)).astype(float)
        node_gpu_max_w = np.bincount(gpu_node, weights=[model.max_limit_w for _, _, model in members], minlength=len(nodes))
        node_idle_w = gpu_counts * np.array([node.node_power.idle_w_per_gpu for node in nodes])
        node_load_w = gpu_counts * np.array([node.node_power.load_w_per_gpu for node in nodes])
        # every GPU starts idle (physics.initial_state), its node beside it at that load
        gpu_idle_w = np.array([model.idle_w for _, _, model in members])
        node_non_gpu_w = _non_gpu_power_w(gpu_idle_w, gpu_node, node_idle_w, node_load_w, node_gpu_max_w)
        rack_idle_w = np.bincount(node_rack, weights=np.bincount(gpu_node, weights=gpu_idle_w, minlength=len(nodes)) + node_non_gpu_w,
                                  minlength=len(racks))
        for rack, idle_w in zip(racks.values(), rack_idle_w.tolist()):
            rack.power_w = idle_w
            rack.inlet_c = steady_inlet_c(rack.spec, rack.power_w)
        arrays = GpuArrays([model for _, _, model in members], [node.rack.inlet_c for node, _, _ in members])
        gpus: list[SimGpu] = []
        for slot, (node, index, model) in enumerate(members):
            gpu = SimGpu(uuid=f"GPU-{node.name}-{index:02d}", index=index, model=model, node=node, arrays=arrays, slot=slot)
            node.gpus.append(gpu)
            node.free_gpu_count += 1
            gpus.append(gpu)
        documents = {_policy_key(doc): dict(doc) for doc in scenario.policies}
        return cls(
            racks=racks, nodes=nodes, gpus=gpus, policies=documents, gpu_arrays=arrays,
            rack_arrays=RackArrays(list(racks.values())),
            gpu_rack=np.array([rack_index[node.rack.spec.rack_id] for node, _, _ in members], dtype=np.int64),
            node_rack=node_rack, gpu_node=gpu_node, node_idle_w=node_idle_w, node_load_w=node_load_w,
            node_gpu_max_w=node_gpu_max_w, node_non_gpu_w=node_non_gpu_w,
            parsed_policies=dict(policies),
        )

    def non_gpu_power_w(self, gpu_power_w: np.ndarray) -> np.ndarray:
        """What every node draws beside its GPUs when they draw ``gpu_power_w`` (per GPU):
        :func:`powercap.physics.non_gpu_power_w` of each node, on arrays."""
        return _non_gpu_power_w(gpu_power_w, self.gpu_node, self.node_idle_w, self.node_load_w, self.node_gpu_max_w)

    def policy_of(self, pod: SimPod) -> Policy | None:
        name = pod.service.policy_name
        return self.parsed_policies.get(f"{pod.service.namespace}/{name}") if name is not None else None


def _non_gpu_power_w(
    gpu_power_w: np.ndarray, gpu_node: np.ndarray, idle_w: np.ndarray, load_w: np.ndarray, gpu_max_w: np.ndarray,
) -> np.ndarray:
    """``idle + load x min(1, node GPU power / its GPUs' maximum)`` per node."""
    node_gpu_w = np.bincount(gpu_node, weights=gpu_power_w, minlength=len(idle_w))
    share = np.divide(node_gpu_w, gpu_max_w, out=np.zeros_like(node_gpu_w), where=gpu_max_w > 0)
    return idle_w + load_w * np.clip(share, 0.0, 1.0)


def _policy_key(document: Any) -> str:
    metadata = document.get("metadata") or {}
    return f"{metadata.get('namespace') or 'default'}/{metadata['name']}"
