"""The agent's Prometheus metrics, ``/healthz`` and ``/status``, on ``--metrics-bind``.

Every metric lives in the agent's own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one), so tests and benchmarks can run several agents in one
process. Metrics (``gpu`` is the GPU's UUID):

============================================  =======================================================
``powercap_gpu_power_watts{gpu}``             power drawn (NVML, 100 ms average)
``powercap_gpu_power_limit_watts{gpu}``       enforced power limit
``powercap_gpu_planned_limit_watts{gpu}``     the cap the control law wants (Observe / dry-run too)
``powercap_gpu_temperature_celsius{gpu}``     die temperature
``powercap_gpu_tokens_per_joule{gpu}``        tokens/s of the GPU's pod over its GPUs' power
``powercap_gpu_degraded{gpu}``                1 while the last NVML operation on the GPU failed
``powercap_gpu_limited_out_of_band{gpu}``     1 while another limiter holds the GPU under our cap
``powercap_cap_changes_total{reason}``        limits written, by reason
``powercap_nvml_errors_total{gpu,error}``     NVML errors, by GPU and error class
``powercap_agent_policy_fresh``               1 while the policy view is current
``powercap_agent_policy_unreadable{policy}``  1 while a policy cannot be read (its caps are held)
``powercap_agent_tick_duration_seconds``      histogram of one control tick (wall time)
============================================  =======================================================

``/healthz`` answers 200 while ticks complete (the last one ended less than
``3 x interval`` ago), else 503: the DaemonSet's liveness and readiness probes.
``/status`` answers the agent's per-GPU view as JSON (degraded GPUs and their last error).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from powercap.runtime.httpserver import Route, check_reply, metrics_route
from powercap.runtime.programmetrics import register_program_metrics


GPU_GAUGES = ("power", "limit", "planned", "temperature", "ratio", "degraded", "out_of_band")


class AgentMetrics:
    """The agent's metrics in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        register_program_metrics(self.registry)
        r = self.registry
        self.power = Gauge("powercap_gpu_power_watts", "Power drawn by the GPU, in watts.", ["gpu"], registry=r)
        self.limit = Gauge("powercap_gpu_power_limit_watts", "Enforced power limit of the GPU, in watts.", ["gpu"], registry=r)
        self.planned = Gauge(
            "powercap_gpu_planned_limit_watts",
            "Power limit the control law wants for the GPU, in watts (set only in Enforce mode without --dry-run).",
            ["gpu"],
            registry=r,
        )
        self.temperature = Gauge("powercap_gpu_temperature_celsius", "GPU die temperature, in degrees Celsius.", ["gpu"], registry=r)
        self.ratio = Gauge(
            "powercap_gpu_tokens_per_joule", "Generated tokens per joule of the pod on the GPU.", ["gpu"], registry=r
        )
        self.degraded = Gauge(
            "powercap_gpu_degraded", "1 while the last NVML operation on the GPU failed, else 0.", ["gpu"], registry=r
        )
        self.out_of_band = Gauge(
            "powercap_gpu_limited_out_of_band",
            "1 while another limiter holds the GPU below the limit the agent set, else 0.",
            ["gpu"],
            registry=r,
        )
        self.cap_changes = Counter(
            "powercap_cap_changes", "Power limits written to GPUs, by reason.", ["reason"], registry=r
        )
        self.nvml_errors = Counter(
            "powercap_nvml_errors", "NVML errors, by GPU and error class.", ["gpu", "error"], registry=r
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

    def set_unreadable_policies(self, policies: Iterable[str]) -> None:
        """``powercap_agent_policy_unreadable`` = 1 for these policies; the series of the
        others are dropped."""
        now = set(policies)
        for policy in self._unreadable - now:
            self.policy_unreadable.remove(policy)
        for policy in now:
            self.policy_unreadable.labels(policy).set(1)
        self._unreadable = now

    def forget_gpu_readings(self, gpu: str) -> None:
        """Drop a GPU's reading series (it could not be read: no stale values)."""
        for gauge in (self.power, self.limit, self.planned, self.temperature, self.ratio, self.out_of_band):
            try:
                gauge.remove(gpu)
            except KeyError:
                pass


def agent_routes(metrics: AgentMetrics, healthy: Callable[[], bool], status: Callable[[], dict[str, Any]]) -> dict[str, Route]:
    """``/metrics``, ``/healthz`` (503 while ticks stall) and ``/status`` (the agent's GPUs as JSON)."""
    return {
        "/metrics": metrics_route(metrics.registry),
        "/healthz": lambda: check_reply(None if healthy() else "ticks stalled"),
        "/status": lambda: (200, "application/json", json.dumps(status(), indent=1).encode()),
    }
