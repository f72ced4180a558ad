"""config/nodeagent builds offline with kubectl and grants the agent only what it needs."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

Built = dict[tuple[str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def built() -> Built:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the manifests (it embeds kustomize)"
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO_ROOT / "config" / "nodeagent")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}


def test_objects_and_namespace(built: Built) -> None:
    assert set(built) == {
        ("ServiceAccount", "powercap-agent"), ("ClusterRole", "powercap-agent"),
        ("ClusterRoleBinding", "powercap-agent"), ("DaemonSet", "powercap-agent"),
    }
    assert built["DaemonSet", "powercap-agent"]["metadata"]["namespace"] == "powercap-system"


def test_rbac_is_least_privilege(built: Built) -> None:
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in built["ClusterRole", "powercap-agent"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("", "pods"): ["list", "watch"],
        ("powercapping.example.com", "powercappingpolicies"): ["list", "watch"],
        ("", "nodes"): ["get"],  # never a write to a Node: telemetry goes to its PowerCapNode
        ("powercapping.example.com", "powercapnodes"): ["create"],
        ("powercapping.example.com", "powercapnodes/status"): ["patch"],
        ("events.k8s.io", "events"): ["create"],
    }
    binding = built["ClusterRoleBinding", "powercap-agent"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "powercap-agent", "namespace": "powercap-system"}]


def test_daemonset_runs_on_gpu_nodes_with_the_fewest_privileges(built: Built) -> None:
    pod = built["DaemonSet", "powercap-agent"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["hostPID"] is True and pod["serviceAccountName"] == "powercap-agent"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert security["privileged"] is False and security["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "HOST_IP": "status.hostIP", "NVIDIA_VISIBLE_DEVICES": "all",
                   "NVIDIA_DRIVER_CAPABILITIES": "utility"}
    assert not any("/dev/" in str(v) for v in pod["volumes"])  # no host device: IPMI needs a device plugin
    assert "nvidia.com/gpu" not in str(container["resources"])  # never takes a GPU from the workloads
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_state_dir_probes_and_flags_match_the_agent(built: Built) -> None:
    pod = built["DaemonSet", "powercap-agent"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/powercap", "type": "DirectoryOrCreate"}
    assert {"name": "state", "mountPath": "/var/lib/powercap"} in container["volumeMounts"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9402, "protocol": "TCP"}]
    from powercap.commands import build_parser

    args = build_parser().parse_args([*container["command"][1:], *container["args"]])
    assert (args.backend, str(args.state_file), args.metrics_bind) == ("nvml", "/var/lib/powercap/agent-state.json", ("0.0.0.0", 9402))
    # the kubelet's pod-resources socket the agent asks by default lies in a read-only mount
    assert volumes["pod-resources"]["hostPath"]["path"] == str(args.pod_resources_socket.parent)
    assert {"name": "pod-resources", "mountPath": str(args.pod_resources_socket.parent), "readOnly": True} in container["volumeMounts"]


def test_node_power_config_and_bmc_credentials_are_optional_and_read_only(built: Built) -> None:
    pod = built["DaemonSet", "powercap-agent"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["node-power-config"]["configMap"] == {"name": "powercap-agent-node-power", "optional": True}
    assert volumes["bmc-credentials"]["secret"] == {"secretName": "powercap-bmc-credentials", "optional": True,
                                                    "defaultMode": 0o400}
    from powercap.commands import build_parser

    args = build_parser().parse_args([*container["command"][1:], *container["args"]])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["node-power-config"] == {"name": "node-power-config", "mountPath": str(args.node_power_config.parent),
                                           "readOnly": True}
    assert mounts["bmc-credentials"] == {"name": "bmc-credentials", "mountPath": str(args.redfish_credentials),
                                         "readOnly": True}
    assert args.kepler_url == "http://$(HOST_IP):9102/metrics"  # the kubelet expands it from the env
