"""Prometheus 3 can scrape every program: the webhook (gunicorn, HTTPS, multiprocess
metrics), the extender (gunicorn, its --metrics-bind address), the node agent and the
controller, each run as ``powercap <program>`` and asked over HTTP as Prometheus asks.

Prometheus 3 parses the Content-Type with Go's ``mime.ParseMediaType`` and fails the scrape
when that fails (a parameter given twice, as Flask's ``mimetype=`` once made the extender
send) or when the media type is not one it knows, unless the scrape config names a
``fallback_scrape_protocol``; nobody should need one for powercap. Every program also
exposes ``powercap_build_info`` and the process metrics. The webhook is scraped as its
PodMonitor says: its pod's address, the certificate verified as the Service's name against
the CA in the webhook's Secret.
"""

from __future__ import annotations

import http.client
import os
import platform
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import powercap
from tests.agenthelpers import AGENT, AgentProcess, policy_document
from tests.conftest import REPO_ROOT
from tests.manifests import Manifest, kustomize_overlay
from tests.promtool import metrics_lint_problems
from tests.fakes.apiserver import FakeApiServer
from tests.webhook_helpers import (
    STARTUP_TIMEOUT_S,
    ExtenderProcess,
    ServerProcess,
    WebhookProcess,
    free_port,
    issue_certificates,
    write_kubeconfig,
)

PROGRAMS = ("webhook", "extender", "agent", "controller")
# what Prometheus 3 parses (textparse.New); anything else fails the scrape
PROMETHEUS_3_MEDIA_TYPES = {"text/plain", "application/openmetrics-text", "application/vnd.google.protobuf"}
TEXT_FORMAT_VERSIONS = {"0.0.4", "1.0.0"}
PROCESS_SERIES = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                  "process_open_fds", "process_max_fds")

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAMETER = re.compile(rf"\s*;\s*({_TOKEN})=({_TOKEN}|\"(?:[^\"\\]|\\.)*\")\s*")


class MediaTypeError(ValueError):
    pass


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type as Go's ``mime.ParseMediaType`` reads it: ``type/subtype`` and
    ``; name=value`` parameters (token or quoted string), names case-insensitive, a name
    given twice refused; the media type lower-cased and the parameters by name."""
    media_type, separator, _ = value.partition(";")
    media_type = media_type.strip().lower()
    if not re.fullmatch(f"{_TOKEN}/{_TOKEN}", media_type):
        raise MediaTypeError(f"no media type in {value!r}")
    parameters: dict[str, str] = {}
    position = len(value.partition(";")[0])
    while separator and position < len(value):
        if value[position:].strip() == ";":  # a trailing semicolon is ignored
            break
        match = _PARAMETER.match(value, position)
        if match is None:
            raise MediaTypeError(f"invalid parameter at {value[position:]!r}")
        name, raw = match.group(1).lower(), match.group(2)
        if name in parameters:
            raise MediaTypeError(f"duplicate parameter name {name!r}")
        parameters[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        position = match.end()
    return media_type, parameters


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        pytest.param("text/plain; version=0.0.4; charset=utf-8", ("text/plain", {"version": "0.0.4", "charset": "utf-8"}),
                     id="prometheus-text"),
        pytest.param('Text/Plain;Charset="utf-8";', ("text/plain", {"charset": "utf-8"}), id="case-quotes-trailing-semicolon"),
        pytest.param("text/plain; version=1.0.0; charset=utf-8; charset=utf-8", None, id="charset-twice"),
        pytest.param("text/plain; charset=UTF-8; Charset=utf-8", None, id="same-name-other-case"),
        pytest.param("text/plain; version", None, id="parameter-without-value"),
        pytest.param("PrometheusText1.0.0", None, id="protocol-name-not-a-media-type"),
    ],
)
def test_content_types_are_read_as_prometheus_reads_them(header: str, parsed: tuple[str, dict[str, str]] | None) -> None:
    if parsed is None:
        with pytest.raises(MediaTypeError):
            parse_media_type(header)
    else:
        assert parse_media_type(header) == parsed


@dataclass(frozen=True)
class Scrape:
    content_type: str
    body: str


class ControllerProcess(ServerProcess):
    """``powercap controller`` against a fake API server, its health server on 127.0.0.1."""

    def __init__(self, apiserver_url: str, tmp_path: Path) -> None:
        self.port = free_port()
        self.log_file = tmp_path / "controller.log"
        environment = {**os.environ, "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", apiserver_url)),
                       "KUBERNETES_SERVICE_HOST": "", "POD_NAME": "controller-test"}
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "powercap", "controller", "--health-bind", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=environment,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with requests.Session() as session:
            session.trust_env = False
            while True:
                assert self.process.poll() is None, self.log()
                try:
                    if session.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).status_code == 200:
                        return
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"powercap controller never served /metrics:\n{self.log()}")
                time.sleep(0.05)


# the Accept header Prometheus 3 sends by default
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
                     "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
                     "text/plain;version=0.0.4;q=0.2,*/*;q=0.1")


def get(url: str) -> Scrape:
    with requests.Session() as session:
        session.trust_env = False
        reply = session.get(url, timeout=10, headers={"Accept": PROMETHEUS_ACCEPT})
    assert reply.status_code == 200, reply.text
    return Scrape(reply.headers["Content-Type"], reply.text)


class PodAddressConnection(http.client.HTTPSConnection):
    """HTTPS to a pod's address, the certificate verified as ``server_name``, as Prometheus
    does with a PodMonitor's ``tlsConfig.serverName``."""

    def __init__(self, address: str, port: int, server_name: str, ca_file: Path) -> None:
        self.tls = ssl.create_default_context(cafile=str(ca_file))
        super().__init__(server_name, port, timeout=10, context=self.tls)
        self.address = address

    def connect(self) -> None:
        self.sock = self.tls.wrap_socket(socket.create_connection((self.address, self.port), self.timeout),
                                         server_hostname=self.host)


def get_as_the_podmonitor_says(port: int, monitor: Manifest, cert_dir: Path) -> Scrape:
    """GET the webhook's /metrics with the PodMonitor's scheme, path and TLS settings; the
    Secret's ``ca.crt`` is the file of that name in the webhook's certificate directory."""
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    tls = endpoint["tlsConfig"]
    assert endpoint["scheme"] == "https" and "insecureSkipVerify" not in tls
    connection = PodAddressConnection("127.0.0.1", port, tls["serverName"], cert_dir / tls["ca"]["secret"]["key"])
    try:
        connection.request("GET", endpoint["path"], headers={"Accept": PROMETHEUS_ACCEPT})
        reply = connection.getresponse()
        assert reply.status == 200
        return Scrape(reply.getheader("Content-Type", ""), reply.read().decode())
    finally:
        connection.close()


def monitoring_objects(tmp_path: Path) -> dict[tuple[str, str], Manifest]:
    """config/default with the monitoring Component, by kind and name."""
    built = kustomize_overlay(tmp_path, ["config/default"], ["config/monitoring"])
    return {(m["kind"], m["metadata"]["name"]): m for m in built}


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Scrape]]:
    """One /metrics reply of each program, each run as a process the way its Deployment runs it."""
    tmp = tmp_path_factory.mktemp("programs")
    webhook_monitor = monitoring_objects(tmp_path_factory.mktemp("monitoring"))["PodMonitor", "powercap-webhook"]
    certificates = tmp / "certs"
    issue_certificates(certificates)
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy_document("llama", cap_w=800)))
    (tmp / "snapshot.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List",
                                                       "items": [policy_document("llama", cap_w=800)]}))
    metrics_port = free_port()
    running: list[ServerProcess | AgentProcess] = []
    with FakeApiServer() as apiserver:
        try:
            webhook = WebhookProcess(certificates, tmp / "webhook.log")
            running.append(webhook)
            extender = ExtenderProcess(tmp / "snapshot.yaml", tmp / "extender.log", "--metrics-bind", f"127.0.0.1:{metrics_port}")
            running.append(extender)
            agent = AgentProcess([*AGENT, "--node", "gpu-1", "--backend", "simulated", "--policy", str(tmp / "policy.yaml"),
                                  "--pod-resources-socket", "none", "--metrics-bind", "127.0.0.1:0",
                                  "--state-file", str(tmp / "state.json")], {})
            running.append(agent)
            controller = ControllerProcess(apiserver.url, tmp)
            running.append(controller)
            yield {
                "webhook": get_as_the_podmonitor_says(int(webhook.endpoint.base_url.rpartition(":")[2]), webhook_monitor,
                                                      certificates),
                "extender": get(f"http://127.0.0.1:{metrics_port}/metrics"),
                "agent": get(f"http://127.0.0.1:{agent.metrics_port}/metrics"),
                "controller": get(f"http://127.0.0.1:{controller.port}/metrics"),
            }
        finally:
            for process in reversed(running):
                process.stop()


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_content_type_is_one_prometheus_3_accepts(scrapes: dict[str, Scrape], program: str) -> None:
    media_type, parameters = parse_media_type(scrapes[program].content_type)
    assert media_type in PROMETHEUS_3_MEDIA_TYPES
    assert media_type == "text/plain" and parameters.keys() == {"version", "charset"}, scrapes[program].content_type
    assert parameters["version"] in TEXT_FORMAT_VERSIONS and parameters["charset"] == "utf-8"


def samples(scrape: Scrape) -> dict[str, list[Sample]]:
    by_name: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(scrape.body):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample)
    return by_name


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_says_which_build_runs(scrapes: dict[str, Scrape], program: str) -> None:
    """One series, value 1, even from the webhook's several gunicorn workers."""
    (build_info,) = samples(scrapes[program])["powercap_build_info"]
    assert build_info.labels == {"version": powercap.__version__, "python_version": platform.python_version()}
    assert build_info.value == 1
    assert "# TYPE powercap_build_info gauge" in scrapes[program].body


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_exposes_its_process_metrics(scrapes: dict[str, Scrape], program: str) -> None:
    by_name = samples(scrapes[program])
    values = {name: by_name[name][0].value for name in PROCESS_SERIES}
    assert all(len(by_name[name]) == 1 for name in PROCESS_SERIES)
    # a gunicorn worker that only answered the scrape may have used under a clock tick of CPU
    assert values.pop("process_cpu_seconds_total") >= 0
    assert all(value > 0 for value in values.values()), values
    assert by_name["process_open_fds"][0].value <= by_name["process_max_fds"][0].value
    (python,) = by_name["python_info"]
    assert python.labels["version"] == platform.python_version()


@pytest.mark.parametrize("program", PROGRAMS)
def test_promtool_accepts_what_every_program_exposes(scrapes: dict[str, Scrape], program: str) -> None:
    assert metrics_lint_problems(scrapes[program].body) == []


def test_the_webhooks_podmonitor_verifies_the_certificate_from_the_webhooks_own_secret(tmp_path: Path) -> None:
    """The PodMonitor's CA and name are those of the Secret the webhook serves from and of
    the Service its certificate names, with either way of making the certificate."""
    (tmp_path / "monitoring").mkdir()
    objects = monitoring_objects(tmp_path / "monitoring")
    [endpoint] = objects["PodMonitor", "powercap-webhook"]["spec"]["podMetricsEndpoints"]
    secret = endpoint["tlsConfig"]["ca"]["secret"]
    volumes = objects["Deployment", "powercap-webhook"]["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == secret["name"] for v in volumes)
    assert secret["key"] == "ca.crt"
    service = objects["Service", "powercap-webhook"]["metadata"]
    assert endpoint["tlsConfig"]["serverName"] == f"{service['name']}.{service['namespace']}.svc"
    (tmp_path / "cert-manager").mkdir()
    with_cert_manager = {(m["kind"], m["metadata"]["name"]): m for m in kustomize_overlay(
        tmp_path / "cert-manager", ["config/webhook"], ["config/webhook/cert-manager"])}
    certificate = with_cert_manager["Certificate", "powercap-webhook"]["spec"]
    assert certificate["secretName"] == secret["name"] and endpoint["tlsConfig"]["serverName"] in certificate["dnsNames"]
    # cert-manager writes ca.crt only for a CA issuer (a self-signed or ACME one would not)
    assert "ca" in with_cert_manager["Issuer", certificate["issuerRef"]["name"]]["spec"]


def test_a_certificate_for_another_name_fails_the_podmonitors_check(tmp_path: Path) -> None:
    """Verification is on: the same webhook, its certificate checked as another Service's name, is refused."""
    issue_certificates(tmp_path)
    webhook = WebhookProcess(tmp_path, tmp_path / "webhook.log")
    try:
        port = int(webhook.endpoint.base_url.rpartition(":")[2])
        connection = PodAddressConnection("127.0.0.1", port, "powercap-webhook.elsewhere.svc", tmp_path / "ca.crt")
        with pytest.raises(ssl.SSLCertVerificationError):
            connection.request("GET", "/metrics")
        connection.close()
    finally:
        webhook.stop()


def test_the_agents_podmonitor_keeps_the_pod_labels_of_the_gpu_series(tmp_path: Path) -> None:
    """Without honorLabels Prometheus renames the GPU series' pod, namespace and container
    (the pod using the GPU) to exported_*, and the joins of docs/metrics.md lose them."""
    [endpoint] = monitoring_objects(tmp_path)["PodMonitor", "powercap-agent"]["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True
