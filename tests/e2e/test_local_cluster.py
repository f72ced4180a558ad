"""``scripts/local-cluster.sh up`` / ``down`` as a user runs them, and the whole loop on it:
pods placed through the extender, the controller's allocations within each budget, the
simulated agents enforcing them, and their telemetry reaching the extender's decisions,
every program as its own ServiceAccount."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.harness import REPO_ROOT, ControlPlane, ensure_namespace, running_controlplane, wait_until
from tests.e2e.localcluster import running

SCRIPT = REPO_ROOT / "scripts" / "local-cluster.sh"
TELEMETRY = "powercapping.example.com/telemetry"  # the annotation agents wrote before PowerCapNode
PROGRAMS = ("webhook", "extender", "power-aware-scheduler", "controller-controller-0", "controller-controller-1",
            "kubelets", "agent-gpu-a-0", "agent-gpu-a-1", "agent-gpu-b-0", "agent-gpu-b-1")


def run_script(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, str]]:
    """The default scenario up in a fresh directory: the plane and what ``up`` printed."""
    directory = tmp_path_factory.mktemp("local-cluster")
    done = run_script("up", "--dir", str(directory))
    try:
        assert done.returncode == 0, done.stderr + done.stdout
        yield running_controlplane(directory), done.stdout
    finally:
        run_script("down", "--dir", str(directory))


def pid_of(directory: Path, program: str) -> int:
    return int((directory / "run" / f"powercap-{program}.pid").read_text())


def telemetry_of(plane: ControlPlane) -> dict[str, dict[str, Any]]:
    """Each node's published telemetry (its agent's PowerCapNode's status; null members of
    a GPU entry are absent), by node name; no agent writes the old annotation any more."""
    nodes = plane.get_json("nodes")["items"]
    assert not [n for n in nodes if TELEMETRY in (n["metadata"].get("annotations") or {})]
    return {o["metadata"]["name"]: o["status"] for o in plane.get_json("powercapnodes")["items"] if o.get("status")}


def test_up_prints_the_kubeconfig_and_commands_that_work(local_cluster: tuple[ControlPlane, str]) -> None:
    plane, printed = local_cluster
    assert f"export KUBECONFIG={plane.kubeconfig}" in printed
    assert "4 simulated GPU nodes in 2 racks (rack-1, rack-2), 32 GPUs." in printed
    for program in PROGRAMS:
        assert running(pid_of(plane.directory, program)), f"{program} is not running:\n{plane.log_tail(program)}"
    nodes = plane.kubectl("get", "nodes", "-L", "powercapping.example.com/rack").stdout.splitlines()
    assert [line.split()[0:2] + line.split()[-1:] for line in nodes[1:]] == [
        ["gpu-a-0", "Ready", "rack-1"], ["gpu-a-1", "Ready", "rack-1"],
        ["gpu-b-0", "Ready", "rack-2"], ["gpu-b-1", "Ready", "rack-2"]]
    # the printed refusal is refused by the webhook, naming the field
    refused_example = printed.split("<<'EOF'", 1)[1].split("\nEOF", 1)[0].split("\n", 1)[1]
    refused = plane.kubectl("apply", "-f", "-", input_text=refused_example, check=False)
    assert refused.returncode == 1
    assert 'spec.customAlgorithm.name: unknown algorithm "energy-aware"' in refused.stderr


def test_the_scenarios_pods_run_where_the_extender_put_them(local_cluster: tuple[ControlPlane, str]) -> None:
    plane, _ = local_cluster

    def all_running() -> list[dict[str, Any]] | None:
        pods = plane.get_json("pods", "-n", "inference")["items"]
        return pods if len(pods) == 8 and all(p["status"].get("phase") == "Running" for p in pods) else None

    pods = wait_until(all_running, 90, "the scenario's 8 pods to run")
    assert {p["spec"]["schedulerName"] for p in pods} == {"power-aware-scheduler"}
    scheduled_by = plane.get_json("events", "-n", "inference", "--field-selector", "reason=Scheduled")["items"]
    assert {e["reportingComponent"] or e["source"].get("component") for e in scheduled_by} == {"power-aware-scheduler"}


def test_allocations_stay_within_budgets_and_the_agents_enforce_them(local_cluster: tuple[ControlPlane, str]) -> None:
    plane, _ = local_cluster

    def enforced() -> list[dict[str, Any]] | None:
        policies = plane.get_json("pcp", "-n", "inference")["items"]
        conditions = [{c["type"]: c["status"] for c in (p.get("status") or {}).get("conditions") or ()} for p in policies]
        ready = len(policies) == 2 and all(c.get("Enforced") == "True" for c in conditions)
        return policies if ready else None

    policies = wait_until(enforced, 120, "both policies to be Enforced")
    limits = {g["uuid"]: (g["limitW"], g.get("pod")) for t in telemetry_of(plane).values() for g in t["gpus"]}
    for found in policies:
        status, name = found["status"], found["metadata"]["name"]
        gpus = [g for entry in status["allocations"] for g in entry["gpus"]]
        assert sum(g["watts"] for g in gpus) <= status["budgetW"] <= found["spec"]["powerCapLimit"]
        # each GPU held at or under its allocation by its node's agent (the agents may
        # already be under it: the allocation is read a second before the telemetry)
        for gpu in gpus:
            limit_w, pod = limits[gpu["uuid"]]
            assert limit_w <= gpu["watts"] + 1, (name, gpu, limit_w)
            assert pod.startswith(f"inference/{name}-"), (name, gpu, pod)
        assert sum(limits[g["uuid"]][0] for g in gpus) <= found["spec"]["powerCapLimit"]


def test_the_agents_telemetry_reaches_the_extenders_decisions(local_cluster: tuple[ControlPlane, str]) -> None:
    """A policy whose rack-1 limit is below what rack-1 draws: the extender refuses its pod
    there, quoting the watts the agents published."""
    plane, _ = local_cluster

    def every_pod_measured() -> bool:
        """Every agent published its pods: the extender assumes no power for them any more."""
        shown = {g["pod"] for t in telemetry_of(plane).values() for g in t["gpus"] if g.get("pod")}
        return len(shown) == 8

    wait_until(every_pod_measured, 60, "the agents' telemetry to show the scenario's 8 pods")
    ensure_namespace(plane, "tight")
    plane.apply([{
        "apiVersion": "powercapping.example.com/v1alpha1", "kind": "PowerCappingPolicy",
        "metadata": {"name": "tight", "namespace": "tight"},
        "spec": {"powerCapLimit": 4000, "rackConstraints": [{"rackId": "rack-1", "maxPower": 400},
                                                            {"rackId": "rack-2", "maxPower": 400}]},
    }])
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "probe", "namespace": "tight",
                        "labels": {"app.kubernetes.io/name": "tight", "powercapping.example.com/policy": "tight"}},
           "spec": {"schedulerName": "power-aware-scheduler",
                    "containers": [{"name": "server", "image": "vllm/vllm-openai",
                                    "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
    plane.kubectl("create", "-f", "-", input_text=yaml.safe_dump(pod))

    def refusal() -> str | None:
        events = plane.get_json("events", "-n", "tight", "--field-selector", "reason=FailedScheduling")["items"]
        return events[-1]["message"] if events else None

    message = wait_until(refusal, 60, "a FailedScheduling event for the probe pod")
    rack_1_w = sum(t["powerW"] for name, t in telemetry_of(plane).items() if name.startswith("gpu-a-"))
    quoted = message.split("rack-1: ", 1)[1].split(" W in use + ", 1)[0]
    # the agents publish on a change and every few seconds: the extender quoted a recent sum
    assert abs(float(quoted) - rack_1_w) <= 0.25 * rack_1_w, (message, rack_1_w)
    assert "> maxPower 400 W (set by policy tight/tight)" in message


def test_down_stops_every_program_and_the_control_plane(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    scenario = tmp_path / "one-node.yaml"
    document = yaml.safe_load((REPO_ROOT / "scripts" / "local-cluster.yaml").read_text())
    document["nodes"] = [{"name": "solo", "count": 1, "rack": "rack-1", "gpus": 2, "gpuModel": "L40S-like"}]
    document["services"] = document["services"][:1]
    document["services"][0]["replicas"] = 1
    scenario.write_text(yaml.safe_dump(document))
    done = run_script("up", "--dir", str(directory), "--scenario", str(scenario))
    try:
        assert done.returncode == 0, done.stderr
        assert "1 simulated GPU node in 1 rack (rack-1), 2 GPUs." in done.stdout
        pids = [int(p.read_text()) for p in (directory / "run").glob("*.pid")]
        assert len(pids) == 11  # etcd, apiserver, scheduler, controller manager; 7 of powercap's
        again = run_script("up", "--dir", str(directory))
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        stopped = run_script("down", "--dir", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    assert [pid for pid in pids if running(pid)] == []
    assert not (directory / "controlplane.env").exists()


def test_a_bad_scenario_is_refused_naming_the_field(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.yaml"
    document = yaml.safe_load((REPO_ROOT / "scripts" / "local-cluster.yaml").read_text())
    document["nodes"][0]["rack"] = "rack-9"
    scenario.write_text(yaml.safe_dump(document))
    done = run_script("up", "--dir", str(tmp_path / "never"), "--scenario", str(scenario))
    assert done.returncode == 2
    assert 'nodes[0].rack: unknown rack "rack-9"; racks: rack-1, rack-2' in done.stderr
    assert not (tmp_path / "never" / "controlplane.env").exists()
