"""Slow and idle clients against the publisher as it runs in production: ``python -m publisher``
(gunicorn, one worker of 16 threads) on loopback, publishing to the Pub/Sub emulator.

More slow clients than there are threads trickle their requests a byte at a time (some the head,
some the body) and others connect and send nothing. Meanwhile ``/healthz`` and a real mail still
get answered (within a generous liveness bound: no timing claims), the trickling requests get a
JSON 408 once MAILPIPE_HTTP_READ_TIMEOUT has passed and are closed, and the silent connections
are closed after MAILPIPE_HTTP_KEEPALIVE_TIMEOUT. Errors gunicorn answers itself are JSON too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emulator import delete_topology, sync_topology
from emulator.pipeline import start_service
from emulator.process import free_port
from tests.fixtures.topology import unique_topology

READ_TIMEOUT = 2
KEEPALIVE = 2
THREADS = 16  # mailpipe.serving.serve_wsgi's default
SLOW_CLIENTS = THREADS + 24
IDLE_CLIENTS = 20
LIVENESS = 20.0  # seconds: an answer later than this counts as starved
BODY = json.dumps(
    {"from": "slow@example.com", "to": ["rcpt@example.org"], "subject": "s", "text": "x" * 300}
).encode()
HEAD = (
    b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n"
)


@pytest.fixture(scope="module")
def publisher_url(
    pubsub_emulator: Any, pubsub_project: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    topology = unique_topology()
    sync_topology(topology, project=pubsub_project, emulator_host=pubsub_emulator.host)
    state: Path = tmp_path_factory.mktemp("slow-clients")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAILPIPE_")}
    env.update(
        {
            "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
            "GOOGLE_CLOUD_PROJECT": pubsub_project,
            "MAILPIPE_TOPIC": topology.mail_topic.name,
            "MAILPIPE_RECORD": f"sqlite:///{state / 'record.sqlite3'}",
            "MAILPIPE_HTTP_READ_TIMEOUT": str(READ_TIMEOUT),
            "MAILPIPE_HTTP_KEEPALIVE_TIMEOUT": str(KEEPALIVE),
            "PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    url = f"http://127.0.0.1:{port}"
    service = start_service(
        "publisher", ["publisher"], env=env, log_dir=state, health_url=f"{url}/healthz"
    )
    try:
        service.wait_healthy(timeout=60)
        yield url
    finally:
        service.stop()
        delete_topology(topology, project=pubsub_project, emulator_host=pubsub_emulator.host)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


class Trickler:
    """Sends each socket its own bytes, one byte per socket per round, until stopped."""

    def __init__(self, streams: list[tuple[socket.socket, bytes]]) -> None:
        self.streams = streams
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="trickler", daemon=True)

    def _run(self) -> None:
        position = 0
        while not self.stop.wait(0.1) and position < max(len(d) for _, d in self.streams):
            for sock, data in self.streams:
                if position < len(data):
                    # A send fails once the server closed the connection: what the test waits for.
                    with contextlib.suppress(OSError):
                        sock.send(data[position : position + 1])
            position += 1

    def __enter__(self) -> Trickler:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (or the deadline passes)."""
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def test_slow_clients_cannot_starve_the_publisher(publisher_url: str) -> None:
    slow_heads = [connect(publisher_url) for _ in range(SLOW_CLIENTS // 2)]
    slow_bodies = [connect(publisher_url) for _ in range(SLOW_CLIENTS - len(slow_heads))]
    idle = [connect(publisher_url) for _ in range(IDLE_CLIENTS)]
    for sock in slow_bodies:
        sock.sendall(HEAD)  # the head at once, then the body a byte at a time
    streams = [(s, HEAD + BODY) for s in slow_heads] + [(s, BODY) for s in slow_bodies]
    try:
        with Trickler(streams), httpx.Client(base_url=publisher_url, timeout=LIVENESS) as http:
            time.sleep(0.5)  # every slow client has sent its first bytes

            health = http.get("/healthz")
            accepted = http.post(
                "/v1/messages", content=BODY, headers={"Content-Type": "application/json"}
            )
            record = http.get(f"/v1/messages/{accepted.json()['mail_id']}")

            deadline = time.monotonic() + READ_TIMEOUT + KEEPALIVE + LIVENESS
            slow_answers = [read_until_closed(s, deadline) for s in slow_heads + slow_bodies]
            idle_answers = [read_until_closed(s, deadline) for s in idle]
            health_after = http.get("/healthz")
    finally:
        for sock in slow_heads + slow_bodies + idle:
            sock.close()

    assert health.status_code == 200, health.text
    assert accepted.status_code == 202, accepted.text
    assert record.status_code == 200, record.text
    for data, closed in slow_answers:
        assert closed, f"a slow connection was still open after the read timeout: {data[:200]!r}"
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), data[:200]
        assert b"Content-Type: application/json" in head
        assert json.loads(body)["error"]["code"] == "request_timeout"
    for data, closed in idle_answers:
        assert closed, "a silent connection was still open after the keep-alive timeout"
        assert data == b""
    assert health_after.status_code == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: nan\r\n\r\n", 400),
    ],
    ids=["request-line", "header-name", "bare-lf", "uri-too-long", "header-too-large", "length"],
)
def test_errors_gunicorn_answers_itself_are_json(
    publisher_url: str, request_bytes: bytes, status: int
) -> None:
    sock = connect(publisher_url)
    try:
        sock.sendall(request_bytes)
        data, closed = read_until_closed(sock, time.monotonic() + LIVENESS)
    finally:
        sock.close()

    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), data[:300]
    assert b"Content-Type: application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] and error["message"]


def test_a_kept_alive_connection_serves_requests_until_it_idles_out(publisher_url: str) -> None:
    sock = connect(publisher_url)
    try:
        answers = b""
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            while answers.count(b'{"status":"ok"}') < _ + 1:
                chunk = sock.recv(65536)
                assert chunk, "the connection closed between requests"
                answers += chunk
        rest, closed = read_until_closed(sock, time.monotonic() + KEEPALIVE + LIVENESS)
    finally:
        sock.close()
    assert answers.count(b"HTTP/1.1 200 OK") == 3
    assert closed
    assert rest == b""


def read_answers(sock: socket.socket, count: int) -> bytes:
    """Read until ``count`` complete JSON answers (each ends with a newline) have arrived."""
    data = b""
    sock.settimeout(LIVENESS)
    while data.count(b"}\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed early: {data[:300]!r}"
        data += chunk
    return data


def test_a_client_waiting_for_100_continue_gets_it_once_and_then_its_answer(
    publisher_url: str,
) -> None:
    sock = connect(publisher_url)
    try:
        sock.sendall(HEAD.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
        sock.settimeout(LIVENESS)
        interim = sock.recv(65536)
        sock.sendall(BODY)  # only now, as a client that waits for "100 Continue" does
        answer = read_answers(sock, 1)
    finally:
        sock.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"100 Continue" not in answer
    assert answer.startswith(b"HTTP/1.1 202 "), answer[:300]


def test_pipelined_requests_are_each_answered_in_order(publisher_url: str) -> None:
    sock = connect(publisher_url)
    try:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            + HEAD
            + BODY
            + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answers = read_answers(sock, 3)
    finally:
        sock.close()
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answers) == [b"200", b"202", b"404"]
