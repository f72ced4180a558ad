"""config/webhook builds offline with kubectl and holds what DESIGN.md section 3 asks of it."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from powercap.algorithms import AlgorithmRegistry
from webhook.app import create_app
from webhook.certs import service_dns_names

from .conftest import REPO_ROOT

WEBHOOK_DIR = REPO_ROOT / "config" / "webhook"
GROUP = "powercapping.example.com"


def kustomize(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the manifests (it embeds kustomize)"
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(result.stdout) if doc}


@pytest.fixture(scope="module")
def built() -> dict[tuple[str, str], dict[str, Any]]:
    return kustomize(WEBHOOK_DIR)


CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}


def test_every_namespaced_object_lands_in_powercap_system(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(built) == {
        ("ServiceAccount", "powercap-webhook"), ("ClusterRole", "powercap-webhook"), ("ClusterRoleBinding", "powercap-webhook"),
        ("Deployment", "powercap-webhook"), ("PodDisruptionBudget", "powercap-webhook"), ("Service", "powercap-webhook"),
        ("NetworkPolicy", "powercap-webhook"),
        ("ValidatingWebhookConfiguration", "powercap-validating-webhook"), ("MutatingWebhookConfiguration", "powercap-mutating-webhook"),
    }
    for (kind, _), doc in built.items():
        assert doc["metadata"].get("namespace") == (None if kind in CLUSTER_SCOPED else "powercap-system"), kind


def test_deployment_is_redundant_probed_and_locked_down(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = built["Deployment", "powercap-webhook"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "powercap:latest"
    assert container["command"] == ["powercap", "webhook", "--cert-dir", "/certs"]
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "https", "scheme": "HTTPS"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/certs"]["readOnly"] is True
    assert volumes[mounts["/certs"]["name"]]["secret"]["secretName"] == "powercap-webhook-tls"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "gunicorn and the metrics need a writable /tmp"
    assert pod["serviceAccountName"] == "powercap-webhook"


def test_disruption_budget_and_service_select_the_webhook_pods(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    labels = built["Deployment", "powercap-webhook"]["spec"]["template"]["metadata"]["labels"]
    pdb, service = built["PodDisruptionBudget", "powercap-webhook"], built["Service", "powercap-webhook"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("kind", "name", "path", "failure_policy"),
    [
        ("ValidatingWebhookConfiguration", "powercap-validating-webhook", "/validate", "Fail"),
        ("MutatingWebhookConfiguration", "powercap-mutating-webhook", "/mutate", "Ignore"),
    ],
)
def test_webhook_configurations_match_only_policies(
    built: dict[tuple[str, str], dict[str, Any]], kind: str, name: str, path: str, failure_policy: str
) -> None:
    [webhook] = built[kind, name]["webhooks"]
    assert webhook["name"].endswith(f".{GROUP}")
    assert webhook["sideEffects"] == "None"
    assert webhook["timeoutSeconds"] <= 5
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["failurePolicy"] == failure_policy
    assert webhook["rules"] == [{
        "apiGroups": [GROUP], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
        "resources": ["powercappingpolicies"], "scope": "Namespaced",
    }]
    service = webhook["clientConfig"]["service"]
    assert (service["name"], service["namespace"], service["port"]) == ("powercap-webhook", "powercap-system", 443)
    routes = {rule.rule for rule in create_app(registry=AlgorithmRegistry.default()).url_map.iter_rules()}
    assert service["path"] == path and path in routes


def test_network_policy_admits_only_the_https_port_of_the_webhook_pods(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    policy = built["NetworkPolicy", "powercap-webhook"]["spec"]
    pod = built["Deployment", "powercap-webhook"]["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]  # egress stays open: the policy watch needs the API server
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": "https"}]}]
    [container] = pod["spec"]["containers"]
    assert [port["name"] for port in container["ports"]] == ["https"]
    assert built["Service", "powercap-webhook"]["spec"]["ports"][0]["targetPort"] == "https"


def test_service_account_may_only_list_and_watch_policies(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert built["ClusterRole", "powercap-webhook"]["rules"] == [
        {"apiGroups": [GROUP], "resources": ["powercappingpolicies"], "verbs": ["list", "watch"]}
    ]
    binding = built["ClusterRoleBinding", "powercap-webhook"]
    assert binding["roleRef"]["name"] == "powercap-webhook"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "powercap-webhook", "namespace": "powercap-system"}]


def test_cert_manager_component_issues_the_secret_and_injects_the_ca(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(WEBHOOK_DIR, overlay)
    (overlay / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{base}/cert-manager]\n")
    built = kustomize(overlay)
    for kind, name in [("ValidatingWebhookConfiguration", "powercap-validating-webhook"), ("MutatingWebhookConfiguration", "powercap-mutating-webhook")]:
        assert built[kind, name]["metadata"]["annotations"] == {"cert-manager.io/inject-ca-from": "powercap-system/powercap-webhook"}
    certificate = built["Certificate", "powercap-webhook"]
    assert certificate["metadata"]["namespace"] == "powercap-system"
    assert certificate["spec"]["secretName"] == "powercap-webhook-tls"
    assert certificate["spec"]["dnsNames"] == service_dns_names("powercap-webhook", "powercap-system")
    assert built["Certificate", "powercap-webhook-ca"]["spec"]["isCA"] is True


def test_cert_script_makes_the_secret_and_patches_both_ca_bundles(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake_kubectl = tmp_path / "kubectl"
    # the Secret's manifest is the real kubectl's (client-side dry run: no cluster needed)
    real_kubectl = shutil.which("kubectl")
    assert real_kubectl, "kubectl is missing"
    fake_kubectl.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$3" = create ] && exec {real_kubectl} "$@"\n'
                            f'[ "$1" = apply ] && cat > {calls}.applied\nexit 0\n')
    fake_kubectl.chmod(0o755)
    out = tmp_path / "certs"
    env = {**os.environ, "KUBECTL": str(fake_kubectl), "POWERCAP": str(Path(sys.executable).parent / "powercap")}
    result = subprocess.run([str(REPO_ROOT / "scripts" / "webhook-certs.sh"), "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    log = calls.read_text()
    ca_bundle = base64.b64encode((out / "ca.crt").read_bytes()).decode()
    secret = yaml.safe_load((tmp_path / "calls.applied").read_text())
    assert (secret["kind"], secret["type"], secret["metadata"]["name"]) == ("Secret", "kubernetes.io/tls", "powercap-webhook-tls")
    # ca.crt beside the pair: the webhook's PodMonitor verifies the serving certificate with it
    assert {key: base64.b64decode(value) for key, value in secret["data"].items()} == {
        name: (out / name).read_bytes() for name in ("tls.crt", "tls.key", "ca.crt")
    }
    # never a client-side apply: it would copy tls.key into the last-applied-configuration annotation
    applies = [line for line in log.splitlines() if line.startswith("apply")]
    assert applies == ["apply --server-side --force-conflicts --field-manager=powercap-webhook-certs -f -"]
    assert "-n powercap-system annotate secret powercap-webhook-tls kubectl.kubernetes.io/last-applied-configuration-" in log
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for kind in ("validating", "mutating"):
        assert (f'patch {kind}webhookconfiguration powercap-{kind}-webhook --type=json -p '
                f'[{{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"{ca_bundle}"}}]') in log
