"""The agent's /metrics (linted by promtool; dcgm-exporter's GPU labels, the pod and policy
of each GPU, energy), /healthz and /status over HTTP."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.agent import Agent, AgentSettings
from nodeagent.energy import ENERGY_READ_INTERVAL_S
from nodeagent.gpus import NoPermission, NotSupported
from nodeagent.metrics import AgentMetrics, agent_routes
from nodeagent.podresources import PodResourcesSource
from powercap.runtime.httpserver import HttpServer
from nodeagent.simulated import ManualClock, SimulatedBackend
from powercap import physics
from tests.agenthelpers import NODE, StaticSource, pod, policy, series_value
from tests.metrics_catalog import documented_promql
from tests.promtool import metrics_lint_problems, promtool
from tests.fakes.kubelet import FakeKubelet


class Running:
    def __init__(self, pod_resources: PodResourcesSource | None = None) -> None:
        self.clock = ManualClock(1000.0)
        self.backend = SimulatedBackend([physics.H200_LIKE] * 2, clock=self.clock)
        self.uuids = [d.uuid for d in self.backend.devices()]
        self.source = StaticSource()
        self.source.set(policy(caps_w={self.uuids[0]: 400, self.uuids[1]: 500}))
        self.metrics = AgentMetrics()
        self.agent = Agent(self.backend, self.source, AgentSettings(node=NODE), metrics=self.metrics, clock=self.clock,
                           pod_resources=pod_resources)
        self.server = HttpServer("127.0.0.1", 0, agent_routes(self.metrics, self.agent.healthy, self.agent.status))
        self.server.start()

    def scrape(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        self.agent.tick()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.server.port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running()
    yield r
    r.server.stop()


def test_metrics_pass_promtool_lint(running: Running) -> None:
    running.backend.inject_error("set_power_limit_w", NoPermission, index=1)
    for _ in range(3):
        running.clock.advance(1.0)
        running.agent.tick()
    status, body = running.get("/metrics")
    assert status == 200
    text = body.decode()
    for name in (
        "powercap_gpu_power_watts", "powercap_gpu_power_limit_watts", "powercap_gpu_temperature_celsius",
        "powercap_cap_changes_total", "powercap_nvml_errors_total", "powercap_agent_tick_duration_seconds",
        "powercap_gpu_degraded", "powercap_gpu_tokens_per_joule",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert series_value(text, "powercap_nvml_errors_total", UUID="GPU-sim-0001", gpu="1", error="NoPermission") == 1
    assert metrics_lint_problems(text) == []


def test_healthz_follows_the_ticks(running: Running) -> None:
    assert running.get("/healthz")[0] == 503  # no tick yet
    running.agent.tick()
    assert running.get("/healthz") == (200, b"ok\n")
    running.clock.advance(10.0)
    assert running.get("/healthz")[0] == 503


def test_status_names_degraded_gpus(running: Running) -> None:
    running.backend.inject_error("snapshot", NoPermission, index=0)
    running.agent.tick()
    status, body = running.get("/status")
    document = json.loads(body)
    assert status == 200 and document["node"] == NODE
    assert [(g["index"], g["degraded"]) for g in document["gpus"]] == [(0, True), (1, False)]
    assert "NoPermission" in document["gpus"][0]["error"]
    # GPU 0 still holds its 700 W default (read alone): GPU 1 makes room, 900 - 700 W
    assert (document["gpus"][0]["capW"], document["gpus"][0]["countedW"]) == (700, 700)
    assert (document["gpus"][1]["capW"], document["gpus"][1]["plannedW"]) == (200, 200)
    llama = document["policies"]["inference/llama"]
    assert (llama["allowanceW"], llama["heldW"], llama["clamped"]) == (900, 700, True)
    assert llama["problem"] == "700 W held by GPUs that cannot move: the others clamped from 500 W to 200 W"


def test_unreadable_policies_are_a_metric_and_on_status(running: Running) -> None:
    running.source.set(policy(caps_w={}), unreadable={"inference/llama": "spec.powerCapLimit: is required"})
    running.agent.tick()
    text = running.get("/metrics")[1].decode()
    assert 'powercap_agent_policy_unreadable{policy="inference/llama"} 1.0' in text
    document = json.loads(running.get("/status")[1])
    assert document["unreadablePolicies"] == {"inference/llama": "spec.powerCapLimit: is required"}
    assert document["policies"]["inference/llama"]["problem"] == "unreadable, caps held: spec.powerCapLimit: is required"
    running.source.set(policy(caps_w={}))
    running.agent.tick()
    assert "powercap_agent_policy_unreadable{" not in running.get("/metrics")[1].decode()


ENERGY_READ_INTERVAL_TICKS = int(ENERGY_READ_INTERVAL_S)  # 1 s ticks
POD_UID = "6f1d2c3b-0000-4000-8000-00000000abcd"


def serving_pod() -> dict[str, Any]:
    """inference/llama-0: its container "server" asks for the GPU, a sidecar does not."""
    llama = pod(POD_UID)
    llama["spec"]["containers"] = [{"name": "server", "resources": {"limits": {"nvidia.com/gpu": "1"}}},
                                   {"name": "metrics-proxy"}]
    return llama


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    served = FakeKubelet().start()
    yield served
    served.remove()


@pytest.fixture
def serving(kubelet: FakeKubelet) -> Iterator[Running]:
    """An agent after one tick: both GPUs allocated to inference/llama, GPU 1 given by the
    kubelet to llama-0's container "server", GPU 0 to no pod yet."""
    running = Running(PodResourcesSource(kubelet.socket_path))
    kubelet.assignments = {"inference/llama-0": {"server": {"nvidia.com/gpu": [running.uuids[1]]}}}
    running.source.set(policy(caps_w={running.uuids[0]: 400, running.uuids[1]: 500}), pods={POD_UID: serving_pod()})
    running.tick()
    yield running
    running.server.stop()


def test_gpu_series_carry_dcgm_exporters_labels_and_the_pod_and_policy_of_the_gpu(serving: Running) -> None:
    text = serving.scrape()
    gpu_1 = {"gpu": "1", "UUID": serving.uuids[1], "modelName": "H200-like", "Hostname": NODE}
    assert series_value(text, "powercap_gpu_info", **gpu_1, pod="llama-0", namespace="inference",
                        container="server", policy="llama") == 1
    assert series_value(text, "powercap_gpu_power_limit_watts", **gpu_1, pod="llama-0", namespace="inference",
                        container="server") == 500
    # GPU 0 is in the policy's allocation with no pod on it yet
    assert series_value(text, "powercap_gpu_info", gpu="0", UUID=serving.uuids[0], pod="", container="",
                        namespace="inference", policy="llama") == 1
    assert series_value(text, "powercap_gpu_degraded", **gpu_1) == 0


def test_a_gpu_whose_pod_left_keeps_no_series_of_that_pod(serving: Running, kubelet: FakeKubelet) -> None:
    assert series_value(serving.scrape(), "powercap_gpu_info", gpu="1", pod="llama-0") == 1
    kubelet.assignments = {}
    serving.source.set(policy(caps_w={}))
    serving.tick()
    text = serving.scrape()
    assert series_value(text, "powercap_gpu_info", gpu="1", pod="llama-0") is None
    assert series_value(text, "powercap_gpu_power_watts", gpu="1", pod="llama-0") is None
    assert series_value(text, "powercap_gpu_info", gpu="1") == 1  # one series: no pod, no policy
    assert series_value(text, "powercap_gpu_info", gpu="1", pod="", policy="") == 1


def test_energy_comes_from_nvmls_counter_every_few_seconds(running: Running) -> None:
    running.tick()
    start_j = running.backend.total_energy_j(0)
    for _ in range(ENERGY_READ_INTERVAL_TICKS):
        running.tick()
    used_j = running.backend.total_energy_j(0) - start_j
    assert used_j > 0
    assert series_value(running.scrape(), "powercap_gpu_energy_joules_total", gpu="0") == pytest.approx(used_j)


def test_counters_of_a_gpu_in_use_carry_empty_pod_labels_so_prometheus_keeps_them_off_the_agent(serving: Running) -> None:
    """GPU 1 serves llama-0; its counters and degraded gauge still name no pod, but they name the
    pod labels (empty): a Prometheus honoring labels adds the target's pod, namespace and
    container only to a series that lacks them, which would file the GPU's energy under the
    agent's own pod in powercap-system."""
    serving.tick()
    text = serving.scrape()
    assert series_value(text, "powercap_gpu_power_watts", gpu="1", pod="llama-0") is not None
    for name in ("powercap_gpu_energy_joules_total", "powercap_gpu_degraded"):
        (line,) = [line for line in text.splitlines() if line.startswith(name + "{") and 'gpu="1"' in line]
        assert 'pod=""' in line and 'namespace=""' in line and 'container=""' in line, line


def test_energy_without_an_nvml_counter_is_power_integrated_over_the_ticks(running: Running) -> None:
    running.backend.inject_error("total_energy_j", NotSupported, index=1)
    powers_w: list[float] = []
    for _ in range(4):
        running.tick()
        power_w = series_value(running.scrape(), "powercap_gpu_power_watts", gpu="1")
        assert power_w is not None
        powers_w.append(power_w)
    trapezoids_j = sum((a + b) / 2 * 1.0 for a, b in zip(powers_w, powers_w[1:]))
    assert trapezoids_j > 0
    assert series_value(running.scrape(), "powercap_gpu_energy_joules_total", gpu="1") == pytest.approx(trapezoids_j)


def test_the_documented_dcgm_join_names_each_gpus_policy(serving: Running, tmp_path: Path) -> None:
    """docs/metrics.md's first join, run by promtool on dcgm-exporter's power series and the
    agent's powercap_gpu_info as scraped (honorLabels: the agent's own labels kept): each
    GPU's watts go to its policy; a GPU powercap does not know stays out."""
    scraped, uuids = serving.scrape(), serving.uuids
    target = 'job="powercap-system/powercap-agent", instance="10.0.0.3:9402", node="gpu-node-1"'
    info = [f"{{{target}, {labels}}}" for labels in (
        ", ".join(f'{name}="{value}"' for name, value in sample.labels.items())
        for family in text_string_to_metric_families(scraped) for sample in family.samples
        if sample.name == "powercap_gpu_info"
    )]
    dcgm_target = 'job="gpu-operator/nvidia-dcgm-exporter", instance="10.0.0.4:9400"'
    dcgm = [
        (f'{{{dcgm_target}, gpu="0", UUID="{uuids[0]}", device="nvidia0", modelName="H200-like", '
         f'Hostname="{NODE}", pod="", namespace="", container=""}}', 300),
        (f'{{{dcgm_target}, gpu="1", UUID="{uuids[1]}", device="nvidia1", modelName="H200-like", '
         f'Hostname="{NODE}", pod="llama-0", namespace="inference", container="server"}}', 500),
        (f'{{{dcgm_target}, gpu="0", UUID="GPU-elsewhere", device="nvidia0", modelName="H200-like", '
         f'Hostname="gpu-node-9", pod="", namespace="", container=""}}', 650),
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "join", "rules": [
        {"record": "policy:dcgm_power_watts:sum", "expr": documented_promql()[0]},
    ]}]}))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": f"powercap_gpu_info{labels}", "values": "1x5"} for labels in info]
            + [{"series": f"DCGM_FI_DEV_POWER_USAGE{labels}", "values": f"{watts}x5"} for labels, watts in dcgm],
            "promql_expr_test": [{
                "expr": "policy:dcgm_power_watts:sum",
                "eval_time": "2m",
                "exp_samples": [{"labels": 'policy:dcgm_power_watts:sum{namespace="inference", policy="llama"}',
                                 "value": 800}],
            }],
        }],
    }))
    result = subprocess.run([promtool(), "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
