"""Where the agent learns its policies and this node's pods.

- :class:`ClusterSource` (default): two watch-backed caches, every
  PowerCappingPolicy (read-only) and the pods bound to this node
  (``fieldSelector=spec.nodeName=<node>``), plus a probe that GETs this node every few
  seconds for its rack label and as proof that the API server answers. The view is
  *fresh* once both caches have synced, the last successful API request is younger than
  ``stale_after_s``, and each cache's watch is connected, or, while a watch is down, a
  LIST of its collection (made by the probe, every ``probe_interval_s``) is younger than
  ``stale_after_s`` and stands in for the cache. Otherwise the agent keeps its caps
  (never raises one).

  A policy is parsed with the full validator; one it refuses is read leniently
  (:func:`powercap.agentplan.enforceable_policy`: the agent needs the cap, the selector
  and the allocations, not the algorithm) and logged once; one that cannot be read even
  so (no ``powerCapLimit``...) keeps its last good version, is listed in
  :attr:`SourceView.unreadable` (its GPUs' caps are held) and logged once per problem.
- :class:`FilePolicySource` (``--policy FILE``): one policy from a file, no Kubernetes.
  Every local GPU belongs to it (:attr:`SourceView.node_policy`); its budget is split
  evenly over the node's GPUs, those the agent cannot see included (see
  :func:`powercap.agentplan.split_allocation`), unless the file's ``status`` carries an
  allocation for this node. The file is re-read when it changes; while it is unreadable
  or invalid the last good policy is kept but the view is not fresh.

Both hand out a :class:`SourceView` snapshot per tick, never blocking on the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from powercap import kube
from powercap.agentplan import enforceable_policy, split_allocation
from powercap.algorithms import AlgorithmRegistry
from powercap.objects import RACK_LABEL, KubeObject, node_rack, object_key
from powercap.policies import Policy, parse_policy
from powercap.runtime.documents import LOAD_ERRORS, describe_load_error, parse_documents, read_text
from powercap.runtime.filewatch import FileWatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceView:
    """Policies and this node's pods as of now."""

    policies: tuple[Policy, ...] = ()
    pods_by_uid: Mapping[str, KubeObject] = field(default_factory=dict)
    fresh: bool = False
    node_rack: str | None = None
    apply_all_racks: bool = False
    problem: str | None = None  # why the view is not fresh, where the source knows
    unreadable: Mapping[str, str] = field(default_factory=dict)  # policy key -> why it cannot be read
    node_policy: str | None = None  # the policy owning every GPU of the node (--policy FILE)


class PolicySource(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def view(self) -> SourceView: ...


class PolicyFileError(ValueError):
    """The ``--policy`` file cannot be used (stop at start-up)."""


def read_policy_file(path: Path, registry: AlgorithmRegistry) -> Policy:
    """The one PowerCappingPolicy in a YAML/JSON file, validated and defaulted."""
    try:
        documents = list(parse_documents(read_text(str(path))))
    except LOAD_ERRORS as error:
        raise PolicyFileError(f"{path}: {describe_load_error(error)}") from None
    if len(documents) != 1:
        raise PolicyFileError(f"{path}: expected one PowerCappingPolicy, found {len(documents)} documents")
    try:
        return parse_policy(documents[0], registry)
    except ValueError as error:
        raise PolicyFileError(f"{path}: {error}") from error


class FilePolicySource:
    """``--policy FILE``: every GPU of the node belongs to the file's policy.

    ``gpu_uuids`` is accepted for callers written when the split was made here; the plan
    now splits over the GPUs it finds each tick (a GPU that joins later is counted).
    """

    def __init__(self, path: Path, node: str, gpu_uuids: Sequence[str] = (),
                 registry: AlgorithmRegistry | None = None) -> None:
        self.path = path
        self.node = node
        self._registry = registry or AlgorithmRegistry.default()
        self._file = FileWatch([path])
        self._policy = split_allocation(read_policy_file(path, self._registry), node)
        self._problem: str | None = None
        log.info("policy file loaded", extra={"policy_file": str(path), "policy": self._policy.key})

    def start(self) -> None:
        """Nothing runs in the background: the file is checked on every :meth:`view`."""

    def stop(self) -> None:
        """Nothing to stop."""

    def view(self) -> SourceView:
        if self._file.changed():
            try:
                policy = split_allocation(read_policy_file(self.path, self._registry), self.node)
            except PolicyFileError as error:
                if str(error) != self._problem:  # every new problem once: the one being fixed now
                    log.error("policy file invalid: keeping caps until it is fixed", extra={"error": str(error)})
                self._problem = str(error)
            else:
                self._policy, self._problem = policy, None
                log.info("policy file reloaded", extra={"policy_file": str(self.path), "policy": policy.key})
        return SourceView(policies=(self._policy,), fresh=self._problem is None, apply_all_racks=True,
                          problem=self._problem, node_policy=self._policy.key)


@dataclass(frozen=True)
class _Listed:
    """A LIST of a collection made while its watch was down: its items, when it was made."""

    items: tuple[KubeObject, ...]
    at_s: float


class ClusterSource:
    """Policies and this node's pods from the API server (module docstring).

    ``clock`` is monotonic seconds; tests call :meth:`probe`, :meth:`list_while_watches_down`
    and :meth:`view` directly.
    """

    def __init__(
        self,
        client: kube.KubeClient,
        node: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        stale_after_s: float = 30.0,
        probe_interval_s: float = 5.0,
        rack_label: str = RACK_LABEL,
        registry: AlgorithmRegistry | None = None,
    ) -> None:
        self.node = node
        self._client = client
        self._clock = clock
        self.stale_after_s = stale_after_s
        self.probe_interval_s = probe_interval_s
        self._rack_label = rack_label
        self._registry = registry or AlgorithmRegistry.default()
        pod_params = {"fieldSelector": f"spec.nodeName={node}"}
        self.policies = kube.WatchCache(client, kube.policy_path(), name="policies")
        self.pods = kube.WatchCache(client, kube.pod_path(), pod_params, name="pods")
        self._collections: tuple[tuple[kube.WatchCache, str, dict[str, str]], ...] = (
            (self.policies, kube.policy_path(), {}), (self.pods, kube.pod_path(), pod_params),
        )
        self._lock = threading.Lock()
        self._last_ok_s: float | None = None
        self._reachable = True
        self._probe_error: str | None = None
        self._rack: str | None = None
        self._listed: dict[str, _Listed] = {}
        self._reconnected: set[str] = set()
        self._list_errors: dict[str, str] = {}
        self._parsed: dict[str, tuple[str, Policy | None, str | None]] = {}
        self._last_good: dict[str, Policy] = {}
        self._built_versions: tuple[Any, ...] | None = None
        self._view_policies: tuple[Policy, ...] = ()
        self._view_unreadable: Mapping[str, str] = {}
        self._view_pods: Mapping[str, KubeObject] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- API health --------------------------------------------------------------------
    def probe(self) -> bool:
        """GET this node: its rack label, and proof that the API server answers."""
        try:
            node = self._client.get(kube.node_path(self.node))
        except kube.ApiError as error:
            with self._lock:
                was, self._reachable = self._reachable, False
                self._probe_error = str(error)
            if was:
                if isinstance(error, kube.NotFound):
                    why = f"Node {self.node} not found (deleted?)"
                elif error.denied:
                    why = f"the API server refuses to show Node {self.node}"
                else:
                    why = "API server unreachable"
                log.log(error.log_level,
                        "%s: keeping caps", why, extra={"node": self.node, "error": str(error), "code": error.code})
            return False
        with self._lock:
            self._last_ok_s = self._clock()
            self._rack = node_rack(node, self._rack_label)
            was, self._reachable = self._reachable, True
        if not was:
            log.info("API server reachable again", extra={"node": self.node})
        return True

    def list_while_watches_down(self) -> None:
        """LIST each collection whose watch is down, to stand in for its cache.

        A watch counts as down from a failed list or watch request until one succeeds
        (:attr:`powercap.kube.WatchCache.connected`). The LIST stays in use until the
        cache has been connected again at two successive probes (its watch has replayed
        what it missed), so the view never steps back to the cache's older objects.
        """
        for cache, path, params in self._collections:
            if not cache.has_synced:
                continue  # the cache's own first list is what start-up waits for
            if cache.connected:
                with self._lock:
                    if cache.name in self._listed and cache.name in self._reconnected:
                        del self._listed[cache.name]
                        self._reconnected.discard(cache.name)
                        log.info("watch back: the cache is used again", extra={"cache": cache.name})
                    elif cache.name in self._listed:
                        self._reconnected.add(cache.name)
                continue
            with self._lock:
                first = cache.name not in self._listed and cache.name not in self._list_errors
                self._reconnected.discard(cache.name)
            if first:
                log.warning("watch down: listing instead every %g s", self.probe_interval_s,
                            extra={"cache": cache.name, "error": cache.last_error})
            try:
                listed = self._client.list(path, params)
            except kube.ApiError as error:
                with self._lock:
                    said = self._list_errors.get(cache.name)
                    self._list_errors[cache.name] = str(error)
                if said != str(error):
                    log.log(error.log_level, "list failed while the watch is down: the view goes stale",
                            extra={"cache": cache.name, "error": str(error), "code": error.code})
                continue
            with self._lock:
                self._listed[cache.name] = _Listed(tuple(listed.get("items") or ()), self._clock())
                self._list_errors.pop(cache.name, None)

    def _run_probes(self) -> None:
        while not self._stopping.is_set():
            self.probe()
            self.list_while_watches_down()
            self._stopping.wait(self.probe_interval_s)

    def fresh(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        """Why the view is stale (None while it is fresh)."""
        with self._lock:
            last_ok_s, error = self._last_ok_s, self._probe_error
            listed = dict(self._listed)
            list_errors = dict(self._list_errors)
        now_s = self._clock()
        for cache in (self.policies, self.pods):
            if not cache.has_synced:
                return f"the {cache.name} cache has not listed yet" + (f" ({cache.last_error})" if cache.last_error else "")
        if last_ok_s is None:
            return f"the API server has not answered yet ({error})" if error else "the API server has not answered yet"
        silent_s = now_s - last_ok_s
        if silent_s > self.stale_after_s:
            return f"no answer from the API server for {silent_s:.0f} s" + (f" ({error})" if error else "")
        for cache in (self.policies, self.pods):
            if cache.connected:
                continue
            stand_in = listed.get(cache.name)
            if stand_in is not None and now_s - stand_in.at_s <= self.stale_after_s:
                continue
            why = cache.last_error or "no answer"
            if cache.name in list_errors:
                why += f"; list failed too: {list_errors[cache.name]}"
            elif stand_in is not None:
                why += f"; last listed {now_s - stand_in.at_s:.0f} s ago"
            return f"the {cache.name} watch is down ({why})"
        return None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.policies.start()
        self.pods.start()
        self._thread = threading.Thread(target=self._run_probes, name="api-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.policies.stop()
        self.pods.stop()
        if self._thread is not None:
            self._thread.join(2.0)

    # -- the view ----------------------------------------------------------------------
    def _objects(self, cache: kube.WatchCache) -> tuple[Any, list[KubeObject]]:
        """A version stamp and the objects: the LIST standing in for the cache, or the cache."""
        with self._lock:
            listed = self._listed.get(cache.name)
        if listed is not None:
            return ("listed", listed.at_s), list(listed.items)
        return ("cache", cache.version), list(cache.items())

    def view(self) -> SourceView:
        (policies_version, policies), (pods_version, pods) = self._objects(self.policies), self._objects(self.pods)
        versions = (policies_version, pods_version)
        if versions != self._built_versions:
            self._built_versions = versions
            parsed = [(object_key(p), self._parse(p)) for p in policies]
            self._view_policies = tuple(policy for _, (policy, _) in parsed if policy is not None)
            self._view_unreadable = MappingProxyType({key: problem for key, (_, problem) in parsed if problem is not None})
            self._view_pods = {
                str(pod["metadata"]["uid"]): pod for pod in pods if (pod.get("metadata") or {}).get("uid")
            }
            live = {key for key, _ in parsed}
            self._parsed = {k: v for k, v in self._parsed.items() if k in live}
            self._last_good = {k: v for k, v in self._last_good.items() if k in live}
        with self._lock:
            rack = self._rack
        problem = self.problem()
        return SourceView(policies=self._view_policies, pods_by_uid=self._view_pods, fresh=problem is None,
                          node_rack=rack, problem=problem, unreadable=self._view_unreadable)

    def _parse(self, document: Mapping[str, Any]) -> tuple[Policy | None, str | None]:
        """A policy from the cache and why it cannot be read (None when it can), parsed once
        per resourceVersion: the validator's, else :func:`enforceable_policy`'s, else the
        last good version and the problem (module docstring)."""
        key, version = object_key(document), kube.resource_version(document)
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        previous_problem = cached[2] if cached is not None else None
        problem: str | None = None
        try:
            policy: Policy | None = parse_policy(document, self._registry)
        except ValueError as refused:
            try:
                policy = enforceable_policy(document)
            except ValueError as error:
                problem = str(error)
                policy = self._last_good.get(key)
                if problem != previous_problem:
                    log.error("policy unreadable: holding the caps of its GPUs",
                              extra={"policy": key, "error": problem, "last_good": policy is not None})
            else:
                log.warning("policy refused by this agent's validator: enforcing its cap, selector and allocations",
                            extra={"policy": key, "error": str(refused)})
        if problem is None and policy is not None:
            self._last_good[key] = policy
            if previous_problem is not None:
                log.info("policy readable again", extra={"policy": key})
        self._parsed[key] = (version, policy, problem)
        return policy, problem
