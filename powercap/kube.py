"""The one Kubernetes client module of powercap (DESIGN.md section 1).

Everything that talks to the Kubernetes API server goes through here: a thin JSON REST
client (:class:`KubeClient`), our own error hierarchy (:class:`ApiError` and its
subclasses), path builders for the resources powercap uses, a watch-backed cache
(:class:`WatchCache`), Lease-based leader election (:class:`LeaderElector`) and a few
write helpers (annotations, Events, status updates, evictions). This is the only file of
the project that imports ``kubernetes``; it holds plumbing only, no decisions.

Conventions:

- Objects are plain JSON dicts exactly as the API server sends them (no generated model
  classes). Objects handed out by a :class:`WatchCache` are shared: treat them as
  read-only.
- Every :class:`KubeClient` method makes exactly one HTTP request (``list`` one per page)
  and never retries: the retry policy belongs to the caller (the cache and the elector
  have theirs). Callers only ever see :class:`ApiError` and its subclasses, never urllib3
  or kubernetes exceptions.
- Times on the wire are RFC 3339 strings; in Python they are float seconds since the
  epoch (``*_s``), read from an injectable clock where the timing matters.
"""

from __future__ import annotations

import copy
import datetime as dt
import enum
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlencode

import urllib3
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from powercap import API_GROUP, API_VERSION, PLURAL, __version__
from powercap.telemetry import parse_rfc3339

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]
"""A Kubernetes object, list or Status as decoded JSON."""
Params = Mapping[str, str | int | bool | None]
"""Query parameters; ``None`` values are left out, booleans become ``true``/``false``."""
PatchType = Literal["merge", "json", "strategic"]
WatchListener = Callable[[str, JsonObject], None]
Clock = Callable[[], float]
"""Returns the wall-clock time in seconds since the epoch (``time.time``)."""

PATCH_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_WATCH_TIMEOUT_S = 300.0
# A Retry-After (429, 503) is honoured up to this; a bigger one would leave a cache stale
# for longer than any backoff of ours.
MAX_RETRY_AFTER_S = 60.0


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request to the API server failed.

    ``code`` is the HTTP status (0 when no response came back), ``reason`` the
    Kubernetes ``Status.reason`` (``NotFound``, ``Conflict``, ``AlreadyExists``,
    ``Expired``, ...), ``message`` the human-readable ``Status.message``, ``details``
    the ``Status.details`` object (may be empty), ``retry_after_s`` the server's advice
    from the ``Retry-After`` header or ``details.retryAfterSeconds`` (None without).
    """

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details: Mapping[str, Any] = details or {}
        self.retry_after_s = retry_after_s
        self.request: RequestFacts | None = None

    def __str__(self) -> str:
        text = f"{self.code} {self.reason}: {self.message}"
        hint = self.permission_hint
        return f"{text} ({hint})" if hint else text

    @property
    def denied(self) -> bool:
        """401 or 403: a deployment mistake (credentials, RBAC), not a passing fault."""
        return self.code in (401, 403)

    @property
    def log_level(self) -> int:
        """ERROR when :attr:`denied` (nothing heals it but the operator), else WARNING."""
        return logging.ERROR if self.denied else logging.WARNING

    @property
    def permission_hint(self) -> str:
        """For a 401 or 403 of a request we sent: what the operator must fix, naming the
        verb and the resource ("" otherwise). A 403 message of the RBAC authorizer names
        them too, but a 401, or a 403 from a webhook authorizer or a proxy, does not."""
        if self.request is None or not self.denied:
            return ""
        if self.code == 401:
            return (f"the API server did not accept our credentials to {self.request.describe()}: "
                    "the service account token is missing, expired or revoked")
        return f"missing RBAC permission: {self.request.describe()}"


class RequestFacts:
    """What a request did, in RBAC's words: ``verb`` (get, list, watch, create, update,
    patch, delete), ``resource`` (``pods``, ``pods/eviction``), ``api_group`` ("" for the
    core group) and ``namespace`` (None at the cluster scope)."""

    __slots__ = ("verb", "resource", "api_group", "namespace")

    def __init__(self, verb: str, resource: str, api_group: str, namespace: str | None) -> None:
        self.verb, self.resource, self.api_group, self.namespace = verb, resource, api_group, namespace

    @classmethod
    def of(cls, method: str, path: str, params: Params | None) -> RequestFacts | None:
        """The facts of ``method path``, or None for a path that names no resource."""
        parts = [p for p in path.split("?")[0].strip("/").split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest:
            return None
        plural, name = rest[0], rest[1] if len(rest) > 1 else None
        resource = plural + (f"/{rest[2]}" if len(rest) > 2 else "")
        watching = str((params or {}).get("watch")).lower() in ("true", "1")
        verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
        if method == "GET" and name is None:
            verb = "watch" if watching else "list"
        elif method == "DELETE" and name is None:
            verb = "deletecollection"
        return cls(verb, resource, group, namespace)

    def describe(self) -> str:
        """``list pods in API group "" at the cluster scope`` (the RBAC rule to grant)."""
        scope = f'in namespace "{self.namespace}"' if self.namespace else "at the cluster scope"
        return f'{self.verb} {self.resource} in API group "{self.api_group}" {scope}'


class NotFound(ApiError):
    """404: the object (or the resource type) does not exist."""


class Conflict(ApiError):
    """409: a stale resourceVersion on write (reason ``Conflict``) or a create of a name
    that exists (reason ``AlreadyExists``)."""


class Gone(ApiError):
    """410: the requested resourceVersion (or continue token) is too old: list again."""


class TooManyRequests(ApiError):
    """429: throttled (see ``retry_after_s``), or an eviction that a
    PodDisruptionBudget forbids for now."""


class Unreachable(ApiError):
    """No HTTP response: connection refused or reset, TLS failure, or a timeout.

    ``code`` is 0 and ``reason`` is ``Unreachable``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(0, "Unreachable", message)


class KubeConfigError(Exception):
    """Neither an in-cluster service account nor a usable kubeconfig was found."""


_ERRORS_BY_CODE: dict[int, type[ApiError]] = {
    404: NotFound,
    409: Conflict,
    410: Gone,
    429: TooManyRequests,
}


def error_from_status(
    status: Mapping[str, Any],
    http_status: int = 0,
    retry_after_s: float | None = None,
) -> ApiError:
    """Build the exception matching a Kubernetes ``Status`` object.

    The code is ``status.code`` when present, else ``http_status``. Use it on the object
    of a watch ``ERROR`` event: ``raise error_from_status(obj)``.
    """
    code = int(status.get("code") or http_status or 0)
    reason = str(status.get("reason") or "Unknown")
    message = str(status.get("message") or "")
    details = status.get("details") or {}
    if retry_after_s is None and details.get("retryAfterSeconds"):
        retry_after_s = float(details["retryAfterSeconds"])
    error_type = _ERRORS_BY_CODE.get(code, ApiError)
    return error_type(code, reason, message, details=details, retry_after_s=retry_after_s)


def _error_from_response(http_status: int, http_reason: str, body: bytes, retry_after: str | None) -> ApiError:
    retry_after_s: float | None = None
    if retry_after:
        try:
            retry_after_s = float(retry_after)
        except ValueError:
            retry_after_s = None
    try:
        status = json.loads(body) if body else {}
    except ValueError:
        status = {}
    if not isinstance(status, dict) or status.get("kind") != "Status":
        text = body.decode("utf-8", "replace").strip()[:500]
        status = {"reason": http_reason or "Unknown", "message": text or http_reason}
    return error_from_status(status, http_status, retry_after_s)


# --------------------------------------------------------------------------- time


def format_micro_time(t_s: float) -> str:
    """Format epoch seconds as a Kubernetes MicroTime: ``2026-11-27T23:19:01.123456Z``."""
    return dt.datetime.fromtimestamp(t_s, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> float:
    """Parse an RFC 3339 Time or MicroTime (``...Z`` or ``...+00:00``) to epoch seconds.

    Raises ``ValueError`` on anything else.
    """
    parsed = parse_rfc3339(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


# --------------------------------------------------------------------------- paths


def _collection_path(prefix: str, plural: str, namespace: str | None) -> str:
    if namespace is None:
        return f"{prefix}/{plural}"
    return f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}"


def _resource_path(prefix: str, plural: str, namespace: str | None, name: str | None) -> str:
    path = _collection_path(prefix, plural, namespace)
    return path if name is None else f"{path}/{quote(name, safe='')}"


def _namespaced_object_path(prefix: str, plural: str, namespace: str | None, name: str | None) -> str:
    if name is not None and namespace is None:
        raise ValueError(f"a namespaced {plural} object needs its namespace")
    return _resource_path(prefix, plural, namespace, name)


CORE_V1 = "/api/v1"
EVENTS_V1 = "/apis/events.k8s.io/v1"
COORDINATION_V1 = "/apis/coordination.k8s.io/v1"
POLICY_PREFIX = f"/apis/{API_GROUP}/{API_VERSION}"


def node_path(name: str | None = None) -> str:
    """``/api/v1/nodes`` or ``/api/v1/nodes/NAME``."""
    return _resource_path(CORE_V1, "nodes", None, name)


def pod_path(namespace: str | None = None, name: str | None = None) -> str:
    """Pods in all namespaces (``namespace=None``), in one namespace, or one pod."""
    return _namespaced_object_path(CORE_V1, "pods", namespace, name)


def eviction_path(namespace: str, name: str) -> str:
    """The policy/v1 eviction subresource of a pod (POST an ``Eviction`` there)."""
    return pod_path(namespace, name) + "/eviction"


def event_path(namespace: str | None = None, name: str | None = None) -> str:
    """events.k8s.io/v1 Events in all namespaces, in one namespace, or one Event."""
    return _namespaced_object_path(EVENTS_V1, "events", namespace, name)


def lease_path(namespace: str | None = None, name: str | None = None) -> str:
    """coordination.k8s.io/v1 Leases in all namespaces, in one namespace, or one Lease."""
    return _namespaced_object_path(COORDINATION_V1, "leases", namespace, name)


def policy_path(namespace: str | None = None, name: str | None = None) -> str:
    """PowerCappingPolicies in all namespaces, in one namespace, or one policy."""
    return _namespaced_object_path(POLICY_PREFIX, PLURAL, namespace, name)


def status_path(object_path: str) -> str:
    """The ``/status`` subresource of the object at ``object_path``."""
    return object_path.rstrip("/") + "/status"


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name``, or ``name`` for a cluster-scoped object (client-go's key)."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    name = meta.get("name", "")
    return f"{namespace}/{name}" if namespace else name


def resource_version(obj: Mapping[str, Any]) -> str:
    """``metadata.resourceVersion`` of an object or list ("" when absent)."""
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


# --------------------------------------------------------------------------- client


def _query(params: Params | None) -> str:
    if not params:
        return ""
    pairs = [
        (key, ("true" if value else "false") if isinstance(value, bool) else str(value))
        for key, value in params.items()
        if value is not None
    ]
    return "?" + urlencode(pairs) if pairs else ""


def _shutdown_socket(response: urllib3.BaseHTTPResponse) -> None:
    """Unblock a thread reading ``response`` by shutting its socket down for reading."""
    try:
        response.shutdown()  # urllib3 >= 2.3
        return
    except (AttributeError, ValueError, RuntimeError, OSError):
        pass
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _set_read_timeout(response: urllib3.BaseHTTPResponse, timeout_s: float) -> None:
    """Let the rest of ``response`` be read with ``timeout_s`` per socket read."""
    connection = getattr(response, "connection", None) or getattr(response, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(timeout_s)


_Closable = TypeVar("_Closable", bound="_ClosesOnExit")


class _ClosesOnExit:
    """``with obj:`` calls ``obj.close()`` at the end of the block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Closable) -> _Closable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class WatchStream(_ClosesOnExit, Iterator[tuple[str, JsonObject]]):
    """The events of one watch request, as ``(type, object)`` pairs.

    Types are ``ADDED``, ``MODIFIED``, ``DELETED``, ``BOOKMARK`` (object carries only
    ``metadata.resourceVersion``) and ``ERROR`` (object is a ``Status``; see
    :func:`error_from_status`). Iteration ends when the server closes the stream
    (``timeoutSeconds`` reached) or after :meth:`close`; a broken connection raises
    :class:`Unreachable`. :meth:`close` may be called from any thread and unblocks a
    reader waiting for the next event.
    """

    def __init__(self, response: urllib3.BaseHTTPResponse, path: str) -> None:
        self._response = response
        self._path = path
        self._lock = threading.Lock()
        self._closed = False
        self._reading = False
        self._finished = False
        self._pending: list[bytes] = []
        self._partial = b""
        if response.chunked:
            self._raw: Iterator[bytes] = response.stream(None)
        else:
            self._raw = response.stream(65536)

    def __iter__(self) -> WatchStream:
        return self

    def __next__(self) -> tuple[str, JsonObject]:
        with self._lock:
            if self._closed or self._finished:
                raise StopIteration
            self._reading = True
        try:
            line = self._next_line()
        except StopIteration:
            self._finish()
            raise
        except Exception as exc:
            closed = self._closed
            self._finish()
            if closed:
                raise StopIteration from None
            if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
                raise Unreachable(f"watch {self._path}: {exc}") from exc
            raise
        finally:
            with self._lock:
                self._reading = False
        try:
            event = json.loads(line)
            return str(event["type"]), event["object"]
        except (ValueError, KeyError, TypeError) as exc:
            self._finish()
            raise ApiError(0, "InvalidWatchEvent", f"watch {self._path}: {line[:200]!r}") from exc

    def _next_line(self) -> bytes:
        while not self._pending:
            chunk = next(self._raw, None)
            if chunk is None:
                rest, self._partial = self._partial.strip(), b""
                if rest:
                    return rest
                raise StopIteration
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            self._pending = [line for line in lines if line.strip()]
        return self._pending.pop(0)

    def _finish(self) -> None:
        with self._lock:
            already, self._finished = self._finished, True
        if not already:
            self._response.close()

    def close(self) -> None:
        """End the stream; safe from any thread, idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        _shutdown_socket(self._response)
        if not reading:
            self._finish()


class KubeClient(_ClosesOnExit):
    """Raw JSON REST over the official client's configuration and connection pool.

    Dicts in, dicts out. Authentication (bearer token with refresh, client
    certificates), TLS and proxies come from the ``kubernetes.client.ApiClient`` it wraps;
    requests go through that client's urllib3 pool with explicit connect/read timeouts
    and without transport retries. Every method raises :class:`ApiError` (or a subclass)
    on failure. Thread-safe: share one client per process.
    """

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        self._api_client = api_client
        self._config = api_client.configuration
        self._pool = api_client.rest_client.pool_manager
        self._host = str(self._config.host).rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s

    @classmethod
    def from_environment(
        cls, *, kubeconfig: str | None = None, context: str | None = None, **timeouts: float
    ) -> KubeClient:
        """In-cluster service account when running in a pod, else a kubeconfig:
        ``kubeconfig`` (e.g. a ``--kubeconfig`` flag), else ``$KUBECONFIG`` as set now
        (paths joined by ``:``), else ``~/.kube/config``; optionally a named ``context``.

        Raises :class:`KubeConfigError` when neither is usable.
        """
        config = k8s_client.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=config)
        except k8s_config.ConfigException:
            # the kubernetes package reads $KUBECONFIG once at import: read it here
            config_file = kubeconfig or os.environ.get("KUBECONFIG") or None
            try:
                k8s_config.load_kube_config(config_file=config_file, context=context, client_configuration=config)
            except yaml.YAMLError as exc:
                where = config_file or "~/.kube/config"
                raise KubeConfigError(f"kubeconfig {where} is not valid YAML: {' '.join(str(exc).split())}") from None
            except (k8s_config.ConfigException, OSError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
                # a kubeconfig of the wrong shape (clusters: 5, a list) fails inside the client's loader
                where = config_file or "~/.kube/config"
                detail = str(exc) if isinstance(exc, (k8s_config.ConfigException, OSError)) else f"{where} is not a kubeconfig ({exc})"
                raise KubeConfigError(f"no in-cluster config and no usable kubeconfig: {detail}") from None
        return cls(k8s_client.ApiClient(config), **timeouts)

    @classmethod
    def for_server(
        cls,
        url: str,
        token: str | None = None,
        ca_file: str | None = None,
        **timeouts: float,
    ) -> KubeClient:
        """A client for an explicit server URL (tests use the fake API server's URL).

        ``token`` is sent as ``Authorization: Bearer``; ``ca_file`` verifies the
        server's TLS certificate.
        """
        config = k8s_client.Configuration()
        config.host = url
        if token:
            config.api_key = {"authorization": f"Bearer {token}"}
        if ca_file:
            config.ssl_ca_cert = ca_file
            config.verify_ssl = True
        return cls(k8s_client.ApiClient(config), **timeouts)

    @property
    def host(self) -> str:
        """The API server's base URL."""
        return self._host

    def close(self) -> None:
        """Close pooled connections."""
        self._api_client.close()

    # -- raw requests

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = dict(getattr(self._api_client, "default_headers", None) or {})
        headers.update({"Accept": "application/json", "User-Agent": f"powercap/{__version__}"})
        for setting in self._config.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _send(
        self,
        method: str,
        path: str,
        params: Params | None,
        body: Any,
        content_type: str | None,
        read_timeout_s: float,
    ) -> urllib3.BaseHTTPResponse:
        """Send one request; return the unread response (status < 400) or raise."""
        url = self._host + path + _query(params)
        data = None if body is None else json.dumps(body).encode()
        try:
            response = self._pool.request(
                method,
                url,
                body=data,
                headers=self._headers(content_type if data is not None else None),
                timeout=urllib3.Timeout(connect=self.connect_timeout_s, read=read_timeout_s),
                retries=False,
                redirect=False,
                preload_content=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unreachable(f"{method} {path}: {exc}") from exc
        if response.status >= 400:
            try:
                raw = response.read()
            except (urllib3.exceptions.HTTPError, OSError):
                raw = b""
            finally:
                response.release_conn()
            error = _error_from_response(
                response.status, response.reason or "", raw, response.headers.get("Retry-After")
            )
            error.request = RequestFacts.of(method, path, params)
            raise error
        return response

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> JsonObject:
        """Send one request with a JSON body (if any) and return the decoded response.

        The escape hatch under the verbs below; an empty response body yields ``{}``.
        """
        response = self._send(method, path, params, body, content_type, self.read_timeout_s)
        try:
            raw = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unreachable(f"{method} {path}: {exc}") from exc
        finally:
            response.release_conn()
        if not raw:
            return {}
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            raise ApiError(response.status, "InvalidResponse", raw[:200].decode("utf-8", "replace"))
        return decoded

    # -- verbs

    def get(self, path: str, params: Params | None = None) -> JsonObject:
        """GET one object (or any read-only endpoint)."""
        return self.request("GET", path, params=params)

    def list(self, path: str, params: Params | None = None) -> JsonObject:
        """LIST a collection, following ``metadata.continue`` when ``limit`` is set.

        Returns the first page's List with every page's items merged and no
        ``continue``. Items always carry ``kind`` and ``apiVersion`` (the API server
        leaves them out of built-in lists). Raises :class:`Gone` when a continue token
        expired mid-way: list again.
        """
        page_params = dict(params or {})
        result = self.request("GET", path, params=page_params)
        items: list[JsonObject] = list(result.get("items") or [])
        token = (result.get("metadata") or {}).get("continue")
        while token:
            page_params["continue"] = token
            page = self.request("GET", path, params=page_params)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
        item_kind = str(result.get("kind", "")).removesuffix("List")
        api_version = result.get("apiVersion")
        for item in items:
            if item_kind:
                item.setdefault("kind", item_kind)
            if api_version:
                item.setdefault("apiVersion", api_version)
        metadata = dict(result.get("metadata") or {})
        metadata.pop("continue", None)
        metadata.pop("remainingItemCount", None)
        result["metadata"] = metadata
        result["items"] = items
        return result

    def watch(
        self,
        path: str,
        resource_version: str,
        params: Params | None = None,
        timeout_s: float = DEFAULT_WATCH_TIMEOUT_S,
        allow_bookmarks: bool = True,
    ) -> WatchStream:
        """Start a watch on a collection from ``resource_version``.

        ``resource_version`` "" or "0" first replays the current objects as ADDED.
        The server ends the stream after ``timeout_s``. The response headers must come
        within the client's read timeout; after them the read timeout is ``timeout_s``
        plus the client's read timeout. Raises at once when the server
        refuses the watch (e.g. :class:`Gone` as an HTTP 410); later failures surface
        while iterating. See :class:`WatchStream`.
        """
        watch_params: dict[str, Any] = dict(params or {})
        watch_params.update(
            watch="true",
            resourceVersion=resource_version or None,
            allowWatchBookmarks=True if allow_bookmarks else None,
            timeoutSeconds=max(1, int(timeout_s)),
        )
        # The headers must come within the read timeout (a wedged server is noticed like
        # on any request); only then may the stream stay quiet until the server ends it.
        response = self._send("GET", path, watch_params, None, None, self.read_timeout_s)
        _set_read_timeout(response, timeout_s + self.read_timeout_s)
        return WatchStream(response, path)

    def create(self, path: str, body: JsonObject) -> JsonObject:
        """POST ``body`` to a collection; returns the created object.

        Raises :class:`Conflict` (reason ``AlreadyExists``) when the name is taken.
        """
        return self.request("POST", path, body=body)

    def replace(self, path: str, body: JsonObject) -> JsonObject:
        """PUT ``body`` over the object at ``path``; returns the stored object.

        With ``metadata.resourceVersion`` set the write is conditional: a concurrent
        change raises :class:`Conflict` (reason ``Conflict``).
        """
        return self.request("PUT", path, body=body)

    def patch(self, path: str, body: Any, patch_type: PatchType = "merge") -> JsonObject:
        """PATCH the object at ``path``; returns the patched object.

        ``merge``: RFC 7386 JSON merge patch (``None`` deletes a key); ``json``: RFC 6902
        operation list; ``strategic``: strategic merge (built-in kinds only; the server
        answers 415 for custom resources).
        """
        return self.request("PATCH", path, body=body, content_type=PATCH_CONTENT_TYPES[patch_type])

    def delete(self, path: str, params: Params | None = None) -> JsonObject:
        """DELETE the object at ``path`` (``params`` e.g. ``gracePeriodSeconds``,
        ``propagationPolicy``); returns the deleted object or a ``Status``."""
        return self.request("DELETE", path, params=params)


# --------------------------------------------------------------------------- cache


def _backoff_s(failures: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: ``min(max_s, initial_s * 2**(failures-1))``
    scaled by a uniform factor in [0.5, 1)."""
    ceiling = min(max_s, initial_s * 2.0 ** max(0, failures - 1))
    return ceiling * (0.5 + rng.random() / 2)


class WatchCache:
    """A local copy of a collection kept current by list + watch (a client-go reflector).

    A background thread lists ``list_path`` (with ``params``: selectors), then watches
    from the list's resourceVersion with bookmarks. ADDED/MODIFIED/DELETED events are
    applied to a dict keyed by :func:`object_key`. On 410 Gone (an HTTP 410 or an
    ``ERROR`` event carrying a 410 Status) it lists again and emits the difference as
    events; on any other failure it waits an exponential backoff with jitter (capped at
    ``backoff_max_s``), or the server's ``Retry-After`` when longer, and watches again
    from the last resourceVersion seen. A watch that ends without delivering anything
    counts as a failure too, so a server or proxy that closes watches at once is not
    hammered. 401 and 403 are logged as errors naming the verb and resource to grant.

    ``version`` increases by one for every applied change, so a consumer rebuilds a
    derived view only when it moved. Listeners run on the cache thread after each
    change, with ``(type, object)``; they must be quick and must not block; their
    exceptions are logged and swallowed. Objects are shared: do not mutate them.
    """

    def __init__(
        self,
        client: KubeClient,
        list_path: str,
        params: Params | None = None,
        *,
        name: str | None = None,
        watch_timeout_s: float = DEFAULT_WATCH_TIMEOUT_S,
        page_size: int = 500,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._list_path = list_path
        self._params: dict[str, Any] = dict(params or {})
        self.name = name or list_path
        self._watch_timeout_s = watch_timeout_s
        self._page_size = page_size
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._items: dict[str, JsonObject] = {}
        self._version = 0
        self._resource_version = ""
        self._synced = threading.Event()
        self._connected = threading.Event()
        self._last_error = ""
        self._stopping = threading.Event()
        self._stream: WatchStream | None = None
        self._progress = False  # the current watch delivered an event
        self._listeners: list[WatchListener] = []
        self._thread: threading.Thread | None = None

    # -- read side

    @property
    def has_synced(self) -> bool:
        """True once the first list has been applied (stays true across relists)."""
        return self._synced.is_set()

    @property
    def connected(self) -> bool:
        """True while the last list or watch request succeeded; False from a failed request
        until the next one succeeds. The objects may be out of date while it is False."""
        return self._connected.is_set()

    @property
    def last_error(self) -> str:
        """Why the last list or watch request failed ("" when none has)."""
        return self._last_error

    def wait_synced(self, timeout_s: float) -> bool:
        """Block until the first list is applied or ``timeout_s`` passes; returns
        :attr:`has_synced`."""
        return self._synced.wait(timeout_s)

    @property
    def version(self) -> int:
        """Count of changes applied so far; moves on every change, never backwards."""
        with self._lock:
            return self._version

    @property
    def resource_version(self) -> str:
        """The last resourceVersion seen (list, event or bookmark)."""
        with self._lock:
            return self._resource_version

    def items(self) -> list[JsonObject]:
        """A snapshot list of the cached objects, in no particular order."""
        with self._lock:
            return list(self._items.values())

    def get(self, key: str) -> JsonObject | None:
        """The object with :func:`object_key` ``key`` (``ns/name`` or ``name``), or None."""
        with self._lock:
            return self._items.get(key)

    def add_listener(self, listener: WatchListener) -> None:
        """Call ``listener(type, object)`` after each applied change (see class doc)."""
        with self._lock:
            self._listeners.append(listener)

    # -- lifecycle

    def start(self) -> None:
        """Start the background thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"watch cache {self.name} already started")
        self._thread = threading.Thread(target=self._run, name=f"watch-cache:{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread promptly: closes an open watch and interrupts a backoff."""
        self._stopping.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- the reflector loop

    def _log_extra(self, **fields: Any) -> dict[str, Any]:
        return {"cache": self.name, "path": self._list_path, "resource_version": self._resource_version, **fields}

    def _run(self) -> None:
        failures = 0  # consecutive failed rounds; a watch that applied events resets it
        need_list = True
        while not self._stopping.is_set():
            self._progress = False
            retry_after_s = 0.0
            try:
                if need_list:
                    self._relist()
                    need_list = False
                self._watch()
                if self._progress or self._stopping.is_set():
                    failures = 0
                    continue
                # Ended without a single event or bookmark: a proxy that closes long requests
                # at once would otherwise have us re-watch in a tight loop (client-go's
                # "very short watch" check). A quiet watch that ran its whole timeout only
                # waits a moment more.
                failures += 1
                logger.info(
                    "watch cache %s: watch ended without any event, watching again after a pause",
                    self.name,
                    extra=self._log_extra(failures=failures),
                )
            except Gone as exc:
                need_list = True
                self._last_error = str(exc)
                failures = 1 if self._progress else failures + 1
                logger.info(
                    "watch cache %s: resourceVersion %s expired, listing again",
                    self.name,
                    self._resource_version,
                    extra=self._log_extra(error=str(exc), failures=failures),
                )
                if failures == 1:
                    continue  # the first relist after a 410 is immediate, like client-go
            except ApiError as exc:
                self._connected.clear()
                self._last_error = str(exc)
                failures = 1 if self._progress else failures + 1
                retry_after_s = min(exc.retry_after_s or 0.0, MAX_RETRY_AFTER_S)
                facts = exc.request
                logger.log(
                    exc.log_level,
                    "watch cache %s: %s failed: %s",
                    self.name,
                    "list" if need_list else "watch",
                    exc,
                    extra=self._log_extra(
                        error=str(exc), code=exc.code, failures=failures, retry_after_s=exc.retry_after_s,
                        verb=facts.verb if facts else None, resource=facts.resource if facts else None,
                        api_group=facts.api_group if facts else None,
                    ),
                )
            except Exception as exc:  # never let the cache thread die
                failures += 1
                logger.exception(
                    "watch cache %s: unexpected error", self.name, extra=self._log_extra(error=str(exc))
                )
            delay_s = _backoff_s(failures, self._backoff_initial_s, self._backoff_max_s, self._rng)
            self._stopping.wait(max(delay_s, retry_after_s))
        logger.debug("watch cache %s stopped", self.name, extra=self._log_extra())

    def _relist(self) -> None:
        params = {**self._params, "limit": self._page_size}
        listed = self._client.list(self._list_path, params)
        fresh = {object_key(item): item for item in listed.get("items") or []}
        changes: list[tuple[str, JsonObject]] = []
        with self._lock:
            for key, gone in self._items.items():
                if key not in fresh:
                    changes.append(("DELETED", gone))
            for key, new in fresh.items():
                old = self._items.get(key)
                if old is None:
                    changes.append(("ADDED", new))
                elif resource_version(old) != resource_version(new):
                    changes.append(("MODIFIED", new))
            self._items = fresh
            self._version += len(changes)
            self._resource_version = resource_version(listed)
            listeners = list(self._listeners)
        logger.info(
            "watch cache %s listed %d objects (%d changes)",
            self.name,
            len(fresh),
            len(changes),
            extra=self._log_extra(objects=len(fresh), changes=len(changes)),
        )
        for event_type, obj in changes:
            self._notify(listeners, event_type, obj)
        self._connected.set()
        self._synced.set()  # after the listeners saw the initial objects

    def _watch(self) -> None:
        stream = self._client.watch(
            self._list_path, self._resource_version, self._params, timeout_s=self._watch_timeout_s
        )
        with self._lock:
            self._stream = stream
        self._connected.set()
        try:
            if self._stopping.is_set():
                return
            for event_type, obj in stream:
                if event_type == "ERROR":
                    raise error_from_status(obj)
                self._progress = True
                if event_type == "BOOKMARK":
                    with self._lock:
                        self._resource_version = resource_version(obj) or self._resource_version
                    continue
                self._apply(event_type, obj)
        finally:
            with self._lock:
                self._stream = None
            stream.close()

    def _apply(self, event_type: str, obj: JsonObject) -> None:
        key = object_key(obj)
        with self._lock:
            rv = resource_version(obj)
            if rv:
                self._resource_version = rv
            if event_type == "DELETED":
                if self._items.pop(key, None) is None:
                    return
            elif event_type in ("ADDED", "MODIFIED"):
                self._items[key] = obj
            else:
                logger.warning(
                    "watch cache %s: ignoring event type %s", self.name, event_type, extra=self._log_extra()
                )
                return
            self._version += 1
            listeners = list(self._listeners)
        self._notify(listeners, event_type, obj)

    def _notify(self, listeners: list[WatchListener], event_type: str, obj: JsonObject) -> None:
        for listener in listeners:
            try:
                listener(event_type, obj)
            except Exception:
                logger.exception(
                    "watch cache %s: listener failed on %s %s",
                    self.name,
                    event_type,
                    object_key(obj),
                    extra=self._log_extra(event_type=event_type, key=object_key(obj)),
                )


# --------------------------------------------------------------------------- leader election


def _noop() -> None:
    return None


class LeaderElector:
    """Leader election on a coordination.k8s.io/v1 Lease, with client-go's semantics.

    Each round (:meth:`tick`) reads the Lease and, when it is missing, free, expired or
    already ours, writes ``holderIdentity``/``renewTime`` with a PUT conditional on the
    resourceVersion read (a 409 means another candidate won this round). A Lease held by
    someone else counts as expired once we have not seen the record change for
    ``leaseDurationSeconds`` of our own clock; ``renewTime``, written by the holder's
    clock, is not trusted (as in client-go: clocks of two machines may disagree by more
    than a lease). Taking over from another holder sets ``acquireTime`` and increments
    ``leaseTransitions``.

    The leader renews every ``retry_period_s``; candidates retry with jitter. Leadership
    ends at once when another holder is seen, or when no renewal succeeded for
    ``renew_deadline_s`` (so it ends before anyone else may take over, which needs
    ``lease_duration_s``). :attr:`is_leader` checks that deadline against the clock at
    each call. Callbacks run on the elector thread and must return quickly. On
    :meth:`stop` a leader releases the Lease (empty holder) unless
    ``release_on_stop=False``.
    """

    JITTER_FACTOR = 1.2  # client-go's JitterFactor for candidates' retries

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        on_started_leading: Callable[[], None] = _noop,
        on_stopped_leading: Callable[[], None] = _noop,
        clock: Clock = time.time,
        release_on_stop: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if not identity:
            raise ValueError("identity must not be empty")
        if not lease_duration_s > renew_deadline_s:
            raise ValueError("lease_duration_s must be greater than renew_deadline_s")
        if not renew_deadline_s > self.JITTER_FACTOR * retry_period_s > 0:
            raise ValueError("renew_deadline_s must be greater than 1.2 x retry_period_s > 0")
        self._client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._on_started_leading = on_started_leading
        self._on_stopped_leading = on_stopped_leading
        self._clock = clock
        self._release_on_stop = release_on_stop
        self._rng = rng or random.Random()
        self._path = lease_path(namespace, name)
        self._leading = False
        self._last_renew_s = 0.0
        self._observed_spec: JsonObject | None = None
        self._observed_at_s = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        """True while we hold the Lease and renewed it less than ``renew_deadline_s`` ago."""
        return self._leading and self._clock() - self._last_renew_s < self.renew_deadline_s

    @property
    def holder(self) -> str:
        """The holder identity last seen on the Lease ("" when none or unknown)."""
        return str((self._observed_spec or {}).get("holderIdentity") or "")

    def _log_extra(self, **fields: Any) -> dict[str, Any]:
        return {"lease": f"{self.namespace}/{self.name}", "identity": self.identity, **fields}

    def tick(self) -> bool:
        """One election round: try to acquire or renew, update leadership and run the
        callbacks. Never raises for API failures; returns :attr:`is_leader`."""
        now_s = self._clock()
        try:
            held = self._try_acquire_or_renew(now_s)
        except ApiError as exc:
            facts = exc.request
            logger.log(
                exc.log_level,
                "lease %s/%s: acquire/renew failed: %s",
                self.namespace,
                self.name,
                exc,
                extra=self._log_extra(error=str(exc), code=exc.code, verb=facts.verb if facts else None,
                                      resource=facts.resource if facts else None),
            )
            held = None
        except Exception as exc:  # a Lease of an odd shape must not end the elector thread
            logger.exception(
                "lease %s/%s: acquire/renew failed", self.namespace, self.name, extra=self._log_extra(error=str(exc))
            )
            held = None
        if held:
            self._last_renew_s = now_s
            if not self._leading:
                self._leading = True
                logger.info(
                    "lease %s/%s: %s became leader", self.namespace, self.name, self.identity, extra=self._log_extra()
                )
                self._call(self._on_started_leading)
        elif self._leading and (held is False or now_s - self._last_renew_s >= self.renew_deadline_s):
            self._lose(f"held by {self.holder!r}" if held is False else "renew deadline passed")
        return self.is_leader

    def _lose(self, why: str) -> None:
        self._leading = False
        logger.warning(
            "lease %s/%s: %s stopped leading: %s",
            self.namespace,
            self.name,
            self.identity,
            why,
            extra=self._log_extra(why=why),
        )
        self._call(self._on_stopped_leading)

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            logger.exception("lease %s/%s: callback failed", self.namespace, self.name, extra=self._log_extra())

    def _observe(self, spec: JsonObject, now_s: float) -> None:
        if spec != self._observed_spec:
            self._observed_spec = copy.deepcopy(spec)
            self._observed_at_s = now_s

    def _held_by_other(self, spec: JsonObject, now_s: float) -> bool:
        holder = spec.get("holderIdentity") or ""
        if not holder or holder == self.identity:
            return False
        try:
            duration_s = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        except (TypeError, ValueError):
            duration_s = self.lease_duration_s
        # Only our own clock counts, as in client-go: renewTime was written by the holder's
        # clock, and a holder whose clock runs ahead would keep a dead Lease "fresh" for as
        # long as the skew. A live holder changes the record every retry period.
        return now_s < self._observed_at_s + duration_s

    def _try_acquire_or_renew(self, now_s: float) -> bool | None:
        """True: we hold the Lease now. False: someone else holds a valid Lease.
        None: lost a race (409); the next round decides."""
        stamp = format_micro_time(now_s)
        ours = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
            "acquireTime": stamp,
            "renewTime": stamp,
            "leaseTransitions": 0,
        }
        try:
            lease = self._client.get(self._path)
        except NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": ours,
            }
            try:
                created = self._client.create(lease_path(self.namespace), body)
            except Conflict:
                return None
            self._observe(created.get("spec") or {}, now_s)
            return True
        spec: JsonObject = lease.get("spec") or {}
        self._observe(spec, now_s)
        if self._held_by_other(spec, now_s):
            return False
        new_spec = {**spec, **ours}
        if spec.get("holderIdentity") == self.identity:
            new_spec["acquireTime"] = spec.get("acquireTime") or stamp
            new_spec["leaseTransitions"] = spec.get("leaseTransitions") or 0
        else:
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        lease["spec"] = new_spec
        try:
            updated = self._client.replace(self._path, lease)
        except Conflict:
            return None
        self._observe(updated.get("spec") or {}, now_s)
        return True

    def release(self) -> bool:
        """Give the Lease up if we hold it (empty holder, 1 s duration), so another
        candidate takes over at once. Returns True when released."""
        was_leading, self._leading = self._leading, False
        try:
            lease = self._client.get(self._path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return False
            stamp = format_micro_time(self._clock())
            lease["spec"] = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": stamp, "acquireTime": stamp}
            self._client.replace(self._path, lease)
            logger.info("lease %s/%s: released", self.namespace, self.name, extra=self._log_extra())
            return True
        except ApiError as exc:
            logger.warning(
                "lease %s/%s: release failed: %s", self.namespace, self.name, exc, extra=self._log_extra(error=str(exc))
            )
            return False
        finally:
            if was_leading:
                self._call(self._on_stopped_leading)

    def run(self) -> None:
        """Run election rounds on this thread until :meth:`stop`."""
        while not self._stopping.is_set():
            leading = self.tick()
            period_s = self.retry_period_s
            if not leading:
                period_s *= 1 + self._rng.random() * self.JITTER_FACTOR
            self._stopping.wait(period_s)
        if self._release_on_stop and self._leading:
            self.release()
        elif self._leading:
            self._lose("stopped")

    def start(self) -> None:
        """Run :meth:`run` on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("leader elector already started")
        self._thread = threading.Thread(target=self.run, name=f"leader-elector:{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the rounds, release the Lease if leading, and wait for the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


# --------------------------------------------------------------------------- write helpers


def patch_node_annotations(client: KubeClient, node_name: str, annotations: Mapping[str, str | None]) -> JsonObject:
    """Set (str) or remove (None) annotations on a node with one merge patch; other
    annotations are untouched. Returns the patched node."""
    body = {"metadata": {"annotations": dict(annotations)}}
    return client.patch(node_path(node_name), body, patch_type="merge")


EVENT_NOTE_MAX_BYTES = 1024  # events.k8s.io/v1 validation limit


def _object_reference(regarding: Mapping[str, Any]) -> JsonObject:
    """An ObjectReference for a full object, or ``regarding`` itself when it already is
    one (has ``name`` and no ``metadata``)."""
    if "metadata" not in regarding:
        return {key: value for key, value in regarding.items() if value is not None}
    meta = regarding["metadata"]
    reference = {
        "apiVersion": regarding.get("apiVersion"),
        "kind": regarding.get("kind"),
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "resourceVersion": meta.get("resourceVersion"),
    }
    return {key: value for key, value in reference.items() if value}


def post_event(
    client: KubeClient,
    regarding: Mapping[str, Any],
    reason: str,
    note: str,
    type: Literal["Normal", "Warning"] = "Normal",  # noqa: A002 - the API field's name
    *,
    action: str,
    reporting_controller: str,
    reporting_instance: str,
    clock: Clock = time.time,
) -> bool:
    """Record an events.k8s.io/v1 Event about ``regarding`` (an object or an
    ObjectReference). The name is ``<regarding name>.<hex nanoseconds>`` like client-go's;
    a cluster-scoped object's Event goes to namespace ``default``; ``note`` is cut to
    1024 bytes; ``eventTime`` comes from ``clock``. Never raises on an API failure: logs it and returns False.
    """
    reference = _object_reference(regarding)
    now_s = clock()
    namespace = reference.get("namespace") or "default"
    note_bytes = note.encode()
    if len(note_bytes) > EVENT_NOTE_MAX_BYTES:
        note = note_bytes[:EVENT_NOTE_MAX_BYTES].decode("utf-8", "ignore")
    body = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        # client-go's <name>.<hex unix ns>, from the real clock so that names stay unique
        "metadata": {"name": f"{reference.get('name', 'powercap')}.{time.time_ns():x}", "namespace": namespace},
        "eventTime": format_micro_time(now_s),
        "regarding": reference,
        "reason": reason,
        "note": note,
        "type": type,
        "action": action,
        "reportingController": reporting_controller,
        "reportingInstance": reporting_instance,
    }
    try:
        client.create(event_path(namespace), body)
        return True
    except ApiError as exc:
        logger.warning(
            "event %s on %s/%s not recorded: %s",
            reason,
            namespace,
            reference.get("name"),
            exc,
            extra={"reason": reason, "regarding": reference, "error": str(exc)},
        )
        return False


def update_status(
    client: KubeClient,
    path: str,
    compute_status: Callable[[JsonObject], JsonObject | None],
    attempts: int = 5,
) -> JsonObject | None:
    """Read-compute-write the ``status`` of the object at ``path`` through ``/status``.

    ``compute_status(object)`` returns the new status, or None to leave it. An unchanged
    status is not written. The PUT carries the resourceVersion read, and a 409 Conflict
    reads and computes again, up to ``attempts`` rounds. Returns the stored object after
    a write, None when nothing was written. Raises :class:`Conflict` when every attempt
    conflicted, and any other :class:`ApiError` at once (e.g. :class:`NotFound`).
    """
    for attempt in range(1, attempts + 1):
        current = client.get(path)
        new_status = compute_status(copy.deepcopy(current))
        if new_status is None or new_status == current.get("status"):
            return None
        body = {**current, "status": new_status}
        try:
            return client.replace(status_path(path), body)
        except Conflict as exc:
            if attempt == attempts:
                raise
            logger.info(
                "status of %s changed under us, retrying (%d/%d)",
                path,
                attempt,
                attempts,
                extra={"path": path, "attempt": attempt, "error": str(exc)},
            )
    return None  # unreachable: attempts >= 1 either returns or raises


class EvictionResult(enum.Enum):
    """Outcome of :func:`evict_pod`."""

    EVICTED = "evicted"  # accepted: the pod is being deleted
    BLOCKED = "blocked"  # 429: a PodDisruptionBudget forbids it now; try again later
    GONE = "gone"  # 404: the pod no longer exists


def evict_pod(client: KubeClient, namespace: str, name: str) -> EvictionResult:
    """POST a policy/v1 Eviction for a pod, honouring PodDisruptionBudgets.

    Raises :class:`ApiError` for anything other than accepted, 429 or 404.
    """
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": namespace},
    }
    try:
        client.create(eviction_path(namespace, name), body)
    except TooManyRequests as exc:
        logger.info(
            "eviction of %s/%s blocked: %s",
            namespace,
            name,
            exc.message,
            extra={"pod": f"{namespace}/{name}", "error": exc.message},
        )
        return EvictionResult.BLOCKED
    except NotFound:
        return EvictionResult.GONE
    return EvictionResult.EVICTED
