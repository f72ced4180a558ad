"""The agent's Prometheus metrics, ``/healthz`` and ``/status``, on ``--metrics-bind``.

Every metric lives in the agent's own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one), so tests and benchmarks can run several agents in one
process.

A GPU's series carry dcgm-exporter's label names with dcgm-exporter's meanings, so the two
join without ``label_replace``: ``gpu`` (the NVML index, a string), ``UUID``
(``GPU-...``), ``modelName`` (NVML's product name) and ``Hostname`` (the node's name). The
gauges of a GPU's readings add ``pod``, ``namespace`` and ``container`` of the pod using
it, empty where no pod is known; ``powercap_gpu_info`` adds the ``policy`` that governs it.
Counters and ``powercap_gpu_degraded`` carry the GPU's identity with the pod labels empty, so a
new pod never resets them and Prometheus does not label them with the agent's own pod. When a GPU's pod
changes, its series with the old pod's labels are removed, not left to go stale.

=============================================================  ==================================================
``powercap_gpu_info{gpu,UUID,modelName,Hostname,pod,...,policy}``  1; who uses the GPU and which policy governs it
``powercap_gpu_power_watts{gpu,UUID,...,pod,namespace,container}``  power drawn (NVML, 100 ms average)
``powercap_gpu_power_limit_watts{...}``                        enforced power limit
``powercap_gpu_planned_limit_watts{...}``                      the cap the control law wants (Observe / dry-run too)
``powercap_gpu_temperature_celsius{...}``                      die temperature
``powercap_gpu_tokens_per_joule{...}``                         tokens/s of the GPU's pod over its GPUs' power
``powercap_gpu_limited_out_of_band{...}``                      1 while another limiter holds the GPU under our cap
``powercap_gpu_degraded{gpu,UUID,...,pod="",...}``             1 while the last NVML operation on the GPU failed
``powercap_gpu_energy_joules_total{gpu,UUID,...,pod="",...}``  energy since the agent started (:mod:`nodeagent.energy`)
``powercap_nvml_errors_total{gpu,UUID,...,pod="",...,error}``  NVML errors, by GPU and error class
``powercap_cap_changes_total{reason}``                         limits written, by reason
``powercap_agent_policy_fresh``                                1 while the policy view is current
``powercap_agent_policy_unreadable{policy}``                   1 while a policy cannot be read (its caps are held)
``powercap_agent_tick_duration_seconds``                       histogram of one control tick (wall time)
=============================================================  ==================================================

``/healthz`` answers 200 while ticks complete (the last one ended less than
``3 x interval`` ago), else 503: the DaemonSet's liveness and readiness probes.
``/status`` answers the agent's per-GPU view as JSON (degraded GPUs and their last error).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from powercap.nodepower import NodePower
from powercap.runtime.httpserver import Route, check_reply, metrics_route
from powercap.runtime.programmetrics import register_program_metrics

# dcgm-exporter's label names (its Kubernetes mapping adds pod, namespace and container)
GPU_IDENTITY_LABELS = ("gpu", "UUID", "modelName", "Hostname")
GPU_WORKLOAD_LABELS = ("pod", "namespace", "container")
GPU_READING_LABELS = GPU_IDENTITY_LABELS + GPU_WORKLOAD_LABELS
GPU_INFO_LABELS = GPU_READING_LABELS + ("policy",)


@dataclass(frozen=True, slots=True)
class GpuLabels:
    """Who a GPU is and who uses it, as its series label it.

    ``pod``, ``namespace`` and ``container`` are the pod's (empty when no pod is known;
    ``container`` also when several of the pod's containers ask for GPUs); ``policy`` is
    the name of the policy governing the GPU, in ``namespace`` (for a node run with
    ``--policy FILE`` and no pod, ``namespace`` is that policy's).
    """

    index: int
    uuid: str
    model: str
    node: str
    pod: str = ""
    namespace: str = ""
    container: str = ""
    policy: str = ""

    def identity(self) -> dict[str, str]:
        return {"gpu": str(self.index), "UUID": self.uuid, "modelName": self.model, "Hostname": self.node}

    def unattributed(self) -> dict[str, str]:
        """The GPU's own labels with the pod labels present but empty: a counter's series (a new
        pod never resets it), which Prometheus, honoring labels, then does not give the agent
        pod's own pod, namespace and container."""
        return {**self.identity(), "pod": "", "namespace": "", "container": ""}

    def reading(self) -> dict[str, str]:
        return {**self.identity(), "pod": self.pod, "namespace": self.namespace, "container": self.container}

    def info(self) -> dict[str, str]:
        return {**self.reading(), "policy": self.policy}


class AgentMetrics:
    """The agent's metrics in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        register_program_metrics(self.registry)
        r = self.registry
        self.info = Gauge(
            "powercap_gpu_info",
            "Always 1: the GPU (dcgm-exporter's gpu, UUID, modelName, Hostname), the pod using it and the policy "
            "governing it (empty when none).",
            GPU_INFO_LABELS,
            registry=r,
        )
        self.power = Gauge("powercap_gpu_power_watts", "Power drawn by the GPU, in watts.", GPU_READING_LABELS, registry=r)
        self.limit = Gauge(
            "powercap_gpu_power_limit_watts", "Enforced power limit of the GPU, in watts.", GPU_READING_LABELS, registry=r
        )
        self.planned = Gauge(
            "powercap_gpu_planned_limit_watts",
            "Power limit the control law wants for the GPU, in watts (set only in Enforce mode without --dry-run).",
            GPU_READING_LABELS,
            registry=r,
        )
        self.temperature = Gauge(
            "powercap_gpu_temperature_celsius", "GPU die temperature, in degrees Celsius.", GPU_READING_LABELS, registry=r
        )
        self.ratio = Gauge(
            "powercap_gpu_tokens_per_joule", "Generated tokens per joule of the pod on the GPU.", GPU_READING_LABELS,
            registry=r,
        )
        self.out_of_band = Gauge(
            "powercap_gpu_limited_out_of_band",
            "1 while another limiter holds the GPU below the limit the agent set, else 0.",
            GPU_READING_LABELS,
            registry=r,
        )
        self.degraded = Gauge(
            "powercap_gpu_degraded", "1 while the last NVML operation on the GPU failed, else 0.", GPU_READING_LABELS,
            registry=r,
        )
        self.energy = Counter(
            "powercap_gpu_energy_joules",
            "Energy the GPU consumed since the agent started, in joules: from NVML's total energy counter "
            "(millijoules, read every few seconds) where the GPU has one, else its power integrated over the "
            "agent's ticks (the agent logs which).",
            GPU_READING_LABELS,
            registry=r,
        )
        self.cap_changes = Counter(
            "powercap_cap_changes", "Power limits written to GPUs, by reason.", ["reason"], registry=r
        )
        self.nvml_errors = Counter(
            "powercap_nvml_errors", "NVML errors, by GPU and error class.", GPU_READING_LABELS + ("error",), registry=r
        )
        self.policy_fresh = Gauge(
            "powercap_agent_policy_fresh", "1 while the agent's view of policies and pods is current, else 0.", registry=r
        )
        self.policy_unreadable = Gauge(
            "powercap_agent_policy_unreadable",
            "1 while the policy cannot be read by the agent (no powerCapLimit, a selector it cannot read): "
            "the caps of its GPUs are held.",
            ["policy"],
            registry=r,
        )
        self._unreadable: set[str] = set()
        self.tick_duration = Histogram(
            "powercap_agent_tick_duration_seconds",
            "Wall time of one control tick, in seconds.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self._shown: dict[str, GpuLabels] = {}

    def show_gpu(self, labels: GpuLabels) -> None:
        """``powercap_gpu_info`` of the GPU; when its pod or policy changed, the series
        labelled with the old ones are removed first."""
        shown = self._shown.get(labels.uuid)
        if shown == labels:
            return
        if shown is not None:
            self.info.remove(*shown.info().values())
            if shown.reading() != labels.reading():
                self._remove_readings(shown)
        self.info.labels(**labels.info()).set(1)
        self._shown[labels.uuid] = labels

    def labels_of(self, uuid: str) -> GpuLabels | None:
        """The labels the GPU's series carry now (None before :meth:`show_gpu`)."""
        return self._shown.get(uuid)

    def set_unreadable_policies(self, policies: Iterable[str]) -> None:
        """``powercap_agent_policy_unreadable`` = 1 for these policies; the series of the
        others are dropped."""
        now = set(policies)
        for policy in self._unreadable - now:
            self.policy_unreadable.remove(policy)
        for policy in now:
            self.policy_unreadable.labels(policy).set(1)
        self._unreadable = now

    def forget_gpu_readings(self, uuid: str) -> None:
        """Drop a GPU's reading series (it could not be read: no stale values)."""
        shown = self._shown.get(uuid)
        if shown is not None:
            self._remove_readings(shown)

    def _remove_readings(self, labels: GpuLabels) -> None:
        for gauge in (self.power, self.limit, self.planned, self.temperature, self.ratio, self.out_of_band):
            try:
                gauge.remove(*labels.reading().values())
            except KeyError:
                pass


def agent_routes(metrics: AgentMetrics, healthy: Callable[[], bool], status: Callable[[], dict[str, Any]]) -> dict[str, Route]:
    """``/metrics``, ``/healthz`` (503 while ticks stall) and ``/status`` (the agent's GPUs as JSON)."""
    return {
        "/metrics": metrics_route(metrics.registry),
        "/healthz": lambda: check_reply(None if healthy() else "ticks stalled"),
        "/status": lambda: (200, "application/json", json.dumps(status(), indent=1).encode()),
    }


class NodePowerMetrics:
    """The whole-node power series (:mod:`nodeagent.nodepower`), in the agent's registry.

    ``powercap_node_power_source{source}`` is 1 for the source the last tick used and 0 for
    the other configured ones (``estimate`` always among them), so an alert can fire on
    ``powercap_node_power_source{source="estimate"} == 1``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.watts = Gauge(
            "powercap_node_power_watts",
            "Whole-node power the agent reports, in watts, from the source powercap_node_power_source names.",
            registry=registry,
        )
        self.age = Gauge(
            "powercap_node_power_age_seconds",
            "Age of the whole-node power reading the last tick used, in seconds (0 for the estimate).",
            registry=registry,
        )
        self.source = Gauge(
            "powercap_node_power_source",
            "1 for the whole-node power source in use (redfish, ipmi-dcmi, kepler or estimate), 0 for the other "
            "configured ones.",
            ["source"],
            registry=registry,
        )
        self.read_errors = Counter(
            "powercap_node_power_read_errors",
            "Failed reads of a whole-node power source (timeouts, refused connections, bad documents).",
            ["source"],
            registry=registry,
        )

    def read_failed(self, source: str) -> None:
        self.read_errors.labels(source).inc()

    def in_use(self, power: NodePower, configured: Sequence[str]) -> None:
        self.watts.set(power.watts)
        self.age.set(power.age_s)
        for name in configured:
            self.source.labels(name).set(1 if name == power.source else 0)
