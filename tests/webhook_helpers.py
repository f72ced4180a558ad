"""Helpers for the webhook and server tests: certificates, servers on real TLS sockets,
AdmissionReviews, the extender as a process, and slow and idle clients.

Two ways to serve the webhook on 127.0.0.1 with an ephemeral port:

- :class:`WebhookProcess` runs ``powercap webhook`` (gunicorn, the production server) in a
  subprocess and reads the port from its log;
- :func:`serve_in_thread` serves an app built with injected dependencies (a fixed set of
  other policies, a fake clock) with werkzeug's TLS server in a thread.

:func:`admission_review` builds bodies the way kube-apiserver sends them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from webhook import certs
from webhook.server import new_server_context

from .conftest import REPO_ROOT

GROUP, VERSION, KIND, RESOURCE = "powercapping.example.com", "v1alpha1", "PowerCappingPolicy", "powercappingpolicies"
SERVICE, NAMESPACE = "powercap-webhook", "powercap-system"
STARTUP_TIMEOUT_S = 20.0


def issue_certificates(out_dir: Path, **overrides: Any) -> certs.IssuedCertificates:
    """A CA and a serving certificate valid for the Service names and 127.0.0.1."""
    options: dict[str, Any] = {"serving_days": 30, "ca_days": 365, "extra_sans": ("127.0.0.1", "localhost")}
    return certs.issue(out_dir, SERVICE, NAMESPACE, **{**options, **overrides})


def policy(name: str = "llama-70b-chat", namespace: str = "inference", **spec: Any) -> dict[str, Any]:
    """A PowerCappingPolicy as the apiserver hands it to admission (server-set metadata included)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}.{name}")),
            "generation": 1,
            "creationTimestamp": "2025-06-01T12:00:00Z",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "managedFields": [{
                "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": f"{GROUP}/{VERSION}",
                "time": "2025-06-01T12:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}},
            }],
        },
        "spec": {"powerCapLimit": 1000, **spec},
    }


OPTIONS_KIND = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions", "DELETE": "DeleteOptions", "CONNECT": "PodExecOptions"}


def admission_review(
    operation: str,
    obj: Any = None,
    old: Any = None,
    *,
    uid: str | None = None,
    dry_run: bool = False,
    sub_resource: str = "",
    name: str | None = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """An AdmissionReview as kube-apiserver POSTs it: every field it sends, in its JSON form.

    Go's ``omitempty`` leaves out ``subResource``/``requestSubResource`` when empty, and the
    apiserver sends ``"oldObject": null`` on CREATE and ``"object": null`` on DELETE.
    """
    source: dict[str, Any] = obj if isinstance(obj, dict) else old if isinstance(old, dict) else {}
    metadata = source["metadata"] if isinstance(source.get("metadata"), dict) else {}
    gvk = {"group": GROUP, "version": VERSION, "kind": KIND}
    gvr = {"group": GROUP, "version": VERSION, "resource": RESOURCE}
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": gvk,
        "resource": gvr,
        "requestKind": gvk,
        "requestResource": gvr,
        "name": metadata.get("name", "") if name is None else name,
        "namespace": metadata.get("namespace", "") if namespace is None else namespace,
        "operation": operation,
        "userInfo": {
            "username": "kubernetes-admin",
            "uid": "aws-iam-authenticator:123456789012:AIDAEXAMPLE",
            "groups": ["system:masters", "system:authenticated"],
            "extra": {"authentication.kubernetes.io/credential-id": ["X509SHA256=1a2b"]},
        },
        "object": copy.deepcopy(obj),
        "oldObject": copy.deepcopy(old),
        "dryRun": dry_run,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": OPTIONS_KIND[operation], "fieldManager": "kubectl-client-side-apply"},
    }
    if sub_resource:
        request["subResource"] = sub_resource
        request["requestSubResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


@dataclass
class WebhookEndpoint:
    """Where a webhook listens and how to reach it like the apiserver does (keep-alive, CA pinned)."""

    base_url: str
    ca_file: Path

    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE or a proxy from the environment would win otherwise
        session.verify = str(self.ca_file)
        return session

    def admit(self, session: requests.Session, endpoint: str, review: dict[str, Any]) -> dict[str, Any]:
        """POST ``review``; check that the reply is the AdmissionReview answering it; its ``response``."""
        reply = self.post(session, endpoint, review)
        assert reply.status_code == 200, reply.text
        assert reply.headers["Content-Type"] == "application/json"
        body = reply.json()
        assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
        assert body["response"]["uid"] == review["request"]["uid"], "response.uid must be request.uid"
        return body["response"]

    def validate(self, review: dict[str, Any]) -> dict[str, Any]:
        """:meth:`admit` to ``/validate`` on a new connection."""
        with self.session() as session:
            return self.admit(session, "validate", review)

    def post(self, session: requests.Session, endpoint: str, body: Any, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> requests.Response:
        """POST like kube-apiserver: JSON body, ``?timeout=10s`` appended to the URL."""
        data = raw if raw is not None else json.dumps(body).encode()
        return session.post(
            f"{self.base_url}/{endpoint}?timeout=10s", data=data, timeout=10,
            headers={"Content-Type": "application/json", "Accept": "application/json", **(headers or {})},
        )


class ServerProcess:
    """A ``powercap`` server run as a subprocess, logging to ``log_file``."""

    log_file: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON line of the log so far."""
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class WebhookProcess(ServerProcess):
    """``powercap webhook`` in a subprocess (gunicorn with its default worker setup)."""

    def __init__(self, cert_dir: Path, log_file: Path, *, cross_policy_checks: bool = False,
                 env: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> None:
        self.cert_dir = cert_dir
        self.log_file = log_file
        # as the Deployment runs it: no PROMETHEUS_MULTIPROC_DIR, no --metrics-dir
        environment = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | (env or {})
        options = [*([] if cross_policy_checks else ["--no-cross-policy-checks"]), *flags]
        with open(log_file, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "powercap", "webhook", "--cert-dir", str(cert_dir), "--bind", "127.0.0.1:0", *options],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=environment,
            )
        try:
            self.endpoint = WebhookEndpoint(f"https://127.0.0.1:{self._wait_for_port()}", cert_dir / certs.CA_CERT)
            self._wait_until_ready()
        except BaseException:
            self.stop()  # a server that never became ready must not outlive the test
            raise

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(r"Listening at: https://127\.0\.0\.1:(\d+)", self.log())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"powercap webhook exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"powercap webhook did not start:\n{self.log()}")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with self.endpoint.session() as session:
            while time.monotonic() < deadline:
                try:
                    if session.get(f"{self.endpoint.base_url}/readyz", timeout=2).status_code == 200:
                        return
                except requests.ConnectionError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"powercap webhook never became ready:\n{self.log()}")


@contextmanager
def serve_in_thread(app: Flask, cert_dir: Path) -> Iterator[WebhookEndpoint]:
    """Serve ``app`` over TLS (the server's own context) on 127.0.0.1 in a background thread."""
    context = new_server_context(cert_dir / certs.TLS_CERT, cert_dir / certs.TLS_KEY)
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="webhook-test-server", daemon=True)
    thread.start()
    try:
        yield WebhookEndpoint(f"https://127.0.0.1:{server.server_port}", cert_dir / certs.CA_CERT)
    finally:
        server.shutdown()
        thread.join(timeout=5)


def write_kubeconfig(path: Path, server_url: str) -> Path:
    """A kubeconfig for ``server_url`` (the fake API server), with a token it does not check."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: '{server_url}'}}}}]\n"
        "users: [{name: webhook, user: {token: not-checked}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: webhook}}]\n"
        "current-context: fake\n"
    )
    return path


@pytest.fixture(scope="session")
def webhook_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A certificate directory (ca.crt, ca.key, tls.crt, tls.key) shared by the webhook tests."""
    out = tmp_path_factory.mktemp("webhook-certs")
    issue_certificates(out)
    return out


@pytest.fixture(scope="session")
def webhook_process(webhook_certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookProcess]:
    """One ``powercap webhook`` (gunicorn, default workers) for the tests that only talk to it."""
    server = WebhookProcess(webhook_certs, tmp_path_factory.mktemp("webhook-run") / "webhook.log")
    yield server
    server.stop()


# --- slow and idle clients (slowloris) -------------------------------------------------

SLOW_HEAD = b"POST /validate HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n"


@dataclass
class SlowLoad:
    """What :func:`slow_clients` holds open: connections by kind, and how many the server
    closed (each is reopened, within ``max_reopen``)."""

    idle: int = 0
    handshakes: int = 0
    heads: int = 0
    bodies: int = 0
    closed_by_server: int = 0
    not_opened: int = 0  # connections the server did not accept or handshake within 5 s

    @property
    def total(self) -> int:
        return self.idle + self.handshakes + self.heads + self.bodies


@contextmanager
def slow_clients(
    port: int,
    *,
    tls: bool,
    idle: int = 200,
    slow: int = 50,
    path: str = "/validate",
    byte_interval_s: float = 0.5,
    hold_limit_s: float = 120.0,
    max_reopen: int = 2000,
) -> Iterator[SlowLoad]:
    """Hold ``idle`` TCP connections that send nothing and ``slow`` slowloris connections on
    127.0.0.1:``port`` while the block runs.

    The slow ones are split between requests whose head is trickled a byte every
    ``byte_interval_s`` and never finished, requests with a complete head announcing a 1 MB
    body trickled likewise, and, with ``tls``, TLS handshakes never completed (a partial
    ClientHello record); with ``tls`` the trickling ones complete their handshake first.
    A connection the server closes is reopened (at most ``max_reopen`` times in all). One
    thread does the trickling; it stops when the block ends or after ``hold_limit_s``.
    """
    import socket
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    load = SlowLoad()
    kinds = ["handshake", "head", "body"] if tls else ["head", "body"]
    plan = ["idle"] * idle + [kinds[i % len(kinds)] for i in range(slow)]

    def open_one(kind: str) -> tuple[Any, bytes]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        if kind == "idle":
            return raw, b""
        if kind == "handshake":
            raw.sendall(b"\x16\x03\x01\x02\x00\x01")  # a TLS record header and the start of a ClientHello
            return raw, b""
        sock = context.wrap_socket(raw) if tls else raw
        head = SLOW_HEAD.replace(b"/validate", path.encode())
        if kind == "head":
            return sock, head + b"X-Slow: " + b"a" * 100_000
        sock.sendall(head + b"Content-Length: 1000000\r\n\r\n")
        return sock, b"{" + b" " * 999_998 + b"}"

    live: list[list[Any]] = []  # [socket or None, kind, remaining bytes]
    for kind in plan:
        try:
            sock, pending = open_one(kind)
        except OSError:  # the server is already stuck: try again from the trickling thread
            load.not_opened += 1
            sock, pending = None, b""
        live.append([sock, kind, pending])
    stop = threading.Event()
    counts = {"idle": 0, "handshake": 0, "head": 0, "body": 0}
    for _sock, kind, _pending in live:
        counts[kind] += 1
    load.idle, load.handshakes, load.heads, load.bodies = counts["idle"], counts["handshake"], counts["head"], counts["body"]

    def trickle() -> None:
        deadline = time.monotonic() + hold_limit_s
        reopened = 0
        while not stop.is_set() and time.monotonic() < deadline:
            for entry in live:
                sock, kind, pending = entry
                alive = True
                try:
                    if sock is None:
                        alive = False
                    elif pending:
                        sock.send(pending[:1])
                        entry[2] = pending[1:]
                    elif kind in ("idle", "handshake"):
                        sock.setblocking(False)
                        try:
                            alive = sock.recv(1) != b""
                        except BlockingIOError:
                            pass
                        finally:
                            sock.setblocking(True)
                except (OSError, ValueError):
                    alive = False
                if not alive and reopened < max_reopen and not stop.is_set():
                    reopened += 1
                    if sock is not None:
                        load.closed_by_server += 1
                        sock.close()
                    try:
                        entry[0], entry[2] = open_one(kind)
                    except OSError:
                        entry[0], entry[2] = None, b""
            stop.wait(byte_interval_s)

    thread = threading.Thread(target=trickle, name="slow-clients", daemon=True)
    thread.start()
    try:
        yield load
    finally:
        stop.set()
        thread.join(timeout=30)
        for sock, _kind, _pending in live:
            if sock is not None:
                sock.close()


def answered_within(call: Any, count: int, limit_s: float = 1.0) -> tuple[int, list[float]]:
    """Run ``call()`` (one request, raising on failure or after ``limit_s``) ``count`` times;
    how many answered within ``limit_s``, and every latency (``limit_s`` for a failure)."""
    answered, latencies = 0, []
    for _ in range(count):
        started = time.monotonic()
        try:
            call()
        except Exception:  # a timeout or a refused connection: not answered
            latencies.append(limit_s)
            continue
        elapsed = time.monotonic() - started
        latencies.append(elapsed)
        answered += elapsed <= limit_s
    return answered, latencies


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ExtenderProcess(ServerProcess):
    """``powercap extender --cluster-state SNAPSHOT`` in a subprocess on 127.0.0.1 (the
    production server: gunicorn with the buffering worker), ready when constructed."""

    def __init__(self, snapshot: Path, log_file: Path, *flags: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        with open(log_file, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "powercap", "extender", "--cluster-state", str(snapshot),
                 "--bind", f"127.0.0.1:{self.port}", *flags],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with requests.Session() as session:
            session.trust_env = False
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"powercap extender exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if session.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                        return
                except requests.ConnectionError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"powercap extender never became ready:\n{self.log()}")

