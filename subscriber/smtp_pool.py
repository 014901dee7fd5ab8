"""The SMTP sender's connections: a time budget per send, budgeted clients, and the pool.

:class:`Budget` is the time one send may still take; :class:`BudgetedClient` is
``smtplib.SMTP`` with every write and every read bounded by it (re-armed before each read, so a
relay trickling a reply byte by byte cannot stretch a step past the deadline);
:class:`ConnectionPool` holds at most ``size`` connections, one transaction at a time each.
Nothing here sends a command of its own: :mod:`subscriber.smtp` drives the dialogue.
"""

from __future__ import annotations

import io
import smtplib
import socket
import threading
import time
from typing import Any

from subscriber.smtp_translation import OutOfTime

# A socket timeout cut to the deadline fires at it; this much early still counts as "at it".
DEADLINE_SLACK = 0.01


class Budget:
    """The time one send may still take.

    ``deadline`` is a ``time.monotonic()`` value (None: no limit but the per-step one); every
    socket operation waits at most ``min(step_timeout, time left)``.
    """

    def __init__(self, deadline: float | None, step_timeout: float) -> None:
        self.deadline = deadline
        self.step_timeout = step_timeout

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def timeout(self) -> float:
        """The timeout for the next socket operation; :class:`OutOfTime` when none is left."""
        left = self.left()
        if left is None:
            return self.step_timeout
        if left <= 0:
            raise OutOfTime("the delivery's time budget is used up")
        return min(self.step_timeout, left)

    def out_of_time(self) -> bool:
        left = self.left()
        return left is not None and left <= DEADLINE_SLACK


class BudgetedReader(socket.SocketIO):
    """Reads replies, setting the socket's timeout from its client's budget before every read.

    smtplib applies one socket timeout per read; a relay sending a reply a byte at a time (a
    tarpit) would restart it on every byte. Re-arming it to the time left before each read keeps
    every step within the send's deadline.
    """

    def __init__(self, sock: socket.socket, owner: BudgetedClient) -> None:
        super().__init__(sock, "rb")
        self._socket = sock
        self._owner = owner

    def readinto(self, b: Any) -> int | None:
        budget = self._owner.budget
        if budget is not None:
            self._socket.settimeout(budget.timeout())
        return super().readinto(b)


class BudgetedClient(smtplib.SMTP):
    """``smtplib.SMTP`` whose every write and read is bounded by the current send's budget.

    It also keeps the greeting, so the connect span can show its reply code.
    """

    budget: Budget | None = None
    greeting: tuple[int, bytes] = (0, b"")

    def __init__(self, *args: Any, budget: Budget | None = None, **kwargs: Any) -> None:
        self.budget = budget  # before smtplib connects and reads the greeting
        super().__init__(*args, **kwargs)

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: Any = None
    ) -> tuple[int, bytes]:
        self.greeting = super().connect(host, port, source_address)
        return self.greeting

    def send(self, s: Any) -> None:
        if self.budget is not None and self.sock is not None:
            self.sock.settimeout(self.budget.timeout())
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            # Also after STARTTLS, which drops the reader of the plain socket.
            self.file = io.BufferedReader(BudgetedReader(self.sock, self))
        return super().getreply()


class ImplicitTlsClient(BudgetedClient, smtplib.SMTP_SSL):
    """``smtplib.SMTP_SSL`` (TLS from the first byte) with the budget of :class:`BudgetedClient`."""


class Connection:
    """One SMTP session to the relay, used by one transaction at a time."""

    def __init__(self, client: BudgetedClient) -> None:
        self.client = client

    @property
    def open(self) -> bool:
        return self.client.sock is not None


class ConnectionPool:
    """At most ``size`` connections: a slot is held while a connection is in use or being opened.

    A connection is either idle (in ``_idle``) or held by the thread owning a slot, and a new
    one is only opened when no idle one is left, so there are never more than ``size``.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self.closed = False

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting at most ``timeout`` seconds; False if none became free."""
        return self._slots.acquire(timeout=max(timeout, 0.0))

    def release(self) -> None:
        self._slots.release()

    def take(self) -> Connection | None:
        with self._lock:
            # Most recently used first: it is the least likely to have been closed while idle.
            return self._idle.pop() if self._idle else None

    def give_back(self, conn: Connection) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._idle.append(conn)
            return True

    def drain(self) -> list[Connection]:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
            return idle
