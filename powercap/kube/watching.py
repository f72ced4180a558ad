"""A list+watch cache of one resource (:class:`WatchCache`), client-go's reflector in small.

Objects handed out by a cache are shared: treat them as read-only.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from typing import Any

from powercap.kube.client import DEFAULT_WATCH_TIMEOUT_S, KubeClient, WatchStream
from powercap.kube.errors import MAX_RETRY_AFTER_S, ApiError, Gone, error_from_status
from powercap.kube.paths import resource_version
from powercap.kube.wire import JsonObject, Params, WatchListener
from powercap.numeric import counted
from powercap.objects import object_key

logger = logging.getLogger(__name__)


def _backoff_s(failures: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: ``min(max_s, initial_s * 2**(failures-1))``
    scaled by a uniform factor in [0.5, 1)."""
    ceiling = min(max_s, initial_s * 2.0 ** max(0, failures - 1))
    return ceiling * (0.5 + rng.random() / 2)


class WatchCache:
    """A local copy of a collection kept current by list + watch (a client-go reflector).

    A background thread lists ``list_path`` (with ``params``: selectors), then watches
    from the list's resourceVersion with bookmarks. ADDED/MODIFIED/DELETED events are
    applied to a dict keyed by :func:`object_key`. On 410 Gone (an ``ERROR`` event
    carrying a 410 ``Expired`` Status, as kube-apiserver v1.37 answers a watch from a
    compacted or too old resourceVersion, or an HTTP 410 from older servers) it lists again and emits the difference as
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
        listeners: Sequence[WatchListener] = (),
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
        self._listeners: tuple[WatchListener, ...] = tuple(listeners)
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
            listeners = self._listeners
        logger.info(
            "watch cache %s listed %s (%s)",
            self.name,
            counted(len(fresh), "object"),
            counted(len(changes), "change"),
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
            listeners = self._listeners
        self._notify(listeners, event_type, obj)

    def _notify(self, listeners: Sequence[WatchListener], event_type: str, obj: JsonObject) -> None:
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
