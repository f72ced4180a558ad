"""Whole-node power: each source against its real format, degradation, and the agent's use.

Redfish documents are DMTF's public-rackmount1 mockup (tests/data/redfish/README.md),
served by a fake BMC over real HTTPS with basic auth or sessions; ipmitool's output is its
real layout, run as a real subprocess; Kepler's expositions carry its real metric names.
"""

from __future__ import annotations

import json
import logging
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.agent import Agent, AgentSettings
from nodeagent.metrics import NodePowerMetrics
from nodeagent.nodepower import (
    BasicAuthFiles,
    IpmiDcmiSource,
    KeplerSource,
    NodePowerSampler,
    ReadingPending,
    RedfishSource,
    bmc_tls_context,
    exposition_samples,
)
from nodeagent.nodepowerconfig import (
    NodePowerConfigError,
    NodePowerSettings,
    build_sampler,
    load_settings,
    parse_sources,
    settings_for_node,
)
from nodeagent.simulated import ManualClock, SimulatedBackend
from powercap import physics
from powercap.agentplan import should_publish
from powercap.nodepower import (
    ESTIMATE,
    IPMI_DCMI,
    KEPLER,
    REDFISH,
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
from powercap.telemetry import from_json, to_json
from tests.agenthelpers import NODE, RecordingPublisher, StaticSource, series_value, wait_until
from tests.conftest import REPO_ROOT
from tests.fakes.bmc import FakeBmc, serving

DATA = REPO_ROOT / "tests" / "data"
MOCKUP = DATA / "redfish" / "public-rackmount1"
CHASSIS_URI, POWER_URI, METRICS_URI = "/redfish/v1/Chassis/1U", "/redfish/v1/Chassis/1U/Power", "/redfish/v1/Chassis/1U/EnvironmentMetrics"


def mockup(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((MOCKUP / f"{name}.json").read_text())
    return document


def mockup_documents() -> dict[str, Any]:
    return {
        "/redfish/v1/Chassis": mockup("chassis-collection"),
        CHASSIS_URI: mockup("chassis"),
        POWER_URI: mockup("power"),
        METRICS_URI: mockup("environment-metrics"),
    }


def text(name: str) -> str:
    return (DATA / "nodepower" / name).read_text()


# -- the documents (pure) ------------------------------------------------------------------------
def test_the_mockups_read_as_the_chassis_says() -> None:
    assert redfish_members(mockup("chassis-collection")) == [CHASSIS_URI]
    links = redfish_chassis_links(mockup("chassis"))
    assert links.in_preference_order() == [METRICS_URI, POWER_URI]  # the newer resource first
    assert redfish_power_watts(mockup("environment-metrics")) == 374.0
    assert redfish_power_watts(mockup("power")) == 344.0


def power_with(*controls: Any) -> dict[str, Any]:
    document = mockup("power")
    template = document["PowerControl"][0]
    document["PowerControl"] = [
        control if not isinstance(control, dict) else {**template, **control} for control in controls
    ]
    return document


def metrics_with(reading: Any) -> dict[str, Any]:
    document = mockup("environment-metrics")
    document["PowerWatts"] = {**document["PowerWatts"], "Reading": reading}
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param(power_with({"PowerConsumedWatts": None}), "PowerControl[0].PowerConsumedWatts is null", id="null"),
        pytest.param(power_with({"PowerConsumedWatts": -12}), "out of range", id="negative"),
        pytest.param(power_with({"PowerConsumedWatts": "344"}), "is '344', not a number", id="string"),
        pytest.param(power_with({"PowerConsumedWatts": True}), "is True, not a number", id="bool"),
        pytest.param(power_with({"PowerConsumedWatts": float("nan")}), "out of range", id="nan"),
        pytest.param(power_with({"PowerConsumedWatts": 344000.0}), "out of range", id="milliwatts"),
        pytest.param(power_with({"PowerConsumedWatts": 10**400}), "out of range", id="400-digits"),
        pytest.param(power_with(), "neither EnvironmentMetrics PowerWatts nor Power PowerControl", id="no-controls"),
        pytest.param(power_with("PC1"), "PowerControl[0] is not an object", id="control-not-object"),
        pytest.param({"Id": "Power"}, "neither EnvironmentMetrics PowerWatts nor Power PowerControl", id="empty"),
        pytest.param(metrics_with(None), "PowerWatts.Reading is null", id="metrics-null"),
        pytest.param(metrics_with("n/a"), "PowerWatts.Reading is 'n/a'", id="metrics-string"),
        pytest.param({**mockup("environment-metrics"), "PowerWatts": 374}, "PowerWatts is not an object", id="metrics-flat"),
    ],
)
def test_a_bad_redfish_document_says_what_is_wrong(document: dict[str, Any], message: str) -> None:
    with pytest.raises(PowerDocumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        redfish_power_watts(document)


def test_a_power_control_without_a_reading_gives_way_to_the_next() -> None:
    assert redfish_power_watts(power_with({"PowerConsumedWatts": None}, {"PowerConsumedWatts": 512.5})) == 512.5


def test_ipmitools_real_output_reads_as_the_instantaneous_power() -> None:
    assert dcmi_power_watts(text("ipmitool-dcmi-power-reading.txt")) == 332.0


@pytest.mark.parametrize(
    ("output", "message"),
    [
        pytest.param(text("ipmitool-dcmi-power-reading-deactivated.txt"), "state is 'deactivated'", id="deactivated"),
        pytest.param("", "no 'Instantaneous power reading", id="empty"),
        pytest.param("    Instantaneous power reading:   n/a Watts\n", "is 'n/a', not a number", id="not-a-number"),
        pytest.param("    Instantaneous power reading:   -5 Watts\n", "out of range", id="negative"),
    ],
)
def test_bad_ipmitool_output_is_refused(output: str, message: str) -> None:
    with pytest.raises(PowerDocumentError, match=message):
        dcmi_power_watts(output)


def test_kepler_07_platform_counter_is_summed_over_its_modes() -> None:
    platform = kepler_platform(exposition_samples(text("kepler-0.7-metrics.txt")))
    assert platform.joules == pytest.approx(1.2505e6 + 3.75e6) and platform.watts is None


def test_kepler_010_platform_watts_takes_the_chassis_entry_not_the_sum() -> None:
    platform = kepler_platform(exposition_samples(text("kepler-0.10-metrics.txt")))
    assert platform.watts == 450.5 and platform.joules is None


@pytest.mark.parametrize(
    ("exposition", "message"),
    [
        pytest.param(text("kepler-0.7-metrics.txt").replace('platform_power_source="acpi"', 'platform_power_source="none"'),
                     "measures no platform power", id="modelled-platform"),
        pytest.param("# TYPE kepler_node_cpu_watts gauge\nkepler_node_cpu_watts 61.2\n", "neither", id="cpu-only"),
        pytest.param("kepler_node_platform_joules_total{mode=\"idle\"} NaN\n", "not a counter value", id="nan-counter"),
        pytest.param("kepler_platform_watts{source=\"redfish\"} -1\n", "out of range", id="negative-watts"),
    ],
)
def test_a_kepler_without_a_usable_platform_figure_is_refused(exposition: str, message: str) -> None:
    with pytest.raises(PowerDocumentError, match=message):
        kepler_platform(exposition_samples(exposition))


@pytest.mark.parametrize(
    ("previous", "current", "watts"),
    [
        pytest.param((1000.0, 10.0), (6000.0, 15.0), 1000.0, id="rate"),
        pytest.param((1000.0, 10.0), (1000.0, 15.0), 0.0, id="idle"),
        pytest.param((1000.0, 10.0), (10.0, 15.0), None, id="reset"),
        pytest.param((1000.0, 10.0), (2000.0, 10.0), None, id="no-time"),
    ],
)
def test_joules_become_watts_over_two_scrapes(previous: tuple[float, float], current: tuple[float, float],
                                              watts: float | None) -> None:
    assert joules_rate_watts(*previous, *current) == watts


NOW_S = 1000.0


@pytest.mark.parametrize(
    ("readings", "expected", "passed_over"),
    [
        pytest.param([SourceReading(REDFISH, 4200, NOW_S - 3), SourceReading(KEPLER, 4100, NOW_S)],
                     NodePower(4200, REDFISH, 3), [], id="first-fresh"),
        pytest.param([SourceReading(REDFISH, 4200, NOW_S - 16), SourceReading(KEPLER, 4100, NOW_S - 1)],
                     NodePower(4100, KEPLER, 1), [REDFISH], id="stale-then-next"),
        pytest.param([SourceReading(REDFISH, None, NOW_S, "URLError: timed out"), SourceReading(KEPLER, 4100, NOW_S)],
                     NodePower(4100, KEPLER, 0), [REDFISH], id="failed-then-next"),
        pytest.param([SourceReading(REDFISH, 900, NOW_S)], NodePower(2800 + 1500, ESTIMATE, 0), [REDFISH],
                     id="below-the-gpus"),
        pytest.param([SourceReading(REDFISH, 2300, NOW_S)], NodePower(2300, REDFISH, 0), [], id="within-the-gpu-floor"),
        pytest.param([], NodePower(2800 + 1500, ESTIMATE, 0), [], id="estimate-only"),
        pytest.param([SourceReading(REDFISH, 4200, NOW_S + 2)], NodePower(4200, REDFISH, 0), [], id="future-is-age-0"),
    ],
)
def test_choosing_the_node_power(readings: list[SourceReading], expected: NodePower, passed_over: list[str]) -> None:
    choice = choose_node_power(readings, NOW_S, max_age_s=15, gpu_power_w=2800, overhead_w=1500)
    assert choice.power == expected
    assert [source for source, _ in choice.passed_over] == passed_over


# -- Redfish over HTTPS --------------------------------------------------------------------------
@pytest.fixture
def bmc(tmp_path: Path) -> Iterator[FakeBmc]:
    with serving(FakeBmc(mockup_documents()), tmp_path / "bmc-certs") as served:
        yield served


@pytest.fixture
def credentials(tmp_path: Path, bmc: FakeBmc) -> BasicAuthFiles:
    directory = tmp_path / "bmc-secret"
    directory.mkdir()
    (directory / "username").write_text(bmc.username)
    (directory / "password").write_text(bmc.password)
    return BasicAuthFiles(directory)


def redfish(bmc: FakeBmc, credentials: BasicAuthFiles | None, **options: Any) -> RedfishSource:
    return RedfishSource(bmc.url, credentials, bmc_tls_context(bmc.ca_file), timeout_s=options.pop("timeout_s", 5.0),
                         **options)


def test_redfish_finds_the_chassis_and_prefers_environment_metrics(bmc: FakeBmc, credentials: BasicAuthFiles) -> None:
    source = redfish(bmc, credentials)
    assert source.read_watts() == 374.0
    assert source.read_watts() == 374.0
    gets = [path for method, path in bmc.requests if method == "GET"]
    assert gets == ["/redfish/v1/Chassis", CHASSIS_URI, METRICS_URI, METRICS_URI]  # found once, then read


def test_redfish_falls_back_to_the_power_resource(bmc: FakeBmc, credentials: BasicAuthFiles) -> None:
    chassis = mockup("chassis")
    del chassis["EnvironmentMetrics"]  # a BMC older than Redfish 2021.2
    bmc.documents[CHASSIS_URI] = chassis
    assert redfish(bmc, credentials, chassis_id="1U").read_watts() == 344.0
    assert ("GET", "/redfish/v1/Chassis") not in bmc.requests  # the chassis was named


def test_a_chassis_whose_metrics_hold_no_reading_uses_its_power_resource(bmc: FakeBmc, credentials: BasicAuthFiles) -> None:
    bmc.documents[METRICS_URI] = metrics_with(None)
    assert redfish(bmc, credentials).read_watts() == 344.0


def test_redfish_sessions_log_in_once_and_again_when_the_session_ends(bmc: FakeBmc, credentials: BasicAuthFiles) -> None:
    source = redfish(bmc, credentials, session_auth=True)
    assert source.read_watts() == 374.0 and source.read_watts() == 374.0
    bmc.tokens.clear()  # the BMC dropped the session (reset, timeout)
    assert source.read_watts() == 374.0
    assert [path for method, path in bmc.requests if method == "POST"] == [
        "/redfish/v1/SessionService/Sessions", "/redfish/v1/SessionService/Sessions"]
    [open_session] = [path for path, token in bmc.sessions.items() if token in bmc.tokens]
    source.close()  # the agent stops: the session is given back, not left to time out
    assert ("DELETE", open_session) in bmc.requests and not bmc.tokens


def test_a_link_off_the_bmc_is_not_followed_with_the_credentials(bmc: FakeBmc, credentials: BasicAuthFiles) -> None:
    bmc.documents["/redfish/v1/Chassis"] = {"Members": [{"@odata.id": "https://elsewhere.example/redfish/v1/Chassis/1"}]}
    with pytest.raises(PowerDocumentError, match="not a path on the BMC"):
        redfish(bmc, credentials).read_watts()


def test_wrong_credentials_an_unknown_ca_and_a_missing_secret_fail_the_read(
    bmc: FakeBmc, credentials: BasicAuthFiles, tmp_path: Path
) -> None:
    (credentials.directory / "password").write_text("wrong")
    with pytest.raises(OSError, match="401"):
        redfish(bmc, credentials).read_watts()
    (credentials.directory / "password").write_text(bmc.password)  # a rotated Secret is read again
    assert redfish(bmc, credentials).read_watts() == 374.0
    system_cas = RedfishSource(bmc.url, credentials, bmc_tls_context(None), timeout_s=5.0)
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        system_cas.read_watts()
    with pytest.raises(OSError):
        redfish(bmc, BasicAuthFiles(tmp_path / "no-secret")).read_watts()


def test_insecure_tls_works_and_warns(bmc: FakeBmc, credentials: BasicAuthFiles, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        context = bmc_tls_context(None, insecure=True)
    assert "not verified" in caplog.text
    assert RedfishSource(bmc.url, credentials, context, timeout_s=5.0).read_watts() == 374.0


def test_redfish_refuses_plain_http() -> None:
    with pytest.raises(ValueError, match="only https"):
        RedfishSource("http://10.0.0.5", None, ssl.create_default_context())


def test_a_bmc_that_serves_garbage_fails_the_read(bmc: FakeBmc, credentials: BasicAuthFiles) -> None:
    bmc.documents[METRICS_URI] = b"<html>BMC busy</html>"
    bmc.documents[POWER_URI] = b"[]"
    with pytest.raises(PowerDocumentError, match="no chassis with a power reading"):
        redfish(bmc, credentials).read_watts()


def test_a_slow_bmc_times_out(bmc: FakeBmc, credentials: BasicAuthFiles) -> None:
    bmc.delay_s = 30.0
    with pytest.raises(OSError, match="timed out"):
        redfish(bmc, credentials, timeout_s=0.2).read_watts()


# -- ipmitool and Kepler at the edge -------------------------------------------------------------
def fake_ipmitool(tmp_path: Path, script: str) -> str:
    path = tmp_path / "ipmitool"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_ipmitool_is_run_in_band_and_its_output_read(tmp_path: Path) -> None:
    output = DATA / "nodepower" / "ipmitool-dcmi-power-reading.txt"
    tool = fake_ipmitool(tmp_path, f'echo "$@" > {tmp_path}/argv; cat {output}')
    assert IpmiDcmiSource(tool).read_watts() == 332.0
    assert (tmp_path / "argv").read_text().split() == ["-I", "open", "dcmi", "power", "reading"]


def test_ipmitool_failing_or_hanging_fails_the_read(tmp_path: Path) -> None:
    missing = fake_ipmitool(tmp_path, 'echo "Could not open device at /dev/ipmi0 or /dev/ipmi/0 or /dev/ipmidev/0: '
                                      'No such file or directory" >&2; exit 1')
    with pytest.raises(subprocess.SubprocessError, match="exited with 1: Could not open device at /dev/ipmi0"):
        IpmiDcmiSource(missing).read_watts()
    hanging = fake_ipmitool(tmp_path, "exec sleep 30")
    with pytest.raises(subprocess.TimeoutExpired):
        IpmiDcmiSource(hanging, timeout_s=0.2).read_watts()


def test_kepler_counter_gives_watts_from_the_second_scrape() -> None:
    clock = ManualClock(100.0)
    joules = iter([5_000_000.0, 5_012_000.0, 10.0, 2_010.0])
    scraped: list[str] = []

    def fetch(url: str, timeout_s: float) -> str:
        scraped.append(url)
        return f'kepler_node_platform_joules_total{{mode="idle",source="acpi"}} {next(joules)}\n'

    source = KeplerSource("http://10.0.0.7:9102/metrics", fetch=fetch, clock=clock)
    with pytest.raises(ReadingPending):
        source.read_watts()
    clock.advance(5)
    assert source.read_watts() == 2400.0
    clock.advance(5)
    with pytest.raises(ReadingPending, match="restarted"):
        source.read_watts()
    clock.advance(5)
    assert source.read_watts() == 400.0
    assert scraped == ["http://10.0.0.7:9102/metrics"] * 4


# -- the sampler: degradation, and a tick that never waits ---------------------------------------
class ScriptedSource:
    """A source whose next answers the test sets: watts, an exception, or a hang."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.answers: list[float | Exception] = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.callers: set[str] = set()

    def read_watts(self) -> float:
        self.callers.add(threading.current_thread().name)
        self.entered.set()
        if self.hang.is_set():
            self.release.wait(30)
            raise TimeoutError("timed out")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        """Nothing held."""


def source_value(registry: CollectorRegistry, source: str, name: str = "powercap_node_power_source") -> float | None:
    """The value of ``name{source=...}`` (series_value's first parameter is called source too)."""
    return next((s.value for f in registry.collect() for s in f.samples
                 if s.name == name and s.labels == {"source": source}), None)


def test_a_failed_source_degrades_to_the_next_and_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(0.0)
    bmc, kepler = ScriptedSource(REDFISH), ScriptedSource(KEPLER)
    registry = CollectorRegistry()
    sampler = NodePowerSampler([bmc, kepler], overhead_w=1500, max_age_s=15, clock=clock,
                               metrics=NodePowerMetrics(registry))
    bmc.answers = [4200.0, TimeoutError("timed out"), TimeoutError("timed out"), TimeoutError("timed out"), 4300.0]
    kepler.answers = [4150.0] * 5
    caplog.set_level(logging.INFO, logger="nodeagent.nodepower")

    def round_of_reads_then_tick() -> NodePower:
        sampler.read_once(bmc)
        sampler.read_once(kepler)
        clock.advance(5)
        return sampler.choose(clock(), gpu_power_w=2800)

    assert round_of_reads_then_tick() == NodePower(4200, REDFISH, 5)
    # failed reads keep the last good reading while it is fresh (up to 15 s) ...
    assert round_of_reads_then_tick() == NodePower(4200, REDFISH, 10)
    assert round_of_reads_then_tick() == NodePower(4200, REDFISH, 15)
    # ... then it is too old: the next source takes over, until the BMC answers again
    assert round_of_reads_then_tick() == NodePower(4150, KEPLER, 5)
    assert round_of_reads_then_tick() == NodePower(4300, REDFISH, 5)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages.count(("WARNING", "node power: source unreadable")) == 1  # once, not per failed read
    assert messages.count(("WARNING", "node power: falling back to the next source")) == 1
    assert messages.count(("INFO", "node power: source readable again")) == 1
    assert source_value(registry, REDFISH) == 1
    assert source_value(registry, KEPLER) == 0
    assert source_value(registry, ESTIMATE) == 0
    assert source_value(registry, REDFISH, "powercap_node_power_read_errors_total") == 3


def test_every_source_gone_means_the_estimate_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(0.0)
    bmc = ScriptedSource(REDFISH)
    bmc.answers = [PowerDocumentError("Power PowerControl[0].PowerConsumedWatts is null, not a number of watts")]
    sampler = NodePowerSampler([bmc], overhead_w=1500, clock=clock)
    sampler.read_once(bmc)
    with caplog.at_level(logging.INFO, logger="nodeagent.nodepower"):
        power = sampler.choose(clock(), gpu_power_w=2800)
    assert power == NodePower(4300, ESTIMATE, 0) and power.estimated
    assert sampler.status()["passedOver"] == {REDFISH: "PowerDocumentError: Power PowerControl[0].PowerConsumedWatts "
                                                        "is null, not a number of watts"}
    [line] = [r for r in caplog.records if r.getMessage() == "node power: source in use"]
    assert line.__dict__["estimate"] is True


def simulated_agent(sampler: NodePowerSampler, clock: ManualClock, publisher: RecordingPublisher) -> Agent:
    backend = SimulatedBackend([physics.H200_LIKE] * 2, clock=clock, uuid_prefix="GPU-np")
    return Agent(backend, StaticSource(), AgentSettings(node=NODE, dry_run=True), publisher=publisher,
                 node_power=sampler, clock=clock)


def test_a_hung_bmc_never_delays_the_tick_which_moves_on_to_the_next_source() -> None:
    clock = ManualClock(1000.0)
    bmc, kepler = ScriptedSource(REDFISH), ScriptedSource(KEPLER)
    bmc.answers = [4200.0]
    kepler.answers = [3900.0] * 100_000
    sampler = NodePowerSampler([bmc, kepler], interval_s=0.01, max_age_s=15, clock=clock)
    publisher = RecordingPublisher()
    agent = simulated_agent(sampler, clock, publisher)
    sampler.read_once(bmc)  # one good reading, then the BMC hangs on every read
    bmc.hang.set()
    bmc.callers.clear()
    sampler.start()
    try:
        assert bmc.entered.wait(10)
        durations = []
        for _ in range(20):
            clock.advance(1)
            # Kepler's thread reads on: wait for its reading of this second (the fake clock
            # moves faster than the thread's real 10 ms interval)
            wait_until(lambda: sampler.status()["readings"][KEPLER]["ageS"] == 0)
            started_s = clock()
            agent.tick()
            durations.append(agent.last_tick_end_s - started_s)  # type: ignore[operator]
            assert bmc.entered.is_set() and not bmc.release.is_set()  # the BMC's read is still hanging
        sources = [t.node_power.source for t in publisher.telemetries]  # type: ignore[union-attr]
    finally:
        bmc.release.set()
        agent.close()
    assert durations == [0.0] * 20  # the agent's clock did not move inside a tick: nothing waited
    assert threading.current_thread().name not in bmc.callers | kepler.callers  # no read ran on the tick
    assert sources[:15] == [REDFISH] * 15 and set(sources[15:]) == {KEPLER}  # 15 s old, then the next


def test_the_agent_publishes_node_power_and_shows_it(tmp_path: Path) -> None:
    clock = ManualClock(1000.0)
    publisher = RecordingPublisher()
    agent = simulated_agent(NodePowerSampler(overhead_w=1500, clock=clock), clock, publisher)
    try:
        agent.tick()
        telemetry = publisher.telemetries[-1]
        status = agent.status()["nodePower"]
        registry = agent.metrics.registry
    finally:
        agent.close()
    assert telemetry.node_power == NodePower(telemetry.power_w + 1500, ESTIMATE, 0)
    assert from_json(to_json(telemetry)).node_power == NodePower(round(telemetry.power_w + 1500, 1), ESTIMATE, 0)
    assert status["source"] == ESTIMATE and status["sources"] == [ESTIMATE]
    assert source_value(registry, ESTIMATE) == 1
    assert series_value(registry, "powercap_node_power_watts") == telemetry.power_w + 1500


def test_node_power_moving_or_changing_source_is_worth_a_patch() -> None:
    clock = ManualClock(1000.0)
    publisher = RecordingPublisher()
    agent = simulated_agent(NodePowerSampler(clock=clock), clock, publisher)
    try:
        agent.tick()
        base = publisher.telemetries[-1]
    finally:
        agent.close()
    measured = replace(base, node_power=NodePower(4000, REDFISH, 1))
    assert should_publish(measured, replace(measured, node_power=NodePower(4100, REDFISH, 2)), 10) is False
    assert should_publish(measured, replace(measured, node_power=NodePower(4300, REDFISH, 2)), 10) is True
    assert should_publish(measured, replace(measured, node_power=NodePower(4000, KEPLER, 0)), 10) is True
    assert should_publish(base, measured, 10) is (base.node_power != measured.node_power)


# -- configuration -------------------------------------------------------------------------------
CONFIG = {
    "default": {"sources": ["kepler"], "overheadW": 1500},
    "nodes": {
        "gpu-node-17": {"sources": ["redfish", "ipmi-dcmi", "estimate"], "redfishURL": "https://10.20.0.17",
                        "overheadW": 1800},
        "gpu-node-18": {"keplerURL": "http://10.20.0.18:9102/metrics"},
    },
}


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        pytest.param("gpu-node-17", NodePowerSettings(sources=(REDFISH, IPMI_DCMI), overhead_w=1800,
                                                      redfish_url="https://10.20.0.17"), id="own-section"),
        pytest.param("gpu-node-18", NodePowerSettings(sources=(KEPLER,), overhead_w=1500,
                                                      kepler_url="http://10.20.0.18:9102/metrics"), id="default-and-own"),
        pytest.param("gpu-node-99", NodePowerSettings(sources=(KEPLER,), overhead_w=1500), id="default-only"),
    ],
)
def test_a_nodes_section_overrides_the_default_which_overrides_the_flags(node: str, expected: NodePowerSettings) -> None:
    assert settings_for_node(CONFIG, node, NodePowerSettings()) == expected


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param({"nodes": {"a": {"sources": ["bmc"]}}}, "nodes.a.sources[0]: unknown source 'bmc'", id="unknown-source"),
        pytest.param({"nodes": {"b": {"sources": ["estimate", "kepler"]}}}, "nodes.b.sources[0]: unknown source 'estimate'",
                     id="estimate-not-last"),
        pytest.param({"default": {"sources": ["kepler", "kepler"]}}, "default.sources[1]: kepler listed twice", id="twice"),
        pytest.param({"default": {"overheadW": -5}}, "default.overheadW: expected watts >= 0", id="negative-overhead"),
        pytest.param({"default": {"overheadW": 10**400}}, "default.overheadW: expected watts >= 0", id="overhead-400-digits"),
        pytest.param({"nodes": {"c": {"redfishUrl": "https://x"}}}, "nodes.c.redfishUrl: unknown key", id="misspelt-key"),
        pytest.param({"node": {}}, "node: unknown key", id="top-level-typo"),
        pytest.param({"nodes": ["a"]}, "nodes: expected a mapping", id="nodes-list"),
    ],
)
def test_a_bad_config_names_the_field(document: Any, message: str) -> None:
    with pytest.raises(NodePowerConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings_for_node(document, "a", NodePowerSettings())


def test_config_file_missing_is_no_override_and_redfish_needs_an_https_url(tmp_path: Path) -> None:
    flags = NodePowerSettings(sources=(KEPLER,))
    assert load_settings(tmp_path / "absent.yaml", NODE, flags) == flags
    config = tmp_path / "node-power.yaml"
    config.write_text(f"nodes:\n  {NODE}:\n    sources: [redfish]\n")
    with pytest.raises(NodePowerConfigError, match="redfish needs a BMC URL"):
        load_settings(config, NODE, flags)
    config.write_text(f"nodes:\n  {NODE}:\n    sources: [redfish]\n    redfishURL: http://10.0.0.5\n")
    with pytest.raises(NodePowerConfigError, match="only https"):
        load_settings(config, NODE, flags)
    config.write_text("nodes: [")
    with pytest.raises(NodePowerConfigError, match=str(config)):
        load_settings(config, NODE, flags)


def test_sources_that_cannot_start_stop_the_agent_at_start_up(tmp_path: Path) -> None:
    assert parse_sources("redfish, kepler,estimate", "--node-power") == (REDFISH, KEPLER)
    with pytest.raises(NodePowerConfigError, match="ipmitool"):
        build_sampler(NodePowerSettings(sources=(IPMI_DCMI,), ipmitool=str(tmp_path / "no-ipmitool")))
    with pytest.raises(NodePowerConfigError, match="--redfish-ca-file"):
        build_sampler(NodePowerSettings(sources=(REDFISH,), redfish_url="https://bmc", redfish_ca_file=tmp_path / "no.pem"))
    sampler = build_sampler(NodePowerSettings(sources=(KEPLER, REDFISH), redfish_url="https://bmc", overhead_w=900))
    assert sampler.source_names == (KEPLER, REDFISH, ESTIMATE) and sampler.overhead_w == 900


def test_the_agent_command_takes_the_flags() -> None:
    from nodeagent.cli import node_power_settings
    from powercap.commands import build_parser

    args = build_parser().parse_args([
        "agent", "--node", NODE, "--node-power", "redfish,kepler", "--node-power-overhead-w", "1200",
        "--redfish-url", "https://10.0.0.5", "--redfish-auth", "session", "--redfish-credentials", "none",
        "--kepler-url", "http://10.0.0.7:9102/metrics", "--node-power-max-age", "20",
    ])
    settings = node_power_settings(args)
    assert settings == NodePowerSettings(
        sources=(REDFISH, KEPLER), overhead_w=1200, max_age_s=20, redfish_url="https://10.0.0.5",
        redfish_session=True, redfish_credentials_dir=None, kepler_url="http://10.0.0.7:9102/metrics",
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--node-power", "bmc"])
