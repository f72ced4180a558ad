"""Where the webhook reads the other policies from, for the cross-policy checks.

The handlers depend on the small :class:`PolicyLookup` protocol, never on a Kubernetes
client: tests and standalone runs pass :class:`StaticPolicies`; the server passes
:class:`WatchedPolicies`, which reads a watch-backed cache and so never waits on the
network while an admission request is in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from powercap.algorithms import AlgorithmRegistry
from powercap.policies import Policy, policy_from_valid, default_policy, validate_policy


class PolicySourceUnavailable(Exception):
    """The other policies cannot be read now; the message says why, in a few words."""


class PolicyLookup(Protocol):
    def policies(self) -> Sequence[Policy]:
        """Every valid policy of the cluster, all namespaces; raises PolicySourceUnavailable."""
        ...

    def ready(self) -> bool:
        """False while a fresh webhook should not take traffic yet (its cache is still filling)."""
        ...


class PolicyCache(Protocol):
    """The part of ``powercap.kube.WatchCache`` this module reads."""

    @property
    def has_synced(self) -> bool: ...

    @property
    def connected(self) -> bool: ...

    @property
    def last_error(self) -> str: ...

    def items(self) -> Iterable[Mapping[str, Any]]: ...


def typed_policy(document: Mapping[str, Any], registry: AlgorithmRegistry) -> Policy | None:
    """The defaulted :class:`Policy` of a stored document, or None when it is invalid.

    An invalid policy governs nothing (every consumer refuses to parse it), so it cannot
    conflict with another one.
    """
    if not validate_policy(document, registry).ok:
        return None
    return policy_from_valid(default_policy(document, registry))


class StaticPolicies:
    """A fixed set of policy documents (tests, runs without a cluster)."""

    def __init__(self, documents: Iterable[Mapping[str, Any]], registry: AlgorithmRegistry) -> None:
        parsed = (typed_policy(document, registry) for document in documents)
        self._policies = tuple(policy for policy in parsed if policy is not None)

    def policies(self) -> Sequence[Policy]:
        return self._policies

    def ready(self) -> bool:
        return True


class UnavailablePolicies:
    """A lookup that always fails: what a webhook sees when the API server is unreachable."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def policies(self) -> Sequence[Policy]:
        raise PolicySourceUnavailable(self.reason)

    def ready(self) -> bool:
        return True


class WatchedPolicies:
    """Policies from a watch-backed cache, parsed once per stored version.

    Until the cache has listed the policies once (``has_synced``), while its last list or
    watch request failed (``connected`` is False: the API server is unreachable and the
    copy may be out of date), or when reading it fails, :meth:`policies` raises :class:`PolicySourceUnavailable` and the webhook turns
    the cross-policy checks into a warning. Parsed policies are memoised by
    ``metadata.uid`` and ``metadata.resourceVersion``, so a request costs one dictionary
    lookup per policy, not one validation.

    :meth:`ready` (behind ``/readyz``) waits for the first sync, but at most
    ``sync_grace_s`` seconds after start: a new replica does not take traffic while its
    checks would only say "skipped", yet an unreachable API server never keeps the
    webhook, and so every ``kubectl apply`` of a policy, down.
    """

    def __init__(
        self,
        cache: PolicyCache,
        registry: AlgorithmRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        sync_grace_s: float = 10.0,
    ) -> None:
        self._cache = cache
        self._registry = registry
        self._clock = clock
        self._ready_by_s = clock() + sync_grace_s
        self._parsed: dict[tuple[str, str], Policy | None] = {}
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return self._cache.has_synced or self._clock() >= self._ready_by_s

    def policies(self) -> Sequence[Policy]:
        if not self._cache.has_synced:
            raise PolicySourceUnavailable("the policy cache has not synced with the Kubernetes API")
        if not self._cache.connected:
            reason = self._cache.last_error or "connection lost"
            raise PolicySourceUnavailable(f"the Kubernetes API cannot be reached ({reason})")
        try:
            documents = list(self._cache.items())
        except Exception as error:  # the cache's own failure must not fail the admission
            raise PolicySourceUnavailable(f"reading the policy cache failed: {error}") from error
        result: list[Policy] = []
        seen: set[tuple[str, str]] = set()
        with self._lock:
            for document in documents:
                key = _version_key(document)
                seen.add(key)
                if key not in self._parsed:
                    self._parsed[key] = typed_policy(document, self._registry)
                policy = self._parsed[key]
                if policy is not None:
                    result.append(policy)
            for stale in set(self._parsed) - seen:
                del self._parsed[stale]
        return result


def _version_key(document: Mapping[str, Any]) -> tuple[str, str]:
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        return ("", repr(document))
    return (str(metadata.get("uid", "")) or f"{metadata.get('namespace')}/{metadata.get('name')}",
            str(metadata.get("resourceVersion", "")))
