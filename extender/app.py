"""The extender's HTTP app: kube-scheduler's filter and prioritize calls, health, metrics.

``create_app(source, registry)`` builds a Flask app around an injected
:class:`~powercap.runtime.sources.ViewSource`; decisions are :mod:`powercap.placement`'s, this
module only translates the wire format (:mod:`extender.wire`), counts and logs.

- ``POST /filter``: ExtenderArgs -> ExtenderFilterResult (``NodeNames`` or ``Nodes`` as asked).
- ``POST /prioritize``: ExtenderArgs -> HostPriorityList (scores 0..10).
- ``GET /healthz``: the process serves. ``GET /readyz``: the cluster view is available
  (caches synced). ``GET /metrics``: Prometheus text format.

On the listeners named in ``metrics_listeners`` (``--metrics-bind``: indexes into
gunicorn's ``bind`` list, read from :data:`powercap.runtime.httpworker.LISTENER_KEY`)
only ``/metrics``, ``/healthz`` and ``/readyz`` are served; anything else is 404 there, so
the address Prometheus scrapes cannot place pods.

Limits: the body (``max_body_bytes``, 413) and what :func:`extender.wire.decode_args`
checks before decoding (400).

Errors: an undecodable or malformed body is a 400 with a JSON ``{"Error": "..."}``; a
filter call that cannot be decided (no view yet) answers 200 with ``Error`` set, which
fails that scheduling attempt so kube-scheduler retries; a bug of ours is logged with
its traceback and answered 500 with a one-line message. A client never sees a traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from extender import wire
from extender.state import PublishedTotalsCache, RecentAdmissions, refuse_past_pending
from powercap.runtime.httpworker import LISTENER_KEY
from powercap.runtime.programmetrics import register_program_metrics
from powercap.runtime.sources import NotReady, ViewSource
from powercap.algorithms import AlgorithmRegistry
from powercap.numeric import counted
from powercap.objects import POWER_ANNOTATION, object_key, pod_gpus_requested, pod_power_annotation_problem
from powercap.placement import PlacementRequest, RejectReason, filter_nodes, placement_request, prioritize_nodes

log = logging.getLogger(__name__)

# A full-Node filter request for 5000 nodes is about 75 MB (15 KB per Node).
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
JSON = "application/json"
METRICS_LISTENER_PATHS = ("/metrics", "/healthz", "/readyz")
# Request latencies worth telling apart: kube-scheduler's budget is ~5 ms per pod at 500
# candidates; its default httpTimeout is 5 s.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# How long prioritize may score a pod on the view its filter call used (the source's own
# refresh interval: a view that old is what an idle source hands out anyway).
FILTER_VIEW_REUSE_S = 1.0


class ExtenderMetrics:
    """The extender's Prometheus metrics, in a registry of their own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        register_program_metrics(self.registry)
        self.requests = Counter(
            "powercap_extender_requests", "Extender calls by verb and outcome (ok, bad_request, not_ready, error).",
            ["verb", "outcome"], registry=self.registry,
        )
        self.duration = Histogram(
            "powercap_extender_request_duration_seconds", "Time to answer an extender call, by verb.",
            ["verb"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.rejected = Counter(
            "powercap_extender_nodes_rejected", "Candidate nodes the filter rejected, by reason.",
            ["reason"], registry=self.registry,
        )
        for reason in RejectReason:
            self.rejected.labels(reason.value)
        for verb in ("filter", "prioritize"):
            self.duration.labels(verb)
            for outcome in ("ok", "bad_request", "not_ready", "error"):
                self.requests.labels(verb, outcome)


class AnnotationWarnings:
    """Logs a pod's unusable ``power-watts`` annotation once per pod and value, not once per
    filter or prioritize call (kube-scheduler retries a pending pod for as long as it waits).
    Remembers the last ``limit`` pods."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, pod: dict[str, Any], placement: PlacementRequest) -> None:
        problem = pod_power_annotation_problem(pod)
        if problem is None:
            return
        metadata = pod.get("metadata") or {}
        raw = str((metadata.get("annotations") or {}).get(POWER_ANNOTATION))
        seen_key = (str(metadata.get("uid") or object_key(pod)), raw)
        with self._lock:
            if seen_key in self._seen:
                return
            self._seen[seen_key] = None
            if len(self._seen) > self._limit:
                self._seen.popitem(last=False)
        fallback = ("GPUs x the per-GPU share of its policy's powerCapLimit" if placement.policy is not None
                    else "GPUs x the node's GPU maximum power limit")
        log.warning(
            "pod %s: %s; its power is estimated as %s instead", placement.pod_key, problem, fallback,
            extra={"pod": placement.pod_key, "annotation": POWER_ANNOTATION, "value": raw,
                   "policy": placement.policy.key if placement.policy is not None else None, "estimate": fallback},
        )


class FilterViews:
    """The view each recent filter call decided with, by pod, for that pod's prioritize call.

    kube-scheduler calls prioritize right after filter, with the nodes that passed. In a
    burst the binding of the pod before arrives in between (kube-scheduler binds
    asynchronously), so asking the source again would rebuild the cluster view a second
    time per pod (~7 ms at 5000 nodes, half of the extender's time per pod in the real
    scheduler, benchmarks/scheduler.py). Scores only advise, and the filter already decided
    on this view, so prioritize takes it while it is at most ``max_age_s`` old. Remembers
    the last ``limit`` pods; thread-safe; ``now_s`` is monotonic.
    """

    def __init__(self, max_age_s: float = FILTER_VIEW_REUSE_S, limit: int = 64) -> None:
        self.max_age_s = max_age_s
        self._limit = limit
        self._views: OrderedDict[tuple[str, str], tuple[Any, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(pod: dict[str, Any]) -> tuple[str, str]:
        return object_key(pod), str((pod.get("metadata") or {}).get("uid") or "")

    def remember(self, pod: dict[str, Any], view: Any, now_s: float) -> None:
        key = self.key(pod)
        with self._lock:
            self._views.pop(key, None)
            self._views[key] = (view, now_s)
            while len(self._views) > self._limit:
                self._views.popitem(last=False)

    def recall(self, pod: dict[str, Any], now_s: float) -> Any | None:
        with self._lock:
            remembered = self._views.get(self.key(pod))
        if remembered is None or not 0 <= now_s - remembered[1] <= self.max_age_s:
            return None
        return remembered[0]


def create_app(
    source: ViewSource,
    registry: AlgorithmRegistry,
    *,
    metrics: ExtenderMetrics | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics_listeners: Collection[int] = (),
) -> Flask:
    app = Flask("powercap-extender")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    metrics = metrics or ExtenderMetrics()
    annotation_warnings = AnnotationWarnings()
    admissions = RecentAdmissions()
    published_totals = PublishedTotalsCache()
    filter_views = FilterViews()

    def timed(verb: str, handler: Callable[[bytes], tuple[bytes, int, str]]) -> Response:
        started = time.perf_counter()
        outcome = "error"
        try:
            body, status, outcome = handler(read_body(max_body_bytes))
        except wire.WireError as error:
            outcome = "bad_request"
            log.info("bad %s request: %s", verb, error, extra={"verb": verb, "error": str(error)})
            body, status = wire_error(str(error)), 400
        except HTTPException:
            raise
        except Exception as error:  # our bug: log it whole, answer one line
            log.exception("%s failed", verb, extra={"verb": verb, "error": str(error)})
            body, status = wire_error(f"internal error in the powercap extender: {type(error).__name__}: {error}"), 500
        finally:
            metrics.duration.labels(verb).observe(time.perf_counter() - started)
            metrics.requests.labels(verb, outcome).inc()
        return Response(body, status=status, mimetype=JSON)

    def do_filter(body: bytes) -> tuple[bytes, int, str]:
        args, candidates = wire.decode_args(body)
        assert args.Pod is not None
        try:
            view = source.current()
        except NotReady as waiting:
            if pod_gpus_requested(args.Pod) == 0:  # never block the unrelated
                return wire.encode_filter_result(candidates, candidates.names, {}, {}), 200, "not_ready"
            return wire.encode_filter_error(f"powercap extender is not ready: {waiting}"), 200, "not_ready"
        request_ = placement_request(view, args.Pod, published_totals)
        annotation_warnings.check(args.Pod, request_)
        now_s = time.monotonic()
        filter_views.remember(args.Pod, view, now_s)
        if request_.covered:
            request_ = replace(request_, admitted_w=admissions.admitted_w(view, request_, now_s))
        outcome = filter_nodes(view, request_, candidates.names)
        if request_.covered:
            outcome = refuse_past_pending(view, request_, outcome, admissions.rack_pending(view, request_, now_s))
        if outcome.passed:
            admissions.passed(view, request_, now_s, outcome.passed)
        for reason, count in outcome.rejections.items():
            metrics.rejected.labels(reason.value).inc(count)
        if request_.covered:
            log.info(
                "filter %s: %d of %s passed", request_.pod_key, len(outcome.passed), counted(len(candidates.names), "node"),
                extra={"verb": "filter", "pod": request_.pod_key, "candidates": len(candidates.names),
                       "passed": len(outcome.passed), "failed": len(outcome.failed),
                       "unresolvable": len(outcome.unresolvable),
                       "rejected": {reason.value: count for reason, count in outcome.rejections.items()}},
            )
        return wire.encode_filter_result(candidates, outcome.passed, outcome.failed, outcome.unresolvable), 200, "ok"

    def do_prioritize(body: bytes) -> tuple[bytes, int, str]:
        args, candidates = wire.decode_args(body)
        assert args.Pod is not None
        view = filter_views.recall(args.Pod, time.monotonic())
        if view is None:
            try:
                view = source.current()
            except NotReady:
                return wire.encode_priorities((name, 0) for name in candidates.names), 200, "not_ready"
        request_ = placement_request(view, args.Pod, published_totals)
        annotation_warnings.check(args.Pod, request_)
        scores = prioritize_nodes(view, request_, candidates.names, registry)
        if request_.scored:
            log.debug("prioritize %s", request_.pod_key, extra={"verb": "prioritize", "pod": request_.pod_key,
                                                                 "candidates": len(candidates.names)})
        return wire.encode_priorities(scores), 200, "ok"

    @app.before_request
    def only_probes_and_metrics_on_the_metrics_address() -> Response | None:
        if request.environ.get(LISTENER_KEY) in metrics_listeners and request.path not in METRICS_LISTENER_PATHS:
            return Response(wire_error("404 Not Found: this address serves /metrics, /healthz and /readyz only"),
                            status=404, mimetype=JSON)
        return None

    @app.post("/filter")
    def filter_() -> Response:
        return timed("filter", do_filter)

    @app.post("/prioritize")
    def prioritize() -> Response:
        return timed("prioritize", do_prioritize)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        waiting = source.readiness()
        if waiting is not None:
            return Response(f"not ready: {waiting}\n", status=503, mimetype="text/plain")
        return Response("ok\n", mimetype="text/plain")

    @app.get("/metrics")
    def metrics_() -> Response:
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return Response(wire_error(f"{error.code} {error.name}: {error.description}"), status=error.code or 500, mimetype=JSON)

    return app


def read_body(max_body_bytes: int) -> bytes:
    """The request body. kube-scheduler sends a Content-Length: read it in one call (werkzeug's
    chunked reader costs ~80 ms for a 75 MB full-Node body); otherwise let werkzeug read it."""
    length = request.content_length
    if length is None:
        data = request.get_data(cache=False)
        if len(data) > max_body_bytes:
            raise RequestEntityTooLarge()
        return data
    if length > max_body_bytes:
        raise RequestEntityTooLarge()
    return request.environ["wsgi.input"].read(length)


def wire_error(message: str) -> bytes:
    """``{"Error": message}``, the body of a 4xx/5xx answer."""
    return wire.encode_error_body(message)
