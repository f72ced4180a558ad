"""The agent's Prometheus metrics, ``/healthz`` and ``/status``, on ``--metrics-bind``.

Every metric lives in the agent's own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one), so tests and benchmarks can run several agents in one
process. Metrics (``gpu`` is the GPU's UUID):

=========================================  =======================================================
``powercap_gpu_power_watts{gpu}``          power drawn (NVML, 100 ms average)
``powercap_gpu_power_limit_watts{gpu}``    enforced power limit
``powercap_gpu_planned_limit_watts{gpu}``  the cap the control law wants (Observe / dry-run too)
``powercap_gpu_temperature_celsius{gpu}``  die temperature
``powercap_gpu_tokens_per_joule{gpu}``     tokens/s of the GPU's pod over its GPUs' power
``powercap_gpu_degraded{gpu}``             1 while the last NVML operation on the GPU failed
``powercap_gpu_limited_out_of_band{gpu}``  1 while another limiter holds the GPU under our cap
``powercap_cap_changes_total{reason}``     limits written, by reason
``powercap_nvml_errors_total{gpu,error}``  NVML errors, by GPU and error class
``powercap_agent_policy_fresh``            1 while the policy view is current
``powercap_agent_tick_duration_seconds``   histogram of one control tick (wall time)
=========================================  =======================================================

``/healthz`` answers 200 while ticks complete (the last one ended less than
``3 x interval`` ago), else 503: the DaemonSet's liveness and readiness probes.
``/status`` answers the agent's per-GPU view as JSON (degraded GPUs and their last error).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

GPU_GAUGES = ("power", "limit", "planned", "temperature", "ratio", "degraded", "out_of_band")


class AgentMetrics:
    """The agent's metrics in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
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
        self.tick_duration = Histogram(
            "powercap_agent_tick_duration_seconds",
            "Wall time of one control tick, in seconds.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )

    def forget_gpu_readings(self, gpu: str) -> None:
        """Drop a GPU's reading series (it could not be read: no stale values)."""
        for gauge in (self.power, self.limit, self.planned, self.temperature, self.ratio, self.out_of_band):
            try:
                gauge.remove(gpu)
            except KeyError:
                pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/status`` on ``host:port`` (port 0: any free port)."""

    def __init__(
        self,
        metrics: AgentMetrics,
        healthy: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        host: str,
        port: int,
    ) -> None:
        handler = _handler(metrics, healthy, status)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(
    metrics: AgentMetrics, healthy: Callable[[], bool], status: Callable[[], dict[str, Any]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path == "/healthz":
                ok = healthy()
                self._reply(200 if ok else 503, "text/plain", b"ok\n" if ok else b"ticks stalled\n")
            elif path == "/status":
                self._reply(200, "application/json", json.dumps(status(), indent=1).encode())
            else:
                self._reply(404, "text/plain", b"not found\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - overrides http.server
            log.debug("metrics request", extra={"request": format % args})

    return Handler
