"""Tokens/s and requests waiting from a pod's Prometheus endpoint: URL, parsing, rates,
resets, the queue gauge, failures, and the ratio loop and telemetry they feed, end to end on
the simulated backend."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nodeagent.agent import Agent, AgentSettings
from nodeagent.simulated import ManualClock, SimulatedBackend
from nodeagent import tokens as tokens_module
from nodeagent.tokens import (
    CounterSample,
    TokenRates,
    counter_rate,
    counter_total,
    gauge_count,
    http_fetch,
    metrics_url,
    sample_values,
)
from powercap import physics
from powercap.telemetry import from_json, to_document, to_json
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
    samples = sample_values(VLLM, {"vllm:generation_tokens_total", "sglang:generation_tokens_total"})
    assert counter_total(samples.get("vllm:generation_tokens_total", [])) == 1500.0
    assert counter_total(samples.get("sglang:generation_tokens_total", [])) is None


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


@contextlib.contextmanager
def serving(answer: Callable[[], str | int]) -> Iterator[str]:
    """A real HTTP endpoint on a local socket; each GET serves ``answer()``: an exposition
    text, or an HTTP status to fail with. Yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            reply = answer()
            if isinstance(reply, int):
                self.send_error(reply)
                return
            data = reply.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def vllm_server() -> Iterator[tuple[str, list[float]]]:
    """A real HTTP endpoint serving a counter the test sets (``tokens[0]``)."""
    tokens = [0.0]
    with serving(lambda: body(tokens[0])) as url:
        yield url, tokens


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
    target 3.0 +- 5 % makes the agent step its cap down until the ratio is in the band. The
    steps are not published at once (only lowers the controller waits for are)."""
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
    publisher = RecordingPublisher()
    agent = Agent(backend, source, AgentSettings(node=NODE), publisher=publisher, tokens=tokens, clock=clock, proc_root=proc)
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
    assert not any(publisher.lowered), "the loop's steps wait for the publisher's minimum interval"



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
    shares = [g.tokens_s for g in published.gpus if g.tokens_s is not None]
    assert len(shares) == 2 and all(share > 0 for share in shares)
    assert sum(shares) == pytest.approx(pod_rate, abs=0.2)  # each rounded to 0.1 tokens/s
    power = [g.power_w for g in published.gpus]
    assert power[0] > power[1]
    assert shares[0] / shares[1] == pytest.approx(power[0] / power[1], rel=0.01)


# -- requests waiting (vLLM's queue gauge) ---------------------------------------------------

def vllm_body(tokens: float, *waiting: str) -> str:
    """A vLLM-like exposition: the tokens counter and, per model, the requests-waiting gauge
    with the value written as given (``"3"``, ``"NaN"``); no gauge when ``waiting`` is empty."""
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="llama-70b"} 12.0\n'
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        f'vllm:generation_tokens_total{{model_name="llama-70b"}} {tokens}\n'
    )
    if waiting:
        text += "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        text += "# TYPE vllm:num_requests_waiting gauge\n"
        models = ("llama-70b", "llama-8b", "mistral-7b")
        text += "".join(f'vllm:num_requests_waiting{{model_name="{m}"}} {v}\n' for m, v in zip(models, waiting))
    return text


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, list[str | int]]]:
    """A real HTTP endpoint serving ``served[0]``: an exposition text, or an HTTP status to fail with."""
    served: list[str | int] = [vllm_body(0.0)]
    with serving(lambda: served[0]) as url:
        yield url, served


@pytest.mark.parametrize(
    ("values", "count"),
    [
        pytest.param([3.0, 4.0], 7, id="summed-over-models"),
        pytest.param([0.0], 0, id="zero-is-a-value"),
        pytest.param([], None, id="no-gauge"),
        pytest.param([2.0, -1.0], None, id="negative"),
        pytest.param([math.nan], None, id="nan"),
        pytest.param([2.0, math.inf], None, id="infinite"),
        pytest.param([2.4], 2, id="rounds-down"),
        pytest.param([0.5], 1, id="half-rounds-up"),
        pytest.param([1.5, 1.0], 3, id="half-of-a-sum-rounds-up"),
        pytest.param([1e30], 2**31 - 1, id="clamped-to-int32"),
    ],
)
def test_gauge_count(values: list[float], count: int | None) -> None:
    assert gauge_count(values) == count


@pytest.mark.parametrize(
    ("waiting", "expected"),
    [
        pytest.param(("3", "4"), 7, id="two-models"),
        pytest.param(("0",), 0, id="none-waiting"),
        pytest.param((), None, id="no-gauge-older-vllm"),
        pytest.param(("5", "-1"), None, id="negative"),
        pytest.param(("NaN",), None, id="nan"),
        pytest.param(("+Inf",), None, id="infinite"),
        pytest.param(("2.6",), 3, id="rounded"),
    ],
)
def test_requests_waiting_over_real_http(
    metrics_server: tuple[str, list[str | int]], waiting: tuple[str, ...], expected: int | None
) -> None:
    """Whatever the gauge says, the tokens/s rate from the same body still works."""
    url, served = metrics_server
    clock = ManualClock(0.0)
    scraper = TokenRates(fetch=http_fetch, clock=clock)
    scraper.set_targets({UID: url})
    served[0] = vllm_body(1000.0, *waiting)
    scraper.scrape_once()
    assert scraper.requests_waiting() == ({} if expected is None else {UID: expected})
    served[0], clock.now_s = vllm_body(3500.0, *waiting), 5.0
    scraper.scrape_once()
    assert scraper.rates() == {UID: 500.0}
    assert scraper.requests_waiting() == ({} if expected is None else {UID: expected})


def test_one_parse_serves_both_metrics(metrics_server: tuple[str, list[str | int]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, served = metrics_server
    served[0] = vllm_body(10.0, "1", "2")
    parses: list[str] = []
    real_parser = tokens_module.text_string_to_metric_families

    def counting_parser(text: str) -> Any:
        parses.append(text)
        return real_parser(text)

    monkeypatch.setattr(tokens_module, "text_string_to_metric_families", counting_parser)
    scraper = TokenRates(fetch=http_fetch, clock=ManualClock(0.0))
    scraper.set_targets({UID: url})
    scraper.scrape_once()
    assert scraper.requests_waiting() == {UID: 3}
    assert len(parses) == 1


def test_the_waiting_metric_is_configurable(metrics_server: tuple[str, list[str | int]]) -> None:
    url, served = metrics_server
    served[0] = vllm_body(10.0, "4") + "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs 9\n"
    scraper = TokenRates(fetch=http_fetch, clock=ManualClock(0.0), waiting_metric="sglang:num_queue_reqs")
    scraper.set_targets({UID: url})
    scraper.scrape_once()
    assert scraper.requests_waiting() == {UID: 9}


def test_the_latest_gauge_wins_and_goes_stale_after_three_intervals(metrics_server: tuple[str, list[str | int]]) -> None:
    url, served = metrics_server
    clock = ManualClock(0.0)
    scraper = TokenRates(fetch=http_fetch, clock=clock, interval_s=5.0)
    scraper.set_targets({UID: url})
    served[0] = vllm_body(10.0, "6")
    scraper.scrape_once()
    served[0] = vllm_body(20.0, "2", "0")
    clock.advance(5.0)
    scraper.scrape_once()
    assert scraper.requests_waiting() == {UID: 2}
    clock.advance(15.0)
    assert scraper.requests_waiting() == {UID: 2}
    clock.advance(0.5)
    assert scraper.requests_waiting() == {}


def test_a_gauge_that_turns_invalid_is_forgotten(metrics_server: tuple[str, list[str | int]]) -> None:
    url, served = metrics_server
    scraper = TokenRates(fetch=http_fetch, clock=ManualClock(0.0))
    scraper.set_targets({UID: url})
    served[0] = vllm_body(10.0, "6")
    scraper.scrape_once()
    served[0] = vllm_body(20.0, "NaN")
    scraper.scrape_once()
    assert scraper.requests_waiting() == {}
    served[0] = vllm_body(30.0)
    scraper.scrape_once()
    assert scraper.requests_waiting() == {}


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(503, id="http-error"),
        pytest.param("not prometheus {{{", id="unparsable"),
        pytest.param("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 4\n", id="gauge-without-counter"),
    ],
)
def test_a_failed_scrape_forgets_the_gauge_with_the_rate(
    metrics_server: tuple[str, list[str | int]], failure: str | int
) -> None:
    url, served = metrics_server
    clock = ManualClock(0.0)
    scraper = TokenRates(fetch=http_fetch, clock=clock)
    scraper.set_targets({UID: url})
    for tokens in (0.0, 500.0):
        served[0] = vllm_body(tokens, "4")
        scraper.scrape_once()
        clock.advance(5.0)
    assert scraper.rates() == {UID: 100.0} and scraper.requests_waiting() == {UID: 4}
    served[0] = failure
    scraper.scrape_once()
    assert scraper.rates() == {} and scraper.requests_waiting() == {}
    served[0] = vllm_body(900.0, "1")
    scraper.scrape_once()
    assert scraper.requests_waiting() == {UID: 1}  # a snapshot: one good scrape is enough
    assert scraper.rates() == {}  # the rate needs two


def test_telemetry_carries_the_pods_requests_waiting(tmp_path: Path, metrics_server: tuple[str, list[str | int]]) -> None:
    """One tensor-parallel pod on GPUs 0 and 1 exposes vLLM metrics on a real local socket;
    a second pod on GPU 2 exposes none; GPU 3 runs nothing. Each GPU of the scraped pod
    publishes the pod's queue (``requestsWaiting``, also in ``/status``); the others none."""
    url, served = metrics_server
    port = url.split(":")[2].split("/")[0]
    clock = ManualClock(0.0)
    backend = SimulatedBackend([physics.H200_LIKE] * 4, clock=clock)
    uuids = [d.uuid for d in backend.devices()]
    other = "6f1d2c3b-0000-4000-8000-00000000beef"
    scraped = pod(UID, **{"powercapping.example.com/metrics": f"{port}/metrics"})
    scraped["status"]["podIP"] = "127.0.0.1"
    source = StaticSource()
    source.set(policy(caps_w={u: 700 for u in uuids}), pods={UID: scraped, other: pod(other, name="llama-1")})
    proc = tmp_path / "proc"
    for pid, uid in ((4242, UID), (4243, UID), (4244, other)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(f"0::/kubepods/burstable/pod{uid}/0123456789abcdef0123456789abcdef\n")
    for index, pid in enumerate((4242, 4243, 4244)):
        backend.set_pids(index, [pid])
    scraper = TokenRates(fetch=http_fetch, clock=clock, interval_s=1.0)
    publisher = RecordingPublisher()
    agent = Agent(backend, source, AgentSettings(node=NODE), publisher=publisher, tokens=scraper, clock=clock, proc_root=proc)

    def tick(waiting: str) -> list[Any]:
        served[0] = vllm_body(clock.now_s * 100, waiting, "1")
        clock.advance(1.0)
        scraper.scrape_once()
        agent.tick()
        return list(to_document(from_json(to_json(publisher.telemetries[-1])))["gpus"])

    agent.tick()  # finds the pods, so the scraper knows its target
    gpus = tick("4")
    assert [g.get("requestsWaiting") for g in gpus] == [5, 5, None, None]
    assert [g["pod"] for g in gpus][:3] == ["inference/llama-0", "inference/llama-0", "inference/llama-1"]
    assert [g["requestsWaiting"] for g in agent.status()["gpus"]] == [5, 5, None, None]
    gpus = tick("-1")
    assert "requestsWaiting" not in gpus[0] and "requestsWaiting" not in gpus[1]
    gpus = tick("0")
    assert [g.get("requestsWaiting") for g in gpus] == [1, 1, None, None]
