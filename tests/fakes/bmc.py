"""A fake BMC: a real HTTPS server (TLS from a test CA) serving Redfish documents.

It answers GETs of the paths it is given with their documents (a mapping is sent as JSON,
bytes as they are), checks HTTP basic auth or a session token, and serves the session
service (``POST /redfish/v1/SessionService/Sessions`` -> ``X-Auth-Token`` and the
session's ``Location``; ``DELETE`` of that path logs out). ``delay_s``
makes every answer late, to play a BMC that hangs. What the BMC cannot be made to show
(a dropped session) is set by hand: ``tokens.clear()``.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from webhook import certs

SESSIONS = "/redfish/v1/SessionService/Sessions"


@dataclass
class FakeBmc:
    documents: dict[str, Mapping[str, Any] | bytes]
    username: str = "powercap"
    password: str = "s3cret pass"
    delay_s: float = 0.0
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    tokens: set[str] = field(default_factory=set)
    sessions: dict[str, str] = field(default_factory=dict)  # session path -> its token
    url: str = ""
    ca_file: Path | None = None
    release: threading.Event = field(default_factory=threading.Event)  # ends every pending delay

    def authorised(self, headers: Message) -> bool:
        if headers.get("X-Auth-Token") in self.tokens:
            return True
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return headers.get("Authorization") == f"Basic {expected}"


def _handler(bmc: FakeBmc) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """Quiet: the tests read ``bmc.requests``."""

        def _send(self, code: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            bmc.requests.append(("GET", self.path))
            if bmc.delay_s:
                bmc.release.wait(bmc.delay_s)
            if not bmc.authorised(self.headers):
                self._send(401, b'{"error": "unauthorized"}', {"WWW-Authenticate": 'Basic realm="BMC"'})
                return
            document = bmc.documents.get(self.path)
            if document is None:
                self._send(404, b'{"error": "not found"}')
                return
            self._send(200, document if isinstance(document, bytes) else json.dumps(document).encode())

        def do_POST(self) -> None:  # noqa: N802
            bmc.requests.append(("POST", self.path))
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path != SESSIONS:
                self._send(405, b"{}")
            elif body.get("UserName") != bmc.username or body.get("Password") != bmc.password:
                self._send(401, b'{"error": "bad credentials"}')
            else:
                token = secrets.token_hex(16)
                bmc.tokens.add(token)
                session = f"{SESSIONS}/{secrets.token_hex(4)}"
                bmc.sessions[session] = token
                self._send(201, b"{}", {"X-Auth-Token": token, "Location": session})

        def do_DELETE(self) -> None:  # noqa: N802
            bmc.requests.append(("DELETE", self.path))
            token = bmc.sessions.pop(self.path, None)
            if token is None or self.headers.get("X-Auth-Token") != token:
                self._send(404, b"{}")
                return
            bmc.tokens.discard(token)
            self._send(204, b"")

    return Handler


@contextmanager
def serving(bmc: FakeBmc, cert_dir: Path) -> Iterator[FakeBmc]:
    """Serve ``bmc`` on 127.0.0.1 over HTTPS with a certificate of a fresh test CA
    (``bmc.ca_file``), until the block ends."""
    certs.issue(cert_dir, "bmc", "test", serving_days=1, ca_days=1, extra_sans=("127.0.0.1", "localhost"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_dir / certs.TLS_CERT, cert_dir / certs.TLS_KEY)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(bmc))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    bmc.url = f"https://127.0.0.1:{server.server_address[1]}"
    bmc.ca_file = cert_dir / certs.CA_CERT
    thread = threading.Thread(target=server.serve_forever, name="fake-bmc", daemon=True)
    thread.start()
    try:
        yield bmc
    finally:
        bmc.release.set()
        server.shutdown()
        server.server_close()
