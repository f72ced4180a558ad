"""Certificates and TLS: ``powercap certs``, TLS versions, and rotation without dropped requests."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from webhook import certs
from webhook.server import CertificateReloader, new_server_context

from .conftest import REPO_ROOT
from .webhook_helpers import (  # noqa: F401  (fixtures)
    NAMESPACE,
    SERVICE,
    WebhookProcess,
    admission_review,
    issue_certificates,
    policy,
    webhook_certs,
    webhook_process,
)

SERVICE_NAMES = [
    "powercap-webhook",
    "powercap-webhook.powercap-system",
    "powercap-webhook.powercap-system.svc",
    "powercap-webhook.powercap-system.svc.cluster.local",
]


def run_certs(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "powercap", "certs", "--service", SERVICE, "--namespace", NAMESPACE, "--out", str(out), *extra],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_command_writes_a_ca_and_a_serving_certificate_for_the_service(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = run_certs(out, "--days", "90", "--extra-san", "webhook.example.com", "--extra-san", "10.0.0.7")
    assert result.returncode == 0, result.stderr
    ca, serving = load(out / "ca.crt"), load(out / "tls.crt")
    assert base64.b64decode(result.stdout.strip()) == (out / "ca.crt").read_bytes(), "stdout is the caBundle"
    assert certs.san_names(serving) == [*SERVICE_NAMES, "webhook.example.com", "10.0.0.7"]
    ip_sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert [str(ip) for ip in ip_sans] == ["10.0.0.7"], "an IP address is an IP SAN, not a DNS name"
    assert serving.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "powercap-webhook.powercap-system.svc"
    serving.verify_directly_issued_by(ca)
    assert serving.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert list(serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert (serving.not_valid_after_utc - serving.not_valid_before_utc).days == 90
    assert "powercap-webhook.powercap-system.svc.cluster.local" in result.stderr


def test_private_keys_are_written_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        issue_certificates(tmp_path)
    finally:
        os.umask(old_umask)
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("ca.key", "tls.key", "ca.crt", "tls.crt")}
    assert modes == {"ca.key": 0o600, "tls.key": 0o600, "ca.crt": 0o644, "tls.crt": 0o644}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o777])
def test_new_directories_are_0700_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "out" / "webhook-certs"
    old_umask = os.umask(umask)
    try:
        issue_certificates(out)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o700
    assert {name: stat.S_IMODE((out / name).stat().st_mode) for name in ("ca.key", "tls.key")} == {"ca.key": 0o600, "tls.key": 0o600}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_ca_key_others_may_read_is_refused_and_left_alone(tmp_path: Path, mode: int) -> None:
    assert run_certs(tmp_path).returncode == 0
    (tmp_path / "ca.key").chmod(mode)
    serving = (tmp_path / "tls.crt").read_bytes()
    result = run_certs(tmp_path)
    assert result.returncode == 2
    assert f"{tmp_path / 'ca.key'} may be read by group or others (mode {mode:04o})" in result.stderr
    assert f"chmod 600 {tmp_path / 'ca.key'}" in result.stderr
    assert (tmp_path / "tls.crt").read_bytes() == serving, "nothing is issued from an exposed CA"
    (tmp_path / "ca.key").chmod(0o600)
    assert run_certs(tmp_path).returncode == 0


def test_running_again_renews_the_serving_certificate_from_the_same_ca(tmp_path: Path) -> None:
    first = run_certs(tmp_path)
    ca_bytes, old_serial = (tmp_path / "ca.crt").read_bytes(), load(tmp_path / "tls.crt").serial_number
    second = run_certs(tmp_path)
    assert second.returncode == 0 and "kept CA" in second.stderr
    assert second.stdout == first.stdout, "the caBundle in the cluster stays valid"
    assert (tmp_path / "ca.crt").read_bytes() == ca_bytes
    renewed = load(tmp_path / "tls.crt")
    assert renewed.serial_number != old_serial
    renewed.verify_directly_issued_by(load(tmp_path / "ca.crt"))


def test_a_ca_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    run_certs(tmp_path)
    (tmp_path / "ca.key").unlink()
    result = run_certs(tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'ca.key'} is missing")


@pytest.mark.parametrize(("broken", "message"), [
    ("ca.crt", "{dir}/ca.crt is not a PEM certificate; remove ca.crt and ca.key to create a new CA"),
    ("ca.key", "{dir}/ca.key is not an unencrypted PEM private key"),
])
def test_a_ca_file_that_is_not_pem_is_named(tmp_path: Path, broken: str, message: str) -> None:
    run_certs(tmp_path)
    (tmp_path / broken).write_text("garbage\n")
    result = run_certs(tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {message.format(dir=tmp_path)}\n"


def test_serving_files_that_are_missing_or_not_pem_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'tls.crt'}: no such file"):
        new_server_context(tmp_path / "tls.crt", tmp_path / "tls.key")
    (tmp_path / "tls.crt").write_text("garbage\n")
    (tmp_path / "tls.key").write_text("garbage\n")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'tls.crt'} and {tmp_path / 'tls.key'} are not a PEM certificate"):
        new_server_context(tmp_path / "tls.crt", tmp_path / "tls.key")


def test_the_serving_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    issued = issue_certificates(tmp_path, serving_days=400, ca_days=30)
    assert issued.serving_certificate.not_valid_after_utc == issued.ca_certificate.not_valid_after_utc


def client_context(ca_file: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are deprecated, which is the point
        context.minimum_version = version
        context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client speak TLS 1.1 at all
    return context


def handshake(port: int, context: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname=server_hostname)


def port_of(server: WebhookProcess) -> int:
    return int(server.endpoint.base_url.rsplit(":", 1)[1])


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_tls_1_2_and_newer_are_served(webhook_process: WebhookProcess, version: ssl.TLSVersion) -> None:
    with handshake(port_of(webhook_process), client_context(webhook_process.endpoint.ca_file, version)) as tls:
        assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 200")


def test_tls_1_1_is_refused_by_the_server(webhook_process: WebhookProcess, webhook_certs: Path) -> None:
    tls11 = client_context(webhook_process.endpoint.ca_file, ssl.TLSVersion.TLSv1_1)
    # control: this client does complete a TLS 1.1 handshake with a server that allows it
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1_1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(webhook_certs / "tls.crt", webhook_certs / "tls.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[str] = []
        thread = threading.Thread(target=lambda: accepted.append(permissive.wrap_socket(listener.accept()[0], server_side=True).version() or ""))
        thread.start()
        with handshake(listener.getsockname()[1], tls11) as tls:
            assert tls.version() == "TLSv1.1"
        thread.join(timeout=5)
    assert accepted == ["TLSv1.1"]
    with pytest.raises(ssl.SSLError, match="(?i)protocol version|unsupported protocol|alert"):
        handshake(port_of(webhook_process), tls11)


def test_the_apiserver_can_verify_the_service_name(webhook_process: WebhookProcess) -> None:
    context = client_context(webhook_process.endpoint.ca_file, ssl.TLSVersion.TLSv1_3)
    for name in SERVICE_NAMES[2:]:
        with handshake(port_of(webhook_process), context, server_hostname=name) as tls:
            peer = tls.getpeercert()
            assert peer is not None and peer["subject"] == ((("commonName", "powercap-webhook.powercap-system.svc"),),)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(port_of(webhook_process), context, server_hostname="other.powercap-system.svc")


def served_serial(port: int, ca_file: Path) -> int:
    with handshake(port, client_context(ca_file, ssl.TLSVersion.TLSv1_3)) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def keepalive_request(tls: ssl.SSLSocket, body: bytes) -> bytes:
    """One POST /validate on an open connection; the raw response."""
    tls.sendall(b"POST /validate?timeout=10s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    response = b""
    while b"\r\n\r\n" not in response:
        response += tls.recv(65536)
    head, _, rest = response.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += tls.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_rotated_certificate_files_are_served_to_new_connections_without_dropping_requests(webhook_certs: Path, tmp_path: Path) -> None:
    cert_dir = tmp_path / "certs"
    shutil.copytree(webhook_certs, cert_dir)
    server = WebhookProcess(cert_dir, tmp_path / "webhook.log")
    try:
        port, ca_file = port_of(server), cert_dir / "ca.crt"
        old_serial = served_serial(port, ca_file)
        body = json.dumps(admission_review("CREATE", policy())).encode()
        kept_alive = handshake(port, client_context(ca_file, ssl.TLSVersion.TLSv1_3))
        assert b'"allowed":true' in keepalive_request(kept_alive, body)

        failures: list[str] = []
        answered = 0
        stop = threading.Event()

        def keep_asking() -> None:  # a kept-alive client, as kube-apiserver is, busy throughout
            nonlocal answered
            with server.endpoint.session() as session:
                while not stop.is_set():
                    try:
                        reply = server.endpoint.post(session, "validate", admission_review("CREATE", policy()))
                        if reply.status_code != 200 or not reply.json()["response"]["allowed"]:
                            failures.append(f"{reply.status_code} {reply.text[:100]}")
                        answered += 1
                    except Exception as error:  # noqa: BLE001 - any failure is what we look for
                        failures.append(repr(error))

        clients = [threading.Thread(target=keep_asking) for _ in range(2)]
        for client in clients:
            client.start()
        time.sleep(0.3)
        new_serial = issue_certificates(cert_dir).serving_certificate.serial_number  # same CA, new files
        deadline = time.monotonic() + 10
        while served_serial(port, ca_file) != new_serial and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for client in clients:
            client.join(timeout=10)

        assert new_serial != old_serial
        assert served_serial(port, ca_file) == new_serial, "new connections get the new certificate"
        assert failures == [] and answered > 10
        # the connection opened before the rotation still works, with the certificate it was made with
        assert b'"allowed":true' in keepalive_request(kept_alive, body)
        kept_der = kept_alive.getpeercert(binary_form=True)
        assert kept_der is not None and x509.load_der_x509_certificate(kept_der).serial_number == old_serial
        kept_alive.close()
        assert any(line.get("message") == "certificate reloaded" for line in server.log_lines())
    finally:
        server.stop()


def test_a_half_rotated_pair_is_refused_and_the_last_good_one_kept(tmp_path: Path) -> None:
    issued = issue_certificates(tmp_path)
    reloader = CertificateReloader(tmp_path / "tls.crt", tmp_path / "tls.key")
    first = reloader.context()
    good_key = (tmp_path / "tls.key").read_bytes()
    issue_certificates(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "tls.key", tmp_path / "tls.key")  # the key of another certificate
    assert reloader.context() is first, "a key that does not match its certificate is not served"
    (tmp_path / "tls.key").write_bytes(good_key)
    (tmp_path / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\ntruncated")
    assert reloader.context() is first
    certs.write_certificate(tmp_path / "tls.crt", issued.serving_certificate)
    os.utime(tmp_path / "tls.crt", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert reloader.context() is not first and reloader.reloads == 2


def test_a_server_context_refuses_tls_1_1_and_loads_the_chain(webhook_certs: Path) -> None:
    context = new_server_context(webhook_certs / "tls.crt", webhook_certs / "tls.key")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
