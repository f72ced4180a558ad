"""Putting the webhook together in a server process: Kubernetes connection, app per worker.

Kept apart from ``cli`` (argument parsing) and ``app`` (pure Flask wiring, everything
injected) so that tests build apps without any of this.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

from powercap import schema
from powercap.algorithms import AlgorithmRegistry
from webhook.app import create_app
from webhook.lookups import PolicyLookup, WatchedPolicies
from webhook.metrics import WebhookMetrics
from webhook.server import AppFactory, CertificateReloader

Connect = Callable[[AlgorithmRegistry], PolicyLookup]


class ConfigurationError(Exception):
    """The webhook cannot start as configured; the message says what to change."""


def check_kubernetes_configuration() -> None:
    """Fail at start-up when no Kubernetes configuration exists (not in a pod, no kubeconfig)."""
    from powercap import kube

    try:
        kube.KubeClient.from_environment().close()
    except kube.KubeConfigError as error:
        raise ConfigurationError(f"{error}; run in a pod, set KUBECONFIG, or pass --no-cross-policy-checks") from error


def kubernetes_policies(registry: AlgorithmRegistry) -> PolicyLookup:
    """Every policy of the cluster (all namespaces) from a list+watch cache, started now.

    Called in each gunicorn worker after the fork, so the watch thread is the worker's.
    """
    from powercap import kube

    cache = kube.WatchCache(kube.KubeClient.from_environment(), kube.policy_path(), name="powercappingpolicies")
    cache.start()
    return WatchedPolicies(cache, registry)


def app_factory(connect: Connect | None, metrics_dir: str | None, *, require_client_certificate: bool = False) -> AppFactory:
    """Build the per-worker app: registry, policy lookup (None: cross-policy checks off),
    metrics; ``require_client_certificate`` when the server verifies client certificates."""

    def build(reloader: CertificateReloader) -> Flask:
        reloader.context()  # load the certificate now, so a worker with a bad one fails at boot
        schema.policy_schema()  # parse the CRD now, not during the first admission
        registry = AlgorithmRegistry.default()
        policies = connect(registry) if connect is not None else None
        return create_app(
            registry=registry,
            policies=policies,
            metrics=WebhookMetrics(multiprocess_dir=metrics_dir),
            is_ready=lambda: reloader.loaded and (policies is None or policies.ready()),
            require_client_certificate=require_client_certificate,
        )

    return build
