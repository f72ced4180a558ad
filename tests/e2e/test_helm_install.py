"""`helm install` of charts/powercap on a real API server, the way README.md says.

A control plane of its own (the session's has config/default applied, whose cluster-scoped
objects Helm would refuse to take over). No kubelet runs, so pods stay Pending: what is
checked is what the API server decides: every object is accepted, the chart sees the
server's version (.Capabilities, `lookup`), and upgrades keep the webhook's CA.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.e2e.harness import ControlPlane, bundle_objects, start_controlplane, stop_controlplane, wait_until
from tests.helmchart import CHART, helm, helm_instructions, helm_stderr

RELEASE = "powercap"
NAMESPACE = "powercap-system"


@pytest.fixture(scope="module")
def plane(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A second, empty control plane (``cluster`` first: it checks the toolchain and builds)."""
    directory = tmp_path_factory.mktemp("helm-controlplane")
    plane = start_controlplane(directory)
    try:
        yield plane
    finally:
        stop_controlplane(directory)


def helm_on(plane: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([helm(), "--kubeconfig", plane.kubeconfig, *args], capture_output=True, text=True, timeout=180)
    if check:
        assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{helm_stderr(done)}"
    return done


def secret_field(plane: ControlPlane, name: str, field: str) -> bytes:
    return base64.b64decode(plane.get_json("secret", name, "-n", NAMESPACE)["data"][field])


def server_version(plane: ControlPlane) -> dict[str, str]:
    return json.loads(plane.kubectl("get", "--raw", "/version").stdout)


def ca_bundles(plane: ControlPlane) -> set[bytes]:
    return {base64.b64decode(plane.get_json(f"{kind}webhookconfiguration", f"powercap-{kind}-webhook")
                             ["webhooks"][0]["clientConfig"]["caBundle"]) for kind in ("validating", "mutating")}


@pytest.fixture(scope="module")
def installed(plane: ControlPlane) -> ControlPlane:
    """README.md's Helm instructions, line by line, against this control plane."""
    for line in helm_instructions(REPO_ROOT / "README.md"):
        program, *args = shlex.split(line)
        args = [str(CHART) if arg == "charts/powercap" else arg for arg in args]
        if program == "kubectl":
            plane.kubectl(*args)
        else:
            assert program == "helm", line
            helm_on(plane, *args)
    return plane


def agent_pod(plane: ControlPlane, namespace: str) -> subprocess.CompletedProcess[str]:
    """The release's agent pod, as its DaemonSet would create it, submitted to ``namespace``
    with --dry-run=server: what Pod Security admission decides for it there."""
    daemonset = plane.get_json("daemonset", "powercap-agent", "-n", NAMESPACE)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "agent-admission", "namespace": namespace,
                        "labels": daemonset["spec"]["template"]["metadata"]["labels"]},
           "spec": {**daemonset["spec"]["template"]["spec"], "nodeName": "gpu-1"}}
    for field in ("serviceAccountName", "serviceAccount"):  # Pod Security does not look at them; another
        pod["spec"].pop(field, None)                         # namespace has no such account
    return plane.kubectl("create", "--dry-run=server", "-f", "-", input_text=json.dumps(pod), check=False)


def test_the_namespace_admits_the_agent_where_the_cluster_default_would_refuse_it(installed: ControlPlane) -> None:
    """The README labels the namespace as config/default does, before the install: the
    agent's pod (hostPID, CAP_SYS_ADMIN) is admitted there, and refused in a namespace at
    `baseline`, the level a cluster default of baseline or restricted would give it."""
    [namespace] = bundle_objects(("Namespace",))
    labels = installed.get_json("namespace", NAMESPACE)["metadata"]["labels"]
    assert {k: v for k, v in namespace["metadata"]["labels"].items() if k.startswith("pod-security")}.items() \
        <= labels.items()
    admitted = agent_pod(installed, NAMESPACE)
    assert admitted.returncode == 0, admitted.stderr
    installed.kubectl("create", "namespace", "baseline-default")
    try:
        installed.kubectl("label", "namespace", "baseline-default", "pod-security.kubernetes.io/enforce=baseline")
        refused = agent_pod(installed, "baseline-default")
        assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr
    finally:
        installed.kubectl("delete", "namespace", "baseline-default", "--wait=false", check=False)


def test_every_object_of_the_release_is_on_the_server(installed: ControlPlane) -> None:
    manifest = [m for m in yaml.safe_load_all(helm_on(installed, "get", "manifest", RELEASE, "-n", NAMESPACE).stdout) if m]
    assert len(manifest) > 30
    found = installed.kubectl("get", "-f", "-", "-o", "name", input_text=yaml.safe_dump_all(manifest)).stdout.split()
    assert len(found) == len(manifest)
    installed.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      "crd/powercappingpolicies.powercapping.example.com")


def test_the_scheduler_image_is_the_servers_version(installed: ControlPlane) -> None:
    server = server_version(installed)["gitVersion"]
    pod = installed.get_json("deployment", "power-aware-scheduler", "-n", NAMESPACE)["spec"]["template"]["spec"]
    [scheduler] = [c for c in pod["containers"] if c["name"] == "kube-scheduler"]
    assert scheduler["image"] == f"registry.k8s.io/kube-scheduler:{server}"


def test_a_scheduler_the_skew_policy_does_not_support_is_refused_before_anything_changes(installed: ControlPlane) -> None:
    server = server_version(installed)
    older = f"v{server['major']}.{int(server['minor']) - 2}.0"
    done = helm_on(installed, "upgrade", RELEASE, str(CHART), "-n", NAMESPACE, "--reuse-values",
                   "--set", f"scheduler.image.tag={older}", check=False)
    assert done.returncode != 0
    assert f"is 2 minor versions older than the API server {server['major']}.{server['minor']}" in done.stderr
    history = helm_on(installed, "history", RELEASE, "-n", NAMESPACE, "-o", "yaml").stdout
    assert [entry["status"] for entry in yaml.safe_load(history)] == ["deployed"]


def test_an_upgrade_keeps_the_ca_and_signs_a_new_serving_certificate(installed: ControlPlane) -> None:
    ca = secret_field(installed, "powercap-webhook-ca", "tls.crt")
    serving = secret_field(installed, "powercap-webhook-tls", "tls.crt")
    assert ca_bundles(installed) == {ca}
    helm_on(installed, "upgrade", RELEASE, str(CHART), "-n", NAMESPACE, "--reuse-values")
    assert secret_field(installed, "powercap-webhook-ca", "tls.crt") == ca
    assert secret_field(installed, "powercap-webhook-tls", "tls.crt") != serving
    assert secret_field(installed, "powercap-webhook-tls", "ca.crt") == ca
    assert ca_bundles(installed) == {ca}


def test_a_namespace_the_release_does_not_own_is_not_taken_over(installed: ControlPlane) -> None:
    done = helm_on(installed, "install", "second", str(CHART), "-n", NAMESPACE, "--set", "namespace.create=true",
                   "--dry-run=server", check=False)
    assert done.returncode != 0
    assert "the namespace powercap-system exists and this release does not own it" in done.stderr


def test_uninstall_leaves_the_crd(installed: ControlPlane) -> None:
    helm_on(installed, "uninstall", RELEASE, "-n", NAMESPACE, "--wait")
    wait_until(lambda: installed.kubectl("get", "clusterrole", "powercap-controller", check=False).returncode != 0,
               60, "the release's ClusterRoles to go")
    installed.kubectl("get", "crd", "powercappingpolicies.powercapping.example.com")
