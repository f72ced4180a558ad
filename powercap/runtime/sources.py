"""Where the extender's cluster view comes from: a state file, or watch caches in a cluster.

Both sources hand out an immutable :class:`~powercap.cluster.ClusterView` through
``current()`` and rebuild it only when their input moved: the file changed, or a cache
applied an event (its ``version`` moved), or the clock advanced ``refresh_s`` since the
last build (telemetry ages even when nothing changes). A rebuild passes the previous view,
so only changed objects are parsed again. Requests never wait on the network.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Protocol


from powercap import KIND, kube
from powercap.algorithms import AlgorithmRegistry
from powercap.cluster import ClusterSettings, ClusterView, build_cluster_view
from powercap.nodeobjects import NODE_KIND, NodeObjectIndex, merge_node_objects, object_document
from powercap.numeric import counted
from powercap.objects import KubeObject, shape_problems
from powercap.telemetry import TelemetryError, node_telemetry, queued_uuids
from powercap.runtime.documents import LOAD_ERRORS, describe_load_error, parse_documents
from powercap.runtime.filewatch import FileWatch

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
DEFAULT_REFRESH_S = 1.0


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# How often a source that rebuilds from caches settles the garbage collector (see below).
SETTLE_GC_EVERY_S = 30.0


def settle_garbage_collector() -> None:
    """Take every object alive now out of the cyclic collector's scans (``gc.freeze``).

    The caches hold millions of long-lived, acyclic JSON objects; without this, each full
    collection scans them all, a ~300 ms pause at 5000 nodes that lands in the middle of a
    scheduling call. Frozen objects are still freed by reference counting when a cache drops
    them; young cyclic garbage is collected first so that it is not frozen with them.
    """
    gc.collect(1)
    gc.freeze()


class NotReady(Exception):
    """The source has no view yet; the message says what it is waiting for."""


class ViewSource(Protocol):
    """What the HTTP app needs from a source of cluster views."""

    def current(self) -> ClusterView:
        """The view to decide with now; raises :class:`NotReady` until there is one."""

    def readiness(self) -> str | None:
        """None when ready, else why not."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class StateFileError(Exception):
    """A state file that cannot be used; the message names the file and the problem."""


def load_state(text: str) -> tuple[list[KubeObject], list[KubeObject], list[KubeObject]]:
    """Nodes, Pods and PowerCappingPolicies of a state file.

    The file is what ``kubectl get nodes,pcn,pods,pcp -A -o yaml`` (or ``-o
    json``) prints: a ``kind: List`` of mixed items; several YAML documents and bare
    objects are read too. PowerCapNodes are merged into their Nodes (the telemetry the
    cluster view reads: :mod:`powercap.nodeobjects`); a file of Nodes with telemetry
    annotations (older agents) reads as before. Objects of other kinds are ignored.
    Raises ``ValueError`` when the text is not YAML or JSON, or holds something other
    than Kubernetes objects.
    """
    node_objects: list[KubeObject] = []
    nodes: list[KubeObject] = []
    pods: list[KubeObject] = []
    policies: list[KubeObject] = []
    count = 0
    for index, item in enumerate(parse_documents(text)):
        count += 1
        if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
            raise ValueError(f"item {index + 1} is not a Kubernetes object (no kind)")
        if not isinstance(item.get("metadata"), dict) or not item["metadata"].get("name"):
            raise ValueError(f"item {index + 1} ({item['kind']}) has no metadata.name")
        kind = item["kind"]
        if kind in ("Node", "Pod"):
            problems = shape_problems(item)
            if problems:
                name = item["metadata"]["name"]
                raise ValueError(f"item {index + 1} ({kind} {name}): " + "; ".join(problems))
        if kind == "Node":
            nodes.append(item)
        elif kind == "Pod":
            pods.append(item)
        elif kind == KIND:
            policies.append(item)
        elif kind == NODE_KIND:
            node_objects.append(item)
    if count == 0:
        raise ValueError("no objects found (expected the output of kubectl get nodes,pcn,pods,pcp -A -o yaml)")
    return merge_node_objects(nodes, node_objects), pods, policies


def snapshot_time(nodes: Iterable[KubeObject]) -> datetime | None:
    """When a snapshot was taken, as near as it says: its newest node telemetry timestamp."""
    newest: datetime | None = None
    for node in nodes:
        try:
            telemetry = node_telemetry(node)
        except TelemetryError:
            continue
        if telemetry is not None and (newest is None or telemetry.timestamp > newest):
            newest = telemetry.timestamp
    return newest


class StateFileSource:
    """A cluster view replayed from a state file, reloaded when the file changes.

    The view is evaluated at the snapshot's time (its newest telemetry timestamp; the wall
    clock when it has no telemetry), so a snapshot taken yesterday is judged as it was then:
    a node whose telemetry was already 5 minutes old at that time is stale, the others are
    fresh. A bad file at start raises :class:`StateFileError`; a bad file on reload keeps
    the last good view and logs why, until the file changes again.
    """

    def __init__(
        self,
        path: str,
        settings: ClusterSettings,
        registry: AlgorithmRegistry,
        *,
        clock: Clock = utc_now,
        check_interval_s: float = DEFAULT_REFRESH_S,
        settle_gc: bool = False,
    ) -> None:
        self.path = path
        self._settle_gc = settle_gc
        self._settings = settings
        self._registry = registry
        self._clock = clock
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._file = FileWatch([path])
        self._last_check = clock()
        try:
            self._view = self._load(None)
        except LOAD_ERRORS as error:
            raise StateFileError(f"{path}: {describe_load_error(error)}") from None
        self._announce(self._view)

    def _load(self, previous: ClusterView | None) -> ClusterView:
        with open(self.path, "rb") as handle:
            text = handle.read().decode("utf-8")
        nodes, pods, policies = load_state(text)
        moment = snapshot_time(nodes) or self._clock()
        return build_cluster_view(nodes, pods, policies, moment, self._settings, registry=self._registry, previous=previous)

    def _announce(self, view: ClusterView) -> None:
        if self._settle_gc:
            settle_garbage_collector()
        log.info(
            "cluster view loaded from %s: %s, %s, %s", self.path, counted(len(view.nodes), "node"),
            counted(len(view.racks), "rack"), counted(len(view.policies), "policy", "policies"),
            extra={"file": self.path, "nodes": len(view.nodes), "racks": len(view.racks),
                   "policies": len(view.policies), "at": view.now.isoformat()},
        )
        for warning in view.warnings:
            log.warning("%s", warning, extra={"file": self.path})

    def current(self) -> ClusterView:
        now = self._clock()
        if (now - self._last_check).total_seconds() < self._check_interval_s:
            return self._view
        with self._lock:
            if (now - self._last_check).total_seconds() < self._check_interval_s:
                return self._view
            self._last_check = now
            if not self._file.changed():
                return self._view
            try:
                view = self._load(self._view)
            except LOAD_ERRORS as error:
                log.warning(
                    "state file %s could not be reloaded, keeping the last good view: %s",
                    self.path, describe_load_error(error),
                    extra={"file": self.path, "error": describe_load_error(error)},
                )
                return self._view
            self._view = view
        self._announce(view)
        return view

    def readiness(self) -> str | None:
        return None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


class Cache(Protocol):
    """The part of :class:`powercap.kube.WatchCache` the in-cluster source uses."""

    name: str

    @property
    def has_synced(self) -> bool: ...

    @property
    def version(self) -> int: ...

    def items(self) -> list[Any]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class _Caches:
    """Something made of watch caches (``_caches``): starting and stopping it starts and stops them."""

    _caches: tuple[Cache, ...]

    def start(self) -> None:
        for cache in self._caches:
            cache.start()

    def stop(self) -> None:
        for cache in self._caches:
            cache.stop()


class CacheSource(_Caches):
    """A cluster view from three watch caches: Nodes, Pods, PowerCappingPolicies.

    Ready once all three have synced (their first list applied). ``current()`` rebuilds
    when any cache's version moved or ``refresh_s`` passed since the last build; concurrent
    requests share one rebuild.
    """

    def __init__(
        self,
        nodes: Cache,
        pods: Cache,
        policies: Cache,
        settings: ClusterSettings,
        registry: AlgorithmRegistry,
        *,
        clock: Clock = utc_now,
        refresh_s: float = DEFAULT_REFRESH_S,
        settle_gc: bool = False,
    ) -> None:
        self._caches = (nodes, pods, policies)
        self._settle_gc = settle_gc
        self._settled_at = -SETTLE_GC_EVERY_S
        self._settings = settings
        self._registry = registry
        self._clock = clock
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._built: tuple[tuple[int, int, int], ClusterView] | None = None
        self._warnings: tuple[str, ...] = ()

    def readiness(self) -> str | None:
        waiting: list[str] = []
        for cache in self._caches:
            if isinstance(cache, TelemetryNodes):
                waiting += cache.waiting_for()
            elif not cache.has_synced:
                waiting.append(cache.name)
        return f"waiting for the first list of {', '.join(waiting)}" if waiting else None

    def current(self) -> ClusterView:
        built = self._built
        now = self._clock()
        if built is not None and self._fresh(built, now):
            return built[1]
        waiting = self.readiness()
        if waiting is not None:
            raise NotReady(waiting)
        with self._lock:
            built = self._built
            if built is not None and self._fresh(built, now):
                return built[1]
            versions = self._versions()
            nodes, pods, policies = (cache.items() for cache in self._caches)
            view = build_cluster_view(
                nodes, pods, policies, now, self._settings, registry=self._registry,
                previous=built[1] if built is not None else None,
            )
            self._built = (versions, view)
            if self._settle_gc and time.monotonic() - self._settled_at >= SETTLE_GC_EVERY_S:
                settle_garbage_collector()
                self._settled_at = time.monotonic()
        if view.warnings != self._warnings:
            self._warnings = view.warnings
            for warning in view.warnings:
                log.warning("%s", warning)
        return view

    def _versions(self) -> tuple[int, int, int]:
        nodes, pods, policies = self._caches
        return (nodes.version, pods.version, policies.version)

    def _fresh(self, built: tuple[tuple[int, int, int], ClusterView], now: datetime) -> bool:
        versions, view = built
        return versions == self._versions() and (now - view.now).total_seconds() < self._refresh_s



class TelemetryNodes(_Caches):
    """The Node cache as the view reads it: each Node with its PowerCapNode's telemetry
    (:class:`powercap.nodeobjects.NodeObjectIndex`), kept from the events of two watch
    caches (:meth:`watching` wires them; :meth:`attach` takes caches whose listeners call
    :meth:`node_event` and :meth:`object_event`).

    Synced when both caches are; ``version`` moves with every event either delivers, and
    the list handed out is rebuilt (a C-speed copy) only then. A PowerCapNode cache that
    cannot list (CRD not installed yet, a missing permission) keeps the view waiting, as a
    missing policy cache does: a view without it would read stale annotations as current.
    """

    def __init__(self, name: str = "nodes") -> None:
        self.name = name
        self._caches: tuple[Cache, ...] = ()
        self._index = NodeObjectIndex()
        self._lock = threading.Lock()
        self._version = 0
        self._built: tuple[int, list[Any]] | None = None
        self._queued: set[str] = set()  # the PowerCapNodes whose last telemetry showed requests waiting
        self._queue_listeners: list[Callable[[str], None]] = []

    def on_queue_formed(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(node name)`` (on the watch thread; it must not block) whenever a
        PowerCapNode event shows a GPU with requests waiting where the node's previous
        telemetry showed none on any GPU (:func:`powercap.telemetry.queued_uuids`; the
        agent's rule, :func:`powercap.agentplan.queue_formed`)."""
        self._queue_listeners.append(listener)

    @classmethod
    def watching(cls, client: kube.KubeClient) -> TelemetryNodes:
        """Watch caches of ``client`` for all Nodes and all PowerCapNodes (not started)."""
        merged = cls()
        merged.attach(kube.WatchCache(client, kube.node_path(), name="nodes", listeners=[merged.node_event]),
                      kube.WatchCache(client, kube.powercapnode_path(), name="powercapnodes",
                                      listeners=[merged.object_event]))
        return merged

    def attach(self, nodes: Cache, node_objects: Cache) -> None:
        self._caches = (nodes, node_objects)

    def node_event(self, event_type: str, node: KubeObject) -> None:
        with self._lock:
            self._index.node_event(event_type, node)
            self._version += 1

    def object_event(self, event_type: str, obj: KubeObject) -> None:
        with self._lock:
            self._index.object_event(event_type, obj)
            self._version += 1
            formed = self._queue_event(event_type, obj)
        if formed is not None:
            for listener in self._queue_listeners:
                listener(formed)

    def _queue_event(self, event_type: str, obj: KubeObject) -> str | None:
        """The node's name when this event shows a queue forming (caller holds the lock)."""
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str):
            return None
        before = name in self._queued
        document = object_document(obj) if event_type != "DELETED" else None
        if document is None or not queued_uuids(document):
            self._queued.discard(name)
            return None
        self._queued.add(name)
        return None if before else name

    @property
    def has_synced(self) -> bool:
        return bool(self._caches) and all(cache.has_synced for cache in self._caches)

    def waiting_for(self) -> list[str]:
        """The names of the caches not synced yet."""
        return [cache.name for cache in self._caches if not cache.has_synced]

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def items(self) -> list[Any]:
        with self._lock:
            if self._built is None or self._built[0] != self._version:
                self._built = (self._version, self._index.items())
            return self._built[1]



# Bound, unfinished pods only: the extender needs where GPU pods run (assumed power, a
# policy's bound GPUs); pending and finished pods would only cost memory and events.
POD_FIELD_SELECTOR = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


def cluster_caches(
    client: kube.KubeClient, pod_field_selector: str = POD_FIELD_SELECTOR
) -> tuple[TelemetryNodes, kube.WatchCache, kube.WatchCache]:
    """Watch caches of ``client`` for all Nodes with their PowerCapNodes
    (:class:`TelemetryNodes`), the Pods ``pod_field_selector`` selects, and all policies
    (not started)."""
    return (
        TelemetryNodes.watching(client),
        kube.WatchCache(client, kube.pod_path(), {"fieldSelector": pod_field_selector}, name="pods"),
        kube.WatchCache(client, kube.policy_path(), name="powercappingpolicies"),
    )


def cluster_source(client: kube.KubeClient, settings: ClusterSettings, registry: AlgorithmRegistry, **options: Any) -> CacheSource:
    """A :class:`CacheSource` on :func:`cluster_caches` of ``client`` (a
    :class:`powercap.kube.KubeClient`): all Nodes and PowerCapNodes, bound unfinished
    Pods, all policies.
    The process's garbage collector is settled after rebuilds (the extender owns its process)."""
    options.setdefault("settle_gc", True)
    return CacheSource(*cluster_caches(client), settings, registry, **options)
