"""Fault injection against the real ``powercap agent`` program (DESIGN.md section 1, the
fail-safe rule): the caps in force of a service sum to at most its powerCapLimit, whatever
single thing breaks.

Each test runs the agent as a subprocess on the fake libnvidia-ml.so (tests/fakes/fake_nvml.c),
in a cluster through the fake API server (tests/fakes/apiserver.py) or with ``--policy FILE``,
injects one fault, and samples the limits in force in the fake NVML every tick
(:class:`Sampler`) for the whole scenario: their sum never passes the cap, second by second.
The only samples excused are those just after the test itself raises a limit from outside
the agent (a GPU reset puts its default limit back) or lowers the cap: the agent gets
``REACT_S`` (or the stated time) to answer, which is ticks, not the whole fault.

Four H200-like GPUs (200-700 W, default 700 W). Ticks of 0.1 s; every wait is bounded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from powercap import kube
from tests.agenthelpers import (
    AGENT,
    NODE,
    AgentProcess,
    allocation_document,
    node_object,
    policy_document,
    series_value,
    wait_until,
    write_kubeconfig,
)
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.nvml import FakeNvml, NvmlReturn

TICK_S = 0.1
REACT_S = 1.0
"""How long the agent may take to answer a limit raised from outside (ten ticks)."""
PROBE_S = 5.0
"""The agent's API probe interval (nodeagent.sources.ClusterSource)."""
GPUS = 4
UUIDS = [f"GPU-fa4e0000-0000-4000-8000-{i:012x}" for i in range(GPUS)]
POLICIES = "powercappingpolicies"


class Sampler:
    """Samples the sum of the limits in force in the fake NVML every tick, on a thread.

    ``cap_w`` is the service's powerCapLimit; :meth:`lower_cap` changes it (the agent gets
    ``react_s`` to follow), :meth:`excuse` marks an outside raise. :meth:`violations`
    lists, second by second, every second whose sum passed the cap outside those windows.
    """

    def __init__(self, fake: FakeNvml, cap_w: float) -> None:
        self.fake = fake
        self.start_s = time.monotonic()
        self.caps: list[tuple[float, float]] = [(self.start_s, cap_w)]
        self.excused: list[tuple[float, float]] = []
        self.samples: list[tuple[float, tuple[float, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="limit-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            limits = self.fake.limits_in_force()
            if limits is not None:
                self.samples.append((time.monotonic(), tuple(g.limit_w for g in limits)))
            self._stop.wait(TICK_S)

    def excuse(self, react_s: float = REACT_S) -> None:
        """A limit is about to be raised from outside: the agent has ``react_s`` to answer."""
        now_s = time.monotonic()
        self.excused.append((now_s, now_s + react_s))

    def lower_cap(self, cap_w: float, react_s: float) -> None:
        """The cap was just lowered to ``cap_w``: it holds from ``react_s`` on."""
        self.caps.append((time.monotonic() + react_s, cap_w))

    def run_for(self, seconds: float) -> None:
        time.sleep(seconds)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def cap_at(self, t_s: float) -> float:
        return [cap for since_s, cap in self.caps if since_s <= t_s][-1]

    def violations(self) -> list[str]:
        """``second N: S W > C W (limits ...)``, the worst sample of each second over its cap."""
        worst: dict[int, tuple[float, float, tuple[float, ...]]] = {}
        for t_s, limits in self.samples:
            if any(start <= t_s <= end for start, end in self.excused):
                continue
            total, cap = sum(limits), self.cap_at(t_s)
            second = int(t_s - self.start_s)
            if total > cap and (second not in worst or total > worst[second][0]):
                worst[second] = (total, cap, limits)
        return [
            f"second {second}: {total:g} W > {cap:g} W (limits {', '.join(f'{w:g}' for w in limits)})"
            for second, (total, cap, limits) in sorted(worst.items())
        ]

    def assert_held(self) -> None:
        assert self.samples, "no sample of the limits in force"
        seconds = self.samples[-1][0] - self.samples[0][0]
        assert len(self.samples) >= seconds / TICK_S / 3, f"{len(self.samples)} samples in {seconds:.1f} s"
        problems = self.violations()
        assert not problems, "the sum of the caps in force passed the cap:\n" + "\n".join(problems)

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def limits_w(fake: FakeNvml) -> list[float] | None:
    limits = fake.limits_in_force()
    return None if limits is None else [g.limit_w for g in limits]


def wait_for_limits(fake: FakeNvml, expected: list[float], timeout_s: float = 10.0) -> None:
    try:
        wait_until(lambda: limits_w(fake) == expected, timeout_s)
    except AssertionError:
        raise AssertionError(f"limits {limits_w(fake)}, expected {expected} within {timeout_s:g} s") from None


@pytest.fixture
def fake(fake_nvml_subprocess: FakeNvml) -> FakeNvml:
    """Four H200-like GPUs at their 700 W default, drawing 300 W at 50 degC."""
    fake_nvml_subprocess.set_count(GPUS)
    for index in range(GPUS):
        fake_nvml_subprocess.set_power_w(index, 300).set_temperature_c(index, 50)
    return fake_nvml_subprocess


def start_agent(tmp_path: Path, fake: FakeNvml, *args: str, env: dict[str, str] | None = None) -> AgentProcess:
    command = [*AGENT, "--node", NODE, "--backend", "nvml", "--interval", str(TICK_S),
               "--metrics-bind", "127.0.0.1:0", "--state-file", str(tmp_path / "state.json"), *args]
    return AgentProcess(command, {**fake.env(), **(env or {})})


def start_in_cluster(tmp_path: Path, fake: FakeNvml, apiserver: FakeApiServer) -> AgentProcess:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", apiserver.url)
    env = {"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""}
    return start_agent(tmp_path, fake, "--pod-resources-socket", "none", env=env)


def start_with_file(tmp_path: Path, fake: FakeNvml, cap_w: int) -> AgentProcess:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_document("llama", cap_w=cap_w)))
    return start_agent(tmp_path, fake, "--policy", str(path))


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents a test started; stopped after it, whatever happened."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def cluster_policy(cap_w: int, caps_w: list[int], **spec: Any) -> dict[str, Any]:
    return allocation_document("llama", dict(zip(UUIDS, caps_w)), cap_w=cap_w, **spec)


def recorded_caps_w(tmp_path: Path) -> dict[str, float]:
    document = json.loads((tmp_path / "state.json").read_text())
    return {uuid: gpu["capW"] for uuid, gpu in document["gpus"].items()}


def metric(agent: AgentProcess, name: str, **labels: str) -> float | None:
    return series_value(agent.get("/metrics").decode(), name, **labels)


# -- 1. a policy the agent's validator refuses ---------------------------------------------


def test_invalid_policy_keeps_its_caps_and_an_unreadable_one_holds_them(
    apiserver: FakeApiServer, fake: FakeNvml, tmp_path: Path, agents: list[AgentProcess],
) -> None:
    """An algorithm installed in the webhook's image but not in the agent's used to make the
    policy 'invalid', its GPUs 'unowned' and their defaults restored: 4 x 700 W under 1000 W."""
    apiserver.put_object("nodes", node_object())
    apiserver.put_object(POLICIES, cluster_policy(1000, [242] * GPUS))
    agent = start_in_cluster(tmp_path, fake, apiserver)
    agents.append(agent)
    wait_for_limits(fake, [242] * GPUS)
    with Sampler(fake, 1000) as sampler:
        plugin = cluster_policy(1000, [242] * GPUS, customAlgorithm={"name": "vendor-packing", "parameters": {"density": 3}})
        apiserver.put_object(POLICIES, plugin)
        sampler.run_for(2.0)
        assert limits_w(fake) == [242] * GPUS
        unreadable = cluster_policy(1000, [242] * GPUS)
        del unreadable["spec"]["powerCapLimit"]
        apiserver.put_object(POLICIES, unreadable)
        wait_until(lambda: "inference/llama" in agent.status()["unreadablePolicies"], 5.0)
        sampler.run_for(2.0)
    sampler.assert_held()
    assert limits_w(fake) == [242] * GPUS
    assert "powerCapLimit" in agent.status()["unreadablePolicies"]["inference/llama"]
    assert metric(agent, "powercap_agent_policy_unreadable", policy="inference/llama") == 1.0
    assert len(agent.logged("policy unreadable: holding the caps of its GPUs")) == 1
    assert len(agent.logged("policy refused by this agent's validator: enforcing its cap, selector and allocations")) == 1
    assert len(agent.logged("power cap changed")) == GPUS  # the first caps, then not one write


# -- 2. a GPU that fails enumeration at start ----------------------------------------------


def test_gpu_failing_enumeration_counts_at_its_maximum_and_joins_when_it_answers(
    fake: FakeNvml, tmp_path: Path, agents: list[AgentProcess],
) -> None:
    """The agent restarts while GPU 3 does not enumerate. It used to split the cap over the
    three others (3 x 333 W + the 250 W GPU 3 still held = 1249 W under 1000 W)."""
    first = start_with_file(tmp_path, fake, 1000)
    wait_for_limits(fake, [250] * GPUS)  # the whole 1000 W powerCapLimit over four GPUs
    assert first.stop()[0] == 0
    held = limits_w(fake)
    assert held is not None
    for index, watts in enumerate(held):  # the driver keeps the limits across the agent's restart
        fake.set_limit_w(index, watts)
    fake.inject_error("nvmlDeviceGetHandleByIndex_v2", NvmlReturn.GPU_IS_LOST, gpu=3)
    with Sampler(fake, 1000) as sampler:
        second = start_with_file(tmp_path, fake, 1000)
        agents.append(second)
        sampler.run_for(2.0)
        # GPU 3 counts at its maximum (700 W, unknown limit): the others go to their minimum
        # (floor((1000 - 700) / 3) = 100 W is under it); GPU 3 still holds its 250 W
        assert limits_w(fake) == [200, 200, 200, 250]
        gpus = second.status()["gpus"]
        assert [(g["index"], g["uuid"], g["degraded"]) for g in gpus][3] == (3, None, True)
        fake.clear_errors()
        wait_for_limits(fake, [250] * GPUS, timeout_s=15.0)  # re-enumerated: it joins the split
        sampler.run_for(1.0)
    sampler.assert_held()
    assert len(second.logged("GPU joined")) == 1


# -- 3. a GPU reset while the policy view is stale -----------------------------------------


def test_gpu_reset_while_the_view_is_stale_returns_to_its_recorded_cap(
    apiserver: FakeApiServer, fake: FakeNvml, tmp_path: Path, agents: list[AgentProcess],
) -> None:
    """It used to be held at 700 W while the view was stale (3 x 242 + 700 = 1426 W under 1000
    W) and its record in the state file overwritten with 700 W."""
    apiserver.put_object("nodes", node_object())
    apiserver.put_object(POLICIES, cluster_policy(1000, [242] * GPUS))
    agent = start_in_cluster(tmp_path, fake, apiserver)
    agents.append(agent)
    wait_for_limits(fake, [242] * GPUS)
    with Sampler(fake, 1000) as sampler:
        apiserver.stop()
        wait_until(lambda: agent.status()["policyFresh"] is False, 45.0)
        sampler.excuse()
        fake.set_limit_w(0, 700)  # a GPU reset: the driver puts the default limit back
        sampler.run_for(2.0)
    sampler.assert_held()
    assert limits_w(fake) == [242] * GPUS
    assert recorded_caps_w(tmp_path) == dict.fromkeys(UUIDS, 242)
    assert [line["reason"] for line in agent.logged("power cap changed")][-1] == "driver-reset"


# -- 4. the policy watch dies ---------------------------------------------------------------


def test_dead_policy_watch_is_not_fresh_and_a_lowered_cap_still_arrives(
    apiserver: FakeApiServer, fake: FakeNvml, tmp_path: Path, agents: list[AgentProcess],
) -> None:
    """Every watch of policies fails while GETs answer. The view used to stay fresh on the
    Node probe alone and a lowered cap never arrived: 4 x 388 W under 1000 W for the whole
    fault. Now the view is stale while the watch is down and the agent LISTs policies."""
    apiserver.put_object("nodes", node_object())
    apiserver.put_object(POLICIES, cluster_policy(1600, [388] * GPUS))
    agent = start_in_cluster(tmp_path, fake, apiserver)
    agents.append(agent)
    wait_for_limits(fake, [388] * GPUS)
    with Sampler(fake, 1600) as sampler:
        apiserver.fail_next(1_000_000, 500, path=kube.policy_path(), watch=True)
        apiserver.close_watches()
        sampler.run_for(1.0)
        apiserver.put_object(POLICIES, cluster_policy(1000, [242] * GPUS))
        sampler.lower_cap(1000, react_s=PROBE_S + 2.0)
        sampler.run_for(PROBE_S + 4.0)
    sampler.assert_held()
    assert limits_w(fake) == [242] * GPUS
    lists = apiserver.requests_to("GET", kube.policy_path(), watch=False)
    assert len(lists) >= 2, "the policies were listed again while their watch was down"


# -- 5. allocations that pass the budget -----------------------------------------------------


def test_allocations_over_the_budget_are_clamped(
    apiserver: FakeApiServer, fake: FakeNvml, tmp_path: Path, agents: list[AgentProcess],
) -> None:
    """status.allocations says 4 x 700 W under a 1000 W cap: it used to be enforced as is."""
    apiserver.put_object("nodes", node_object())
    apiserver.put_object(POLICIES, cluster_policy(1000, [700] * GPUS))
    with Sampler(fake, 1000) as sampler:
        sampler.excuse(5.0)  # the GPUs start at their default, before the agent's first fresh tick
        agent = start_in_cluster(tmp_path, fake, apiserver)
        agents.append(agent)
        sampler.run_for(6.0)
    sampler.assert_held()
    # scaled by budget / sum = 1000 / 2800 (the whole powerCapLimit), floored: 250 W, never under the 200 W minimum
    assert limits_w(fake) == [250] * GPUS
    warnings = agent.logged("allocations pass the policy's budget: clamped")
    assert len(warnings) == 1 and warnings[0]["allocated_w"] == 2800 and warnings[0]["budget_w"] == 1000


# -- 6. a GPU whose setter fails --------------------------------------------------------------


def test_gpu_whose_set_fails_counts_at_its_limit_and_the_others_make_room(
    fake: FakeNvml, tmp_path: Path, agents: list[AgentProcess],
) -> None:
    """GPU 0 is reset and its setter answers NoPermission: it used to keep 700 W while the
    others kept 400 W (1900 W under 1600 W), /status showing its planned cap."""
    agent = start_with_file(tmp_path, fake, 1600)
    agents.append(agent)
    wait_for_limits(fake, [400] * GPUS)  # floor(1600 / 4)
    with Sampler(fake, 1600) as sampler:
        fake.inject_error("nvmlDeviceSetPowerManagementLimit", NvmlReturn.NO_PERMISSION, gpu=0)
        sampler.excuse()
        fake.set_limit_w(0, 700)
        sampler.run_for(3.0)
    sampler.assert_held()
    # room for the others: 1600 - 700 = 900 W, 300 W each
    assert limits_w(fake) == [700, 300, 300, 300]
    gpu0 = agent.status()["gpus"][0]
    assert (gpu0["capW"], gpu0["degraded"]) == (700, True) and "NoPermission" in gpu0["error"]
    assert metric(agent, "powercap_gpu_power_limit_watts", UUID=UUIDS[0]) == 700.0


# -- 7. a file policy whose minimums pass its cap ----------------------------------------------


def test_infeasible_file_policy_holds_every_gpu_at_minimum_and_says_so(
    fake: FakeNvml, tmp_path: Path, agents: list[AgentProcess],
) -> None:
    """700 W for four GPUs of 200 W minimum: no split fits. It used to be silent."""
    with Sampler(fake, 4 * 200) as sampler:  # the cap cannot hold: never above the minimums
        sampler.excuse(3.0)
        agent = start_with_file(tmp_path, fake, 700)
        agents.append(agent)
        wait_for_limits(fake, [200] * GPUS)
        sampler.run_for(1.0)
    sampler.assert_held()
    infeasible = agent.logged("policy infeasible on this node: every GPU at its minimum")
    assert len(infeasible) == 1 and infeasible[0]["policy"] == "inference/llama"
    problem = agent.status()["policies"]["inference/llama"]["problem"]
    assert problem == "infeasible: minimums 800 W > budget 700 W (powerCapLimit 700 W)"  # the whole powerCapLimit
