"""A local SMTP server (aiosmtpd) that keeps what it receives, with scripted faults for tests.

Used by ``mailpipe up`` as the relay the subscriber delivers to, and by the tests as a real SMTP
server on loopback. It runs aiosmtpd's :class:`~aiosmtpd.controller.Controller` in its own
thread and is built on aiosmtpd's public handler API: the ``handle_EHLO/MAIL/RCPT/DATA`` hooks
return the replies, ``Controller.factory`` makes each connection's protocol. Every mail it
accepts is kept in :attr:`LocalSmtpServer.messages` and, when a maildir is given, written to
``maildir/new`` (:class:`mailbox.Maildir`) so another program can read it.

Observers (called in the server's thread): ``on_command(step, address)`` for every command as it
arrives, before any scripted fault (the steps below, and ``rset`` and ``quit``);
``on_mail(mail, queue_id)`` for every mail kept, before its 250.

Faults are scripted per SMTP step (``connect``, ``ehlo``, ``mail``, ``rcpt``, ``data``)::

    server.fail("rcpt", 451, "4.3.0 try again", times=3)   # then recover
    server.hang("data", 5.0)                               # answer late
    server.drop_connection("data")                         # close the socket before replying
    server.refuse_connections(); server.accept_connections()
    server.close_connections()                             # like an idle timeout on the relay
    server.clear_faults()

A fault at ``connect`` happens before aiosmtpd sees the connection (:class:`_ConnectFault`):
the reply replaces the greeting, or the connection is closed, or greeted late.

The mailbox simulator (:class:`MailboxSimulator`, on in ``mailpipe up``; like SES's simulator
addresses): reserved local parts at one reserved domain (:data:`SIMULATOR_DOMAIN`) answer scripted
replies, so the whole pipeline can show a bounce, a deferral and a dead letter without set-up::

    success@        accepted and kept, as any address
    bounce@         550 5.1.1 at RCPT TO (a hard bounce)
    defer-N@        451 4.2.0 after DATA for the first N attempts of a mail, then accepted
    defer-forever@  451 4.2.0 after DATA on every attempt
    slow@, slow-S@  the reply after DATA comes 5 (or S, at most 60) seconds late, then accepted
    (anything else) 550 5.1.1 at RCPT TO naming the valid local parts

Each may carry a ``+label`` (``bounce+1@``), matched ignoring case. Attempts are counted per mail
(its ``Message-ID``, which the subscriber derives from the mail id, so Pub/Sub redeliveries and
replays count as the same mail; without one, the message's bytes) and recipient: that is why
the deferrals come after DATA, where the server first sees the mail. Scripted faults come first.

Errors::

    EmulatorError (emulator.errors)
    └── LocalSmtpServerError   the server could not start; the message says how to fix it
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import errno
import hashlib
import mailbox
import re
import secrets
import socket
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from emulator.errors import EmulatorError
from mailpipe.mail import addr_spec

Step = Literal["connect", "ehlo", "mail", "rcpt", "data"]
Command = Literal["connect", "ehlo", "mail", "rcpt", "data", "rset", "quit"]  # what on_command sees
STEPS: tuple[Step, ...] = ("connect", "ehlo", "mail", "rcpt", "data")

# Replies (RFC 5321 § 4.2 with RFC 3463 enhanced status codes).
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
AUTH_SUCCESSFUL = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"

_START_TIMEOUT = 30.0  # the machine may be busy with other tests; start-up is normally ~10 ms
_T = TypeVar("_T")


class LocalSmtpServerError(EmulatorError):
    """The local SMTP server could not start or be controlled."""


@dataclass(frozen=True)
class ReceivedMail:
    """One mail the server accepted (250 after DATA)."""

    mail_from: str
    recipients: tuple[str, ...]
    raw: bytes
    message: EmailMessage
    tls: bool
    login: str | None
    peer: str
    smtputf8: bool = False  # the client declared SMTPUTF8 (RFC 6531) at MAIL FROM


@dataclass
class _Fault:
    step: Step
    action: Literal["reply", "hang", "drop"]
    code: int = 0
    text: str = ""
    seconds: float = 0.0
    times: int | None = None
    address: str | None = None

    def matches(self, step: str, address: str | None) -> bool:
        if self.step != step:
            return False
        return self.address is None or (address or "").lower() == self.address.lower()


# The mailbox simulator's reserved domain. Under .example (RFC 2606/6761): never delegated in DNS,
# so no real mailbox can be reached by mistake, and not one of email-validator's special-use names
# (.test, .localhost, .invalid, .local, ...), which the publisher's address validation refuses.
SIMULATOR_DOMAIN = "simulator.mailpipe.example"
MAX_SIMULATED_DEFERRALS = 100  # Pub/Sub's max_delivery_attempts is at most 100 too
DEFAULT_SLOW_SECONDS = 5
MAX_SLOW_SECONDS = 60  # bounded: a relay that never answers is a fault (hang), not a mailbox
_MAX_COUNTED = 100_000  # (mail, recipient) attempt counters kept; the oldest are forgotten
_MAILBOX = re.compile(
    r"(?P<name>success|bounce|defer-forever|defer-(?P<deferrals>[0-9]{1,4})"
    r"|slow(?:-(?P<seconds>[0-9]{1,4}))?)(?:\+.*)?",
    re.IGNORECASE | re.DOTALL,
)
SimulatedBehaviour = Literal["success", "bounce", "defer", "defer-forever", "slow", "unknown"]


@dataclass(frozen=True)
class SimulatedMailbox:
    """What a simulator address does: its behaviour and its number (deferrals or seconds)."""

    address: str
    behaviour: SimulatedBehaviour
    deferrals: int = 0
    delay: float = 0.0


class MailboxSimulator:
    """Scripted replies for reserved local parts at ``domain`` (see the module docstring).

    Raises ValueError for a domain the publisher would refuse in a recipient address.
    """

    local_parts = ("success", "bounce", "defer-N", "defer-forever", "slow", "slow-S")

    def __init__(self, domain: str = SIMULATOR_DOMAIN) -> None:
        self.domain = simulator_domain(domain)
        self._lock = threading.Lock()
        self._attempts: OrderedDict[tuple[str, str], int] = OrderedDict()

    @property
    def usage(self) -> str:
        """The valid local parts, as the 550 for an unknown one names them."""
        return (
            f"success, bounce, defer-N (N = 1..{MAX_SIMULATED_DEFERRALS}: N deferrals, then "
            f"accepted), defer-forever, slow or slow-S (S = 1..{MAX_SLOW_SECONDS} seconds late), "
            f"each optionally with +label (bounce+1@{self.domain})"
        )

    def mailbox(self, address: str) -> SimulatedMailbox | None:
        """The simulated mailbox at ``address``; None if it is not at the simulator's domain."""
        local, at, domain = address.rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain:
            return None
        unknown = SimulatedMailbox(address, "unknown")
        match = _MAILBOX.fullmatch(local)
        if match is None:
            return unknown
        name = match["name"].lower()
        if match["deferrals"] is not None:
            deferrals = int(match["deferrals"])
            valid = 1 <= deferrals <= MAX_SIMULATED_DEFERRALS
            return SimulatedMailbox(address, "defer", deferrals=deferrals) if valid else unknown
        if name.startswith("slow"):
            seconds = int(match["seconds"] or DEFAULT_SLOW_SECONDS)
            valid = 1 <= seconds <= MAX_SLOW_SECONDS
            return SimulatedMailbox(address, "slow", delay=float(seconds)) if valid else unknown
        behaviours: dict[str, SimulatedBehaviour] = {
            "success": "success",
            "bounce": "bounce",
            "defer-forever": "defer-forever",
        }
        return SimulatedMailbox(address, behaviours[name])

    def rcpt_reply(self, address: str) -> str | None:
        """The reply to ``RCPT TO:<address>``, or None to accept it as usual."""
        box = self.mailbox(address)
        if box is None:
            return None
        shown = _shown(address)
        if box.behaviour == "bounce":
            return f"550 5.1.1 <{shown}>: user unknown (mailbox simulator: always refused)"
        if box.behaviour == "unknown":
            return f"550 5.1.1 <{shown}>: no such mailbox simulator address; use {self.usage}"
        return None

    async def data_reply(
        self, recipients: Iterable[str], raw: bytes, message: EmailMessage
    ) -> str | None:
        """After DATA: wait for the slow recipients, count this attempt for each deferring one,
        and return the 451 if any of them still defers (None to accept the mail as usual)."""
        mailboxes = [m for m in map(self.mailbox, recipients) if m is not None]
        delay = max((m.delay for m in mailboxes), default=0.0)
        if delay:
            await asyncio.sleep(delay)
        deferring = [m for m in mailboxes if m.behaviour in ("defer", "defer-forever")]
        key = _mail_key(raw, message) if deferring else ""
        deferred: list[str] = []
        for box in deferring:
            attempt = self._count(key, box.address)
            shown = _shown(box.address)
            if box.behaviour == "defer-forever":
                deferred.append(f"<{shown}> never recovers (attempt {attempt})")
            elif attempt <= box.deferrals:
                deferred.append(f"<{shown}> attempt {attempt} of {box.deferrals} deferred")
        if not deferred:
            return None
        return (
            f"451 4.2.0 mailbox temporarily unavailable: {'; '.join(deferred)} (mailbox simulator)"
        )

    def attempts(self, message_id: str, address: str) -> int:
        """How many times the mail with ``message_id`` reached DATA for deferring ``address``."""
        with self._lock:
            return self._attempts.get((message_id.strip(), address.lower()), 0)

    def _count(self, key: str, address: str) -> int:
        with self._lock:
            counter = (key, address.lower())
            attempt = self._attempts.pop(counter, 0) + 1
            self._attempts[counter] = attempt  # most recent last: the oldest are evicted first
            while len(self._attempts) > _MAX_COUNTED:
                self._attempts.popitem(last=False)
            return attempt


def simulator_domain(domain: str) -> str:
    """``domain`` as the simulator matches it (lower case); ValueError if the publisher would
    refuse recipient addresses there (email-validator refuses special-use names such as .test)."""
    candidate = domain.strip().lower().rstrip(".")
    try:
        addr_spec(f"success@{candidate}")
    except ValueError as exc:
        raise ValueError(
            f"the mailbox simulator's domain {domain!r} cannot be used: the publisher refuses "
            f"recipient addresses there ({exc}). Use a domain under .example, such as "
            f"{SIMULATOR_DOMAIN}."
        ) from None
    if not candidate.isascii():
        raise ValueError(f"the mailbox simulator's domain must be ASCII (IDNA), got {domain!r}")
    return candidate


def _mail_key(raw: bytes, message: EmailMessage) -> str:
    """Which mail this is across attempts: its Message-ID, else a digest of its bytes."""
    try:
        message_id = message["Message-ID"]
    except Exception:  # a header the parser cannot read: count the bytes instead
        message_id = None
    if message_id:
        return str(message_id).strip()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _shown(address: str) -> str:
    """An address for a reply line (which must stay short: RFC 5321 § 4.5.3.1.5)."""
    return address if len(address) <= 100 else address[:97] + "..."


class _Session(SMTP):
    """aiosmtpd's SMTP protocol, counted among the server's open connections."""

    def __init__(self, handler: Any, *, owner: LocalSmtpServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner
        self._counted = False

    def take_over(self) -> None:
        """Count this session as the connection a :class:`_ConnectFault` greeted late."""
        self._counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._counted:  # called again after STARTTLS, on the same connection
            self._counted = True
            self._owner._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._owner._closed(self)
        super().connection_lost(error)


class _ConnectFault(asyncio.Protocol):
    """A connection with a scripted fault at connect, before aiosmtpd greets it.

    ``reply``: the scripted reply instead of the greeting, then closed; ``drop``: closed at
    once; ``hang``: nothing is read or sent for the given time, then the connection is handed
    to an aiosmtpd session (``transport.set_protocol``), which greets it as usual.
    """

    def __init__(
        self, owner: LocalSmtpServer, fault: _Fault, session: Callable[[], _Session]
    ) -> None:
        self._owner = owner
        self._fault = fault
        self._session = session
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._owner._opened(self)
        fault = self._fault
        if fault.action == "reply":
            transport.write(f"{fault.code} {fault.text}\r\n".encode())
            transport.close()
        elif fault.action == "drop":
            transport.close()
        else:
            transport.pause_reading()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(fault.seconds, self._greet_late)

    def _greet_late(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        session = self._session()
        session.take_over()
        self._owner._handed_over(self, session)
        transport.set_protocol(session)
        session.connection_made(transport)
        transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._owner._closed(self)


class _Handler:
    """The aiosmtpd handler: faults first, then the normal behaviour; keeps accepted mails."""

    def __init__(self, owner: LocalSmtpServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        status = await self._owner._scripted("ehlo", server)
        if status is not None:
            return [status]
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        status = await self._owner._scripted("mail", server, address)
        if status is not None:
            return status
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return SENDER_OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        status = await self._owner._scripted("rcpt", server, address)
        if status is None and self._owner.simulator is not None:
            status = self._owner.simulator.rcpt_reply(address)
        if status is not None:
            return status
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return RECIPIENT_OK

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        self._owner._observe("rset")  # aiosmtpd has cleared the envelope
        return MISSING  # aiosmtpd's own reply

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        self._owner._observe("quit")
        return MISSING

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        status = await self._owner._scripted("data", server)
        if status is not None:
            return status
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)  # policy.default makes EmailMessage objects
        if self._owner.simulator is not None:
            status = await self._owner.simulator.data_reply(envelope.rcpt_tos, raw, message)
            if status is not None:
                return status
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        auth_data = session.auth_data  # a LoginPassword once AUTH PLAIN/LOGIN succeeded
        login = auth_data.login if isinstance(auth_data, LoginPassword) else None
        mail = ReceivedMail(
            mail_from=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            raw=raw,
            message=message,
            tls=tls,
            login=login.decode("utf-8", "replace") if login is not None else None,
            peer=str(session.peer),
            smtputf8=bool(envelope.smtp_utf8),
        )
        queue_id = self._owner._keep(mail)
        return f"250 2.0.0 OK: queued as {queue_id}"


class _Controller(Controller):
    """aiosmtpd's Controller, making each connection's protocol through the server (faults)."""

    def __init__(self, handler: _Handler, *, owner: LocalSmtpServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner

    def factory(self) -> asyncio.Protocol:
        """A session for a new connection, or the connect fault scripted for it."""
        return self._owner._new_connection(self.session)

    def session(self) -> _Session:
        return _Session(self.handler, owner=self._owner, **self.SMTP_kwargs)


class LocalSmtpServer:
    """A real SMTP server on loopback. ``port=0`` picks a free port (see :attr:`port`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        maildir: Path | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls_context: ssl.SSLContext | None = None,
        auth: dict[str, str] | None = None,
        hostname: str = "localhost",
        smtputf8: bool = True,
        on_command: Callable[[Command, str | None], None] | None = None,
        on_mail: Callable[[ReceivedMail, str], None] | None = None,
        simulator: MailboxSimulator | None = None,
    ) -> None:
        if tls_context is not None and implicit_tls_context is not None:
            raise ValueError("give tls_context (STARTTLS) or implicit_tls_context, not both")
        self.host = host
        self.port = port
        self.maildir = maildir
        self.tls_context = tls_context
        self.implicit_tls_context = implicit_tls_context
        self._auth = dict(auth) if auth else None
        self._hostname = hostname
        self._smtputf8 = smtputf8  # offer SMTPUTF8 in the EHLO reply (a relay may not)
        self._controller: _Controller | None = None
        self._maildir: mailbox.Maildir | None = None
        self._cond = threading.Condition()
        self._messages: list[ReceivedMail] = []
        self._faults: list[_Fault] = []
        self._sessions: set[_Session | _ConnectFault] = set()
        self._on_command = on_command
        self._on_mail = on_mail
        self.simulator = simulator  # scripted replies at its domain; None: every address as usual
        self._ready = False
        self._connections_total = 0
        self._max_open = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalSmtpServer:
        """Listen and serve in a background thread; return once the server answers."""
        if self._controller is not None:
            raise LocalSmtpServerError("the local SMTP server is already running")
        if self.maildir is not None:
            self._maildir = mailbox.Maildir(self.maildir, create=True)
        sock = self._bind()  # a clear error if the port is taken; port 0 picks a free one
        self.port = sock.getsockname()[1]
        sock.close()
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "server_hostname": self._hostname,  # avoids socket.getfqdn(), a DNS lookup
            "ready_timeout": _START_TIMEOUT,
            "enable_SMTPUTF8": self._smtputf8,
        }
        if self.implicit_tls_context is not None:
            kwargs["ssl_context"] = self.implicit_tls_context
        if self.tls_context is not None:
            kwargs["tls_context"] = self.tls_context
        if self._auth is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
            # With STARTTLS, AUTH is only offered after it; with implicit TLS the whole session
            # is encrypted already; without TLS (loopback only) AUTH is allowed in clear.
            kwargs["auth_require_tls"] = self.tls_context is not None
        controller = _Controller(_Handler(self), owner=self, **kwargs)
        try:
            controller.start()
        except Exception as exc:
            raise LocalSmtpServerError(
                f"the local SMTP server on {self.address} did not start: {exc}"
            ) from exc
        self._controller = controller
        # Controller.start() opens one connection to check the server answers; forget it.
        with self._cond:
            self._cond.wait_for(lambda: not self._sessions, timeout=_START_TIMEOUT)
            self._connections_total = 0
            self._max_open = 0
            self._ready = True
        return self

    def stop(self) -> None:
        """Stop serving and close every connection. Received mails are kept."""
        if self._controller is None:
            return
        self._ready = False
        # Close the sessions while the loop still runs: Controller.stop() cancels their tasks
        # and closes the loop, which would leave the sockets of hanging sessions open.
        with contextlib.suppress(TimeoutError):
            self.close_connections(timeout=5.0)
        controller, self._controller = self._controller, None
        controller.stop()

    def __enter__(self) -> LocalSmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says it is TCP; without it Nagle delays every EHLO reply by ~40 ms.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise LocalSmtpServerError(
                    f"cannot listen on {self.address}: the port is already in use. Stop the "
                    f"program using it (`ss -ltnp 'sport = :{self.port}'` shows which one) or "
                    "choose another port (port 0 picks a free one)."
                ) from exc
            raise LocalSmtpServerError(
                f"cannot listen on {self.address}: {exc.strerror}. Use an address of this "
                "machine, such as 127.0.0.1."
            ) from exc
        return sock

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._controller is not None

    # -- what was received -------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMail]:
        """A snapshot of the mails received so far, oldest first."""
        with self._cond:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        """Wait until at least ``count`` mails were received; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout=timeout):
                raise TimeoutError(
                    f"the local SMTP server received {len(self._messages)} mail(s) in "
                    f"{timeout} s, expected {count}"
                )
            return list(self._messages)

    def clear_messages(self) -> None:
        with self._cond:
            self._messages.clear()

    # -- connections -------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        with self._cond:
            return len(self._sessions)

    @property
    def max_open_connections(self) -> int:
        """The most connections that were open at the same time since start."""
        with self._cond:
            return self._max_open

    @property
    def connections_total(self) -> int:
        """Connections accepted since start."""
        with self._cond:
            return self._connections_total

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> None:
        """Wait until exactly ``count`` connections are open (e.g. 0 after clients quit)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._sessions) == count, timeout=timeout):
                raise TimeoutError(
                    f"{len(self._sessions)} connection(s) open after {timeout} s, expected {count}"
                )

    def close_connections(self, timeout: float = 10.0) -> None:
        """Close every client connection now, without a reply (as a relay's idle timeout does)."""

        def close_all() -> None:
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()

        self._call_in_loop(close_all)
        self.wait_for_connections(0, timeout)

    def refuse_connections(self) -> None:
        """Stop listening: new connections are refused; open ones carry on."""
        controller = self._running_controller()

        def stop_listening() -> None:
            if controller.server is not None:
                controller.server.close()

        self._call_in_loop(stop_listening)

    def accept_connections(self) -> None:
        """Listen again on the same port after :meth:`refuse_connections`."""
        controller = self._running_controller()
        sock = self._bind()

        async def listen() -> None:
            controller.server = await controller.loop.create_server(
                controller.factory, sock=sock, ssl=controller.ssl_context
            )

        asyncio.run_coroutine_threadsafe(listen(), controller.loop).result(_START_TIMEOUT)

    # -- faults ------------------------------------------------------------------------------

    def fail(
        self,
        step: Step,
        code: int,
        message: str,
        times: int | None = None,
        *,
        address: str | None = None,
    ) -> None:
        """Answer ``code message`` at ``step`` (``times`` times, or until cleared).

        ``address`` limits a ``mail`` or ``rcpt`` fault to that address. At ``connect`` the
        reply replaces the greeting and the connection is closed.
        """
        if not 200 <= code <= 599:
            raise ValueError(f"an SMTP reply code is 200..599, got {code}")
        if "\r" in message or "\n" in message:
            raise ValueError("the reply text must be one line")
        self._add(
            _Fault(_step(step), "reply", code=code, text=message, times=times, address=address)
        )

    def hang(self, step: Step, seconds: float, times: int | None = None) -> None:
        """Wait ``seconds`` before answering at ``step`` (a slow or stuck relay)."""
        self._add(_Fault(_step(step), "hang", seconds=seconds, times=times))

    def drop_connection(self, step: Step, times: int | None = None) -> None:
        """Close the connection instead of answering at ``step``.

        At ``data`` the whole message has been received when the connection is closed, and the
        mail is not kept: the sender cannot know whether it was accepted.
        """
        self._add(_Fault(_step(step), "drop", times=times))

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def _add(self, fault: _Fault) -> None:
        if fault.times is not None and fault.times < 1:
            raise ValueError("times must be at least 1 (or None for until cleared)")
        with self._cond:
            self._faults.append(fault)

    def _take_fault(self, step: str, address: str | None) -> _Fault | None:
        with self._cond:
            if not self._ready:
                return None
            for fault in self._faults:
                if fault.matches(step, address):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times == 0:
                            self._faults.remove(fault)
                    return fault
            return None

    # -- called in the server's event loop ---------------------------------------------------

    def _fault_for(self, step: Step, address: str | None = None) -> _Fault | None:
        self._observe(step, address)
        return self._take_fault(step, address)

    def _observe(self, command: Command, address: str | None = None) -> None:
        if self._on_command is not None:
            self._on_command(command, address)

    def _new_connection(self, session: Callable[[], _Session]) -> asyncio.Protocol:
        """The protocol for a new connection: a session, or its scripted connect fault."""
        fault = self._fault_for("connect")
        if fault is None:
            return session()
        return _ConnectFault(self, fault, session)

    async def _scripted(self, step: Step, session: SMTP, address: str | None = None) -> str | None:
        """The scripted reply for ``step``, or None to carry on normally."""
        fault = self._fault_for(step, address)
        if fault is None:
            return None
        if fault.action == "hang":
            await asyncio.sleep(fault.seconds)
            return None
        if fault.action == "drop":
            assert session.transport is not None
            session.transport.close()
            # connection_lost() cancels this session's task; wait for it without replying.
            await asyncio.Event().wait()
        return f"{fault.code} {fault.text}"

    def _opened(self, connection: _Session | _ConnectFault) -> None:
        with self._cond:
            self._sessions.add(connection)
            self._connections_total += 1
            self._max_open = max(self._max_open, len(self._sessions))
            self._cond.notify_all()

    def _handed_over(self, gate: _ConnectFault, session: _Session) -> None:
        """A connection greeted late moves from its connect fault to its session: same count."""
        with self._cond:
            self._sessions.discard(gate)
            self._sessions.add(session)

    def _closed(self, connection: _Session | _ConnectFault) -> None:
        with self._cond:
            self._sessions.discard(connection)
            self._cond.notify_all()

    def _keep(self, mail: ReceivedMail) -> str:
        """Keep an accepted mail (and write it to the maildir); its queue id for the 250."""
        queue_id = secrets.token_hex(6)
        if self._maildir is not None:
            queue_id = self._maildir.add(mail.raw)
        with self._cond:
            self._messages.append(mail)
            self._cond.notify_all()
        if self._on_mail is not None:
            self._on_mail(mail, queue_id)
        return queue_id

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert self._auth is not None
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        expected = self._auth.get(login)
        given = auth_data.password.decode("utf-8", "replace")
        if expected is not None and secrets.compare_digest(expected.encode(), given.encode()):
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False, message=AUTH_INVALID)

    # -- helpers -----------------------------------------------------------------------------

    def _running_controller(self) -> _Controller:
        if self._controller is None:
            raise LocalSmtpServerError("the local SMTP server is not running; call start() first")
        return self._controller

    def _call_in_loop(self, func: Callable[[], _T]) -> _T:
        controller = self._running_controller()

        async def call() -> _T:
            return func()

        return asyncio.run_coroutine_threadsafe(call(), controller.loop).result(_START_TIMEOUT)


def _step(step: str) -> Step:
    if step not in STEPS:
        raise ValueError(f"step must be one of {', '.join(STEPS)}; got {step!r}")
    return step
