"""``powercap agent`` as a process: pynvml loading the fake library by name, SIGTERM,
--restore-on-exit, --dry-run, and start-up failures with their exit status."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agenthelpers import AGENT, AgentProcess, policy_document, wait_until
from tests.fakes.nvml import FakeNvml


def write_policy(path: Path, cap_w: int = 800, **spec: Any) -> Path:
    path.write_text(yaml.safe_dump(policy_document("llama", cap_w=cap_w, **spec)))
    return path


def start_agent(tmp_path: Path, env: dict[str, str], *args: str) -> AgentProcess:
    command = [*AGENT, "--node", "n1", "--interval", "0.1", "--metrics-bind", "127.0.0.1:0"]
    command += ["--state-file", str(tmp_path / "state.json"), *args]
    return AgentProcess(command, env)



@pytest.fixture
def fake(fake_nvml_subprocess: FakeNvml) -> FakeNvml:
    """Two GPUs at their 700 W default, for a child process."""
    return fake_nvml_subprocess.set_count(2)


@pytest.mark.parametrize("restore", [False, True], ids=["sigterm-keeps-caps", "restore-on-exit"])
def test_sigterm(fake: FakeNvml, tmp_path: Path, restore: bool) -> None:
    policy_file = write_policy(tmp_path / "policy.yaml", cap_w=800)
    extra = ["--restore-on-exit"] if restore else []
    process = start_agent(tmp_path, fake.env(), "--backend", "nvml", "--policy", str(policy_file), *extra)
    wait_until(lambda: len(fake.logged_set_calls()) == 2)
    code, lines = process.stop()
    calls = [(c.gpu, c.limit_mw, c.rc) for c in fake.logged_set_calls()]
    assert code == 0
    assert calls[:2] == [(0, 400000, 0), (1, 400000, 0)]  # the whole 800 W powerCapLimit, split over 2 GPUs
    assert calls[2:] == ([(0, 700000, 0), (1, 700000, 0)] if restore else [])
    changes = [line for line in lines if line["message"] == "power cap changed"]
    assert {(c["gpu_index"], c["old_w"], c["new_w"], c["policy"]) for c in changes[:2]} == {
        (0, 700.0, 400.0, "inference/llama"), (1, 700.0, 400.0, "inference/llama"),
    }
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["gpus"]) == (0 if restore else 2)


def test_policy_file_edit_reaches_the_gpus(fake: FakeNvml, tmp_path: Path) -> None:
    policy_file = write_policy(tmp_path / "policy.yaml", cap_w=800)
    process = start_agent(tmp_path, fake.env(), "--backend", "nvml", "--policy", str(policy_file))
    try:
        wait_until(lambda: len(fake.logged_set_calls()) == 2)
        write_policy(policy_file, cap_w=600)
        wait_until(lambda: len(fake.logged_set_calls()) == 4)
    finally:
        code, _ = process.stop()
    assert code == 0
    assert [c.limit_mw for c in fake.logged_set_calls()[2:]] == [300000, 300000]  # floor(600 / 2)


@pytest.mark.parametrize(
    ("flags", "spec"),
    [
        pytest.param(["--dry-run"], {}, id="dry-run"),
        pytest.param([], {"mode": "Observe"}, id="observe-mode"),
    ],
)
def test_never_sets(fake: FakeNvml, tmp_path: Path, flags: list[str], spec: dict[str, Any]) -> None:
    policy_file = write_policy(tmp_path / "policy.yaml", cap_w=800, **spec)
    process = start_agent(tmp_path, fake.env(), "--backend", "nvml", "--policy", str(policy_file), *flags)
    wait_until(lambda: sum(line["message"] == "power cap not set (observe)" for line in process.lines) == 2)
    time.sleep(0.5)  # a few more ticks
    code, lines = process.stop()
    assert code == 0
    assert fake.logged_set_calls() == []
    observed = [line for line in lines if line["message"] == "power cap not set (observe)"]
    assert {(o["gpu_index"], o["new_w"]) for o in observed} == {(0, 400.0), (1, 400.0)}  # floor(800 / 2)


def test_simulated_single_server_runs_without_kubernetes(tmp_path: Path) -> None:
    policy_file = write_policy(tmp_path / "policy.yaml", cap_w=1000)
    env = {"POWERCAP_SIMULATED_GPUS": "2", "KUBECONFIG": str(tmp_path / "absent")}
    process = start_agent(tmp_path, env, "--backend", "simulated", "--policy", str(policy_file))
    wait_until(lambda: (tmp_path / "state.json").exists())
    code, lines = process.stop()
    assert code == 0
    assert sorted(json.loads((tmp_path / "state.json").read_text())["gpus"][u]["capW"] for u in ("GPU-sim-n1-0000", "GPU-sim-n1-0001")) == [500, 500]  # floor(1000 / 2)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(["--backend", "simulated", "--policy", "/nonexistent/policy.yaml"], 2, "/nonexistent/policy.yaml: no such file", id="policy-missing"),
        pytest.param(["--backend", "nvml", "--policy", "/dev/null"], 1, "cannot start the nvml backend", id="no-nvml-library"),
        pytest.param(["--backend", "simulated", "--inlet", "thermometer"], 2, "inlet spec", id="bad-inlet"),
        pytest.param(["--backend", "simulated", "--interval", "0"], 2, "--interval", id="bad-interval"),
        pytest.param(["--backend", "simulated", "--rack-label", "racks/of/gpus"], 2,
                     "argument --rack-label: label key prefix", id="bad-rack-label"),
        pytest.param(["--backend", "simulated", "POWERCAP_SIMULATED_GPUS=0"], 2,
                     "$POWERCAP_SIMULATED_GPUS: '0' is not a GPU count from 1 to 64", id="simulated-no-gpus"),
        pytest.param(["--backend", "simulated", "POWERCAP_SIMULATED_GPU_MODEL=B200"], 2,
                     "$POWERCAP_SIMULATED_GPU_MODEL: unknown GPU model 'B200'; models: H200-like, L40S-like",
                     id="simulated-unknown-model"),
    ],
)
def test_bad_configuration_stops_at_start_up(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path), "KUBECONFIG": str(tmp_path / "absent")}
    env.update(arg.split("=", 1) for arg in args if arg.startswith("POWERCAP_"))
    args = [arg for arg in args if not arg.startswith("POWERCAP_")]
    result = subprocess.run([*AGENT, *args], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == code
    assert message in result.stderr


def test_invalid_policy_file_names_the_field(tmp_path: Path) -> None:
    policy_file = write_policy(tmp_path / "policy.yaml", cap_w=-1)
    result = subprocess.run(
        [*AGENT, "--backend", "simulated", "--policy", str(policy_file)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "spec.powerCapLimit" in result.stderr
