"""The buffering gunicorn worker (``powercap.runtime.httpworker``) over real sockets: what a
client sees of its framing, deadlines and limits. A tiny Flask app under
``powercap.runtime.wsgi.GunicornServer`` with small limits, in a subprocess."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO_ROOT
from .webhook_helpers import free_port

SERVER = textwrap.dedent('''
    import hashlib, sys
    from flask import Flask, request
    from powercap.runtime.httpworker import ConnectionLimits
    from powercap.runtime.wsgi import GunicornServer

    def load():
        app = Flask("worker-test")

        @app.post("/echo")
        def echo():
            if request.content_length is not None and request.content_length > 1000:
                return "too large\\n", 413
            body = request.get_data()
            if len(body) > 1000:
                return "too large\\n", 413
            return f"{len(body)} {hashlib.sha256(body).hexdigest()}\\n"

        @app.get("/ping")
        def ping():
            return "pong\\n"

        return app

    limits = ConnectionLimits(max_body_bytes=1000, max_head_bytes=2048, request_timeout_s=1.0,
                              write_timeout_s=2.0, max_buffered_bytes=64 * 1024, drain_limit_bytes=100_000)
    GunicornServer({"bind": [sys.argv[1]], "workers": 1, "threads": 2, "keepalive": 3,
                    "worker_connections": 20, "graceful_timeout": 3}, load, "info", limits=limits).run()
''')


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    script = tmp_path_factory.mktemp("worker") / "server.py"
    script.write_text(SERVER)
    port = free_port()
    log = script.parent / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}"], cwd=REPO_ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if b"pong" in exchange(port, b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n"):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise TimeoutError(log.read_text())
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)


def exchange(port: int, data: bytes, *, timeout_s: float = 5.0, read_until_close: bool = False) -> bytes:
    """Send ``data`` on a new connection; what comes back until the server closes (or, unless
    ``read_until_close``, until a complete first answer arrived)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received
            if not chunk:
                return received
            received += chunk
            if not read_until_close and _complete(received):
                return received


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep or head.startswith(b"HTTP/1.1 100"):
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def read_answer(sock: socket.socket) -> bytes:
    received = b""
    while not _complete(received):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def post(body: bytes, *headers: bytes) -> bytes:
    return b"POST /echo HTTP/1.1\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def echoed(body: bytes) -> bytes:
    return f"{len(body)} {hashlib.sha256(body).hexdigest()}\n".encode()


def test_a_body_is_received_whole_and_handed_to_the_app(port: int) -> None:
    body = b"x" * 1000
    reply = exchange(port, post(body, b"Content-Length: 1000"))
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(echoed(body))


def test_a_chunked_body_is_dechunked(port: int) -> None:
    reply = exchange(port, post(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n", b"Transfer-Encoding: chunked"))
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(echoed(b"hello world"))


def test_expect_100_continue_is_answered_before_the_body(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(post(b"", b"Content-Length: 4", b"Expect: 100-continue"))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"ping")
        reply = b""
        while not _complete(reply):
            reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(echoed(b"ping"))
    assert b"100 Continue" not in reply


def test_a_body_over_the_limit_gets_the_apps_413_and_the_connection_closes(port: int) -> None:
    reply = exchange(port, post(b"x" * 5000, b"Content-Length: 5000"), read_until_close=True)
    assert reply.startswith(b"HTTP/1.1 413") and reply.endswith(b"too large\n")
    assert b"Connection: close" in reply


def test_an_expected_body_over_the_limit_is_refused_before_it_is_sent(port: int) -> None:
    reply = exchange(port, post(b"", b"Content-Length: 5000", b"Expect: 100-continue"), read_until_close=True)
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert b"100 Continue" not in reply


def test_a_chunked_body_over_the_limit_gets_413(port: int) -> None:
    chunks = b"".join(b"%x\r\n" % 500 + b"y" * 500 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    reply = exchange(port, post(chunks, b"Transfer-Encoding: chunked"), read_until_close=True)
    assert reply.startswith(b"HTTP/1.1 413")


def test_a_head_over_the_limit_gets_431(port: int) -> None:
    reply = exchange(port, b"GET /ping HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n", read_until_close=True)
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")


@pytest.mark.parametrize("header", [b"Content-Length: abc", b"Content-Length: 1\r\nContent-Length: 2",
                                    b"Content-Length: 3\r\nTransfer-Encoding: chunked"])
def test_an_ambiguous_body_length_is_refused_400(port: int, header: bytes) -> None:
    reply = exchange(port, post(b"abc", header), read_until_close=True)
    assert reply.startswith(b"HTTP/1.1 400")


def test_pipelined_and_kept_alive_requests_are_answered_in_order(port: int) -> None:
    two = post(b"one", b"Content-Length: 3") + post(b"second", b"Content-Length: 6")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(two)
        reply = b""
        deadline = time.monotonic() + 5
        while echoed(b"second") not in reply and time.monotonic() < deadline:
            reply += sock.recv(65536)
        assert reply.index(echoed(b"one")) < reply.index(echoed(b"second"))
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")  # the same connection, kept alive
        assert read_answer(sock).endswith(b"pong\n")


def test_a_request_not_received_within_the_timeout_is_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
        slow.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        assert exchange(port, b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n").endswith(b"pong\n")
        assert slow.recv(100) == b"", "closed, with nothing sent"
        assert 0.9 <= time.monotonic() - started < 3.0


def test_idle_new_connections_are_closed_after_the_timeout_and_kept_alive_ones_after_keepalive(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=6) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=6) as kept:
        kept.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_answer(kept).endswith(b"pong\n")
        started = time.monotonic()
        assert idle.recv(1) == b""
        idle_s = time.monotonic() - started
        assert kept.recv(1) == b""
        kept_s = time.monotonic() - started
    assert idle_s < 2.0 and 2.0 <= kept_s < 4.5


def test_past_the_connection_limit_the_waiting_connection_nearest_its_deadline_makes_room(port: int) -> None:
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(25)]
    try:
        for _ in range(3):
            assert exchange(port, b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n", timeout_s=2).endswith(b"pong\n")
        closed = 0
        for sock in held:
            sock.settimeout(0.2)
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:
                pass
        assert closed >= 5, "at most 20 connections per worker stay open"
    finally:
        for sock in held:
            sock.close()
