"""Writes powercap makes: node telemetry objects (and annotations), Events, status updates, evictions."""

from __future__ import annotations

import copy
import enum
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from powercap.kube.client import KubeClient
from powercap.kube.errors import ApiError, Conflict, NotFound, TooManyRequests
from powercap.kube.paths import event_path, eviction_path, node_path, powercapnode_path, status_path
from powercap.kube.wire import Clock, JsonObject, format_micro_time

logger = logging.getLogger(__name__)


def patch_node_annotations(client: KubeClient, node_name: str, annotations: Mapping[str, str | None]) -> JsonObject:
    """Set (str) or remove (None) annotations on a node with one merge patch; other
    annotations are untouched. Returns the patched node."""
    body = {"metadata": {"annotations": dict(annotations)}}
    return client.patch(node_path(node_name), body, patch_type="merge")


def publish_node_status(client: KubeClient, node_object: Mapping[str, Any], patch: Mapping[str, Any],
                        node_uid: Callable[[], str | None] | None = None) -> JsonObject:
    """Merge-patch ``patch`` (``{"status": ...}``) into the ``/status`` of the PowerCapNode
    ``node_object`` names; when it does not exist yet, create ``node_object`` (its owner
    the Node whose uid ``node_uid()`` returns, when given and known) and patch again: two
    requests once, one on every later call. Returns the patched object; raises
    :class:`ApiError` (a 404 from the second patch: deleted in between)."""
    path = powercapnode_path(node_object["metadata"]["name"])
    try:
        return client.patch(status_path(path), patch, patch_type="merge")
    except NotFound:
        pass
    body = copy.deepcopy(dict(node_object))
    uid = node_uid() if node_uid is not None else None
    if uid:
        name = body["metadata"]["name"]
        body["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]
    try:
        client.create(powercapnode_path(), body)
    except Conflict:
        pass  # created meanwhile (a restarted agent's first write racing the last one's)
    return client.patch(status_path(path), patch, patch_type="merge")


EVENT_NOTE_MAX_BYTES = 1024  # events.k8s.io/v1 validation limit


def _object_reference(regarding: Mapping[str, Any]) -> JsonObject:
    """An ObjectReference for a full object, or ``regarding`` itself when it already is
    one (has ``name`` and no ``metadata``)."""
    if "metadata" not in regarding:
        return {key: value for key, value in regarding.items() if value is not None}
    meta = regarding["metadata"]
    reference = {
        "apiVersion": regarding.get("apiVersion"),
        "kind": regarding.get("kind"),
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "resourceVersion": meta.get("resourceVersion"),
    }
    return {key: value for key, value in reference.items() if value}


def post_event(
    client: KubeClient,
    regarding: Mapping[str, Any],
    reason: str,
    note: str,
    type: Literal["Normal", "Warning"] = "Normal",  # noqa: A002 - the API field's name
    *,
    action: str,
    reporting_controller: str,
    reporting_instance: str,
    related: Mapping[str, Any] | None = None,
    clock: Clock = time.time,
) -> bool:
    """Record an events.k8s.io/v1 Event about ``regarding`` (an object or an
    ObjectReference), ``related`` naming a second object it concerns. The name is ``<regarding name>.<hex nanoseconds>`` like client-go's;
    a cluster-scoped object's Event goes to namespace ``default``; ``note`` is cut to
    1024 bytes; ``eventTime`` comes from ``clock``. Never raises on an API failure: logs it and returns False.
    """
    reference = _object_reference(regarding)
    now_s = clock()
    namespace = reference.get("namespace") or "default"
    note_bytes = note.encode()
    if len(note_bytes) > EVENT_NOTE_MAX_BYTES:
        note = note_bytes[:EVENT_NOTE_MAX_BYTES].decode("utf-8", "ignore")
    body = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        # client-go's <name>.<hex unix ns>, from the real clock so that names stay unique
        "metadata": {"name": f"{reference.get('name', 'powercap')}.{time.time_ns():x}", "namespace": namespace},
        "eventTime": format_micro_time(now_s),
        "regarding": reference,
        "reason": reason,
        "note": note,
        "type": type,
        "action": action,
        "reportingController": reporting_controller,
        "reportingInstance": reporting_instance,
    }
    if related is not None:
        body["related"] = _object_reference(related)
    try:
        client.create(event_path(namespace), body)
        return True
    except ApiError as exc:
        logger.warning(
            "event %s on %s/%s not recorded: %s",
            reason,
            namespace,
            reference.get("name"),
            exc,
            extra={"reason": reason, "regarding": reference, "error": str(exc)},
        )
        return False


def update_status(
    client: KubeClient,
    path: str,
    compute_status: Callable[[JsonObject], JsonObject | None],
    attempts: int = 5,
) -> JsonObject | None:
    """Read-compute-write the ``status`` of the object at ``path`` through ``/status``.

    ``compute_status(object)`` returns the new status, or None to leave it. An unchanged
    status is not written. The PUT carries the resourceVersion read, and a 409 Conflict
    reads and computes again, up to ``attempts`` rounds. Returns the stored object after
    a write, None when nothing was written. Raises :class:`Conflict` when every attempt
    conflicted, and any other :class:`ApiError` at once (e.g. :class:`NotFound`).
    """
    for attempt in range(1, attempts + 1):
        current = client.get(path)
        new_status = compute_status(copy.deepcopy(current))
        if new_status is None or new_status == current.get("status"):
            return None
        body = {**current, "status": new_status}
        try:
            return client.replace(status_path(path), body)
        except Conflict as exc:
            if attempt == attempts:
                raise
            logger.info(
                "status of %s changed under us, retrying (%d/%d)",
                path,
                attempt,
                attempts,
                extra={"path": path, "attempt": attempt, "error": str(exc)},
            )
    return None  # unreachable: attempts >= 1 either returns or raises


class EvictionResult(enum.Enum):
    """Outcome of :func:`evict_pod`."""

    EVICTED = "evicted"  # accepted: the pod is being deleted
    BLOCKED = "blocked"  # 429: a PodDisruptionBudget forbids it now; try again later
    GONE = "gone"  # 404: the pod no longer exists


def evict_pod(client: KubeClient, namespace: str, name: str) -> EvictionResult:
    """POST a policy/v1 Eviction for a pod, honouring PodDisruptionBudgets.

    Raises :class:`ApiError` for anything other than accepted, 429 or 404.
    """
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": namespace},
    }
    try:
        client.create(eviction_path(namespace, name), body)
    except TooManyRequests as exc:
        logger.info(
            "eviction of %s/%s blocked: %s",
            namespace,
            name,
            exc.message,
            extra={"pod": f"{namespace}/{name}", "error": exc.message},
        )
        return EvictionResult.BLOCKED
    except NotFound:
        return EvictionResult.GONE
    return EvictionResult.EVICTED
