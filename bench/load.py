"""The HTTP load generator: asyncio + httpx, closed loop (as fast as it goes) or open loop (a rate).

Each request body is a mail whose ``X-Bench-Sent`` header holds ``time.time()`` taken just before
the request is sent; the SMTP sink reads it back, so end-to-end latency is measured on this
machine's one clock. Bodies are pre-serialised once per size and only the header values are
spliced in, so JSON encoding of 100 KiB bodies does not load the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from bench.smtp_sink import SENT_HEADER

_SENT_MARK = "9999999999.000000"  # same width as any time.time() formatted with %.6f until 2286
_INDEX_MARK = "@@INDEX@@"


class MailTemplate:
    """A mail request of ``body_bytes`` text, as JSON bytes with the header values spliced in.

    ``per_request`` > 1: each request is a batch of that many mails (``POST /v1/messages:batch``,
    ``{"messages": [...]}``), all stamped with the request's send time.
    """

    def __init__(self, body_bytes: int, run: str, per_request: int = 1) -> None:
        line = "mailpipe benchmark body line, 64 bytes long, ascii only....\n"
        text = (line * (body_bytes // len(line) + 1))[:body_bytes]
        mail = {
            "from": "Bench <bench@example.com>",
            "to": ["sink@example.net"],
            "subject": f"bench {run} {_INDEX_MARK}",
            "text": text,
            "headers": {SENT_HEADER: _SENT_MARK, "X-Bench-Run": run},
        }
        encoded = json.dumps(mail).encode()
        head, tail = encoded.split(_SENT_MARK.encode())
        self._subject_head, self._subject_tail = head.split(_INDEX_MARK.encode())
        self._tail = tail
        self.body_bytes = body_bytes
        self.per_request = per_request

    def render(self, index: int, sent: float) -> bytes:
        """Request ``index``'s body (a batch's mails are numbered ``index * per_request + i``)."""
        if self.per_request == 1:
            return self._render_one(index, sent)
        first = index * self.per_request
        mails = b",".join(self._render_one(first + i, sent) for i in range(self.per_request))
        return b'{"messages":[' + mails + b"]}"

    def _render_one(self, index: int, sent: float) -> bytes:
        return b"".join(
            (
                self._subject_head,
                str(index).encode(),
                self._subject_tail,
                f"{sent:.6f}".encode(),
                self._tail,
            )
        )


@dataclass
class LoadResult:
    """What the client saw: one entry per request."""

    started: list[float] = field(default_factory=list)  # time.time() at send
    finished: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # open loop: send time - scheduled time
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    mails_per_request: int = 1  # a batch request's 202 accepts every one of its mails

    @property
    def accepted(self) -> int:
        """Mails accepted (a 202 to a batch request counts each of its mails)."""
        return self.statuses.get(202, 0) * self.mails_per_request

    @property
    def requests(self) -> int:
        return len(self.started)

    def to_json(self) -> dict[str, object]:
        first = min(self.started, default=0.0)
        last = max(self.finished, default=0.0)
        span = last - first if self.started else 0.0
        return {
            "requests": self.requests,
            "mails_per_request": self.mails_per_request,
            "accepted": self.accepted,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "seconds": round(span, 4),
            "accept_rate": round(self.accepted / span, 1) if span > 0 else None,
            "client_cpu_seconds": round(self.client_cpu_seconds, 3),
            "client_cpu_cores": round(self.client_cpu_seconds / self.wall_seconds, 3)
            if self.wall_seconds
            else None,
        }


class RawHttpClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, a connection per request in flight.

    httpx costs about 5 ms of CPU per request here, which on a 2-core machine takes CPU from the
    services being measured; this client costs a fraction of that. It only speaks what the
    publisher answers: a status line, headers and a ``Content-Length`` body.
    """

    def __init__(self, url: str, concurrency: int) -> None:
        parsed = httpx.URL(url)
        self._host, self._port = parsed.host, parsed.port or 80
        self._path = parsed.raw_path.decode()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._gate = asyncio.Semaphore(concurrency)

    async def post(self, body: bytes) -> int:
        async with self._gate:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                reader, writer = conn
                writer.write(
                    f"POST {self._path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length, close = 0, False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                await reader.readexactly(length)
            except BaseException:
                conn[1].close()
                raise
            if close:
                conn[1].close()
            else:
                self._idle.append(conn)
            return status

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self._host, self._port)

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class HttpxClient:
    """httpx's AsyncClient with a connection per request in flight."""

    def __init__(self, url: str, concurrency: int) -> None:
        self._url = url
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.AsyncClient(
            limits=limits,
            timeout=httpx.Timeout(60.0),
            headers={"Content-Type": "application/json"},
        )

    async def post(self, body: bytes) -> int:
        response = await self._client.post(self._url, content=body)
        return response.status_code

    async def aclose(self) -> None:
        await self._client.aclose()


CLIENTS = {"raw": RawHttpClient, "httpx": HttpxClient}
ClientKind = Literal["raw", "httpx"]
_ERRORS = (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


async def _send(
    client: RawHttpClient | HttpxClient,
    template: MailTemplate,
    index: int,
    result: LoadResult,
    on_done: Callable[[], None] | None,
    scheduled: float | None = None,
) -> None:
    sent = time.time()
    if scheduled is not None:
        result.lags.append(sent - scheduled)
    try:
        status = await client.post(template.render(index, sent))
        result.statuses[status] = result.statuses.get(status, 0) + 1
    except _ERRORS as exc:
        name = type(exc).__name__
        result.errors[name] = result.errors.get(name, 0) + 1
    result.started.append(sent)
    result.finished.append(time.time())
    if on_done is not None:
        on_done()


async def _closed_loop(
    client: RawHttpClient | HttpxClient,
    template: MailTemplate,
    count: int,
    concurrency: int,
    max_seconds: float,
    first_index: int,
    on_done: Callable[[], None] | None,
) -> LoadResult:
    result = LoadResult(mails_per_request=template.per_request)
    deadline = time.monotonic() + max_seconds
    indexes = iter(range(first_index, first_index + count))

    async def worker() -> None:
        for index in indexes:
            if time.monotonic() > deadline:
                return
            await _send(client, template, index, result, on_done)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.aclose()
    return result


async def _open_loop(
    client: RawHttpClient | HttpxClient,
    template: MailTemplate,
    rate: float,
    seconds: float,
    max_in_flight: int,
    first_index: int,
    on_done: Callable[[], None] | None,
) -> LoadResult:
    result = LoadResult(mails_per_request=template.per_request)
    count = max(1, int(rate * seconds))
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(max_in_flight)
    tasks: list[asyncio.Task[None]] = []

    async def one(index: int, scheduled: float) -> None:
        async with gate:  # past the cap a request waits: its lag shows in `lags`
            await _send(client, template, index, result, on_done, scheduled)

    try:
        start_loop, start_wall = loop.time() + 0.05, time.time() + 0.05
        for i in range(count):
            delay = start_loop + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(first_index + i, start_wall + i / rate)))
        await asyncio.gather(*tasks)
    finally:
        await client.aclose()
    return result


def _timed(run: Callable[[], Coroutine[Any, Any, LoadResult]]) -> LoadResult:
    cpu, wall = time.process_time(), time.monotonic()
    result = asyncio.run(run())
    result.wall_seconds = time.monotonic() - wall
    result.client_cpu_seconds = time.process_time() - cpu
    return result


def closed_loop(
    url: str,
    template: MailTemplate,
    *,
    count: int,
    concurrency: int = 32,
    max_seconds: float = 120.0,
    first_index: int = 0,
    client: ClientKind = "raw",
    on_done: Callable[[], None] | None = None,
) -> LoadResult:
    """Send ``count`` mails, ``concurrency`` in flight, each as soon as the previous answer."""

    async def run() -> LoadResult:
        http = CLIENTS[client](url, concurrency)
        return await _closed_loop(
            http, template, count, concurrency, max_seconds, first_index, on_done
        )

    return _timed(run)


def open_loop(
    url: str,
    template: MailTemplate,
    *,
    rate: float,
    seconds: float,
    max_in_flight: int = 256,
    first_index: int = 0,
    client: ClientKind = "raw",
    on_done: Callable[[], None] | None = None,
) -> LoadResult:
    """Start a request every ``1/rate`` s for ``seconds``, whatever the answers (open loop)."""

    async def run() -> LoadResult:
        http = CLIENTS[client](url, max_in_flight)
        return await _open_loop(http, template, rate, seconds, max_in_flight, first_index, on_done)

    return _timed(run)
