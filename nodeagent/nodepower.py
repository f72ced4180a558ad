"""Whole-node power from the BMC (Redfish, IPMI DCMI) or Kepler, read off the control tick.

Each configured source is read by its own background thread every ``interval_s``, each
read bounded by ``timeout_s`` (HTTP socket timeouts, ``subprocess`` timeout); the thread
keeps the source's latest reading. The tick never waits for one:
:meth:`NodePowerSampler.choose` takes the readings as they are and lets
:func:`powercap.nodepower.choose_node_power` pick the first fresh, plausible one in the
configured order, else the estimate (the GPUs' power plus ``overhead_w``). A BMC that
hangs only ages its reading until the next source takes over.

- :class:`RedfishSource`: HTTPS to the BMC (a CA bundle, or ``insecure`` with a warning
  at start-up), HTTP basic auth or a Redfish session (``X-Auth-Token``, logged in again
  on a 401), credentials re-read from the files of a mounted ``kubernetes.io/basic-auth``
  Secret (``username``, ``password``) at each login, so a rotated Secret is picked up;
  the session is deleted when the agent stops (BMCs hold few). Redirects are not
  followed (they could carry the credentials elsewhere), and only paths on ``base_url``
  are requested.
  The chassis is ``chassis_id`` or the first member of ``/redfish/v1/Chassis`` with a
  power reading; the resource found is kept until a read fails, then found again.
- :class:`IpmiDcmiSource`: ``ipmitool -I open dcmi power reading`` (the in-band
  ``/dev/ipmi0``); see docs/decisions.md for why the CLI and not the ioctl.
- :class:`KeplerSource`: Kepler's ``/metrics`` (a counter in joules: watts by the rate
  between two scrapes; or its platform watts gauge).

Logs: a source's first failure (and each new kind of failure) is a warning, its recovery
an info line; a change of the source in use is one line (a warning when it falls back,
info when a better one is back).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from nodeagent.tokens import Fetch, http_fetch
from powercap.nodepower import (
    ESTIMATE,
    IPMI_DCMI,
    KEPLER,
    REDFISH,
    ExpositionSample,
    NodePower,
    PowerDocumentError,
    SourceReading,
    choose_node_power,
    dcmi_power_watts,
    joules_rate_watts,
    kepler_platform,
    redfish_chassis_links,
    redfish_members,
    redfish_power_watts,
)

log = logging.getLogger(__name__)

CHASSIS_COLLECTION = "/redfish/v1/Chassis"
SESSIONS = "/redfish/v1/SessionService/Sessions"
MAX_DOCUMENT_BYTES = 1024 * 1024
DEFAULT_KEPLER_URL = "http://localhost:9102/metrics"


class ReadingPending(Exception):
    """No reading yet, and nothing wrong: a counter needs a second sample."""


READ_ERRORS = (OSError, ValueError, subprocess.SubprocessError)
"""What a failed read raises (:class:`PowerDocumentError` is a ValueError; urllib's and
socket timeouts are OSErrors)."""


class PowerSource(Protocol):
    name: str

    def read_watts(self) -> float:
        """The node's power now, W; raises one of :data:`READ_ERRORS` or :class:`ReadingPending`."""
        ...

    def close(self) -> None:
        """Let go of what the source holds (a BMC session)."""
        ...


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


# -- Redfish -----------------------------------------------------------------------------------
class BasicAuthFiles:
    """``username`` and ``password`` files of a mounted basic-auth Secret, read at each use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def read(self) -> tuple[str, str]:
        username = (self.directory / "username").read_text().strip()
        password = (self.directory / "password").read_text().rstrip("\n")
        if not username:
            raise ValueError(f"{self.directory / 'username'} is empty")
        return username, password


def bmc_tls_context(ca_file: Path | None, *, insecure: bool = False) -> ssl.SSLContext:
    """TLS >= 1.2 verifying the BMC against ``ca_file`` (the system's CAs without one);
    ``insecure`` verifies nothing (logged as a warning: anyone on the path can read the
    BMC's credentials)."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning("Redfish: the BMC's certificate is not verified (--redfish-insecure)")
    return context


class RedfishSource:
    """Chassis power from a BMC's Redfish service (module docstring)."""

    name = REDFISH

    def __init__(
        self,
        base_url: str,
        credentials: BasicAuthFiles | None,
        tls: ssl.SSLContext,
        *,
        chassis_id: str | None = None,
        session_auth: bool = False,
        timeout_s: float = 2.0,
    ) -> None:
        if urllib.parse.urlsplit(base_url).scheme != "https":
            raise ValueError(f"Redfish URL {base_url!r}: only https (the BMC's credentials travel with each request)")
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self.chassis_id = chassis_id
        self.session_auth = session_auth
        self.timeout_s = timeout_s
        # no proxy: a BMC is reached directly, whatever HTTPS_PROXY the node sets
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects(),
                                                   urllib.request.HTTPSHandler(context=tls))
        self._power_uri: str | None = None
        self._session_token: str | None = None
        self._session_uri: str | None = None

    def read_watts(self) -> float:
        if self._power_uri is None:
            self._power_uri, watts = self._discover()
            return watts
        try:
            return redfish_power_watts(self._get(self._power_uri))
        except READ_ERRORS:
            self._power_uri = None  # found again on the next read: the BMC may have been reset
            raise

    def _discover(self) -> tuple[str, float]:
        """The first chassis power resource that holds a reading, and that reading."""
        if self.chassis_id is not None:
            chassis_uris = [f"{CHASSIS_COLLECTION}/{urllib.parse.quote(self.chassis_id, safe='')}"]
        else:
            chassis_uris = redfish_members(self._get(CHASSIS_COLLECTION))
        problems = []
        for chassis_uri in chassis_uris:
            links = redfish_chassis_links(self._get(chassis_uri))
            for power_uri in links.in_preference_order():
                try:
                    watts = redfish_power_watts(self._get(power_uri))
                except PowerDocumentError as error:
                    problems.append(f"{power_uri}: {error}")
                    continue
                log.info("Redfish: chassis power found", extra={"redfish_resource": power_uri, "watts": watts})
                return power_uri, watts
            if not links.in_preference_order():
                problems.append(f"{chassis_uri}: links neither EnvironmentMetrics nor Power")
        raise PowerDocumentError("no chassis with a power reading" + (f" ({'; '.join(problems)})" if problems else ""))

    def _get(self, path: str) -> Mapping[str, Any]:
        try:
            return self._request(path, self._auth_headers())
        except urllib.error.HTTPError as error:
            if error.code != 401 or not self.session_auth or self._session_token is None:
                raise
            self._session_token = None  # the session expired: log in once more
            return self._request(path, self._auth_headers())

    def _auth_headers(self) -> dict[str, str]:
        if self.credentials is None:
            return {}
        if not self.session_auth:
            username, password = self.credentials.read()
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            return {"Authorization": f"Basic {token}"}
        if self._session_token is None:
            self._session_token = self._log_in()
        return {"X-Auth-Token": self._session_token}

    def _log_in(self) -> str:
        assert self.credentials is not None
        username, password = self.credentials.read()
        body = json.dumps({"UserName": username, "Password": password}).encode()
        request = urllib.request.Request(self.base_url + SESSIONS, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        with self._opener.open(request, timeout=self.timeout_s) as response:
            token = response.headers.get("X-Auth-Token")
            location = response.headers.get("Location")
        if not token:
            raise PowerDocumentError("the BMC's session service answered without an X-Auth-Token")
        self._session_uri = urllib.parse.urlsplit(location).path if location else None
        return str(token)

    def close(self) -> None:
        """Log out of the session, if one is open (best effort: the BMC times it out anyway)."""
        token, uri, self._session_token = self._session_token, self._session_uri, None
        if token is None or uri is None:
            return
        request = urllib.request.Request(self.base_url + uri, method="DELETE", headers={"X-Auth-Token": token})
        try:
            with self._opener.open(request, timeout=self.timeout_s):
                pass
        except READ_ERRORS as error:
            log.info("Redfish: session not deleted; the BMC will time it out", extra={"error": str(error)})

    def _request(self, path: str, headers: Mapping[str, str]) -> Mapping[str, Any]:
        if not path.startswith("/"):
            raise PowerDocumentError(f"{path!r}: not a path on the BMC")
        request = urllib.request.Request(self.base_url + path, headers={"Accept": "application/json", **headers})
        with self._opener.open(request, timeout=self.timeout_s) as response:
            body: bytes = response.read(MAX_DOCUMENT_BYTES + 1)
        if len(body) > MAX_DOCUMENT_BYTES:
            raise PowerDocumentError(f"{path}: document over {MAX_DOCUMENT_BYTES} bytes")
        try:
            document = json.loads(body)
        except ValueError as error:
            raise PowerDocumentError(f"{path}: not JSON ({error})") from None
        if not isinstance(document, Mapping):
            raise PowerDocumentError(f"{path}: not a JSON object")
        return document


# -- IPMI DCMI ---------------------------------------------------------------------------------
class IpmiDcmiSource:
    """DCMI Get Power Reading through ``ipmitool``'s in-band (``open``) interface."""

    name = IPMI_DCMI

    def __init__(self, ipmitool: str = "ipmitool", *, timeout_s: float = 2.0) -> None:
        self.command = [ipmitool, "-I", "open", "dcmi", "power", "reading"]
        self.timeout_s = timeout_s

    def read_watts(self) -> float:
        completed = subprocess.run(self.command, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        if completed.returncode != 0:
            said = (completed.stderr or completed.stdout).strip().splitlines()
            raise subprocess.SubprocessError(
                f"ipmitool exited with {completed.returncode}" + (f": {said[-1][:200]}" if said else "")
            )
        return dcmi_power_watts(completed.stdout)

    def close(self) -> None:
        """Nothing held between reads."""


# -- Kepler ------------------------------------------------------------------------------------
def exposition_samples(text: str) -> list[ExpositionSample]:
    """Every sample of a Prometheus text exposition; ``ValueError`` for text that is not one."""
    return [
        ExpositionSample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


class KeplerSource:
    """Kepler's platform power from its exporter (:func:`powercap.nodepower.kepler_platform`)."""

    name = KEPLER

    def __init__(self, url: str = DEFAULT_KEPLER_URL, *, timeout_s: float = 2.0, fetch: Fetch = http_fetch,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._fetch = fetch
        self._clock = clock
        self._last_joules: tuple[float, float] | None = None  # (J, at_s) of the previous scrape

    def read_watts(self) -> float:
        try:
            platform = kepler_platform(exposition_samples(self._fetch(self.url, self.timeout_s)))
        except READ_ERRORS:
            self._last_joules = None  # a rate spans two good scrapes in a row
            raise
        at_s = self._clock()
        if platform.joules is None:
            assert platform.watts is not None
            return platform.watts
        previous, self._last_joules = self._last_joules, (platform.joules, at_s)
        if previous is None:
            raise ReadingPending("Kepler's energy counter read once: watts after the next scrape")
        watts = joules_rate_watts(*previous, platform.joules, at_s)
        if watts is None:
            raise ReadingPending("Kepler's energy counter went down (Kepler restarted): watts after the next scrape")
        return watts

    def close(self) -> None:
        """Nothing held between reads."""


# -- the sampler -------------------------------------------------------------------------------
class NodePowerMetricsSink(Protocol):
    """What the sampler reports to (:class:`nodeagent.metrics.NodePowerMetrics`)."""

    def read_failed(self, source: str) -> None: ...
    def in_use(self, power: NodePower, configured: Sequence[str]) -> None: ...


class NodePowerSampler:
    """Reads each source on its own thread; :meth:`choose` picks per tick (module docstring)."""

    def __init__(
        self,
        sources: Sequence[PowerSource] = (),
        *,
        overhead_w: float = 0.0,
        interval_s: float = 5.0,
        max_age_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: NodePowerMetricsSink | None = None,
    ) -> None:
        self.sources = tuple(sources)
        self.overhead_w = overhead_w
        self.interval_s = interval_s
        self.max_age_s = max_age_s
        self._clock = clock
        self.metrics = metrics
        self._lock = threading.Lock()
        self._latest: dict[str, SourceReading] = {}
        self._failing: dict[str, str] = {}  # source -> kind of its current failure
        self._in_use: str | None = None
        self._last_choice: NodePower | None = None
        self._passed_over: tuple[tuple[str, str], ...] = ()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(source.name for source in self.sources) + (ESTIMATE,)

    def read_once(self, source: PowerSource) -> None:
        """Read one source now and keep what it said (the threads call this)."""
        started_s = self._clock()
        try:
            watts = source.read_watts()
        except ReadingPending as pending:
            self._keep(SourceReading(source.name, None, started_s, str(pending)))
            return
        except READ_ERRORS as error:
            self._failed(source.name, error, started_s)
            return
        except Exception as error:  # a bug in a reader must not end its thread
            log.exception("node power: reading failed unexpectedly", extra={"source": source.name})
            self._failed(source.name, error, started_s)
            return
        # a reading is as old as the moment the read began: a slow answer counts as old
        self._keep(SourceReading(source.name, watts, started_s))
        with self._lock:
            was_failing = self._failing.pop(source.name, None)
        if was_failing is not None:
            log.info("node power: source readable again", extra={"source": source.name, "watts": watts})

    def _failed(self, name: str, error: Exception, at_s: float) -> None:
        problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        kind = type(error).__name__
        self._keep(SourceReading(name, None, at_s, problem))
        if self.metrics is not None:
            self.metrics.read_failed(name)
        with self._lock:
            previous, self._failing[name] = self._failing.get(name), kind
        if previous != kind:
            log.warning("node power: source unreadable", extra={"source": name, "error": problem})

    def _keep(self, reading: SourceReading) -> None:
        with self._lock:
            previous = self._latest.get(reading.source)
            if reading.watts is None and previous is not None and previous.watts is not None:
                # a failed attempt does not erase the last good reading: its age decides
                reading = SourceReading(reading.source, previous.watts, previous.at_s, reading.problem)
            self._latest[reading.source] = reading

    def choose(self, now_s: float, gpu_power_w: float) -> NodePower:
        """The node power of this tick; never waits on a source."""
        with self._lock:
            readings = [
                self._latest.get(source.name) or SourceReading(source.name, None, now_s, "no reading yet")
                for source in self.sources
            ]
        choice = choose_node_power(readings, now_s, max_age_s=self.max_age_s, gpu_power_w=gpu_power_w,
                                   overhead_w=self.overhead_w)
        self._say_transition(choice.power.source, choice.passed_over)
        if self.metrics is not None:
            self.metrics.in_use(choice.power, self.source_names)
        with self._lock:
            self._last_choice, self._passed_over = choice.power, choice.passed_over
        return choice.power

    def _say_transition(self, source: str, passed_over: tuple[tuple[str, str], ...]) -> None:
        previous, self._in_use = self._in_use, source
        if previous == source:
            return
        order = self.source_names
        fields = {"source": source, "previous_source": previous, "passed_over": dict(passed_over),
                  "estimate": source == ESTIMATE}
        if previous is not None and order.index(source) > order.index(previous):
            log.warning("node power: falling back to the next source", extra=fields)
        else:
            log.info("node power: source in use", extra=fields)

    def status(self) -> dict[str, Any]:
        """The ``nodePower`` of ``/status``: what the last tick used, why the sources before
        it were passed over, and each source's latest reading (its age now)."""
        now_s = self._clock()
        with self._lock:
            power, passed_over = self._last_choice, self._passed_over
            latest = dict(self._latest)
        return {
            "sources": list(self.source_names),
            "watts": power.watts if power else None,
            "source": power.source if power else None,
            "ageS": power.age_s if power else None,
            "passedOver": dict(passed_over),
            "readings": {
                name: {"watts": reading.watts, "ageS": max(0.0, now_s - reading.at_s), "problem": reading.problem}
                for name, reading in latest.items()
            },
        }

    # -- threads -----------------------------------------------------------------------------
    def start(self) -> None:
        for source in self.sources:
            thread = threading.Thread(target=self._run, args=(source,), name=f"node-power-{source.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, source: PowerSource) -> None:
        while not self._stopping.is_set():
            self.read_once(source)
            self._stopping.wait(self.interval_s)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the threads; one stuck in a read is left behind (daemon), not waited for."""
        self._stopping.set()
        deadline_s = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline_s - time.monotonic()))
        for source in self.sources:
            source.close()
