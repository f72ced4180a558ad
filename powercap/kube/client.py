"""A thin JSON REST client for the Kubernetes API server (:class:`KubeClient`).

Every method makes exactly one HTTP request (``list`` one per page) and never retries: the
retry policy belongs to the caller (the watch cache and the elector have theirs).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any, TypeVar
from urllib.parse import urlencode
PATCH_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}

import urllib3
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from powercap import __version__
from powercap.kube.errors import ApiError, KubeConfigError, RequestFacts, Unreachable, error_from_response
from powercap.kube.wire import JsonObject, Params, PatchType

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_WATCH_TIMEOUT_S = 300.0


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

    Types are ``ADDED``, ``MODIFIED``, ``DELETED``, ``BOOKMARK`` (an empty object of the
    kind: ``kind``, ``apiVersion``, ``metadata.resourceVersion``, and for built-in kinds an
    empty ``spec``/``status``; the one ending a replay is annotated
    ``k8s.io/initial-events-end: "true"``) and ``ERROR`` (object is a ``Status``; see
    :func:`error_from_status`; an expired resourceVersion comes this way, a 410
    ``Expired``). Iteration ends when the server closes the stream
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
            error = error_from_response(
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

        ``resource_version`` "" or "0" first replays the current objects as ADDED, then
        (with bookmarks) a BOOKMARK. The server ends the stream after ``timeout_s``;
        kube-apiserver's watch cache sends a BOOKMARK about once a minute and 2 s before
        the end (none for ``timeout_s`` <= 2; none at all with ``--watch-cache=false``). The response headers must come
        within the client's read timeout; after them the read timeout is ``timeout_s``
        plus the client's read timeout. Raises at once when the server
        refuses the watch with an HTTP error (e.g. :class:`TooManyRequests` while the API
        server's watch cache of a new CRD starts, or :class:`Gone` from servers older than
        v1.37); later failures, and an expired ``resource_version`` on v1.37, come as an
        ``ERROR`` event while iterating. See :class:`WatchStream`.
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
