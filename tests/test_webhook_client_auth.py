"""``powercap webhook --client-ca-file``: only a client presenting a certificate signed by
that CA (kube-apiserver, through its AdmissionConfiguration kubeconfig) gets admissions
answered; the kubelet's probes and Prometheus still reach /readyz, /healthz and /metrics.
Real TLS on loopback, the production server."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .webhook_helpers import WebhookProcess, admission_review, policy, webhook_certs  # noqa: F401  (fixture)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(out: Path, common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (out / f"{common_name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key


def make_client(out: Path, common_name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> tuple[str, str]:
    """A client certificate (clientAuth) for ``common_name`` signed by ``ca``: (cert file, key file)."""
    ca_certificate, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_certificate.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = out / f"{common_name}.crt", out / f"{common_name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str] | Path]:
    out = tmp_path_factory.mktemp("client-certs")
    apiserver_ca = make_ca(out, "apiserver-client-ca")
    other_ca = make_ca(out, "someone-else-ca")
    return {
        "ca": out / "apiserver-client-ca.crt",
        "apiserver": make_client(out, "kube-apiserver", apiserver_ca),
        "stranger": make_client(out, "stranger", other_ca),
    }


@pytest.fixture(scope="module")
def guarded(webhook_certs: Path, clients: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookProcess]:  # noqa: F811
    server = WebhookProcess(webhook_certs, tmp_path_factory.mktemp("client-auth") / "webhook.log",
                            flags=("--client-ca-file", str(clients["ca"])))
    yield server
    server.stop()


def validate(server: WebhookProcess, cert: tuple[str, str] | None) -> requests.Response:
    with server.endpoint.session() as session:
        session.cert = cert
        return server.endpoint.post(session, "validate", admission_review("CREATE", policy()))


def test_the_apiserver_certificate_gets_admissions_answered(guarded: WebhookProcess, clients: dict) -> None:
    reply = validate(guarded, clients["apiserver"])
    assert reply.status_code == 200
    assert reply.json()["response"]["allowed"] is True


def test_a_client_without_a_certificate_is_refused_403(guarded: WebhookProcess) -> None:
    reply = validate(guarded, None)
    assert reply.status_code == 403
    assert reply.text == "a client certificate signed by the webhook's --client-ca-file is required\n"
    assert any(line.get("message") == "admission refused: no verified client certificate" for line in guarded.log_lines())


def test_a_certificate_from_another_ca_fails_the_handshake(guarded: WebhookProcess, clients: dict) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        validate(guarded, clients["stranger"])
    assert validate(guarded, clients["apiserver"]).status_code == 200  # the server carries on


@pytest.mark.parametrize("path", ["/readyz", "/healthz", "/metrics"])
def test_probes_and_metrics_need_no_client_certificate(guarded: WebhookProcess, path: str) -> None:
    with guarded.endpoint.session() as session:
        assert session.get(f"{guarded.endpoint.base_url}{path}", timeout=5).status_code == 200


def test_without_the_flag_clients_without_a_certificate_are_answered(webhook_certs: Path, tmp_path: Path) -> None:  # noqa: F811
    server = WebhookProcess(webhook_certs, tmp_path / "webhook.log")
    try:
        assert validate(server, None).status_code == 200
    finally:
        server.stop()


def test_a_missing_client_ca_file_stops_the_start_with_exit_2(webhook_certs: Path, tmp_path: Path) -> None:  # noqa: F811
    import subprocess
    import sys

    from .conftest import REPO_ROOT

    result = subprocess.run(
        [sys.executable, "-m", "powercap", "webhook", "--cert-dir", str(webhook_certs), "--no-cross-policy-checks",
         "--client-ca-file", str(tmp_path / "missing.crt"), "--bind", "127.0.0.1:0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'missing.crt'}: no such file (--client-ca-file)" in result.stderr
