"""One small HTTP server for probes, metrics and status pages: ``/healthz``, ``/readyz``,
``/metrics``, ``/status``, whatever the program routes.

Standard library (``http.server``), a thread per connection, GET only. The query string
is ignored (``/metrics?x=1`` is ``/metrics``); unknown paths get 404. A client that hangs
up mid-reply is logged as one JSON line at debug level, not a traceback on stderr.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("powercap.runtime.httpserver")

Reply = tuple[int, str, bytes]
"""HTTP status, Content-Type and body."""
Route = Callable[[], Reply]

TEXT = "text/plain; charset=utf-8"


def text_reply(code: int, text: str) -> Reply:
    return code, TEXT, text.encode()


def check_reply(problem: str | None) -> Reply:
    """200 ``ok`` when there is no problem, else 503 with the problem: a probe's answer."""
    return text_reply(503, f"{problem}\n") if problem else text_reply(200, "ok\n")


def metrics_route(registry: CollectorRegistry) -> Route:
    """``/metrics`` in the Prometheus text format, from ``registry``."""
    return lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a traceback to stderr; a reset or a closed pipe is
        # the client's doing and worth a debug line at most
        log.debug("client hung up", extra={"client": str(client_address[0]) if client_address else ""}, exc_info=False)


class HttpServer:
    """Serve ``routes`` (path -> reply function) on ``host:port`` (port 0: any free port)."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Route], name: str = "http-server") -> None:
        self._server = _Server((host, port), _handler(dict(routes)))
        self._name = name
        self._thread: threading.Thread | None = None

    @classmethod
    def on(cls, bind: str, routes: Mapping[str, Route], name: str = "http-server") -> HttpServer:
        """On ``HOST:PORT`` (``[::1]:PORT`` for IPv6), as the ``--*-bind`` flags give it."""
        host, _, port = bind.rpartition(":")
        return cls(host.strip("[]"), int(port), routes, name)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=self._name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(routes: dict[str, Route]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            route = routes.get(self.path.split("?", 1)[0])
            code, content_type, body = route() if route else text_reply(404, "not found\n")
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("request", extra={"request": format % args})

    return Handler
