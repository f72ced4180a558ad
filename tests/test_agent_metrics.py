"""The agent's /metrics (linted by promtool), /healthz and /status over HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.agent import Agent, AgentSettings
from nodeagent.gpus import NoPermission
from nodeagent.metrics import AgentMetrics, agent_routes
from powercap.runtime.httpserver import HttpServer
from nodeagent.simulated import ManualClock, SimulatedBackend
from powercap import physics
from tests.agenthelpers import NODE, StaticSource, policy


def promtool() -> str:
    """promtool on PATH or beside the venv's python (scripts/test.sh puts it there)."""
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    assert found, "promtool not found: scripts/test.sh installs it from Debian's prometheus package"
    return found


class Running:
    def __init__(self) -> None:
        self.clock = ManualClock(1000.0)
        self.backend = SimulatedBackend([physics.H200_LIKE] * 2, clock=self.clock)
        uuids = [d.uuid for d in self.backend.devices()]
        self.source = StaticSource()
        self.source.set(policy(caps_w={uuids[0]: 400, uuids[1]: 500}))
        self.metrics = AgentMetrics()
        self.agent = Agent(self.backend, self.source, AgentSettings(node=NODE), metrics=self.metrics, clock=self.clock)
        self.server = HttpServer("127.0.0.1", 0, agent_routes(self.metrics, self.agent.healthy, self.agent.status))
        self.server.start()

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
    assert 'powercap_nvml_errors_total{error="NoPermission",gpu="GPU-sim-0001"} 1.0' in text
    lint = subprocess.run([promtool(), "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()


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
