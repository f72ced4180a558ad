"""Generated tokens/s and requests waiting per pod, scraped from the pod's Prometheus endpoint.

A pod opts in with the annotation ``powercapping.example.com/metrics: "<port>/<path>"``
(``"8000/metrics"``; a bare ``"8000"`` means ``/metrics``); the agent fetches
``http://<status.podIP>:<port>/<path>`` and reads, from that one body parsed once with
prometheus_client's text parser, the counter ``vllm:generation_tokens_total``
(``--tokens-metric``) and the gauge ``vllm:num_requests_waiting`` (``--waiting-metric``),
each summed over its label sets (one per model served).

Rate between two successive scrapes ``(v1, t1)``, ``(v2, t2)``::

    tokens/s = (v2 - v1) / (t2 - t1)       or  v2 / (t2 - t1)  when v2 < v1
                                           (the counter was reset: the server restarted)

Scrapes run on a background thread every ``interval_s`` (5 s), each with a short timeout
(0.5 s), so the control tick never waits on the network. A failed scrape (timeout,
refused, HTTP error, no such counter, unparsable text) forgets that pod's last sample:
the pod has no rate until two good scrapes in a row, and the control law runs without the
ratio loop ("no ratio"). The first failure per pod is logged as a warning, the recovery
as info. A rate older than ``3 x interval_s`` is not reported.

Requests waiting is a snapshot, not a rate: the latest good scrape's gauge, per pod::

    requests waiting = min(floor(sum of the samples + 0.5), 2**31 - 1)

none when the body has no such sample (an older vLLM, a server that is not vLLM: the
tokens/s rate still works), when a sample is negative or not finite, after a failed scrape
(forgotten with the rate), or when older than ``3 x interval_s``. The first scrape of a
pod without a usable gauge is logged as info, and so is its return.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from powercap.objects import METRICS_ANNOTATION, KubeObject, annotations_of

log = logging.getLogger(__name__)

DEFAULT_TOKENS_METRIC = "vllm:generation_tokens_total"
DEFAULT_WAITING_METRIC = "vllm:num_requests_waiting"
MAX_REQUESTS_WAITING = 2**31 - 1
MAX_BODY_BYTES = 8 * 1024 * 1024

_Value = TypeVar("_Value", float, int)

Fetch = Callable[[str, float], str]
"""``fetch(url, timeout_s)`` returns the body; raises ``OSError`` or ``ValueError``."""


def http_fetch(url: str, timeout_s: float) -> str:
    """GET ``url`` with ``timeout_s`` for connect and each read; at most 8 MiB."""
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http only, built below
        body: bytes = response.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"metrics body over {MAX_BODY_BYTES} bytes")
    return body.decode("utf-8", "replace")


def metrics_url(pod: KubeObject) -> str | None:
    """``http://<podIP>:<port>/<path>`` from the pod's metrics annotation, or None."""
    raw = annotations_of(pod).get(METRICS_ANNOTATION)
    pod_ip = (pod.get("status") or {}).get("podIP")
    if not isinstance(raw, str) or not pod_ip:
        return None
    port, _, path = raw.strip().partition("/")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{int(port)}/{path or 'metrics'}"


def sample_values(text: str, sample_names: Collection[str]) -> dict[str, list[float]]:
    """Every sample value of each name in ``sample_names``, in exposition order, from one
    parse of the text; a name without a sample is absent.

    Raises ``ValueError`` for text the parser cannot read.
    """
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sample_names:
                values.setdefault(sample.name, []).append(float(sample.value))
    return values


def counter_total(values: Sequence[float]) -> float | None:
    """The sum of a counter's finite samples (one per label set), None when there is none."""
    finite = [value for value in values if math.isfinite(value)]
    return math.fsum(finite) if finite else None


def gauge_count(values: Sequence[float]) -> int | None:
    """A count gauge summed over its label sets (module docstring): rounded to the nearest
    integer (halves up), at most ``2**31 - 1``; None without samples or when one is negative
    or not finite."""
    if not values or any(not math.isfinite(value) or value < 0 for value in values):
        return None
    return min(math.floor(math.fsum(values) + 0.5), MAX_REQUESTS_WAITING)


@dataclass(frozen=True)
class CounterSample:
    value: float
    at_s: float


def counter_rate(previous: CounterSample, current: CounterSample) -> float | None:
    """Per-second increase between two samples (module docstring); None when no time passed."""
    elapsed_s = current.at_s - previous.at_s
    if elapsed_s <= 0:
        return None
    increase = current.value - previous.value
    if increase < 0:
        increase = current.value  # reset: counted from zero since
    return increase / elapsed_s


@dataclass
class _Target:
    url: str
    sample: CounterSample | None = None
    rate: float | None = None
    rate_at_s: float = 0.0
    waiting: int | None = None
    waiting_at_s: float = 0.0
    waiting_readable: bool | None = None  # None until the first good scrape
    healthy: bool = True


class TokenRates:
    """Scrapes the pods it is given and keeps their latest tokens/s and requests waiting
    (module docstring)."""

    def __init__(
        self,
        *,
        fetch: Fetch = http_fetch,
        clock: Callable[[], float] = time.monotonic,
        metric: str = DEFAULT_TOKENS_METRIC,
        waiting_metric: str = DEFAULT_WAITING_METRIC,
        timeout_s: float = 0.5,
        interval_s: float = 5.0,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self.metric = metric
        self.waiting_metric = waiting_metric
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._targets: dict[str, _Target] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def set_targets(self, urls_by_pod: Mapping[str, str]) -> None:
        """Scrape exactly these pods (UID -> URL) from now on; others are forgotten."""
        with self._lock:
            kept = {uid: t for uid, t in self._targets.items() if urls_by_pod.get(uid) == t.url}
            self._targets = {uid: kept.get(uid) or _Target(url) for uid, url in urls_by_pod.items()}

    def rates(self) -> dict[str, float]:
        """Tokens/s per pod UID, for rates no older than ``3 x interval_s``."""
        return self._fresh(lambda t: (t.rate, t.rate_at_s))

    def requests_waiting(self) -> dict[str, int]:
        """Requests waiting per pod UID, for values no older than ``3 x interval_s``."""
        return self._fresh(lambda t: (t.waiting, t.waiting_at_s))

    def _fresh(self, value_of: Callable[[_Target], tuple[_Value | None, float]]) -> dict[str, _Value]:
        """Each target's value and the time it was read, kept when known and at most
        ``3 x interval_s`` old."""
        now_s = self._clock()
        fresh: dict[str, _Value] = {}
        with self._lock:
            for uid, target in self._targets.items():
                value, at_s = value_of(target)
                if value is not None and now_s - at_s <= 3 * self.interval_s:
                    fresh[uid] = value
        return fresh

    def scrape_once(self) -> None:
        """Scrape every target once, one after the other."""
        with self._lock:
            targets = list(self._targets.items())
        for uid, target in targets:
            self._scrape(uid, target)

    def _scrape(self, uid: str, target: _Target) -> None:
        try:
            values = sample_values(self._fetch(target.url, self.timeout_s), {self.metric, self.waiting_metric})
            value = counter_total(values.get(self.metric, []))
            if value is None:
                raise ValueError(f"no sample named {self.metric}")
        except (OSError, ValueError) as error:
            with self._lock:
                target.sample, target.rate, target.waiting = None, None, None
                was_healthy, target.healthy = target.healthy, False
            if was_healthy:
                log.warning(
                    "tokens/s unavailable: running without the ratio loop",
                    extra={"pod_uid": uid, "url": target.url, "error": str(error) or type(error).__name__},
                )
            return
        current = CounterSample(value, self._clock())
        raw_waiting = values.get(self.waiting_metric, [])
        waiting = gauge_count(raw_waiting)
        with self._lock:
            if target.sample is not None:
                rate = counter_rate(target.sample, current)
                if rate is not None:
                    target.rate, target.rate_at_s = rate, current.at_s
            target.sample = current
            target.waiting, target.waiting_at_s = waiting, current.at_s
            was_readable, target.waiting_readable = target.waiting_readable, waiting is not None
            was_healthy, target.healthy = target.healthy, True
        if not was_healthy:
            log.info("tokens/s readable again", extra={"pod_uid": uid, "url": target.url})
        if waiting is None and was_readable is not False:
            why = f"no sample named {self.waiting_metric}" if not raw_waiting else f"{self.waiting_metric} is {raw_waiting}"
            log.info("requests waiting unknown: the pod counts as saturated by its power alone",
                     extra={"pod_uid": uid, "url": target.url, "error": why})
        elif waiting is not None and was_readable is False:
            log.info("requests waiting readable again", extra={"pod_uid": uid, "url": target.url})

    # -- background thread -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="token-scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.scrape_once()
            except Exception:  # never let the scraper die: the ratio loop just pauses
                log.exception("token scrape round failed")
            self._stopping.wait(self.interval_s)

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
