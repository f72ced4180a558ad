"""What the agent tells the cluster: its node's PowerCapNode and Events on policies.

- Telemetry: the ``status`` of the PowerCapNode named after this node
  (:mod:`powercap.nodeobjects`), exactly :func:`powercap.telemetry.to_document`, through
  one merge patch of ``/status`` (:func:`powercap.kube.publish_node_status`; the first
  time it also creates the object, owned by the Node), rate-limited by
  :func:`powercap.agentplan.should_publish` against the last telemetry that was
  *accepted*. The agent never writes its Node. A failed patch is retried on a later
  tick, after a backoff that doubles from ``min_interval_s`` up to :data:`MAX_RETRY_S`
  (or the server's ``Retry-After``), so that an API server that is down, a missing CRD,
  a refusal by the admission policy or a missing RBAC permission costs one request a
  minute, not one a tick; meanwhile readers see the last published telemetry age and go
  stale, as when the agent stops. The first failure, and each new kind of
  failure, is logged as a warning (an error for 401/403) naming the problem; the repeats
  are debug lines; success after failures is logged once.
- Events (events.k8s.io/v1, through :func:`powercap.kube.post_event`, which never
  raises) on the policy that owns the GPU: ``PowerCapChanged`` (Normal),
  ``ThermalEmergency``, ``GpuDegraded`` and ``PowerLimitHeldLower`` (Warning). At most
  one per policy and reason every ``event_interval_s`` (60 s); the next one says how many
  were folded into it.

The API calls run on one background thread (``background=False`` runs them inline, for
tests), so a slow or unreachable API server never delays a control tick. Only the latest
telemetry waits to be sent; Events queue up to a bound and are dropped beyond it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Literal, Protocol

from powercap import KIND, kube
from powercap.agentplan import PublishSettings, should_publish
from powercap.policies import API_GROUP_VERSION, Policy
from powercap.nodeobjects import node_object, status_patch
from powercap.telemetry import NodeTelemetry

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "powercapping.example.com/agent"
MAX_RETRY_S = 60.0  # the longest pause between telemetry patches while they fail
EventType = Literal["Normal", "Warning"]


class Publisher(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def telemetry(self, telemetry: NodeTelemetry, now_s: float, *, lowered: bool = False) -> None: ...
    def event(self, policy: Policy, reason: str, note: str, event_type: EventType, now_s: float) -> None: ...


class NullPublisher:
    """``--policy FILE`` mode: no Kubernetes; telemetry stays in logs and metrics."""

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def telemetry(self, telemetry: NodeTelemetry, now_s: float, *, lowered: bool = False) -> None:
        """Dropped: there is no cluster to publish to."""

    def event(self, policy: Policy, reason: str, note: str, event_type: EventType, now_s: float) -> None:
        """Dropped: the agent's log line for the change says the same."""


def policy_reference(policy: Policy) -> dict[str, str]:
    """The ObjectReference an Event about ``policy`` regards."""
    reference = {"apiVersion": API_GROUP_VERSION, "kind": KIND, "namespace": policy.namespace, "name": policy.name}
    if policy.uid:
        reference["uid"] = policy.uid
    return reference


class KubePublisher:
    """Publishes this node's PowerCapNode and posts Events (module docstring)."""

    def __init__(
        self,
        client: kube.KubeClient,
        node: str,
        *,
        settings: PublishSettings = PublishSettings(),
        event_interval_s: float = 60.0,
        reporting_instance: str | None = None,
        background: bool = True,
        max_queued_events: int = 100,
    ) -> None:
        self._client = client
        self.node = node
        self.settings = settings
        self.event_interval_s = event_interval_s
        self._instance = reporting_instance or f"powercap-agent-{node}"
        self._background = background
        self._lock = threading.Lock()
        self._last_sent: NodeTelemetry | None = None
        self._last_sent_s = 0.0
        self._pending: tuple[NodeTelemetry, float] | None = None
        self._failures = 0  # consecutive failed telemetry patches
        self._retry_at_s = 0.0
        self._last_problem = ""
        self._events_at_s: dict[tuple[str, str], float] = {}
        self._folded: dict[tuple[str, str], int] = {}
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max_queued_events)
        self._thread: threading.Thread | None = None

    @property
    def last_sent(self) -> NodeTelemetry | None:
        """The telemetry the API server last accepted."""
        with self._lock:
            return self._last_sent

    def start(self) -> None:
        if self._background:
            self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within ``timeout_s``) and stop the thread."""
        if self._thread is not None:
            try:
                self._work.put(None, timeout=timeout_s)
            except queue.Full:
                pass
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # never let the publisher die: the next tick tries again
                log.exception("publishing failed")

    def _submit(self, job: Callable[[], None]) -> None:
        if not self._background:
            job()
            return
        try:
            self._work.put_nowait(job)
        except queue.Full:
            log.warning("publisher queue full: dropping an update")

    # -- telemetry ---------------------------------------------------------------------
    def telemetry(self, telemetry: NodeTelemetry, now_s: float, *, lowered: bool = False) -> None:
        """Queue ``telemetry`` when :func:`should_publish` says it is worth a patch: at once
        when ``lowered`` (whatever the minimum interval), but never before the retry time
        of a failing API server."""
        with self._lock:
            if now_s < self._retry_at_s:
                return
            if not should_publish(self._last_sent, telemetry, now_s - self._last_sent_s, self.settings, lowered=lowered):
                return
            queued = self._pending is not None
            self._pending = (telemetry, now_s)
        if not queued:
            self._submit(self._send_telemetry)

    def _send_telemetry(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        telemetry, now_s = pending
        try:
            kube.publish_node_status(self._client, node_object(self.node), status_patch(telemetry), self._node_uid)
        except kube.ApiError as error:
            self._failed(error, now_s)
            return
        with self._lock:
            self._last_sent, self._last_sent_s = telemetry, now_s
            failures, self._failures, self._retry_at_s, self._last_problem = self._failures, 0, 0.0, ""
        if failures:
            log.info("telemetry published again", extra={"node": self.node, "failed_attempts": failures})

    def _node_uid(self) -> str | None:
        """The Node's uid, the owner of a PowerCapNode being created."""
        uid = (self._client.get(kube.node_path(self.node)).get("metadata") or {}).get("uid")
        return uid if isinstance(uid, str) else None

    def _failed(self, error: kube.ApiError, now_s: float) -> None:
        with self._lock:
            self._failures += 1
            delay_s = min(MAX_RETRY_S, self.settings.min_interval_s * 2 ** (self._failures - 1))
            delay_s = max(delay_s, min(error.retry_after_s or 0.0, MAX_RETRY_S))
            self._retry_at_s = now_s + delay_s
            problem = f"{error.code} {error.reason}"
            new_problem, self._last_problem = problem != self._last_problem, problem
            failures = self._failures
        if isinstance(error, kube.NotFound):
            message = (f"telemetry not published: Node {self.node} or the PowerCapNode resource not found "
                       f"(Node deleted? CRD powercapnodes.powercapping.example.com not installed?)")
        else:
            message = f"telemetry not published: {error}"
        level = logging.DEBUG
        if new_problem:
            level = error.log_level
        log.log(level, message, extra={"node": self.node, "error": str(error), "code": error.code,
                                       "failed_attempts": failures, "retry_in_s": delay_s})

    # -- events ------------------------------------------------------------------------
    def event(self, policy: Policy, reason: str, note: str, event_type: EventType, now_s: float) -> None:
        """Post an Event on ``policy`` unless one with this reason went out recently."""
        key = (policy.key, reason)
        with self._lock:
            last_s = self._events_at_s.get(key)
            if last_s is not None and now_s - last_s < self.event_interval_s:
                self._folded[key] = self._folded.get(key, 0) + 1
                return
            self._events_at_s[key] = now_s
            folded = self._folded.pop(key, 0)
        if folded:
            note += f" ({folded} similar in the last {self.event_interval_s:g} s not reported separately)"
        reference = policy_reference(policy)

        def post() -> None:
            kube.post_event(
                self._client,
                reference,
                reason,
                note,
                event_type,
                action="SetPowerLimit",
                reporting_controller=REPORTING_CONTROLLER,
                reporting_instance=self._instance,
            )

        self._submit(post)
