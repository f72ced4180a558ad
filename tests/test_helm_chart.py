"""charts/powercap installs what `kubectl apply -k config/default` installs.

Rendered with the real helm (scripts/helm.sh), every object passes the Kubernetes schemas
of every supported minor, and the chart is compared with the kustomize bundle object by
object, whole: kinds, names, namespaces, labels, RBAC rules, container commands, images,
probes, security contexts, ports, volumes. What legitimately differs is normalised first
(tests/helmchart.py), and nothing else:

- Helm's standard labels (managed-by, instance, version, helm.sh/chart) on every object's
  metadata;
- the ConfigMap that kustomize generates has a hash suffix in its name; the chart names it
  plainly and rolls the pods with a ``checksum/config`` annotation instead;
- without cert-manager the chart makes the webhook's CA and certificate (Secrets
  powercap-webhook-ca and powercap-webhook-tls) and fills the caBundle, which with kustomize
  scripts/webhook-certs.sh does after the apply (checked on their own below);
- the order of a pod's containers: kustomize's strategic-merge patches (config/monitoring's)
  move the containers they patch to the front;
- the CRDs: Helm installs crds/ as it is, without the part-of label kustomize adds (they
  are the same files: symbolic links to config/crd's).
"""

from __future__ import annotations

import base64
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from powercap.commands import build_parser
from powercap.objects import RACK_LABEL
from tests.conftest import REPO_ROOT
from tests.helmchart import (
    CHART,
    CHECKSUM_ANNOTATION,
    HELM_LABELS,
    SELF_SIGNED_SECRETS,
    differences,
    helm,
    helm_run,
    helm_stderr,
    helm_template,
    helm_template_error,
    key,
    normalise_chart,
    normalise_kustomize,
)
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

CRD_FILES = ("powercapping.example.com_powercappingpolicies.yaml", "powercapping.example.com_powercapnodes.yaml")
# The values that make the chart render config/default as kustomize builds it: its
# placeholder image tag, and the Namespace object.
AS_KUSTOMIZE: dict[str, Any] = {"image": {"tag": "latest"}, "namespace": {"create": True}}
# Kinds whose schemas are not Kubernetes' (kubernetes-validate has none for them).
CUSTOM_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")
EVERYTHING_ON: dict[str, Any] = {"monitoring": {"enabled": True}, "namespace": {"create": True}}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(name), dict):
                result[name] = merged(result[name], value)
            else:
                result[name] = value
    return result


def scheduler_container(manifests: list[Manifest]) -> dict[str, Any]:
    [container] = [c for _, pod in pod_templates(manifests) for c in pod["containers"] if c["name"] == "kube-scheduler"]
    return container


def kustomize_scheduler_version(bundle: list[Manifest]) -> str:
    """The Kubernetes release config/default's kube-scheduler image is (v1.37.2): the
    chart, told the cluster is that release, must pick the same image."""
    return scheduler_container(bundle)["image"].rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def bundle() -> list[Manifest]:
    return kustomize_build("config/default")


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


@pytest.fixture(scope="module")
def chart(chart_dir: Path) -> list[Manifest]:
    """The chart with its defaults, on the newest supported Kubernetes."""
    return helm_template(chart_dir)


# --- the chart and the kustomize bundle cannot drift ---------------------------------------

def _monitoring_overlay(tmp_path: Path) -> list[Manifest]:
    return kustomize_overlay(tmp_path, ["config/default"], ["config/monitoring"])


@pytest.mark.parametrize(
    ("build", "values"),
    [
        pytest.param(lambda _: kustomize_build("config/default"), {}, id="config-default"),
        pytest.param(_monitoring_overlay, {"monitoring": {"enabled": True}}, id="monitoring"),
        pytest.param(lambda _: kustomize_build("config/default-cert-manager"), {"certManager": {"enabled": True}},
                     id="cert-manager"),
    ],
)
def test_the_chart_renders_what_kustomize_builds(
    tmp_path: Path, build: Callable[[Path], list[Manifest]], values: dict[str, Any]
) -> None:
    built = [m for m in build(tmp_path) if m["kind"] != "CustomResourceDefinition"]
    rendered = helm_template(tmp_path, merged(AS_KUSTOMIZE, values), kube_version=kustomize_scheduler_version(built))
    self_signed = not values.get("certManager", {}).get("enabled", False)
    chart = normalise_chart(rendered, self_signed)
    expected = normalise_kustomize(built, {m["metadata"]["name"] for m in chart})
    found = differences(expected, chart)
    assert not found, (
        "charts/powercap and the kustomize bundle differ (normalised as tests/test_helm_chart.py's docstring says); "
        f"change charts/powercap/templates the way config/ changed:\n{found}"
    )


def test_the_normalisation_lets_no_real_difference_through(chart_dir: Path, bundle: list[Manifest]) -> None:
    rendered = helm_template(chart_dir, AS_KUSTOMIZE, kube_version=kustomize_scheduler_version(bundle))
    chart = normalise_chart(rendered, self_signed=True)
    webhook = find(chart, "Deployment", "powercap-webhook")
    webhook["spec"]["template"]["spec"]["containers"][0]["args"] = ["--workers=9"]
    find(chart, "ClusterRole", "powercap-extender")["rules"][0]["verbs"].append("get")
    expected = normalise_kustomize([m for m in bundle if m["kind"] != "CustomResourceDefinition"],
                                   {m["metadata"]["name"] for m in chart})
    found = differences(expected, chart)
    assert "('Deployment', 'powercap-system', 'powercap-webhook') differs" in found
    assert re.search(r"^\+ +- --workers=9$", found, re.MULTILINE)
    assert "('ClusterRole', '', 'powercap-extender') differs" in found
    assert differences(expected, chart[1:]).startswith("only in kustomize: ")


def test_the_crds_are_config_crds_files(chart_dir: Path, bundle: list[Manifest]) -> None:
    """Helm installs crds/ verbatim (never templated, never upgraded); the files there are
    symbolic links to config/crd's, which helm follows (and says so on stderr)."""
    for crd_file in CRD_FILES:
        chart_crd = CHART / "crds" / crd_file
        assert chart_crd.read_bytes() == (REPO_ROOT / "config" / "crd" / crd_file).read_bytes()
    rendered = sorted((m for m in helm_template(chart_dir, include_crds=True) if m["kind"] == "CustomResourceDefinition"),
                      key=lambda m: m["metadata"]["name"])
    built = sorted((m for m in bundle if m["kind"] == "CustomResourceDefinition"), key=lambda m: m["metadata"]["name"])
    assert len(built) == len(CRD_FILES)
    for crd in built:
        del crd["metadata"]["labels"]["app.kubernetes.io/part-of"]
        if not crd["metadata"]["labels"]:
            del crd["metadata"]["labels"]
    assert rendered == built


# --- valid Kubernetes, lint-clean ------------------------------------------------------------

@pytest.mark.parametrize("minor", SUPPORTED_KUBERNETES_MINORS)
def test_every_object_passes_the_schemas_of_every_supported_kubernetes(chart_dir: Path, minor: str) -> None:
    """Everything on (monitoring, the Namespace, the self-signed certificate; cert-manager's
    objects in the next render), against each minor's schemas, with the scheduler image
    that minor's cluster gets."""
    version = f"{minor}.0"
    everything = helm_template(chart_dir, EVERYTHING_ON, kube_version=version, include_crds=True)
    rendered = everything + helm_template(chart_dir, {"certManager": {"enabled": True}}, kube_version=version)
    kubernetes_kinds = [m for m in rendered if not m["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert len(kubernetes_kinds) > 30
    assert schema_problems(kubernetes_kinds, version) == {}
    assert scheduler_container(everything)["image"] == f"registry.k8s.io/kube-scheduler:v{version}"


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON, {"certManager": {"enabled": True}}],
                         ids=["defaults", "monitoring-namespace", "cert-manager"])
def test_helm_lint_strict_passes(tmp_path: Path, values: dict[str, Any]) -> None:
    result = helm_run("lint", "--strict", str(CHART), "--kube-version", f"{SUPPORTED_KUBERNETES_MINORS[-1]}.0",
                      values=values, tmp_dir=tmp_path)
    assert result.returncode == 0, result.stdout + helm_stderr(result)
    assert "0 chart(s) failed" in result.stdout


def test_chart_versions_follow_the_package_and_the_supported_range() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == package
    assert chart["kubeVersion"] == f">={SUPPORTED_KUBERNETES_MINORS[0]}.0-0"


def test_a_cluster_older_than_the_supported_range_is_refused(chart_dir: Path) -> None:
    oldest = SUPPORTED_KUBERNETES_MINORS[0]
    older = f"1.{int(oldest.split('.')[1]) - 1}.5"
    assert "is incompatible with Kubernetes" in helm_template_error(chart_dir, kube_version=older)
    helm_template(chart_dir, kube_version=f"{oldest}.0")


# --- values -----------------------------------------------------------------------------------

def test_defaults_install_no_namespace_no_monitoring_and_no_cert_manager(chart: list[Manifest]) -> None:
    kinds = {m["kind"] for m in chart}
    assert "Namespace" not in kinds, "with `helm install -n ... --create-namespace` Helm makes it"
    assert not [m for m in chart if m["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert {c["image"] for _, c in powercap_containers(chart)} == {"powercap:v0.1.0"}
    for m in chart:
        assert HELM_LABELS <= m["metadata"]["labels"].keys(), key(m)
        assert m["metadata"]["labels"]["app.kubernetes.io/part-of"] == "powercap", key(m)
    for workload, pod in pod_templates(chart):
        assert not HELM_LABELS & workload["spec"]["selector"]["matchLabels"].keys()
        assert not HELM_LABELS & workload["spec"]["template"]["metadata"]["labels"].keys()


def test_the_image_reaches_every_powercap_container(chart_dir: Path, chart: list[Manifest]) -> None:
    values = {"image": {"repository": "registry.example.com/ml/powercap", "tag": "v9.9.9", "pullPolicy": "Always"}}
    rendered = helm_template(chart_dir, values)
    containers = [c for _, c in powercap_containers(rendered)]
    assert len(containers) == len(list(powercap_containers(chart))) == 5
    assert {c["image"] for c in containers} == {"registry.example.com/ml/powercap:v9.9.9"}
    assert {c.get("imagePullPolicy") for c in containers} == {"Always"}
    others = {c["image"] for _, pod in pod_templates(rendered) for c in pod["containers"]} - {c["image"] for c in containers}
    assert {image_name(i) for i in others} == {"registry.k8s.io/kube-scheduler"}


def _flags(container: dict[str, Any]) -> dict[str, Any]:
    argv = container.get("command", ["powercap"]) + container.get("args", [])
    assert argv[0] == "powercap", container["name"]
    return vars(build_parser().parse_args(argv[1:]))


def test_the_rack_label_reaches_every_program_that_takes_it(chart_dir: Path, chart: list[Manifest]) -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults["rackLabel"] == RACK_LABEL, "the chart's default is the programs' own"
    assert not [c for _, c in powercap_containers(chart) if any("--rack-label" in a for a in c.get("args", []))]
    rendered = helm_template(chart_dir, {"rackLabel": "topology.example.com/rack"})
    takers = set()
    for _, container in powercap_containers(rendered):
        flags = _flags(container)
        if "rack_label" in flags:
            assert flags["rack_label"] == "topology.example.com/rack", container["name"]
            takers.add(container["name"])
    assert takers == {"extender", "controller", "agent"}


@pytest.mark.parametrize(("program", "kind", "name"), [
    ("webhook", "Deployment", "powercap-webhook"),
    ("scheduler", "Deployment", "power-aware-scheduler"),
    ("controller", "Deployment", "powercap-controller"),
])
def test_replicas_and_their_disruption_budget(chart_dir: Path, program: str, kind: str, name: str) -> None:
    three = helm_template(chart_dir, {program: {"replicas": 3}})
    assert find(three, kind, name)["spec"]["replicas"] == 3
    assert find(three, "PodDisruptionBudget", name)["spec"]["minAvailable"] == 1
    one = helm_template(chart_dir, {program: {"replicas": 1}})
    assert find(one, kind, name)["spec"]["replicas"] == 1
    assert not [m for m in one if key(m)[::2] == ("PodDisruptionBudget", name)], \
        "a PodDisruptionBudget of minAvailable 1 over one replica would block every node drain"


@pytest.mark.parametrize(("program", "container"), [
    ("webhook", "webhook"), ("scheduler", "kube-scheduler"), ("extender", "extender"),
    ("controller", "controller"), ("agent", "agent"),
])
def test_resources_per_program(chart_dir: Path, program: str, container: str) -> None:
    resources = {"requests": {"cpu": "1234m", "memory": "321Mi"}, "limits": {"memory": "4321Mi"}}
    rendered = helm_template(chart_dir, {program: {"resources": resources}})
    found = {c["name"]: c.get("resources") for _, pod in pod_templates(rendered) for c in pod["containers"]}
    assert found.pop(container) == resources
    assert resources not in found.values()


def test_monitoring_off_renders_no_monitoring_objects_and_on_renders_them_all(chart_dir: Path, chart: list[Manifest]) -> None:
    assert not [m for m in chart if m["apiVersion"].startswith("monitoring.coreos.com/")]
    labels = {"release": "kube-prometheus-stack"}
    on = helm_template(chart_dir, {"monitoring": {"enabled": True, "labels": labels}})
    monitoring = [m for m in on if m["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {m["kind"] for m in monitoring} == {"PodMonitor", "PrometheusRule"}
    for m in monitoring:
        assert labels.items() <= m["metadata"]["labels"].items(), key(m)
    assert yaml.safe_load((REPO_ROOT / "config" / "monitoring" / "alerts.yaml").read_text())["spec"] == \
        find(on, "PrometheusRule", "powercap")["spec"], "the alerts are config/monitoring's, Prometheus templates untouched"
    dashboard = find(on, "ConfigMap", "powercap-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["grafana-dashboard.json"] == \
        (REPO_ROOT / "config" / "monitoring" / "grafana-dashboard.json").read_text()
    assert not [m for m in chart if m["metadata"]["name"] == "powercap-grafana-dashboard"]


def test_another_namespace_reaches_every_reference(chart_dir: Path) -> None:
    rendered = helm_template(chart_dir, merged(EVERYTHING_ON, {"namespace": {"name": "gpu-power"}}),
                             namespace="gpu-power")
    cert_manager = helm_template(chart_dir, {"namespace": {"name": "gpu-power"}, "certManager": {"enabled": True}},
                                 namespace="gpu-power")
    assert NAMESPACE not in yaml.safe_dump_all(rendered + cert_manager)
    namespaces = {m["metadata"].get("namespace") for m in rendered + cert_manager}
    assert namespaces == {None, "gpu-power", "kube-system"}
    config = find(rendered, "ConfigMap", "power-aware-scheduler-config")["data"]["scheduler-config.yaml"]
    assert yaml.safe_load(config)["leaderElection"]["resourceNamespace"] == "gpu-power"
    [controller] = [c for _, c in powercap_containers(rendered) if c["name"] == "controller"]
    assert _flags(controller)["lease_namespace"] == "gpu-power"
    assert "powercap-webhook.gpu-power.svc" in find(cert_manager, "Certificate", "powercap-webhook")["spec"]["dnsNames"]


def test_the_namespace_is_labelled_for_pod_security(chart_dir: Path) -> None:
    [namespace] = [m for m in helm_template(chart_dir, {"namespace": {"create": True}}) if m["kind"] == "Namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged", "the agent needs hostPID and CAP_SYS_ADMIN"


def test_the_scheduler_configuration_is_config_schedulers(chart: list[Manifest]) -> None:
    config = find(chart, "ConfigMap", "power-aware-scheduler-config")["data"]["scheduler-config.yaml"]
    assert config == (REPO_ROOT / "config" / "scheduler" / "scheduler-config.yaml").read_text()
    annotations = find(chart, "Deployment", "power-aware-scheduler")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations[CHECKSUM_ANNOTATION])




@pytest.mark.parametrize(("values", "message"), [
    pytest.param({"webhook": {"replica": 3}}, "at '/webhook': additional properties 'replica' not allowed", id="misspelt"),
    pytest.param({"rackLabel": "racks/of/gpus"}, "at '/rackLabel': 'racks/of/gpus' does not match pattern", id="not-a-label-key"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'", id="pull-policy"),
    pytest.param({"controller": {"replicas": 0}}, "at '/controller/replicas': minimum: got 0, want 1", id="no-replica"),
])
def test_values_schema_refuses_mistakes(chart_dir: Path, values: dict[str, Any], message: str) -> None:
    assert message in helm_template_error(chart_dir, values, kube_version="1.37.0")

def _value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the values an operator sets (a resources or labels map is one)."""
    paths = []
    for name, value in values.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and name not in ("resources", "labels"):
            paths += _value_paths(value, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_every_value_is_documented_in_operations_md() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    paths = _value_paths(values)
    assert "scheduler.image.tag" in paths and "agent.resources" in paths
    assert [p for p in paths if f"`{p}`" not in operations] == [], "docs/operations.md#the-helm-chart lists every value"

# --- the webhook's certificate ------------------------------------------------------------

def _pem(secret: Manifest, field: str) -> bytes:
    return base64.b64decode(secret["data"][field])


def test_without_cert_manager_the_chart_signs_the_webhook_certificate(chart: list[Manifest]) -> None:
    secrets = {name: find(chart, "Secret", name) for name in SELF_SIGNED_SECRETS}
    tls, ca_secret = secrets["powercap-webhook-tls"], secrets["powercap-webhook-ca"]
    assert tls["type"] == ca_secret["type"] == "kubernetes.io/tls"
    ca = x509.load_pem_x509_certificate(_pem(ca_secret, "tls.crt"))
    serving = x509.load_pem_x509_certificate(_pem(tls, "tls.crt"))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    serving.verify_directly_issued_by(ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"powercap-webhook.{NAMESPACE}.svc" in names
    usages = serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    assert (serving.not_valid_after_utc - serving.not_valid_before_utc).days == 365
    assert _pem(tls, "ca.crt") == _pem(ca_secret, "tls.crt")
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        [config] = [m for m in chart if m["kind"] == kind]
        assert base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"]) == _pem(ca_secret, "tls.crt")
    # the Secret the chart writes is the one the webhook mounts
    [volume] = [v for v in find(chart, "Deployment", "powercap-webhook")["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == tls["metadata"]["name"]


def test_with_cert_manager_no_secret_and_no_ca_bundle_are_rendered(chart_dir: Path) -> None:
    rendered = helm_template(chart_dir, {"certManager": {"enabled": True}})
    assert not [m for m in rendered if m["kind"] == "Secret" and m["metadata"]["name"] in SELF_SIGNED_SECRETS]
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        [config] = [m for m in rendered if m["kind"] == kind]
        assert "caBundle" not in config["webhooks"][0]["clientConfig"]
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/powercap-webhook"


# --- the scheduler image and the version skew policy ---------------------------------------

@pytest.mark.parametrize(("cluster", "image"), [
    pytest.param("1.33.1", "v1.33.1", id="plain"),
    pytest.param("v1.31.2-eks-a737599", "v1.31.2", id="eks-suffix"),
    pytest.param("v1.32.4+k3s1", "v1.32.4", id="k3s-suffix"),
])
def test_the_scheduler_image_follows_the_cluster(chart_dir: Path, cluster: str, image: str) -> None:
    rendered = helm_template(chart_dir, kube_version=cluster)
    assert scheduler_container(rendered)["image"] == f"registry.k8s.io/kube-scheduler:{image}"


@pytest.mark.parametrize(("cluster", "tag", "message"), [
    pytest.param("1.31.0", "v1.33.0",
                 "kube-scheduler 1.33 (image registry.k8s.io/kube-scheduler:v1.33.0) is newer than the API server 1.31; "
                 "the version skew policy allows kube-scheduler 1.31 or 1.30", id="newer"),
    pytest.param("1.33.0", "v1.30.4",
                 "kube-scheduler 1.30 (image registry.k8s.io/kube-scheduler:v1.30.4) is 3 minor versions older than "
                 "the API server 1.33; the version skew policy allows kube-scheduler 1.33 or 1.32", id="older"),
    pytest.param("1.33.0", "v1.31.9", "is 2 minor versions older than the API server 1.33", id="two-older"),
])
def test_the_skew_check_refuses_what_the_policy_does_not_support(chart_dir: Path, cluster: str, tag: str, message: str) -> None:
    error = helm_template_error(chart_dir, {"scheduler": {"image": {"tag": tag}}}, kube_version=cluster)
    assert message in error
    assert "scheduler.image.tag" in error


@pytest.mark.parametrize(("cluster", "tag"), [
    pytest.param("1.33.0", "v1.32.7", id="one-older"),
    pytest.param("1.33.0", "v1.33.0", id="same"),
    pytest.param("1.33.0", "latest", id="no-version-not-checked"),
])
def test_the_skew_check_accepts_what_the_policy_supports(chart_dir: Path, cluster: str, tag: str) -> None:
    rendered = helm_template(chart_dir, {"scheduler": {"image": {"tag": tag}}}, kube_version=cluster)
    assert scheduler_container(rendered)["image"] == f"registry.k8s.io/kube-scheduler:{tag}"


# --- finding helm ----------------------------------------------------------------------------

@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)],
                         ids=["ci-fails", "elsewhere-skips"])
def test_a_missing_helm_fails_in_ci_and_skips_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        ci: str, outcome: type[BaseException]) -> None:
    monkeypatch.delenv("POWERCAP_HELM", raising=False)
    monkeypatch.setenv("POWERCAP_CACHE_DIR", str(tmp_path))  # an empty cache: nothing built
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="run scripts/helm.sh build"):
        helm()
