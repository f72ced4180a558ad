"""What the extender remembers between kube-scheduler's calls; the decisions stay pure in
:mod:`powercap.placement`, which gets these memories' answers as inputs.
"""

from __future__ import annotations

import threading

from powercap.cluster import ClusterView
from powercap.placement import PlacementRequest, published_totals
from powercap.policies import Policy


class RecentAdmissions:
    """Pods of Enforce policies the filter passed, until the view shows them bound.

    kube-scheduler binds asynchronously and places the next pod at once: the next filter
    call can come before the first pod's binding reaches the extender's watch, and both pods
    would take the same free budget. So the extender remembers what it let through, at the
    largest GPU minimum in the cluster, and counts it against the policy's budget until the
    view shows the pod bound (then ``bound_gpus`` counts it) or it is ``ttl_s`` old
    (kube-scheduler chose no node, a later plugin refused it, or the pod was deleted: the
    extender's pod cache in a cluster lists bound pods only, so it cannot see a pending pod
    go; holding its minimum until ``ttl_s`` errs on the safe side). Thread-safe; ``now_s``
    is monotonic.
    """

    def __init__(self, ttl_s: float = 30.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._passed: dict[str, tuple[str, float, float]] = {}  # pod -> (policy, W, when)

    def admitted_w(self, view: ClusterView, request: PlacementRequest, now_s: float) -> float:
        """What the policy's other passed pods, still pending in ``view``, hold of its budget."""
        if request.policy is None:
            return 0.0
        total = 0.0
        with self._lock:
            for pod_key, (policy_key, watts, at_s) in list(self._passed.items()):
                if now_s - at_s > self.ttl_s or view.pod_bound(pod_key):
                    del self._passed[pod_key]
                elif policy_key == request.policy.key and pod_key != request.pod_key:
                    total += watts
        return total

    def passed(self, view: ClusterView, request: PlacementRequest, now_s: float) -> None:
        if request.covered and request.policy is not None:
            with self._lock:
                self._passed[request.pod_key] = (request.policy.key, request.gpus * view.largest_gpu_min_w, now_s)


class PublishedTotalsCache:
    """:func:`powercap.placement.published_totals`, memoised per status object: a status is
    replaced, never changed, when the view takes in a policy the controller wrote again.
    Bounded: cleared past ``max_entries`` statuses. Thread-safe enough: a lost race costs one
    recomputation."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._totals: dict[int, tuple[object, float, int]] = {}

    def __call__(self, policy: Policy) -> tuple[float, int]:
        status = policy.status
        cached = self._totals.get(id(status))
        if cached is not None and cached[0] is status:
            return cached[1], cached[2]
        totals = published_totals(policy)
        if len(self._totals) >= self.max_entries:
            self._totals.clear()
        self._totals[id(status)] = (status, *totals)
        return totals
