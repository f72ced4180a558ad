"""Tokens/s from a pod's Prometheus endpoint: URL, parsing, rates, resets, failures, and the
ratio loop it feeds, end to end on the simulated backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from nodeagent.agent import Agent, AgentSettings
from nodeagent.simulated import ManualClock, SimulatedBackend
from nodeagent.tokens import CounterSample, TokenRates, counter_rate, counter_value, http_fetch, metrics_url
from powercap import physics
from powercap.telemetry import from_json, to_json
from tests.agenthelpers import NODE, RecordingPublisher, StaticSource, pod, policy

UID = "6f1d2c3b-0000-4000-8000-00000000abcd"
VLLM = """# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="llama-70b"} 1200.0
vllm:generation_tokens_total{model_name="llama-8b"} 300.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="llama-70b"} 99999.0
"""


@pytest.mark.parametrize(
    ("annotation", "pod_ip", "url"),
    [
        pytest.param("8000/metrics", "10.0.0.7", "http://10.0.0.7:8000/metrics", id="port-and-path"),
        pytest.param("8000", "10.0.0.7", "http://10.0.0.7:8000/metrics", id="port-only"),
        pytest.param("9090/custom/path", "fd00::7", "http://[fd00::7]:9090/custom/path", id="ipv6"),
        pytest.param("http", "10.0.0.7", None, id="no-port"),
        pytest.param("70000/metrics", "10.0.0.7", None, id="port-out-of-range"),
        pytest.param("8000/metrics", None, None, id="no-pod-ip-yet"),
        pytest.param(None, "10.0.0.7", None, id="no-annotation"),
    ],
)
def test_metrics_url(annotation: str | None, pod_ip: str | None, url: str | None) -> None:
    annotations = {} if annotation is None else {"powercapping.example.com/metrics": annotation}
    subject: dict[str, Any] = {"metadata": {"annotations": annotations}, "status": {"podIP": pod_ip} if pod_ip else {}}
    assert metrics_url(subject) == url


def test_counter_sums_every_model_and_ignores_other_counters() -> None:
    assert counter_value(VLLM, "vllm:generation_tokens_total") == 1500.0
    assert counter_value(VLLM, "sglang:generation_tokens_total") is None


@pytest.mark.parametrize(
    ("previous", "current", "rate"),
    [
        pytest.param(CounterSample(1000, 10), CounterSample(1500, 15), 100.0, id="increase"),
        pytest.param(CounterSample(1000, 10), CounterSample(200, 12), 100.0, id="reset-counts-from-zero"),
        pytest.param(CounterSample(1000, 10), CounterSample(1000, 10), None, id="no-time-passed"),
    ],
)
def test_counter_rate(previous: CounterSample, current: CounterSample, rate: float | None) -> None:
    assert counter_rate(previous, current) == rate


class ScriptedFetch:
    """Returns the next body (or raises the next exception) for every fetch."""

    def __init__(self, *answers: str | Exception) -> None:
        self.answers = list(answers)
        self.timeouts: list[float] = []

    def __call__(self, url: str, timeout_s: float) -> str:
        self.timeouts.append(timeout_s)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def body(tokens: float) -> str:
    return f"# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total {tokens}\n"


def test_rates_need_two_good_scrapes_and_failures_mean_no_ratio() -> None:
    clock = ManualClock(0.0)
    fetch = ScriptedFetch(body(0), body(500), TimeoutError("timed out"), body(900), body(1400), "not prometheus {{{")
    rates = TokenRates(fetch=fetch, clock=clock, interval_s=5.0)
    rates.set_targets({UID: "http://10.0.0.7:8000/metrics"})
    observed = []
    for _ in range(6):
        rates.scrape_once()
        observed.append(rates.rates().get(UID))
        clock.advance(5.0)
    assert observed == [None, 100.0, None, None, 100.0, None]
    assert fetch.timeouts == [0.5] * 6


def test_a_rate_goes_stale_when_scrapes_stop() -> None:
    clock = ManualClock(0.0)
    rates = TokenRates(fetch=ScriptedFetch(body(0), body(100)), clock=clock, interval_s=5.0)
    rates.set_targets({UID: "http://x:1/metrics"})
    rates.scrape_once()
    clock.advance(5.0)
    rates.scrape_once()
    clock.advance(16.0)
    assert rates.rates() == {}


@pytest.fixture
def vllm_server() -> Iterator[tuple[str, list[float]]]:
    """A real HTTP endpoint serving a counter the test sets (``tokens[0]``)."""
    tokens = [0.0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            data = body(tokens[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/metrics", tokens
    server.shutdown()
    server.server_close()


def test_real_http_scrapes(vllm_server: tuple[str, list[float]]) -> None:
    url, tokens = vllm_server
    clock = ManualClock(0.0)
    rates = TokenRates(fetch=http_fetch, clock=clock)
    rates.set_targets({UID: url})
    rates.scrape_once()
    tokens[0], clock.now_s = 2500.0, 5.0
    rates.scrape_once()
    assert rates.rates() == {UID: 500.0}


def test_refused_connection_is_no_ratio_not_an_error() -> None:
    rates = TokenRates(fetch=http_fetch, clock=ManualClock(0.0))
    rates.set_targets({UID: "http://127.0.0.1:9/metrics"})
    rates.scrape_once()
    assert rates.rates() == {}


def test_ratio_loop_lowers_the_cap_of_an_inefficient_pod(tmp_path: Path) -> None:
    """A pod on a simulated H200 makes 2.5 tokens/J uncapped (578 W) and 3.0 at 400 W; the
    target 3.0 +- 5 % makes the agent step its cap down until the ratio is in the band."""
    clock = ManualClock(0.0)
    backend = SimulatedBackend([physics.H200_LIKE], clock=clock)
    backend.set_workload(0, physics.Workload(load=1.0, prefill_share=0.5))
    uuid = backend.devices()[0].uuid

    def fetch(url: str, timeout_s: float) -> str:
        return body(backend.state(0).tokens)

    target: dict[str, Any] = {"performancePowerRatio": {"targetRatio": 3.0, "tolerancePercentage": 5}}
    source = StaticSource()
    pod_object = pod(UID, **{"powercapping.example.com/metrics": "8000/metrics"})
    source.set(policy(caps_w={uuid: 700}, **target), pods={UID: pod_object})
    tokens = TokenRates(fetch=fetch, clock=clock, interval_s=1.0)
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(f"0::/kubepods/burstable/pod{UID}/0123456789abcdef0123456789abcdef\n")
    agent = Agent(backend, source, AgentSettings(node=NODE), tokens=tokens, clock=clock, proc_root=proc)
    backend.set_pids(0, [4242])
    ratios = []
    for _ in range(200):
        clock.advance(1.0)
        tokens.scrape_once()
        plan = agent.tick().plans[0]
        if plan.tokens_per_joule is not None:
            ratios.append(plan.tokens_per_joule)
    cap_w = backend.snapshot(0).requested_limit_w
    assert 350 <= cap_w <= 500
    assert ratios[0] < 3.0 * 0.95 and 3.0 * 0.95 <= ratios[-1] <= 3.0 * 1.05



def test_telemetry_carries_the_pods_tokens_split_by_gpu_power(tmp_path: Path) -> None:
    """A tensor-parallel pod on two simulated H200s, one busier than the other: the node
    annotation reports per GPU the share of the pod's scraped tokens/s in proportion to its
    power; the shares add up to the pod's rate, so the controller's sums are right."""
    clock = ManualClock(0.0)
    backend = SimulatedBackend([physics.H200_LIKE, physics.H200_LIKE], clock=clock)
    backend.set_workload(0, physics.Workload(load=1.0))
    backend.set_workload(1, physics.Workload(load=0.4))
    uuids = [d.uuid for d in backend.devices()]
    served: list[float] = []

    def fetch(url: str, timeout_s: float) -> str:
        served.append(backend.state(0).tokens + backend.state(1).tokens)
        return body(served[-1])

    source = StaticSource()
    source.set(policy(caps_w={uuids[0]: 700, uuids[1]: 700}),
               pods={UID: pod(UID, **{"powercapping.example.com/metrics": "8000/metrics"})})
    tokens = TokenRates(fetch=fetch, clock=clock, interval_s=1.0)
    proc = tmp_path / "proc"
    for pid in (4242, 4243):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(f"0::/kubepods/burstable/pod{UID}/0123456789abcdef0123456789abcdef\n")
    backend.set_pids(0, [4242])
    backend.set_pids(1, [4243])
    publisher = RecordingPublisher()
    agent = Agent(backend, source, AgentSettings(node=NODE), publisher=publisher, tokens=tokens, clock=clock, proc_root=proc)
    for _ in range(5):
        clock.advance(1.0)
        tokens.scrape_once()
        agent.tick()
    published = from_json(to_json(publisher.telemetries[-1]))
    pod_rate = served[-1] - served[-2]  # tokens over the last 1 s scrape interval
    shares = [g.tokens_s for g in published.gpus]
    assert all(share is not None and share > 0 for share in shares)
    assert sum(shares) == pytest.approx(pod_rate, abs=0.2)  # each rounded to 0.1 tokens/s
    power = [g.power_w for g in published.gpus]
    assert power[0] > power[1]
    assert shares[0] / shares[1] == pytest.approx(power[0] / power[1], rel=0.01)
