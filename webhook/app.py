"""The webhook's Flask application: AdmissionReview in, AdmissionReview out.

Routes::

    POST /validate   validating admission (validate_create / validate_update / validate_delete)
    POST /mutate     mutating admission (default), answered with a JSON Patch
    GET  /healthz    200 while the process serves requests
    GET  /readyz     200 once ready (the serving certificate is loaded), 503 before
    GET  /metrics    Prometheus exposition

kube-apiserver appends ``?timeout=<n>s`` to the webhook URL; the answer never waits on the
network (cross-policy checks read a cache), so the query string is ignored.

HTTP status contract: 200 with an AdmissionReview for every decodable request (a refusal is
``allowed: false`` inside it); 400 with a one-line message for a body that is not an
AdmissionReview; 413 for a body over ``max_body_bytes``; 500 only for a bug of ours, logged
with its traceback and never sent to the client.

Limits before decoding (:data:`REVIEW_LIMITS`, checked on the bytes by
:mod:`powercap.runtime.jsonlimits`): nesting depth, entries per array or object, and
values in the whole body. A body past one of them is never decoded whole: its
AdmissionReview envelope (uid, kind, names, never ``object``) is read on its own and
answered with ``allowed: false``, ``status.code`` 400 (depth, entries) or 413 (values) and a
message naming the limit; a body whose envelope cannot be read gets HTTP 400. Either way
one warning line is logged.

With ``require_client_certificate`` (``--client-ca-file``), ``/validate`` and ``/mutate``
answer 403 unless the TLS client presented a certificate the server verified
(:data:`powercap.runtime.httpworker.PEER_CERTIFICATE_KEY` in the WSGI environ).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_input_stream

from powercap.algorithms import AlgorithmRegistry
from powercap.runtime.httpworker import PEER_CERTIFICATE_KEY
from powercap.runtime.jsonlimits import JsonLimitExceeded, JsonLimits, check_json_limits
from webhook.handlers import PolicyAdmission, review_mutation, review_validation
from webhook.lookups import PolicyLookup
from webhook.metrics import WebhookMetrics
from webhook.reviews import BadRequest, Request, Verdict, build_response, decode_envelope, decode_review

MAX_BODY_BYTES = 3 * 1024 * 1024  # 3 MiB
# The shape of the largest AdmissionReview decoded. A policy at the CRD's limits (256
# rackConstraints) with its managedFields, twice in an UPDATE, is about 8 000 values, 11
# levels deep, and its largest object (managedFields' f:rackConstraints) has 257 members.
REVIEW_LIMITS = JsonLimits(max_depth=64, max_items=1024, max_values=20_000)
READ_CHUNK_BYTES = 64 * 1024
ADMISSION_LOGGER = "powercap.webhook.admission"

Review = Callable[[Request, PolicyAdmission], Verdict]


def create_app(
    *,
    registry: AlgorithmRegistry,
    policies: PolicyLookup | None = None,
    clock: Callable[[], float] = time.perf_counter,
    metrics: WebhookMetrics | None = None,
    logger: logging.Logger | None = None,
    is_ready: Callable[[], bool] = lambda: True,
    max_body_bytes: int = MAX_BODY_BYTES,
    limits: JsonLimits = REVIEW_LIMITS,
    require_client_certificate: bool = False,
) -> Flask:
    """A new webhook application; every dependency is injected.

    ``registry`` names the placement algorithms policies may choose; ``policies`` gives the
    other policies for the cross-policy checks (None: checks off); ``clock`` (seconds,
    monotonic) times requests; ``is_ready`` backs ``/readyz``; ``limits`` bound the shape
    of a body before it is decoded; ``require_client_certificate`` refuses admissions from
    clients without a verified TLS certificate (module docstring).
    """
    app = Flask("powercap-webhook")
    admission = PolicyAdmission(registry, policies)
    metrics = metrics if metrics is not None else WebhookMetrics()
    log = logger if logger is not None else logging.getLogger(ADMISSION_LOGGER)
    app.extensions["powercap.metrics"] = metrics

    def admit(endpoint: str, review: Review) -> Response:
        if require_client_certificate and not request.environ.get(PEER_CERTIFICATE_KEY):
            log.warning("admission refused: no verified client certificate", extra={"fields": {
                "endpoint": endpoint, "client": request.remote_addr}})
            return _text("a client certificate signed by the webhook's --client-ca-file is required", 403)
        started_s = clock()
        outcome = "error"
        try:
            raw = read_body(max_body_bytes)
            try:
                check_json_limits(raw, limits, "the AdmissionReview")
            except JsonLimitExceeded as exceeded:
                try:
                    review_request = decode_envelope(raw)
                except BadRequest:
                    raise BadRequest(str(exceeded)) from None
                verdict = Verdict.refuse_request(str(exceeded), too_large=exceeded.limit == "values")
                body = json.dumps(build_response(review_request, verdict), separators=(",", ":"))
                outcome = "denied"
                log.warning("admission refused: request over limits", extra={"fields": {
                    **_request_fields(endpoint, review_request), "limit": exceeded.limit, "error": str(exceeded)}})
                return Response(body, status=200, mimetype="application/json")
            review_request = decode_review(raw)
            verdict = review(review_request, admission)
            body = json.dumps(build_response(review_request, verdict), separators=(",", ":"))
            outcome = _outcome(verdict)
        except BadRequest as error:
            outcome = "bad_request"
            log.warning("bad request", extra={"fields": {"endpoint": endpoint, "error": str(error)}})
            return _text(f"bad request: {error}", 400)
        except BodyTooLarge:
            outcome = "too_large"
            log.warning("request too large", extra={"fields": {"endpoint": endpoint, "limit_bytes": max_body_bytes}})
            return _text(f"request body is larger than {max_body_bytes} bytes", 413)
        except Exception:
            log.exception("admission failed", extra={"fields": {"endpoint": endpoint}})
            return _text("internal error", 500)
        finally:
            duration_s = clock() - started_s
            metrics.observe(endpoint, outcome, duration_s)
        _log_admission(log, endpoint, review_request, verdict, duration_s)
        return Response(body, status=200, mimetype="application/json")

    @app.post("/validate")
    def validate() -> Response:
        return admit("validate", review_validation)

    @app.post("/mutate")
    def mutate() -> Response:
        return admit("mutate", review_mutation)

    @app.get("/healthz")
    def healthz() -> Response:
        return _text("ok", 200)

    @app.get("/readyz")
    def readyz() -> Response:
        return _text("ok", 200) if is_ready() else _text("not ready", 503)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, status=200, content_type=content_type)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return _text(f"{error.code} {error.name}", error.code or 500)

    return app


class BodyTooLarge(Exception):
    pass


def read_body(max_bytes: int) -> bytes:
    """The request body; :class:`BodyTooLarge` past ``max_bytes``.

    A Content-Length over the limit is refused before reading; a chunked body (the server
    dechunks it) when more than ``max_bytes`` arrived. The server drains what is not read
    (:mod:`powercap.runtime.httpworker`) and closes the connection after the 413.
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge()
    stream = get_input_stream(request.environ)
    parts: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = stream.read(min(READ_CHUNK_BYTES, max_bytes + 1 - size))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
    raise BodyTooLarge()


def _outcome(verdict: Verdict) -> str:
    if not verdict.allowed:
        return "denied"
    return "patched" if verdict.patch else "allowed"


def _text(message: str, status: int) -> Response:
    return Response(message + "\n", status=status, mimetype="text/plain")


def _request_fields(endpoint: str, review_request: Request) -> dict[str, object]:
    return {
        "endpoint": endpoint,
        "uid": review_request.uid,
        "kind": review_request.kind["kind"],
        "name": review_request.name,
        "namespace": review_request.namespace,
        "operation": review_request.operation,
        "dry_run": review_request.dry_run,
        "user": review_request.username,
    }


def _log_admission(log: logging.Logger, endpoint: str, review_request: Request, verdict: Verdict, duration_s: float) -> None:
    log.info("admission", extra={"fields": {
        **_request_fields(endpoint, review_request),
        "allowed": verdict.allowed,
        "patched": bool(verdict.patch),
        "warnings": len(verdict.warnings),
        "duration_ms": round(duration_s * 1000, 3),
    }})
