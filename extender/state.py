"""What the extender remembers between kube-scheduler's calls; the decisions stay pure in
:mod:`powercap.placement`, which gets these memories' answers as inputs.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping

from powercap.cluster import ClusterView, rack_rise
from powercap.numeric import counted
from powercap.placement import (
    FilterOutcome, PlacementRequest, Published, RejectReason, format_watts, pod_in_rack, published_totals,
)
from powercap.policies import Policy


class RecentAdmissions:
    """Pods of Enforce policies the filter passed, until the view shows them bound.

    kube-scheduler binds asynchronously and places the next pod at once: the next filter
    call can come before the first pod's binding reaches the extender's watch, and both pods
    would take the same free room. So the extender remembers what it let through, until the
    view shows the pod bound (then ``bound_gpus`` and the rack's assumed power count it) or
    it is ``ttl_s`` old (kube-scheduler chose no node, a later plugin refused it, or the pod
    was deleted: the extender's pod cache in a cluster lists bound pods only, so it cannot
    see a pending pod go; holding its share until ``ttl_s`` errs on the safe side). What it
    holds meanwhile:

    - of its policy's budget: its GPUs at the largest GPU minimum in the cluster
      (:meth:`admitted_w`);
    - of every constrained rack the filter passed it into: its estimate there
      (:meth:`rack_pending`). The extender does not learn which node kube-scheduler
      picks, so a pod passed into three racks holds room in all three for the moment its
      binding takes to show (tens of milliseconds); a pod refused meanwhile is retried.

    Thread-safe; ``now_s`` is monotonic.
    """

    def __init__(self, ttl_s: float = 30.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        # pod -> (policy, W of its budget, rack -> W of its room, when)
        self._passed: dict[str, tuple[str, float, dict[str, float], float]] = {}

    def _forget_settled(self, view: ClusterView, now_s: float) -> None:
        """Drop pods the view shows bound and pods older than ``ttl_s`` (holding the lock)."""
        for pod_key, (_, _, _, at_s) in list(self._passed.items()):
            if now_s - at_s > self.ttl_s or view.pod_bound(pod_key):
                del self._passed[pod_key]

    def admitted_w(self, view: ClusterView, request: PlacementRequest, now_s: float) -> float:
        """What the policy's other passed pods, still pending in ``view``, hold of its budget."""
        if request.policy is None:
            return 0.0
        total = 0.0
        with self._lock:
            self._forget_settled(view, now_s)
            for pod_key, (policy_key, watts, _, _) in self._passed.items():
                if policy_key == request.policy.key and pod_key != request.pod_key:
                    total += watts
        return total

    def rack_pending(self, view: ClusterView, request: PlacementRequest, now_s: float) -> dict[str, tuple[float, int]]:
        """rack -> (watts, pods) that other passed pods, of any policy, still pending in
        ``view``, hold of its room."""
        pending: dict[str, tuple[float, int]] = {}
        with self._lock:
            self._forget_settled(view, now_s)
            for pod_key, (_, _, racks, _) in self._passed.items():
                if pod_key == request.pod_key:
                    continue
                for rack_id, watts in racks.items():
                    held_w, pods = pending.get(rack_id, (0.0, 0))
                    pending[rack_id] = (held_w + watts, pods + 1)
        return pending

    def passed(self, view: ClusterView, request: PlacementRequest, now_s: float, nodes: Iterable[str] = ()) -> None:
        """Remember a covered pod the filter passed onto ``nodes``: its estimate on each of
        their racks that has a maxPower (the largest over the rack's passed nodes)."""
        if not (request.covered and request.policy is not None):
            return
        racks: dict[str, float] = {}
        for name in nodes:
            node = view.find_node(name)
            if node is None or node.rack_id is None:
                continue
            rack = view.find_rack(node.rack_id)
            if rack is None or rack.limits.max_power_w is None:
                continue
            racks[rack.rack_id] = max(racks.get(rack.rack_id, 0.0), request.estimate_w(node.gpu_max_w))
        with self._lock:
            self._passed[request.pod_key] = (request.policy.key, request.gpus * view.largest_gpu_min_w, racks, now_s)


def refuse_past_pending(
    view: ClusterView, request: PlacementRequest, outcome: FilterOutcome, pending: Mapping[str, tuple[float, int]]
) -> FilterOutcome:
    """``outcome`` with the passed nodes whose rack has no room left once the pods passed a
    moment ago are counted moved to ``failed`` (reason ``power``).

    A passed node in a rack with ``maxPower`` fails when
    ``rackPower + pendingW + E > maxPower``, rackPower = the whole rack's power in the view,
    ``pendingW`` what :meth:`RecentAdmissions.rack_pending` says other passed, not yet
    bound pods hold of the rack, ``E`` this pod's estimate on the node (with the power its
    GPUs add beside them, :func:`powercap.placement.pod_in_rack`); exactly at the limit
    passes, as in :func:`powercap.placement.rack_rejection`.
    """
    if not pending or not outcome.passed:
        return outcome
    passed: list[str] = []
    failed = dict(outcome.failed)
    rejections = Counter(outcome.rejections)
    refusals: dict[tuple[str, float], str | None] = {}  # (rack, GPU maximum) -> why (None: room)
    for name in outcome.passed:
        node = view.find_node(name)
        rack_id = node.rack_id if node is not None else None
        held = pending.get(rack_id) if rack_id is not None else None
        rack = view.find_rack(rack_id) if rack_id is not None and held is not None else None
        if node is None or rack is None or held is None or rack.limits.max_power_w is None:
            passed.append(name)
            continue
        key = (rack.rack_id, node.gpu_max_w)
        if key not in refusals:
            held_w, pods = held
            pod_w, pod_words = pod_in_rack(request.estimate_w(node.gpu_max_w), rack_rise(rack, view.settings))
            refusals[key] = None if rack.power_w + held_w + pod_w <= rack.limits.max_power_w else (
                f"{rack.rack_id}: {format_watts(rack.power_w)} W in use + {format_watts(held_w)} W for "
                f"{counted(pods, 'pod')} placed a moment ago + {pod_words} "
                f"> maxPower {rack.limits.max_power_w} W (set by policy {rack.limits.max_power_policy})"
            )
        refusal = refusals[key]
        if refusal is None:
            passed.append(name)
        else:
            failed[name] = refusal
            rejections[RejectReason.POWER] += 1
    return FilterOutcome(passed=passed, failed=failed, unresolvable=dict(outcome.unresolvable), rejections=rejections)


class PublishedTotalsCache:
    """:func:`powercap.placement.published_totals`, memoised per status object: a status is
    replaced, never changed, when the view takes in a policy the controller wrote again.
    Bounded: cleared past ``max_entries`` statuses. Thread-safe enough: a lost race costs one
    recomputation."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._totals: dict[int, tuple[object, Published]] = {}

    def __call__(self, policy: Policy) -> Published:
        status = policy.status
        cached = self._totals.get(id(status))
        if cached is not None and cached[0] is status:
            return cached[1]
        totals = published_totals(policy)
        if len(self._totals) >= self.max_entries:
            self._totals.clear()
        self._totals[id(status)] = (status, totals)
        return totals
