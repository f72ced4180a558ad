"""A gunicorn worker that receives each request whole before a thread sees it.

Why: gunicorn's ``gthread`` worker hands a connection to a thread as soon as it is
accepted, and that thread then reads the TLS handshake, the headers and the body with
blocking calls. A client that sends nothing, or a byte now and then, holds the thread for
as long as it likes: with 2 workers x 4 threads, 8 such connections stopped the webhook.

How: one event loop per worker (``selectors``) owns every connection that is not being
answered. It accepts, completes TLS handshakes without blocking, and reads request bytes
as they come, keeping them in the connection's buffer, until the request is complete: the
head (up to its ``\\r\\n\\r\\n``) and the body that its ``Content-Length`` or chunked
framing announces. Only then is the request handed to a thread of the pool, which parses
the head with gunicorn's own parser (its limits and errors apply), runs the WSGI app with
the buffered body as ``wsgi.input`` and writes the answer. A slow or idle client therefore
costs a buffer and a file descriptor, never a thread; the threads only ever run
requests that are ready.

Bounds (:class:`ConnectionLimits`, per worker process):

- a request must be complete within ``request_timeout_s`` of its first byte (for a new
  connection: of the accept, TLS handshake included); after that the connection is closed;
- a kept-alive connection may wait ``keepalive`` seconds (gunicorn's setting) for its next
  request;
- a head larger than ``max_head_bytes`` is answered 431 and the connection closed;
- a body larger than ``max_body_bytes`` is not kept: it is read and dropped (up to
  ``drain_limit_bytes``, so that a client that sends before it reads gets the answer, not
  a reset), then the application is called so that it answers 413 itself (and counts
  it): with no body when ``Content-Length`` announced too much (the application must
  check ``CONTENT_LENGTH`` first), with the first ``max_body_bytes + 1`` bytes of a chunked
  body; the connection is closed after the answer;
- the requests still arriving may hold at most ``max_buffered_bytes`` together; past that,
  the connection holding the most is closed;
- at most ``worker_connections`` (gunicorn's setting) connections are open; a new one then
  closes the waiting connection whose deadline is nearest;
- a thread writes the answer with ``write_timeout_s`` per socket operation.

``Expect: 100-continue`` is answered by the loop when the announced body fits (and not at
all when it does not, so the client can stop before sending it); the header is then taken
out of the head the application sees. HTTP/1.0 and 1.1 only (no HTTP/2, no upgrades).

The WSGI environ gets two keys of ours: :data:`LISTENER_KEY` (the index of the listener
in gunicorn's ``bind`` list, so that an app can serve some routes on one address only) and
:data:`PEER_CERTIFICATE_KEY` (the client's verified TLS certificate as
``ssl.SSLSocket.getpeercert()`` returns it, None when the client presented none).

Use :func:`worker_class` to get the class with its limits, and pass it as gunicorn's
``worker_class``.
"""

from __future__ import annotations

import errno
import io
import os
import selectors
import socket
import ssl
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any, ClassVar

from gunicorn import http as gunicorn_http
from gunicorn import sock as gunicorn_sock
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers import base

LISTENER_KEY = "powercap.listener"
PEER_CERTIFICATE_KEY = "powercap.peer_certificate"

READ_CHUNK_BYTES = 256 * 1024
# bytes read from one connection per loop turn, so that one fast large upload does not
# delay the others
READ_PER_TURN_BYTES = 4 * 1024 * 1024
ACCEPTS_PER_TURN = 64
# how long a stopping worker keeps idle kept-alive connections, for a request a client may
# already be sending on one (it is answered with "Connection: close")
STOP_LINGER_S = 2.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    """What one worker process grants its clients (module docstring)."""

    max_body_bytes: int
    max_head_bytes: int = 64 * 1024
    request_timeout_s: float = 10.0
    write_timeout_s: float = 10.0
    max_buffered_bytes: int = 64 * 1024 * 1024
    drain_limit_bytes: int = 16 * 1024 * 1024


def worker_class(limits: ConnectionLimits, name: str = "BufferingWorker") -> type[BufferingWorker]:
    """A :class:`BufferingWorker` subclass bound to ``limits``, for gunicorn's ``worker_class``."""
    return type(name, (BufferingWorker,), {"limits": limits, "__module__": __name__})


class _Framing:
    NONE, LENGTH, CHUNKED = range(3)


class Connection:
    """One client connection and the request it is sending."""

    def __init__(self, sock: socket.socket, client: Any, server: Any, listener: int, now: float, deadline_s: float) -> None:
        self.sock: socket.socket = sock
        self.client = client
        self.server = server
        self.listener = listener
        self.handshaken = False
        self.peer_certificate: Any = None
        self.busy = False
        self.closing = False
        self.want_write = False
        self.inbox = bytearray()
        self.counted = 0  # bytes of this connection in the worker's ``buffered`` total
        self.deadline = now + deadline_s
        self.requests = 0
        self._reset()

    def _reset(self) -> None:
        self.started = False  # a byte of the current request arrived
        self.head: bytes | None = None
        self.framing = _Framing.NONE
        self.length = 0
        self.body = bytearray()
        self.oversize = False
        self.dropped = 0
        self.close_after = False
        self.chunk_left = -1  # chunked: bytes of chunk data left; -1: expecting a size line
        self.chunk_crlf = False  # chunked: the CRLF after a chunk's data is due
        self.trailers = False  # chunked: the last chunk came, reading trailers

    @property
    def held_bytes(self) -> int:
        return len(self.inbox) + len(self.body)

    def next_request(self, now: float, keepalive_s: float) -> None:
        self._reset()
        self.busy = False
        self.deadline = now + keepalive_s

    def fileno(self) -> int:
        return self.sock.fileno()


@dataclass(frozen=True)
class BufferedRequest:
    head: bytes
    body: bytes
    close: bool


class RequestRejected(Exception):
    """The loop answers the request itself (``response``) and closes the connection."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        body = (message + "\n").encode()
        self.response = (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n").encode() + body


class BufferingWorker(base.Worker):  # type: ignore[misc]  # gunicorn is untyped
    """The worker (module docstring). ``limits`` is set by :func:`worker_class`."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits(max_body_bytes=1024 * 1024)

    def init_process(self) -> None:
        self.poller = selectors.DefaultSelector()
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.threads), thread_name_prefix="request")
        self.finished: SimpleQueue[tuple[Connection, Future[bool]]] = SimpleQueue()
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        self.connections: set[Connection] = set()
        self.buffered = 0
        self.accepting = False
        self.next_expiry_check = 0.0
        super().init_process()

    # --- signals -----------------------------------------------------------------------

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.alive = False
        self._wake()

    def handle_quit(self, sig: int, frame: Any) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        super().handle_quit(sig, frame)

    def _wake(self) -> None:
        try:
            os.write(self.wake_write, b"\0")
        except OSError:
            pass  # the pipe is full: the loop wakes anyway

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self.poller.register(self.wake_read, selectors.EVENT_READ, None)
        self._set_accepting(True)
        while self.alive:
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            self._set_accepting(len(self.connections) < self.cfg.worker_connections or self._evictable() is not None)
            self._turn(1.0)
        self._stop()

    def _stop(self) -> None:
        self._set_accepting(False)
        now = time.monotonic()
        for conn in list(self.connections):
            if not conn.busy and not conn.started:
                conn.deadline = min(conn.deadline, now + STOP_LINGER_S)
        give_up = now + self.cfg.graceful_timeout
        while self.connections and time.monotonic() < give_up:
            self.notify()
            self._turn(0.2)
        for conn in list(self.connections):
            self._close(conn)
        self.pool.shutdown(wait=False)
        self.poller.close()
        for listener in self.sockets:
            listener.close()

    def _turn(self, timeout_s: float) -> None:
        try:
            events = self.poller.select(timeout_s)
        except OSError as error:
            if error.errno != errno.EINTR:
                raise
            events = []
        for key, mask in events:
            data = key.data
            if data is None:
                self._drain_wake_pipe()
            elif isinstance(data, int):
                self._accept(key.fileobj, data)  # type: ignore[arg-type]
            elif data in self.connections:
                self._on_ready(data, mask)
        self._run_finished()
        now = time.monotonic()
        if now >= self.next_expiry_check:
            self.next_expiry_check = now + 0.1
            for conn in [c for c in self.connections if not c.busy and c.deadline <= now]:
                if conn.started:
                    self.log.debug("closing a connection whose request did not arrive within %.0f s", self.limits.request_timeout_s)
                self._close(conn)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self.wake_read, 4096):
                pass
        except OSError:
            pass

    def _set_accepting(self, enabled: bool) -> None:
        if enabled == self.accepting:
            return
        for index, listener in enumerate(self.sockets):
            if enabled:
                listener.setblocking(False)
                self.poller.register(listener, selectors.EVENT_READ, index)
            else:
                self.poller.unregister(listener)
        self.accepting = enabled

    def _evictable(self) -> Connection | None:
        """The waiting connection whose deadline is nearest (None when every one is busy)."""
        waiting = [c for c in self.connections if not c.busy]
        return min(waiting, key=lambda c: c.deadline) if waiting else None

    def _accept(self, listener: Any, index: int) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                client_sock, client_addr = listener.accept()
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                    return
                raise
            if len(self.connections) >= self.cfg.worker_connections:
                victim = self._evictable()
                if victim is None:
                    client_sock.close()
                    return
                self.log.debug("connection limit (%d) reached: closing the one nearest its deadline", self.cfg.worker_connections)
                self._close(victim)
            client_sock.setblocking(False)
            now = time.monotonic()
            conn = Connection(client_sock, client_addr, listener.getsockname(), index, now, self.limits.request_timeout_s)
            if self.cfg.is_ssl:
                try:
                    conn.sock = gunicorn_sock.ssl_context(self.cfg).wrap_socket(
                        client_sock, server_side=True, do_handshake_on_connect=False,
                        suppress_ragged_eofs=True,
                    )
                except (OSError, ssl.SSLError) as error:
                    self.log.warning("no TLS context for a new connection: %s", error)
                    client_sock.close()
                    continue
            else:
                conn.handshaken = True
            self.connections.add(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, conn)

    def _watch(self, conn: Connection, write: bool) -> None:
        events = selectors.EVENT_WRITE if write else selectors.EVENT_READ
        if conn.want_write != write:
            conn.want_write = write
            self.poller.modify(conn.sock, events, conn)

    def _on_ready(self, conn: Connection, mask: int) -> None:
        if not conn.handshaken:
            if not self._handshake(conn):
                return
        self._receive(conn)

    def _handshake(self, conn: Connection) -> bool:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, write=False)
            return False
        except ssl.SSLWantWriteError:
            self._watch(conn, write=True)
            return False
        except (OSError, ssl.SSLError, ValueError) as error:
            self.log.debug("TLS handshake failed from %s: %s", _address(conn.client), error)
            self._close(conn)
            return False
        self._watch(conn, write=False)
        conn.handshaken = True
        conn.peer_certificate = sock.getpeercert() or None
        return True

    def _receive(self, conn: Connection) -> None:
        received = 0
        while received < READ_PER_TURN_BYTES:
            try:
                data = conn.sock.recv(READ_CHUNK_BYTES)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._watch(conn, write=False)
                break
            except ssl.SSLWantWriteError:
                self._watch(conn, write=True)
                break
            except (OSError, ssl.SSLError, ValueError) as error:
                self.log.debug("read from %s failed: %s", _address(conn.client), error)
                self._close(conn)
                return
            if not data:
                self._close(conn)  # the client closed; a half-sent request goes with it
                return
            received += len(data)
            if not conn.started:
                conn.started = True
                if conn.requests:  # a new connection's first request counts from the accept
                    conn.deadline = time.monotonic() + self.limits.request_timeout_s
            conn.inbox += data
            if self._advance(conn):
                return
        self._account(conn)
        if self.buffered > self.limits.max_buffered_bytes:
            victim = max((c for c in self.connections if not c.busy), key=lambda c: c.held_bytes)
            self.log.warning("requests being received hold over %d bytes: closing the connection holding the most (%d bytes)",
                             self.limits.max_buffered_bytes, victim.held_bytes)
            self._close(victim)

    def _advance(self, conn: Connection) -> bool:
        """Frame what ``conn`` holds; True when the request was handed on or refused."""
        try:
            request = self._frame(conn)
        except RequestRejected as rejected:
            self._reject(conn, rejected)
            return True
        if request is None:
            return False
        self._dispatch(conn, request)
        return True

    def _account(self, conn: Connection) -> None:
        held = 0 if conn.busy or conn not in self.connections else conn.held_bytes
        self.buffered += held - conn.counted
        conn.counted = held

    # --- framing -----------------------------------------------------------------------

    def _frame(self, conn: Connection) -> BufferedRequest | None:
        """The request, once ``conn.inbox`` holds all of it; None while more is due."""
        limits = self.limits
        if conn.head is None:
            start = conn.inbox.find(b"\r\n\r\n")
            if start < 0:
                if len(conn.inbox) > limits.max_head_bytes:
                    raise RequestRejected("431 Request Header Fields Too Large",
                                          f"request head larger than {limits.max_head_bytes} bytes")
                return None
            head_end = start + 4
            if head_end > limits.max_head_bytes:
                raise RequestRejected("431 Request Header Fields Too Large", f"request head larger than {limits.max_head_bytes} bytes")
            head = bytes(conn.inbox[:head_end])
            del conn.inbox[:head_end]
            conn.head = self._read_head(conn, head)
        if conn.framing == _Framing.LENGTH and not conn.oversize:
            # the body stays in the inbox until it is whole, then is copied out once
            if len(conn.inbox) < conn.length:
                return None
            with memoryview(conn.inbox) as view:
                body = bytes(view[:conn.length])
            conn.inbox = conn.inbox[conn.length:]  # a pipelined next request, usually nothing
            return BufferedRequest(conn.head, body, conn.close_after)
        if conn.framing == _Framing.LENGTH:
            drop = min(len(conn.inbox), conn.length - conn.dropped)
            conn.dropped += drop
            del conn.inbox[:drop]
            if conn.dropped < conn.length and conn.dropped < limits.drain_limit_bytes:
                return None
            if conn.dropped < conn.length:
                conn.close_after = True  # the rest of the body is still coming
        elif conn.framing == _Framing.CHUNKED:
            if not self._unchunk(conn):
                return None
        body, conn.body = bytes(conn.body), bytearray()
        return BufferedRequest(conn.head, body, conn.close_after or conn.oversize)

    def _read_head(self, conn: Connection, head: bytes) -> bytes:
        """Find the body's framing in ``head``; answer ``Expect: 100-continue``.

        Anything unusual (several lengths, a length and chunked, another coding) is left to
        gunicorn's parser, which refuses it; the request then carries no body and the
        connection closes after the answer.
        """
        lines = head[:-4].split(b"\r\n")
        lengths, codings, expect_line = [], [], None
        for index, line in enumerate(lines[1:], start=1):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                lengths.append(value.strip())
            elif name == b"transfer-encoding":
                codings.append(value.strip().lower())
            elif name == b"expect" and value.strip().lower() == b"100-continue":
                expect_line = index
        if codings:
            if codings == [b"chunked"] and not lengths:
                conn.framing = _Framing.CHUNKED
            else:
                conn.close_after = True
        elif lengths:
            if len(lengths) == 1 and lengths[0].isdigit() and lengths[0].isascii():
                conn.framing, conn.length = _Framing.LENGTH, int(lengths[0])
                conn.oversize = conn.length > self.limits.max_body_bytes
            else:
                conn.close_after = True
        if expect_line is not None:
            del lines[expect_line]
            head = b"\r\n".join(lines) + b"\r\n\r\n"
            if conn.oversize:
                # no 100 Continue: the client need not send the body; answer right away
                conn.framing, conn.length = _Framing.NONE, 0
            elif conn.framing != _Framing.NONE:
                self._send_nowait(conn, CONTINUE)
        return head

    def _unchunk(self, conn: Connection) -> bool:
        """Move chunk data from ``conn.inbox`` to ``conn.body``; True once the last chunk and
        the trailers are in. Malformed framing is refused with 400."""
        limits = self.limits
        inbox = conn.inbox
        while True:
            if conn.trailers:
                if inbox.startswith(b"\r\n"):
                    del inbox[:2]
                    return True
                end = inbox.find(b"\r\n\r\n")
                if end < 0:
                    if len(inbox) > limits.max_head_bytes:
                        raise RequestRejected("400 Bad Request", "chunked trailers too large")
                    return False
                del inbox[:end + 4]
                return True
            if conn.chunk_crlf:
                if len(inbox) < 2:
                    return False
                if inbox[:2] != b"\r\n":
                    raise RequestRejected("400 Bad Request", "chunk data not followed by CRLF")
                del inbox[:2]
                conn.chunk_crlf = False
            if conn.chunk_left < 0:
                end = inbox.find(b"\r\n")
                if end < 0:
                    if len(inbox) > 1024:
                        raise RequestRejected("400 Bad Request", "chunk size line too long")
                    return False
                size_text = bytes(inbox[:end]).split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                    raise RequestRejected("400 Bad Request", "invalid chunk size")
                del inbox[:end + 2]
                conn.chunk_left = int(size_text, 16)
                if conn.chunk_left == 0:
                    conn.trailers = True
                    continue
            if not inbox:
                return False
            take = min(conn.chunk_left, len(inbox))
            room = limits.max_body_bytes + 1 - len(conn.body)
            if room > 0:
                conn.body += inbox[:min(take, room)]
            if take > room:
                conn.oversize = True
                conn.dropped += take - max(room, 0)
                if conn.dropped >= limits.drain_limit_bytes:
                    conn.close_after = True
                    del inbox[:take]
                    return True
            del inbox[:take]
            conn.chunk_left -= take
            if conn.chunk_left > 0:
                return False
            conn.chunk_left = -1
            conn.chunk_crlf = True

    # --- answering ---------------------------------------------------------------------

    def _send_nowait(self, conn: Connection, data: bytes) -> None:
        try:
            conn.sock.send(data)
        except (OSError, ssl.SSLError, ValueError):
            pass  # the client is gone or not reading; the request fails later on its own

    def _reject(self, conn: Connection, rejected: RequestRejected) -> None:
        self.log.info("refused a request from %s: %s", _address(conn.client), rejected)
        self._send_nowait(conn, rejected.response)
        self._close(conn)

    def _dispatch(self, conn: Connection, request: BufferedRequest) -> None:
        conn.busy = True
        conn.requests += 1
        self._account(conn)
        self.poller.unregister(conn.sock)
        conn.want_write = False
        future = self.pool.submit(self._serve, conn, request)

        def done(finished: Future[bool]) -> None:
            self.finished.put((conn, finished))
            self._wake()

        future.add_done_callback(done)

    def _run_finished(self) -> None:
        while True:
            try:
                conn, future = self.finished.get_nowait()
            except Empty:
                return
            keep = (not future.cancelled()) and future.exception() is None and future.result()
            if not keep or conn.sock.fileno() < 0:
                self._close(conn)
                continue
            now = time.monotonic()
            keepalive_s = self.cfg.keepalive if self.alive else min(self.cfg.keepalive, STOP_LINGER_S)
            conn.next_request(now, keepalive_s)
            try:
                conn.sock.setblocking(False)
            except OSError:
                self._close(conn)
                continue
            self.poller.register(conn.sock, selectors.EVENT_READ, conn)
            pending = isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending()
            if conn.inbox or pending:
                # the client sent its next request already (pipelining)
                conn.started = True
                conn.deadline = now + self.limits.request_timeout_s
                if not self._advance(conn):
                    self._account(conn)
                    if pending:
                        self._receive(conn)

    def _serve(self, conn: Connection, buffered: BufferedRequest) -> bool:
        """Run the app on one complete request (in a pool thread); True to keep the connection."""
        sock = conn.sock
        req = None
        try:
            sock.settimeout(self.limits.write_timeout_s)
            parser = gunicorn_http.RequestParser(self.cfg, iter((buffered.head,)), conn.client)
            req = next(parser)
            resp, environ = gunicorn_wsgi.create(req, sock, conn.client, conn.server, self.cfg)
            environ["wsgi.input"] = io.BytesIO(buffered.body)
            environ["wsgi.multithread"] = True
            environ[LISTENER_KEY] = conn.listener
            environ[PEER_CERTIFICATE_KEY] = conn.peer_certificate
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                self.alive = False
                self._wake()
            if buffered.close or not self.alive or not self.cfg.keepalive:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                for item in respiter:
                    resp.write(item)
                resp.close()
            finally:
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        except StopIteration:
            return False
        except (socket.timeout, TimeoutError):
            self.log.debug("answer to %s not sent within %.0f s", _address(conn.client), self.limits.write_timeout_s)
            return False
        except (ConnectionError, ssl.SSLError) as error:
            self.log.debug("client %s went away: %s", _address(conn.client), error)
            return False
        except Exception as error:  # gunicorn's parse errors (400, 431, ...) and our bugs (500, logged)
            self.handle_error(req, sock, conn.client, error)
            return False

    def _close(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self._account(conn)
        if not conn.busy:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass


def _address(client: Any) -> str:
    return str(client[0]) if isinstance(client, tuple) and client else str(client)

