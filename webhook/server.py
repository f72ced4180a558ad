"""Serving the webhook: gunicorn over TLS >= 1.2, with certificate rotation.

Gunicorn asks its ``ssl_context`` server hook for a context on every new connection. Our
hook returns the context of a :class:`CertificateReloader`, which checks the certificate
and key files (``os.stat``: inode, size, mtime) and builds a new context when either
changed. New handshakes therefore get the new certificate; connections already open keep
the context they were made with, so nothing in flight is dropped. A pair that does not
load (files caught mid-rotation, a key that does not match) is refused and the previous
context stays in service until a good pair appears.

Kubernetes updates a mounted Secret by swapping a symlink, which changes the inode seen
through ``tls.crt``; ``powercap certs`` replaces files by rename, likewise.

Client certificates (``--client-ca-file``): the context then asks every client for a
certificate and verifies one that is presented against that CA (``CERT_OPTIONAL``: a
client that presents none still completes the handshake, so that the kubelet's probes
and Prometheus reach ``/readyz``, ``/healthz`` and ``/metrics``); the app refuses
``/validate`` and ``/mutate`` without a verified certificate (403). The CA file is
followed like the serving pair.

Worker model: :class:`powercap.runtime.httpworker.BufferingWorker` (``--workers``
processes x ``--threads`` threads): one event loop per process does the TLS handshakes and
receives every request whole before a thread runs it, so slow or idle clients hold no
thread. ``keepalive`` is longer than the apiserver's idle timeout (90 s), so that the
apiserver, not us, closes idle connections: a server-side close can race a request being
sent.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask

from powercap.runtime.filewatch import FileStamp, file_stamp
from powercap.runtime.httpworker import ConnectionLimits
from powercap.runtime.wsgi import GunicornServer
from webhook.app import MAX_BODY_BYTES
from webhook.certs import TLS_CERT, TLS_KEY

log = logging.getLogger("powercap.webhook.server")

# TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are not configurable and all fine.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
KEEPALIVE_S = 120
GRACEFUL_TIMEOUT_S = 20
# kube-apiserver gives a webhook timeoutSeconds (5 s here) for the whole call, so a request
# that takes longer than this to arrive is not the apiserver's.
REQUEST_TIMEOUT_S = 10.0
# open connections per worker process; each costs a file descriptor and a small buffer
WORKER_CONNECTIONS = 1000
# what the requests still arriving may hold together, per worker process
MAX_BUFFERED_BYTES = 16 * 1024 * 1024


def connection_limits() -> ConnectionLimits:
    """The webhook's bounds per worker process (:mod:`powercap.runtime.httpworker`)."""
    return ConnectionLimits(
        max_body_bytes=MAX_BODY_BYTES,
        request_timeout_s=REQUEST_TIMEOUT_S,
        write_timeout_s=REQUEST_TIMEOUT_S,
        max_buffered_bytes=MAX_BUFFERED_BYTES,
    )


def new_server_context(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or newer, forward-secret AEAD suites, no compression;
    with ``client_ca_file``, client certificates are asked for and verified against it
    (module docstring)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    for path in (cert_file, key_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (--cert-dir holds tls.crt and tls.key; powercap certs writes them)")
    try:
        context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except ssl.SSLError as error:
        # OpenSSL's own text ("[SSL] PEM lib") names neither file
        raise ValueError(f"{cert_file} and {key_file} are not a PEM certificate and its private key ({error.reason or error})") from None
    if client_ca_file is not None:
        if not client_ca_file.is_file():
            raise FileNotFoundError(f"{client_ca_file}: no such file (--client-ca-file)")
        try:
            context.load_verify_locations(cafile=str(client_ca_file))
        except ssl.SSLError as error:
            raise ValueError(f"{client_ca_file} is not a PEM CA certificate ({error.reason or error})") from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class CertificateReloader:
    """An SSL context that follows the certificate and key files (see the module docstring).

    ``context()`` is cheap when nothing changed: two ``stat`` calls under a lock.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._stamps: tuple[FileStamp | None, ...] | None = None
        self.reloads = 0

    @property
    def loaded(self) -> bool:
        """True once a certificate is in service."""
        return self._context is not None

    def context(self) -> ssl.SSLContext:
        """The context for a new connection; raises ``ssl.SSLError``/``OSError`` only if none ever loaded."""
        with self._lock:
            stamps = tuple(file_stamp(path) for path in self._files())
            if stamps != self._stamps or self._context is None:
                self._reload(stamps)
            if self._context is None:
                raise ssl.SSLError(f"no usable certificate in {self.cert_file} and {self.key_file}")
            return self._context

    def _files(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def _reload(self, stamps: tuple[FileStamp | None, ...]) -> None:
        try:
            context = new_server_context(self.cert_file, self.key_file, self.client_ca_file)
        except (OSError, ssl.SSLError, ValueError) as error:
            # keep the previous context; the next connection tries again
            log.warning("certificate not reloaded", extra={"fields": {"cert_file": str(self.cert_file), "error": str(error)}})
            return
        if self._context is not None:
            log.info("certificate reloaded", extra={"fields": {"cert_file": str(self.cert_file)}})
        self._context, self._stamps = context, stamps
        self.reloads += 1


@dataclass(frozen=True)
class ServerOptions:
    cert_dir: Path
    bind: str
    workers: int
    threads: int
    metrics_dir: str | None = None
    log_level: str = "info"
    client_ca_file: Path | None = None

    @property
    def cert_file(self) -> Path:
        return self.cert_dir / TLS_CERT

    @property
    def key_file(self) -> Path:
        return self.cert_dir / TLS_KEY


AppFactory = Callable[[CertificateReloader], Flask]


class WebhookServer(GunicornServer):
    """The webhook under gunicorn, over TLS with the certificate files followed (see the
    module docstring). ``app_factory`` runs in each worker after the fork."""

    def __init__(self, options: ServerOptions, app_factory: AppFactory) -> None:
        self.options = options
        self.reloader = CertificateReloader(options.cert_file, options.key_file, options.client_ca_file)
        reloader, metrics_dir = self.reloader, options.metrics_dir

        def ssl_context(config: Any, default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            return reloader.context()

        def child_exit(server: Any, worker: Any) -> None:
            if metrics_dir:
                from prometheus_client import multiprocess
                multiprocess.mark_process_dead(worker.pid, metrics_dir)

        settings: dict[str, Any] = {
            "bind": [options.bind],
            "workers": options.workers,
            "threads": options.threads,
            "certfile": str(options.cert_file),
            "keyfile": str(options.key_file),
            "ssl_context": ssl_context,
            "child_exit": child_exit,
            "keepalive": KEEPALIVE_S,
            "graceful_timeout": GRACEFUL_TIMEOUT_S,
            "worker_connections": WORKER_CONNECTIONS,
            "proc_name": "powercap-webhook",
        }
        super().__init__(settings, lambda: app_factory(reloader), options.log_level, limits=connection_limits())
