"""Fixtures of the end-to-end suite: one real control plane for the whole session.

Run by ``scripts/test.sh`` after the unit tests (``pytest -m e2e tests/e2e``); every test
here carries the ``e2e`` marker, which the unit run deselects. The first run builds the
control plane (scripts/controlplane.sh build: minutes, cached outside the repository).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.harness import (
    ControlPlane,
    controlplane_bin,
    ensure_namespace,
    for_create,
    have_toolchain,
    install_bundle,
    serve_webhook,
    start_controlplane,
    stop_controlplane,
)

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and kube-scheduler, with the CRD, namespace, ServiceAccounts and
    RBAC of config/default applied (the objects that need no kubelet)."""
    missing = have_toolchain()
    if missing:
        pytest.fail(f"the end-to-end suite needs a real control plane, and {missing}")
    controlplane_bin()
    directory = tmp_path_factory.mktemp("controlplane")
    plane = start_controlplane(directory)
    try:
        install_bundle(plane)
        yield plane
    finally:
        plane.stop_all()
        stop_controlplane(directory)


@pytest.fixture(scope="session")
def webhook_url(cluster: ControlPlane) -> str:
    """``powercap webhook`` on 127.0.0.1 as ServiceAccount powercap-webhook, registered with
    config/webhook's configurations (a url instead of the Service, the real caBundle)."""
    return serve_webhook(cluster)


WEBHOOK_CONFIGURATIONS = (
    ("validatingwebhookconfiguration", "powercap-validating-webhook"),
    ("mutatingwebhookconfiguration", "powercap-mutating-webhook"),
)


@pytest.fixture(scope="module")
def without_webhooks(cluster: ControlPlane) -> Iterator[None]:
    """The cluster with powercap's webhook configurations unregistered (as before the webhook
    is installed, or with a failurePolicy Ignore webhook down), so that only the CRD judges a
    policy; registered again afterwards when they were."""
    saved = [cluster.get_json(kind, name) for kind, name in WEBHOOK_CONFIGURATIONS
             if cluster.kubectl("get", kind, name, check=False).returncode == 0]
    for document in saved:
        cluster.kubectl("delete", document["kind"].lower(), document["metadata"]["name"])
    try:
        yield
    finally:
        for document in saved:
            document["metadata"].pop("managedFields", None)
            cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump(for_create(document)))


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, with the ServiceAccount ``default`` that pods need."""
    name = f"e2e-{abs(hash(request.node.nodeid)) % 10**8}"
    ensure_namespace(cluster, name)
    yield name
    # pods bound to nodes without a kubelet go only when forced
    cluster.kubectl("delete", "pcp", "--all", "-n", name, check=False)
    cluster.kubectl("delete", "pods", "--all", "-n", name, "--force", "--grace-period=0", check=False)
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
