"""scripts/*.sh are shellcheck-clean, and scripts/e2e-kind.sh is in step with the manifests,
the code and the extender's decisions.

The e2e script needs Docker and kind, which neither this machine nor CI has. What can go
stale without them is checked here: the names it shares with the manifests and the code,
the objects it writes (kind config, telemetry, pods), and the story it tells (which racks
refuse a GPU pod, and why), replayed through the real extender on the cluster the script
would build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extender.app import create_app
from powercap.runtime.sources import StateFileSource
from powercap.algorithms import AlgorithmRegistry
from powercap.cluster import ClusterSettings
from powercap.objects import RACK_LABEL
from powercap.policies import POLICY_LABEL
from powercap.nodeobjects import NODE_API_VERSION, NODE_KIND
from powercap.telemetry import from_json
from tests.conftest import REPO_ROOT
from tests.fakes.objects import extender_args, gpu_node, kubectl_list, rfc3339
from tests.manifests import Manifest, find, kustomize_build, pod_templates
from tests.test_deploy_bundle import KUBERNETES_VERSION

SCRIPT = "scripts/e2e-kind.sh"


def script(snippet: str) -> str:
    """Run ``snippet`` in bash after sourcing the e2e script (its main does not run)."""
    result = subprocess.run(
        ["bash", "-c", f"source {SCRIPT}; {snippet}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def variable(name: str) -> str:
    return script(f'echo "${{{name}[*]}}"').strip()


@pytest.fixture(scope="module")
def bundle() -> list[Manifest]:
    return kustomize_build("config/default")


def test_scripts_are_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(REPO_ROOT / ".venv" / "bin"))
    assert shellcheck, "shellcheck is missing: scripts/test.sh installs it from Debian's shellcheck package"
    scripts = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "scripts").glob("*.sh"))
    assert SCRIPT in scripts
    # -x follows `source`d files, from the repository root as the scripts run
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_script_is_executable_and_strict() -> None:
    path = REPO_ROOT / SCRIPT
    assert os.access(path, os.X_OK)
    assert "set -euo pipefail" in path.read_text().splitlines()[:40]


def test_names_match_the_manifests_and_the_code(bundle: list[Manifest]) -> None:
    scheduler = find(bundle, "Deployment", "power-aware-scheduler")
    [config_map] = [m for m in bundle if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("power-aware-scheduler-config")]
    scheduler_config = yaml.safe_load(config_map["data"]["scheduler-config.yaml"])
    assert variable("NAMESPACE") == scheduler["metadata"]["namespace"]
    assert variable("SCHEDULER_NAME") == scheduler_config["profiles"][0]["schedulerName"]
    assert variable("GPU_RESOURCE") == scheduler_config["extenders"][0]["managedResources"][0]["name"]
    assert variable("RACK_LABEL") == RACK_LABEL
    assert variable("NODE_TELEMETRY_KIND") == NODE_KIND
    assert variable("NODE_TELEMETRY_API_VERSION") == NODE_API_VERSION
    assert variable("POLICY_LABEL") == POLICY_LABEL
    sample = yaml.safe_load((REPO_ROOT / variable("POLICY_SAMPLE")).read_text())
    assert variable("POLICY_NAME") == sample["metadata"]["name"]
    # it waits for every workload the bundle installs, by the names the bundle gives them
    workloads = {f"{w['kind'].lower()}/{w['metadata']['name']}" for w, _ in pod_templates(bundle)}
    assert set(variable("WORKLOADS").split()) == workloads


def test_installs_config_default_with_its_own_image_tag(tmp_path: Path, bundle: list[Manifest]) -> None:
    overlay = yaml.safe_load(script("overlay_kustomization"))
    assert overlay["resources"] == ["../../config/default"]
    work = variable("WORK")
    assert (REPO_ROOT / work / overlay["resources"][0]).resolve() == REPO_ROOT / "config" / "default"
    # not `latest`: imagePullPolicy stays IfNotPresent and kind's loaded image is used
    # kube-scheduler at the kind node's version: a skew the init container accepts
    assert overlay["images"] == [{"name": "powercap", "newName": "powercap", "newTag": "e2e"},
                                 {"name": "registry.k8s.io/kube-scheduler", "newTag": "v1.32.2"}]
    assert variable("IMAGE") == "powercap:e2e"
    assert variable("KIND_NODE_IMAGE") == "kindest/node:v1.32.2"


def test_kind_cluster_has_a_control_plane_and_a_worker_per_rack() -> None:
    config = yaml.safe_load(script("kind_config"))
    roles = [n["role"] for n in config["nodes"]]
    racks = variable("RACKS").split()
    assert roles == ["control-plane"] + ["worker"] * len(racks)
    assert len(variable("GPU_POWER_W").split()) == len(variable("INLET_C").split()) == len(racks) == 3


def test_telemetry_is_what_the_node_agent_writes() -> None:
    telemetry = from_json(script("telemetry_json 615 24"))
    gpus = int(variable("GPUS_PER_NODE"))
    assert telemetry.power_w == 615 * gpus and telemetry.inlet_temperature_c == 24
    assert len(telemetry.gpus) == gpus and {g.pod for g in telemetry.gpus} == {None}
    assert (datetime.now(timezone.utc) - telemetry.timestamp).total_seconds() < 60


def test_gpu_pods_are_valid_and_use_the_power_aware_scheduler() -> None:
    for pod in (yaml.safe_load(script("gpu_pod llm-1")), yaml.safe_load(script("gpu_pod p rack-1 rack-2"))):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        assert pod["spec"]["schedulerName"] == "power-aware-scheduler"
        assert pod["metadata"]["labels"] == {POLICY_LABEL: variable("POLICY_NAME")}


def cluster_the_script_builds() -> list[dict[str, Any]]:
    """The three workers as the script labels, patches and annotates them (kind names them
    <cluster>-worker, -worker2, -worker3)."""
    gpus = int(variable("GPUS_PER_NODE"))
    nodes = []
    for i, (rack, gpu_w, inlet_c) in enumerate(
        zip(variable("RACKS").split(), variable("GPU_POWER_W").split(), variable("INLET_C").split(), strict=True)
    ):
        name = f"powercap-e2e-worker{i + 1 if i else ''}"
        nodes.append(gpu_node(name, rack, script(f"telemetry_json {gpu_w} {inlet_c}"), gpus=gpus))
    return nodes


def decide(tmp_path: Path, pod: dict[str, Any], bound: list[dict[str, Any]]) -> dict[str, Any]:
    """The extender's filter answer for ``pod`` on the script's cluster and sample policy."""
    nodes = cluster_the_script_builds()
    policy = yaml.safe_load((REPO_ROOT / variable("POLICY_SAMPLE")).read_text())
    policy["metadata"]["namespace"] = "default"
    state = tmp_path / "cluster.json"
    state.write_text(json.dumps(kubectl_list(nodes, bound, [policy])))
    registry = AlgorithmRegistry.default(discover=lambda: [])
    client = create_app(StateFileSource(str(state), ClusterSettings(), registry), registry).test_client()
    response = client.post("/filter", data=extender_args(pod, nodes, node_cache_capable=True),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    return response.get_json()


def test_the_story_gpu_pods_land_in_rack_3(tmp_path: Path) -> None:
    """What the script prints: rack-1 is full, rack-2 too hot, rack-3 takes the pods."""
    pod = yaml.safe_load(script("gpu_pod llm-1"))
    answer = decide(tmp_path, pod, [])
    assert answer["NodeNames"] == ["powercap-e2e-worker3"]
    policy = f"default/{variable('POLICY_NAME')}"
    assert answer["FailedNodes"] == {
        "powercap-e2e-worker": f"rack-1: 4920 W in use + 700 W for this pod > maxPower 5000 W (set by policy {policy})",
        "powercap-e2e-worker2": f"rack-2: inlet 29 °C >= maxTemperature 28 °C (set by policy {policy})",
    }


def test_the_story_a_pod_kept_to_rack_1_and_2_stays_pending(tmp_path: Path) -> None:
    """After the GPU pods are bound in rack-3, the pinned pod's estimate is smaller (the
    policy's cap shared by more GPUs), and rack-1 still has no room for it."""
    now = rfc3339(datetime.now(timezone.utc))
    bound = []
    for i in range(1, int(variable("GPU_PODS")) + 1):
        pod = yaml.safe_load(script(f"gpu_pod llm-{i}"))
        pod["metadata"]["uid"] = f"uid-{i}"
        pod["spec"]["nodeName"] = "powercap-e2e-worker3"
        pod["status"] = {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now}]}
        bound.append(pod)
    answer = decide(tmp_path, yaml.safe_load(script("gpu_pod llm-pinned rack-1 rack-2")), bound)
    assert "rack-1: 4920 W in use + 250 W for this pod > maxPower 5000 W" in answer["FailedNodes"]["powercap-e2e-worker"]
    assert answer["FailedNodes"]["powercap-e2e-worker2"].startswith("rack-2: inlet 29 °C >= maxTemperature 28 °C")


STUB = r"""#!/usr/bin/env bash
# Stands in for {tool}: logs its arguments, answers what the e2e script reads back.
printf '%s\n' "{tool} $*" >>"$E2E_LOG"
[ -t 0 ] || cat >/dev/null
case "{tool} $*" in
  "kubectl get nodes -l"*) printf 'node/powercap-e2e-worker\nnode/powercap-e2e-worker2\nnode/powercap-e2e-worker3\n' ;;
  "kubectl apply -f out/e2e-kind/refused.yaml")
    echo 'The PowerCappingPolicy "refused-example" is invalid: spec.customAlgorithm.parameters.energyThreshold: must be greater than 0' >&2
    exit 1 ;;
  "kubectl get pod llm-"*) printf 'powercap-e2e-worker3' ;;
  "kubectl get node powercap-e2e-worker3"*) printf 'rack-3' ;;
  "kubectl get events"*) printf '0/4 nodes are available: 1 rack-1: ...' ;;
  "powercap certs"*) printf 'Q0FCVU5ETEU=' ;;
esac
exit 0
"""


def test_script_runs_start_to_finish_against_stand_ins(tmp_path: Path) -> None:
    """docker, kind, kubectl and powercap replaced by stubs that log their arguments: the
    script must get through every step (no unset variable, no wrong flag order) and clean up."""
    work = tmp_path / "repo"
    for folder in ("scripts", "config"):
        shutil.copytree(REPO_ROOT / folder, work / folder, symlinks=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "kind", "kubectl", "powercap"):
        (bin_dir / tool).write_text(STUB.replace("{tool}", tool))
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "E2E_LOG": str(log),
           "POWERCAP": str(bin_dir / "powercap"), "CLUSTER": "powercap-e2e"}
    result = subprocess.run(["bash", "scripts/e2e-kind.sh"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("kind create cluster --name powercap-e2e --image kindest/node:v1.32")
    assert calls[-1] == "kind delete cluster --name powercap-e2e"
    for rack in ("rack-1", "rack-2", "rack-3"):
        assert any(c.startswith("kubectl label --overwrite node/") and c.endswith(f"{RACK_LABEL}={rack}") for c in calls)
    assert sum("--subresource=status" in c and "nvidia.com~1gpu" in c for c in calls) == 3
    assert any(c.startswith("kubectl patch powercapnode/powercap-e2e-worker --subresource=status --type=merge -p ")
               for c in calls)
    assert not any(c.startswith("kubectl annotate") for c in calls), "no Node carries telemetry any more"
    order = ["docker build -t powercap:e2e .", "kind load docker-image powercap:e2e --name powercap-e2e",
             "kubectl apply -k out/e2e-kind", "powercap certs --service powercap-webhook --namespace powercap-system"]
    positions = [next(i for i, c in enumerate(calls) if c.startswith(step)) for step in order]
    assert positions == sorted(positions)
    for workload in variable("WORKLOADS").split():
        assert f"kubectl -n powercap-system rollout status {workload} --timeout=300s" in calls
    samples = sorted(p.name for p in (REPO_ROOT / "config" / "samples").glob("*.yaml"))
    applied = [c.split("config/samples/")[1] for c in calls if c.startswith("kubectl apply -f config/samples/")]
    assert sorted(applied) == samples and applied[-1] == "rack-constraints.yaml"
    assert "must be greater than 0" in result.stdout + result.stderr
    assert re.search(r"llm-1 +powercap-e2e-worker3 +rack-3", result.stdout)
