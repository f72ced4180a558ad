"""Certificates for the webhook: a small CA and a serving certificate, made with ``cryptography``.

kube-apiserver calls the webhook at ``https://<service>.<namespace>.svc:443`` and checks the
serving certificate against the ``caBundle`` of the webhook configuration; it ignores the
Common Name, so the names must be SANs. Files written to the output directory::

    ca.crt   CA certificate (PEM), 0644; its base64 is the caBundle
    ca.key   CA private key (PEM, PKCS#8), 0600
    tls.crt  serving certificate (PEM), 0644
    tls.key  serving private key (PEM, PKCS#8), 0600

Running again with an existing ``ca.crt``/``ca.key`` keeps the CA (so the caBundle in the
cluster stays valid) and renews only the serving certificate; a ``ca.key`` that group or
others may read is refused (whoever read it can impersonate the webhook). Directories it
creates are 0700, whatever the umask. Every file is replaced
atomically (temporary file + rename), so a server watching the files never reads half a
file. Keys are ECDSA P-256: small, fast handshakes, accepted by every Kubernetes version.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
PRIVATE_KEY_MODE = 0o600
CERTIFICATE_MODE = 0o644
DIRECTORY_MODE = 0o700
CLOCK_SKEW = datetime.timedelta(minutes=5)  # not-before is backdated by this much

PrivateKey = ec.EllipticCurvePrivateKey


class CertificateError(Exception):
    """The existing files cannot be used (e.g. a CA certificate without its key)."""


@dataclass(frozen=True)
class IssuedCertificates:
    out_dir: Path
    ca_certificate: x509.Certificate
    serving_certificate: x509.Certificate
    ca_created: bool

    @property
    def ca_bundle(self) -> str:
        """The ``caBundle`` of the webhook configurations: base64 of the CA certificate PEM."""
        return base64.b64encode(self.ca_certificate.public_bytes(serialization.Encoding.PEM)).decode("ascii")


def service_dns_names(service: str, namespace: str) -> list[str]:
    """``NAME``, ``NAME.NS``, ``NAME.NS.svc``, ``NAME.NS.svc.cluster.local``."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def subject_alternative_names(names: list[str]) -> list[x509.GeneralName]:
    """DNS names, and IP addresses for the entries that parse as one (``127.0.0.1``, ``::1``)."""
    result: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def san_names(certificate: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in sans]


def issue(
    out_dir: Path,
    service: str,
    namespace: str,
    *,
    serving_days: int,
    ca_days: int,
    extra_sans: tuple[str, ...] = (),
    now: datetime.datetime | None = None,
) -> IssuedCertificates:
    """Create (or reuse) the CA in ``out_dir`` and issue a fresh serving certificate.

    The serving certificate never outlives its CA: its not-after is the earlier of
    ``now + serving_days`` and the CA's not-after.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    make_private_directory(out_dir)
    ca_certificate, ca_key, ca_created = _load_or_create_ca(out_dir, service, namespace, ca_days, now)
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + datetime.timedelta(days=serving_days), ca_certificate.not_valid_after_utc)
    common_name = f"{service}.{namespace}.svc"
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(subject_alternative_names([*service_dns_names(service, namespace), *extra_sans])),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # key first: a server that reloads between the two renames sees a mismatched pair,
    # refuses it and keeps the old one until the certificate arrives
    write_private_key(out_dir / TLS_KEY, key)
    write_certificate(out_dir / TLS_CERT, certificate)
    return IssuedCertificates(out_dir, ca_certificate, certificate, ca_created)


def make_private_directory(path: Path) -> None:
    """Create ``path`` and its missing parents mode 0700, whatever the umask (an existing
    directory is left as it is)."""
    missing = []
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        directory.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
        os.chmod(directory, DIRECTORY_MODE)  # the umask may have taken bits from mkdir's mode


def _check_private(key_path: Path) -> None:
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise CertificateError(
            f"{key_path} may be read by group or others (mode {mode:04o}), and whoever read it can impersonate "
            f"the webhook: if no one did, 'chmod 600 {key_path}' and run again; otherwise remove ca.crt and ca.key "
            "to make a new CA (the caBundle changes)"
        )


def _load_or_create_ca(
    out_dir: Path, service: str, namespace: str, ca_days: int, now: datetime.datetime
) -> tuple[x509.Certificate, PrivateKey, bool]:
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    if cert_path.exists() or key_path.exists():
        if not (cert_path.exists() and key_path.exists()):
            missing = key_path if cert_path.exists() else cert_path
            raise CertificateError(f"{missing} is missing; remove the other CA file to create a new CA")
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            raise CertificateError(f"{cert_path} is not a PEM certificate; remove ca.crt and ca.key to create a new CA") from None
        _check_private(key_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise CertificateError(f"{key_path} is not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
            raise CertificateError(f"{key_path} is not the ECDSA key of {cert_path}")
        if certificate.not_valid_after_utc <= now:
            raise CertificateError(f"the CA in {cert_path} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
        return certificate, key, False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"powercap webhook CA ({service}.{namespace})")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_key(key_path, key)
    write_certificate(cert_path, certificate)
    return certificate, key, True


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600, atomically."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_atomically(path, pem, PRIVATE_KEY_MODE)


def write_certificate(path: Path, certificate: x509.Certificate) -> None:
    write_atomically(path, certificate.public_bytes(serialization.Encoding.PEM), CERTIFICATE_MODE)


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a mix.

    The temporary file is created 0600 and only then given ``mode``, so a private key is
    never readable by others, not even for a moment.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
