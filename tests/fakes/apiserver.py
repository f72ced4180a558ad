"""A local HTTP server that speaks the Kubernetes API's JSON, for tests and benchmarks.

It is a real socket server (``ThreadingHTTPServer`` on 127.0.0.1, port 0), so code under
test goes through its real HTTP client. It serves nodes, pods (with the policy/v1
``eviction`` subresource), events (events.k8s.io/v1), leases (coordination.k8s.io/v1),
powercappingpolicies (namespaced, ``/status`` subresource) and powercapnodes
(cluster-scoped, ``/status`` subresource) with the API server's
semantics:

- GET / LIST (``kind: <Kind>List``, ``metadata.resourceVersion``, ``limit`` +
  ``continue``), all-namespaces and namespaced paths, ``fieldSelector`` (the field labels
  the real server supports for the resource, ``=``, ``==``, ``!=``) and
  ``labelSelector`` (equality and set forms). As on the real server, items of built-in
  lists carry no ``kind``/``apiVersion``; custom resources' items do.
- WATCH (``watch=true|1``, ``resourceVersion``, ``allowWatchBookmarks``,
  ``timeoutSeconds``): chunked, one JSON event per line. ``resourceVersion`` "" or "0"
  first replays the current objects as ADDED, then (bookmarks allowed) sends a BOOKMARK
  annotated ``k8s.io/initial-events-end: "true"``. A watch from a resourceVersion older
  than the compaction point gets HTTP 200 and an ``ERROR`` event carrying a 410
  ``Expired`` Status, as kube-apiserver v1.37 answers from its watch cache and from etcd
  alike (``expired_as="http"``: an HTTP 410 instead, as older API servers answered). A
  change that makes an object leave (enter) a watch's selector is sent as DELETED
  (ADDED). Bookmarks (``kind``, ``apiVersion`` and ``metadata.resourceVersion`` only) go
  out on :meth:`FakeApiServer.send_bookmark` (the real server's one a minute) and 2 s
  before a watch's ``timeoutSeconds`` runs out (none for 2 s or less), as the real watch
  cache sends them.
- POST (409 ``AlreadyExists``, ``generateName``), PUT with the resourceVersion
  precondition (409 ``Conflict``), PATCH (merge, JSON patch; strategic merge is treated
  as a merge patch for built-ins and answered 415 for custom resources, as the real
  server does), DELETE (the object for pods and custom resources, a Status otherwise).
- ``/status``: writes there change only ``.status``; writes to the object keep the
  stored ``.status``; ``metadata.generation`` (pods, policies) grows when ``.spec``
  changes; ``resourceVersion`` is one global counter; a write that changes nothing keeps
  the resourceVersion and emits no event; ``uid`` and ``creationTimestamp`` are set on
  create; a custom resource's status is dropped on create.
- events.k8s.io/v1 create validation (required fields, type, 1024-byte note, namespace
  of the regarded object) answered with 422 ``Invalid``.
- evictions: 201 and the pod is deleted; 404 when the pod is missing; 429
  ``TooManyRequests`` with a DisruptionBudget cause when :meth:`block_evictions` says so.

Simplifications: deletion is immediate (no graceful deletion, finalizers or garbage
collection); strategic merge patch merges lists like a merge patch; a continued list
reads the current state, not a snapshot; no authentication, admission or defaulting;
:meth:`FakeApiServer.compact` also ends the open watches (a real server's open watches
survive a compaction: only a watch that starts, or falls, behind it gets the 410); a
built-in kind's bookmark carries no empty ``spec``/``status``.

Test-facing API: the ``apiserver`` fixture of tests/conftest.py (a started
:class:`FakeApiServer`; benchmarks use ``with FakeApiServer() as server:``), its ``url``, direct state helpers that also emit watch events (:meth:`put_object`,
:meth:`delete_object`, :meth:`objects`, :meth:`get_object`), :meth:`compact`,
:meth:`close_watches`, :meth:`send_bookmark`, fault injection (:meth:`fail_next`, which
answers 401 and 403 with the authenticator's and the RBAC authorizer's exact Status,
:meth:`drop_next`, :meth:`hang_next`, :meth:`end_next_watches`, :meth:`conflict_next_put`,
:meth:`block_evictions`, :meth:`clear_faults`) and the request log (:attr:`requests`,
:meth:`requests_to`).
"""

from __future__ import annotations

import base64
import bisect
import copy
import datetime as dt
import json
import logging
import random
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import jsonpatch

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)

_META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


@dataclass(frozen=True)
class ResourceType:
    """One resource the fake serves."""

    plural: str
    kind: str
    group: str  # "" for the core group
    version: str
    namespaced: bool
    status_subresource: bool = False
    tracks_generation: bool = False
    builtin: bool = True
    returns_deleted_object: bool = False
    field_labels: frozenset[str] = _META_FIELDS

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``pods`` or ``leases.coordination.k8s.io``: how Status messages name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def details(self, name: str, **extra: Any) -> JsonObject:
        details: JsonObject = {"name": name}
        if self.group:
            details["group"] = self.group
        details["kind"] = self.plural
        details.update(extra)
        return details


RESOURCES: dict[str, ResourceType] = {
    rt.plural: rt
    for rt in (
        ResourceType(
            "nodes", "Node", "", "v1", namespaced=False, status_subresource=True,
            field_labels=_META_FIELDS | {"spec.unschedulable"},
        ),
        ResourceType(
            "pods", "Pod", "", "v1", namespaced=True, status_subresource=True, tracks_generation=True,
            returns_deleted_object=True,
            field_labels=_META_FIELDS | {
                "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
            },
        ),
        ResourceType(
            "events", "Event", "events.k8s.io", "v1", namespaced=True,
            field_labels=_META_FIELDS | {
                "reason", "type", "reportingController", "regarding.kind", "regarding.name",
                "regarding.namespace", "regarding.uid",
            },
        ),
        ResourceType("leases", "Lease", "coordination.k8s.io", "v1", namespaced=True),
        ResourceType(
            "powercappingpolicies", "PowerCappingPolicy", "powercapping.example.com", "v1alpha1",
            namespaced=True, status_subresource=True, tracks_generation=True, builtin=False,
            returns_deleted_object=True,
        ),
        ResourceType(
            "powercapnodes", "PowerCapNode", "powercapping.example.com", "v1alpha1",
            namespaced=False, status_subresource=True, builtin=False, returns_deleted_object=True,
        ),
    )
}


# --------------------------------------------------------------------------- wire helpers


def _status(code: int, reason: str, message: str, details: JsonObject | None = None) -> JsonObject:
    """A failure ``Status`` as the API server writes it."""
    status: JsonObject = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        status["details"] = details
    status["code"] = code
    return status


_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
    429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}


class _Reply(Exception):
    """Raised inside request handling to answer with a Status."""

    def __init__(self, code: int, message: str, *, reason: str | None = None,
                 details: JsonObject | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.body = _status(code, reason or _REASONS.get(code, "Unknown"), message, details)
        self.code = code
        self.headers = dict(headers or {})


def _not_found(rt: ResourceType, name: str) -> _Reply:
    return _Reply(404, f'{rt.qualified} "{name}" not found', details=rt.details(name))


def _conflict(rt: ResourceType, name: str) -> _Reply:
    return _Reply(
        409,
        f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        details=rt.details(name),
    )


def _rfc3339(t_s: float) -> str:
    return dt.datetime.fromtimestamp(t_s, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _field(obj: Mapping[str, Any], dotted: str) -> str:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------- selectors

Predicate = Callable[[Mapping[str, Any]], bool]


def _field_predicate(label: str, value: str, negate: bool) -> Predicate:
    return lambda obj: (_field(obj, label) == value) != negate


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _label_predicate(key: str, values: frozenset[str] | None, negate: bool) -> Predicate:
    """``key in values`` (or ``key`` exists when ``values`` is None), negated on demand;
    a missing label matches ``!=`` and ``notin``, as on the real server."""
    if values is None:
        return lambda obj: (key in _labels(obj)) != negate
    return lambda obj: (_labels(obj).get(key) in values) != negate


def parse_field_selector(text: str, rt: ResourceType) -> list[Predicate]:
    """``a.b=v,c!=w`` over the resource's supported field labels; 400 otherwise."""
    predicates: list[Predicate] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        match = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(!=|==|=)\s*(.*)", term)
        if not match:
            raise _Reply(400, f'invalid field selector: "{term}"')
        label, op, value = match.groups()
        if label not in rt.field_labels:
            raise _Reply(400, f"field label not supported: {label}")
        predicates.append(_field_predicate(label, value, negate=op == "!="))
    return predicates


_LABEL_TERM = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9._/-]+)\s*"
    r"(?:(?P<op>==|!=|=|\s+in\s+|\s+notin\s+)\s*(?P<value>\([^)]*\)|[A-Za-z0-9._-]*))?\s*"
)


def _split_label_terms(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def parse_label_selector(text: str) -> list[Predicate]:
    """``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``."""
    predicates: list[Predicate] = []
    for term in filter(str.strip, _split_label_terms(text)):
        match = _LABEL_TERM.fullmatch(term)
        if not match or (match["neg"] and match["op"]):
            raise _Reply(400, f'unable to parse requirement: invalid label selector "{term.strip()}"')
        key, op, value = match["key"], (match["op"] or "").strip(), match["value"] or ""
        if not op:
            predicates.append(_label_predicate(key, None, negate=bool(match["neg"])))
        elif op in ("in", "notin"):
            if not (value.startswith("(") and value.endswith(")")):
                raise _Reply(400, f'unable to parse requirement: "{term.strip()}"')
            values = frozenset(v.strip() for v in value[1:-1].split(",") if v.strip())
            predicates.append(_label_predicate(key, values, negate=op == "notin"))
        else:
            predicates.append(_label_predicate(key, frozenset({value}), negate=op == "!="))
    return predicates


# --------------------------------------------------------------------------- events.k8s.io validation


def _validate_event(event: JsonObject) -> list[JsonObject]:
    """The events.k8s.io/v1 create rules that catch a malformed client."""
    causes: list[JsonObject] = []

    def cause(reason: str, message: str, path: str) -> None:
        causes.append({"reason": reason, "message": message, "field": path})

    for path in ("eventTime", "reportingController", "reportingInstance", "action", "reason"):
        value = event.get(path)
        if not value:
            cause("FieldValueRequired", "Required value", path)
        elif path != "eventTime" and len(str(value)) > 128:
            cause("FieldValueTooLong", "Too long: may not be more than 128 bytes", path)
    if event.get("type") not in ("Normal", "Warning"):
        cause("FieldValueNotSupported", 'Unsupported value: supported values: "Normal", "Warning"', "type")
    if len(str(event.get("note") or "").encode()) > 1024:
        cause("FieldValueTooLong", "Too long: may not be more than 1024 bytes", "note")
    regarding = event.get("regarding") or {}
    event_namespace = (event.get("metadata") or {}).get("namespace", "")
    if regarding.get("namespace") and regarding["namespace"] != event_namespace:
        cause("FieldValueInvalid", "does not match event.namespace", "regarding.namespace")
    if not regarding.get("namespace") and event_namespace not in ("", "default"):
        cause("FieldValueInvalid", "not allowed for cluster-scoped regarding objects", "metadata.namespace")
    return causes


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: Mapping[str, str]
    body: Any
    content_type: str | None
    time_s: float  # time.monotonic() on arrival
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-cased

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass
class _Fault:
    remaining: int
    status: int | None  # None: drop the connection
    method: str | None
    path: str | None
    watch: bool | None
    retry_after_s: int | None = None
    mode: Literal["status", "drop", "hang", "empty-watch"] = "status"

    def matches(self, method: str, path: str, is_watch: bool) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path is None or path.startswith(self.path))
            and (self.watch is None or self.watch == is_watch)
        )


@dataclass(frozen=True)
class _Change:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: JsonObject
    old: JsonObject | None


@dataclass(frozen=True)
class _Route:
    rt: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclass
class _WatchState:
    epoch: int
    bookmark_generation: int
    cursor: int
    deadline: float = field(default=0.0)
    bookmark_at: float | None = None  # when the bookmark before the timeout is due


# --------------------------------------------------------------------------- server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeApiServer

    def process_request(self, request: Any, client_address: Any) -> None:
        self.fake._track(request, add=True)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.fake._track(request, add=False)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: _HTTPServer

    def _dispatch(self) -> None:
        self.server.fake._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("fake apiserver: " + format, *args)


class FakeApiServer:
    """See the module docstring. Start with :meth:`start`, or use the ``apiserver``
    fixture; all helpers are thread-safe."""

    def __init__(
        self,
        *,
        history_limit: int = 10_000,
        default_watch_timeout_s: float = 60.0,
        expired_as: Literal["event", "http"] = "event",
    ) -> None:
        self.history_limit = history_limit
        self.default_watch_timeout_s = default_watch_timeout_s
        self.expired_as = expired_as
        self._cond = threading.Condition()
        self._store: dict[str, dict[Key, JsonObject]] = {plural: {} for plural in RESOURCES}
        self._rv = 0
        self._compacted_rv = 0
        self._history: list[_Change] = []
        self._history_rvs: list[int] = []
        self._watch_epoch = 0
        self._close_abrupt = False
        self._close_mid_line = False
        self._bookmark_generation = 0
        self._active_watches = 0
        self._faults: list[_Fault] = []
        self._hang_generation = 0
        self._conflicts: dict[str, int] = {}
        self._blocked_evictions: set[str] = set()
        self._block_all_evictions = False
        self._requests: list[RecordedRequest] = []
        self._connections: set[socket.socket] = set()
        self._closed = False
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeApiServer:
        """Listen on 127.0.0.1 on a free port and serve on a daemon thread."""
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-apiserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """End watches, stop listening and close every open connection."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_port}"

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            (self._connections.add if add else self._connections.discard)(conn)

    # -- state helpers for tests

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion issued."""
        with self._cond:
            return self._rv

    def put_object(self, resource: str, obj: JsonObject) -> JsonObject:
        """Create or overwrite an object as is (status included, no precondition), as a
        controller elsewhere would; emits ADDED/MODIFIED. Returns the stored copy."""
        rt = RESOURCES[resource]
        new = copy.deepcopy(obj)
        meta = new.setdefault("metadata", {})
        if rt.namespaced:
            meta.setdefault("namespace", "default")
        key = self._key(rt, meta.get("namespace"), meta["name"])
        with self._cond:
            old = self._store[resource].get(key)
            if old is None:
                self._prepare_create(rt, new)
            else:
                self._carry_metadata(rt, old, new)
            return copy.deepcopy(self._commit(rt, "ADDED" if old is None else "MODIFIED", new, old))

    def delete_object(self, resource: str, name: str, namespace: str | None = None) -> JsonObject | None:
        """Delete an object at once; emits DELETED. Returns it, or None if absent."""
        rt = RESOURCES[resource]
        with self._cond:
            key = self._key(rt, namespace, name)
            old = self._store[resource].get(key)
            if old is None:
                return None
            return copy.deepcopy(self._commit(rt, "DELETED", copy.deepcopy(old), old))

    def objects(self, resource: str, namespace: str | None = None) -> list[JsonObject]:
        """Copies of the stored objects (all namespaces when None), in key order."""
        with self._cond:
            store = self._store[resource]
            return [copy.deepcopy(store[k]) for k in sorted(store) if namespace is None or k[0] == namespace]

    def get_object(self, resource: str, name: str, namespace: str | None = None) -> JsonObject | None:
        """A copy of one stored object, or None."""
        rt = RESOURCES[resource]
        with self._cond:
            obj = self._store[resource].get(self._key(rt, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def compact(self) -> int:
        """Compact history: every resourceVersion issued so far becomes too old to watch
        from. Open watches end too (an ERROR 410 event, or just end with
        ``expired_as="http"``), as if they had fallen behind the compaction (a real
        server's watches at the head survive one: to show that, end them with
        :meth:`close_watches` first); later watches from an older version get a 410.
        Lists return a newer version. Returns the compaction point."""
        with self._cond:
            self._rv += 1
            self._compacted_rv = self._rv
            self._history.clear()
            self._history_rvs.clear()
            self._cond.notify_all()
            return self._compacted_rv

    def close_watches(self, *, abrupt: bool = False, mid_line: bool = False) -> None:
        """End every open watch: cleanly (final chunk), ``abrupt=True`` by cutting the
        connection mid-stream, or ``mid_line=True`` cleanly but after the first half of an
        event line (a proxy that cut the body and still ended the chunked stream)."""
        with self._cond:
            self._watch_epoch += 1
            self._close_abrupt = abrupt
            self._close_mid_line = mid_line
            self._cond.notify_all()

    def send_bookmark(self) -> None:
        """Send a BOOKMARK (current resourceVersion) on every watch that allows them."""
        with self._cond:
            self._bookmark_generation += 1
            self._cond.notify_all()

    @property
    def active_watches(self) -> int:
        with self._cond:
            return self._active_watches

    def wait_for_watches(self, count: int = 1, timeout_s: float = 5.0) -> bool:
        """Block until at least ``count`` watches are open; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._active_watches < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # -- fault injection

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        *,
        method: str | None = None,
        path: str | None = None,
        watch: bool | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status`` and a Status body
        as the API server writes it: 401 ``Unauthorized``; 403 the RBAC authorizer's
        message naming the user, verb, resource, API group and scope; others
        ``injected fault <status>``. ``retry_after_s`` sets ``Retry-After`` and
        ``details.retryAfterSeconds`` (429 gets 1 s by default). ``path`` matches as a
        prefix; ``watch`` restricts to (non-)watch requests."""
        if retry_after_s is None and status == 429:
            retry_after_s = 1
        with self._cond:
            self._faults.append(_Fault(count, status, method, path, watch, retry_after_s))

    def hang_next(
        self,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        watch: bool | None = None,
    ) -> None:
        """Read the next ``count`` matching requests and never answer them (an overloaded
        or wedged API server behind a load balancer that keeps the connection), until
        :meth:`clear_faults` or :meth:`stop`."""
        with self._cond:
            self._faults.append(_Fault(count, None, method, path, watch, mode="hang"))

    def end_next_watches(self, count: int = 1, *, path: str | None = None) -> None:
        """Answer the next ``count`` watches with 200 and a stream that ends at once,
        without a single event (a proxy that closes long requests early)."""
        with self._cond:
            self._faults.append(_Fault(count, None, "GET", path, True, mode="empty-watch"))

    def drop_next(
        self,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        watch: bool | None = None,
    ) -> None:
        """Close the connection without any response on the next ``count`` matching
        requests."""
        with self._cond:
            self._faults.append(_Fault(count, None, method, path, watch, mode="drop"))

    def conflict_next_put(self, path: str, count: int = 1) -> None:
        """Answer the next ``count`` PUTs to exactly ``path`` with 409 Conflict."""
        with self._cond:
            self._conflicts[path] = self._conflicts.get(path, 0) + count

    def block_evictions(self, *pods: str) -> None:
        """Answer evictions of these pods (``ns/name``; every pod when none given) with
        429 TooManyRequests, as a PodDisruptionBudget with no disruptions allowed."""
        with self._cond:
            if pods:
                self._blocked_evictions.update(pods)
            else:
                self._block_all_evictions = True

    def clear_faults(self) -> None:
        """Forget every pending fault, conflict and eviction block."""
        with self._cond:
            self._faults.clear()
            self._hang_generation += 1
            self._cond.notify_all()
            self._conflicts.clear()
            self._blocked_evictions.clear()
            self._block_all_evictions = False

    # -- request log

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order."""
        with self._cond:
            return list(self._requests)

    def requests_to(self, method: str | None = None, path: str | None = None, *,
                    watch: bool | None = None) -> list[RecordedRequest]:
        """The logged requests with this method, exact path and watch-ness."""
        return [
            r for r in self.requests
            if (method is None or r.method == method)
            and (path is None or r.path == path)
            and (watch is None or r.is_watch == watch)
        ]

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    # -- storage core (call with the lock held)

    @staticmethod
    def _key(rt: ResourceType, namespace: str | None, name: str) -> Key:
        return ((namespace or "default") if rt.namespaced else "", name)

    def _prepare_create(self, rt: ResourceType, obj: JsonObject) -> None:
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _rfc3339(time.time())
        if rt.tracks_generation:
            meta["generation"] = 1
        fields = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        obj.clear()
        obj.update(apiVersion=rt.api_version, kind=rt.kind, **fields)

    @staticmethod
    def _carry_metadata(rt: ResourceType, old: JsonObject, new: JsonObject) -> None:
        """Keep what a client cannot change; bump generation on a spec change."""
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for immutable in ("uid", "creationTimestamp", "name", "namespace"):
            if immutable in old_meta:
                meta[immutable] = old_meta[immutable]
        meta.pop("resourceVersion", None)
        if rt.tracks_generation:
            meta["generation"] = old_meta.get("generation", 1) + (new.get("spec") != old.get("spec"))
        new["apiVersion"] = rt.api_version
        new["kind"] = rt.kind

    def _commit(self, rt: ResourceType, event_type: str, new: JsonObject, old: JsonObject | None) -> JsonObject:
        """Store (or delete) ``new`` under a fresh resourceVersion and record the watch
        event. A MODIFIED that changes nothing is a no-op returning ``old``."""
        if event_type == "MODIFIED" and old is not None:
            unchanged = copy.deepcopy(new)
            unchanged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if unchanged == old:
                return old
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        key = self._key(rt, new["metadata"].get("namespace"), new["metadata"]["name"])
        if event_type == "DELETED":
            self._store[rt.plural].pop(key, None)
        else:
            self._store[rt.plural][key] = new
        self._history.append(_Change(self._rv, rt.plural, event_type, new, old))
        self._history_rvs.append(self._rv)
        if len(self._history) > self.history_limit:
            drop = len(self._history) - self.history_limit // 2
            self._compacted_rv = self._history_rvs[drop - 1]
            del self._history[:drop], self._history_rvs[:drop]
        self._cond.notify_all()
        return new

    # -- HTTP

    def _handle(self, h: _Handler) -> None:
        parsed = urlsplit(h.path)
        path = parsed.path
        query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        content_type = (h.headers.get("Content-Type") or "").split(";")[0].strip() or None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        request = RecordedRequest(h.command, path, query, body, content_type, time.monotonic(),
                                  {name.lower(): value for name, value in h.headers.items()})
        with self._cond:
            self._requests.append(request)
            fault = next((f for f in self._faults if f.matches(h.command, path, request.is_watch)), None)
            if fault is not None:
                fault.remaining -= 1
        if fault is not None and fault.mode == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.mode == "hang":
            self._hang(h)
            return
        if fault is not None and fault.mode == "empty-watch":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            h.wfile.write(b"0\r\n\r\n")
            return
        try:
            if fault is not None:
                raise self._injected(fault, request)
            if isinstance(body, str):
                raise _Reply(400, "the request body is not valid JSON")
            code, response = self._dispatch(h, request)
        except _Reply as reply:
            code, response = reply.code, reply.body
            self._send_json(h, code, response, reply.headers)
            return
        except _WatchServed:
            return
        self._send_json(h, code, response)

    def _hang(self, h: _Handler) -> None:
        """Say nothing until the fault is cleared, the server stops or the client leaves."""
        with self._cond:
            generation = self._hang_generation
            while not self._closed and self._hang_generation == generation and not _peer_closed(h.connection):
                self._cond.wait(0.05)
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    SERVICE_ACCOUNT = "system:serviceaccount:powercap-system:powercap"

    def _injected(self, fault: _Fault, request: RecordedRequest) -> _Reply:
        code = fault.status or 500
        headers = {"Retry-After": str(fault.retry_after_s)} if fault.retry_after_s is not None else None
        details: JsonObject | None = {"retryAfterSeconds": fault.retry_after_s} if fault.retry_after_s is not None else None
        if code == 401:
            return _Reply(401, "Unauthorized", headers=headers)
        if code == 403:
            return self._forbidden(request)
        return _Reply(code, f"injected fault {code}", details=details, headers=headers)

    def _forbidden(self, request: RecordedRequest) -> _Reply:
        """The RBAC authorizer's 403, word for word (staging/src/k8s.io/apiserver/pkg/
        endpoints/handlers/responsewriters/errors.go, ``forbiddenMessage``)."""
        try:
            route = self._route(request.path)
        except _Reply as not_routed:
            return not_routed
        rt = route.rt
        verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[request.method]
        if request.method == "GET" and route.name is None:
            verb = "watch" if request.is_watch else "list"
        resource = rt.plural + (f"/{route.subresource}" if route.subresource else "")
        scope = f'in the namespace "{route.namespace}"' if route.namespace else "at the cluster scope"
        subject = f'{rt.qualified} "{route.name}"' if route.name else rt.qualified
        message = (f'{subject} is forbidden: User "{self.SERVICE_ACCOUNT}" cannot {verb} resource "{resource}" '
                   f'in API group "{rt.group}" {scope}')
        details: JsonObject = {"kind": rt.plural}
        if route.name:
            details["name"] = route.name
        if rt.group:
            details["group"] = rt.group
        return _Reply(403, message, details=details)

    @staticmethod
    def _send_json(h: _Handler, code: int, obj: JsonObject, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _route(path: str) -> _Route:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _Reply(404, "the server could not find the requested resource", details={})
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        rt = RESOURCES.get(rest[0]) if rest else None
        if (
            rt is None
            or (rt.group, rt.version) != (group, version)
            or (namespace is not None and not rt.namespaced)
            or len(rest) > 3
            or (len(rest) > 1 and rt.namespaced and namespace is None)
        ):
            raise _Reply(404, "the server could not find the requested resource", details={})
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        allowed = {"status"} if rt.status_subresource else set()
        if rt.plural == "pods":
            allowed.add("eviction")
        if subresource is not None and subresource not in allowed:
            raise _Reply(404, "the server could not find the requested resource", details={})
        return _Route(rt, namespace, name, subresource)

    def _dispatch(self, h: _Handler, req: RecordedRequest) -> tuple[int, JsonObject]:
        route = self._route(req.path)
        method = req.method
        if route.name is None:
            if method == "GET" and req.is_watch:
                self._serve_watch(h, route, req.query)
                raise _WatchServed
            if method == "GET":
                return 200, self._list(route, req.query)
            if method == "POST" and (route.namespace is not None or not route.rt.namespaced):
                return 201, self._create(route, req.body)
        elif route.subresource == "eviction":
            if method == "POST":
                return self._evict(route, req.body)
        elif method == "GET":
            return 200, self._get(route)
        elif method == "PUT":
            return 200, self._replace(route, req.path, req.body)
        elif method == "PATCH":
            return 200, self._patch(route, req.body, req.content_type)
        elif method == "DELETE" and route.subresource is None:
            return 200, self._delete(route)
        raise _Reply(405, "the server does not allow this method on the requested resource")

    def _lookup(self, route: _Route) -> JsonObject:
        assert route.name is not None
        obj = self._store[route.rt.plural].get(self._key(route.rt, route.namespace, route.name))
        if obj is None:
            raise _not_found(route.rt, route.name)
        return obj

    def _get(self, route: _Route) -> JsonObject:
        with self._cond:
            return copy.deepcopy(self._lookup(route))

    def _matcher(self, route: _Route, query: Mapping[str, str]) -> Predicate:
        predicates = parse_field_selector(query.get("fieldSelector", ""), route.rt)
        predicates += parse_label_selector(query.get("labelSelector", ""))
        namespace = route.namespace

        def matches(obj: Mapping[str, Any]) -> bool:
            if namespace is not None and (obj.get("metadata") or {}).get("namespace") != namespace:
                return False
            return all(p(obj) for p in predicates)

        return matches

    def _list(self, route: _Route, query: Mapping[str, str]) -> JsonObject:
        rt = route.rt
        matches = self._matcher(route, query)
        limit = int(query.get("limit") or 0)
        start: Key | None = None
        with self._cond:
            list_rv = self._rv
            if query.get("continue"):
                try:
                    token = json.loads(base64.b64decode(query["continue"]))
                    list_rv, start = int(token["rv"]), (token["start"][0], token["start"][1])
                except (ValueError, KeyError, TypeError, IndexError):
                    raise _Reply(400, "continue key is not valid") from None
                if list_rv < self._compacted_rv:
                    raise _Reply(
                        410,
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter.",
                    )
            store = self._store[rt.plural]
            keys = [k for k in sorted(store) if (start is None or k > start) and matches(store[k])]
            page = keys[:limit] if limit > 0 else keys
            items = [copy.deepcopy(store[k]) for k in page]
        metadata: JsonObject = {"resourceVersion": str(list_rv)}
        if limit > 0 and len(keys) > limit:
            token = {"rv": list_rv, "start": list(page[-1])}
            metadata["continue"] = base64.b64encode(json.dumps(token).encode()).decode()
            metadata["remainingItemCount"] = len(keys) - limit
        if rt.builtin:
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": metadata, "items": items}

    def _create(self, route: _Route, body: Any) -> JsonObject:
        rt = route.rt
        if not isinstance(body, dict):
            raise _Reply(400, "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") not in (None, "", route.namespace):
                raise _Reply(400, "the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = route.namespace
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _Reply(422, f'{rt.kind}.{rt.group or "core"} "" is invalid: metadata.name: Required value: '
                             "name or generateName is required", reason="Invalid")
            suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            meta["name"] = meta["generateName"] + suffix
        if rt.plural == "events":
            causes = _validate_event(obj)
            if causes:
                summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
                raise _Reply(422, f'{rt.kind}.{rt.group} "{meta["name"]}" is invalid: [{summary}]',
                             reason="Invalid", details={**rt.details(meta["name"]), "kind": rt.kind, "causes": causes})
        if rt.status_subresource and not rt.builtin:
            obj.pop("status", None)
        meta.pop("resourceVersion", None)
        with self._cond:
            if self._key(rt, meta.get("namespace"), meta["name"]) in self._store[rt.plural]:
                raise _Reply(409, f'{rt.qualified} "{meta["name"]}" already exists',
                             reason="AlreadyExists", details=rt.details(meta["name"]))
            self._prepare_create(rt, obj)
            return copy.deepcopy(self._commit(rt, "ADDED", obj, None))

    def _write(self, route: _Route, new: JsonObject, expected_rv: str | None) -> JsonObject:
        """Replace the object with ``new`` under the subresource rules; lock held."""
        rt, name = route.rt, route.name
        assert name is not None
        old = self._lookup(route)
        if expected_rv and expected_rv != old["metadata"]["resourceVersion"]:
            raise _conflict(rt, name)
        if route.subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = copy.deepcopy(new["status"])
            else:
                merged.pop("status", None)
            new = merged
        else:
            new = copy.deepcopy(new)
            new_meta = new.get("metadata") or {}
            if new_meta.get("name") not in (None, name) or (
                rt.namespaced and new_meta.get("namespace") not in (None, route.namespace)
            ):
                raise _Reply(400, "the name or namespace of the object does not match the request path")
            if rt.status_subresource:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        self._carry_metadata(rt, old, new)
        return copy.deepcopy(self._commit(rt, "MODIFIED", new, old))

    def _replace(self, route: _Route, path: str, body: Any) -> JsonObject:
        if not isinstance(body, dict):
            raise _Reply(400, "the request body must be a JSON object")
        with self._cond:
            if self._conflicts.get(path):
                self._conflicts[path] -= 1
                self._lookup(route)
                assert route.name is not None
                raise _conflict(route.rt, route.name)
            return self._write(route, body, (body.get("metadata") or {}).get("resourceVersion"))

    def _patch(self, route: _Route, body: Any, content_type: str | None) -> JsonObject:
        with self._cond:
            old = self._lookup(route)
            current = copy.deepcopy(old)
            if content_type == "application/merge-patch+json" or (
                content_type == "application/strategic-merge-patch+json" and route.rt.builtin
            ):
                patched = _merge_patch(current, body)
            elif content_type == "application/json-patch+json":
                try:
                    patched = jsonpatch.apply_patch(current, body)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
                    raise _Reply(422, f"the server rejected our request due to an error in our request: {exc}",
                                 reason="Invalid") from None
            else:
                raise _Reply(
                    415,
                    f"the body of the request was in an unknown format - accepted media types include: "
                    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                )
            if not isinstance(patched, dict):
                raise _Reply(422, "the patch must produce an object", reason="Invalid")
            # a patch that sets metadata.resourceVersion is a precondition, as on the real server
            return self._write(route, patched, (patched.get("metadata") or {}).get("resourceVersion"))

    def _delete(self, route: _Route) -> JsonObject:
        rt = route.rt
        with self._cond:
            old = self._lookup(route)
            deleted = copy.deepcopy(self._commit(rt, "DELETED", copy.deepcopy(old), old))
        if rt.returns_deleted_object:
            return deleted
        assert route.name is not None
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": rt.details(route.name, uid=deleted["metadata"].get("uid")),
        }

    def _evict(self, route: _Route, body: Any) -> tuple[int, JsonObject]:
        rt, name = route.rt, route.name
        assert name is not None
        if not isinstance(body, dict) or body.get("kind") != "Eviction":
            raise _Reply(400, "the request body must be a policy/v1 Eviction")
        with self._cond:
            pod = self._lookup(route)
            key = f"{route.namespace}/{name}"
            if self._block_all_evictions or key in self._blocked_evictions:
                raise _Reply(
                    429,
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                    details={"causes": [{
                        "reason": "DisruptionBudget",
                        "message": "The disruption budget fake-pdb needs 1 healthy pods and has 1 currently",
                    }]},
                )
            self._commit(rt, "DELETED", copy.deepcopy(pod), pod)
        return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    # -- watch

    def _serve_watch(self, h: _Handler, route: _Route, query: Mapping[str, str]) -> None:
        rt = route.rt
        matches = self._matcher(route, query)  # a bad selector is a 400 before streaming
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout_s = float(query.get("timeoutSeconds") or self.default_watch_timeout_s)
        rv_text = query.get("resourceVersion", "")
        try:
            requested_rv = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            raise _Reply(400, f'resourceVersion: Invalid value: "{rv_text}": must be an integer') from None
        initial: list[JsonObject] = []
        with self._cond:
            expired = requested_rv is not None and requested_rv < self._compacted_rv
            if expired and self.expired_as == "http":
                raise _Reply(410, f"too old resource version: {requested_rv} ({self._compacted_rv})")
            if requested_rv is None:
                initial = [copy.deepcopy(o) for _, o in sorted(self._store[rt.plural].items()) if matches(o)]
            state = _WatchState(self._watch_epoch, self._bookmark_generation, requested_rv or self._rv)
            state.deadline = time.monotonic() + timeout_s
            # kube-apiserver's watch cache: a bookmark 2 s before the timeout, none when that is past
            state.bookmark_at = state.deadline - 2.0 if bookmarks and timeout_s > 2.0 else None
            self._active_watches += 1
            self._cond.notify_all()
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            if expired:
                self._write_event(h, "ERROR", self._expired_status(requested_rv or 0))
            else:
                for obj in initial:
                    self._write_event(h, "ADDED", obj)
                if requested_rv is None and bookmarks:
                    self._write_bookmark(h, rt, state.cursor, {"k8s.io/initial-events-end": "true"})
                self._stream_changes(h, route, matches, bookmarks, state)
                return
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._active_watches -= 1

    def _expired_status(self, requested_rv: int) -> JsonObject:
        return _status(410, "Expired", f"too old resource version: {requested_rv} ({self._compacted_rv})")

    def _await_news(self, h: _Handler, state: _WatchState) -> str:
        """Wait, lock held, until the watch has something to do, and say what: ``news``
        (changes or a bookmark request), ``bookmark`` (the one before the timeout is due),
        ``timeout``, ``expired`` (compacted past the cursor), ``close`` / ``cut``
        (close_watches, server stop) or ``gone`` (the client left, as a cancelled request
        context)."""
        while True:
            if self._closed or self._watch_epoch != state.epoch:
                return "cut" if self._closed or self._close_abrupt else "close"
            if state.cursor < self._compacted_rv:
                return "expired"
            if self._rv > state.cursor or self._bookmark_generation != state.bookmark_generation:
                return "news"
            now_s = time.monotonic()
            remaining_s = state.deadline - now_s
            if remaining_s <= 0:
                return "timeout"
            if state.bookmark_at is not None and now_s >= state.bookmark_at:
                state.bookmark_at = None
                return "bookmark"
            if _peer_closed(h.connection):
                return "gone"
            self._cond.wait(min(remaining_s, 0.05))

    def _stream_changes(self, h: _Handler, route: _Route, matches: Predicate, bookmarks: bool,
                        state: _WatchState) -> None:
        """Send events after ``state.cursor`` until timeout, close or compaction."""
        rt = route.rt
        while True:
            with self._cond:
                news = self._await_news(h, state)
                changes = self._history[bisect.bisect_right(self._history_rvs, state.cursor):]
                if news == "news":
                    state.cursor = self._rv
                expired = self._expired_status(state.cursor) if news == "expired" else None
                bookmark_due = bookmarks and (
                    news == "bookmark" or (news == "news" and self._bookmark_generation != state.bookmark_generation)
                )
                state.bookmark_generation = self._bookmark_generation
            if news == "gone":
                return
            if news == "cut":
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            if news == "close" and self._close_mid_line:
                half = b'{"type":"ADDED","object":{"kind":"'
                h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(half), half))
                return
            if news == "news":
                for change in changes:
                    event_type = self._transition(change, matches) if change.resource == rt.plural else None
                    if event_type:
                        self._write_event(h, event_type, change.obj)
            if bookmark_due:
                self._write_bookmark(h, rt, state.cursor)
            if expired is not None and self.expired_as == "event":
                self._write_event(h, "ERROR", expired)
            if news not in ("news", "bookmark"):
                h.wfile.write(b"0\r\n\r\n")
                return

    @staticmethod
    def _transition(change: _Change, matches: Predicate) -> str | None:
        """The event a selector-filtered watch sees for ``change`` (None: nothing)."""
        now = change.type != "DELETED" and matches(change.obj)
        before = change.old is not None and matches(change.old)
        if now and before:
            return "MODIFIED"
        if now:
            return "ADDED"
        if before:
            return "DELETED"
        return None

    def _write_bookmark(self, h: _Handler, rt: ResourceType, resource_version: int,
                        annotations: Mapping[str, str] | None = None) -> None:
        metadata: JsonObject = {"resourceVersion": str(resource_version)}
        if annotations:
            metadata["annotations"] = dict(annotations)
        self._write_event(h, "BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": metadata})

    @staticmethod
    def _write_event(h: _Handler, event_type: str, obj: JsonObject) -> None:
        line = json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))


def _peer_closed(conn: socket.socket) -> bool:
    """True when the client closed its end (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _WatchServed(Exception):
    """The watch handler wrote its own response."""

