"""Serving a WSGI app with gunicorn, configured in code (both services use it).

``build()`` makes the app in the worker, after the fork: gRPC clients must not cross a fork. On
SIGTERM (Cloud Run's stop signal) gunicorn finishes requests in flight within ``graceful_timeout``,
then ``close()`` flushes. :class:`BufferingThreadWorker` keeps slow clients from holding threads
and answers gunicorn's own errors in JSON (docs/hostile-input.md, "Slow and idle clients").
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import _DEFER, ThreadWorker
from werkzeug.exceptions import RequestTimeout

from mailpipe.config import HttpConfig
from mailpipe.httpjson import error_code

WsgiApp = Callable[..., Any]
Build = Callable[[], tuple[WsgiApp, Callable[[], None]]]

STOP_DROP_LOG = "stopping: closed a connection whose request had not arrived whole (%d bytes read)"
_HEAD_END = b"\r\n\r\n"
# gunicorn's own ceiling for a request head is about 800 KiB (request line + 100 fields of 8 KiB);
# a head still unfinished past this goes to gunicorn, which answers 431/414.
_MAX_BUFFERED_HEAD = 64 * 1024
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,15})[ \t]*(?:\r\n|$)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_EXPECT_LINE = re.compile(rb"\r\nexpect[ \t]*:[ \t]*100-continue[ \t]*(?=\r\n)", re.IGNORECASE)


class RequestReadTimeout(RequestTimeout):
    """A request did not arrive within the read timeout (408; the app answers it as JSON)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(
            f"the request did not arrive within {timeout:g} s of its first byte "
            "(MAILPIPE_HTTP_READ_TIMEOUT): send the whole request at once"
        )


class _RequestSocket:
    """A client socket as gunicorn sees it: reads stop at the request's deadline; also holds
    the bytes of the request being buffered."""

    def __init__(self, sock: socket.socket, read_timeout: float) -> None:
        self.raw = sock
        self.read_timeout = read_timeout
        self.deadline: float | None = None  # set at the request's first byte
        self.pending = bytearray()
        self.closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def next_request(self) -> None:  # the request was answered (or abandoned)
        self.deadline = None
        self.pending = bytearray()

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)
        if how != socket.SHUT_RD:
            # gunicorn's graceful close now drains the client's unread bytes for up to 2 s, on
            # the worker's main loop: a client that keeps sending would stall it. It gets what
            # has already arrived, and no wait.
            self.closing = True

    def settimeout(self, value: float | None) -> None:
        self.raw.settimeout(0.0 if self.closing else value)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.deadline is None:
            return self.raw.recv(bufsize, flags)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RequestReadTimeout(self.read_timeout)
        previous = self.raw.gettimeout()
        self.raw.settimeout(remaining if previous is None else min(previous, remaining))
        try:
            return self.raw.recv(bufsize, flags)
        except TimeoutError as exc:
            raise RequestReadTimeout(self.read_timeout) from exc
        finally:
            self.raw.settimeout(previous)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        # Once the answer starts, reads (gunicorn draining an unread body) are not the request's
        # any more; an interim "1xx" answer is not the answer.
        if not bytes(data[:10]).startswith(b"HTTP/1.1 1"):
            self.deadline = None
        self.raw.sendall(data, flags)


def _request_complete(data: bytearray) -> bool:
    """Whether ``data`` holds a whole request gunicorn can parse without waiting (or a request
    gunicorn will refuse at once: then it should see it now)."""
    head_end = data.find(_HEAD_END)
    if head_end < 0:
        # gunicorn refuses a bare LF line ending, and too long a head, without waiting for more.
        return data.count(b"\n") != data.count(b"\r\n") or len(data) > _MAX_BUFFERED_HEAD
    head = bytes(data[:head_end])
    if _CHUNKED.search(head):
        # A guess (a chunk may end with these bytes too): too early only means the thread reads
        # the rest, still within the deadline.
        return data.endswith(b"0\r\n\r\n")
    length = _CONTENT_LENGTH.search(head)
    if length is None:
        return True  # no body, or one gunicorn/the app refuses from the header alone
    return len(data) - head_end - len(_HEAD_END) >= int(length[1])


class BufferingThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, with each request read into memory before a thread runs it
    (``read_timeout`` is set on a subclass by :func:`worker_class`)."""

    read_timeout: float = HttpConfig.read_timeout
    buffer_bytes: int = 1024 * 1024  # held before a thread runs the request (and reads the rest)

    def handle(self, conn: Any) -> Any:
        sock = conn.sock
        if not isinstance(sock, _RequestSocket):
            sock = conn.sock = _RequestSocket(conn.sock, self.read_timeout)
        state = self._read_available(conn, sock)
        if state == "wait" and self.alive:
            return _DEFER  # back to the poller until more arrives (or keepalive_timeout ends)
        if state == "wait":  # stopping: gthread would close it; say so
            self.log.warning(STOP_DROP_LOG, len(sock.pending))
        if state == "expired":
            self._answer_timeout(sock, "request")
        if state != "complete":
            sock.next_request()
            return False  # gunicorn closes the connection
        # Past here gunicorn parses and the app runs; the buffered bytes come first.
        conn.data_ready = True  # skip gthread's own wait for a first byte
        conn.init()
        conn.parser.unreader.unread(sock.pending)  # copied into the parser's buffer
        sock.pending = bytearray()
        try:
            return super().handle(conn)
        finally:
            sock.next_request()

    def _read_available(self, conn: Any, sock: _RequestSocket) -> str:
        """Read what has arrived without blocking: complete | wait | expired | closed."""
        if conn.parser is not None:
            # Bytes of this request gunicorn read ahead with the previous one (pipelining).
            sock.pending += conn.parser.unreader.take_buffered()
        sock.raw.setblocking(False)
        complete = _request_complete(sock.pending)
        while not complete and len(sock.pending) < self.buffer_bytes:
            try:
                chunk = sock.raw.recv(min(262144, self.buffer_bytes - len(sock.pending)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return "closed"
            if not chunk:
                return "closed"  # the client left before its request was complete
            sock.pending += chunk
            self._expect_continue(sock)
            complete = _request_complete(sock.pending)
        if sock.pending and sock.deadline is None:
            sock.deadline = time.monotonic() + self.read_timeout
        if complete or len(sock.pending) >= self.buffer_bytes:
            return "complete"
        if sock.deadline is not None and time.monotonic() >= sock.deadline:
            return "expired"
        return "wait"

    @staticmethod
    def _expect_continue(sock: _RequestSocket) -> None:
        """Answer ``Expect: 100-continue`` here, so the client sends its body while the request
        is still being buffered; the header is taken out so gunicorn does not answer it again."""
        head_end = sock.pending.find(_HEAD_END)
        head = bytes(sock.pending[: head_end + 2])
        if head_end < 0 or not head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1"):
            return
        if _EXPECT_LINE.search(head):
            with contextlib.suppress(OSError):  # the client is gone; reading will tell
                sock.raw.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                sock.pending[: head_end + 2] = _EXPECT_LINE.sub(b"", head)

    def _answer_timeout(self, sock: Any, what: str) -> None:
        self.log.info("closing a connection whose %s did not arrive in time", what)
        message = str(RequestReadTimeout(self.read_timeout).description)
        _write_json_error(sock, 408, "Request Timeout", message)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's own answers (a malformed or too large head, a timeout while it read one)
        in the services' JSON error format, not as an HTML page."""
        if isinstance(exc, RequestReadTimeout):
            return self._answer_timeout(client, "request head")
        ours, theirs = socket.socketpair()  # gunicorn writes its HTML page here, to be read back
        with ours, theirs:
            super().handle_error(req, ours, addr, exc)
            ours.shutdown(socket.SHUT_WR)  # a page gunicorn failed to write reads as b"", no hang
            page = theirs.recv(1 << 20).decode("latin-1")
        match = re.match(r"HTTP/1\.1 (\d{3}) ([^\r\n]*)", page)
        status, reason = (int(match[1]), match[2]) if match else (500, "Internal Server Error")
        body = re.search(r"</h1>\s*(.*?)\s*</body>", page, re.DOTALL)
        message = html.unescape(body[1]) if body and body[1] else reason
        _write_json_error(client, status, reason, message)


def _write_json_error(sock: Any, status: int, reason: str, message: str) -> None:
    body = json.dumps({"error": {"code": error_code(reason), "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with contextlib.suppress(OSError):  # the client is gone or not reading
        sock.setblocking(False)  # never wait on a client that does not read
        sock.sendall(head.encode("latin-1") + body)


def worker_class(http: HttpConfig) -> type[Any]:
    """The worker class gunicorn runs, with ``http``'s read timeout."""
    timeout = {"read_timeout": http.read_timeout}
    return type("MailpipeThreadWorker", (BufferingThreadWorker,), timeout)


class _Server(BaseApplication):
    def __init__(self, build: Build, options: dict[str, Any]) -> None:
        self._build = build
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> WsgiApp:
        # In the worker, after the fork; gunicorn calls worker_exit in the worker too.
        app, close = self._build()
        self.cfg.set("worker_exit", lambda _arbiter, _worker: close())
        return app


# Cloud Run must not send more concurrent requests than this (tests/unit/test_terraform.py).
SERVER_THREADS = 16


def serve_wsgi(
    build: Build,
    *,
    host: str,
    port: int,
    http: HttpConfig | None = None,
) -> None:
    """Serve ``build()``'s app on ``host:port`` until SIGTERM/SIGINT. One worker with threads:
    the process holds one Pub/Sub client and one SMTP pool; Cloud Run scales by instances."""
    http = http or HttpConfig()
    options: dict[str, Any] = {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": worker_class(http),
        "threads": SERVER_THREADS,
        "keepalive": http.keepalive_timeout,
        "timeout": 0,  # Cloud Run enforces the request timeout; the arbiter must not kill us
        "graceful_timeout": 8,  # under Cloud Run's 10 s SIGTERM grace period
        "accesslog": None,
        "loglevel": "warning",
    }
    _Server(build, options).run()
