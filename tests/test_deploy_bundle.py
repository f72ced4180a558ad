"""config/default: the one-command install builds offline and is valid Kubernetes.

`kubectl apply -k config/default` must install every part once, in powercap-system,
with one image that an operator can point at their build, and every object must pass the
Kubernetes 1.32 schemas (the kubectl here and in CI is 1.32) before a cluster sees it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions

from powercap.commands import build_parser
from tests.conftest import REPO_ROOT
from tests.manifests import (
    NAMESPACE,
    SUPPORTED_KUBERNETES_MINORS,
    Manifest,
    find,
    image_name,
    kustomize_build,
    kustomize_overlay,
    pod_templates,
    powercap_containers,
    schema_problems,
)

# The Kubernetes version whose schemas the bundle is checked against: the kubectl used to
# build it (v1.32). kubernetes-validate ships 1.25 .. 1.37 offline.
KUBERNETES_VERSION = "1.32.0"
CLUSTER_SCOPED = {
    "Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
}
# kube-scheduler reads extension-apiserver-authentication in kube-system: the one object
# outside powercap-system.
OUTSIDE_NAMESPACE = {("RoleBinding", "power-aware-scheduler-authentication-reader"): "kube-system"}


@pytest.fixture(scope="module")
def bundle() -> list[Manifest]:
    return kustomize_build("config/default")


def test_every_part_is_installed_once(bundle: list[Manifest]) -> None:
    names = [(m["kind"], m["metadata"]["name"]) for m in bundle]
    assert len(names) == len(set(names)), "an object is defined twice"
    assert [m["metadata"]["name"] for m in bundle if m["kind"] == "Namespace"] == [NAMESPACE]
    expected = {
        ("CustomResourceDefinition", "powercappingpolicies.powercapping.example.com"),
        ("CustomResourceDefinition", "powercapnodes.powercapping.example.com"),
        ("ValidatingAdmissionPolicy", "powercap-agent-own-node"),
        ("ValidatingAdmissionPolicyBinding", "powercap-agent-own-node"),
        ("Deployment", "power-aware-scheduler"),
        ("PodDisruptionBudget", "power-aware-scheduler"),
        ("Deployment", "powercap-controller"),
        ("PodDisruptionBudget", "powercap-controller"),
        ("Deployment", "powercap-webhook"),
        ("Service", "powercap-webhook"),
        ("PodDisruptionBudget", "powercap-webhook"),
        ("ValidatingWebhookConfiguration", "powercap-validating-webhook"),
        ("MutatingWebhookConfiguration", "powercap-mutating-webhook"),
        ("DaemonSet", "powercap-agent"),
    }
    assert expected <= set(names)
    scheduler = find(bundle, "Deployment", "power-aware-scheduler")
    containers = [c["name"] for c in scheduler["spec"]["template"]["spec"]["containers"]]
    assert sorted(containers) == ["extender", "kube-scheduler"]
    controller = find(bundle, "Deployment", "powercap-controller")
    assert [c["name"] for c in controller["spec"]["template"]["spec"]["containers"]] == ["controller"]


def test_namespaced_objects_live_in_powercap_system(bundle: list[Manifest]) -> None:
    for m in bundle:
        key = (m["kind"], m["metadata"]["name"])
        expected = None if m["kind"] in CLUSTER_SCOPED else OUTSIDE_NAMESPACE.get(key, NAMESPACE)
        assert m["metadata"].get("namespace") == expected, key


def test_every_object_is_labelled_part_of_powercap_but_no_selector_is(bundle: list[Manifest]) -> None:
    for m in bundle:
        assert m["metadata"]["labels"]["app.kubernetes.io/part-of"] == "powercap", (m["kind"], m["metadata"]["name"])
    # a selector is immutable: adding the label there would break upgrades from the parts
    for workload, _ in pod_templates(bundle):
        assert "app.kubernetes.io/part-of" not in workload["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("minor", SUPPORTED_KUBERNETES_MINORS)
def test_every_manifest_passes_the_schemas_of_every_supported_kubernetes(bundle: list[Manifest], minor: str) -> None:
    version = f"{minor}.0"
    assert version in all_versions()
    assert schema_problems(bundle, version) == {}


def test_the_readme_states_the_range_the_tests_cover() -> None:
    go_mod = (REPO_ROOT / "tests" / "e2e" / "controlplane" / "go.mod").read_text()
    [e2e_version] = re.findall(r"^\s*k8s\.io/kubernetes v(\d+\.\d+)\.\d+$", go_mod, re.MULTILINE)
    assert e2e_version == SUPPORTED_KUBERNETES_MINORS[-1], "the end-to-end suite runs on the newest supported minor"
    [scheduler] = [c for _, pod in pod_templates(kustomize_build("config/scheduler")) for c in pod["containers"]
                   if c["name"] == "kube-scheduler"]
    e2e_release = re.search(r"^\s*k8s\.io/kubernetes (v\S+)$", go_mod, re.MULTILINE)
    assert e2e_release and scheduler["image"] == f"registry.k8s.io/kube-scheduler:{e2e_release[1]}", \
        "the default scheduler image is the release the end-to-end suite runs"
    oldest, newest = SUPPORTED_KUBERNETES_MINORS[0], SUPPORTED_KUBERNETES_MINORS[-1]
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"Kubernetes {oldest} to {newest}" in readme
    # the kustomize install sets the scheduler image with the powercap one: on any other minor the
    # default image's skew check would stop the scheduler pods in Init
    assert f"registry.k8s.io/kube-scheduler=registry.k8s.io/kube-scheduler:{e2e_release[1]}" in readme


@pytest.mark.parametrize(
    ("mistake", "path"),
    [
        pytest.param(lambda pod: pod.update(serviceAcountName="x"), "spec.template.spec", id="misspelt-field"),
        pytest.param(lambda pod: pod["containers"][0].update(ports=[{"containerPort": "http"}]),
                     "spec.template.spec.containers.0.ports.0.containerPort", id="port-not-a-number"),
        pytest.param(lambda pod: pod.pop("containers"), "spec.template.spec", id="no-containers"),
    ],
)
def test_the_schema_check_catches_what_the_api_server_would_refuse(bundle: list[Manifest], mistake, path: str) -> None:
    deployment = copy.deepcopy(find(bundle, "Deployment", "power-aware-scheduler"))
    mistake(deployment["spec"]["template"]["spec"])
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    assert ".".join(map(str, caught.value.path)) == path


def test_one_image_runs_every_powercap_container(bundle: list[Manifest]) -> None:
    images = {container["image"] for _, container in powercap_containers(bundle)}
    assert images == {"powercap:latest"}


def test_the_image_is_overridden_in_one_place(tmp_path: Path, bundle: list[Manifest]) -> None:
    """What docs/operations.md tells operators to do: an overlay (or `kustomize edit set
    image` in config/default) with `images: [{name: powercap, ...}]`."""
    overlaid = kustomize_overlay(
        tmp_path, ["config/default"],
        images=[{"name": "powercap", "newName": "registry.example.com/ml/powercap", "newTag": "v0.1.0"}],
    )
    before = sum(1 for _ in powercap_containers(bundle))
    images = [c["image"] for _, c in powercap_containers(overlaid)]
    assert images == ["registry.example.com/ml/powercap:v0.1.0"] * before
    others = {c["image"] for _, pod in pod_templates(overlaid) for c in pod["containers"]} - set(images)
    assert {image_name(i) for i in others} == {"registry.k8s.io/kube-scheduler"}


def test_every_powercap_container_runs_a_command_with_flags_it_accepts(bundle: list[Manifest]) -> None:
    """The image's entry point is `powercap`; a container gives either the whole command
    or only the arguments. A renamed flag or command fails here, not in CrashLoopBackOff."""
    parser = build_parser()
    seen = set()
    for workload, container in powercap_containers(bundle):
        argv = container.get("command", ["powercap"]) + container.get("args", [])
        assert argv[0] == "powercap", (workload["metadata"]["name"], container["name"])
        args = parser.parse_args(argv[1:])
        assert args.func, argv
        seen.add(argv[1])
    assert seen == {"webhook", "extender", "controller", "agent", "check-scheduler-version"}


def test_cert_manager_variant_issues_the_webhook_certificate(bundle: list[Manifest]) -> None:
    variant = kustomize_build("config/default-cert-manager")
    names = {(m["kind"], m["metadata"]["name"]) for m in bundle}
    added = [m for m in variant if (m["kind"], m["metadata"]["name"]) not in names]
    assert {(m["kind"], m["metadata"]["name"]) for m in added} == {
        ("Issuer", "powercap-selfsigned"), ("Certificate", "powercap-webhook-ca"),
        ("Issuer", "powercap-webhook-ca"), ("Certificate", "powercap-webhook"),
    }
    assert all(m["metadata"]["namespace"] == NAMESPACE for m in added)
    assert all(m["metadata"]["labels"]["app.kubernetes.io/part-of"] == "powercap" for m in variant)
    # the Secret cert-manager writes is the one the webhook mounts, valid for its Service
    certificate = find(variant, "Certificate", "powercap-webhook")
    [volume] = [v for v in find(variant, "Deployment", "powercap-webhook")["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert certificate["spec"]["secretName"] == volume["secret"]["secretName"]
    assert f"powercap-webhook.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        [config] = [m for m in variant if m["kind"] == kind]
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/powercap-webhook"


def test_monitoring_component_scrapes_every_program_with_metrics(tmp_path: Path, bundle: list[Manifest]) -> None:
    """config/default + config/monitoring, as docs/metrics.md tells operators to compose it."""
    built = kustomize_overlay(tmp_path, ["config/default"], ["config/monitoring"])
    monitors = [m for m in built if m["kind"] == "PodMonitor"]
    scraped = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        [(workload, pod)] = [
            (w, p) for w, p in pod_templates(built)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {port["name"]: c for c in pod["containers"] for port in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, (monitor["metadata"]["name"], endpoint["port"])
            assert endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]
            scraped.add(ports[endpoint["port"]]["name"])
    assert scraped == {"agent", "webhook", "extender", "controller"}
    # the extender's metrics and the controller's health server listen on the pod's address;
    # kube-scheduler's calls stay on loopback; every other argument is the bundle's
    parser = build_parser()
    before = {c["name"]: c for _, c in powercap_containers(bundle)}
    for name, flag, bind in (("extender", "metrics_bind", "0.0.0.0:8889"), ("controller", "health_bind", "0.0.0.0:8081")):
        [container] = [c for _, c in powercap_containers(built) if c["name"] == name]
        args, default = vars(parser.parse_args(container["args"])), vars(parser.parse_args(before[name]["args"]))
        assert args[flag] == bind
        assert {**args, flag: None} == {**default, flag: None}
    for workload in (bundle, built):
        [extender] = [c for _, c in powercap_containers(workload) if c["name"] == "extender"]
        assert vars(parser.parse_args(extender["args"]))["bind"] == "127.0.0.1:8888", "kube-scheduler's address stays loopback"
    [extender] = [c for _, c in powercap_containers(built) if c["name"] == "extender"]
    assert [(p["name"], p["containerPort"]) for p in extender["ports"]] == [("ext-metrics", 8889)]
    kubernetes_validate.validate(find(built, "Deployment", "power-aware-scheduler"), KUBERNETES_VERSION, strict=True)
