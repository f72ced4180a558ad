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
from powercap.cluster import ClusterSettings
from powercap.objects import RACK_LABEL
from powercap.policies import label_key_problem
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
    helm_instructions,
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


DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_a_digest_pins_every_powercap_container_and_wins_over_the_tag(chart_dir: Path) -> None:
    values = {"image": {"repository": "registry.example.com:5000/ml/powercap", "tag": "v9.9.9", "digest": DIGEST}}
    rendered = helm_template(chart_dir, values)
    assert {c["image"] for _, c in powercap_containers(rendered)} == {f"registry.example.com:5000/ml/powercap@{DIGEST}"}
    assert len(list(powercap_containers(rendered))) == 5


@pytest.mark.parametrize(("tag", "digest", "image"), [
    pytest.param("v1.37.2", DIGEST, f"registry.k8s.io/kube-scheduler:v1.37.2@{DIGEST}", id="tag-and-digest"),
    pytest.param("", DIGEST, f"registry.k8s.io/kube-scheduler@{DIGEST}", id="digest-only"),
])
def test_a_digest_pins_the_scheduler_image(chart_dir: Path, tag: str, digest: str, image: str) -> None:
    rendered = helm_template(chart_dir, {"scheduler": {"image": {"tag": tag, "digest": digest}}}, kube_version="1.37.2")
    assert scheduler_container(rendered)["image"] == image


def test_a_digest_beside_a_skewed_scheduler_tag_is_still_refused(chart_dir: Path) -> None:
    values = {"scheduler": {"image": {"tag": "v1.34.0", "digest": DIGEST}}}
    assert "is 3 minor versions older than the API server 1.37" in helm_template_error(chart_dir, values, kube_version="1.37.2")


@pytest.mark.parametrize("values", [
    pytest.param({"image": {"tag": DIGEST}}, id="digest-as-tag"),
    pytest.param({"image": {"tag": f"v1@{DIGEST}"}}, id="tag-at-digest"),
    pytest.param({"image": {"repository": "powercap:v0.1.0"}}, id="tag-in-repository"),
    pytest.param({"image": {"repository": f"powercap@{DIGEST}"}}, id="digest-in-repository"),
    pytest.param({"image": {"repository": "registry:5000"}}, id="port-without-path"),
    pytest.param({"image": {"digest": f"@{DIGEST}"}}, id="at-in-digest"),
    pytest.param({"image": {"digest": "v0.1.0"}}, id="tag-as-digest"),
    pytest.param({"scheduler": {"image": {"tag": DIGEST}}}, id="scheduler-digest-as-tag"),
    pytest.param({"scheduler": {"image": {"repository": "registry.k8s.io/kube-scheduler:v1.37.2"}}},
                 id="scheduler-tag-in-repository"),
])
def test_an_image_that_would_render_broken_is_refused(chart_dir: Path, values: dict[str, Any]) -> None:
    """`repository:sha256:...` or `repo:tag:tag` pulls nothing: helm refuses it first."""
    [(program, value)] = values.items()
    [(field, _)] = (value["image"] if program == "scheduler" else value).items()
    where = f"/{program}/image/{field}" if program == "scheduler" else f"/image/{field}"
    assert f"at '{where}'" in helm_template_error(chart_dir, values, kube_version="1.37.0")


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


def test_the_node_power_settings_reach_the_extender_and_the_controller(chart_dir: Path, chart: list[Manifest]) -> None:
    """Defaults render no flag (the programs' own defaults); set, they reach both programs that
    build a cluster view, parsed by the programs' own argument parser."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["nodePower"]
    assert (defaults["overheadW"], defaults["nonGpuRise"]) == (ClusterSettings().node_overhead_w, ClusterSettings().non_gpu_rise)
    assert not [c for _, c in powercap_containers(chart) if any("--node-overhead-w" in a for a in c.get("args", []))]
    rendered = helm_template(chart_dir, {"nodePower": {"overheadW": 1800, "nonGpuRise": 0.25}})
    set_in = {container["name"] for _, container in powercap_containers(rendered)
              if (flags := _flags(container)).get("node_overhead_w") == 1800 and flags.get("non_gpu_rise") == 0.25}
    assert set_in == {"extender", "controller"}


@pytest.mark.parametrize("rack_label", [
    pytest.param("rack", id="name-only"),
    pytest.param("topology.example.com/rack", id="prefixed"),
    pytest.param("r" * 63, id="name-63"),
    pytest.param("r" * 64, id="name-64"),
    pytest.param("example.com/" + "r" * 64, id="prefixed-name-64"),
    pytest.param(".".join(["a" * 63] * 4)[:253] + "/rack", id="prefix-253"),
    pytest.param(".".join(["a" * 63] * 4)[:251] + ".ab/rack", id="prefix-254"),
    pytest.param("Example.com/rack", id="uppercase-prefix"),
    pytest.param("/rack", id="empty-prefix"),
    pytest.param("racks/of/gpus", id="two-slashes"),
    pytest.param("rack-", id="ends-with-dash"),
])
def test_the_schema_accepts_exactly_the_rack_labels_the_programs_accept(chart_dir: Path, rack_label: str) -> None:
    """A rack label the agent would refuse at start-up (CrashLoopBackOff on every GPU node,
    no caps) is refused by `helm install`, and one it accepts renders."""
    if label_key_problem(rack_label) is None:
        helm_template(chart_dir, {"rackLabel": rack_label})
    else:
        assert "at '/rackLabel'" in helm_template_error(chart_dir, {"rackLabel": rack_label}, kube_version="1.37.0")


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


PROGRAM_WORKLOADS = {"webhook": "powercap-webhook", "scheduler": "power-aware-scheduler",
                     "controller": "powercap-controller", "agent": "powercap-agent"}


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, str]) -> bool:
    """Whether a pod with these tolerations may run on a node with this NoSchedule or
    NoExecute taint (Kubernetes' matching: an empty effect matches every effect, an empty
    key with Exists every key, Equal, the default operator, also compares the value)."""
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint["effect"]:
            continue
        if toleration.get("operator", "Equal") == "Exists":
            if not toleration.get("key") or toleration["key"] == taint["key"]:
                return True
        elif toleration.get("key") == taint["key"] and toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
DEDICATED_TAINT = {"key": "dedicated", "value": "inference", "effect": "NoSchedule"}


def test_the_agent_tolerates_the_gpu_taint_by_default_and_any_other_when_told(chart_dir: Path, chart: list[Manifest]) -> None:
    """A GPU node with a taint the agent does not tolerate gets no agent, so its GPUs get no
    caps: agent.tolerations keeps the nvidia.com/gpu toleration and adds the node's."""
    default = find(chart, "DaemonSet", "powercap-agent")["spec"]["template"]["spec"]["tolerations"]
    assert tolerates(default, GPU_TAINT) and not tolerates(default, DEDICATED_TAINT)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    tolerations = [*values["agent"]["tolerations"], {"key": "dedicated", "operator": "Equal", "value": "inference",
                                                      "effect": "NoSchedule"}]
    rendered = helm_template(chart_dir, {"agent": {"tolerations": tolerations}})
    pods = {w["metadata"]["name"]: pod for w, pod in pod_templates(rendered)}
    assert tolerates(pods["powercap-agent"]["tolerations"], GPU_TAINT)
    assert tolerates(pods["powercap-agent"]["tolerations"], DEDICATED_TAINT)
    assert [name for name, pod in pods.items() if "tolerations" in pod] == ["powercap-agent"]


@pytest.mark.parametrize("program", PROGRAM_WORKLOADS)
def test_placement_per_program(chart_dir: Path, program: str) -> None:
    """nodeSelector, tolerations and affinity reach that program's pods and no other's, and
    pass the Kubernetes schemas. Helm merges a map value into the default map (the
    scheduler's and controller's podAntiAffinity stay beside a nodeAffinity)."""
    placement = {
        "nodeSelector": {"node-role.example.com/system": "true"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": [program]}]}]}}},
    }
    rendered = helm_template(chart_dir, {program: placement})
    for workload, pod in pod_templates(rendered):
        mine = workload["metadata"]["name"] == PROGRAM_WORKLOADS[program]
        for field, value in placement.items():
            found = pod.get(field)
            given = found == value or (isinstance(value, dict) and isinstance(found, dict) and value.items() <= found.items())
            assert given == mine, (workload["metadata"]["name"], field)
    assert schema_problems(rendered, f"{SUPPORTED_KUBERNETES_MINORS[-1]}.0") == {}


def test_pull_secrets_and_annotations_reach_every_pod(chart_dir: Path, chart: list[Manifest]) -> None:
    values = {"imagePullSecrets": [{"name": "my-registry"}],
              "podAnnotations": {"example.com/team": "ml-infra", "prometheus.io/port": "1"}}
    rendered = helm_template(chart_dir, values)
    pods = {w["metadata"]["name"]: (w["spec"]["template"]["metadata"], pod) for w, pod in pod_templates(rendered)}
    defaults = {w["metadata"]["name"]: w["spec"]["template"]["metadata"].get("annotations", {})
                for w, _ in pod_templates(chart)}
    assert set(pods) == set(PROGRAM_WORKLOADS.values())
    for name, (metadata, pod) in pods.items():
        assert pod["imagePullSecrets"] == [{"name": "my-registry"}], name
        assert metadata["annotations"]["example.com/team"] == "ml-infra", name
        assert defaults[name].items() <= metadata["annotations"].items(), f"{name}: the chart's own annotations stay"
    assert pods["powercap-agent"][0]["annotations"]["prometheus.io/port"] == "9402", "the agent's metrics port wins"
    assert schema_problems(rendered, f"{SUPPORTED_KUBERNETES_MINORS[-1]}.0") == {}


@pytest.mark.parametrize(("values", "where"), [
    pytest.param({"agent": {"tolerations": [{"key": "dedicated", "effect": "NoScheduling"}]}}, "/agent/tolerations/0/effect",
                 id="toleration-effect"),
    pytest.param({"controller": {"affinity": {"nodeAfinity": {}}}}, "/controller/affinity", id="affinity-misspelt"),
    pytest.param({"webhook": {"nodeSelector": {"pool": True}}}, "/webhook/nodeSelector/pool", id="node-selector-bool"),
    pytest.param({"imagePullSecrets": ["my-registry"]}, "/imagePullSecrets/0", id="pull-secret-string"),
    pytest.param({"podAnnotations": {"example.com/port": 1}}, "/podAnnotations/example.com~1port", id="annotation-int"),
])
def test_placement_values_that_kubernetes_would_refuse_are_refused_by_helm(
    chart_dir: Path, values: dict[str, Any], where: str,
) -> None:
    assert f"at '{where}'" in helm_template_error(chart_dir, values, kube_version="1.37.0")


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


@pytest.mark.parametrize(("values", "release_namespace"), [
    pytest.param({}, "gpu-power", id="helm-install-n"),
    pytest.param({"namespace": {"name": "gpu-power"}}, "releases", id="namespace-name"),
])
def test_another_namespace_reaches_every_reference(chart_dir: Path, values: dict[str, Any], release_namespace: str) -> None:
    """`helm install -n gpu-power` installs into gpu-power (not powercap-system), as does
    namespace.name for a release kept elsewhere."""
    rendered = helm_template(chart_dir, merged(EVERYTHING_ON, values), namespace=release_namespace)
    cert_manager = helm_template(chart_dir, merged(values, {"certManager": {"enabled": True}}),
                                 namespace=release_namespace)
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
    """Dotted paths of the values an operator sets (a resources, labels, affinity,
    nodeSelector or annotations map is one)."""
    paths = []
    for name, value in values.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and name not in ("resources", "labels", "affinity", "nodeSelector",
                                                    "podAnnotations"):
            paths += _value_paths(value, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_every_value_is_documented_in_operations_md() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    paths = _value_paths(values)
    assert {"scheduler.image.tag", "agent.resources", "agent.affinity", "podAnnotations"} <= set(paths)
    assert [p for p in paths if f"`{p}`" not in operations] == [], "docs/operations.md#the-helm-chart lists every value"

@pytest.mark.parametrize("document", ["README.md", "docs/operations.md"])
def test_the_helm_instructions_label_the_namespace_as_config_default_before_installing(
    bundle: list[Manifest], document: str,
) -> None:
    """Where the cluster's default Pod Security level is baseline or restricted, the agent's
    pods are refused as soon as the DaemonSet exists: the namespace must carry
    config/default's labels before `helm install`, not after, and all of them."""
    lines = helm_instructions(REPO_ROOT / document)
    [install] = [i for i, line in enumerate(lines) if line.startswith("helm install")]
    [label] = [i for i, line in enumerate(lines) if line.startswith("kubectl label namespace")]
    assert [i for i, line in enumerate(lines) if line.startswith("kubectl create namespace")] == [label - 1]
    assert label < install and "--create-namespace" not in lines[install]
    words = lines[label].split()
    namespace = words[3]
    assert f"-n {namespace}" in lines[install]
    labels = dict(word.split("=", 1) for word in words[4:])
    expected = {k: v for k, v in find(bundle, "Namespace", NAMESPACE)["metadata"]["labels"].items()
                if k.startswith("pod-security.kubernetes.io/")}
    assert labels == expected


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
