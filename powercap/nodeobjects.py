"""PowerCapNode: the per-node telemetry object that replaces the Node annotation.

One cluster-scoped ``PowerCapNode`` (``powercapping.example.com/v1alpha1``) per GPU node,
named after the node and owned by its Node (deleted with it), written by that node's
agent only (a ValidatingAdmissionPolicy compares the writer's node with the name:
config/crd/powercapnodes-admission-policy.yaml). Its ``status`` is exactly the telemetry document
of :mod:`powercap.telemetry` (``timestamp``, ``powerW``, ``inletTemperatureC``, ``gpus``,
``nodePower``), as structured fields the CRD describes; why an object of our own and not
Node annotations or Leases: docs/decisions.md.

Readers see a node's telemetry through :class:`NodeObjectIndex`: for every Node it hands
out the Node with the telemetry of its PowerCapNode in the annotation
``powercapping.example.com/telemetry``, so the cluster view reads one place. Upgrades: for
one release a Node whose PowerCapNode has no telemetry yet keeps the annotation an older
agent wrote; a PowerCapNode with telemetry wins over the annotation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from powercap import API_GROUP, API_VERSION
from powercap.objects import KubeObject
from powercap.telemetry import TELEMETRY_ANNOTATION, NodeTelemetry, to_document

NODE_KIND = "PowerCapNode"
NODE_PLURAL = "powercapnodes"
NODE_API_VERSION = f"{API_GROUP}/{API_VERSION}"


def node_object(node_name: str, node_uid: str | None = None) -> KubeObject:
    """The PowerCapNode an agent creates for its node: named after it and, when the Node's
    ``uid`` is known, owned by it so that deleting the Node deletes it (no
    ``blockOwnerDeletion``, which would need the right to update the Node's finalizers).
    The API server drops ``status`` on create; :func:`status_patch` writes it."""
    metadata: dict[str, Any] = {"name": node_name}
    if node_uid:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid}]
    return {"apiVersion": NODE_API_VERSION, "kind": NODE_KIND, "metadata": metadata}


def status_patch(telemetry: NodeTelemetry) -> KubeObject:
    """The merge patch of the ``/status`` subresource that publishes ``telemetry``.

    ``gpus`` is an atomic list and every other field is written each time, so the patch
    replaces the whole document. A null removes its field (merge patch), and the API server
    drops the null members of ``gpus`` entries too: the reader takes an absent field as
    null (:func:`powercap.telemetry.from_document`)."""
    return {"status": to_document(telemetry)}


def object_document(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The telemetry document of a PowerCapNode: its ``status`` when it has a
    ``timestamp`` (an object created but never published has none), else None."""
    status = obj.get("status")
    if isinstance(status, Mapping) and status.get("timestamp") is not None:
        return status
    return None


def _node_name(obj: Mapping[str, Any]) -> str:
    name = (obj.get("metadata") or {}).get("name")
    return name if isinstance(name, str) else ""


def with_telemetry(node: Mapping[str, Any], document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``node`` whose telemetry annotation holds ``document`` (the node itself is
    shared by a watch cache and never changed)."""
    metadata = node.get("metadata") or {}
    annotations = {**(metadata.get("annotations") or {}), TELEMETRY_ANNOTATION: json.dumps(document, separators=(",", ":"))}
    return {**node, "metadata": {**metadata, "annotations": annotations}}


class NodeObjectIndex:
    """Nodes with their PowerCapNode's telemetry in place of the annotation (module
    docstring), kept current from watch events, as client-go's indexers are.

    :meth:`node_event` and :meth:`object_event` take ``(type, object)`` as a watch cache's
    listeners deliver them (``ADDED``, ``MODIFIED``, ``DELETED``); each recomputes that one
    node's entry: the Node itself when it has no PowerCapNode with telemetry (then the
    annotation, if any, is what is read), else a copy carrying the object's document. An
    entry no event touched is the same dict as before, so
    :func:`powercap.cluster.build_cluster_view` still re-reads only what changed, and an
    event costs O(1), not a walk over every node. A PowerCapNode without a Node is kept
    aside and shows once its Node appears. Not thread-safe: the caller serialises.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, KubeObject] = {}
        self._objects: dict[str, KubeObject] = {}
        self._merged: dict[str, KubeObject] = {}

    def node_event(self, event_type: str, node: KubeObject) -> None:
        name = _node_name(node)
        if event_type == "DELETED":
            self._nodes.pop(name, None)
            self._merged.pop(name, None)
            return
        self._nodes[name] = node
        self._update(name)

    def object_event(self, event_type: str, obj: KubeObject) -> None:
        name = _node_name(obj)
        if event_type == "DELETED":
            self._objects.pop(name, None)
        else:
            self._objects[name] = obj
        if name in self._nodes:
            self._update(name)

    def _update(self, name: str) -> None:
        node = self._nodes[name]
        obj = self._objects.get(name)
        document = object_document(obj) if obj is not None else None
        self._merged[name] = node if document is None else with_telemetry(node, document)

    def items(self) -> list[KubeObject]:
        """One object per Node, in the order the Nodes first came."""
        return list(self._merged.values())


def merge_node_objects(nodes: Iterable[KubeObject], objects: Iterable[KubeObject]) -> list[KubeObject]:
    """Nodes with their PowerCapNodes' telemetry (:class:`NodeObjectIndex`), for a snapshot
    read a single time (a state file, ``controller --once``)."""
    index = NodeObjectIndex()
    for obj in objects:
        index.object_event("ADDED", obj)
    for node in nodes:
        index.node_event("ADDED", node)
    return index.items()
