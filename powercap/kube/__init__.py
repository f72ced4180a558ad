"""The one Kubernetes client package of powercap (DESIGN.md section 1).

Everything that talks to the Kubernetes API server goes through here, and no other
package of the project imports ``kubernetes``. Plumbing only, no decisions:

- :mod:`~powercap.kube.client`: a thin JSON REST client (:class:`KubeClient`), one HTTP
  request per call, no retries (the caller owns the retry policy);
- :mod:`~powercap.kube.errors`: :class:`ApiError` and its subclasses, the only exceptions
  callers see;
- :mod:`~powercap.kube.paths`: REST paths of the resources powercap uses, object keys;
- :mod:`~powercap.kube.watching`: :class:`WatchCache`, list + watch with relists on 410;
- :mod:`~powercap.kube.leases`: :class:`LeaderElector` on a coordination.k8s.io Lease;
- :mod:`~powercap.kube.writes`: node telemetry objects (and annotations), Events, status
  updates, evictions;
- :mod:`~powercap.kube.wire`: JSON types and the API's time formats.

Callers use the names re-exported here (``kube.KubeClient``, ``kube.pod_path()``).
"""

from __future__ import annotations

from powercap.kube.wire import (
    Clock,
    JsonObject,
    Params,
    PatchType,
    WatchListener,
    format_micro_time,
    parse_time,
)
from powercap.kube.errors import (
    MAX_RETRY_AFTER_S,
    ApiError,
    Conflict,
    Gone,
    KubeConfigError,
    NotFound,
    RequestFacts,
    TooManyRequests,
    Unreachable,
    error_from_response,
    error_from_status,
)
from powercap.kube.paths import (
    COORDINATION_V1,
    CORE_V1,
    EVENTS_V1,
    POLICY_PREFIX,
    event_path,
    eviction_path,
    lease_path,
    node_path,
    pod_path,
    policy_path,
    powercapnode_path,
    resource_version,
    status_path,
)
from powercap.kube.client import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_WATCH_TIMEOUT_S,
    PATCH_CONTENT_TYPES,
    KubeClient,
    WatchStream,
)
from powercap.kube.watching import WatchCache
from powercap.kube.leases import LeaderElector
from powercap.kube.writes import (
    EVENT_NOTE_MAX_BYTES,
    EvictionResult,
    evict_pod,
    patch_node_annotations,
    post_event,
    publish_node_status,
    update_status,
)

__all__ = [
    "ApiError",
    "COORDINATION_V1",
    "CORE_V1",
    "Clock",
    "Conflict",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_READ_TIMEOUT_S",
    "DEFAULT_WATCH_TIMEOUT_S",
    "EVENTS_V1",
    "EVENT_NOTE_MAX_BYTES",
    "EvictionResult",
    "Gone",
    "JsonObject",
    "KubeClient",
    "KubeConfigError",
    "LeaderElector",
    "MAX_RETRY_AFTER_S",
    "NotFound",
    "PATCH_CONTENT_TYPES",
    "POLICY_PREFIX",
    "Params",
    "PatchType",
    "RequestFacts",
    "TooManyRequests",
    "Unreachable",
    "WatchCache",
    "WatchListener",
    "WatchStream",
    "error_from_response",
    "error_from_status",
    "event_path",
    "evict_pod",
    "eviction_path",
    "format_micro_time",
    "lease_path",
    "node_path",
    "parse_time",
    "patch_node_annotations",
    "pod_path",
    "policy_path",
    "post_event",
    "powercapnode_path",
    "publish_node_status",
    "resource_version",
    "status_path",
    "update_status",
]
