"""REST paths of the resources powercap reads and writes, and object keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from powercap import API_GROUP, API_VERSION, PLURAL
from powercap.nodeobjects import NODE_PLURAL

def _collection_path(prefix: str, plural: str, namespace: str | None) -> str:
    if namespace is None:
        return f"{prefix}/{plural}"
    return f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}"


def _resource_path(prefix: str, plural: str, namespace: str | None, name: str | None) -> str:
    path = _collection_path(prefix, plural, namespace)
    return path if name is None else f"{path}/{quote(name, safe='')}"


def _namespaced_object_path(prefix: str, plural: str, namespace: str | None, name: str | None) -> str:
    if name is not None and namespace is None:
        raise ValueError(f"a namespaced {plural} object needs its namespace")
    return _resource_path(prefix, plural, namespace, name)


CORE_V1 = "/api/v1"
EVENTS_V1 = "/apis/events.k8s.io/v1"
COORDINATION_V1 = "/apis/coordination.k8s.io/v1"
POLICY_PREFIX = f"/apis/{API_GROUP}/{API_VERSION}"


def node_path(name: str | None = None) -> str:
    """``/api/v1/nodes`` or ``/api/v1/nodes/NAME``."""
    return _resource_path(CORE_V1, "nodes", None, name)


def pod_path(namespace: str | None = None, name: str | None = None) -> str:
    """Pods in all namespaces (``namespace=None``), in one namespace, or one pod."""
    return _namespaced_object_path(CORE_V1, "pods", namespace, name)


def eviction_path(namespace: str, name: str) -> str:
    """The policy/v1 eviction subresource of a pod (POST an ``Eviction`` there)."""
    return pod_path(namespace, name) + "/eviction"


def event_path(namespace: str | None = None, name: str | None = None) -> str:
    """events.k8s.io/v1 Events in all namespaces, in one namespace, or one Event."""
    return _namespaced_object_path(EVENTS_V1, "events", namespace, name)


def lease_path(namespace: str | None = None, name: str | None = None) -> str:
    """coordination.k8s.io/v1 Leases in all namespaces, in one namespace, or one Lease."""
    return _namespaced_object_path(COORDINATION_V1, "leases", namespace, name)


def policy_path(namespace: str | None = None, name: str | None = None) -> str:
    """PowerCappingPolicies in all namespaces, in one namespace, or one policy."""
    return _namespaced_object_path(POLICY_PREFIX, PLURAL, namespace, name)


def powercapnode_path(name: str | None = None) -> str:
    """PowerCapNodes (cluster-scoped, one per GPU node: :mod:`powercap.nodeobjects`), or one."""
    return _resource_path(POLICY_PREFIX, NODE_PLURAL, None, name)


def status_path(object_path: str) -> str:
    """The ``/status`` subresource of the object at ``object_path``."""
    return object_path.rstrip("/") + "/status"


def resource_version(obj: Mapping[str, Any]) -> str:
    """``metadata.resourceVersion`` of an object or list ("" when absent)."""
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
