"""config/controller: the controller's Deployment, its own ServiceAccount and least-privilege RBAC."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from powercap.commands import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = ROOT / "config" / "controller"


def documents(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}


def test_the_controller_may_only_read_write_status_evict_and_record_events() -> None:
    rbac = documents(COMPONENT / "rbac.yaml")
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in rbac[("ClusterRole", "powercap-controller")]["rules"]
        for group in rule["apiGroups"] for resource in rule["resources"]
    }
    assert rules == {
        ("", "nodes"): ["list", "watch"],
        ("", "pods"): ["list", "watch"],
        ("powercapping.example.com", "powercapnodes"): ["list", "watch"],
        ("powercapping.example.com", "powercappingpolicies"): ["get", "list", "watch"],
        ("powercapping.example.com", "powercappingpolicies/status"): ["update"],
        ("", "pods/eviction"): ["create"],
        ("events.k8s.io", "events"): ["create"],
    }
    lease_rules = rbac[("Role", "powercap-controller-leader-election")]["rules"]
    assert [(r["verbs"], r.get("resourceNames")) for r in lease_rules] == [
        (["create"], None), (["get", "update"], ["powercap-controller"]),
    ]
    for binding in (rbac[("ClusterRoleBinding", "powercap-controller")], rbac[("RoleBinding", "powercap-controller-leader-election")]):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "powercap-controller", "namespace": "powercap-system"}]
    assert ("ServiceAccount", "powercap-controller") in rbac


def test_the_container_arguments_are_ones_the_command_accepts() -> None:
    deployment = documents(COMPONENT / "deployment.yaml")[("Deployment", "powercap-controller")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "controller"
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.interval, args.margin, args.lease_namespace, args.lease_name) == (
        "controller", 5.0, 0.0, "powercap-system", "powercap-controller",
    )
    assert args.marginal_rebalancing is True
    assert args.health_bind in container["livenessProbe"]["exec"]["command"][-1]


def test_kustomize_composes_the_component_with_the_scheduler_offline(tmp_path: Path) -> None:
    kubectl = "/usr/bin/kubectl" if os.path.exists("/usr/bin/kubectl") else "kubectl"
    config = os.path.relpath(ROOT / "config", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"{config}/crd", f"{config}/scheduler"],
        "components": [f"{config}/controller"],
    }))
    try:
        built = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("kubectl is not installed")
    assert built.returncode == 0, built.stderr
    objects = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    scheduler = objects[("Deployment", "power-aware-scheduler")]["spec"]["template"]["spec"]
    assert {c["name"] for c in scheduler["containers"]} == {"kube-scheduler", "extender"}
    pod = objects[("Deployment", "powercap-controller")]["spec"]["template"]["spec"]
    (controller,) = pod["containers"]
    (extender,) = [c for c in scheduler["containers"] if c["name"] == "extender"]
    assert controller["image"] == extender["image"]
    assert controller["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert pod["serviceAccountName"] == "powercap-controller"
    assert objects[("PodDisruptionBudget", "powercap-controller")]["spec"]["minAvailable"] == 1
    assert ("ClusterRole", "powercap-controller") in objects
    assert ("Role", "powercap-controller-leader-election") in objects
