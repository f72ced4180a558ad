"""Render charts/powercap with the real helm, and put it beside the kustomize bundle.

helm is built from the Go module proxy by scripts/helm.sh (cached outside the repository);
scripts/test.sh builds it before the unit suite and passes its path in $POWERCAP_HELM.
Where it is missing the tests that need it are skipped, saying how to build it, except in
CI (CI=true), where they fail: a chart that nobody rendered must not pass for a checked one.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.manifests import Manifest

CHART = REPO_ROOT / "charts" / "powercap"
RELEASE = "powercap"
# Labels Helm's conventions add to every object's metadata (never to selectors or pods).
HELM_LABELS = frozenset({"app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
                         "app.kubernetes.io/version", "helm.sh/chart"})
# The chart's pod-template annotation that rolls the scheduler's pods when its
# configuration changes: what kustomize's ConfigMap name suffix does.
CHECKSUM_ANNOTATION = "checksum/config"
# The Secrets the chart makes for the webhook without cert-manager; with kustomize,
# scripts/webhook-certs.sh makes the first and keeps the CA in a local directory.
SELF_SIGNED_SECRETS = ("powercap-webhook-tls", "powercap-webhook-ca")
# kustomize's configMapGenerator suffix: a dash and 10 characters of a hash.
_GENERATED_SUFFIX = re.compile(r"^(?P<base>.+)-[a-z0-9]{10}$")


def helm_instructions(document: Path) -> list[str]:
    """The shell lines (continuations joined) of ``document``'s code block that runs
    `helm install`: what an operator types, in order."""
    blocks = re.findall(r"```sh\n(.*?)```", document.read_text(), re.DOTALL)
    [block] = [b for b in blocks if "helm install" in b]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def helm() -> str:
    """The helm that scripts/helm.sh built ($POWERCAP_HELM, else its cache)."""
    path = os.environ.get("POWERCAP_HELM")
    if not path:
        found = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "helm.sh"), "path"],
                               capture_output=True, text=True, timeout=60)
        path = found.stdout.strip() if found.returncode == 0 else ""
    if path and os.access(path, os.X_OK):
        return path
    why = "helm is not built: run scripts/helm.sh build (scripts/test.sh does it before the unit suite)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def helm_run(*args: str, values: Mapping[str, Any] | None = None, tmp_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """helm ARGS [-f VALUES], VALUES written as a file in ``tmp_dir``."""
    command = [helm(), *args]
    if values:
        assert tmp_dir is not None, "values need a directory for their file"
        path = tmp_dir / f"values-{len(list(tmp_dir.glob('values-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(dict(values)))
        command += ["--values", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def template_args(kube_version: str, namespace: str, include_crds: bool) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace, "--kube-version", kube_version]
    return args + (["--include-crds"] if include_crds else [])


def helm_template(tmp_dir: Path, values: Mapping[str, Any] | None = None, *, kube_version: str = "1.37.2",
                  namespace: str = "powercap-system", include_crds: bool = False) -> list[Manifest]:
    """The objects `helm template` renders with these values against this Kubernetes."""
    result = helm_run(*template_args(kube_version, namespace, include_crds), values=values, tmp_dir=tmp_dir)
    assert result.returncode == 0, f"helm template failed:\n{helm_stderr(result)}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def helm_template_error(tmp_dir: Path, values: Mapping[str, Any] | None = None, *, kube_version: str) -> str:
    """Why `helm template` refuses these values (it must)."""
    result = helm_run(*template_args(kube_version, "powercap-system", False), values=values, tmp_dir=tmp_dir)
    assert result.returncode != 0, f"helm template rendered these values on Kubernetes {kube_version}: {values}"
    return helm_stderr(result)


def helm_stderr(result: subprocess.CompletedProcess[str]) -> str:
    """stderr without the loader's note on each symbolic link the chart holds."""
    return "\n".join(line for line in result.stderr.splitlines() if "found symbolic link in path" not in line)


def key(manifest: Manifest) -> tuple[str, str, str]:
    meta = manifest["metadata"]
    return manifest["kind"], meta.get("namespace", ""), meta["name"]


def _replace_strings(value: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return renames.get(value, value)
    if isinstance(value, list):
        return [_replace_strings(v, renames) for v in value]
    if isinstance(value, dict):
        return {k: _replace_strings(v, renames) for k, v in value.items()}
    return value


def normalise_kustomize(bundle: Iterable[Manifest], chart_names: set[str]) -> list[Manifest]:
    """kustomize's objects with generated ConfigMap names (``name-<hash>``) back to the
    names the chart gives them, wherever they are referred to."""
    bundle = list(bundle)
    renames = {}
    for m in bundle:
        match = _GENERATED_SUFFIX.match(m["metadata"]["name"])
        if m["kind"] == "ConfigMap" and match and match["base"] in chart_names:
            renames[m["metadata"]["name"]] = match["base"]
    return [_replace_strings(m, renames) for m in bundle]


def normalise_chart(rendered: Iterable[Manifest], self_signed: bool) -> list[Manifest]:
    """The chart's objects less what only Helm adds: its standard labels, the checksum
    annotation on pod templates, and (``self_signed``) the webhook's Secrets and caBundle."""
    result = []
    for m in rendered:
        if self_signed and m["kind"] == "Secret" and m["metadata"]["name"] in SELF_SIGNED_SECRETS:
            continue
        m = yaml.safe_load(yaml.safe_dump(m))  # a deep copy
        labels = m["metadata"].get("labels", {})
        for label in HELM_LABELS & labels.keys():
            del labels[label]
        template = m.get("spec", {}).get("template", {}).get("metadata", {})
        template.get("annotations", {}).pop(CHECKSUM_ANNOTATION, None)
        if template.get("annotations") == {}:
            del template["annotations"]
        if self_signed:
            for webhook in m.get("webhooks", []):
                webhook["clientConfig"].pop("caBundle", None)
        result.append(m)
    return result


def _containers_by_name(manifest: Manifest) -> Manifest:
    pod = manifest.get("spec", {}).get("template", {}).get("spec")
    if pod and "containers" in pod:
        manifest = yaml.safe_load(yaml.safe_dump(manifest))
        pod = manifest["spec"]["template"]["spec"]
        pod["containers"].sort(key=lambda c: c["name"])
    return manifest


def differences(expected: Iterable[Manifest], actual: Iterable[Manifest]) -> str:
    """What differs between two sets of objects, keyed by kind, namespace and name: the
    keys only one has, and a unified diff of each object that differs. Empty when equal.
    A pod's containers are compared by name, in any order (kustomize's strategic-merge
    patches move the containers they patch to the front)."""
    left = {key(m): _containers_by_name(m) for m in expected}
    right = {key(m): _containers_by_name(m) for m in actual}
    lines = [f"only in kustomize: {k}" for k in sorted(left.keys() - right.keys())]
    lines += [f"only in the chart: {k}" for k in sorted(right.keys() - left.keys())]
    for k in sorted(left.keys() & right.keys()):
        if left[k] != right[k]:
            a = yaml.safe_dump(left[k], sort_keys=True).splitlines()
            b = yaml.safe_dump(right[k], sort_keys=True).splitlines()
            lines.append(f"{k} differs:")
            lines += difflib.unified_diff(a, b, "kustomize", "chart", lineterm="", n=2)
    return "\n".join(lines)
