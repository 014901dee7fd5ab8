"""The benchmark's SMTP server: :class:`emulator.smtp.LocalSmtpServer` in its own process.

It runs in a separate process (``multiprocessing`` spawn) so its CPU is apart from the load
generator's. For each mail it accepts it notes the time the 250 is about to be sent and the
``X-Bench-Sent`` header (the client's ``time.time()`` when it started the HTTP request), so the
end-to-end latency is measured on one clock. Received mails are dropped after that: thousands of
100 KiB mails would otherwise sit in memory.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from emulator.smtp import LocalSmtpServer, ReceivedMail

SENT_HEADER = "X-Bench-Sent"
_SENT = re.compile(rb"^X-Bench-Sent:[ \t]*([0-9.]+)", re.MULTILINE | re.IGNORECASE)


def sent_time(raw: bytes) -> float | None:
    """The ``X-Bench-Sent`` value of a raw message (looked up in its header section only)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    match = _SENT.search(head)
    return float(match.group(1)) if match else None


class RecordingSmtpServer(LocalSmtpServer):
    """LocalSmtpServer that records ``(received_at, sent_at, size)`` and keeps no mail."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._records_lock = threading.Lock()
        self._records: list[tuple[float, float | None, int]] = []
        self._count = 0
        super().__init__(*args, on_mail=self._record, **kwargs)

    def _record(self, mail: ReceivedMail, queue_id: str) -> None:
        # Called after the real server's work (parse included), before its 250.
        received = time.time()
        raw = mail.raw
        self.clear_messages()
        with self._records_lock:
            self._records.append((received, sent_time(raw), len(raw)))
            self._count += 1

    @property
    def count(self) -> int:
        with self._records_lock:
            return self._count

    def take(self) -> list[tuple[float, float | None, int]]:
        """The records since the last take (the count keeps going)."""
        with self._records_lock:
            records, self._records = self._records, []
            return records


def _serve(conn: multiprocessing.connection.Connection) -> None:
    server = RecordingSmtpServer(host="127.0.0.1", port=0)
    server.start()
    conn.send(("ready", server.port))
    try:
        while True:
            command = conn.recv()
            if command == "count":
                conn.send(server.count)
            elif command == "take":
                conn.send(server.take())
            elif command == "stop":
                break
    except EOFError:  # the benchmark went away: stop too
        pass
    finally:
        server.stop()
        conn.close()


@dataclass
class SmtpSink:
    """Handle on the SMTP server process."""

    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    port: int
    _lock: threading.Lock

    @classmethod
    def start(cls, timeout: float = 30.0) -> SmtpSink:
        context = multiprocessing.get_context("spawn")  # no inherited gRPC threads
        parent, child = context.Pipe()
        process = context.Process(target=_serve, args=(child,), name="bench-smtp", daemon=True)
        process.start()
        child.close()
        if not parent.poll(timeout):
            process.kill()
            raise RuntimeError("the benchmark's SMTP server did not start")
        _, port = parent.recv()
        return cls(process, parent, port, threading.Lock())

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def _ask(self, command: str) -> Any:
        with self._lock:
            self.conn.send(command)
            return self.conn.recv()

    def count(self) -> int:
        """Mails accepted since the server started."""
        return int(self._ask("count"))

    def take(self) -> list[tuple[float, float | None, int]]:
        """``(received_at, sent_at, size)`` of each mail accepted since the last take."""
        return list(self._ask("take"))

    def wait_for(
        self, total: int, timeout: float, on_progress: Any = None, poll: float = 0.1
    ) -> int:
        """Wait until ``total`` mails were accepted in all (or the timeout); return the count."""
        deadline = time.monotonic() + timeout
        count = self.count()
        while count < total and time.monotonic() < deadline:
            time.sleep(poll)
            count = self.count()
            if on_progress is not None:
                on_progress(count)
        return count

    def stop(self) -> None:
        try:
            with self._lock:
                self.conn.send("stop")
        except OSError:
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()

    def __enter__(self) -> SmtpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
