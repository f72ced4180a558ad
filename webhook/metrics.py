"""Prometheus metrics of the webhook, served at ``/metrics`` on the HTTPS port.

- ``powercap_webhook_requests_total{endpoint, outcome}``: admission requests by endpoint
  (``validate``, ``mutate``) and outcome (``allowed``, ``denied``, ``patched``,
  ``bad_request``, ``too_large``, ``error``).
- ``powercap_webhook_request_duration_seconds{endpoint}``: time from the request reaching
  the handler to the reply being built.

Gunicorn runs several worker processes; a scrape reaches one of them. With
``multiprocess_dir`` set (the server sets ``PROMETHEUS_MULTIPROC_DIR`` before
prometheus_client is imported), every worker writes its values to files there and a scrape
of any worker sums them all (prometheus_client's multiprocess mode). Without it, for tests
and single-process use, the metrics live in this object's own registry. There is no
module-level registry: each :class:`WebhookMetrics` owns its own.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from powercap.runtime.programmetrics import register_process_metrics, register_program_metrics

# Admission latency is sub-millisecond when healthy; the apiserver gives up after the
# webhook's timeoutSeconds (<= 5 s here).
DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WebhookMetrics:
    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        register_program_metrics(self.registry)
        self.requests = Counter(
            "powercap_webhook_requests", "Admission requests by endpoint and outcome.",
            ["endpoint", "outcome"], registry=self.registry,
        )
        self.duration = Histogram(
            "powercap_webhook_request_duration_seconds", "Time to answer an admission request, in seconds.",
            ["endpoint"], buckets=DURATION_BUCKETS_S, registry=self.registry,
        )

    def observe(self, endpoint: str, outcome: str, duration_s: float) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()
        self.duration.labels(endpoint=endpoint).observe(duration_s)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; every worker's values in multiprocess mode."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            register_process_metrics(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
