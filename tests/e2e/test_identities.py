"""Each program's ServiceAccount on the real API server: what RBAC lets it do (and not do),
the extender's and the version check's token Secrets as Kubernetes' token controller fills
them, and the init container that refuses a kube-scheduler the version skew policy does not
support, run as its own account (get pods in the install namespace, nothing more)."""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import pytest

from tests.e2e.harness import NAMESPACE, POWERCAP, ControlPlane, bundle_objects, wait_until

ACCOUNT = "system:serviceaccount:powercap-system:{}"
# (account, verb, resource, allowed): each program may do its own work and not the others'
PERMISSIONS = [
    ("power-aware-scheduler", "create", "pods/binding", True),
    ("power-aware-scheduler", "update", "powercappingpolicies.powercapping.example.com/status", False),
    ("power-aware-scheduler", "create", "pods/eviction", False),
    ("powercap-extender", "list", "nodes", True),
    ("powercap-extender", "watch", "powercappingpolicies.powercapping.example.com", True),
    ("powercap-extender", "create", "pods/binding", False),
    ("powercap-extender", "get", "pods", False),
    ("powercap-extender", "create", "events.events.k8s.io", False),
    ("powercap-controller", "update", "powercappingpolicies.powercapping.example.com/status", True),
    ("powercap-controller", "create", "pods/eviction", True),
    ("powercap-controller", "create", "pods/binding", False),
    ("powercap-controller", "delete", "pods", False),
    ("powercap-webhook", "list", "powercappingpolicies.powercapping.example.com", True),
    ("powercap-webhook", "list", "pods", False),
    ("powercap-agent", "patch", "nodes", False),
    ("powercap-agent", "get", "nodes", True),
    ("powercap-agent", "create", "powercapnodes.powercapping.example.com", True),
    ("powercap-agent", "patch", "powercapnodes.powercapping.example.com/status", True),
    ("powercap-agent", "delete", "powercapnodes.powercapping.example.com", False),
    ("powercap-extender", "watch", "powercapnodes.powercapping.example.com", True),
    ("powercap-controller", "list", "powercapnodes.powercapping.example.com", True),
    ("powercap-controller", "patch", "powercapnodes.powercapping.example.com/status", False),
    ("powercap-agent", "create", "pods/binding", False),
]


@pytest.mark.parametrize(("account", "verb", "resource", "allowed"), PERMISSIONS,
                         ids=[f"{a}-{v}-{r.split('.')[0]}" for a, v, r, _ in PERMISSIONS])
def test_each_program_may_do_its_own_work_and_nothing_of_the_others(
    cluster: ControlPlane, account: str, verb: str, resource: str, allowed: bool,
) -> None:
    assert_can_i(cluster, account, verb, resource, ["--all-namespaces"], allowed)


def assert_can_i(cluster: ControlPlane, account: str, verb: str, resource: str, scope: list[str], allowed: bool) -> None:
    """`kubectl auth can-i` as the ServiceAccount ``account``: ``resource`` may name a subresource."""
    kind, _, subresource = resource.partition("/")
    done = cluster.kubectl("auth", "can-i", verb, kind, *([f"--subresource={subresource}"] if subresource else []),
                           *scope, f"--as={ACCOUNT.format(account)}", check=False)
    assert done.stdout.strip() == ("yes" if allowed else "no"), done.stdout + done.stderr


# (account, verb, resource, namespace, allowed): the version check's one Role, in the install
# namespace only (`kubectl auth can-i --all-namespaces` would ask cluster-wide)
VERSION_CHECK_PERMISSIONS = [
    ("get", "pods", NAMESPACE, True),
    ("get", "pods", "default", False),
    ("list", "pods", NAMESPACE, False),
    ("list", "nodes", "", False),
    ("create", "pods/binding", NAMESPACE, False),
    ("delete", "pods", NAMESPACE, False),
]


@pytest.mark.parametrize(("verb", "resource", "namespace", "allowed"), VERSION_CHECK_PERMISSIONS,
                         ids=[f"{v}-{r.replace('/', '-')}-{n or 'cluster'}" for v, r, n, _ in VERSION_CHECK_PERMISSIONS])
def test_the_version_check_may_only_get_pods_of_its_namespace(
    cluster: ControlPlane, verb: str, resource: str, namespace: str, allowed: bool,
) -> None:
    assert_can_i(cluster, "powercap-version-check", verb, resource, ["-n", namespace] if namespace else [], allowed)


def secret_token(cluster: ControlPlane, name: str) -> list[str]:
    """kubectl's arguments that authenticate with the token Kubernetes' token controller put
    into the bundle's Secret ``name`` (applied now)."""
    [secret] = [s for s in bundle_objects(("Secret",)) if s["metadata"]["name"] == name]
    cluster.apply([secret])

    def token() -> str:
        data = cluster.get_json("secret", name, "-n", NAMESPACE).get("data") or {}
        return base64.b64decode(data.get("token", "")).decode()

    wait_until(token, 60, f"the token controller to fill {name}")
    return ["--token", token(), "--kubeconfig", "/dev/null", "--server", cluster.server,
            "--certificate-authority", cluster.env["CA_FILE"]]


def as_token(credentials: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *credentials, *args], capture_output=True, text=True, timeout=30)


def test_the_extenders_token_secret_is_filled_and_reads_but_cannot_bind(cluster: ControlPlane) -> None:
    as_extender = secret_token(cluster, "powercap-extender-token")
    who = as_token(as_extender, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert who.stdout == ACCOUNT.format("powercap-extender"), who.stderr
    listed = as_token(as_extender, "get", "nodes", "-o", "name")
    assert listed.returncode == 0, listed.stderr
    refused = as_token(as_extender, "get", "secrets", "-n", NAMESPACE)
    assert refused.returncode != 0 and "forbidden" in refused.stderr


def test_the_version_checks_token_secret_is_filled_and_reads_nothing_but_pods_here(cluster: ControlPlane) -> None:
    """The token the init container mounts: not kube-scheduler's, not the extender's."""
    as_check = secret_token(cluster, "powercap-version-check-token")
    who = as_token(as_check, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert who.stdout == ACCOUNT.format("powercap-version-check"), who.stderr
    version = as_token(as_check, "get", "--raw", "/version")
    assert version.returncode == 0 and "gitVersion" in version.stdout, version.stderr
    for refused in (("get", "nodes"), ("get", "pods", "-n", NAMESPACE), ("get", "secrets", "-n", NAMESPACE)):
        done = as_token(as_check, *refused)
        assert done.returncode != 0 and "forbidden" in done.stderr, (refused, done.stdout, done.stderr)


def server_minor(cluster: ControlPlane) -> tuple[int, int]:
    version: dict[str, Any] = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    return int(version["major"]), int(version["minor"].rstrip("+"))


def check_version(cluster: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    kubeconfig = cluster.service_account_kubeconfig("powercap-version-check")
    return subprocess.run([POWERCAP, "check-scheduler-version", *args], capture_output=True, text=True, timeout=60,
                          env={"KUBECONFIG": kubeconfig, "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize(("minor_behind", "refused"), [(-1, True), (0, False), (1, False), (2, True)])
def test_the_init_container_refuses_a_skew_the_policy_does_not_support(
    cluster: ControlPlane, minor_behind: int, refused: bool,
) -> None:
    major, minor = server_minor(cluster)
    image = f"registry.k8s.io/kube-scheduler:v{major}.{minor - minor_behind}.0"
    done = check_version(cluster, "--image", image)
    assert done.returncode == (1 if refused else 0), done.stderr
    if refused:
        assert f"(image {image})" in done.stderr and f"the API server {major}.{minor}" in done.stderr


def test_the_init_container_reads_the_image_of_its_own_pods_scheduler(cluster: ControlPlane) -> None:
    """As config/scheduler runs it: $POD_NAME and $POD_NAMESPACE from the downward API, the
    pod's kube-scheduler container read as powercap-version-check, whose one Role suffices;
    a pod in another namespace it may not read."""
    major, minor = server_minor(cluster)
    image = f"registry.k8s.io/kube-scheduler:v{major}.{minor - 2}.3"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "skewed-scheduler", "namespace": NAMESPACE},
           "spec": {"schedulerName": "nobody", "containers": [{"name": "kube-scheduler", "image": image},
                                                              {"name": "extender", "image": "powercap:latest"}]}}
    cluster.apply([pod])
    try:
        done = check_version(cluster, "--pod", "skewed-scheduler", "--namespace", NAMESPACE)
        assert done.returncode == 1, done.stderr
        assert f"(image {image}) is 2 minor versions older than the API server {major}.{minor}" in done.stderr
        missing = check_version(cluster, "--pod", "skewed-scheduler", "--namespace", NAMESPACE, "--container", "scheduler")
        assert missing.returncode == 2 and "has no container 'scheduler'" in missing.stderr
        elsewhere = check_version(cluster, "--pod", "skewed-scheduler", "--namespace", "default")
        assert elsewhere.returncode == 2 and "forbidden" in elsewhere.stderr.lower(), elsewhere.stderr
    finally:
        cluster.kubectl("delete", "pod", "skewed-scheduler", "-n", NAMESPACE, "--force", "--grace-period=0", check=False)
