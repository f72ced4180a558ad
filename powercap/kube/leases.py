"""Leader election on a coordination.k8s.io Lease (:class:`LeaderElector`)."""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from powercap.kube.client import KubeClient
from powercap.kube.errors import ApiError, Conflict, NotFound
from powercap.kube.paths import lease_path
from powercap.kube.wire import Clock, JsonObject, format_micro_time

logger = logging.getLogger(__name__)


def _noop() -> None:
    return None


class LeaderElector:
    """Leader election on a coordination.k8s.io/v1 Lease, with client-go's semantics.

    Each round (:meth:`tick`) reads the Lease and, when it is missing, free, expired or
    already ours, writes ``holderIdentity``/``renewTime`` with a PUT conditional on the
    resourceVersion read (a 409 means another candidate won this round). A Lease held by
    someone else counts as expired once we have not seen the record change for
    ``leaseDurationSeconds`` of our own clock; ``renewTime``, written by the holder's
    clock, is not trusted (as in client-go: clocks of two machines may disagree by more
    than a lease). Taking over from another holder sets ``acquireTime`` and increments
    ``leaseTransitions``.

    The leader renews every ``retry_period_s``; candidates retry with jitter. Leadership
    ends at once when another holder is seen, or when no renewal succeeded for
    ``renew_deadline_s`` (so it ends before anyone else may take over, which needs
    ``lease_duration_s``). :attr:`is_leader` checks that deadline against the clock at
    each call. Callbacks run on the elector thread and must return quickly. On
    :meth:`stop` a leader releases the Lease (empty holder) unless
    ``release_on_stop=False``.
    """

    JITTER_FACTOR = 1.2  # client-go's JitterFactor for candidates' retries

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        on_started_leading: Callable[[], None] = _noop,
        on_stopped_leading: Callable[[], None] = _noop,
        clock: Clock = time.time,
        release_on_stop: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if not identity:
            raise ValueError("identity must not be empty")
        if not lease_duration_s > renew_deadline_s:
            raise ValueError("lease_duration_s must be greater than renew_deadline_s")
        if not renew_deadline_s > self.JITTER_FACTOR * retry_period_s > 0:
            raise ValueError("renew_deadline_s must be greater than 1.2 x retry_period_s > 0")
        self._client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._on_started_leading = on_started_leading
        self._on_stopped_leading = on_stopped_leading
        self._clock = clock
        self._release_on_stop = release_on_stop
        self._rng = rng or random.Random()
        self._path = lease_path(namespace, name)
        self._leading = False
        self._last_renew_s = 0.0
        self._observed_spec: JsonObject | None = None
        self._observed_at_s = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        """True while we hold the Lease and renewed it less than ``renew_deadline_s`` ago."""
        return self._leading and self._clock() - self._last_renew_s < self.renew_deadline_s

    @property
    def holder(self) -> str:
        """The holder identity last seen on the Lease ("" when none or unknown)."""
        return str((self._observed_spec or {}).get("holderIdentity") or "")

    def _log_extra(self, **fields: Any) -> dict[str, Any]:
        return {"lease": f"{self.namespace}/{self.name}", "identity": self.identity, **fields}

    def tick(self) -> bool:
        """One election round: try to acquire or renew, update leadership and run the
        callbacks. Never raises for API failures; returns :attr:`is_leader`."""
        now_s = self._clock()
        try:
            held = self._try_acquire_or_renew(now_s)
        except ApiError as exc:
            facts = exc.request
            logger.log(
                exc.log_level,
                "lease %s/%s: acquire/renew failed: %s",
                self.namespace,
                self.name,
                exc,
                extra=self._log_extra(error=str(exc), code=exc.code, verb=facts.verb if facts else None,
                                      resource=facts.resource if facts else None),
            )
            held = None
        except Exception as exc:  # a Lease of an odd shape must not end the elector thread
            logger.exception(
                "lease %s/%s: acquire/renew failed", self.namespace, self.name, extra=self._log_extra(error=str(exc))
            )
            held = None
        if held:
            self._last_renew_s = now_s
            if not self._leading:
                self._leading = True
                logger.info(
                    "lease %s/%s: %s became leader", self.namespace, self.name, self.identity, extra=self._log_extra()
                )
                self._call(self._on_started_leading)
        elif self._leading and (held is False or now_s - self._last_renew_s >= self.renew_deadline_s):
            self._lose(f"held by {self.holder!r}" if held is False else "renew deadline passed")
        return self.is_leader

    def _lose(self, why: str) -> None:
        self._leading = False
        logger.warning(
            "lease %s/%s: %s stopped leading: %s",
            self.namespace,
            self.name,
            self.identity,
            why,
            extra=self._log_extra(why=why),
        )
        self._call(self._on_stopped_leading)

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            logger.exception("lease %s/%s: callback failed", self.namespace, self.name, extra=self._log_extra())

    def _observe(self, spec: JsonObject, now_s: float) -> None:
        if spec != self._observed_spec:
            self._observed_spec = copy.deepcopy(spec)
            self._observed_at_s = now_s

    def _held_by_other(self, spec: JsonObject, now_s: float) -> bool:
        holder = spec.get("holderIdentity") or ""
        if not holder or holder == self.identity:
            return False
        try:
            duration_s = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        except (TypeError, ValueError):
            duration_s = self.lease_duration_s
        # Only our own clock counts, as in client-go: renewTime was written by the holder's
        # clock, and a holder whose clock runs ahead would keep a dead Lease "fresh" for as
        # long as the skew. A live holder changes the record every retry period.
        return now_s < self._observed_at_s + duration_s

    def _try_acquire_or_renew(self, now_s: float) -> bool | None:
        """True: we hold the Lease now. False: someone else holds a valid Lease.
        None: lost a race (409); the next round decides."""
        stamp = format_micro_time(now_s)
        ours = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
            "acquireTime": stamp,
            "renewTime": stamp,
            "leaseTransitions": 0,
        }
        try:
            lease = self._client.get(self._path)
        except NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": ours,
            }
            try:
                created = self._client.create(lease_path(self.namespace), body)
            except Conflict:
                return None
            self._observe(created.get("spec") or {}, now_s)
            return True
        spec: JsonObject = lease.get("spec") or {}
        self._observe(spec, now_s)
        if self._held_by_other(spec, now_s):
            return False
        new_spec = {**spec, **ours}
        if spec.get("holderIdentity") == self.identity:
            new_spec["acquireTime"] = spec.get("acquireTime") or stamp
            new_spec["leaseTransitions"] = spec.get("leaseTransitions") or 0
        else:
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        lease["spec"] = new_spec
        try:
            updated = self._client.replace(self._path, lease)
        except Conflict:
            return None
        self._observe(updated.get("spec") or {}, now_s)
        return True

    def release(self) -> bool:
        """Give the Lease up if we hold it (empty holder, 1 s duration), so another
        candidate takes over at once. Returns True when released."""
        was_leading, self._leading = self._leading, False
        try:
            lease = self._client.get(self._path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return False
            stamp = format_micro_time(self._clock())
            lease["spec"] = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": stamp, "acquireTime": stamp}
            self._client.replace(self._path, lease)
            logger.info("lease %s/%s: released", self.namespace, self.name, extra=self._log_extra())
            return True
        except ApiError as exc:
            logger.warning(
                "lease %s/%s: release failed: %s", self.namespace, self.name, exc, extra=self._log_extra(error=str(exc))
            )
            return False
        finally:
            if was_leading:
                self._call(self._on_stopped_leading)

    def run(self) -> None:
        """Run election rounds on this thread until :meth:`stop`."""
        while not self._stopping.is_set():
            leading = self.tick()
            period_s = self.retry_period_s
            if not leading:
                period_s *= 1 + self._rng.random() * self.JITTER_FACTOR
            self._stopping.wait(period_s)
        if self._release_on_stop and self._leading:
            self.release()
        elif self._leading:
            self._lose("stopped")

    def start(self) -> None:
        """Run :meth:`run` on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("leader elector already started")
        self._thread = threading.Thread(target=self.run, name=f"leader-elector:{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the rounds, release the Lease if leading, and wait for the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
