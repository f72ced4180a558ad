"""The metrics every powercap program exposes beside its own: which build runs, and how
its process fares.

- ``powercap_build_info{version, python_version}``: always 1, the Prometheus convention for
  an info metric (join it with ``* on(...) group_left(version)``, or count versions
  during a rollout).
- prometheus_client's process collector (``process_cpu_seconds_total``,
  ``process_resident_memory_bytes``, ``process_start_time_seconds``,
  ``process_open_fds``, ...; Linux only, from ``/proc``) and platform collector
  (``python_info``).

The programs keep their metrics in registries of their own, not prometheus_client's global
one (which would register these collectors by itself), so each adds them here.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector

import powercap


def register_process_metrics(registry: CollectorRegistry) -> None:
    """``process_*`` of the process that answers the scrape, and ``python_info``."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def register_program_metrics(registry: CollectorRegistry) -> None:
    """``powercap_build_info`` and the process metrics, into a program's own registry."""
    register_process_metrics(registry)
    # "max": the webhook's gunicorn workers each write this series in prometheus_client's
    # multiprocess mode; a scrape should see one series, not one per worker pid
    build_info = Gauge(
        "powercap_build_info",
        "Always 1; the labels say which powercap release and Python run this program.",
        ["version", "python_version"],
        registry=registry,
        multiprocess_mode="max",
    )
    build_info.labels(version=powercap.__version__, python_version=platform.python_version()).set(1)
