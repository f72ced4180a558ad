"""What a user sees: the real ``kubectl apply`` against an API server that calls our webhook.

The stand-in API server does what kube-apiserver does around admission for a create:
discovery, a GET that finds nothing, then the POST, during which it calls the mutating
webhook (applying its JSON Patch), then the validating webhook, over TLS with the
caBundle, and turns a refusal into the error kube-apiserver returns
(``admission webhook "<name>" denied the request: <message>``, the webhook's code, reason
and details: k8s.io/apiserver/pkg/admission/plugin/webhook/errors.ToStatusErr) and
warnings into ``Warning:`` headers. Our webhook answers over TLS: ``powercap webhook``
(gunicorn), or werkzeug where the test injects the other policies of the cluster.

The stand-in does no schema validation; a real API server refuses schema violations
itself, before validating webhooks run, which is why the examples break rules the schema
cannot express.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from powercap.algorithms import AlgorithmRegistry
from webhook.app import create_app
from webhook.lookups import StaticPolicies

from .conftest import REPO_ROOT
from .webhook_helpers import (  # noqa: F401  (fixtures)
    WebhookEndpoint,
    WebhookProcess,
    admission_review,
    policy,
    serve_in_thread,
    webhook_certs,
    webhook_process,
)

GROUP_VERSION = "powercapping.example.com/v1alpha1"
VALIDATING_WEBHOOK = "validate.powercapping.example.com"
DISCOVERY = {
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
        "name": "powercapping.example.com",
        "versions": [{"groupVersion": GROUP_VERSION, "version": "v1alpha1"}],
        "preferredVersion": {"groupVersion": GROUP_VERSION, "version": "v1alpha1"},
    }]},
    f"/apis/{GROUP_VERSION}": {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION, "resources": [{
        "name": "powercappingpolicies", "singularName": "powercappingpolicy", "namespaced": True,
        "kind": "PowerCappingPolicy", "shortNames": ["pcp"],
        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
    }]},
}


class AdmittingApiServer(ThreadingHTTPServer):
    def __init__(self, webhook: WebhookEndpoint) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.webhook = webhook
        self.stored: list[dict[str, Any]] = []


class _Handler(BaseHTTPRequestHandler):
    server: AdmittingApiServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: Any, warnings: list[str] = ()) -> None:  # type: ignore[assignment]
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        for warning in warnings:
            self.send_header("Warning", f'299 - "{warning}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path in DISCOVERY:
            return self._send(200, DISCOVERY[path])
        self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                         "message": f"powercappingpolicies.powercapping.example.com \"{path.rsplit('/', 1)[-1]}\" not found"})

    def do_POST(self) -> None:
        obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        obj.setdefault("metadata", {}).setdefault("namespace", self.path.split("/namespaces/")[1].split("/")[0])
        webhook = self.server.webhook
        with webhook.session() as session:
            mutated = webhook.post(session, "mutate", admission_review("CREATE", obj)).json()["response"]
            if "patch" in mutated:
                obj = jsonpatch.JsonPatch(json.loads(base64.b64decode(mutated["patch"]))).apply(obj)
            verdict = webhook.post(session, "validate", admission_review("CREATE", obj)).json()["response"]
        warnings = verdict.get("warnings", [])
        if not verdict["allowed"]:
            status = verdict.get("status", {})
            denied_by = f'admission webhook "{VALIDATING_WEBHOOK}" denied the request'
            message = f"{denied_by}: {status['message']}" if status.get("message") else f"{denied_by} without explanation"
            return self._send(status.get("code", 400), {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                **{k: status[k] for k in ("reason", "code", "details") if k in status},
            }, warnings)
        self.server.stored.append(obj)
        self._send(201, obj, warnings)


@contextmanager
def admitting_apiserver(webhook: WebhookEndpoint) -> Iterator[AdmittingApiServer]:
    server = AdmittingApiServer(webhook)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.fixture
def apiserver(webhook_process: WebhookProcess) -> Iterator[AdmittingApiServer]:
    """In front of ``powercap webhook`` (gunicorn), cross-policy checks off."""
    with admitting_apiserver(webhook_process.endpoint) as server:
        yield server


def assert_documented(output: str) -> None:
    """The README and docs/webhook.md show users exactly this output."""
    for doc in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "webhook.md"):
        assert output in doc.read_text(), f"{doc.name} does not show what kubectl prints:\n{output}"


def kubectl_apply(apiserver: AdmittingApiServer, workdir: Path, manifest: str) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed for this test"
    (workdir / "policy.yaml").write_text(manifest)
    return subprocess.run(
        [kubectl, "--server", f"http://127.0.0.1:{apiserver.server_address[1]}", "--cache-dir", str(workdir / "cache"),
         "apply", "--validate=false", "-f", "policy.yaml"],
        capture_output=True, text=True, cwd=workdir, timeout=60, env={"KUBECONFIG": "/dev/null", "HOME": str(workdir)},
    )


# Rules the CRD schema cannot express, so a real API server passes the object to the
# webhook (a schema violation, e.g. powerCapLimit: 0, is refused by the API server itself).
BAD_PARAMETERS = """\
apiVersion: powercapping.example.com/v1alpha1
kind: PowerCappingPolicy
metadata:
  name: llama-70b-chat
  namespace: inference
spec:
  powerCapLimit: 4200
  customAlgorithm:
    name: energy-aware-scheduling
    parameters:
      energyThreshold: -500
      migrationInterval: 10
"""


def test_kubectl_prints_every_problem_of_a_refused_policy(apiserver: AdmittingApiServer, tmp_path: Path) -> None:
    result = kubectl_apply(apiserver, tmp_path, BAD_PARAMETERS)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        'The PowerCappingPolicy "llama-70b-chat" is invalid: \n'
        "* spec.customAlgorithm.parameters.energyThreshold: must be greater than 0\n"
        "* spec.customAlgorithm.parameters.migrationInterval: must be at least 30\n"
    )
    assert apiserver.stored == []
    assert_documented(result.stderr)


def test_kubectl_prints_a_single_problem_on_one_line(webhook_certs: Path, tmp_path: Path) -> None:
    registry = AlgorithmRegistry.default()
    existing = policy("llama-prod", "inference", selector={"matchLabels": {"app": "llama"}})
    app = create_app(registry=registry, policies=StaticPolicies([existing], registry))
    canary = BAD_PARAMETERS.replace("llama-70b-chat", "llama-canary").split("  customAlgorithm:")[0] + (
        "  selector:\n    matchLabels: {app: llama, track: canary}\n"
    )
    with serve_in_thread(app, webhook_certs) as webhook, admitting_apiserver(webhook) as apiserver:
        result = kubectl_apply(apiserver, tmp_path, canary)
    assert result.returncode == 1
    assert result.stderr == (
        'The PowerCappingPolicy "llama-canary" is invalid: spec.selector: may select the same pods as '
        'PowerCappingPolicy "llama-prod" in this namespace (e.g. a pod labelled app=llama, track=canary); '
        "a pod can follow one policy only\n"
    )
    assert_documented(result.stderr)


def test_kubectl_shows_warnings_and_the_policy_is_stored_with_defaults(apiserver: AdmittingApiServer, tmp_path: Path) -> None:
    suspicious = BAD_PARAMETERS.split("  customAlgorithm:")[0].replace("4200", "150")
    result = kubectl_apply(apiserver, tmp_path, suspicious)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "powercappingpolicy.powercapping.example.com/llama-70b-chat created\n"
    assert result.stderr == (
        "Warning: spec.powerCapLimit: 150 W is below one GPU's minimum limit (200 W on H100/H200): no pod can get a GPU\n"
    )
    [stored] = apiserver.stored
    assert stored["spec"]["mode"] == "Enforce"
    assert stored["spec"]["selector"] == {"matchLabels": {"powercapping.example.com/policy": "llama-70b-chat"}}
