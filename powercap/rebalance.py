"""Energy-aware rebalancing: which pod, if any, to evict so the scheduler can pack it better.

For a policy with ``customAlgorithm: energy-aware-scheduling`` (parameters
``energyThreshold`` W per node and ``migrationInterval`` s), pure:

- nothing moves in ``mode: Observe``, within ``migrationInterval`` of the last move, or
  while a pod of the service is pending or terminating (the last move has not settled);
- a node is **hot** when its power (fresh telemetry + power assumed for pods bound since)
  is above ``energyThreshold``;
- a node is a **target** for a pod of ``P`` W and ``g`` GPUs when it is not the pod's node,
  has fresh telemetry, is not cordoned, has ``g`` GPUs free (allocatable minus GPUs
  requested by its active pods), stays at or under the threshold with the pod
  (``power + P <= energyThreshold``: moving the pod must not just move the problem), and
  its rack, when constrained, would accept the pod (the extender's own rack check);
- on the hottest node (largest excess over the threshold, then name) the candidates are
  the service's running pods that a controller re-creates (a ``controller: true``
  ownerReference that is not a DaemonSet or a Node) and that have a target. The pod evicted
  is the smallest one whose power covers the excess (the node drops under the threshold
  with the least disruption), else the largest; ties by name.

``P``, a pod's power: the measured power of the GPUs node telemetry attributes to it, else
:func:`powercap.cluster.estimate_pod_power_w`.

The controller evicts through the Eviction API, so PodDisruptionBudgets are honoured (a 429
means try later), and evicts at most one pod per policy per ``migrationInterval``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from powercap.algorithms import EnergyAwareScheduling
from powercap.cluster import ClusterView, NodeView, PolicyView, estimate_pod_power_w, rack_rise
from powercap.objects import KubeObject, object_key, pod_gpus_requested, pod_is_active, pod_power_annotation_w
from powercap.placement import format_watts, rack_rejection
from powercap.policies import Mode

ALGORITHM = EnergyAwareScheduling.name
DEFAULT_MIGRATION_INTERVAL_S = 300.0
_NOT_RECREATED = ("DaemonSet", "Node")


@dataclass(frozen=True)
class Move:
    """Evict ``pod`` from ``node``: the scheduler may then place it on a node like ``target``."""

    policy: str
    pod: str
    node: str
    node_power_w: float
    pod_power_w: float
    threshold_w: float
    target: str
    target_power_w: float
    rack: str | None = None  # the node's rack

    @property
    def message(self) -> str:
        """Why, for the policy's Event and the logs."""
        return (
            f"node {self.node} draws {format_watts(self.node_power_w)} W, above energyThreshold "
            f"{format_watts(self.threshold_w)} W; evicting {self.pod} ({format_watts(self.pod_power_w)} W) so that "
            f"the scheduler can place it on a node under the threshold, such as {self.target} "
            f"({format_watts(self.target_power_w)} W + {format_watts(self.pod_power_w)} W)"
        )

    @property
    def pod_note(self) -> str:
        """Why, for the evicted pod's Event: what its owner reads in ``kubectl describe pod``."""
        rack = f" in rack {self.rack}" if self.rack is not None else ""
        return (
            f"evicted for policy {self.policy} ({ALGORITHM}): node {self.node}{rack} draws "
            f"{format_watts(self.node_power_w)} W, above energyThreshold {format_watts(self.threshold_w)} W; this pod "
            f"({format_watts(self.pod_power_w)} W) fits under it on another node, such as {self.target} "
            f"({format_watts(self.target_power_w)} W + {format_watts(self.pod_power_w)} W), where the scheduler can "
            "place its replacement"
        )


@dataclass(frozen=True)
class Decision:
    """A move, or none and why (``reason``, for logs)."""

    move: Move | None
    reason: str


def migration_interval_s(policy_view: PolicyView) -> float:
    """``migrationInterval`` of the policy's energy-aware parameters (default 300 s)."""
    value = policy_view.policy.algorithm.parameters.get("migrationInterval", DEFAULT_MIGRATION_INTERVAL_S)
    return float(value)


def plan_rebalance(
    policy_view: PolicyView,
    view: ClusterView,
    pods: Iterable[KubeObject],
    nodes: Iterable[KubeObject],
    last_move_at: datetime | None,
) -> Decision:
    """At most one pod of the policy's service to evict now (see the module docstring).

    ``pods``/``nodes``: the raw objects (ownerReferences, phase, GPU requests, cordons);
    ``last_move_at``: when this policy's last eviction was accepted, or None.
    """
    policy = policy_view.policy
    if policy.algorithm.name != ALGORITHM:
        return Decision(None, f"algorithm is {policy.algorithm.name}, not {ALGORITHM}")
    if policy.mode is Mode.OBSERVE:
        return Decision(None, "mode is Observe: pods are never evicted")
    threshold_w = float(policy.algorithm.parameters.get("energyThreshold", 0))
    if threshold_w <= 0:
        return Decision(None, "no energyThreshold")
    interval_s = migration_interval_s(policy_view)
    if last_move_at is not None and (waited_s := (view.now - last_move_at).total_seconds()) < interval_s:
        return Decision(None, f"last move {waited_s:.0f} s ago; migrationInterval is {interval_s:g} s")

    pods = list(pods)
    ours = [p for p in pods if not _finished(p) and _policy_key(view, p) == policy.key]
    unsettled = sorted(object_key(p) for p in ours if not _node_of(p) or _terminating(p))
    if unsettled:
        return Decision(None, f"waiting for {unsettled[0]} to be placed or gone before moving another pod")
    service_pods = sorted(ours, key=object_key)

    requested = _requested_gpus(pods)
    cordoned = {object_key(n) for n in nodes if (n.get("spec") or {}).get("unschedulable")}
    measured = _measured_pod_power(policy_view)
    hosting = {_node_of(p) for p in service_pods}
    hot = sorted(
        (n for name in hosting if (n := view.nodes.get(name)) is not None and n.fresh and n.power_w > threshold_w),
        key=lambda n: (-n.power_w, n.name),
    )
    if not hot:
        return Decision(None, f"no node of the service is above energyThreshold {format_watts(threshold_w)} W")
    for node in hot:
        excess_w = node.power_w - threshold_w
        candidates = []
        for pod in service_pods:
            if _node_of(pod) != node.name or not _recreated(pod) or (pod.get("status") or {}).get("phase") != "Running":
                continue
            gpus = pod_gpus_requested(pod)
            key = object_key(pod)
            power_w = measured.get(key) or estimate_pod_power_w(
                gpus, pod_power_annotation_w(pod), policy, policy_view.bound_gpus, node.gpu_max_w,
            )
            target = _best_target(view, node.name, gpus, power_w, threshold_w, requested, cordoned)
            if target is not None:
                candidates.append((key, power_w, target))
        if not candidates:
            continue
        covering = [c for c in candidates if c[1] >= excess_w]
        key, power_w, target = (
            min(covering, key=lambda c: (c[1], c[0])) if covering else max(candidates, key=lambda c: (c[1], _desc(c[0])))
        )
        return Decision(
            Move(policy.key, key, node.name, node.power_w, power_w, threshold_w, target.name, target.power_w,
                 node.rack_id),
            "hot node with a pod that fits elsewhere",
        )
    return Decision(None, "no pod on a node above energyThreshold fits on another node under it")


def _best_target(
    view: ClusterView,
    source: str,
    gpus: int,
    power_w: float,
    threshold_w: float,
    requested: Mapping[str, int],
    cordoned: set[str],
) -> NodeView | None:
    """The fullest node (packing) that can take the pod, or None."""
    best = None
    for node in view.nodes.values():
        if node.name == source or not node.fresh or node.name in cordoned:
            continue
        if node.gpu_capacity - requested.get(node.name, 0) < gpus or node.power_w + power_w > threshold_w:
            continue
        rack = view.racks.get(node.rack_id) if node.rack_id is not None else None
        if rack is not None and rack.constrained and rack_rejection(rack, power_w, rack_rise(rack, view.settings)) is not None:
            continue
        if best is None or (node.power_w, _desc(node.name)) > (best.power_w, _desc(best.name)):
            best = node
    return best


def _desc(name: str) -> tuple[int, ...]:
    """A key that sorts names in reverse, for tie-breaks inside max()."""
    return tuple(-ord(ch) for ch in name)


def _requested_gpus(pods: Iterable[KubeObject]) -> dict[str, int]:
    requested: dict[str, int] = {}
    for pod in pods:
        node = _node_of(pod)
        if node and pod_is_active(pod):
            requested[node] = requested.get(node, 0) + pod_gpus_requested(pod)
    return requested


def _measured_pod_power(policy_view: PolicyView) -> dict[str, float]:
    measured: dict[str, float] = {}
    for entry in policy_view.gpus:
        if entry.gpu.pod is not None:
            measured[entry.gpu.pod] = measured.get(entry.gpu.pod, 0.0) + entry.gpu.power_w
    return measured


def _node_of(pod: KubeObject) -> str:
    return str((pod.get("spec") or {}).get("nodeName") or "")


def _policy_key(view: ClusterView, pod: KubeObject) -> str | None:
    found = view.policy_for_pod(pod)
    return found.key if found is not None else None


def _finished(pod: KubeObject) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _terminating(pod: KubeObject) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def _recreated(pod: KubeObject) -> bool:
    """Whether a controller (ReplicaSet, StatefulSet, Job, ...) re-creates the pod once evicted."""
    for owner in (pod.get("metadata") or {}).get("ownerReferences") or ():
        if isinstance(owner, Mapping) and owner.get("controller") and owner.get("kind") not in _NOT_RECREATED:
            return True
    return False
