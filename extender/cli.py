"""``powercap extender``: serve kube-scheduler's filter and prioritize calls under gunicorn.

In a cluster (the default) the view comes from watch caches of Nodes, Pods and
PowerCappingPolicies (credentials: in-cluster service account, else kubeconfig). With
``--cluster-state FILE`` it comes from a snapshot (``kubectl get nodes,pcn,pods,pcp -A -o yaml``)
reloaded when the file changes. Exit status 2: bad usage, a bad state file at start-up, or
no way to reach a cluster.

One gunicorn worker process with several threads: the caches live in that process, so a
second worker would only double the API traffic and memory. The worker is
:class:`powercap.runtime.httpworker.BufferingWorker`: requests arrive whole before a thread
runs them, so a slow or idle connection holds no thread. ``--metrics-bind`` adds a second
address that serves only ``/metrics``, ``/healthz`` and ``/readyz``, for Prometheus, while
``--bind`` (kube-scheduler's) stays on loopback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from flask import Flask

from extender.app import DEFAULT_MAX_BODY_BYTES, create_app
from powercap import kube
from powercap.algorithms import AlgorithmRegistry
from powercap.cluster import ClusterSettings
from powercap.runtime.cliargs import add_cluster_view_arguments, add_log_level_argument, bind_address, cluster_view_settings, positive_int
from powercap.runtime.httpworker import ConnectionLimits
from powercap.runtime.logs import configure_logging
from powercap.runtime.sources import StateFileError, StateFileSource, ViewSource, cluster_source
from powercap.runtime.wsgi import GunicornServer

DEFAULT_BIND = "127.0.0.1:8888"
EXIT_USAGE = 2
# kube-scheduler's httpTimeout is 5 s; a full-Node body of 5000 nodes (~75 MB) arrives over
# loopback in well under a second
REQUEST_TIMEOUT_S = 10.0
WORKER_CONNECTIONS = 1000
log = logging.getLogger("extender")


def connection_limits() -> ConnectionLimits:
    """The extender's bounds (:mod:`powercap.runtime.httpworker`): requests being received may
    hold two of the largest bodies together."""
    return ConnectionLimits(
        max_body_bytes=DEFAULT_MAX_BODY_BYTES,
        request_timeout_s=REQUEST_TIMEOUT_S,
        write_timeout_s=REQUEST_TIMEOUT_S,
        max_buffered_bytes=2 * DEFAULT_MAX_BODY_BYTES,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extender",
        help="kube-scheduler extender: place GPU pods by rack power and temperature headroom",
        description="Serve kube-scheduler's extender calls (POST /filter, POST /prioritize; GET /healthz, "
        "/readyz, /metrics). In a cluster the view comes from watch caches; with --cluster-state it "
        "replays a snapshot (kubectl get nodes,pcn,pods,pcp -A -o yaml), reloaded when the file changes.",
    )
    parser.add_argument("--bind", default=DEFAULT_BIND, type=bind_address, metavar="HOST:PORT",
                        help=f"address to listen on (default {DEFAULT_BIND}: beside kube-scheduler)")
    parser.add_argument("--metrics-bind", type=bind_address, metavar="HOST:PORT",
                        help="a second address serving only /metrics, /healthz and /readyz (for Prometheus, "
                        "e.g. 0.0.0.0:8889); default: none, /metrics is served on --bind only")
    parser.add_argument("--cluster-state", metavar="FILE",
                        help="run without a cluster on this Kubernetes List of Nodes, Pods and PowerCappingPolicies (YAML or JSON)")
    add_cluster_view_arguments(parser)
    parser.add_argument("--threads", default=4, type=positive_int, metavar="N", help="request threads (default 4)")
    add_log_level_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    settings = cluster_view_settings(args)
    registry = AlgorithmRegistry.default()
    try:
        make_source = source_factory(args.cluster_state, settings, registry)
        make_source()  # fail here, with exit 2, rather than in the worker
    except (StateFileError, ClusterUnreachable) as error:
        print(f"powercap extender: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    sources: list[ViewSource] = []

    def load_app() -> Flask:
        source = make_source()
        source.start()
        sources.append(source)
        return create_app(source, registry, metrics_listeners=(1,) if args.metrics_bind else ())

    def worker_exit(server: Any, worker: Any) -> None:
        for source in sources:
            source.stop()

    server_settings = {
        "bind": [args.bind, *([args.metrics_bind] if args.metrics_bind else [])],
        "workers": 1,
        "threads": args.threads,
        "timeout": 30,
        "graceful_timeout": 5,
        "keepalive": 75,  # kube-scheduler keeps its connection open between calls
        "worker_connections": WORKER_CONNECTIONS,
        "worker_exit": worker_exit,
        "proc_name": "powercap-extender",
    }
    log.info("powercap extender listening on %s", args.bind,
             extra={"bind": args.bind, "metrics_bind": args.metrics_bind, "mode": "state-file" if args.cluster_state else "cluster",
                    "rack_label": settings.rack_label, "stale_after_s": settings.stale_after_s,
                    "node_overhead_w": settings.node_overhead_w, "non_gpu_rise": settings.non_gpu_rise})
    GunicornServer(server_settings, load_app, args.log_level, limits=connection_limits()).run()
    return 0


class ClusterUnreachable(Exception):
    """No in-cluster configuration and no kubeconfig."""


def source_factory(state_file: str | None, settings: ClusterSettings, registry: AlgorithmRegistry) -> Callable[[], ViewSource]:
    """A function making the view source: the state file's, or watch caches on the cluster's API."""
    if state_file is not None:
        return lambda: StateFileSource(state_file, settings, registry, settle_gc=True)
    try:
        kube.KubeClient.from_environment().close()
    except kube.KubeConfigError as error:
        raise ClusterUnreachable(f"{error}; run with --cluster-state FILE to replay a snapshot without a cluster") from None
    return lambda: cluster_source(kube.KubeClient.from_environment(), settings, registry)
