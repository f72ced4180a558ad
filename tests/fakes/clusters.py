"""Small clusters for the budget controller's tests: nodes whose telemetry lists GPUs one by one.

Built on :mod:`tests.fakes.objects` (full Node, Pod and policy objects as the API serves
them); this adds per-GPU telemetry (power, limit, pod) and a cluster view in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from powercap.cluster import ClusterSettings, ClusterView, build_cluster_view
from powercap.nodepower import NodePower
from powercap.telemetry import TELEMETRY_ANNOTATION, GpuTelemetry, NodeTelemetry, from_json, to_json
from tests.fakes.objects import NOW, gpu_node


@dataclass(frozen=True)
class Gpu:
    """One GPU as its node agent reports it (``tokens_s``: its share of its pod's tokens/s;
    ``requests_waiting``: its pod's queue)."""

    uuid: str
    power_w: float
    limit_w: float
    pod: str | None = None
    min_w: float = 200
    max_w: float = 700
    tokens_s: float | None = None
    requests_waiting: int | None = None


def node(name: str, rack: str | None, gpus: Sequence[Gpu], *, at: datetime = NOW, inlet_c: float | None = 24.0,
         capacity: int = 8, extra_power_w: float = 0.0, node_power: NodePower | None = None) -> dict[str, Any]:
    """A GPU Node in ``rack`` whose telemetry (taken ``at``) lists ``gpus``; its GPUs' power is
    their sum plus ``extra_power_w`` (GPUs of no policy); ``node_power``: the whole node's
    reading (None: none sent)."""
    annotation = to_json(NodeTelemetry(
        timestamp=at,
        node_power=node_power,
        power_w=sum(g.power_w for g in gpus) + extra_power_w,
        inlet_temperature_c=inlet_c,
        gpus=tuple(
            GpuTelemetry(uuid=g.uuid, index=i, power_w=g.power_w, limit_w=g.limit_w, min_w=g.min_w, max_w=g.max_w,
                         temperature_c=50.0, pod=g.pod, tokens_s=g.tokens_s, requests_waiting=g.requests_waiting)
            for i, g in enumerate(gpus)
        ),
    ))
    return gpu_node(name, rack, annotation, gpus=capacity)


def view(nodes: Sequence[dict[str, Any]], pods: Sequence[dict[str, Any]] = (),
         policies: Sequence[dict[str, Any]] = (), *, now: datetime = NOW, settings: ClusterSettings | None = None) -> ClusterView:
    return build_cluster_view(list(nodes), list(pods), list(policies), now, settings or ClusterSettings())


def with_status(policy: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return {**policy, "status": status}


def agents_apply(nodes: Sequence[dict[str, Any]], policies: Sequence[dict[str, Any]], *, at: datetime,
                 draw_w: Callable[[GpuTelemetry, float], float] | None = None) -> list[dict[str, Any]]:
    """The nodes after their agents applied the policies' ``status.allocations`` and reported
    again ``at``: each GPU's limit becomes its allocation (its minimum when it has none) and
    its power ``draw_w(gpu, limit)`` (default: what it drew, at most the limit)."""
    allocated: dict[str, float] = {}
    for document in policies:
        for entry in (document.get("status") or {}).get("allocations") or ():
            for gpu in entry.get("gpus") or ():
                allocated[gpu["uuid"]] = gpu["watts"]
    draw = draw_w or (lambda gpu, limit_w: min(gpu.power_w, limit_w))
    updated = []
    for node_object in nodes:
        annotations = node_object["metadata"]["annotations"]
        old = from_json(annotations[TELEMETRY_ANNOTATION])
        gpus = []
        for gpu in old.gpus:
            limit_w = allocated.get(gpu.uuid, gpu.min_w)
            gpus.append(replace(gpu, limit_w=limit_w, power_w=round(draw(gpu, limit_w), 1)))
        extra_w = old.power_w - sum(g.power_w for g in old.gpus)
        telemetry = replace(old, timestamp=at, gpus=tuple(gpus), power_w=sum(g.power_w for g in gpus) + extra_w)
        metadata = {**node_object["metadata"], "annotations": {**annotations, TELEMETRY_ANNOTATION: to_json(telemetry)}}
        updated.append({**node_object, "metadata": metadata})
    return updated
