"""Who runs as whom in config/default, and what Pod Security lets them do.

Each program holds only its own rights (docs/rbac.md): kube-scheduler, the extender, the
scheduler's init container, the controller, the webhook and the agent each have a
ServiceAccount, and in the one pod that runs three programs each container mounts only its
own token. The namespace enforces Pod
Security `privileged` for the agent; every other pod must meet `restricted`, so that the
privileges are where docs/nodeagent.md says and nowhere else.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.manifests import NAMESPACE, Manifest, find, kustomize_build, pod_templates

TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
ACCOUNT_OF_CONTAINER = {
    ("power-aware-scheduler", "check-scheduler-version"): "powercap-version-check",
    ("power-aware-scheduler", "kube-scheduler"): "power-aware-scheduler",
    ("power-aware-scheduler", "extender"): "powercap-extender",
    ("powercap-controller", "controller"): "powercap-controller",
    ("powercap-webhook", "webhook"): "powercap-webhook",
    ("powercap-agent", "agent"): "powercap-agent",
}
PRIVILEGED_WORKLOADS = {"powercap-agent"}  # hostPID and CAP_SYS_ADMIN, docs/nodeagent.md
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}


@pytest.fixture(scope="module")
def bundle() -> list[Manifest]:
    return kustomize_build("config/default")


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def token_account(bundle: list[Manifest], workload: Manifest, container: dict[str, Any]) -> str | None:
    """The ServiceAccount whose token ``container`` can read, or None when it has none."""
    pod = workload["spec"]["template"]["spec"]
    [mount] = [m for m in container.get("volumeMounts", []) if m["mountPath"] == TOKEN_PATH] or [None]
    if mount is None:
        return None if pod.get("automountServiceAccountToken") is False else pod["serviceAccountName"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    if "secret" in volume:
        secret = find(bundle, "Secret", volume["secret"]["secretName"])
        assert secret["type"] == "kubernetes.io/service-account-token"
        return str(secret["metadata"]["annotations"]["kubernetes.io/service-account.name"])
    sources = volume["projected"]["sources"]
    assert any("serviceAccountToken" in source for source in sources), volume["name"]
    return str(pod["serviceAccountName"])


def test_every_container_reads_only_its_own_programs_token(bundle: list[Manifest]) -> None:
    seen = {}
    for workload, pod in pod_templates(bundle):
        for container in containers(pod):
            seen[workload["metadata"]["name"], container["name"]] = token_account(bundle, workload, container)
    assert seen == ACCOUNT_OF_CONTAINER
    accounts = {m["metadata"]["name"] for m in bundle if m["kind"] == "ServiceAccount"}
    assert set(ACCOUNT_OF_CONTAINER.values()) == accounts


def test_kube_scheduler_gets_a_rotated_token_the_extender_a_read_only_one(bundle: list[Manifest]) -> None:
    pod = find(bundle, "Deployment", "power-aware-scheduler")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False, "else every container would also read kube-scheduler's token"
    [projected] = [v["projected"] for v in pod["volumes"] if "projected" in v]
    [token] = [s["serviceAccountToken"] for s in projected["sources"] if "serviceAccountToken" in s]
    assert token["expirationSeconds"] <= 3607
    # the extender's account is bound to nothing but its read-only role
    bindings = [m for m in bundle if m["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and any(s["name"] == "powercap-extender" for s in m["subjects"])]
    assert [b["roleRef"]["name"] for b in bindings] == ["powercap-extender"]
    verbs = {verb for rule in find(bundle, "ClusterRole", "powercap-extender")["rules"] for verb in rule["verbs"]}
    assert verbs == {"list", "watch"}


def test_the_version_check_may_only_get_the_pods_of_its_namespace(bundle: list[Manifest]) -> None:
    """check-scheduler-version reads its own pod's kube-scheduler image (and /version, open to
    every account): it holds neither kube-scheduler's token (binding pods, deleting them)
    nor the extender's (reading every pod and node), only get on this namespace's pods."""
    bindings = [m for m in bundle if m["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and any(s["name"] == "powercap-version-check" for s in m["subjects"])]
    assert [(b["kind"], b["metadata"].get("namespace"), b["roleRef"]["name"]) for b in bindings] == \
        [("RoleBinding", NAMESPACE, "powercap-version-check")]
    assert find(bundle, "Role", "powercap-version-check")["rules"] == \
        [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What Pod Security's `restricted` profile (latest) would refuse in this pod spec."""
    found = []
    pod_context = pod.get("securityContext", {})
    for field in ("hostPID", "hostNetwork", "hostIPC"):
        if pod.get(field):
            found.append(field)
    found += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUME_TYPES]
    for container in containers(pod):
        context = container.get("securityContext", {})
        name = container["name"]
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities")
        found += [f"{name}: hostPort" for port in container.get("ports", []) if port.get("hostPort")]
    return found


def test_the_namespace_enforces_privileged_and_only_the_agent_needs_it(bundle: list[Manifest]) -> None:
    labels = find(bundle, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    verdicts = {workload["metadata"]["name"]: restricted_violations(pod) for workload, pod in pod_templates(bundle)}
    assert {name for name, found in verdicts.items() if found} == PRIVILEGED_WORKLOADS, verdicts
    assert {"hostPID", "agent: capabilities"} <= set(verdicts["powercap-agent"])


def test_drains_keep_one_of_each_replicated_program(bundle: list[Manifest]) -> None:
    for name in ("power-aware-scheduler", "powercap-controller", "powercap-webhook"):
        workload = find(bundle, "Deployment", name)
        budget = find(bundle, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        assert 1 <= budget["spec"]["minAvailable"] < workload["spec"]["replicas"]
