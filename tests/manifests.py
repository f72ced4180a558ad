"""Build kustomizations offline with the kubectl on the machine, and look into the result.

kubectl embeds kustomize (`kubectl kustomize DIR`), so no cluster and no network are
needed. Where kubectl is missing the tests that need a build are skipped, saying why; it
is installed on the developers' machines and in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO_ROOT

Manifest = dict[str, Any]
POWERCAP_IMAGE = "powercap"  # the image name every powercap container uses (kustomize `images:` key)
NAMESPACE = "powercap-system"
# The Kubernetes minors README.md says powercap supports: the manifests pass each one's
# schemas (tests/test_deploy_bundle.py) and the end-to-end suite runs on the newest
# (scripts/controlplane.sh). 1.30: ValidatingAdmissionPolicy and the CRD rules' reason and
# fieldPath are GA from there.
SUPPORTED_KUBERNETES_MINORS = tuple(f"1.{minor}" for minor in range(30, 38))


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: the offline kustomize build (`kubectl kustomize`) cannot run here")
    return path


def kustomize_build(directory: Path | str) -> list[Manifest]:
    """The objects `kubectl kustomize DIRECTORY` prints (a path relative to the repository)."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(REPO_ROOT / directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kustomize_overlay(tmp_path: Path, resources: Sequence[str], components: Sequence[str] = (), **fields: Any) -> list[Manifest]:
    """Build an operator's overlay in ``tmp_path`` on the repository's kustomizations
    (``resources`` and ``components`` relative to the repository), with more ``fields``."""
    def relative(path: str) -> str:
        return os.path.relpath(REPO_ROOT / path, tmp_path)

    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [relative(r) for r in resources], **fields}
    if components:
        kustomization["components"] = [relative(c) for c in components]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize_build(tmp_path)


def schema_problems(manifests: Iterable[Manifest], version: str) -> dict[tuple[str, str], str]:
    """What the Kubernetes ``version`` schemas (strict: no unknown fields) refuse in each
    object, by kind and name: ``{("Deployment", "x"): "spec.template.spec: ..."}``."""
    problems = {}
    for m in manifests:
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems[m["kind"], m["metadata"]["name"]] = f"{'.'.join(map(str, e.path))}: {e.message}"
    return problems


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    [match] = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return match


def pod_templates(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    """(workload, pod spec) of every Deployment and DaemonSet."""
    for m in manifests:
        if m["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            yield m, m["spec"]["template"]["spec"]


def powercap_containers(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    """(workload, container) of every container that runs the powercap image."""
    for workload, pod in pod_templates(manifests):
        for container in pod.get("initContainers", []) + pod["containers"]:
            name = image_name(container["image"])
            if name == POWERCAP_IMAGE or name.endswith("/" + POWERCAP_IMAGE):
                yield workload, container


def image_name(image: str) -> str:
    """``registry:5000/powercap:v1`` -> ``registry:5000/powercap`` (the tag or digest removed)."""
    image = image.split("@", 1)[0]
    head, _, tail = image.rpartition(":")
    return head if head and "/" not in tail else image
