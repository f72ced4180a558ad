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

where ``P_rack`` is the rack's GPU power: hot exhaust recirculating into the cold aisle
warms the inlet in proportion to the heat the rack rejects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from powercap import physics
from powercap.objects import GPU_RESOURCE, RACK_LABEL
from powercap.physics import GpuModel, GpuState
from powercap.policies import Policy
from powercap.simulation.scenario import GPU_MODEL_LABEL, Rack, Scenario, Service
from powercap.status import format_time
from powercap.telemetry import TELEMETRY_ANNOTATION, NodeTelemetry, to_json

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


@dataclass(eq=False)
class SimGpu:
    """One GPU: physics state, the limit NVML enforces, its pod, and its load.

    Reads like an NVML snapshot (:class:`powercap.agentplan.GpuReading`): the agent's plan
    and telemetry take the GPU itself, unchanged while they run.
    """

    uuid: str
    index: int
    model: GpuModel
    state: GpuState
    cap_w: float
    node: SimNode
    pod: SimPod | None = None
    workload: physics.Workload = physics.IDLE

    @property
    def power_w(self) -> float:
        return self.state.power_w

    @property
    def temperature_c(self) -> float:
        return self.state.temperature_c

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
    _object: dict[str, Any] | None = None

    @property
    def free_gpus(self) -> list[SimGpu]:
        return [gpu for gpu in self.gpus if gpu.pod is None]

    @property
    def gpu_model(self) -> GpuModel:
        return self.gpus[0].model

    def set_telemetry(self, telemetry: NodeTelemetry) -> None:
        """The agent patched the node's telemetry annotation."""
        self.telemetry = telemetry
        self._object = None

    def api_object(self) -> dict[str, Any]:
        """The Node as the API serves it; a new dict only when the telemetry changed."""
        if self._object is None:
            annotations = {TELEMETRY_ANNOTATION: to_json(self.telemetry)} if self.telemetry is not None else {}
            self._object = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.name,
                    "labels": {RACK_LABEL: self.rack.spec.rack_id, GPU_MODEL_LABEL: self.gpu_model.name},
                    "annotations": annotations,
                },
                "status": {
                    "capacity": {GPU_RESOURCE: str(len(self.gpus))},
                    "allocatable": {GPU_RESOURCE: str(len(self.gpus))},
                },
            }
        return self._object


@dataclass(eq=False)
class SimPod:
    """A pod of a service: where it runs, when it serves, its queue."""

    name: str
    index: int
    service: Service
    weight: float
    created_s: float
    service_index: int
    gpus: list[SimGpu] = field(default_factory=list)
    node: SimNode | None = None
    bound_s: float | None = None
    next_attempt_s: float = 0.0  # when the scheduler tries it (again)
    backlog_tokens: float = 0.0
    served_tokens: float = 0.0
    rate_tokens_s: float = 0.0  # served over the last physics step
    offered_tokens_s: float = 0.0  # its share of the service's traffic now
    step_tokens: float = 0.0  # physics tokens of its GPUs in the current step
    tick_served_tokens: float = 0.0  # at the agent's last tick, for its tokens/s
    tick_s: float | None = None
    uncapped_tokens_s: float = 0.0  # set at binding (see :meth:`bind`)
    key: str = ""  # namespace/name
    uid: str = ""
    unschedulable: str | None = None  # kube-scheduler's message of its last failed attempt
    _object: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.key = f"{self.service.namespace}/{self.name}"
        self.uid = f"uid-{self.service.namespace}-{self.name}"
        self.next_attempt_s = self.created_s

    def serving(self, t_s: float, startup_s: float) -> bool:
        return self.bound_s is not None and t_s >= self.bound_s + startup_s

    def bind(self, node: SimNode, t_s: float) -> None:
        """Take the node's first free GPUs. ``uncapped_tokens_s``: tokens/s flat out with no
        cap, ``sum peak_tokens_s x (1 - prefillShare) x tokens_scale`` over its GPUs."""
        gpus = node.free_gpus[: self.service.gpus_per_pod]
        for gpu in gpus:
            gpu.pod = self
        self.gpus, self.node, self.bound_s = gpus, node, t_s
        share = self.service.prefill_share
        self.uncapped_tokens_s = sum(g.model.peak_tokens_s for g in gpus) * (1.0 - share) * self.service.tokens_scale
        self._object = None

    def refuse(self, message: str) -> None:
        """A failed scheduling attempt: kube-scheduler writes PodScheduled False with ``message``."""
        if message != self.unschedulable:
            self.unschedulable, self._object = message, None

    def unbind(self) -> None:
        for gpu in self.gpus:
            gpu.pod = None
            gpu.workload = physics.IDLE
        self.gpus, self.node = [], None
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


@dataclass(eq=False)
class World:
    """Everything of one strategy run that changes over simulated time."""

    racks: dict[str, SimRack]
    nodes: list[SimNode]
    gpus: list[SimGpu]
    policies: dict[str, dict[str, Any]]  # namespace/name -> PowerCappingPolicy document
    parsed_policies: dict[str, Policy] = field(default_factory=dict)
    pods: dict[str, SimPod] = field(default_factory=dict)  # key -> pod, active only
    pending: list[SimPod] = field(default_factory=list)
    next_pod_index: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, scenario: Scenario, policies: dict[str, Policy]) -> World:
        racks = {spec.rack_id: SimRack(spec=spec, inlet_c=spec.cooling.supply_c) for spec in scenario.racks}
        nodes: list[SimNode] = []
        gpus: list[SimGpu] = []
        for group in scenario.nodes:
            rack = racks[group.rack_id]
            for name in group.node_names:
                node = SimNode(name=name, rack=rack)
                for index in range(group.gpus):
                    gpu = SimGpu(
                        uuid=f"GPU-{name}-{index:02d}",
                        index=index,
                        model=group.gpu,
                        state=physics.initial_state(group.gpu, rack.inlet_c),
                        cap_w=group.gpu.default_limit_w,
                        node=node,
                    )
                    node.gpus.append(gpu)
                    gpus.append(gpu)
                rack.nodes.append(node)
                nodes.append(node)
        for rack in racks.values():
            rack.power_w = sum(g.state.power_w for n in rack.nodes for g in n.gpus)
            rack.inlet_c = steady_inlet_c(rack.spec, rack.power_w)
        for gpu in gpus:
            gpu.state = physics.initial_state(gpu.model, gpu.node.rack.inlet_c)
        documents = {_policy_key(doc): dict(doc) for doc in scenario.policies}
        return cls(racks=racks, nodes=nodes, gpus=gpus, policies=documents, parsed_policies=dict(policies))

    def policy_of(self, pod: SimPod) -> Policy | None:
        name = pod.service.policy_name
        return self.parsed_policies.get(f"{pod.service.namespace}/{name}") if name is not None else None


def _policy_key(document: Any) -> str:
    metadata = document.get("metadata") or {}
    return f"{metadata.get('namespace') or 'default'}/{metadata['name']}"
